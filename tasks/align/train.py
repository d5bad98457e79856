"""One align run: a JSON-able job in (like the sft job), the aligned adapter and metrics out.

Runs in the stage's process or in every worker of a launch (tasks/training/launcher.py). The
method's unit (tasks/align/methods/<name>.py) builds and trains its trainer; what is common to
every method (loading the policy, the self-checks, saving) is here. Trainer-based methods
checkpoint into the job's `checkpoint_dir` and resume from the last checkpoint.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from tunepipe.schemas.align import AlignConfig
from tunepipe.tasks.align.job import AlignJob
from tunepipe.tasks.align.methods.units import AlignRun, unit_for
from tunepipe.tasks.lm import checks
from tunepipe.tasks.lm.checks import CheckPolicy
from tunepipe.tasks.lm.judge import CachedJudge
from tunepipe.tasks.lm.reward_model import load_reward_model
from tunepipe.tasks.training.hardware import hardware
from tunepipe.tasks.training.plots import step_history
from tunepipe.tasks.training.trainer import (
    is_main_process,
    loss_history,
    make_callbacks,
    peak_memory,
    seed_everything,
    training_kwargs,
)


def check_policy(config: AlignConfig) -> Any:
    """align.self_checks over the weak-signal checks' shared switch (align.checks.on_weak_signal)."""
    weak = config.checks.on_weak_signal
    return CheckPolicy("align", {"reward_variance": weak, "reward_moved": weak, **config.self_checks})


def self_checks(
    unit: Any, config: AlignConfig, trainer: Any, metrics: dict[str, Any], history: list[dict[str, float]],
    steps: dict[str, list[dict[str, float]]], changed: dict[str, Any], run: str,
) -> dict[str, Any]:
    """The run proves it learned something before it publishes.

    `steps` for the Trainer-based methods; `loss` (finite, moved) for the pairwise ones, whose loss
    moves from its first step (GRPO/RLOO losses are legitimately 0 while advantages are);
    `reward_variance` and `reward_moved` for the reward-driven ones (their signal); and for every
    method `adapter_changed`: the adapter about to be published differs from the one training
    started from. The weak-signal checks fail or warn (`align.checks.on_weak_signal`)."""
    who = f"align ({run}, {config.method.name})"
    policy = check_policy(config)
    out: dict[str, Any] = {}
    if unit.counts_steps:
        out["steps"] = checks.require_steps(who, metrics["global_step"], trainer, config.training.max_steps, policy)
    if config.trains_on_pairs():
        out["loss"] = checks.require_loss(f"{who}: the loss", history, metrics.get("train_loss"), policy=policy)
    else:
        out.update(reward_signal_checks(unit, config, steps, who))
    why = (
        "check training.learning_rate and max_steps" if config.trains_on_pairs() else
        "every gradient was zero: the rewards gave no advantage (see reward_std / frac_reward_zero_std in the step metrics)"
    )
    out["adapter_changed"] = checks.require(
        "adapter_changed", changed,
        f"{who}: the trained adapter is identical to the one training started from (the SFT adapter; "
        f"{changed['tensors']} tensors, none changed): publishing it would call the SFT policy aligned; {why}", policy,
    )
    return out


def weak_signal_advice(unit: Any, config: AlignConfig, earned_nothing: bool) -> str:
    """What to change when the policy's samples all earn the same reward, in this method's knobs.

    A policy whose samples earn nothing is usually near-uniform: its greedy answer may be right
    while its temperature-1 samples are gibberish, so *lowering* the temperature gives it signal
    (measured on the quickstart's sentiment SFT adapter, GRPO with token_f1: temperature 1.0 had
    identical rewards in 100% of groups, 0.3 in 42%, and its reward rose 0.19 -> 0.42 in 6 steps).
    A policy whose samples all earn the same non-zero reward needs more diversity instead."""
    temperature = config.method.temperature
    size = unit.sample_size_knob(config.method)
    if earned_nothing:
        knobs = f"lower align.method.temperature ({temperature}; e.g. 0.3 for a near-uniform policy), raise {size}"
    else:
        knobs = f"raise align.method.temperature ({temperature}) or {size}"
    return f"{knobs}, train SFT longer, or use a finer reward (token_f1, reward_model)"


def reward_signal_checks(unit: Any, config: AlignConfig, steps: dict[str, list[dict[str, float]]], who: str) -> dict[str, Any]:
    """`reward_variance` (groups with identical rewards give no gradient) and `reward_moved`."""
    settings, policy = config.checks, check_policy(config)
    rewards = [p["value"] for p in steps.get("reward_mean", [])]
    zero_std = unit.zero_std_fractions(steps)
    mean_reward = sum(rewards) / len(rewards) if rewards else 0.0
    earned_nothing = abs(mean_reward) < 1e-9
    variance = checks.reward_variance_check(zero_std, settings.max_zero_std_fraction)
    cause = (
        f"policy too weak: its samples earned no reward (mean {mean_reward:.3g})" if earned_nothing
        else f"the reward does not separate the policy's samples (mean reward {mean_reward:.3g})"
    )
    out = {"reward_variance": checks.require(
        "reward_variance", variance,
        f"{who}: {cause}: {100 * (variance['mean_zero_std_fraction'] or 0):.0f}% of groups had identical rewards over "
        f"{variance['steps']} steps (align.checks.max_zero_std_fraction {settings.max_zero_std_fraction}), so they "
        f"gave no gradient; {weak_signal_advice(unit, config, earned_nothing)}",
        policy,
    )}
    moved = checks.reward_moved_check(rewards, settings.min_reward_range)
    if set(config.method.reward_sources()) == {"judge"}:
        # A judge tournament's rewards are shares of comparisons won: every group's mean is 0.5 by
        # construction, whatever the policy does. Only their spread (above) says anything.
        moved = {**moved, "passed": True, "skipped": "judge tournament rewards: every group's mean is 0.5"}
    out["reward_moved"] = checks.require(
        "reward_moved", moved,
        f"{who}: the mean reward never moved ({moved.get('min')} to {moved.get('max')} over {moved['steps']} steps; "
        f"align.checks.min_reward_range {settings.min_reward_range}); {weak_signal_advice(unit, config, earned_nothing)}, or raise "
        "training.learning_rate / max_steps",
        policy,
    )
    return out


def align_job(job: AlignJob) -> dict[str, Any]:
    """Train one policy with its method's unit (tasks/align/methods/); returns its metrics (rank 0
    also saves the adapter)."""
    from datasets.utils.logging import disable_progress_bar
    from tunepipe.tasks.align.policy import load_policy, save_policy  # looked up per call: tests replace load_policy

    disable_progress_bar()
    config, env, name = job.config, job.env, job.run
    unit = unit_for(config.method)
    seed_everything(config.training.seed)
    model, tokenizer = load_policy(job)
    reward = load_reward_model(job.reward_dir, hardware(env).dtype) if job.reward_dir else None
    keys = unit.step_metrics(config.method)
    run = AlignRun(
        config=config, env=env, job=job, model=model, tokenizer=tokenizer,
        base_args=training_kwargs(config.training, env, job.checkpoint_dir),
        callbacks=make_callbacks(model, None, f"align ({name}, {config.method.name})", watch=keys),
        reward=reward, judge=CachedJudge(config.judge, job.judge_cache) if config.uses_judge() else None,
    )
    trainer = unit.build_trainer(run)
    policy = unit.policy(trainer)
    trainable, total = unit.count_parameters(trainer, run)
    started_from = checks.trainable_snapshot(policy)
    metrics = unit.train(trainer, run)
    steps = step_history(trainer.state.log_history, keys)
    changed = checks.parameters_changed_check(started_from, policy)
    history = loss_history(trainer)
    metrics["checks"] = self_checks(unit, config, trainer, metrics, history, steps, changed, name)
    if is_main_process():
        save_policy(policy, tokenizer, Path(job.output_dir) / job.save_to)
    if run.judge is not None:
        run.extra["judge"] = run.judge.stats()
    metrics.update(
        {
            **run.extra,
            "prompts": len(job.prompts),
            "world_size": int(trainer.args.world_size),
            "trainable_parameters": trainable,
            "total_parameters": total,
            "loss_history": history,
            "step_metrics": steps,
            **peak_memory(),
        }
    )
    return metrics
