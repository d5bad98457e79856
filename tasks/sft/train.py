"""One training run: a JSON-able job in, a saved adapter/model and a metrics dict out.

The same `train_job` runs in the stage's process (launcher `in_process`) or in every worker of
an `accelerate launch` / `deepspeed` / `torchrun` launch (tasks/launcher.py), so a job holds
only plain data: the stage config and profile as dicts, and paths.

Checkpoints go to the job's `checkpoint_dir` (inside the stage's staging dir, which survives a
crash); a rerun resumes from the last one there.
"""

from __future__ import annotations

import json
import logging
import math
import os
import resource
import time
from pathlib import Path
from typing import Any

from schemas.environment import EnvironmentProfile
from schemas.sft import LoraMethod, QLoraMethod, SFTConfig
from tasks import peft_methods
from tasks.sft.data import encode_records, read_split, resolve_chat_template
from tasks.stage import StageFailed

log = logging.getLogger("tunepipe.train")


# --------------------------------------------------------------------------------------------
# Shared pieces (also used by the pretrain stage)


def last_checkpoint(checkpoint_dir: str | Path) -> str | None:
    """The newest complete `checkpoint-N` directory, or None.

    The Trainer writes a checkpoint in place and its `trainer_state.json` last, so a process
    killed mid-save leaves a directory without a readable state: such directories are removed.
    """
    import shutil

    path = Path(checkpoint_dir)
    if not path.is_dir():
        return None
    found = sorted(
        (int(p.name.split("-")[1]), p) for p in path.glob("checkpoint-*") if p.is_dir() and p.name.split("-")[1].isdigit()
    )
    for _, candidate in reversed(found):
        try:
            json.loads((candidate / "trainer_state.json").read_text())
        except (OSError, ValueError):
            log.warning("removing incomplete checkpoint %s", candidate)
            shutil.rmtree(candidate, ignore_errors=True)
            continue
        return str(candidate)
    return None


def load_base(model_path: str, method: Any, env: EnvironmentProfile, revision: str | None = None) -> Any:
    """The base model at the profile's dtype and attention kernel (4-bit for qlora)."""
    from tasks.modeling import load_model

    quantization = peft_methods.bnb_config(method, env) if isinstance(method, QLoraMethod) else None
    model = load_model(
        model_path, revision=revision, dtype=env.dtype, attn_implementation=env.attn_implementation, quantization=quantization,
        device_map=quantized_device_map(env) if quantization is not None else None,
    )
    model.config.use_cache = False
    return model


def quantized_device_map(env: EnvironmentProfile) -> dict[str, Any] | None:
    """Where a 4-bit base is loaded: the Trainer never moves a bitsandbytes model, so on CUDA it
    must be quantized straight onto this process's GPU (LOCAL_RANK under a launcher)."""
    if env.device != "cuda":
        return None
    return {"": int(os.environ.get("LOCAL_RANK", "0"))}


def make_callbacks(model: Any, method: Any, label: str = "training") -> list[Any]:
    """Live progress in the Prefect UI; AdaLoRA's budget re-allocation after each optimiser step
    (the Trainer does not call it)."""
    from transformers import TrainerCallback

    from tasks.sft.progress import PrefectProgress

    callbacks: list[Any] = [PrefectProgress(label)]
    if getattr(method, "name", None) == "adalora":

        class AdaLoraBudget(TrainerCallback):
            def on_optimizer_step(self, args, state, control, **kwargs):  # after step, before zero_grad
                model.base_model.update_and_allocate(state.global_step)

        callbacks.append(AdaLoraBudget())
    return callbacks


def peak_memory() -> dict[str, Any]:
    """Peak accelerator memory if training ran on one, else the process's peak RSS."""
    import torch

    if torch.cuda.is_available() and torch.cuda.max_memory_allocated() > 0:
        return {"peak_memory_gb": round(torch.cuda.max_memory_allocated() / 2**30, 4), "peak_memory_kind": "cuda_allocated"}
    return {"peak_memory_gb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 4), "peak_memory_kind": "process_peak_rss"}


def loss_history(trainer: Any) -> list[dict[str, float]]:
    """Training loss per logged step (earlier steps of a resumed run included: they live in the state)."""
    return [
        {"step": int(entry["step"]), "loss": round(float(entry["loss"]), 6)}
        for entry in trainer.state.log_history
        if "loss" in entry and "step" in entry
    ]


def estimated_steps(rows: int, env: EnvironmentProfile, training: Any) -> int:
    if training.max_steps:
        return training.max_steps
    per_step = env.per_device_batch_size * env.gradient_accumulation_steps * env.num_processes
    return max(1, math.ceil(math.ceil(rows / per_step) * training.epochs))


def build_trainer(
    *,
    model: Any,
    tokenizer: Any,
    method: Any,
    env: EnvironmentProfile,
    training: Any,
    train_rows: list[dict[str, list[int]]],
    eval_rows: dict[str, list[dict[str, list[int]]]],
    checkpoint_dir: str | Path,
    max_length: int,
    packing: bool | str,
) -> Any:
    """A TRL `SFTTrainer` over pre-tokenized rows (input_ids + labels) with the profile's settings."""
    import torch
    from datasets import Dataset
    from datasets.utils.logging import disable_progress_bar
    from trl import SFTTrainer

    disable_progress_bar()  # per-map progress bars of tiny datasets drown the stage log

    args = peft_methods.trainer_args(
        training,
        env,
        output_dir=checkpoint_dir,
        max_length=max_length,
        packing=packing,
        optim=peft_methods.optimizer_name(method, training),
        has_eval=bool(eval_rows),
    )
    eval_dataset: Any = None
    if eval_rows:
        sets = {task: Dataset.from_list(rows) for task, rows in eval_rows.items() if rows}
        eval_dataset = sets if len(sets) > 1 else next(iter(sets.values()), None)
    trainer = SFTTrainer(
        model=model,
        args=args,
        train_dataset=Dataset.from_list(train_rows),
        eval_dataset=eval_dataset,
        processing_class=tokenizer,
        callbacks=make_callbacks(model, method),
    )
    if isinstance(method, QLoraMethod):
        # TRL casts a quantized model's trainable weights to bf16; keep them at the compute dtype
        # instead, so the saved adapter reloads (PEFT loads adapters at the compute dtype) identically.
        dtype = getattr(torch, peft_methods.quantization_settings(method, env)["compute_dtype"])
        for param in trainer.model.parameters():
            if param.requires_grad:
                param.data = param.data.to(dtype)
    return trainer


def fit(trainer: Any, checkpoint_dir: str | Path) -> dict[str, Any]:
    """Train (resuming from the last checkpoint if any) and return step, timing and token metrics."""
    resume = last_checkpoint(checkpoint_dir)
    if resume:
        log.info("resuming from %s", resume)
    started = time.perf_counter()
    result = trainer.train(resume_from_checkpoint=resume)
    seconds = time.perf_counter() - started
    tokens = int(getattr(trainer.state, "num_input_tokens_seen", 0) or 0)
    return {
        "global_step": int(trainer.state.global_step),
        "resumed_from": resume and int(Path(resume).name.split("-")[-1]),
        "train_loss": round(float(result.training_loss), 6),
        "train_seconds": round(seconds, 3),
        "tokens_seen": tokens,
        "tokens_per_second": round(tokens / seconds, 2) if seconds > 0 else None,
    }


def evaluate(trainer: Any) -> dict[str, float]:
    """Eval loss (per task when there are several eval sets)."""
    if trainer.eval_dataset is None:
        return {}
    metrics = trainer.evaluate()
    return {k: round(float(v), 6) for k, v in metrics.items() if k.endswith("_loss")}


def is_main_process() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


def plot_loss(history: list[dict[str, float]], path: Path, title: str) -> None:
    """The loss curve as a PNG (matplotlib, Agg backend)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=100)
    for label, points in _by_series(history).items():
        ax.plot([p["step"] for p in points], [p["loss"] for p in points], marker=".", label=label)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("training loss")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    if len(_by_series(history)) > 1:
        ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def _by_series(history: list[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    series: dict[str, list[dict[str, Any]]] = {}
    for point in history:
        series.setdefault(point.get("series", "train"), []).append(point)
    return series


# --------------------------------------------------------------------------------------------
# The SFT job


def prepare_sft(job: dict[str, Any]) -> dict[str, Any]:
    """Tokenizer, encoded rows and statistics of an SFT job (no model loaded)."""
    from tasks.modeling import load_tokenizer

    config = SFTConfig.model_validate(job["config"])
    tokenizer = load_tokenizer(job["model_path"], revision=config.revision)
    template = resolve_chat_template(config.chat_template, tokenizer)
    tokenizer.chat_template = template  # saved with the artifact: serving renders prompts the same way
    wanted = set(job["tasks"]) if job.get("tasks") else None
    encoded = {}
    for split in ("train", "validation"):
        records = read_split(job["data_dir"], split)
        if wanted is not None:
            records = [r for r in records if str(r.get("task") or "default") in wanted]
        encoded[split] = encode_records(
            records, tokenizer, template,
            max_length=config.max_length, train_on_inputs=config.train_on_inputs,
            overlong=config.overlong, system_prompt=config.system_prompt, split=split,
        )
    train_by_task, train_stats = encoded["train"]
    eval_by_task, eval_stats = encoded["validation"]
    train_rows = [row for task in sorted(train_by_task) for row in train_by_task[task]]
    if not train_rows:
        raise StageFailed(
            f"sft: no training examples for tasks {sorted(wanted) if wanted else 'all'} in {job['data_dir']}/train.jsonl "
            f"({train_stats.examples} records read, {train_stats.dropped_overlong} dropped as over-long, "
            f"{train_stats.dropped_no_target} left without an answer after truncation)"
        )
    return {
        "config": config, "tokenizer": tokenizer, "train_rows": train_rows,
        "eval_rows": eval_by_task, "train_stats": train_stats, "eval_stats": eval_stats,
    }


def sft_trainer(job: dict[str, Any]) -> tuple[Any, dict[str, Any]]:
    """The ready-to-train SFTTrainer of a job, and the prepared data (exposed for tests)."""
    prepared = prepare_sft(job)
    config: SFTConfig = prepared["config"]
    env = EnvironmentProfile.model_validate(job["env"])
    method = config.method
    model = load_base(job["model_path"], method, env, config.revision)
    steps = estimated_steps(len(prepared["train_rows"]), env, config.training)
    init_dir = Path(job["checkpoint_dir"]) / "initial-adapter"
    model = peft_methods.apply_method(
        model, method, total_step=steps, tokenizer_path=job["model_path"], gradient_checkpointing=env.gradient_checkpointing
    )
    if isinstance(method, LoraMethod) and method.init in ("pissa", "olora") and is_main_process():
        # The adapter as initialised, saved as a plain-init LoRA: the reference that converts the
        # trained PiSSA/OLoRA adapter back into a LoRA on the original base weights.
        model.peft_config["default"].init_lora_weights = True
        model.save_pretrained(init_dir)
        model.peft_config["default"].init_lora_weights = method.init
    trainer = build_trainer(
        model=model, tokenizer=prepared["tokenizer"], method=method, env=env, training=config.training,
        train_rows=prepared["train_rows"], eval_rows=prepared["eval_rows"], checkpoint_dir=job["checkpoint_dir"],
        max_length=config.max_length, packing=config.packing,
    )
    prepared["initial_adapter"] = init_dir
    return trainer, prepared


def save_result(trainer: Any, tokenizer: Any, method: Any, dest: Path, initial_adapter: Path | None) -> None:
    """An adapter dir (PEFT methods) or a full model dir, with the tokenizer, written atomically."""
    tmp = dest.with_name(dest.name + ".partial")
    if tmp.exists():
        import shutil

        shutil.rmtree(tmp)
    model = trainer.model
    if method.is_peft:
        kwargs = {}
        if isinstance(method, LoraMethod) and method.init in ("pissa", "olora") and initial_adapter is not None:
            kwargs["path_initial_model_for_weight_conversion"] = str(initial_adapter)
        model.save_pretrained(tmp, **kwargs)
    else:
        trainer.save_model(str(tmp))
    tokenizer.save_pretrained(tmp)
    tmp.rename(dest)


def train_job(job: dict[str, Any]) -> dict[str, Any]:
    """Run one SFT job to completion; returns its metrics (rank 0 also saves the result)."""
    trainer, prepared = sft_trainer(job)
    config: SFTConfig = prepared["config"]
    trainable, total = peft_methods.count_parameters(trainer.model)
    log.info("sft %s: %d examples, %d trainable of %d parameters", config.method.name, len(prepared["train_rows"]), trainable, total)
    metrics = fit(trainer, job["checkpoint_dir"])
    metrics.update(evaluate(trainer))
    dest = Path(job["output_dir"]) / job["save_to"]
    if is_main_process():
        dest.parent.mkdir(parents=True, exist_ok=True)
        save_result(trainer, prepared["tokenizer"], config.method, dest, prepared["initial_adapter"])
    metrics.update(
        {
            "trainable_parameters": trainable,
            "total_parameters": total,
            "trainable_percent": round(100 * trainable / total, 4) if total else 0.0,
            "train_examples": len(prepared["train_rows"]),
            "truncated": prepared["train_stats"].truncated,
            "data": {"train": prepared["train_stats"].as_dict(), "validation": prepared["eval_stats"].as_dict()},
            "loss_history": loss_history(trainer),
            **peak_memory(),
        }
    )
    return metrics


def write_json(path: str | Path, payload: Any) -> None:
    Path(path).write_text(json.dumps(payload, indent=1, default=str))
