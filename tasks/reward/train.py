"""The reward training job: a sequence-classification model with TRL's `RewardTrainer`, in the
stage's process or in every worker of a launch.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

from pydantic import Field
from tunepipe.schemas.environment import EnvironmentProfile
from tunepipe.schemas.jobs import TrainingJob
from tunepipe.schemas.reward import RewardConfig
from tunepipe.tasks.training.hardware import hardware
from tunepipe.schemas.methods import QLoraMethod
from tunepipe.tasks.lm import checks
from tunepipe.tasks.lm.modeling import load_tokenizer, torch_dtype
from tunepipe.tasks.lm.pairs import conversational_pair
from tunepipe.tasks.lm.reward_model import pair_scores, pairwise_summary
from tunepipe.tasks.training import peft_methods
from tunepipe.tasks.training.plots import step_history
from tunepipe.tasks.training.trainer import loss_history

STEP_METRICS = {"loss": "loss", "accuracy": "train_accuracy", "margin": "train_margin", "mean_reward": "mean_reward"}


class RewardJob(TrainingJob):
    """The reward stage's one training run, as it crosses the launcher."""

    config: RewardConfig
    model_path: str = Field(description="The model the reward model starts from.")
    tokenizer_path: str = Field(description="Where its tokenizer loads from.")
    train: list[dict[str, Any]] = Field(description="Train preference pairs.")
    heldout: list[dict[str, Any]] = Field(description="Held-out preference pairs (may be empty).")
    save_to: str = Field(description="The result's directory under output_dir.")
    merge: bool = Field(description="Save the adapter merged into a plain sequence-classification model.")


def reward_model_for_training(model_path: str, config: RewardConfig, env: EnvironmentProfile, pad_token_id: int) -> Any:
    """A one-output sequence-classification model, wrapped in a LoRA adapter for lora/qlora."""
    from transformers import AutoModelForSequenceClassification

    method, hw = config.method, hardware(env)
    kwargs: dict[str, Any] = {"num_labels": 1, "dtype": torch_dtype(hw.dtype), "revision": config.revision}
    if isinstance(method, QLoraMethod):
        kwargs["quantization_config"] = peft_methods.bnb_config(method, env)
    if attention := hw.attention(padding_free=False):
        kwargs["attn_implementation"] = attention
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


CHECK_TRAIN_PAIRS = 16  # training pairs the reward_scores check scores when no pair is held out


def self_checks(config: RewardConfig, trainer: Any, metrics: dict[str, Any], scores_before: tuple, scores_after: tuple,
                on: str) -> dict[str, Any]:
    """`steps`, `loss` (finite, moved) and `reward_scores` (the trained model scores the pairs differently)."""
    policy = checks.CheckPolicy("reward", config.self_checks)
    out = {
        "steps": checks.require_steps("reward", metrics["global_step"], trainer, config.training.max_steps, policy),
        "loss": checks.require_loss("reward: the loss", loss_history(trainer), metrics.get("train_loss"), policy=policy),
    }
    scores = checks.reward_scores_check(scores_before, scores_after, on)
    out["reward_scores"] = checks.require(
        "reward_scores", scores, f"reward: the trained model scores the {scores['pairs']} {on} pairs exactly as the untrained "
        "one did: nothing was learned (check the learning rate, and that the score head and adapter are trainable)", policy,
    )
    return out


def train_reward_job(job: RewardJob) -> dict[str, Any]:
    """Train the reward model of a job; returns its metrics (rank 0 also saves it)."""
    from datasets import Dataset
    from datasets.utils.logging import disable_progress_bar
    from trl import RewardConfig as TrlRewardConfig
    from trl import RewardTrainer
    from tunepipe.tasks.training.trainer import (  # looked up per call: tests replace make_callbacks
        fit,
        is_main_process,
        loss_history,
        make_callbacks,
        peak_memory,
        seed_everything,
        training_kwargs,
    )

    disable_progress_bar()
    config, env = job.config, job.env
    tokenizer = load_tokenizer(job.tokenizer_path)
    seed_everything(config.training.seed)  # the score head is initialised at random
    model = reward_model_for_training(job.model_path, config, env, tokenizer.pad_token_id)
    # Scored before and after training: held-out accuracy, and the reward_scores self-check (on a few
    # training pairs when nothing is held out).
    check_on = "heldout" if job.heldout else "train"
    check_pairs = job.heldout or job.train[:CHECK_TRAIN_PAIRS]
    scores_before = pair_scores(model.eval(), tokenizer, check_pairs)
    before = pairwise_summary(*scores_before) if job.heldout else pairwise_summary([], [])
    args = TrlRewardConfig(
        **training_kwargs(config.training, env, job.checkpoint_dir),
        max_length=config.max_length,
        center_rewards_coefficient=config.center_rewards_coefficient,
        disable_dropout=True,
    )
    trainer = RewardTrainer(
        model=model.train(),
        args=args,
        train_dataset=Dataset.from_list([conversational_pair(p, tokenizer) for p in job.train]),
        processing_class=tokenizer,
        callbacks=make_callbacks(model, config.method, "reward"),
    )
    trainable, total = peft_methods.count_parameters(trainer.model)
    metrics = fit(trainer, job.checkpoint_dir)
    scores_after = pair_scores(trainer.model.eval(), tokenizer, check_pairs)
    after = pairwise_summary(*scores_after) if job.heldout else pairwise_summary([], [])
    checks = self_checks(config, trainer, metrics, scores_before, scores_after, check_on)
    if is_main_process():
        save_reward_model(trainer.model, tokenizer, Path(job.output_dir) / job.save_to, merge=job.merge)
    metrics.update(
        {
            "heldout_before": before, "heldout_after": after, "train_pairs": len(job.train),
            "trainable_parameters": trainable, "total_parameters": total,
            "loss_history": loss_history(trainer), "step_metrics": step_history(trainer.state.log_history, STEP_METRICS),
            "checks": checks,
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
