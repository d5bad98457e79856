"""A worker's side of a training launch: the job file's entry point, run with its typed job.

Every process a launcher starts (`python -m tunepipe.tasks.training.launcher JOB`, a Ray Train
worker) runs `run_job`; rank 0 writes the entry point's result next to the job file. The stage's
side (commands, supervision, the job board) is `launcher.py`; this module sits below it and below
the Ray driver, which both run jobs through it.
"""

from __future__ import annotations

import importlib
import inspect
import json
import os
import typing
from pathlib import Path
from typing import Any, Callable

from tunepipe.schemas.jobs import TrainingJob


def entry_point(spec: str) -> Callable[[Any], dict[str, Any]]:
    """`package.module:function` → the function."""
    module, _, name = spec.partition(":")
    return getattr(importlib.import_module(module), name)


def job_payload(job: TrainingJob | dict[str, Any]) -> dict[str, Any]:
    """The job as JSON-able data, for the job file a launcher's workers read."""
    return job.model_dump(mode="json") if isinstance(job, TrainingJob) else dict(job)


def typed_job(entry: Callable[[Any], Any], payload: dict[str, Any]) -> Any:
    """`payload` validated as the job class `entry` takes (its first parameter's annotation), once per
    worker; unchanged for an entry point that takes a plain dict."""
    first = next(iter(inspect.signature(entry).parameters), None)
    job_cls = typing.get_type_hints(entry).get(first) if first else None
    if isinstance(job_cls, type) and issubclass(job_cls, TrainingJob):
        return job_cls.model_validate(payload)
    return payload


def run_job(job: dict[str, Any]) -> None:
    """One worker's part of a launch: run the job's entry point; rank 0 writes its result."""
    job = dict(job)
    entry, result_file = entry_point(job.pop("_entrypoint")), job.pop("_result_file")
    result = entry(typed_job(entry, job))
    if int(os.environ.get("RANK", "0")) == 0:
        Path(result_file).write_text(json.dumps(result, default=str))
