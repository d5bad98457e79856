"""What every training job shares: loading the base at the profile's precision, TrainingArguments
keywords, callbacks, fitting with resume from the last checkpoint, memory and loss history.

A training job runs in the stage's process or in every worker of a launch
(`tunepipe.tasks.training.launcher`); checkpoints go to the job's `checkpoint_dir` inside the
stage's staging dir, which survives a crash, so a rerun resumes from the last one.
"""

from __future__ import annotations

import json
import logging
import math
import os
import resource
import shutil
import time
from pathlib import Path
from typing import Any

from tunepipe.schemas.environment import EnvironmentProfile
from tunepipe.schemas.methods import QLoraMethod
from tunepipe.schemas.training import TrainingConfig
from tunepipe.tasks.core.tracking import tracked_run_callbacks
from tunepipe.tasks.training import peft_methods
from tunepipe.tasks.training.distributed import per_rank_state
from tunepipe.tasks.training.hardware import hardware
from tunepipe.tasks.training.moe import router_loss_callback, router_loss_weight

log = logging.getLogger("tunepipe.train")


def last_checkpoint(checkpoint_dir: str | Path) -> str | None:
    """The newest complete `checkpoint-N` directory, or None.

    The Trainer writes a checkpoint in place and its `trainer_state.json` last, so a process
    killed mid-save leaves a directory without a readable state: such directories are removed.
    """
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


def load_base(
    model_path: str, method: Any, env: EnvironmentProfile, revision: str | None = None, *, packing: bool | str = False
) -> Any:
    """The base model at the profile's dtype and attention kernel (4-bit for qlora); packed, padding-free
    training loads the profile's `packed_attention` kernel instead."""
    from tunepipe.tasks.lm.modeling import load_model  # looked up per call: tests replace load_model

    hw = hardware(env)
    quantization = peft_methods.bnb_config(method, env) if isinstance(method, QLoraMethod) else None
    attention = hw.attention(padding_free=peft_methods.is_padding_free(packing))
    model = load_model(
        model_path, revision=revision, dtype=hw.dtype, attn_implementation=attention, quantization=quantization,
        device_map=hw.quantized_device_map() if quantization is not None else None,
    )
    # No KV cache in training: with one, transformers would not derive the per-example mask of a packed row.
    model.config.use_cache = False
    return model


def make_callbacks(model: Any, method: Any, label: str = "training", watch: dict[str, str] | None = None) -> list[Any]:
    """Live progress in the Prefect UI (with the latest values of the `watch` log keys, {TRL key:
    our name}); AdaLoRA's budget re-allocation after each optimiser step (the Trainer does not call it)."""
    from transformers import TrainerCallback
    from tunepipe.tasks.training.progress import PrefectProgress  # lazy: pulls in transformers

    from tunepipe.tasks.training.progress import StepReporter, job_label  # lazy: pulls in transformers

    label = job_label(label)  # `sft/triples`: the two sft jobs' progress artifacts and lines tell apart
    callbacks: list[Any] = [PrefectProgress(label, watch=watch), StepReporter(label), *tracked_run_callbacks()]
    if (router_log := router_loss_callback(model)) is not None:
        callbacks.append(router_log)
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
    per_step = env.per_device_batch_size * env.gradient_accumulation_steps * env.world_size
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
        extra=peft_methods.optimizer_arguments(method),
    )
    # TRL's own MoE switch: it re-sets the model config's `output_router_logits` and coefficient
    # from this (default 0.001, on), so it must carry ours (`training.router`, via the config).
    args.router_aux_loss_coef = router_loss_weight(model)
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
        optimizers=(peft_methods.custom_optimizer(model, method, training), None),
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
    from tunepipe.tasks.training.progress import quiet_trainer  # lazy: pulls in transformers

    quiet_trainer(trainer)
    result = trainer.train(resume_from_checkpoint=resume)
    seconds = time.perf_counter() - started
    tokens = int(getattr(trainer.state, "num_input_tokens_seen", 0) or 0)

    return {
        "world_size": int(trainer.args.world_size),
        # Each rank's parameters and optimizer states: about 1/world_size of the unsharded run's under ZeRO-3 or FSDP.
        "per_rank_state": per_rank_state(trainer),
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


def write_json(path: str | Path, payload: Any) -> None:
    Path(path).write_text(json.dumps(payload, indent=1, default=str))



def training_kwargs(training: TrainingConfig, env: EnvironmentProfile, output_dir: str | Path) -> dict[str, Any]:
    """`TrainingArguments` keywords shared by every TRL config (DPOConfig, RewardConfig, PPOConfig, ...)."""
    return peft_methods.training_arguments(training, env, output_dir=output_dir, optim=training.optimizer)


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (every device) from the job's config before anything is drawn.

    Every training job calls this first: adapter and head initialisation, dropout, data order and
    sampled rollouts then depend on the config alone, never on what the process drew before (a
    process that computed earlier stages, or a launched worker, publishes the same bytes).
    """
    from transformers import set_seed

    set_seed(seed)
