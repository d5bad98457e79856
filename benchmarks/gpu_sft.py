"""GPU SFT: tunepipe's sft training against a plain HF Trainer + PEFT script, LoRA and QLoRA,
with and without Liger kernels and packing (issue 8, benchmark 6). Needs one CUDA GPU.

    python benchmarks/gpu_sft.py                          # 0.5B model, lora + qlora, every variant
    python benchmarks/gpu_sft.py --steps 4 --warmup-steps 1 --records 400   # a smoke run

The model is a randomly initialised Llama with the shape of Qwen2.5-0.5B (hidden 896, 24 blocks,
14 query / 2 key-value heads, SwiGLU 4864, tied 151,936-token vocabulary: 494M parameters), built
on the GPU and saved once; throughput does not depend on the weights' values. The data are
synthetic instruction records whose answer lengths are log-normal (a long tail, like real
instruction sets), tokenised by a BPE tokenizer trained on them (tunepipe's base_model code).

Sides, each in a fresh process, same rows, steps, seed, learning rate, batch and precision:

- `baseline`: what a user writes: `AutoModelForCausalLM.from_pretrained` (4-bit
  `BitsAndBytesConfig` + `prepare_model_for_kbit_training` for QLoRA), `peft.LoraConfig` +
  `get_peft_model`, `transformers.Trainer` with `DataCollatorForSeq2Seq` (each batch padded to
  its longest row). The rows are tunepipe's own encoding of the records, so both sides see the
  same token ids and labels.
- `tunepipe`, `liger`, `packing`, `liger+packing`: the sft stage's own training job
  (`tasks.sft.train.train_job`, what the stage runs in its process) with the environment profile
  (`--environment`, default single-gpu-80gb), `liger_kernel` and `packing` set as named.

Batch size, accumulation, gradient checkpointing and dtype come from the profile on both sides;
`--attn` overrides the profile's attention kernel (flash-attn is not installed everywhere).

Reported per run: tokens/s = non-padding tokens (the Trainer's `num_input_tokens_seen`) per second
of wall between the end of optimizer step `--warmup-steps` and the last step (CUDA synchronised
at each step end), so start-up, kernel compilation and the final save are outside the window;
peak memory = `torch.cuda.max_memory_allocated` over the whole run; MFU = model FLOPs per token x
tokens/s / the GPU's dense bf16 peak. Model FLOPs per token (no recomputation counted): 4 x the
matmul parameters (forward, and the backward's input gradients) + 6 x the trainable parameters
(their weight gradients) + 12 x layers x hidden x the mean attended length (PaLM's attention
term, with each token's own document length). Ratios are against the same method's baseline in
the same run. For tunepipe runs the memory planner's estimate (`tasks.plan.plan`) is reported
next to the measured peak. Prints one JSON object (and writes it to `--out`).
"""

from __future__ import annotations

import argparse
import json
import math
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks._common import header, median, ratio, rounded  # noqa: E402

# Qwen2.5-0.5B's shape as a Llama (Qwen2 differs only by q/k/v biases).
ARCH = {
    "hidden_size": 896, "intermediate_size": 4864, "num_hidden_layers": 24, "num_attention_heads": 14,
    "num_key_value_heads": 2, "vocab_size": 151936, "tie_word_embeddings": True, "max_position_embeddings": 4096,
    "rope_theta": 1_000_000.0, "rms_norm_eps": 1e-6,
}
# `--tiny`: a 2-block model, to try the harness on a CPU (baseline/tunepipe/packing only).
TINY_ARCH = {**ARCH, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
             "vocab_size": 8000}
VARIANTS = ("baseline", "tunepipe", "liger", "packing", "liger+packing")
# Dense bf16 peak of the card (spec sheets), for MFU.
PEAK_BF16_TFLOPS = {"H100": 989.4, "H200": 989.4, "A100": 312.0, "L4": 121.0, "A10": 125.0}


# --------------------------------------------------------------------------------------------
# Inputs: data, tokenizer, model


def synthetic_records(n: int, seed: int) -> list[dict[str, str]]:
    """Instruction records: 6-40 word instructions, answers log-normal around 90 words (5-700)."""
    rng = random.Random(seed)
    syllables = ["ka", "lo", "mi", "ten", "ra", "su", "vel", "do", "pri", "an", "ço", "zu", "ber", "ith", "og", "nar"]
    words = sorted({"".join(rng.choice(syllables) for _ in range(rng.randint(1, 3))) for _ in range(20000)})
    records = []
    for i in range(n):
        instruction = " ".join(rng.choice(words) for _ in range(rng.randint(6, 40)))
        answer_words = int(min(700, max(5, rng.lognormvariate(math.log(90), 0.9))))
        output = " ".join(rng.choice(words) for _ in range(answer_words))
        records.append({"id": f"bench-{i}", "task": "bench", "instruction": instruction, "output": output})
    return records


def build_inputs(workdir: Path, records: int, seed: int, arch: dict[str, Any]) -> dict[str, str]:
    """The data artifact (train/validation JSONL) and the model directory, built once."""
    import torch
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    from tunepipe.schemas.base_model import BaseModelConfig
    from tunepipe.tasks.base_model.stage import train_tokenizer, wrap_tokenizer

    data_dir, model_dir = workdir / "data", workdir / "model"
    if (model_dir / "config.json").exists() and (data_dir / "train.jsonl").exists():
        return {"data_dir": str(data_dir), "model_dir": str(model_dir)}
    data_dir.mkdir(parents=True, exist_ok=True)
    rows = synthetic_records(records + 64, seed)
    for name, part in (("train", rows[:records]), ("validation", rows[records:])):
        with open(data_dir / f"{name}.jsonl", "w") as handle:
            handle.writelines(json.dumps(r) + "\n" for r in part)
    spec = BaseModelConfig.model_validate({"tokenizer": {"vocab_size": 8000}, "architecture": {"max_position_embeddings": 4096}})
    tokenizer = wrap_tokenizer(train_tokenizer([r["instruction"] + "\n" + r["output"] for r in rows], spec), spec)
    config = LlamaConfig(
        **arch, rope_parameters={"rope_type": "default", "rope_theta": arch["rope_theta"]},
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(seed)
    with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
        model = LlamaForCausalLM(config).to(torch.bfloat16)
    model.generation_config = GenerationConfig(eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    model.save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    return {"data_dir": str(data_dir), "model_dir": str(model_dir)}


# --------------------------------------------------------------------------------------------
# One run (child process)


def clock_callback(log: list[dict[str, float]]):
    """Wall time and tokens seen at the end of every optimizer step (GPU work finished first)."""
    import torch
    from transformers import TrainerCallback

    class Clock(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            log.append({"step": state.global_step, "t": time.perf_counter(), "tokens": int(state.num_input_tokens_seen)})

    return Clock()


def sft_job(spec: dict[str, Any], out_dir: Path) -> dict[str, Any]:
    """The sft stage's job dict for this run (what SFTStage.run hands to train_job)."""
    from tunepipe.schemas.sft import SFTConfig
    from tunepipe.tasks.core.environment import load_environment

    profile = load_environment(spec["environment"])
    env = profile.model_copy(
        update={"attn_implementation": spec["attn"] or profile.attn_implementation, "liger_kernel": "liger" in spec["variant"]}
    )
    config = SFTConfig.model_validate(
        {
            "method": {"name": spec["method"], "r": spec["rank"], "alpha": 2 * spec["rank"], "dropout": 0.0},
            "max_length": spec["max_length"],
            "packing": "packing" in spec["variant"],
            "chat_template": "model",
            "training": {
                "max_steps": spec["steps"], "learning_rate": 1e-4, "warmup_ratio": 0.0, "logging_steps": 10,
                "save_steps": spec["steps"], "eval_steps": None, "seed": spec["seed"],
            },
            "heldout": {"max_examples_per_task": 0},
        }
    )
    return {
        "config": config.model_dump(mode="json"), "env": env.model_dump(mode="json"),
        "model_path": spec["model_dir"], "data_dir": spec["data_dir"], "tasks": None,
        "output_dir": str(out_dir), "save_to": "adapter", "checkpoint_dir": str(out_dir / "checkpoints"),
    }


def run_tunepipe(spec: dict[str, Any], out_dir: Path, clock: list[dict[str, float]]) -> dict[str, Any]:
    import tunepipe.tasks.sft.train as train
    from tunepipe.schemas.environment import EnvironmentProfile
    from tunepipe.schemas.sft import SFTConfig
    from tunepipe.tasks.training.memory_plan import plan

    job = sft_job(spec, out_dir)
    original = train.make_callbacks
    train.make_callbacks = lambda model, method, label="training": [*original(model, method, label), clock_callback(clock)]
    metrics = train.train_job(job)
    config, env = SFTConfig.model_validate(job["config"]), EnvironmentProfile.model_validate(job["env"])
    planned = plan(spec["model_dir"], config.method, env, spec["max_length"])
    return {"train_loss": metrics["train_loss"], "trainable": metrics["trainable_parameters"],
            "planned_memory_gb": planned["memory"]["total_gb"], "planned": planned["memory"]}


def run_baseline(spec: dict[str, Any], out_dir: Path, clock: list[dict[str, float]]) -> dict[str, Any]:
    """Plain transformers.Trainer + PEFT, as a user would write it."""
    import torch
    from datasets import Dataset
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig, DataCollatorForSeq2Seq, Trainer, TrainingArguments

    from tunepipe.tasks.training.peft_methods import count_parameters
    from tunepipe.tasks.sft.train import prepare_sft

    job = sft_job(spec, out_dir)
    env = job["env"]
    prepared = prepare_sft(job)  # tunepipe's encoding: identical token ids and labels on both sides
    tokenizer = prepared["tokenizer"]
    quantization = None
    if spec["method"] == "qlora":
        quantization = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=torch.bfloat16
        )
    model = AutoModelForCausalLM.from_pretrained(
        spec["model_dir"], dtype=torch.bfloat16, attn_implementation=env["attn_implementation"],
        quantization_config=quantization, device_map={"": 0} if torch.cuda.is_available() else None,
    )
    model.config.use_cache = False
    if quantization is not None:
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=env["gradient_checkpointing"])
    model = get_peft_model(
        model, LoraConfig(r=spec["rank"], lora_alpha=2 * spec["rank"], lora_dropout=0.0, target_modules="all-linear", task_type="CAUSAL_LM")
    )
    args = TrainingArguments(
        output_dir=str(out_dir / "checkpoints"), max_steps=spec["steps"], learning_rate=1e-4, warmup_steps=0,
        lr_scheduler_type="cosine", weight_decay=0.0, seed=spec["seed"], data_seed=spec["seed"],
        per_device_train_batch_size=env["per_device_batch_size"], gradient_accumulation_steps=env["gradient_accumulation_steps"],
        gradient_checkpointing=env["gradient_checkpointing"], bf16=env["dtype"] == "bfloat16", use_cpu=env["device"] == "cpu",
        logging_steps=10, save_strategy="no",
        optim="paged_adamw_8bit" if spec["method"] == "qlora" else "adamw_torch", report_to="none",
        include_num_input_tokens_seen="non_padding", remove_unused_columns=False,
    )
    trainer = Trainer(
        model=model, args=args, train_dataset=Dataset.from_list(prepared["train_rows"]),
        data_collator=DataCollatorForSeq2Seq(tokenizer, padding=True, label_pad_token_id=-100),
        callbacks=[clock_callback(clock)],
    )
    result = trainer.train()
    model.save_pretrained(out_dir / "adapter")
    trainable, _ = count_parameters(model)
    return {"train_loss": round(float(result.training_loss), 6), "trainable": trainable}


def model_flops_per_token(model_dir: str, trainable: int, mean_context: float) -> float:
    from transformers import AutoConfig

    cfg = AutoConfig.from_pretrained(model_dir)
    h, inter, layers, heads, kv = cfg.hidden_size, cfg.intermediate_size, cfg.num_hidden_layers, cfg.num_attention_heads, cfg.num_key_value_heads
    head_dim = h // heads
    per_block = h * h + 2 * h * kv * head_dim + h * h + 3 * h * inter  # q, k, v, o, gate/up/down
    matmul = layers * per_block + h * cfg.vocab_size  # + the output head (the embedding lookup is free)
    return 4 * matmul + 6 * trainable + 12 * layers * h * mean_context


def child(spec: dict[str, Any]) -> dict[str, Any]:
    import resource

    import torch

    out_dir = Path(spec["run_dir"])
    clock: list[dict[str, float]] = []
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    started = time.perf_counter()
    side = run_baseline(spec, out_dir, clock) if spec["variant"] == "baseline" else run_tunepipe(spec, out_dir, clock)
    wall = time.perf_counter() - started
    window = [c for c in clock if c["step"] >= spec["warmup_steps"]]
    if len(window) < 2:
        raise SystemExit(f"too few steps after warm-up: {len(clock)} steps, warm-up {spec['warmup_steps']}")
    tokens = window[-1]["tokens"] - window[0]["tokens"]
    seconds = window[-1]["t"] - window[0]["t"]
    tokens_per_s = tokens / seconds
    flops = model_flops_per_token(spec["model_dir"], side["trainable"], spec["mean_context"])
    name = torch.cuda.get_device_name(0) if cuda else "cpu"
    peak = next((v for k, v in PEAK_BF16_TFLOPS.items() if k in name), None)
    return {
        **side,
        "steps_timed": window[-1]["step"] - window[0]["step"],
        "tokens_timed": tokens,
        "seconds_timed": round(seconds, 3),
        "tokens_per_s": round(tokens_per_s, 1),
        "seconds_per_step": round(seconds / (window[-1]["step"] - window[0]["step"]), 4),
        "tokens_per_step": round(tokens / (window[-1]["step"] - window[0]["step"]), 1),
        # On a CPU (--tiny) the process's peak RSS stands in.
        "peak_allocated_gb": round((torch.cuda.max_memory_allocated() if cuda else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024) / 2**30, 3),
        "peak_reserved_gb": round(torch.cuda.max_memory_reserved() / 2**30, 3) if cuda else None,
        "mfu": rounded(flops * tokens_per_s / (peak * 1e12), 4) if peak else None,
        "model_tflops_per_s": round(flops * tokens_per_s / 1e12, 1),
        "wall_s": round(wall, 1),
        "gpu": name,
    }


# --------------------------------------------------------------------------------------------
# The benchmark (parent)


def mean_context(data_dir: str, model_dir: str, max_length: int) -> float:
    """Token-weighted mean document length (each token attends within its own document)."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    lengths = []
    with open(Path(data_dir) / "train.jsonl") as handle:
        for line in handle:
            r = json.loads(line)
            lengths.append(min(max_length, len(tokenizer(r["instruction"] + " " + r["output"])["input_ids"]) + 12))
    return sum(n * n for n in lengths) / sum(lengths)


def run_child(spec: dict[str, Any], log: Path) -> dict[str, Any]:
    with open(log, "w") as handle:
        proc = subprocess.run([sys.executable, __file__, "--child", json.dumps(spec)], stdout=handle, stderr=subprocess.STDOUT)
    if proc.returncode != 0:
        tail = log.read_text()[-3000:]
        return {"error": f"exit {proc.returncode}", "log_tail": tail}
    lines = [line for line in log.read_text().splitlines() if line.startswith("BENCH_RESULT ")]
    return json.loads(lines[-1][len("BENCH_RESULT "):])


def summarise(runs: dict[str, dict[str, list[dict[str, Any]]]]) -> dict[str, Any]:
    summary: dict[str, Any] = {}
    for method, by_variant in runs.items():
        ok = {v: [r for r in rs if "error" not in r] for v, rs in by_variant.items()}
        med = {
            v: {k: median(r[k] for r in rs) for k in ("tokens_per_s", "peak_allocated_gb", "mfu") if rs and rs[0].get(k) is not None}
            for v, rs in ok.items() if rs
        }
        base = med.get("baseline")
        rows = {}
        for v, m in med.items():
            rows[v] = {
                **{k: rounded(x, 4) for k, x in m.items()},
                "speed_vs_baseline": rounded(ratio(m["tokens_per_s"], base["tokens_per_s"]), 3) if base else None,
                "memory_vs_baseline": rounded(ratio(m["peak_allocated_gb"], base["peak_allocated_gb"]), 3) if base else None,
            }
        summary[method] = rows
    qlora = summary.get("qlora", {})
    candidates = [v for v in qlora if v != "baseline"]
    best = max(candidates, key=lambda v: qlora[v]["speed_vs_baseline"] or 0) if candidates else None
    if best:
        summary["qlora_target"] = {
            "best_variant": best,
            "speed_vs_baseline": qlora[best]["speed_vs_baseline"],
            "memory_vs_baseline": qlora[best]["memory_vs_baseline"],
            "met": bool((qlora[best]["speed_vs_baseline"] or 0) >= 1.5 and (qlora[best]["memory_vs_baseline"] or 9) <= 1.0),
        }
    return summary


def merge_results(results: list[dict[str, Any]]) -> dict[str, Any]:
    """One result from several runs of the same setup: their runs pooled, the summary recomputed."""
    setups = {json.dumps({k: v for k, v in r["setup"].items() if k != "build_s"}, sort_keys=True) for r in results}
    if len(setups) > 1:
        raise SystemExit("--merge: the results have different setups (model, steps, lengths, profile): not comparable")
    runs: dict[str, dict[str, list[dict[str, Any]]]] = {}
    for result in results:
        for method, by_variant in result["runs"].items():
            for variant, outcomes in by_variant.items():
                runs.setdefault(method, {}).setdefault(variant, []).extend(outcomes)
    return {**results[0], "merged_from": [r["command"] for r in results], "runs": runs, "summary": summarise(runs)}


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--workdir", type=Path)
    parser.add_argument("--methods", nargs="+", default=["lora", "qlora"], choices=["lora", "qlora"])
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    parser.add_argument("--environment", default="single-gpu-80gb", help="profile name or YAML path (batch, precision, checkpointing)")
    parser.add_argument("--attn", default="sdpa", help="attention kernel instead of the profile's ('' keeps the profile's)")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--warmup-steps", type=int, default=5)
    parser.add_argument("--records", type=int, default=4000)
    parser.add_argument("--max-length", type=int, default=1024)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, help="also write the JSON result here")
    parser.add_argument("--merge", nargs="+", type=Path, metavar="JSON",
                        help="combine the runs of earlier results (repeats split over several sessions) and summarise them")
    parser.add_argument("--tiny", action="store_true", help="a 2-block model: try the harness (e.g. on a CPU with --environment cpu)")
    args = parser.parse_args(argv)
    if args.child:
        result = child(json.loads(args.child))
        print("BENCH_RESULT " + json.dumps(result), flush=True)
        return 0

    if args.merge:
        merged = merge_results([json.loads(path.read_text()) for path in args.merge])
        if args.out:
            args.out.write_text(json.dumps(merged, indent=1))
        print(json.dumps(merged, indent=1))
        return 0

    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="tunepipe-gpu-sft-"))
    workdir.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    arch = TINY_ARCH if args.tiny else ARCH
    inputs = build_inputs(workdir / "inputs", args.records, args.seed, arch)
    context = mean_context(inputs["data_dir"], inputs["model_dir"], args.max_length)
    result: dict[str, Any] = {
        **header("gpu_sft.py", argv),
        "setup": {"arch": arch, "records": args.records, "steps": args.steps, "warmup_steps": args.warmup_steps,
                  "max_length": args.max_length, "rank": args.rank, "environment": args.environment, "attn": args.attn,
                  "mean_attended_tokens": round(context, 1), "build_s": round(time.perf_counter() - started, 1)},
        "runs": {},
    }
    runs: dict[str, dict[str, list[dict[str, Any]]]] = {m: {v: [] for v in args.variants} for m in args.methods}
    for repeat in range(args.repeats):
        for method in args.methods:
            order = list(args.variants) if repeat % 2 == 0 else list(reversed(args.variants))
            for variant in order:
                run_dir = workdir / "runs" / f"{method}-{variant.replace('+', '-')}-{repeat}"
                run_dir.mkdir(parents=True, exist_ok=True)
                spec = {**inputs, "method": method, "variant": variant, "environment": args.environment, "attn": args.attn,
                        "steps": args.steps, "warmup_steps": args.warmup_steps, "max_length": args.max_length,
                        "rank": args.rank, "seed": args.seed, "mean_context": context, "run_dir": str(run_dir)}
                outcome = run_child(spec, run_dir / "log.txt")
                runs[method][variant].append(outcome)
                print(f"[gpu_sft] {method} {variant} repeat {repeat}: "
                      + (outcome.get("error", "") or f"{outcome['tokens_per_s']} tok/s, {outcome['peak_allocated_gb']} GiB, MFU {outcome['mfu']}"),
                      file=sys.stderr, flush=True)
                result["runs"] = runs
                result["summary"] = summarise(runs)
                if args.out:
                    args.out.write_text(json.dumps(result, indent=1))
    print(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
