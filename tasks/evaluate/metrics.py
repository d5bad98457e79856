"""Task metrics of generated answers against references, per example and per task.

Exact match and token F1 are the sft stage's own (normalised per task as `evaluate.scoring`
says: SQuAD-style by default, a classification task's answer read as the label it names), so the
stages' figures agree; ROUGE-L comes from `rouge_score`, BLEU and chrF from `sacrebleu`. Every metric is
on 0..1 (sacrebleu's 0..100 divided by 100). Per task, BLEU and chrF are corpus-level (as
sacrebleu defines them); the per-example values that the A/B and the paired tests use are
sentence-level. User metrics are `module:function` callables of (prediction, reference).
"""

from __future__ import annotations

import importlib
import inspect
import math
from functools import cache
from pathlib import Path
from typing import Callable

from tunepipe.tasks.core.fingerprint import sha256_file
from tunepipe.tasks.core.stage import StageFailed
from tunepipe.tasks.lm.metrics import DEFAULT_SCORER, TaskScorer, exact_match, token_f1

PerExample = Callable[[str, str], float]
CORPUS_LEVEL = ("bleu", "chrf")


@cache
def _rouge():
    from rouge_score import rouge_scorer

    return rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)


def rouge_l(prediction: str, reference: str) -> float:
    return float(_rouge().score(reference, prediction)["rougeL"].fmeasure)


def sentence_bleu(prediction: str, reference: str) -> float:
    from sacrebleu.metrics import BLEU

    # Effective order: a short sentence without 4-gram matches still gets a non-zero score.
    return BLEU(effective_order=True).sentence_score(prediction, [reference]).score / 100


def sentence_chrf(prediction: str, reference: str) -> float:
    from sacrebleu.metrics import CHRF

    return CHRF().sentence_score(prediction, [reference]).score / 100


def corpus_bleu(predictions: list[str], references: list[str]) -> float:
    from sacrebleu.metrics import BLEU

    return BLEU().corpus_score(predictions, [references]).score / 100


def corpus_chrf(predictions: list[str], references: list[str]) -> float:
    from sacrebleu.metrics import CHRF

    return CHRF().corpus_score(predictions, [references]).score / 100


BUILTIN: dict[str, PerExample] = {
    "exact_match": exact_match,
    "token_f1": token_f1,
    "rouge_l": rouge_l,
    "bleu": sentence_bleu,
    "chrf": sentence_chrf,
}
CORPUS = {"bleu": corpus_bleu, "chrf": corpus_chrf}


def load_callable(target: str, name: str) -> PerExample:
    """`module:function` → the function, or StageFailed naming what could not be imported."""
    module_name, _, function_name = target.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise StageFailed(
            f"evaluate: user_metrics.{name}: cannot import module {module_name!r} ({exc}): install it or put it on PYTHONPATH"
        ) from exc
    function = getattr(module, function_name, None)
    if not callable(function):
        raise StageFailed(f"evaluate: user_metrics.{name}: {module_name} has no function {function_name!r}")
    return function


def callable_digest(target: str) -> str:
    """What a user metric contributes to the cache key: its module file's sha256 (an edit reruns)."""
    module_name = target.partition(":")[0]
    try:
        source = inspect.getsourcefile(importlib.import_module(module_name))
    except (ImportError, TypeError):
        return f"unimportable:{target}"  # the stage itself fails on it, with the reason
    return f"{target}@{sha256_file(Path(source))}" if source else target


def metric_functions(builtin: list[str], user: dict[str, str], scorer: TaskScorer = DEFAULT_SCORER) -> dict[str, PerExample]:
    """{name: per-example function}; exact match and token F1 score as the task's scorer says."""
    scored = {"exact_match": scorer.exact_match, "token_f1": scorer.token_f1}
    functions = {name: scored.get(name, BUILTIN[name]) for name in builtin}
    functions.update({name: load_callable(target, name) for name, target in user.items()})
    return functions


def per_example(functions: dict[str, PerExample], predictions: list[str], references: list[str]) -> dict[str, list[float]]:
    """{metric: [value per example]}; a user metric that returns a non-number fails the stage."""
    values: dict[str, list[float]] = {}
    for name, function in functions.items():
        column = []
        for prediction, reference in zip(predictions, references):
            value = function(prediction, reference)
            if not isinstance(value, (int, float)) or not math.isfinite(value):
                raise StageFailed(f"evaluate: metric {name} returned {value!r} for prediction {prediction!r}: it must return a finite float")
            column.append(float(value))
        values[name] = column
    return values


def aggregate(values: dict[str, list[float]], predictions: list[str], references: list[str]) -> dict[str, float]:
    """Per-task figures: means, and corpus-level BLEU/chrF."""
    out = {}
    for name, column in values.items():
        if name in CORPUS:
            out[name] = round(CORPUS[name](predictions, references), 4)
        else:
            out[name] = round(sum(column) / len(column), 4) if column else 0.0
    return out
