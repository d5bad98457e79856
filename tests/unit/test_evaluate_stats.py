"""The A/B statistics against values worked out by hand (exact bootstrap distributions of tiny
samples, binomial tails) and against the normal approximation."""

from __future__ import annotations

import math

import pytest

from tunepipe.tasks.evaluate.stats import outcome_from_difference, paired_bootstrap, sign_test, win_rate


def test_win_rate_counts_and_tie_policies():
    outcomes = ["win"] * 6 + ["tie"] * 2 + ["loss"] * 2
    half = win_rate(outcomes, ties="half", n_resamples=500)
    assert (half["wins"], half["ties"], half["losses"], half["n"]) == (6, 2, 2, 10)
    assert half["win_rate"] == pytest.approx((6 + 0.5 * 2) / 10)
    excluded = win_rate(outcomes, ties="exclude", n_resamples=500)
    assert excluded["win_rate"] == pytest.approx(6 / 8)


def test_win_rate_interval_of_a_tiny_sample_matches_its_exact_bootstrap_distribution():
    # Outcomes win, win, loss: a resample's mean is k/3 with k ~ Binomial(3, 2/3):
    # P(0) = 1/27, P(1/3) = 6/27, P(2/3) = 12/27, P(1) = 8/27. The 10th percentile lies in 1/3
    # (CDF 0.037 → 0.259) and the 90th in 1 (CDF at 2/3 is 0.704): the 80% interval is [1/3, 1].
    result = win_rate(["win", "win", "loss"], confidence_level=0.8, n_resamples=20000, seed=1)
    assert result["ci_low"] == pytest.approx(1 / 3, abs=1e-4) and result["ci_high"] == 1.0


def test_win_rate_interval_agrees_with_the_normal_approximation_on_a_large_sample():
    outcomes = ["win"] * 240 + ["loss"] * 160  # p = 0.6, n = 400
    result = win_rate(outcomes, n_resamples=10000, seed=3)
    half_width = 1.96 * math.sqrt(0.6 * 0.4 / 400)  # 0.048
    assert result["ci_low"] == pytest.approx(0.6 - half_width, abs=0.006)
    assert result["ci_high"] == pytest.approx(0.6 + half_width, abs=0.006)


def test_unanimous_outcomes_give_a_point_interval():
    assert (lambda r: (r["ci_low"], r["ci_high"]))(win_rate(["win"] * 5, n_resamples=200)) == (1.0, 1.0)
    ties = win_rate(["tie"] * 5, n_resamples=200)
    assert (ties["win_rate"], ties["ci_low"], ties["ci_high"]) == (0.5, 0.5, 0.5)
    assert win_rate(["win"], n_resamples=200)["ci_low"] is None  # one prompt: no interval


def test_paired_bootstrap_p_value_of_a_two_prompt_sample():
    # Differences +1, -1: resampled means -1, 0, +1 with probabilities 1/4, 1/2, 1/4, so the share
    # at or below zero is 3/4; the 95% percentile interval is [-1, 1].
    result = paired_bootstrap([1.0, 0.0], [0.0, 1.0], n_resamples=20000, seed=2)
    assert result["mean_difference"] == 0.0
    assert result["p_value"] == pytest.approx(0.75, abs=0.01)
    assert (result["ci_low"], result["ci_high"]) == (-1.0, 1.0)


def test_paired_bootstrap_of_a_clear_improvement():
    candidate, baseline = [1.0] * 18 + [0.0] * 2, [0.0] * 20
    result = paired_bootstrap(candidate, baseline, n_resamples=5000)
    assert result["mean_difference"] == 0.9 and result["p_value"] == 0.0
    assert 0.7 <= result["ci_low"] < 0.9 < result["ci_high"] <= 1.0


def test_sign_test_against_binomial_tails_by_hand():
    # 9 better, 1 worse, 2 ties: one-sided p = P(X >= 9 | n=10) = (C(10,9) + C(10,10)) / 2^10 = 11/1024.
    candidate = [1.0] * 9 + [0.0] + [0.5, 0.5]
    baseline = [0.0] * 9 + [1.0] + [0.5, 0.5]
    result = sign_test(candidate, baseline)
    assert (result["better"], result["worse"], result["ties"]) == (9, 1, 2)
    assert result["p_value"] == pytest.approx(11 / 1024, abs=1e-6)
    assert result["p_value_two_sided"] == pytest.approx(22 / 1024, abs=1e-6)
    assert sign_test([0.2], [0.25], tie_margin=0.1)["p_value"] is None  # only ties: nothing to test


def test_outcome_tie_margin():
    assert [outcome_from_difference(d, 0.05) for d in (0.1, 0.05, -0.01, -0.2)] == ["win", "tie", "tie", "loss"]
