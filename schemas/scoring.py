"""How answers are scored against references: one section shared by every stage that scores them.

`scoring:` at the top of the pipeline YAML applies to sft's and align's held-out checks, evaluate's
task metrics and export's re-evaluation (a stage's own `scoring:` overrides it), so their figures
agree. Exact match and token F1 compare normalised text; ROUGE, BLEU, chrF and user metrics get
the answer as generated.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator
from tunepipe.schemas.base import StrictModel

Normalisation = Literal["squad", "whitespace"]


class TaskScoring(StrictModel):
    """One task's scoring rules; unset fields take the section's."""

    normalisation: Normalisation | None = Field(
        default=None,
        description="`squad`: lowercase, punctuation removed, articles (a/an/the) dropped, whitespace collapsed (the SQuAD "
        "evaluation script's normalize_answer); `whitespace`: whitespace collapsed only (punctuation and case are part of "
        "the answer, e.g. a structured notation). Default: the section's `normalisation`.",
    )
    labels: Literal["auto"] | list[str] | None = Field(
        default=None,
        description="A classification task's labels: an answer that names exactly one of them (as whole words, after "
        "normalisation) is scored as that label (\"The review is positive.\" -> positive); an answer naming none or "
        "several is scored as written. `auto`: the distinct answers of the task's train split (at most "
        "`max_auto_labels`). Unset: answers are scored as written.",
    )

    @field_validator("labels")
    @classmethod
    def _labels(cls, value: str | list[str] | None) -> str | list[str] | None:
        if isinstance(value, list):
            if not value or any(not label.strip() for label in value):
                raise ValueError("labels: list at least one non-empty label, or use `auto`")
        return value


class ScoringConfig(StrictModel):
    """Normalisation of answers and references before exact match and token F1, per task."""

    normalisation: Normalisation = Field(
        default="squad", description="Every task's normalisation unless `tasks` sets its own (see TaskScoring.normalisation)."
    )
    tasks: dict[str, TaskScoring] = Field(default_factory=dict, description="Per-task rules, by task name.")
    max_auto_labels: int = Field(
        default=20, ge=2,
        description="`labels: auto` refuses a task with more distinct train answers than this: it is not a classification task.",
    )
