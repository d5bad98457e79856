"""The memory planner against the measured peak of real training steps on a CPU host (issue 25).

For each stage (sft with LoRA, the reward model with LoRA, DPO continuing an SFT LoRA adapter) a
fresh child process builds the model and trainer with the stage's own builders
(`tasks.sft.train.sft_trainer`, `tasks.reward.train.reward_model_for_training` + TRL's
RewardTrainer as `train_reward_job` configures it, `tasks.align.policy.load_policy` +
the DPO unit's trainer, `tasks.align.methods.dpo.UNIT`), trains `--steps` optimizer steps on synthetic rows long
enough to fill `max_length`, and reports its peak resident set size (`ru_maxrss`).

Why peak RSS and not torch's CPU allocator: on a CPU host training shares the machine's RAM with
the Python process itself (interpreter, torch, transformers and TRL code, tokenizer, data), and
what runs a machine out of memory, and what the stages report as `peak_memory_gb`, is the
process's RSS; torch keeps no peak statistics for CPU tensors. The planner therefore plans the
whole process on CPU profiles (its `runtime` term is the process's own footprint).

The planned figure is `tasks.training.memory_plan.plan` for the same model, method, profile,
max_length and stage. The ratio is measured / planned (target: within 0.85-1.15).

    .venv/bin/python benchmarks/cpu_memory_plan.py --steps 1          # the real model, profile cpu-small-lm
    .venv/bin/python benchmarks/cpu_memory_plan.py --model DIR --environment cpu --max-length 128
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:  # run as a script: `benchmarks` and `tests.helpers` import from the repo root
    sys.path.insert(0, str(REPO))

from benchmarks import _common  # noqa: E402

STAGES = ("sft", "reward", "dpo")
LORA = {"name": "lora", "r": 16, "alpha": 32, "target_modules": "all-linear"}
WORDS = ("model", "memory", "planner", "token", "batch", "layer", "gradient", "adapter", "review", "answer",
         "question", "capital", "river", "number", "colour", "sentence", "positive", "negative", "small", "large")


def peak_rss_gib() -> float:
    """This process's peak resident set size (Linux reports ru_maxrss in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def filler(seed: int, words: int) -> str:
    """Deterministic plain text of `words` words (no randomness: the same rows every run)."""
    return " ".join(WORDS[(seed * 7 + i * 3 + i // 5) % len(WORDS)] for i in range(words))


def sft_records(n: int, max_length: int) -> list[dict[str, Any]]:
    """Instruction records whose rendered rows exceed max_length (cut to it: every row is full, as planned)."""
    return [{"id": f"r{i}", "task": "bench", "instruction": f"Summarise item {i}: " + filler(i, max_length // 4),
             "output": filler(i + 1, max_length)} for i in range(n)]


def preference_pairs(n: int, max_length: int) -> list[dict[str, Any]]:
    """Pairs whose prompt + answer exceed max_length, so each chosen and rejected row is max_length long."""
    return [{"prompt": f"Describe item {i}: " + filler(i, max_length // 4), "chosen": filler(i + 1, max_length),
             "rejected": filler(i + 2, max_length), "task": "bench"} for i in range(n)]


def fit_pair(pair: dict[str, Any], tokens: Any, max_length: int) -> dict[str, Any]:
    """The pair with its answers shortened until prompt + answer renders to at most max_length tokens
    (`tokens(prompt, answer)` counts them): TRL's RewardTrainer drops longer pairs instead of cutting them."""
    pair = dict(pair)
    while max(tokens(pair["prompt"], pair["chosen"]), tokens(pair["prompt"], pair["rejected"])) > max_length:
        for side in ("chosen", "rejected"):
            words = pair[side].split()
            pair[side] = " ".join(words[: max(1, len(words) - max(1, len(words) // 20))])
    return pair


def ratio_row(stage: str, measured: dict[str, Any], planned: dict[str, Any]) -> dict[str, Any]:
    """One table row: measured peak, planned total and their ratio, with the planner's terms."""
    total = planned["total_gb"]
    return {
        "stage": stage,
        "measured_peak_rss_gib": round(measured["peak_rss_gib"], 3),
        "rss_after_imports_gib": round(measured["rss_after_imports_gib"], 3),
        "planned_gib": total,
        "ratio": _common.rounded(_common.ratio(measured["peak_rss_gib"], total)),
        "within_15_percent": abs(measured["peak_rss_gib"] / total - 1) <= 0.15,
        "planned_terms_gib": {k[:-3]: v for k, v in planned.items() if k.endswith("_gb") and k not in ("total_gb", "device_memory_gb")},
        "steps": measured["steps"],
        "train_s": measured["train_s"],
    }


# --------------------------------------------------------------------------------------------
# Children: one stage's real training steps in a fresh process


def _env(name: str) -> Any:
    from tunepipe.tasks.core.environment import load_environment

    return load_environment(name)


def _training(steps: int) -> dict[str, Any]:
    return {"max_steps": steps, "save_steps": 10_000, "logging_steps": 1}


def run_sft(model: str, env: Any, max_length: int, steps: int, work: Path) -> Any:
    from tunepipe.schemas.sft import SFTConfig
    from tunepipe.tasks.sft.train import sft_trainer

    data = work / "data"
    data.mkdir()
    rows = sft_records(env.per_device_batch_size * env.gradient_accumulation_steps * steps, max_length)
    (data / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    config = SFTConfig.model_validate({"model": model, "method": LORA, "max_length": max_length, "training": _training(steps)})
    job = {"config": config.model_dump(mode="json"), "env": env.model_dump(mode="json"), "model_path": model,
           "data_dir": str(data), "tasks": None, "checkpoint_dir": str(work / "ckpt")}
    trainer, _ = sft_trainer(job)
    return trainer


def run_reward(model: str, env: Any, max_length: int, steps: int, work: Path) -> Any:
    from datasets import Dataset
    from trl import RewardConfig as TrlRewardConfig
    from trl import RewardTrainer
    from tunepipe.schemas.reward import RewardConfig
    from tunepipe.tasks.reward.train import reward_model_for_training
    from tunepipe.tasks.lm.modeling import load_tokenizer
    from tunepipe.tasks.lm.pairs import conversational_pair
    from tunepipe.tasks.training.trainer import training_kwargs

    config = RewardConfig.model_validate({"model": model, "method": LORA, "max_length": max_length, "training": _training(steps)})
    tokenizer = load_tokenizer(model)
    reward_model = reward_model_for_training(model, config, env, tokenizer.pad_token_id)
    args = TrlRewardConfig(**training_kwargs(config.training, env, work / "ckpt"), max_length=max_length,
                           center_rewards_coefficient=config.center_rewards_coefficient, disable_dropout=True)
    def tokens(prompt: str, answer: str) -> int:
        return len(tokenizer.apply_chat_template([{"role": "user", "content": prompt}, {"role": "assistant", "content": answer}],
                                                 tokenize=True, return_dict=False))

    pairs = [fit_pair(p, tokens, max_length)
             for p in preference_pairs(env.per_device_batch_size * env.gradient_accumulation_steps * steps, max_length)]
    return RewardTrainer(model=reward_model.train(), args=args, processing_class=tokenizer,
                         train_dataset=Dataset.from_list([conversational_pair(p) for p in pairs]))


def make_sft_adapter(model: str, env: Any, sft_dir: Path) -> None:
    """The SFT adapter DPO continues: an untrained one of the same shape (memory does not depend on its values).
    Made in its own process: loading a base for it would otherwise count in the DPO process's peak."""
    from peft import get_peft_model
    from tunepipe.schemas.sft import SFTConfig
    from tunepipe.tasks.training import peft_methods
    from tunepipe.tasks.lm.modeling import load_tokenizer
    from tunepipe.tasks.training.trainer import load_base

    sft_method = SFTConfig.model_validate({"method": LORA}).method
    get_peft_model(load_base(model, sft_method, env), peft_methods.lora_config(sft_method)).save_pretrained(sft_dir)
    load_tokenizer(model).save_pretrained(sft_dir)


def run_dpo(model: str, env: Any, max_length: int, steps: int, work: Path, sft_dir: Path) -> Any:
    from tunepipe.schemas.align import AlignConfig
    from tunepipe.tasks.align.methods import dpo
    from tunepipe.tasks.align.methods.base import AlignRun
    from tunepipe.tasks.align.policy import load_policy
    from tunepipe.tasks.align.job import AlignJob
    from tunepipe.tasks.training.trainer import training_kwargs

    config = AlignConfig.model_validate({"method": {"name": "dpo"}, "max_length": max_length, "training": _training(steps)})
    job = AlignJob(
        config=config, env=env, run="all", sft_dir=str(sft_dir), sft_kind="adapter", sft_method=LORA,
        base_model=model, pairs_file=str(work / "pairs.jsonl"), output_dir=str(work), save_to="adapter",
        checkpoint_dir=str(work / "ckpt"), judge_cache=str(work / "judge.sqlite"),
    )
    policy, tokenizer = load_policy(job)
    pairs = preference_pairs(env.per_device_batch_size * env.gradient_accumulation_steps * steps, max_length)
    run = AlignRun(config=config, env=env, job=job, model=policy, tokenizer=tokenizer,
                   base_args=training_kwargs(config.training, env, work / "ckpt"), callbacks=[])
    return dpo.UNIT.pair_trainer(run, pairs)


RUNNERS = {"sft": run_sft, "reward": run_reward, "dpo": run_dpo}


def child(stage: str, model: str, environment: str, max_length: int, steps: int, adapter_dir: str | None) -> dict[str, Any]:
    import torch

    torch.manual_seed(0)
    after_imports = peak_rss_gib()
    env = _env(environment)
    with tempfile.TemporaryDirectory(prefix=f"bench-mem-{stage}-") as tmp:
        extra = {"sft_dir": Path(adapter_dir)} if stage == "dpo" else {}
        trainer = RUNNERS[stage](model, env, max_length, steps, Path(tmp), **extra)
        built = peak_rss_gib()
        start = time.perf_counter()
        trainer.train()
        seconds = time.perf_counter() - start
    return {"stage": stage, "peak_rss_gib": peak_rss_gib(), "rss_after_imports_gib": after_imports,
            "peak_rss_before_training_gib": built, "steps": int(trainer.state.global_step), "train_s": round(seconds, 1)}


def _import_stack() -> None:
    """What every stage's process has imported before it trains (the planner's `runtime` term covers it)."""
    import datasets  # noqa: F401
    import peft  # noqa: F401
    import transformers  # noqa: F401
    import trl  # noqa: F401

    import tunepipe.tasks.training.trainer  # noqa: F401


# --------------------------------------------------------------------------------------------
# Parent: children, the planner, the table


def planned(model: str, stage: str, environment: str, max_length: int) -> dict[str, Any]:
    from tunepipe.schemas.sft import SFTConfig
    from tunepipe.tasks.training.memory_plan import plan

    method = SFTConfig.model_validate({"method": LORA}).method
    return plan(model, method, _env(environment), max_length, stage=stage)["memory"]


def _run_child(label: str, args: list[str]) -> str:
    done = subprocess.run([sys.executable, __file__, *args], capture_output=True, text=True, cwd=REPO)
    if done.returncode != 0:
        raise SystemExit(f"{label} child failed ({done.returncode}):\n{done.stderr[-4000:]}")
    return done.stdout


def measure(stage: str, model: str, environment: str, max_length: int, steps: int) -> dict[str, Any]:
    common = ["--model", model, "--environment", environment, "--max-length", str(max_length), "--steps", str(steps)]
    with tempfile.TemporaryDirectory(prefix="bench-mem-adapter-") as adapter_dir:
        if stage == "dpo":
            _run_child("sft adapter", ["--make-adapter", adapter_dir, *common])
            common += ["--adapter-dir", adapter_dir]
        out = _run_child(stage, ["--child", stage, *common])
    return json.loads(out.strip().splitlines()[-1])


def default_model() -> str:
    from tests.helpers.real_model import smollm2_dir

    return str(smollm2_dir())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="HF model directory (default: SmolLM2-135M-Instruct from tests/helpers/real_model.py)")
    parser.add_argument("--environment", default="cpu-small-lm", help="profile to train and plan under")
    parser.add_argument("--max-length", type=int, default=256, help="tokens per row (every row is filled to it)")
    parser.add_argument("--steps", type=int, default=1, help="optimizer steps per stage (the peak is reached in the first)")
    parser.add_argument("--stages", nargs="+", choices=STAGES, default=list(STAGES))
    parser.add_argument("--child", choices=STAGES, help=argparse.SUPPRESS)
    parser.add_argument("--make-adapter", help=argparse.SUPPRESS)
    parser.add_argument("--adapter-dir", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.make_adapter:
        make_sft_adapter(args.model, _env(args.environment), Path(args.make_adapter))
        return 0
    if args.child:
        _import_stack()
        print(json.dumps(child(args.child, args.model, args.environment, args.max_length, args.steps, args.adapter_dir)))
        return 0
    model = args.model or default_model()
    result = _common.header("cpu_memory_plan.py", sys.argv[1:] if argv is None else argv)
    result.update({"model": model, "environment": args.environment, "max_length": args.max_length, "method": LORA,
                   "measured": "peak RSS of a fresh process per stage (ru_maxrss)", "rows": []})
    for stage in args.stages:
        measured = measure(stage, model, args.environment, args.max_length, args.steps)
        result["rows"].append(ratio_row(stage, measured, planned(model, stage, args.environment, args.max_length)))
        result["rows"][-1]["peak_rss_before_training_gib"] = round(measured["peak_rss_before_training_gib"], 3)
        print(json.dumps(result["rows"][-1]), file=sys.stderr, flush=True)
    _common.print_result(result)
    return 0


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    raise SystemExit(main())
