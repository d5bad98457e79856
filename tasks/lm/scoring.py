"""A task's scorer from the `scoring:` config and the data artifact (where `labels: auto` reads
the train split's answers). Shared by every stage that scores answers."""

from __future__ import annotations

from pathlib import Path

from tunepipe.schemas.scoring import ScoringConfig
from tunepipe.tasks.core.stage import StageFailed
from tunepipe.tasks.lm.encoding import read_split, record_messages
from tunepipe.tasks.lm.metrics import TaskScorer, normalise


def train_answers(data_dir: str | Path, task: str) -> list[str]:
    """The final assistant answers of a task's train records, in split order."""
    answers = []
    for record in read_split(data_dir, "train"):
        if str(record.get("task") or "default") != task:
            continue
        if not (record.get("messages") or ("instruction" in record and "output" in record)):
            continue  # preference pairs and corpus text carry no single answer
        messages = record_messages(record)
        answers.append(next(m["content"] for m in reversed(messages) if m["role"] == "assistant"))
    return answers


def auto_labels(config: ScoringConfig, data_dir: str | Path, task: str, normalisation: str) -> tuple[str, ...]:
    """The task's distinct train answers (first spelling of each, by normalised text)."""
    seen: dict[str, str] = {}
    for answer in train_answers(data_dir, task):
        seen.setdefault(normalise(answer, normalisation), answer.strip())
    seen.pop("", None)
    if not seen:
        raise StageFailed(f"scoring.tasks.{task}.labels auto: the train split of {data_dir} has no answers of task {task!r}")
    if len(seen) > config.max_auto_labels:
        raise StageFailed(
            f"scoring.tasks.{task}.labels auto: {len(seen)} distinct train answers, more than max_auto_labels "
            f"{config.max_auto_labels}: not a classification task; list its labels, or unset `labels`"
        )
    return tuple(sorted(seen.values()))


def task_scorer(config: ScoringConfig, data_dir: str | Path | None, task: str) -> TaskScorer:
    rules = config.tasks.get(task)
    normalisation = (rules.normalisation if rules else None) or config.normalisation
    labels: tuple[str, ...] = ()
    if rules and rules.labels == "auto":
        if data_dir is None:
            raise StageFailed(f"scoring.tasks.{task}.labels auto needs the data artifact's train split")
        labels = auto_labels(config, data_dir, task, normalisation)
    elif rules and rules.labels:
        labels = tuple(rules.labels)
    return TaskScorer(normalisation, labels)


def task_scorers(config: ScoringConfig, data_dir: str | Path | None, tasks: list[str]) -> dict[str, TaskScorer]:
    return {task: task_scorer(config, data_dir, task) for task in tasks}
