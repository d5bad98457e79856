"""The A/B statistics: a win rate with its exact binomial interval on decisive pairs, the paired
bootstrap of a metric difference, and the sign test. scipy does the resampling and the binomial tests.

Outcomes are from the candidate's side: "win" means the candidate's answer was judged better.
"""

from __future__ import annotations

from collections import Counter
from typing import Any, Literal, Sequence

import numpy as np

WIN, TIE, LOSS = "win", "tie", "loss"
OUTCOME_SCORE = {WIN: 1.0, TIE: 0.5, LOSS: 0.0}


def _bootstrap(samples: np.ndarray, *, confidence_level: float, n_resamples: int, method: str, seed: int):
    from scipy.stats import bootstrap

    return bootstrap(
        (samples,), np.mean, n_resamples=n_resamples, confidence_level=confidence_level, method=method,
        rng=np.random.default_rng(seed), vectorized=True,
    )


def outcome_from_difference(difference: float, tie_margin: float = 0.0) -> str:
    """Candidate score minus baseline score → win / tie / loss."""
    if abs(difference) <= tie_margin:
        return TIE
    return WIN if difference > 0 else LOSS


def win_rate(
    outcomes: Sequence[str],
    *,
    ties: Literal["half", "exclude"] = "half",
    confidence_level: float = 0.95,
) -> dict[str, Any]:
    """Counts, the win rate, and an exact interval of the share of decisive pairs the candidate wins.

    `win_rate` is descriptive: `half` scores each prompt 1 / 0.5 / 0 and averages; `exclude`
    is wins / (wins + losses). The interval is what the gate trusts: the exact (Clopper-Pearson)
    binomial interval of wins among decisive pairs (ties carry no evidence either way), valid at
    any sample size. A bootstrap over prompts is not: with 4 wins, 28 ties and no loss every
    resample's mean is at least 0.5, so its interval excluded 0.5 where the sign test gave p = 0.06.
    The lower bound exceeds 0.5 exactly when the one-sided sign test rejects at alpha = (1 - level) / 2.
    None without a decisive pair.
    """
    from scipy.stats import binomtest

    counts = Counter(outcomes)
    unknown = set(counts) - set(OUTCOME_SCORE)
    if unknown:
        raise ValueError(f"unknown outcomes {sorted(unknown)}")
    kept = [o for o in outcomes if ties == "half" or o != TIE]
    scores = np.array([OUTCOME_SCORE[o] for o in kept], dtype=float)
    wins, losses = counts[WIN], counts[LOSS]
    decisive = wins + losses
    result: dict[str, Any] = {
        "wins": wins, "ties": counts[TIE], "losses": losses, "n": len(outcomes), "ties_policy": ties,
        "win_rate": round(float(scores.mean()), 4) if len(scores) else None,
        "decisive": decisive, "decisive_win_rate": round(wins / decisive, 4) if decisive else None,
        "interval": "exact binomial (Clopper-Pearson) on decisive pairs",
        "ci_low": None, "ci_high": None, "confidence_level": confidence_level,
    }
    if decisive:
        interval = binomtest(wins, decisive, 0.5).proportion_ci(confidence_level=confidence_level, method="exact")
        result["ci_low"], result["ci_high"] = round(float(interval.low), 4), round(float(interval.high), 4)
    return result


def paired_bootstrap(
    candidate: Sequence[float],
    baseline: Sequence[float],
    *,
    confidence_level: float = 0.95,
    n_resamples: int = 2000,
    method: str = "percentile",
    seed: int = 0,
) -> dict[str, Any]:
    """Mean per-prompt difference (candidate − baseline), its bootstrap interval, and the one-sided
    p-value of "candidate is better": the share of resampled mean differences at or below zero."""
    differences = np.asarray(candidate, dtype=float) - np.asarray(baseline, dtype=float)
    result: dict[str, Any] = {
        "mean_difference": round(float(differences.mean()), 4) if len(differences) else None,
        "ci_low": None, "ci_high": None, "p_value": None, "n": len(differences),
    }
    if len(differences) >= 2:
        res = _bootstrap(differences, confidence_level=confidence_level, n_resamples=n_resamples, method=method, seed=seed)
        result["ci_low"] = _clean(res.confidence_interval.low, result["mean_difference"])
        result["ci_high"] = _clean(res.confidence_interval.high, result["mean_difference"])
        result["p_value"] = round(float(np.mean(res.bootstrap_distribution <= 0)), 4)
    return result


def sign_test(candidate: Sequence[float], baseline: Sequence[float], *, tie_margin: float = 0.0) -> dict[str, Any]:
    """The sign test on per-prompt scores: prompts where the candidate is better vs worse (ties
    dropped), against Binomial(n, 1/2). One-sided p (candidate better) and two-sided p."""
    from scipy.stats import binomtest

    outcomes = [outcome_from_difference(c - b, tie_margin) for c, b in zip(candidate, baseline)]
    better, worse = outcomes.count(WIN), outcomes.count(LOSS)
    n = better + worse
    result: dict[str, Any] = {"better": better, "worse": worse, "ties": outcomes.count(TIE), "p_value": None, "p_value_two_sided": None}
    if n:
        result["p_value"] = round(float(binomtest(better, n, 0.5, alternative="greater").pvalue), 6)
        result["p_value_two_sided"] = round(float(binomtest(better, n, 0.5, alternative="two-sided").pvalue), 6)
    return result


def _clean(value: float, point: float | None) -> float:
    # Degenerate samples (all prompts alike) give a NaN interval with some methods: the point is the interval.
    value = float(value)
    if np.isnan(value) and point is not None:
        return point
    return round(value, 4)
