"""Orchestration overhead: the pipeline's training stages through tunepipe vs a plain TRL script.

    .venv/bin/python benchmarks/orchestration_overhead.py                       # the quickstart, 3 repeats
    .venv/bin/python benchmarks/orchestration_overhead.py --max-steps 5 --repeats 1   # a smoke run

A warm-up `tunepipe run` computes every stage once (data, base model, training). Then, N times
in alternating order: (a) `tunepipe run --from FIRST_TRAINING_STAGE --until LAST_TRAINING_STAGE`
recomputes the training stages (data and base model come from the cache), and (b) a plain
script (transformers + peft + trl, as a user would write it: `AutoModelForCausalLM`,
`peft.LoraConfig`/`get_peft_model`, `trl.SFTConfig`/`SFTTrainer`) does the same work in a fresh
process: same model directory (the base_model / pretrain artifact of the tunepipe run), same
token ids and labels (built with tunepipe's own encoding functions, so the rows are identical),
same steps, seed, learning-rate schedule, checkpoint interval, batch size and precision (the
pipeline's environment profile), the same per-task or shared adapters, evaluation on the
validation split, and saving the result.

Reported, as medians over the repeats:
- stage ratio: the training stages' time inside tunepipe (their manifests' `timings.seconds`:
  library imports, load, encode, train, eval, save, memory plan, loss plot) / the script's time
  for the same work, its imports of torch, transformers, trl, peft and datasets included (the
  CLI has imported none of them when its first training stage starts, so both sides pay them;
  the script's `work_s` without them is reported too). Target <= 1.05.
- train-loop ratio: the Trainer's `train()` wall in tunepipe (`train_seconds` in the metrics) /
  the script's `train()` wall: the cost of tunepipe's callbacks and arguments alone. Per run
  figures are in the output: lazy imports inside the first `train()` fall on different sides
  (tunepipe's memory plan imports some of them before training), so read the later runs.
- start-up: the CLI's wall minus the stages it computed: Python and Prefect start-up (the
  ephemeral server), the cached data / base-model lookups, the run summary. Reported on its own.

The sft stage's held-out generation check is turned off on both sides (it is evaluation, not
training; `--heldout` keeps it in tunepipe's figure, with no counterpart in the script).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks._common import (  # noqa: E402
    QUICKSTART,
    REPO,
    bench_config,
    child_env,
    header,
    median,
    print_result,
    ratio,
    require_training,
    rounded,
    run_cli,
)

TARGET = 1.05


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("config", nargs="?", default=str(QUICKSTART), help="pipeline YAML (default: the quickstart)")
    parser.add_argument("--repeats", type=int, default=3, help="measured tunepipe/script pairs (alternating order)")
    parser.add_argument("--max-steps", type=int, default=None, help="override training.max_steps of every training stage")
    parser.add_argument("--save-steps", type=int, default=None, help="override training.save_steps of every training stage")
    parser.add_argument("--heldout", action="store_true", help="keep the sft held-out generation check in tunepipe's time")
    parser.add_argument("--cpus", type=int, default=None, help="pin the measured processes to this many CPUs")
    parser.add_argument("--workdir", default=None, help="where the benchmark writes (default: a new temp dir)")
    parser.add_argument("--baseline-job", default=None, help=argparse.SUPPRESS)  # child process: the plain script
    return parser


# --------------------------------------------------------------------------------------------
# The plain TRL script (runs in its own process; knows nothing of tunepipe's stages or Prefect)


def plain_script(job: dict[str, Any]) -> dict[str, Any]:
    """Train every stage of `job` with transformers + peft + trl directly; time each part."""
    t0 = time.perf_counter()
    import torch  # noqa: F401
    from datasets import Dataset  # noqa: F401
    from peft import LoraConfig, get_peft_model  # noqa: F401
    from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: F401
    from trl import SFTConfig, SFTTrainer  # noqa: F401

    result: dict[str, Any] = {"import_s": time.perf_counter() - t0, "stages": {}}
    for stage in job["stages"]:
        started = time.perf_counter()
        runs = pretrain_runs(stage) if stage["name"] == "pretrain" else sft_runs(stage)
        result["stages"][stage["name"]] = {"work_s": time.perf_counter() - started, "runs": runs}
    return result


def load_model(path: str, env: dict[str, Any], method: dict[str, Any]):
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=getattr(torch, env["dtype"]), attn_implementation=env["attn_implementation"])
    model.config.use_cache = False
    if method["name"] == "lora":
        lora = LoraConfig(
            task_type="CAUSAL_LM", r=method["r"], lora_alpha=method["alpha"], lora_dropout=method["dropout"],
            target_modules=method["target_modules"], use_rslora=method["use_rslora"], use_dora=method["use_dora"],
            bias=method["bias"], modules_to_save=method["modules_to_save"] or None,
        )
        model = get_peft_model(model, lora)
    elif method["name"] != "full":
        raise SystemExit(f"the plain-script baseline covers methods lora and full, not {method['name']}")
    return model


def trl_args(training: dict[str, Any], env: dict[str, Any], output_dir: str, max_length: int, packing: bool | str):
    from trl import SFTConfig

    return SFTConfig(
        output_dir=output_dir,
        num_train_epochs=training["epochs"],
        max_steps=training["max_steps"] or -1,
        learning_rate=training["learning_rate"],
        lr_scheduler_type=training["lr_scheduler"],
        warmup_steps=training["warmup_ratio"],
        weight_decay=training["weight_decay"],
        max_grad_norm=training["max_grad_norm"],
        optim=training["optimizer"],
        seed=training["seed"],
        data_seed=training["seed"],
        logging_steps=training["logging_steps"],
        save_steps=training["save_steps"],
        save_total_limit=training["save_total_limit"],
        per_device_train_batch_size=env["per_device_batch_size"],
        per_device_eval_batch_size=env["per_device_batch_size"],
        gradient_accumulation_steps=env["gradient_accumulation_steps"],
        gradient_checkpointing=env["gradient_checkpointing"],
        max_length=max_length,
        packing=bool(packing),
        packing_strategy=packing if isinstance(packing, str) else "bfd",
        report_to="none",
        include_num_input_tokens_seen="non_padding",
        bf16=env["dtype"] == "bfloat16",
        fp16=env["dtype"] == "float16",
        use_cpu=env["device"] == "cpu",
    )


def train_and_save(model, tokenizer, args, train_rows, eval_sets, save_dir: Path, merge: bool) -> dict[str, Any]:
    from datasets import Dataset
    from trl import SFTTrainer

    eval_dataset = {k: Dataset.from_list(v) for k, v in eval_sets.items() if v} or None
    if eval_dataset is not None and len(eval_dataset) == 1:
        eval_dataset = next(iter(eval_dataset.values()))
    trainer = SFTTrainer(model=model, args=args, train_dataset=Dataset.from_list(train_rows), eval_dataset=eval_dataset, processing_class=tokenizer)
    started = time.perf_counter()
    out = trainer.train()
    train_s = time.perf_counter() - started
    if eval_dataset is not None:
        trainer.evaluate()
    final = trainer.model.merge_and_unload() if merge and hasattr(trainer.model, "merge_and_unload") else trainer.model
    final.save_pretrained(save_dir)
    tokenizer.save_pretrained(save_dir)
    return {"train_s": train_s, "train_loss": out.training_loss, "global_step": trainer.state.global_step}


def load_tokenizer(path: str):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def sft_runs(stage: dict[str, Any]) -> dict[str, Any]:
    from tunepipe.tasks.lm.encoding import encode_records, read_split, resolve_chat_template

    config, env, out = stage["config"], stage["env"], Path(stage["output_dir"])
    tokenizer = load_tokenizer(stage["model_path"])
    template = resolve_chat_template(config["chat_template"], tokenizer)
    tokenizer.chat_template = template
    records = {split: read_split(stage["data_dir"], split) for split in ("train", "validation")}
    tasks = config["tasks"] or sorted({str(r.get("task") or "default") for r in records["train"]})
    groups = {task: [task] for task in tasks} if config["adapters"] == "per_task" else {"all": config["tasks"]}
    results = {}
    for run, wanted in groups.items():
        encoded = {}
        for split, rows in records.items():
            chosen = [r for r in rows if wanted is None or str(r.get("task") or "default") in wanted]
            encoded[split], _ = encode_records(
                chosen, tokenizer, template, max_length=config["max_length"], train_on_inputs=config["train_on_inputs"],
                overlong=config["overlong"], system_prompt=config["system_prompt"], split=split,
            )
        train_rows = [row for task in sorted(encoded["train"]) for row in encoded["train"][task]]
        model = load_model(stage["model_path"], env, config["method"])
        args = trl_args(config["training"], env, str(out / "checkpoints" / run), config["max_length"], config["packing"])
        results[run] = train_and_save(model, tokenizer, args, train_rows, encoded["validation"], out / "adapters" / run, merge=False)
    return results


def pretrain_runs(stage: dict[str, Any]) -> dict[str, Any]:
    from tunepipe.tasks.pretrain.train import read_corpus, split_corpus
    from tunepipe.tasks.lm.encoding import encode_texts

    config, env, out = stage["config"], stage["env"], Path(stage["output_dir"])
    tokenizer = load_tokenizer(stage["model_path"])
    train_texts, val_texts = split_corpus(read_corpus(stage["data_dir"]), config["validation_fraction"])
    cut = config["max_length"] if config["packing"] == "bfd" else None
    train_rows, _ = encode_texts(train_texts, tokenizer, max_length=cut)
    val_rows, _ = encode_texts(val_texts, tokenizer, max_length=cut)
    model = load_model(stage["model_path"], env, config["method"])
    args = trl_args(config["training"], env, str(out / "checkpoints"), config["max_length"], config["packing"])
    return {"run": train_and_save(model, tokenizer, args, train_rows, {"validation": val_rows}, out / "model", merge=True)}


# --------------------------------------------------------------------------------------------
# The benchmark


def baseline_job(config: dict[str, Any], stages: list[str], summary: dict[str, Any], env: dict[str, Any], out: Path) -> dict[str, Any]:
    """The script's job: each training stage's full config and the tunepipe run's input paths."""
    paths = {name: s["path"] for name, s in summary["stages"].items()}
    job_stages = []
    for name in stages:
        section = full_section(name, config[name])
        upstream = ("base_model",) if name == "pretrain" else ("pretrain", "base_model")
        model_path = section["model"] or next(paths[u] for u in upstream if u in paths)
        job_stages.append({
            "name": name, "config": section, "env": env, "model_path": model_path, "data_dir": paths["data"],
            "output_dir": str(out / name),
        })
    return {"stages": job_stages}


def full_section(name: str, section: dict[str, Any]) -> dict[str, Any]:
    """A stage section with every default filled in (the script reads fields by name)."""
    from tunepipe.schemas.pretrain import PretrainConfig
    from tunepipe.schemas.sft import SFTConfig

    model = PretrainConfig if name == "pretrain" else SFTConfig
    return model.model_validate(section).model_dump(mode="json")


def run_baseline(job: dict[str, Any], work: Path, index: int, cpus: int | None) -> dict[str, Any]:
    job_file = work / f"baseline-{index}.json"
    job_file.write_text(json.dumps(job))
    cmd = [sys.executable, str(Path(__file__).resolve()), "--baseline-job", str(job_file)]
    pin = None
    if cpus is not None:
        import os

        chosen = sorted(os.sched_getaffinity(0))[:cpus]
        pin = lambda: os.sched_setaffinity(0, chosen)  # noqa: E731
    with open(work / f"baseline-{index}.log", "w") as log:
        proc = subprocess.run(cmd, cwd=REPO, env=child_env(), stdout=subprocess.PIPE, stderr=log, text=True, preexec_fn=pin)
    if proc.returncode != 0:
        raise RuntimeError(f"baseline script exited {proc.returncode}: see {work / f'baseline-{index}.log'}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def tunepipe_figures(run, stages: list[str]) -> dict[str, Any]:
    """Stage seconds, Trainer train() seconds and losses of one tunepipe run."""
    computed = run.computed_stages()
    missing = [s for s in stages if s not in computed]
    if missing:
        raise RuntimeError(f"tunepipe run did not recompute {missing} (log {run.log})")
    stage_s = {s: run.stage_seconds(s) for s in stages}
    train_s, losses = {}, {}
    for stage in stages:
        for run_name, metrics in run_metrics(stage, run.stage(stage)).items():
            train_s[f"{stage}/{run_name}"] = metrics["train_seconds"]
            losses[f"{stage}/{run_name}"] = metrics["train_loss"]
    return {
        "wall_s": run.wall_s,
        "stage_s": stage_s,
        "stages_s": sum(stage_s.values()),
        "train_s": sum(train_s.values()),
        "train_s_by_run": train_s,
        "startup_s": run.wall_s - sum(run.stage_seconds(s) for s in computed),
        "train_loss": losses,
    }


def run_metrics(stage: str, summary_stage: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Per training run metrics: sft's metrics.json ({run: ...}), pretrain's one run."""
    if stage == "sft":
        return json.loads((Path(summary_stage["path"]) / "metrics.json").read_text())
    return {"run": summary_stage["metrics"]}


def baseline_figures(result: dict[str, Any]) -> dict[str, Any]:
    stages = result["stages"]
    work_s = sum(v["work_s"] for v in stages.values())
    return {
        "import_s": result["import_s"],
        "stage_s": {s: v["work_s"] for s, v in stages.items()},
        "work_s": work_s,
        # tunepipe's CLI has imported none of torch/transformers/trl/peft/datasets when its first
        # training stage starts (cached data and base model import none), so its stages pay these
        # imports: the script's figure includes them too.
        "stages_s": result["import_s"] + work_s,
        "train_s": sum(r["train_s"] for v in stages.values() for r in v["runs"].values()),
        "train_s_by_run": {f"{s}/{run}": r["train_s"] for s, v in stages.items() for run, r in v["runs"].items()},
        "train_loss": {f"{s}/{run}": r["train_loss"] for s, v in stages.items() for run, r in v["runs"].items()},
    }


def summarize(pairs: list[dict[str, Any]]) -> dict[str, Any]:
    tp = [p["tunepipe"] for p in pairs]
    base = [p["script"] for p in pairs]
    stage_ratio = median(p["tunepipe"]["stages_s"] / p["script"]["stages_s"] for p in pairs)
    return {
        "stage_ratio_median": rounded(stage_ratio),
        "train_loop_ratio_median": rounded(median(p["tunepipe"]["train_s"] / p["script"]["train_s"] for p in pairs)),
        "tunepipe_stages_s_median": rounded(median(t["stages_s"] for t in tp)),
        "script_stages_s_median": rounded(median(b["stages_s"] for b in base)),
        "tunepipe_train_s_median": rounded(median(t["train_s"] for t in tp)),
        "script_train_s_median": rounded(median(b["train_s"] for b in base)),
        "startup_s_median": rounded(median(t["startup_s"] for t in tp)),
        "tunepipe_wall_s_median": rounded(median(t["wall_s"] for t in tp)),
        "script_import_s_median": rounded(median(b["import_s"] for b in base)),
        "script_work_s_median": rounded(median(b["work_s"] for b in base)),
        "ratio_of_medians": rounded(ratio(median(t["stages_s"] for t in tp), median(b["stages_s"] for b in base))),
        "target": TARGET,
        "meets_target": stage_ratio <= TARGET,
    }


def main() -> None:
    args = build_parser().parse_args()
    if args.baseline_job:
        print(json.dumps(plain_script(json.loads(Path(args.baseline_job).read_text()))))
        return
    work = Path(args.workdir or tempfile.mkdtemp(prefix="bench-overhead-")).resolve()
    config_path, config = bench_config(args.config, work, max_steps=args.max_steps, save_steps=args.save_steps, heldout=args.heldout)
    stages = require_training(config, args.config)
    from tunepipe.tasks.core.environment import load_environment

    env = load_environment(config.get("environment", "cpu")).model_dump(mode="json")
    warmup = run_cli(config_path, log=work / "logs" / "warmup.log", cpus=args.cpus)
    pairs = []
    for index in range(args.repeats):
        figures: dict[str, Any] = {"order": "tunepipe-first" if index % 2 == 0 else "script-first"}
        sides = ["tunepipe", "script"] if index % 2 == 0 else ["script", "tunepipe"]
        for side in sides:
            if side == "tunepipe":
                run = run_cli(
                    config_path, "--from", stages[0], "--until", stages[-1], log=work / "logs" / f"tunepipe-{index}.log", cpus=args.cpus
                )
                figures["tunepipe"] = tunepipe_figures(run, stages)
            else:
                job = baseline_job(config, stages, warmup.summary, env, work / "script" / str(index))
                figures["script"] = baseline_figures(run_baseline(job, work, index, args.cpus))
        figures["stage_ratio"] = ratio(figures["tunepipe"]["stages_s"], figures["script"]["stages_s"])
        figures["train_loop_ratio"] = ratio(figures["tunepipe"]["train_s"], figures["script"]["train_s"])
        pairs.append(figures)
        print(f"repeat {index}: stage ratio {figures['stage_ratio']:.3f}, train-loop ratio {figures['train_loop_ratio']:.3f}", file=sys.stderr)

    result = {
        **header("orchestration_overhead.py", sys.argv[1:]),
        "config": str(Path(args.config).resolve()),
        "workdir": str(work),
        "training_stages": stages,
        "steps": {s: config[s].get("training", {}).get("max_steps") for s in stages},
        "environment": config.get("environment", "cpu"),
        "repeats": args.repeats,
        "warmup_wall_s": rounded(warmup.wall_s),
        **summarize(pairs),
        "runs": pairs,
    }
    print_result(result)


if __name__ == "__main__":
    main()
