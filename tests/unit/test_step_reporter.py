"""The training jobs' per-step lines for the Prefect run log: every logging step, at most one line per
`min_interval_s`, the last step always; the console bar is a separate switch."""

from __future__ import annotations

import logging
from types import SimpleNamespace

from tunepipe.tasks.training.progress import StepReporter


class Keep(logging.Handler):
    def __init__(self):
        super().__init__()
        self.lines: list[str] = []

    def emit(self, record):
        self.lines.append(record.getMessage())


def test_lines_are_rate_bounded_and_the_last_step_is_always_logged():
    now = [0.0]
    reporter = StepReporter("sft/triples", min_interval_s=1.0, clock=lambda: now[0], console=False)
    keep = Keep()
    logging.getLogger("tunepipe.metrics").addHandler(keep)
    try:
        state = SimpleNamespace(global_step=0, max_steps=10, is_world_process_zero=True)
        reporter.on_train_begin(None, state, None)
        for step in range(1, 11):  # ten logging steps, 0.4 s apart: one line per second at most
            now[0] += 0.4
            state.global_step = step
            reporter.on_log(None, state, None, logs={"loss": 2.0 / step, "learning_rate": 1e-3})
        reporter.on_log(None, state, None, logs={"eval_loss": 1.0})  # not a training step: no line
    finally:
        logging.getLogger("tunepipe.metrics").removeHandler(keep)
    steps = [int(line.split(" step ")[1].split("/")[0]) for line in keep.lines]
    assert steps == [1, 4, 7, 10]  # at t=0.4, 1.6, 2.8 (each >= 1 s after the last) and the final step
    assert keep.lines[-1] == "sft/triples step 10/10: loss 0.2000, lr 0.001, ETA 00:00:00"
    assert reporter.bar is None  # console=False: no bar
