"""One align run: a JSON-able job in (like the sft job), the aligned adapter and metrics out.

Runs in the stage's process or in every worker of a launch (tasks/launcher.py). Trainer-based
methods checkpoint into the job's `checkpoint_dir` and resume from the last checkpoint.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from tunepipe.schemas.align import ONLINE_METHODS, PAIRWISE_METHODS, AlignConfig
from tunepipe.schemas.environment import EnvironmentProfile


def self_checks(method: str, config: AlignConfig, trainer: Any, metrics: dict[str, Any], history: list[dict[str, float]]) -> dict[str, Any]:
    """`steps` for the Trainer-based methods; `loss` (finite, moved) for the pairwise ones, whose
    loss moves from its first step (GRPO/RLOO losses are legitimately 0 while advantages are)."""
    from tunepipe.tasks.training import checks

    if method == "ppo":
        return {}
    requested = int(config.training.max_steps or trainer.state.max_steps)
    out = {"steps": checks.require(
        "steps", checks.steps_check(metrics["global_step"], requested),
        f"align ({method}) ran {metrics['global_step']} optimizer steps of the {requested} requested",
    )}
    if method in PAIRWISE_METHODS:
        loss = checks.loss_check(history, metrics.get("train_loss"))
        out["loss"] = checks.require(
            "loss", loss, f"align ({method}): the loss is {'not finite' if not loss['finite'] else 'constant'} "
            f"(first {loss['first']}, last {loss['last']})",
        )
    return out


def align_job(job: dict[str, Any]) -> dict[str, Any]:
    """Train one policy; returns its metrics (rank 0 also saves the adapter)."""
    from datasets.utils.logging import disable_progress_bar
    from tunepipe.tasks.align import ppo
    from tunepipe.tasks.align.policy import load_policy, save_policy
    from tunepipe.tasks.align.preferences import on_policy_pairs
    from tunepipe.tasks.align.trainers import (
        GROUP_STEP_METRICS,
        PAIRWISE_STEP_METRICS,
        group_trainer,
        pairwise_trainer,
    )
    from tunepipe.tasks.training import peft_methods
    from tunepipe.tasks.training.judge import CachedJudge
    from tunepipe.tasks.training.plots import step_history
    from tunepipe.tasks.training.reward_model import load_reward_model
    from tunepipe.tasks.training.trainer import (
        fit,
        is_main_process,
        loss_history,
        make_callbacks,
        peak_memory,
        seed_everything,
        training_kwargs,
    )

    disable_progress_bar()
    config = AlignConfig.model_validate(job["config"])
    env = EnvironmentProfile.model_validate(job["env"])
    method = config.method
    seed_everything(config.training.seed)
    model, tokenizer = load_policy(job, config, env)
    reward = load_reward_model(job["reward_dir"], env.dtype) if job.get("reward_dir") else None
    base_args = training_kwargs(config.training, env, job["checkpoint_dir"])
    callbacks = make_callbacks(model, None, f"align ({method.name})")
    extra: dict[str, Any] = {}
    judge = CachedJudge(config.judge, job["judge_cache"]) if config.uses_judge() else None

    if method.name in PAIRWISE_METHODS:
        pairs = job["train_pairs"]
        if config.preferences.source == "on_policy":
            pairs, extra["on_policy"] = on_policy_pairs(
                model, tokenizer, job["prompts"], config.preferences, reward, config.training.seed, judge
            )
            if is_main_process():
                Path(job["pairs_file"]).write_text("".join(json.dumps(p) + "\n" for p in pairs))
            if not pairs:
                from tunepipe.tasks.core.stage import StageFailed

                raise StageFailed(
                    f"align: on-policy sampling gave no preference pair from {extra['on_policy']['prompts']} prompts (all "
                    f"{config.preferences.k} samples of every prompt scored the same): raise preferences.k or "
                    "temperature, or use another scorer"
                )
        trainer = pairwise_trainer(config, model, tokenizer, pairs, base_args, callbacks)
        keys = PAIRWISE_STEP_METRICS
        extra["train_pairs"] = len(pairs)
    elif method.name == "ppo":
        trainer = ppo.ppo_trainer(config, env, model, tokenizer, job["prompts"], base_args, callbacks, reward)
        keys = ppo.STEP_METRICS
    else:
        assert method.name in ONLINE_METHODS
        trainer = group_trainer(config, model, tokenizer, job["prompts"], base_args, callbacks, reward, judge)
        keys = GROUP_STEP_METRICS
    policy = trainer.policy_model if method.name == "ppo" else trainer.model
    trainable, total = peft_methods.count_parameters(policy)
    metrics = ppo.train_ppo(trainer) if method.name == "ppo" else fit(trainer, job["checkpoint_dir"])
    metrics["checks"] = self_checks(method.name, config, trainer, metrics, loss_history(trainer))
    if is_main_process():
        save_policy(policy, tokenizer, Path(job["output_dir"]) / job["save_to"])
    if judge is not None:
        extra["judge"] = judge.stats()
    metrics.update(
        {
            **extra,
            "prompts": len(job.get("prompts") or []),
            "world_size": int(trainer.args.world_size),
            "trainable_parameters": trainable,
            "total_parameters": total,
            "loss_history": loss_history(trainer),
            "step_metrics": step_history(trainer.state.log_history, keys),
            **peak_memory(),
        }
    )
    return metrics
