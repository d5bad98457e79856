"""The `reward` stage: a reward model trained on preference pairs with TRL's `RewardTrainer`.

Inputs: `data` (required: its `preferences.jsonl`); the starting model is `reward.model` if set,
else (with `start_from: sft` and an `sft` input) the SFT result, else `pretrain` / `base_model`
(or the SFT artifact's base). Held-out pairs are the data stage's validation and test pairs
(pairs without a split: a hash of the prompt, `reward.heldout_fraction`).

Artifact layout:

    adapter/          PEFT adapter on the backbone + the score head (modules_to_save), tokenizer
    model/            a full sequence-classification model + tokenizer (method full, or an SFT
                      adapter merged into its base as the start: then nothing else holds the base)
    outputs.json      {"kind": adapter|model, "paths": {"all": ...}, "method", "base_model"}
    metrics.json      pairwise accuracy before/after, loss and accuracy per step
    loss_curve.png, metrics.png

Checkpoints go to the staging dir's `.checkpoints/`; a rerun after a crash resumes from the last.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from schemas.environment import EnvironmentProfile
from schemas.reward import RewardConfig
from schemas.sft import QLoraMethod
from tasks.sft import TrainingStage
from tasks.stage import StageContext, StageFailed, StageOutput

ENTRYPOINT = "tasks.reward:train_reward_job"
STEP_METRICS = {"loss": "loss", "accuracy": "train_accuracy", "margin": "train_margin", "mean_reward": "mean_reward"}


def merge_adapter(base: str, adapter_dir: str | Path, dest: Path) -> str:
    """The base with an SFT adapter merged in, saved (with the adapter's tokenizer) to `dest`."""
    from peft import PeftModel

    from tasks.modeling import load_model, load_tokenizer

    if (dest / "config.json").exists():
        return str(dest)
    tmp = dest.with_name(dest.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    merged = PeftModel.from_pretrained(load_model(base), str(adapter_dir)).merge_and_unload()
    merged.save_pretrained(tmp)
    load_tokenizer(str(adapter_dir)).save_pretrained(tmp)
    tmp.rename(dest)
    return str(dest)


def resolve_start(config: RewardConfig, ctx: StageContext) -> tuple[str, str, bool]:
    """(model path, tokenizer path, merged): where the reward model starts.

    `merged` is True when an SFT adapter was merged into a temporary copy of its base; the result
    is then saved as a full model, since nothing else keeps that merged base.
    """
    from tasks.align.common import read_outputs

    if config.model:
        return config.model, config.model, False
    sft = ctx.inputs.get("sft")
    if config.start_from == "sft" and sft is not None:
        outputs = read_outputs(sft, "reward")
        first = str(Path(sft.path) / next(iter(outputs["paths"].values())))
        if outputs["kind"] == "model":
            return first, first, False
        if outputs["kind"] == "adapter":
            if isinstance(config.method, QLoraMethod):
                raise StageFailed(
                    "reward: start_from sft merges the SFT adapter into its base, and a 4-bit (qlora) reward model on "
                    "that merge cannot be saved: use reward.method lora or full, or reward.start_from base"
                )
            merged = merge_adapter(outputs["base_model"], first, ctx.checkpoint_dir / "sft-merged")
            return merged, merged, True
        return outputs["base_model"], first, False  # per-task adapters: no single SFT policy to start from
    for name in ("pretrain", "base_model"):
        if name in ctx.inputs:
            return ctx.inputs[name].path, ctx.inputs[name].path, False
    if sft is not None:
        base = read_outputs(sft, "reward")["base_model"]
        return base, base, False
    raise StageFailed("reward: no model to start from: set reward.model, or give the stage an sft, pretrain or base_model input")


class RewardStage(TrainingStage):
    """Reward model on preference pairs (LoRA/QLoRA adapter with a score head, or full)."""

    name = "reward"
    config_model = RewardConfig
    code_modules = ("tasks.reward", "tasks.align.common", "tasks.align.rewards", "tasks.peft_methods", "schemas.reward")
    resumable = True

    def run(self, config: RewardConfig, ctx: StageContext) -> StageOutput:
        from tasks.align.common import plot_series, read_pairs, split_pairs
        from tasks.launcher import run_training
        from tasks.sft.train import plot_loss, write_json

        if "data" not in ctx.inputs:
            raise StageFailed("reward: needs the `data` stage's artifact as input `data`")
        data_dir = ctx.inputs["data"].path
        train, heldout = split_pairs(read_pairs(data_dir, "reward", config.tasks), config.heldout_fraction)
        if not train:
            raise StageFailed(f"reward: all {len(heldout)} preference pairs in {data_dir} are held out: none left to train on")
        model_path, tokenizer_path, merged = resolve_start(config, ctx)
        save_to = "model" if merged or not config.method.is_peft else "adapter"
        ctx.logger.info("reward: %s from %s on %d pairs (%d held out)", config.method.name, model_path, len(train), len(heldout))

        done_file = ctx.checkpoint_dir / "reward.metrics.json"
        if done_file.exists() and (ctx.staging_dir / save_to).exists():
            metrics = json.loads(done_file.read_text())
        else:
            job = {
                "config": config.model_dump(mode="json"), "env": ctx.env.model_dump(mode="json"),
                "model_path": model_path, "tokenizer_path": tokenizer_path, "train": train, "heldout": heldout,
                "output_dir": str(ctx.staging_dir), "save_to": save_to, "merge": merged,
                "checkpoint_dir": str(ctx.checkpoint_dir / "trainer"),
            }
            metrics = run_training(ENTRYPOINT, job, ctx.env, ctx.logger, ctx.checkpoint_dir / "launch")
            ctx.checkpoint_dir.mkdir(parents=True, exist_ok=True)
            write_json(done_file, metrics)

        outputs = {
            "kind": "adapter" if save_to == "adapter" else "model",
            "method": config.method.name,
            # An adapter loads onto this base; a full model (incl. a merged SFT start) needs none.
            "base_model": None if merged else model_path,
            "paths": {"all": save_to},
        }
        write_json(ctx.staging_dir / "outputs.json", outputs)
        write_json(ctx.staging_dir / "metrics.json", metrics)
        plot_loss(metrics["loss_history"], ctx.staging_dir / "loss_curve.png", f"reward ({config.method.name})")
        plot_series(metrics["step_metrics"], ctx.staging_dir / "metrics.png", "reward model: per step")
        before, after = metrics["heldout_before"], metrics["heldout_after"]
        ctx.logger.info("reward: held-out pairwise accuracy %s → %s (n=%d)", before["accuracy"], after["accuracy"], after["n"])
        summary = (
            f"Reward model (**{config.method.name}**) on {len(train)} preference pairs: held-out pairwise accuracy "
            f"**{after['accuracy']}** (untrained head: {before['accuracy']}; n={after['n']}, chance 0.5), "
            f"mean margin {after['margin']}."
        )
        table = [
            {"when": "before", **before},
            {"when": "after", **after, "steps": metrics["global_step"], "train_loss": metrics["train_loss"]},
        ]
        stage_metrics = {
            "method": config.method.name, "kind": outputs["kind"], "train_pairs": len(train), "heldout_pairs": len(heldout),
            "heldout_accuracy": after["accuracy"], "heldout_accuracy_before": before["accuracy"],
            "heldout_margin": after["margin"], "global_step": metrics["global_step"], "train_loss": metrics["train_loss"],
            "trainable_parameters": metrics["trainable_parameters"], "total_parameters": metrics["total_parameters"],
            "loss_history": metrics["loss_history"], "step_metrics": metrics["step_metrics"],
            "peak_memory_gb": metrics["peak_memory_gb"],
        }
        return StageOutput(metrics=stage_metrics, summary=summary, table=table)


# --------------------------------------------------------------------------------------------
# The training job (runs in process or in every launched worker)


def reward_model_for_training(model_path: str, config: RewardConfig, env: EnvironmentProfile, pad_token_id: int) -> Any:
    """A one-output sequence-classification model, wrapped in a LoRA adapter for lora/qlora."""
    from transformers import AutoModelForSequenceClassification

    from tasks import peft_methods
    from tasks.modeling import torch_dtype

    method = config.method
    kwargs: dict[str, Any] = {"num_labels": 1, "dtype": torch_dtype(env.dtype), "revision": config.revision}
    if isinstance(method, QLoraMethod):
        kwargs["quantization_config"] = peft_methods.bnb_config(method, env)
    if env.attn_implementation:
        kwargs["attn_implementation"] = env.attn_implementation
    model = AutoModelForSequenceClassification.from_pretrained(model_path, **kwargs)
    model.config.pad_token_id = pad_token_id  # the score is read at the last non-pad token
    model.config.use_cache = False
    if not method.is_peft:
        return model
    from peft import get_peft_model, prepare_model_for_kbit_training

    if isinstance(method, QLoraMethod):
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=env.gradient_checkpointing)
    lora = peft_methods.lora_config(method)
    lora.task_type = "SEQ_CLS"  # PEFT then trains and saves the score head in full (modules_to_save)
    return get_peft_model(model, lora)


def train_reward_job(job: dict[str, Any]) -> dict[str, Any]:
    """Train the reward model of a job; returns its metrics (rank 0 also saves it)."""
    import torch
    from datasets import Dataset
    from datasets.utils.logging import disable_progress_bar
    from trl import RewardConfig as TrlRewardConfig
    from trl import RewardTrainer

    from tasks import peft_methods
    from tasks.align.common import conversational_pair, step_history, training_kwargs
    from tasks.align.rewards import pairwise_accuracy
    from tasks.modeling import load_tokenizer
    from tasks.sft.train import fit, is_main_process, loss_history, make_callbacks, peak_memory

    disable_progress_bar()
    config = RewardConfig.model_validate(job["config"])
    env = EnvironmentProfile.model_validate(job["env"])
    tokenizer = load_tokenizer(job["tokenizer_path"])
    torch.manual_seed(config.training.seed)  # the score head is initialised at random
    model = reward_model_for_training(job["model_path"], config, env, tokenizer.pad_token_id)
    before = pairwise_accuracy(model.eval(), tokenizer, job["heldout"])
    args = TrlRewardConfig(
        **training_kwargs(config.training, env, job["checkpoint_dir"]),
        max_length=config.max_length,
        center_rewards_coefficient=config.center_rewards_coefficient,
        disable_dropout=True,
    )
    trainer = RewardTrainer(
        model=model.train(),
        args=args,
        train_dataset=Dataset.from_list([conversational_pair(p) for p in job["train"]]),
        processing_class=tokenizer,
        callbacks=make_callbacks(model, config.method, "reward"),
    )
    trainable, total = peft_methods.count_parameters(trainer.model)
    metrics = fit(trainer, job["checkpoint_dir"])
    after = pairwise_accuracy(trainer.model.eval(), tokenizer, job["heldout"])
    if is_main_process():
        save_reward_model(trainer.model, tokenizer, Path(job["output_dir"]) / job["save_to"], merge=job["merge"])
    metrics.update(
        {
            "heldout_before": before, "heldout_after": after, "train_pairs": len(job["train"]),
            "trainable_parameters": trainable, "total_parameters": total,
            "loss_history": loss_history(trainer), "step_metrics": step_history(trainer.state.log_history, STEP_METRICS),
            **peak_memory(),
        }
    )
    return metrics


def save_reward_model(model: Any, tokenizer: Any, dest: Path, *, merge: bool) -> None:
    """The adapter (or, merged / full, the whole model) with its tokenizer, written atomically."""
    tmp = dest.with_name(dest.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    if merge and hasattr(model, "merge_and_unload"):
        model = model.merge_and_unload()
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    tmp.rename(dest)
