"""Helpers for the two-process training tests (no tests here): an SFT entry point slowed down so a kill
lands between checkpoints, and finding one rank's worker process of a launch."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any


def slow_sft_job(job: dict[str, Any]) -> dict[str, Any]:
    """The sft stage's entry point with every optimizer step slowed to ~0.5 s (runs in each worker)."""
    import time

    from transformers import Trainer

    from tunepipe.tasks.sft.train import train_job

    step = Trainer.training_step

    def slow(self, *args, **kwargs):
        time.sleep(0.5)
        return step(self, *args, **kwargs)

    Trainer.training_step = slow
    return train_job(job)


def worker_pid(job_file: Path, rank: int) -> int | None:
    """The pid of the launcher worker of `job_file` whose RANK is `rank`, or None."""
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().split(b"\0")
            environ = (entry / "environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if b"tunepipe.tasks.training.launcher" in cmdline and str(job_file).encode() in cmdline \
                and f"RANK={rank}".encode() in environ and b"torch.distributed.run" not in cmdline:
            return int(entry.name)
    return None


def rank_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True
