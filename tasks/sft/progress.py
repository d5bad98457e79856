"""Live training progress: a Prefect progress artifact while a training stage runs in a task.

In-process training runs in the Prefect task's thread, so the callback finds the task run and
updates one progress artifact as steps complete (throttled to whole percents, so a long run
does not flood the API). Launched workers have no Prefect context; their progress reaches the
run through the streamed logs instead.
"""

from __future__ import annotations

import sys
from typing import Any

from transformers import TrainerCallback


def in_prefect_task() -> bool:
    # A process that never imported Prefect is in no task run; importing it just to ask costs ~3 s.
    context = sys.modules.get("prefect.context")
    return context is not None and context.TaskRunContext.get() is not None


class PrefectProgress(TrainerCallback):
    """Percent of optimizer steps done, as a Prefect progress artifact."""

    def __init__(self, label: str):
        self.label = label
        self.artifact_id: Any = None
        self.reported = -1

    def on_train_begin(self, args, state, control, **kwargs):
        if state.is_world_process_zero and in_prefect_task():
            from prefect.artifacts import create_progress_artifact

            self.artifact_id = create_progress_artifact(progress=0.0, description=f"{self.label}: training progress (%)")

    def on_step_end(self, args, state, control, **kwargs):
        if self.artifact_id is not None and state.max_steps:
            self._report(int(100 * state.global_step / state.max_steps))

    def on_train_end(self, args, state, control, **kwargs):
        if self.artifact_id is not None:
            self._report(100)

    def _report(self, percent: int) -> None:
        if percent > self.reported:
            from prefect.artifacts import update_progress_artifact

            update_progress_artifact(self.artifact_id, progress=float(percent))
            self.reported = percent
