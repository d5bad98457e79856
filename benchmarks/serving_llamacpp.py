"""`tunepipe serve --engine llamacpp` against `--engine embedded`: the same model, the same chat prompts, greedy,
one request at a time, each answered through tunepipe's server to the `openai` client, in one run.

    .venv/bin/python benchmarks/serving_llamacpp.py                   # SmolLM2-135M-Instruct (tests' real model)
    .venv/bin/python benchmarks/serving_llamacpp.py --types f16 q8_0 q4_k_m --prompts 8 --max-tokens 48 --threads 2

Needs `tunepipe llamacpp-env`. The GGUFs are written from the transformers directory by the export stage's code
(tasks/llamacpp; no importance matrix here). llama.cpp runs as `tunepipe serve` runs it: llama_cpp.server from its
venv behind tunepipe's front (engines/llamacpp.py); the embedded engine is transformers + peft in this process.
Tokens/s is generated tokens (each server's `usage.completion_tokens`; llama-cpp-python's re-counts the answer's
text) over wall time of the prompt set, after one warm-up request; the ratio is against the embedded engine in the
same run. `benchmarks/gguf_llamacpp.py` measures llama.cpp's binding directly, without a server. Prints one JSON
object.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
from datetime import date
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "benchmarks"))
from gguf_llamacpp import PROMPTS, embedded_rate, served_rate  # noqa: E402 - the sibling benchmark's load and client


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="transformers model directory (default: the tests' SmolLM2-135M-Instruct)")
    parser.add_argument("--types", nargs="+", default=["f16", "q8_0"])
    parser.add_argument("--prompts", type=int, default=4)
    parser.add_argument("--max-tokens", type=int, default=24)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="llama.cpp's threads")
    parser.add_argument("--workdir", help="where the GGUFs and the server's log go (default: a temp dir)")
    return parser


def llamacpp_served_rate(gguf: Path, prompts: list[str], max_tokens: int, threads: int, log: Path) -> dict:
    from tunepipe.schemas.serve import ServeConfig
    from tunepipe.tasks.core.environment import load_environment
    from tunepipe.tasks.serving.engines.llamacpp import llamacpp_behind_front
    from tunepipe.tasks.serving.process import ServerThread
    from tunepipe.tasks.serving.settings import resolve_serve_config

    config = resolve_serve_config(ServeConfig.model_validate({
        "base": str(gguf), "served_model_name": "base", "engine": "llamacpp", "max_tokens_limit": max_tokens,
        "llamacpp": {"threads": threads, "n_ctx": 1024}}), load_environment("cpu"))
    app, _, server = llamacpp_behind_front(config, api_key=None, log_file=log)
    server.start()
    try:
        with ServerThread(app) as front:
            return served_rate(front.url, "base", prompts, max_tokens)
    finally:
        server.stop()


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from tunepipe.tasks.llamacpp.env import require_tools
    from tunepipe.tasks.llamacpp.gguf import convert_model, quantize

    if args.model is None:
        sys.path.insert(0, str(REPO))
        from tests.helpers.real_model import smollm2_dir

        args.model = str(smollm2_dir())
    tools = require_tools()
    work = Path(args.workdir or tempfile.mkdtemp(prefix="serving-llamacpp-"))
    prompts = (PROMPTS * (1 + args.prompts // len(PROMPTS)))[: args.prompts]
    f16 = convert_model(tools, Path(args.model), work / "model-f16.gguf", "f16", None)
    rows = {"embedded (transformers, fp32)": embedded_rate(args.model, prompts, args.max_tokens)}
    for gtype in args.types:
        path = f16 if gtype == "f16" else quantize(tools, f16, work / f"model-{gtype}.gguf", gtype, imatrix=None,
                                                    threads=args.threads)
        rows[f"llamacpp {gtype}"] = {"size_mb": round(path.stat().st_size / 2**20, 1),
                                     **llamacpp_served_rate(path, prompts, args.max_tokens, args.threads, work / "llamacpp.log")}
    base = rows["embedded (transformers, fp32)"]["tokens_per_second"]
    for row in rows.values():
        row["ratio_vs_embedded"] = round(row["tokens_per_second"] / base, 2)
    print(json.dumps({
        "date": str(date.today()), "machine": f"{os.cpu_count()} CPUs {platform.machine()}, load {os.getloadavg()[0]:.2f}",
        "model_dir": args.model, "prompts": len(prompts), "max_tokens": args.max_tokens, "threads": args.threads,
        "results": rows,
    }, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
