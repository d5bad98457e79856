"""Live training progress: a Prefect progress artifact while a training stage runs in a task.

In-process training runs in the Prefect task's thread, so the callback finds the task run and
updates one progress artifact as steps complete. Each update is a synchronous call to the
Prefect API, in the training loop: on a 2-core machine one update per percent cost ~9 s of a
100-step, two-run sft stage (benchmarks/README.md, orchestration overhead). So updates are
throttled to whole percents *and* to one per `min_interval_s` (the UI needs no more), and the
end of training always reports 100. With `watch` ({log key: name}), the artifact's description
carries the latest logged value of each (an RL run's reward mean/std, share of zero-variance
groups, KL, clip fraction), so a run that learns nothing shows it while it runs. Launched workers have no Prefect context; their progress
reaches the run through the streamed logs instead.
"""

from __future__ import annotations

import sys
import time
from typing import Any, Callable

from transformers import TrainerCallback


def in_prefect_task() -> bool:
    # A process that never imported Prefect is in no task run; importing it just to ask costs ~3 s.
    context = sys.modules.get("prefect.context")
    return context is not None and context.TaskRunContext.get() is not None


class PrefectProgress(TrainerCallback):
    """Percent of optimizer steps done, as a Prefect progress artifact."""

    def __init__(
        self, label: str, min_interval_s: float = 5.0, clock: Callable[[], float] = time.monotonic, watch: dict[str, str] | None = None
    ):
        self.label = label
        self.watch = watch or {}
        self.latest: dict[str, float] = {}
        self.latest_step = 0
        self.min_interval_s = min_interval_s
        self.clock = clock
        self.artifact_id: Any = None
        self.reported = -1
        self.reported_at = float("-inf")

    def on_train_begin(self, args, state, control, **kwargs):
        if state.is_world_process_zero and in_prefect_task():
            from prefect.artifacts import create_progress_artifact

            self.artifact_id = create_progress_artifact(progress=0.0, description=f"{self.label}: training progress (%)")
            self.reported, self.reported_at = 0, self.clock()

    def on_log(self, args, state, control, logs=None, **kwargs):
        for key, name in self.watch.items():
            if logs and isinstance(logs.get(key), (int, float)):
                self.latest[name] = float(logs[key])
                self.latest_step = state.global_step

    def description(self) -> str | None:
        """`label: step N: name value, ...` of the watched metrics last logged, or None before any."""
        if not self.latest:
            return None
        values = ", ".join(f"{name} {value:.4g}" for name, value in self.latest.items())
        return f"{self.label}: training progress (%); step {self.latest_step}: {values}"

    def on_step_end(self, args, state, control, **kwargs):
        if self.artifact_id is not None and state.max_steps and self.clock() - self.reported_at >= self.min_interval_s:
            self._report(int(100 * state.global_step / state.max_steps))

    def on_train_end(self, args, state, control, **kwargs):
        if self.artifact_id is not None:
            self._report(100)

    def _report(self, percent: int) -> None:
        if percent > self.reported:
            from prefect.artifacts import update_progress_artifact

            described = {"description": d} if (d := self.description()) else {}
            update_progress_artifact(self.artifact_id, progress=float(percent), **described)
            self.reported, self.reported_at = percent, self.clock()
