"""One training run: a JSON-able job in, a saved adapter/model and a metrics dict out.

The same `train_job` runs in the stage's process (launcher `in_process`) or in every worker of
an `accelerate launch` / `deepspeed` / `torchrun` launch (tasks/training/launcher.py), so a job holds
only plain data: the stage config and profile as dicts, and paths.

Checkpoints go to the job's `checkpoint_dir` (inside the stage's staging dir, which survives a
crash); a rerun resumes from the last one there.
"""


from __future__ import annotations

import logging
import shutil
from pathlib import Path
from typing import Any

from pydantic import Field
from tunepipe.schemas.jobs import TrainingJob
from tunepipe.schemas.methods import LoraMethod
from tunepipe.schemas.sft import SFTConfig
from tunepipe.tasks.core.stage import StageFailed
from tunepipe.tasks.lm import checks as checks_
from tunepipe.tasks.lm.cards import adapter_card
from tunepipe.tasks.training import peft_methods
from tunepipe.tasks.lm.encoding import (
    encode_records,
    prompt_batches,
    read_split,
    resolve_chat_template,
)
from tunepipe.tasks.lm.generation import prompts_and_references
from tunepipe.tasks.lm.modeling import load_tokenizer
from tunepipe.tasks.training.hardware import hardware
from tunepipe.tasks.training.moe import ROUTER_STEP_METRICS, apply_router
from tunepipe.tasks.training.plots import step_history
from tunepipe.tasks.training.trainer import (
    build_trainer,
    estimated_steps,
    evaluate,
    fit,
    is_main_process,
    load_base,
    loss_history,
    peak_memory,
    seed_everything,
)

log = logging.getLogger("tunepipe.train")


class SFTJob(TrainingJob):
    """One SFT run (all tasks, or one task's adapter), as it crosses the launcher."""

    config: SFTConfig
    model_path: str = Field(description="The base model (a path or the upstream artifact's model).")
    data_dir: str = Field(description="The data artifact.")
    tasks: list[str] | None = Field(default=None, description="Only these tasks' records; None: every task.")
    save_to: str = Field(description="The result's directory under output_dir.")


def check_policy(config: SFTConfig) -> checks_.CheckPolicy:
    return checks_.CheckPolicy("sft", config.self_checks)


def label_mask_result(stats: Any) -> dict[str, Any]:
    """`label_mask`, checked row by row while encoding: passed, or how many rows failed it under `warn`."""
    result = {"passed": stats.label_mask_failed == 0, "rows": stats.kept}
    if stats.label_mask_failed:
        result.update(failed_rows=stats.label_mask_failed, warned=stats.label_mask_problem)
    return result


def prepare_sft(job: SFTJob | dict[str, Any]) -> dict[str, Any]:
    """Tokenizer, encoded rows and statistics of an SFT job (no model loaded)."""
    job = SFTJob.model_validate(job)  # the stage's job as is; a test's dict validated here
    config = job.config
    tokenizer = load_tokenizer(job.model_path, revision=config.revision)
    template = resolve_chat_template(config.chat_template, tokenizer)
    tokenizer.chat_template = template  # saved with the artifact: serving renders prompts the same way
    wanted = set(job.tasks) if job.tasks else None
    encoded = {}
    for split in ("train", "validation"):
        records = read_split(job.data_dir, split)
        if wanted is not None:
            records = [r for r in records if str(r.get("task") or "default") in wanted]
        encoded[split] = encode_records(
            records, tokenizer, template,
            max_length=config.max_length, train_on_inputs=config.train_on_inputs,
            overlong=config.overlong, system_prompt=config.system_prompt, split=split, policy=check_policy(config),
        )
    train_by_task, train_stats = encoded["train"]
    eval_by_task, eval_stats = encoded["validation"]
    train_rows = [row for task in sorted(train_by_task) for row in train_by_task[task]]
    if not train_rows:
        raise StageFailed(
            f"sft: no training examples for tasks {sorted(wanted) if wanted else 'all'} in {job.data_dir}/train.jsonl "
            f"({train_stats.examples} records read, {train_stats.dropped_overlong} dropped as over-long, "
            f"{train_stats.dropped_no_target} left without an answer after truncation)"
        )
    return {
        "config": config, "tokenizer": tokenizer, "train_rows": train_rows,
        "eval_rows": eval_by_task, "train_stats": train_stats, "eval_stats": eval_stats,
    }


def sft_trainer(job: SFTJob | dict[str, Any]) -> tuple[Any, dict[str, Any]]:
    """The ready-to-train SFTTrainer of a job, and the prepared data (exposed for tests)."""
    job = SFTJob.model_validate(job)
    prepared = prepare_sft(job)
    config: SFTConfig = prepared["config"]
    seed_everything(config.training.seed)  # before the adapter's initialisation draws
    env = job.env
    method = config.method
    model = load_base(job.model_path, method, env, config.revision, packing=config.packing)
    apply_router(model, config.training.router)
    steps = estimated_steps(len(prepared["train_rows"]), env, config.training)
    init_dir = Path(job.checkpoint_dir) / "initial-adapter"
    model = peft_methods.apply_method(
        model, method, total_step=steps, tokenizer_path=job.model_path, gradient_checkpointing=env.gradient_checkpointing
    )
    if isinstance(method, LoraMethod) and method.init in ("pissa", "olora") and is_main_process():
        # The adapter as initialised, saved as a plain-init LoRA: the reference that converts the
        # trained PiSSA/OLoRA adapter back into a LoRA on the original base weights.
        model.peft_config["default"].init_lora_weights = True
        model.save_pretrained(init_dir)
        model.peft_config["default"].init_lora_weights = method.init
    trainer = build_trainer(
        model=model, tokenizer=prepared["tokenizer"], method=method, env=env, training=config.training,
        train_rows=prepared["train_rows"], eval_rows=prepared["eval_rows"], checkpoint_dir=job.checkpoint_dir,
        max_length=config.max_length, packing=config.packing,
    )
    prepared["initial_adapter"] = init_dir
    return trainer, prepared


def save_result(
    trainer: Any, tokenizer: Any, method: Any, dest: Path, initial_adapter: Path | None, *, collective: bool = False
) -> None:
    """An adapter dir (PEFT methods) or a full model dir, with the tokenizer, written atomically.

    `collective`: the parameters are sharded over the ranks; every rank calls this, the Trainer gathers
    the weights and rank 0 writes them (PiSSA/OLoRA conversion needs the whole adapter: not done then)."""
    tmp = dest.with_name(dest.name + ".partial")
    if is_main_process() and tmp.exists():
        shutil.rmtree(tmp)
    model = trainer.model
    if collective:
        if is_main_process():
            tmp.parent.mkdir(parents=True, exist_ok=True)
        trainer.save_model(str(tmp))
        if not is_main_process():
            return
    elif method.is_peft:
        kwargs = {}
        if isinstance(method, LoraMethod) and method.init in ("pissa", "olora") and initial_adapter is not None:
            kwargs["path_initial_model_for_weight_conversion"] = str(initial_adapter)
        model.save_pretrained(tmp, **kwargs)
    else:
        trainer.save_model(str(tmp))
    tokenizer.save_pretrained(tmp)
    tmp.rename(dest)


def check_prompts(job: SFTJob, config: SFTConfig, tokenizer: Any, limit: int = 8) -> list[str]:
    """Held-out prompts for the adapter check: the test split's (else validation's, else train's) prompts."""
    wanted = set(job.tasks) if job.tasks else None
    for split in ("test", "validation", "train"):
        records = [r for r in read_split(job.data_dir, split) if wanted is None or str(r.get("task") or "default") in wanted]
        if records:
            return prompts_and_references(records[:limit], tokenizer, tokenizer.chat_template, config.system_prompt)[0]
    return []


def effect_on_check_prompts(model: Any, prepared: dict[str, Any], config: SFTConfig, job: dict[str, Any], measure: Any) -> dict[str, Any]:
    """`measure(batches)` on the held-out check prompts, with the model in eval mode (restored after)."""
    prompts = check_prompts(job, config, prepared["tokenizer"])
    batches = prompt_batches(prepared["tokenizer"], prompts, next(model.parameters()).device)
    was_training = model.training
    model.eval()
    try:
        return measure(batches)
    finally:
        model.train(was_training)


def saved_adapter_effect(trainer: Any, prepared: dict[str, Any], config: SFTConfig, dest: Path, job: SFTJob) -> dict[str, Any]:
    """The saved adapter, loaded back beside the trained one, must change the base's output on
    held-out prompts: an adapter that is empty, was never trained or was saved without its weights
    would be served as the bare base model."""
    model = trainer.model
    if not config.method.is_peft or config.method.is_prompt_learning:
        return {"passed": True, "skipped": f"{config.method.name}: no LoRA-style adapter to reload"}

    def saved_files_effect(batches: list[dict[str, Any]]) -> dict[str, Any]:
        if config.method.name not in ("lora", "qlora"):  # AdaLoRA and IA3 take one adapter at a time: the trained one
            return checks_.adapter_effect_check(model, batches)
        active = model.active_adapter  # what serving loads: the saved files, beside the trained adapter
        model.load_adapter(str(dest), adapter_name="saved-check")
        model.set_adapter("saved-check")
        try:
            return checks_.adapter_effect_check(model, batches)
        finally:
            model.set_adapter(active)
            model.delete_adapter("saved-check")

    result = effect_on_check_prompts(model, prepared, config, job, saved_files_effect)
    return checks_.require(
        "adapter_effect", result,
        f"the saved adapter does not change the model's output on {result['prompts']} held-out prompts "
        f"(largest logit difference {result['max_logit_difference']:.2e}): it would serve the bare base model. Check the "
        "learning rate and warmup (a run no longer than its warmup trains at learning rate 0)", check_policy(config),
    )


def trained_adapter_effect(trainer: Any, prepared: dict[str, Any], config: SFTConfig, job: SFTJob) -> dict[str, Any]:
    """`saved_adapter_effect` for sharded parameters: the trained adapter in memory against the base, run by
    every rank together (each forward pass gathers the shards); the saved files are checked on reload."""
    model = trainer.model
    if not config.method.is_peft or config.method.is_prompt_learning:
        return {"passed": True, "skipped": f"{config.method.name}: no LoRA-style adapter to check"}
    result = effect_on_check_prompts(model, prepared, config, job, lambda batches: checks_.adapter_effect_check(model, batches))
    return checks_.require(
        "adapter_effect", result,
        f"the trained adapter does not change the model's output on {result['prompts']} held-out prompts", check_policy(config),
    )


def train_job(job: SFTJob) -> dict[str, Any]:
    """Run one SFT job to completion; returns its metrics (rank 0 also saves the result)."""
    job = SFTJob.model_validate(job)  # the stage's job as is; a test's dict validated here
    config = job.config
    sharded = hardware(job.env).parameters_sharded()
    if sharded and getattr(config.method, "init", None) in ("pissa", "olora"):
        raise StageFailed(
            f"sft.method.init {config.method.init} converts the trained adapter against the whole initial adapter at save "
            "time, which a profile that shards parameters (ZeRO-3, FSDP) never holds on one rank: use init gaussian or a "
            "ZeRO-2/DDP profile"
        )
    trainer, prepared = sft_trainer(job)
    config = prepared["config"]
    trainable, total = peft_methods.count_parameters(trainer.model)
    log.info("sft %s: %d examples, %d trainable of %d parameters", config.method.name, len(prepared["train_rows"]), trainable, total)
    metrics = fit(trainer, job.checkpoint_dir)
    checks = {
        "label_mask": label_mask_result(prepared["train_stats"]),
        "steps": checks_.require_steps("the trainer", metrics["global_step"], trainer, config.training.max_steps, check_policy(config)),
    }
    history = loss_history(trainer)
    checks["loss"] = checks_.require_loss(
        "the training loss", history, metrics["train_loss"], ": nothing was learned", check_policy(config)
    )
    metrics.update(evaluate(trainer))
    dest = Path(job.output_dir) / job.save_to
    if sharded:
        # ZeRO-3 / FSDP: every rank takes part in gathering the weights and in the check's forward passes.
        save_result(trainer, prepared["tokenizer"], config.method, dest, None, collective=True)
        checks["adapter_effect"] = trained_adapter_effect(trainer, prepared, config, job)
    elif is_main_process():
        dest.parent.mkdir(parents=True, exist_ok=True)
        save_result(trainer, prepared["tokenizer"], config.method, dest, prepared["initial_adapter"])
        checks["adapter_effect"] = saved_adapter_effect(trainer, prepared, config, dest, job)
    if is_main_process() and config.method.is_peft and dest.is_dir():
        # Our card instead of PEFT's blank template (its `base_model:` an absolute local path).
        (dest / "README.md").write_text(adapter_card(
            base=job.model_path, method=config.method.name, tasks=job.tasks,
            training=config.training.model_dump(mode="json"), stage="sft",
        ))
    metrics.update(
        {
            "trainable_parameters": trainable,
            "total_parameters": total,
            "trainable_percent": round(100 * trainable / total, 4) if total else 0.0,
            "train_examples": len(prepared["train_rows"]),
            "truncated": prepared["train_stats"].truncated,
            "data": {"train": prepared["train_stats"].as_dict(), "validation": prepared["eval_stats"].as_dict()},
            "loss_history": history,
            "checks": checks,
            "step_metrics": step_history(trainer.state.log_history, ROUTER_STEP_METRICS),
            # The load-balancing loss weight training ran with (MoE models; 0: off).
            "router_aux_loss_coef": trainer.args.router_aux_loss_coef if getattr(trainer, "aux_loss_enabled", False) else 0.0,
            **peak_memory(),
        }
    )
    return metrics
