"""The promotion gate: each configured rule passes or fails with the numbers that decided it.

A rule whose evidence is missing fails (a win rate without an interval, a significance test
with nothing to test): the gate promotes only what it could check. A rule that does not apply
(no regression tasks configured) is reported as skipped and does not block.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field
from tunepipe.schemas.evaluate import GateRules


class _Evidence(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class WinRate(_Evidence):
    """The A/B's win rate and its exact interval, as `stats.win_rate` computes it."""

    wins: int
    ties: int
    losses: int
    n: int
    win_rate: float | None
    decisive: int
    decisive_win_rate: float | None
    ci_low: float | None = Field(description="Lower bound of the exact interval of wins among decisive pairs; None without one.")
    ci_high: float | None
    confidence_level: float = Field(gt=0, lt=1, description="The interval's level (ab.confidence_level).")
    ties_policy: Literal["half", "exclude"] = "half"
    interval: str = "exact binomial (Clopper-Pearson) on decisive pairs"


class AlignmentEvidence(_Evidence):
    """What the align stage recorded of an align candidate's task metric against its SFT policy."""

    within: bool | None = Field(description="align's task_metric_within_tolerance; None: it measured no task metric.")
    drops: dict[str, float] = Field(default_factory=dict, description="Task-metric drop from SFT, per run.")
    metric: str | None = None
    tolerance: float | None = None


class GateEvidence(_Evidence):
    """What the rules look at, validated once where the evaluate stage gathers it."""

    primary_metric: str
    win: WinRate | None
    judge: str
    tasks: dict[str, tuple[float, float]] = Field(default_factory=dict, description="task → (candidate, baseline)")
    regression: dict[str, tuple[float, float]] = Field(default_factory=dict, description="name → (candidate, baseline)")
    p_value: float | None = None
    test: Literal["sign", "paired_bootstrap"] = "sign"
    confidence_level: float = Field(default=0.95, gt=0, lt=1, description="ab.confidence_level: the tests' level.")
    # None: the candidate is not the align artifact.
    alignment: AlignmentEvidence | None = None

    @property
    def alpha(self) -> float:
        """The significance test's threshold: 1 - ab.confidence_level."""
        return round(1 - self.confidence_level, 6)


def _verdict(ok: bool, text: str) -> str:
    return f"{'PASS' if ok else 'FAIL'} {text}"


def win_rate_rule(threshold: float, min_decisive: int, e: GateEvidence) -> str:
    """The exact interval of the decisive win share must clear `threshold`, on enough decisive pairs."""
    win = e.win
    if win is None:
        return _verdict(False, f"win rate lower bound > {threshold}: no interval (no decisive pair; 0 wins / 0 ties / 0 losses by {e.judge}, n=0)")
    counts = f"{win.wins} wins / {win.ties} ties / {win.losses} losses by {e.judge}, n={win.n}"
    low = win.ci_low
    if low is None:
        return _verdict(False, f"win rate lower bound > {threshold}: no interval (no decisive pair; {counts})")
    level = round(100 * win.confidence_level)
    ok = low > threshold and win.decisive >= min_decisive
    enough = "" if win.decisive >= min_decisive else f"; only {win.decisive} decisive pairs, need at least {min_decisive}"
    return _verdict(
        ok,
        f"win rate lower bound {low:.3f} {'>' if low > threshold else '<='} {threshold} (wins among {win.decisive} decisive pairs "
        f"{win.decisive_win_rate or 0:.3f}, exact {level}% CI [{low:.3f}, {win.ci_high:.3f}]; win rate "
        f"{win.win_rate:.3f}; {counts}{enough})",
    )


def drop_rule(label: str, threshold: float, scores: dict[str, tuple[float, float]], metric: str, empty: str) -> str:
    """Fails when any entry's score fell below the baseline's by more than `threshold`."""
    if not scores:
        return f"SKIP {label}: {empty}"
    changes = {name: round(cand - base, 4) for name, (cand, base) in scores.items()}
    worst = min(changes, key=changes.get)
    cand, base = scores[worst]
    ok = -changes[worst] <= threshold
    over = sum(-c > threshold for c in changes.values())
    others = f"; {over} of {len(changes)} over the limit" if len(changes) > 1 and over else ""
    return _verdict(
        ok,
        f"{label} {threshold}: worst {metric} change {changes[worst]:+.3f} on {worst} ({base:.3f} → {cand:.3f}), "
        f"a drop of {max(0.0, -changes[worst]):.3f} {'<=' if ok else '>'} {threshold}{others}",
    )


def significance_rule(e: GateEvidence) -> str:
    if e.p_value is None:
        return _verdict(False, f"significant: the {e.test} test has no p-value (no prompt where the two differ on {e.primary_metric})")
    ok = e.p_value < e.alpha
    return _verdict(ok, f"significant: {e.test} test p = {e.p_value:.4g} {'<' if ok else '>='} alpha {e.alpha:.3g} on {e.primary_metric}")


def alignment_rule(alignment: AlignmentEvidence) -> str:
    """The align stage's own verdict on the task metric it was held to (drop from SFT per run)."""
    drops = ", ".join(f"{run} {drop:+.3f}" for run, drop in sorted(alignment.drops.items()))
    label = f"align kept {alignment.metric or 'the task metric'} within its tolerance {alignment.tolerance} of SFT"
    if alignment.within is None:
        return f"SKIP {label}: align recorded no held-out task metric"
    return _verdict(alignment.within, f"{label} (drop per run: {drops or 'none recorded'})")


def decide(rules: GateRules, e: GateEvidence) -> tuple[bool, list[str]]:
    """(passed, reasons): one reason per configured rule."""
    reasons = []
    if rules.min_win_rate_lower_bound is not None:
        reasons.append(win_rate_rule(rules.min_win_rate_lower_bound, rules.min_decisive_pairs, e))
    if rules.max_task_metric_drop is not None:
        reasons.append(drop_rule("max task metric drop", rules.max_task_metric_drop, e.tasks, e.primary_metric, "no tasks evaluated"))
    if rules.max_forgetting_drop is not None:
        reasons.append(drop_rule("max forgetting drop", rules.max_forgetting_drop, e.regression, "regression", "no regression tasks configured"))
    if rules.require_significant:
        reasons.append(significance_rule(e))
    if rules.require_align_within_tolerance and e.alignment is not None:
        reasons.append(alignment_rule(e.alignment))
    passed = all(not r.startswith("FAIL") for r in reasons)
    return passed, reasons
