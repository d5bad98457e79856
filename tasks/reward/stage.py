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

from tunepipe.schemas.handoffs import ModelOutputs
from tunepipe.schemas.reward import RewardConfig
from tunepipe.schemas.methods import QLoraMethod
from tunepipe.tasks.reward.train import RewardJob
from tunepipe.tasks.core.handoff import read_handoff, write_handoff
from tunepipe.tasks.core.stage import StageContext, StageFailed, StageOutput
from tunepipe.tasks.lm.checks import warned_markdown
from tunepipe.tasks.lm.modeling import load_model, load_tokenizer, model_dir
from tunepipe.tasks.lm.pairs import read_pairs, split_pairs
from tunepipe.tasks.training.launcher import run_training
from tunepipe.tasks.training.memory_plan import check_fit
from tunepipe.tasks.training.plots import plot_loss, plot_series
from tunepipe.tasks.training.stage_base import TrainingStage
from tunepipe.tasks.training.trainer import write_json

ENTRYPOINT = "tunepipe.tasks.reward.train:train_reward_job"


def merge_adapter(base: str, adapter_dir: str | Path, dest: Path) -> str:
    """The base with an SFT adapter merged in, saved (with the adapter's tokenizer) to `dest`."""
    from peft import PeftModel

    if (dest / "config.json").exists():
        return str(dest)
    tmp = dest.with_name(dest.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    merged = PeftModel.from_pretrained(load_model(base), str(adapter_dir)).merge_and_unload()
    merged.save_pretrained(tmp)
    load_tokenizer(str(adapter_dir)).save_pretrained(tmp)
    tmp.rename(dest)
    return str(dest)


def start_point(config: RewardConfig, ctx: StageContext) -> tuple[str, str, str | None]:
    """(model path, tokenizer path, SFT adapter to merge into the model or None): where the reward model
    starts, read from the configs and handoffs only (nothing loaded), so the memory plan can run first."""
    if config.model:
        model = model_dir(config.model)
        return model, model, None
    sft = ctx.inputs.get("sft")
    if config.start_from == "sft" and sft is not None:
        outputs = read_handoff(sft, ModelOutputs, reader="reward")
        first = str(Path(sft.path) / next(iter(outputs.paths.values())))
        if outputs.kind == "model":
            return first, first, None
        if outputs.kind == "adapter":
            if isinstance(config.method, QLoraMethod):
                raise StageFailed(
                    "reward: start_from sft merges the SFT adapter into its base, and a 4-bit (qlora) reward model on "
                    "that merge cannot be saved: use reward.method lora or full, or reward.start_from base"
                )
            return outputs.base_model, first, first
        return outputs.base_model, first, None  # per-task adapters: no single SFT policy to start from
    for name in ("pretrain", "base_model"):
        if name in ctx.inputs:
            return ctx.inputs[name].path, ctx.inputs[name].path, None
    if sft is not None:
        base = read_handoff(sft, ModelOutputs, reader="reward").base_model
        return base, base, None
    raise StageFailed("reward: no model to start from: set reward.model, or give the stage an sft, pretrain or base_model input")


def resolve_start(config: RewardConfig, ctx: StageContext) -> tuple[str, str, bool]:
    """(model path, tokenizer path, merged): where the reward model starts.

    `merged` is True when an SFT adapter was merged into a temporary copy of its base; the result
    is then saved as a full model, since nothing else keeps that merged base.
    """
    model, tokenizer, adapter = start_point(config, ctx)
    if adapter is None:
        return model, tokenizer, False
    merged = merge_adapter(model, adapter, ctx.checkpoint_dir / "sft-merged")
    return merged, merged, True


def require_min_accuracy(config: RewardConfig, heldout: dict, train_pairs: int) -> None:
    """StageFailed when the held-out pairwise accuracy is below `reward.min_accuracy` (or unmeasured)."""
    if config.min_accuracy is None:
        return
    if not heldout["n"]:
        raise StageFailed(
            f"reward: no held-out preference pairs to check reward.min_accuracy {config.min_accuracy} on: give the data "
            "stage validation/test pairs (or pairs without a split: reward.heldout_fraction), or set reward.min_accuracy: null"
        )
    if heldout["accuracy"] < config.min_accuracy:
        raise StageFailed(
            f"reward: held-out pairwise accuracy {heldout['accuracy']} (n={heldout['n']}; ECE {heldout['ece']}, Brier "
            f"{heldout['brier']}) is below reward.min_accuracy {config.min_accuracy}: a policy optimised against this "
            f"reward model would learn what it gets wrong. Train it longer or on more than {train_pairs} pairs, start "
            "from a stronger model (reward.start_from: sft), or lower reward.min_accuracy knowingly"
        )


class RewardStage(TrainingStage):
    """Reward model on preference pairs (LoRA/QLoRA adapter with a score head, or full)."""

    name = "reward"
    config_model = RewardConfig
    resumable = True

    def run(self, config: RewardConfig, ctx: StageContext) -> StageOutput:
        data_dir = ctx.inputs["data"].path
        train, heldout = split_pairs(read_pairs(data_dir, "reward", config.tasks), config.heldout_fraction)
        if not train:
            raise StageFailed(f"reward: all {len(heldout)} preference pairs in {data_dir} are held out: none left to train on")
        # The plan reads the starting model's config only: a run that cannot fit is refused before the SFT merge
        # or the training process loads any weights.
        plan = check_fit(start_point(config, ctx)[0], config.method, ctx.env, config.max_length, config.training,
                         stage="reward")
        model_path, tokenizer_path, merged = resolve_start(config, ctx)
        save_to = "model" if merged or not config.method.is_peft else "adapter"
        ctx.logger.info("reward: %s from %s on %d pairs (%d held out), ~%.2f GiB per device", config.method.name, model_path,
                        len(train), len(heldout), plan["memory"]["total_gb"])

        done_file = ctx.checkpoint_dir / "reward.metrics.json"
        if done_file.exists() and (ctx.staging_dir / save_to).exists():
            metrics = json.loads(done_file.read_text())
        else:
            job = RewardJob(
                config=config, env=ctx.env, model_path=model_path, tokenizer_path=tokenizer_path, train=train,
                heldout=heldout, output_dir=str(ctx.staging_dir), save_to=save_to, merge=merged,
                checkpoint_dir=str(ctx.checkpoint_dir / "trainer"),
            )
            metrics = run_training(ENTRYPOINT, job, ctx.env, ctx.logger, ctx.checkpoint_dir / "launch")
            ctx.checkpoint_dir.mkdir(parents=True, exist_ok=True)
            write_json(done_file, metrics)

        require_min_accuracy(config, metrics["heldout_after"], len(train))
        outputs = ModelOutputs(
            kind="adapter" if save_to == "adapter" else "model",
            method=config.method.name,
            # An adapter loads onto this base; a full model (incl. a merged SFT start) needs none.
            base_model=None if merged else model_path,
            paths={"all": save_to},
        )
        write_handoff(ctx.staging_dir, outputs)
        write_json(ctx.staging_dir / "metrics.json", metrics)
        plot_loss(metrics["loss_history"], ctx.staging_dir / "loss_curve.png", f"reward ({config.method.name})")
        plot_series(metrics["step_metrics"], ctx.staging_dir / "metrics.png", "reward model: per step")
        before, after = metrics["heldout_before"], metrics["heldout_after"]
        ctx.logger.info("reward: held-out pairwise accuracy %s → %s (n=%d)", before["accuracy"], after["accuracy"], after["n"])
        summary = (
            f"Reward model (**{config.method.name}**) on {len(train)} preference pairs: held-out pairwise accuracy "
            f"**{after['accuracy']}** (untrained head: {before['accuracy']}; n={after['n']}, chance 0.5), "
            f"mean margin {after['margin']}; calibration of sigmoid(margin): ECE {after['ece']}, Brier {after['brier']} "
            f"(minimum accuracy to publish: {config.min_accuracy})."
        ) + warned_markdown(metrics["checks"])
        table = [
            {"when": "before", **before},
            {"when": "after", **after, "steps": metrics["global_step"], "train_loss": metrics["train_loss"]},
        ]
        stage_metrics = {
            "method": config.method.name, "kind": outputs.kind, "train_pairs": len(train), "heldout_pairs": len(heldout),
            "heldout_accuracy": after["accuracy"], "heldout_accuracy_before": before["accuracy"],
            "heldout_margin": after["margin"], "heldout_ece": after["ece"], "heldout_brier": after["brier"],
            "min_accuracy": config.min_accuracy, "global_step": metrics["global_step"], "train_loss": metrics["train_loss"],
            "trainable_parameters": metrics["trainable_parameters"], "total_parameters": metrics["total_parameters"],
            "loss_history": metrics["loss_history"], "step_metrics": metrics["step_metrics"],
            "peak_memory_gb": metrics["peak_memory_gb"], "world_size": metrics["world_size"], "checks": metrics["checks"],
        }
        return StageOutput(metrics=stage_metrics, summary=summary, table=table)
