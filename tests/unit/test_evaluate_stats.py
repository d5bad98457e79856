"""The A/B statistics against values worked out by hand (exact binomial intervals and tails,
exact bootstrap distributions of tiny samples) and against the normal approximation."""

from __future__ import annotations

import math

import pytest

from tunepipe.tasks.evaluate.stats import outcome_from_difference, paired_bootstrap, sign_test, win_rate


def test_win_rate_counts_and_tie_policies():
    outcomes = ["win"] * 6 + ["tie"] * 2 + ["loss"] * 2
    half = win_rate(outcomes, ties="half")
    assert (half["wins"], half["ties"], half["losses"], half["n"], half["decisive"]) == (6, 2, 2, 10, 8)
    assert half["win_rate"] == pytest.approx((6 + 0.5 * 2) / 10) and half["decisive_win_rate"] == 0.75
    excluded = win_rate(outcomes, ties="exclude")
    assert excluded["win_rate"] == pytest.approx(6 / 8)


def test_win_rate_interval_is_the_exact_binomial_interval_by_hand():
    # All n decisive pairs won: the Clopper-Pearson lower bound solves P(X >= n) = p^n = alpha/2,
    # the upper is 1. 4 wins: 0.025 ** (1/4) = 0.3976; 80 wins: 0.025 ** (1/80) = 0.9549.
    four = win_rate(["win"] * 4 + ["tie"] * 28)
    assert four["ci_low"] == pytest.approx(0.025 ** 0.25, abs=1e-4) and four["ci_high"] == 1.0
    assert win_rate(["win"] * 80 + ["tie"] * 48)["ci_low"] == pytest.approx(0.025 ** (1 / 80), abs=1e-4)
    # One win of two decisive pairs, 80%: the bounds solve 1 - (1 - p)^2 = 0.1 and p^2 = 0.9.
    one = win_rate(["win", "loss", "tie"], confidence_level=0.8)
    assert one["ci_low"] == pytest.approx(1 - math.sqrt(0.9), abs=1e-4) and one["ci_high"] == pytest.approx(math.sqrt(0.9), abs=1e-4)


def test_win_rate_interval_agrees_with_the_normal_approximation_on_a_large_sample():
    outcomes = ["win"] * 240 + ["loss"] * 160  # p = 0.6, n = 400
    result = win_rate(outcomes)
    half_width = 1.96 * math.sqrt(0.6 * 0.4 / 400)  # 0.048
    assert result["ci_low"] == pytest.approx(0.6 - half_width, abs=0.006)
    assert result["ci_high"] == pytest.approx(0.6 + half_width, abs=0.006)


def test_ties_are_no_evidence_and_no_decisive_pair_gives_no_interval():
    # 4 wins among 28 ties: the bootstrap over prompts gave [0.516, 0.625]; the exact interval
    # on the 4 decisive pairs includes 0.5, as the sign test (p = 0.0625) says it must.
    result = win_rate(["win"] * 4 + ["tie"] * 28)
    assert result["win_rate"] == 0.5625 and result["ci_low"] < 0.5
    ties = win_rate(["tie"] * 5)
    assert (ties["win_rate"], ties["decisive"], ties["ci_low"], ties["ci_high"]) == (0.5, 0, None, None)
    assert win_rate(["win"])["ci_low"] == pytest.approx(0.025, abs=1e-4)  # one decisive pair: an honest, wide interval


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
