"""RL that cannot silently do nothing: planted failure modes of the reward-driven align methods.

A GRPO run whose rule reward is constant (a one-token completion can never be a `(a, rel, b)`
triple, so `triple_format` is 0 for every sample) has zero reward variance in every
group, so zero advantages and zero gradients: the stage must fail naming the task and the cause,
and, with the weak-signal checks set to warn, still refuse to publish an adapter identical to
SFT's. With a reward model (distinct samples, distinct scores) the RLOO step metrics carry TRL's
own per-step logs (frac_reward_zero_std, per-reward means, KL) and every check passes.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch

from tunepipe.schemas.align import AlignConfig
from tunepipe.schemas.reward import RewardConfig
from tunepipe.tasks.align.stage import AlignStage
from tunepipe.tasks.core.stage import StageFailed, run_stage
from tunepipe.tasks.reward.stage import RewardStage
from tests.helpers.alignment import build_assets, data_with_pairs, env, pairs_against_sft

torch.set_num_threads(1)

CONSTANT_REWARD = {
    "method": {"name": "grpo", "num_generations": 2, "max_completion_length": 1, "rewards": ["triple_format"]},
    "max_prompts": 4, "max_length": 64,
    "heldout": {"max_examples_per_task": 0, "max_pairs": 0},
    "training": {"max_steps": 2, "learning_rate": 1e-2, "warmup_ratio": 0.0},
}


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    return build_assets(tmp_path_factory.mktemp("align-checks"))


def _align(assets, config: dict):
    ref = run_stage(AlignStage(), AlignConfig.model_validate(config), {"data": assets["data"], "sft": assets["sft"]}, assets["store"], env())
    return ref, json.loads((Path(ref.path) / "manifest.json").read_text())["metrics"]


def test_constant_rule_reward_fails_naming_task_and_cause(assets):
    with pytest.raises(StageFailed) as failure:
        _align(assets, CONSTANT_REWARD)
    message = str(failure.value)
    assert message.startswith("self-check reward_variance failed: align (all, grpo): policy too weak"), message
    assert "100% of groups had identical rewards over 2 steps" in message
    assert "lower align.method.temperature (1.0; e.g. 0.3 for a near-uniform policy), raise num_generations (2)" in message


def test_unchanged_adapter_fails_even_when_weak_signal_only_warns(assets, caplog):
    config = {**CONSTANT_REWARD, "checks": {"on_weak_signal": "warn"}}
    with caplog.at_level(logging.WARNING, logger="tunepipe.align"), pytest.raises(StageFailed) as failure:
        _align(assets, config)
    message = str(failure.value)
    assert message.startswith("self-check adapter_changed failed: align (all, grpo): the trained adapter is identical"), message
    assert "every gradient was zero" in message
    warned = [r.getMessage() for r in caplog.records]
    assert any("self-check reward_variance failed (configured to warn)" in w for w in warned), warned
    assert any("self-check reward_moved failed (configured to warn)" in w for w in warned), warned


@pytest.fixture(scope="module")
def reward(assets):
    """A reward model: its scores differ between distinct samples, so groups have reward variance."""
    config = RewardConfig.model_validate(
        {"model": str(assets["model"]), "method": {"name": "lora", "r": 4}, "max_length": 64, "min_accuracy": None,
         "training": {"max_steps": 4, "learning_rate": 1e-2, "warmup_ratio": 0.0}}
    )
    data = data_with_pairs(assets, "data-pairs", pairs_against_sft(assets))
    return run_stage(RewardStage(), config, {"data": data}, assets["store"], env())


def test_rloo_with_a_varying_reward_reports_trl_step_metrics_and_passes(assets, reward):
    ref = run_stage(
        AlignStage(),
        AlignConfig.model_validate(
            {"method": {"name": "rloo", "num_generations": 2, "max_completion_length": 4, "rewards": ["reward_model", "token_f1"]},
             "max_prompts": 4, "max_length": 64,
             "heldout": {"max_examples_per_task": 2, "max_pairs": 0, "max_new_tokens": 4},
             "training": {"max_steps": 2, "learning_rate": 1e-2, "warmup_ratio": 0.0}}
        ),
        {"data": assets["data"], "sft": assets["sft"], "reward": reward}, assets["store"], env(),
    )
    m = json.loads((Path(ref.path) / "manifest.json").read_text())["metrics"]
    steps = m["step_metrics"]["all"]
    expected = {"loss", "reward_mean", "reward_std", "frac_reward_zero_std", "kl", "entropy", "reward_reward_model_mean", "reward_token_f1_mean"}
    assert expected <= set(steps), sorted(steps)
    assert all(len(steps[k]) == 2 for k in expected)
    assert all(p["value"] == 0.0 for p in steps["frac_reward_zero_std"])  # distinct samples, distinct scores
    checks = m["checks"]["all"]
    assert checks["reward_variance"] == {"passed": True, "mean_zero_std_fraction": 0.0, "max_allowed": 0.8, "steps": 2}
    assert checks["reward_moved"]["passed"] and checks["adapter_changed"]["tensors_changed"] > 0
    # The objective on held-out prompts: the weighted sum of the run's rewards (token F1 + the reward model's score,
    # weights 1), next to the task metric and KL.
    task, verdict = m["heldout"]["all"]["task"], m["verdict"]["all"]
    assert verdict["objective"] == "held-out reward (token_f1 + reward_model)"
    assert (verdict["sft"], verdict["aligned"]) == tuple(
        round(task["rule_rewards"]["token_f1"][w] + task[f"{w}_reward_mean"], 4) for w in ("sft", "aligned")
    )
    assert verdict["kl_to_sft"] == task["kl_to_sft"] and "rule_rewards" in task
    # The expected rule reward over samples drawn as the rollouts were (default 4 per prompt, temperature 1.0).
    sampled = task["sampled_rule_rewards"]
    assert sampled["sampling"] == {"samples_per_prompt": 4, "temperature": 1.0}
    assert all(0.0 <= sampled["token_f1"][w] <= 1.0 for w in ("sft", "aligned")) and "reward_model" not in sampled
    assert verdict["sampled_objective"]["objective"] == "sampled reward (token_f1, temperature 1.0)"
    assert verdict["better_than_sft"] == (verdict["aligned"] > verdict["sft"] and task["task_metric_within_tolerance"])
    assert (Path(ref.path) / "metrics.png").read_bytes()[:4] == b"\x89PNG"


ON_POLICY = {"method": {"name": "dpo", "beta": 0.5}, "max_length": 64, "heldout": {"max_examples_per_task": 0, "max_pairs": 0},
             "training": {"max_steps": 1, "learning_rate": 1e-2, "warmup_ratio": 0.0}}


def test_on_policy_without_a_pair_names_the_task_its_counts_and_the_fix(assets):
    # One token is never a `(a, rel, b)` triple: every answer scores 0, so no prompt gives a pair.
    config = {**ON_POLICY, "preferences": {"source": "on_policy", "scorer": "rule", "rule": "triple_format", "k": 2,
                                           "max_prompts": 4, "max_new_tokens": 1}}
    with pytest.raises(StageFailed) as failure:
        _align(assets, config)
    message = str(failure.value)
    assert message.startswith("align (all): on-policy sampling gave no preference pair: sentiment: 4 prompts, 12 samples ("), message
    assert message.count(" ties") == 1 and ", 0 pairs. " in message
    assert "from rule triple_format (0: too weak to ever hit the reference)" in message
    assert "Lower preferences.temperature" in message and "raise preferences.k (2)" in message


def test_on_policy_pairs_are_counted_per_task_and_chosen_outscores_rejected(assets, reward):
    config = {**ON_POLICY, "preferences": {"source": "on_policy", "scorer": "reward_model", "k": 2, "max_prompts": 6, "max_new_tokens": 4}}
    ref = run_stage(AlignStage(), AlignConfig.model_validate(config), {"data": assets["data"], "sft": assets["sft"], "reward": reward},
                    assets["store"], env())
    m = json.loads((Path(ref.path) / "manifest.json").read_text())["metrics"]
    counts = m["on_policy"]["all"]
    pairs = [json.loads(line) for line in (Path(ref.path) / "preferences.on_policy.jsonl").read_text().splitlines()]
    assert counts["prompts"] == 6 and counts["samples"] == 6 * 3  # the greedy answer + k samples
    assert counts["pairs"] == len(pairs) > 0 and counts["pairs"] + counts["no_preference"] == 6
    assert sum(c["pairs"] for c in counts["per_task"].values()) == len(pairs)
    assert all(p["scores"][0] > p["scores"][1] and p["chosen"] != p["rejected"] for p in pairs)
