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

import logging
import os
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


from tunepipe.tasks.core.runtime import VERBOSE_ENV  # noqa: E402 - set by `tunepipe run --verbose`
JOB_LABEL_ENV = "TUNEPIPE_JOB_LABEL"  # `stage/task` of the training job that runs (set by run_training)


def verbose() -> bool:
    return os.environ.get(VERBOSE_ENV, "") not in ("", "0", "false")


def job_label(default: str) -> str:
    """`stage/task` of the running job (set by `run_training`), else `default`."""
    return os.environ.get(JOB_LABEL_ENV) or default


def metrics_logger() -> Any:
    """`tunepipe.metrics`: the per-step training lines, for the Prefect run log only. They do not
    propagate to the console, which shows the one progress line per job instead."""
    logger = logging.getLogger("tunepipe.metrics")
    logger.propagate = False
    logger.setLevel(logging.INFO)
    if in_prefect_task() and not any(type(h).__name__ == "APILogHandler" for h in logger.handlers):
        from prefect.logging.handlers import APILogHandler

        logger.addHandler(APILogHandler())
    return logger


def quiet_trainer(trainer: Any) -> None:
    """Without --verbose, the Trainer's console output goes: its per-step dicts (PrinterCallback, or
    ProgressCallback's tqdm.write) and its bar; `StepReporter` shows one line per job instead."""
    if verbose():
        return
    from transformers.trainer_callback import PrinterCallback, ProgressCallback

    for callback in (PrinterCallback, ProgressCallback):
        trainer.remove_callback(callback)


class StepReporter(TrainerCallback):
    """One console progress line per training job (tqdm: steps, loss, ETA) and, at each logging
    step, a `step N/M: loss ..., lr ..., ETA ...` line in the Prefect run log, at most one per
    `min_interval_s` (the last step's line always). In verbose mode the Trainer's own bar and
    dicts stay, and this adds the run-log lines only."""

    def __init__(self, label: str, min_interval_s: float = 1.0, clock: Callable[[], float] = time.monotonic, console: bool | None = None):
        self.label = label
        self.min_interval_s = min_interval_s
        self.clock = clock
        self.console = (not verbose()) if console is None else console
        self.bar: Any = None
        self.logged_at = float("-inf")
        self.started = 0.0
        self.loss: float | None = None
        self.lines = 0

    def on_train_begin(self, args, state, control, **kwargs):
        self.started = self.clock()
        if self.console and state.is_world_process_zero:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=state.max_steps, initial=state.global_step, desc=self.label, unit="step", dynamic_ncols=True,
                            mininterval=1.0, file=sys.stderr, leave=True)

    def on_step_end(self, args, state, control, **kwargs):
        if self.bar is not None:
            self.bar.update(state.global_step - self.bar.n)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not state.is_world_process_zero or not logs or not isinstance(logs.get("loss"), (int, float)):
            return
        self.loss = float(logs["loss"])
        if self.bar is not None:
            self.bar.set_postfix(loss=f"{self.loss:.4g}", refresh=False)
        last = state.global_step >= state.max_steps
        if last or self.clock() - self.logged_at >= self.min_interval_s:
            self.logged_at = self.clock()
            self.lines += 1
            lr = logs.get("learning_rate")
            metrics_logger().info(
                "%s step %d/%d: loss %.4f%s, ETA %s", self.label, state.global_step, state.max_steps, self.loss,
                f", lr {lr:.3g}" if isinstance(lr, (int, float)) else "", self.eta(state),
            )

    def eta(self, state) -> str:
        done = max(state.global_step, 1)
        seconds = (self.clock() - self.started) / done * max(state.max_steps - state.global_step, 0)
        return time.strftime("%H:%M:%S", time.gmtime(seconds))

    def on_train_end(self, args, state, control, **kwargs):
        if self.bar is not None:
            self.bar.update(state.global_step - self.bar.n)
            self.bar.close()
            self.bar = None
