"""Text metrics every stage scores answers with: exact match and token F1 on whitespace-normalised
text (the sft stage's held-out check, align's rule rewards, evaluate's task metrics and export's
re-evaluation all use these, so their numbers agree).
"""

from __future__ import annotations

from collections import Counter


def normalise(text: str) -> str:
    return " ".join(text.split())


def exact_match(prediction: str, reference: str) -> float:
    return float(normalise(prediction) == normalise(reference))


def token_f1(prediction: str, reference: str) -> float:
    """SQuAD-style F1 over whitespace tokens."""
    pred, ref = normalise(prediction).split(), normalise(reference).split()
    if not pred or not ref:
        return float(pred == ref)
    common = sum((Counter(pred) & Counter(ref)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(pred), common / len(ref)
    return 2 * precision * recall / (precision + recall)


def score(predictions: list[str], references: list[str]) -> dict[str, float]:
    n = len(references)
    return {
        "exact_match": round(sum(map(exact_match, predictions, references)) / n, 4) if n else 0.0,
        "token_f1": round(sum(map(token_f1, predictions, references)) / n, 4) if n else 0.0,
        "n": n,
    }
