"""Text metrics every stage scores answers with: exact match and token F1 (the sft stage's held-out
check, align's held-out check and rule rewards, evaluate's task metrics and export's re-evaluation
all use these, so their numbers agree).

Answers are normalised as the SQuAD evaluation script does by default (lowercase, punctuation
removed, the articles a/an/the dropped, whitespace collapsed), so "The review is positive." and
"the review is positive" are the same answer; `whitespace` normalisation only collapses whitespace,
for tasks whose punctuation is the answer's notation. A classification task can name its labels:
a prediction that mentions exactly one of them is scored as that label ("The review is
positive." → `positive`), so a base instruct model that knows the answer but words it as a
sentence is credited with it.

The normalisation and label functions are self-contained (no imports beyond `re`/`string`): the
evaluate stage copies their source into the lm-eval filter it writes, so lm-eval scores the same way.
"""

from __future__ import annotations

import re
import string
from collections import Counter
from dataclasses import dataclass
from typing import Any

NORMALISATIONS = ("squad", "whitespace")


def normalise(text: str, normalisation: str = "squad") -> str:
    """SQuAD's normalize_answer (lower, punctuation, articles, whitespace), or whitespace only."""
    if normalisation == "whitespace":
        return " ".join(text.split())
    punctuation = set(string.punctuation)
    text = "".join(ch for ch in text.lower() if ch not in punctuation)
    text = re.sub(r"\b(a|an|the)\b", " ", text)
    return " ".join(text.split())


def extract_label(prediction: str, labels: list[str] | tuple[str, ...], normalisation: str = "squad") -> str:
    """The one label the prediction names (as a whole-word sequence of its normalised text), else
    the prediction unchanged: an answer naming two labels ("positive, not negative") or none is not
    read as either. A label inside a longer named label ("positive" in "very positive") yields to it."""
    words = normalise(prediction, normalisation).split()
    found = []
    for label in labels:
        target = normalise(label, normalisation).split()
        if target and any(words[i : i + len(target)] == target for i in range(len(words) - len(target) + 1)):
            found.append((label, target))
    longest = [
        label for label, target in found
        if not any(len(other) > len(target) and any(other[i : i + len(target)] == target for i in range(len(other))) for _, other in found)
    ]
    distinct = {normalise(label, normalisation) for label in longest}
    return longest[0] if len(distinct) == 1 else prediction


def exact_match(prediction: str, reference: str, normalisation: str = "squad") -> float:
    return float(normalise(prediction, normalisation) == normalise(reference, normalisation))


def token_f1(prediction: str, reference: str, normalisation: str = "squad") -> float:
    """SQuAD-style F1 over the normalised text's tokens."""
    pred, ref = normalise(prediction, normalisation).split(), normalise(reference, normalisation).split()
    if not pred or not ref:
        return float(pred == ref)
    common = sum((Counter(pred) & Counter(ref)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(pred), common / len(ref)
    return 2 * precision * recall / (precision + recall)


def contains_answer(prediction: str, references: list[str] | str, normalisation: str = "squad") -> float:
    """1.0 when any acceptable answer appears in the prediction as a whole-word sequence (after
    normalisation): how open questions put to a chat model are scored ("Paris" in "The capital of
    France is Paris.")."""
    words = normalise(prediction, normalisation).split()
    for reference in [references] if isinstance(references, str) else references:
        target = normalise(reference, normalisation).split()
        if target and any(words[i : i + len(target)] == target for i in range(len(words) - len(target) + 1)):
            return 1.0
    return 0.0


@dataclass(frozen=True)
class TaskScorer:
    """How one task's answers are scored: its normalisation and, for a classification task, its labels."""

    normalisation: str = "squad"
    labels: tuple[str, ...] = ()

    def prepare(self, prediction: str) -> str:
        return extract_label(prediction, self.labels, self.normalisation) if self.labels else prediction

    def exact_match(self, prediction: str, reference: str) -> float:
        return exact_match(self.prepare(prediction), reference, self.normalisation)

    def token_f1(self, prediction: str, reference: str) -> float:
        return token_f1(self.prepare(prediction), reference, self.normalisation)

    def score(self, predictions: list[str], references: list[str]) -> dict[str, float]:
        n = len(references)
        return {
            "exact_match": round(sum(map(self.exact_match, predictions, references)) / n, 4) if n else 0.0,
            "token_f1": round(sum(map(self.token_f1, predictions, references)) / n, 4) if n else 0.0,
            "n": n,
        }

    def describe(self) -> dict[str, Any]:
        return {"normalisation": self.normalisation, "labels": list(self.labels)}


DEFAULT_SCORER = TaskScorer()


def score(predictions: list[str], references: list[str], scorer: TaskScorer = DEFAULT_SCORER) -> dict[str, float]:
    return scorer.score(predictions, references)
