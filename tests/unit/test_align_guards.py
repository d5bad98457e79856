"""Guards against alignment that fools itself (no models): the reward model's calibration, the
aligned-vs-SFT verdict (reward up with the task metric down is not better), on-policy ranking."""

from __future__ import annotations

import math

import pytest

from tunepipe.schemas.align import AlignConfig
from tunepipe.tasks.align.evaluation import verdict
from tunepipe.tasks.align.preferences import empty_counts, rank, require_pairs
from tunepipe.tasks.core.stage import StageFailed
from tunepipe.tasks.lm.checks import reward_moved_check, reward_variance_check
from tunepipe.tasks.lm.reward_model import calibration


def test_calibration_of_sigmoid_margins():
    # p = 0.75 on four pairs, three right: calibrated (ECE 0); Brier (3 * 0.25^2 + 0.75^2) / 4.
    assert calibration([math.log(3)] * 3 + [-math.log(3)]) == {"ece": 0.0, "brier": 0.1875}
    # Right on half the pairs while claiming ~100%: ECE ~0.5.
    assert calibration([20.0, -20.0] * 5)["ece"] == pytest.approx(0.5, abs=1e-4)
    assert calibration([20.0] * 4) == {"ece": 0.0, "brier": 0.0}
    assert calibration([]) == {"ece": None, "brier": None}


def _task(sft_f1: float, aligned_f1: float, tolerance: float = 0.05, **reward) -> dict:
    return {"sft": {"token_f1": sft_f1}, "aligned": {"token_f1": aligned_f1}, "kl_to_sft": 0.3,
            "task_metric_within_tolerance": sft_f1 - aligned_f1 <= tolerance, **reward}


def test_reward_up_with_task_metric_down_is_not_better():
    config = AlignConfig.model_validate({"method": "dpo"})
    hacked = verdict(config, _task(0.688, 0.313, sft_reward_mean=-0.2, aligned_reward_mean=1.4), {})
    assert hacked["objective"] == "held-out reward-model score" and hacked["objective_improved"] is True
    assert hacked["better_than_sft"] is False and hacked["task_metric_within_tolerance"] is False
    assert "token_f1 0.688 -> 0.313 fell beyond align.task_tolerance 0.05" in hacked["reason"]
    good = verdict(config, _task(0.688, 0.67, sft_reward_mean=-0.2, aligned_reward_mean=0.4), {})
    assert good["better_than_sft"] is True and good["reason"].startswith("better: held-out reward-model score -0.2 -> 0.4")
    flat = verdict(config, _task(0.688, 0.70, sft_reward_mean=0.4, aligned_reward_mean=0.4), {})
    assert flat["better_than_sft"] is False and "did not rise" in flat["reason"]
    # Without a reward model, DPO's objective is held-out preference accuracy.
    prefs = verdict(config, _task(0.5, 0.5), {"sft_accuracy": 0.4, "aligned_accuracy": 0.7})
    assert prefs["objective"] == "held-out preference accuracy" and prefs["better_than_sft"] is True
    # No task metric measured: a reward gain alone is not enough.
    blind = verdict(config, {"sft_reward_mean": 0.0, "aligned_reward_mean": 1.0}, {})
    assert blind["better_than_sft"] is False and "task metric was not measured" in blind["reason"]


def test_grpo_objective_is_its_weighted_rule_rewards():
    config = AlignConfig.model_validate({"method": {"name": "grpo", "rewards": ["token_f1", "triple_format"], "reward_weights": [1.0, 0.5]}})
    task = _task(0.3, 0.35, rule_rewards={"token_f1": {"sft": 0.3, "aligned": 0.35}, "triple_format": {"sft": 0.8, "aligned": 1.0}})
    v = verdict(config, task, {})
    assert v["objective"] == "held-out reward (token_f1 + triple_format)"
    assert (v["sft"], v["aligned"]) == (0.7, 0.85) and v["better_than_sft"] is True


def test_grpo_objective_with_a_reward_model_among_its_rewards_is_the_whole_weighted_sum():
    # The quickstart's GRPO run (token_f1 + 0.05 x reward model): the reward model's score rose 2.67 -> 4.84 while
    # token F1 fell 0.3698 -> 0.3646; the objective is what the run optimised, both parts weighted.
    config = AlignConfig.model_validate({"method": {"name": "grpo", "rewards": ["token_f1", "reward_model"], "reward_weights": [1.0, 0.05]}})
    task = _task(0.3698, 0.3646, rule_rewards={"token_f1": {"sft": 0.3698, "aligned": 0.3646}},
                 sft_reward_mean=2.6703, aligned_reward_mean=4.8404)
    v = verdict(config, task, {})
    assert v["objective"] == "held-out reward (token_f1 + reward_model)"
    assert (v["sft"], v["aligned"]) == (round(0.3698 + 0.05 * 2.6703, 4), round(0.3646 + 0.05 * 4.8404, 4))
    # With the reward model weighted so it dominates, a falling rule reward no longer decides it; at a small
    # weight a big enough rule drop does.
    small = AlignConfig.model_validate({"method": {"name": "grpo", "rewards": ["token_f1", "reward_model"], "reward_weights": [1.0, 0.001]}})
    assert verdict(small, task, {})["objective_improved"] is False


def test_rank_drops_identical_samples_ties_and_small_margins():
    assert rank(["a", "a", "a"], [1.0, 1.0, 1.0], 0.0) == "identical"
    assert rank(["a", "b", "c"], [0.0, 0.0, 0.0], 0.0) == "tie"
    # The best's duplicate does not count twice; ties at the top go to the first sample.
    assert rank(["b", "a", "b", "c"], [0.5, 1.0, 0.5, 1.0], 0.0) == (1, 0)
    assert rank(["a", "b"], [0.6, 0.5], 0.2) == "below_margin"
    assert rank(["a", "b"], [0.9, 0.5], 0.2) == (0, 1)


def test_no_pair_names_the_task_its_counts_and_what_to_change():
    config = AlignConfig.model_validate({"method": "dpo", "preferences": {"source": "on_policy", "temperature": 1.0}})
    sentiment = {**empty_counts(), "prompts": 256, "samples": 1280, "distinct": 1270, "ties": 250, "identical": 6, "tied_scores": {"0": 250}}
    counts = {"prompts": 256, "pairs": 0, "per_task": {"sentiment": sentiment}}
    with pytest.raises(StageFailed) as failure:
        require_pairs("sentiment", config, counts)
    message = str(failure.value)
    assert message.startswith(
        "align (sentiment): on-policy sampling gave no preference pair: sentiment: 256 prompts, 1280 samples (1270 distinct), "
        "6 with identical samples, 250 ties (at score 0: 250), 0 pairs."
    ), message
    assert "at temperature 1.0 all earn the same score from rule token_f1 (0: too weak" in message
    assert "Lower preferences.temperature" in message and "raise preferences.k (4)" in message
    require_pairs("sentiment", config, {**counts, "pairs": 3})  # any pair: no failure


def test_reward_signal_checks():
    assert not reward_variance_check([1.0, 1.0, 0.5], 0.8)["passed"]
    assert reward_variance_check([1.0, 0.5, 0.5], 0.8) == {"passed": True, "mean_zero_std_fraction": 0.6667, "max_allowed": 0.8, "steps": 3}
    assert not reward_moved_check([0.0, 0.0, 0.0], 1e-6)["passed"]
    assert reward_moved_check([0.1, 0.0, 0.3], 1e-6)["passed"]


def test_dpo_whose_own_preference_accuracy_fell_is_not_better_whatever_the_reward_model_says():
    # The run: the reward model's score rose, held-out preference accuracy fell 0.875 -> 0.81.
    config = AlignConfig.model_validate({"method": "dpo"})
    task = _task(0.70, 0.70, sft_reward_mean=0.1, aligned_reward_mean=0.6)
    fell = verdict(config, task, {"sft_accuracy": 0.875, "aligned_accuracy": 0.81})
    assert fell["objective"] == "held-out reward-model score" and fell["objective_improved"] is True
    assert fell["better_than_sft"] is False and fell["preference_accuracy_fell"] is True
    assert "held-out preference accuracy fell (0.875 -> 0.81" in fell["reason"]
    # held or risen: better; a tolerance lets a small fall through
    assert verdict(config, task, {"sft_accuracy": 0.875, "aligned_accuracy": 0.875})["better_than_sft"] is True
    tolerant = AlignConfig.model_validate({"method": "dpo", "preference_tolerance": 0.1})
    assert verdict(tolerant, task, {"sft_accuracy": 0.875, "aligned_accuracy": 0.81})["better_than_sft"] is True
    # GRPO does not train on preference pairs: its pairs' accuracy does not decide its verdict
    grpo = AlignConfig.model_validate({"method": {"name": "grpo", "rewards": ["reward_model"]}})
    assert verdict(grpo, task, {"sft_accuracy": 0.875, "aligned_accuracy": 0.5})["preference_accuracy_fell"] is False
