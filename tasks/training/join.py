"""`tunepipe join`: the other nodes of a multi-node torchrun profile, running each job the stage's node posts.

The stage's node posts a job on the profile's job board while its own launcher runs
(`tasks/training/multinode.py`); each other node runs the same torchrun command for it with the
post's rendezvous id, supervised like the stage's own launch (`tasks/training/launcher.py`).
"""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path

from tunepipe.schemas.environment import EnvironmentProfile
from tunepipe.tasks.core.stage import StageFailed
from tunepipe.tasks.training.launcher import launch_command, stream_command


def follow(
    env: EnvironmentProfile,
    logger: logging.Logger,
    *,
    max_jobs: int | None = None,
    idle_timeout_s: float | None = None,
    poll_s: float = 0.5,
) -> int:
    """Join every job posted on the board with this node's launcher, one at a time; return how many ran.

    Stops after `max_jobs` jobs, or once nothing was posted for `idle_timeout_s` (None: never; the
    scheduler ends the node's process with the allocation). A failed launch is logged and the
    follower waits for the next post: the stage's node reports the failure and reruns.
    """
    if env.multi_node is None or env.launcher != "torchrun":
        raise ValueError(f"profile {env.name!r} is not a multi-node torchrun profile (launcher torchrun with multi_node)")
    board = Path(env.multi_node.job_board)
    joined: set[str] = set()
    ran, idle_since = 0, time.monotonic()
    logger.info("join: watching %s for training jobs (%d nodes, rendezvous at %s)", board, env.multi_node.nodes, env.multi_node.rdzv_endpoint)
    while max_jobs is None or ran < max_jobs:
        post = _next_post(board, joined)
        if post is None:
            if idle_timeout_s is not None and time.monotonic() - idle_since > idle_timeout_s:
                logger.info("join: nothing posted for %.0f s, stopping", idle_timeout_s)
                break
            time.sleep(poll_s)
            continue
        joined.add(post["rdzv_id"])
        job_file = Path(post["job"])
        logger.info("join: training job %s (rendezvous %s)", job_file, post["rdzv_id"])
        try:
            stream_command(
                launch_command(env, job_file, rdzv_id=post["rdzv_id"]), logger,
                what=f"torchrun node x{env.num_processes}", log_file=job_file.parent / f"launch.{os.uname().nodename}.{os.getpid()}.log",
            )
        except StageFailed as exc:
            logger.error("join: the job failed on this node: %s", str(exc).splitlines()[0])
        ran += 1
        idle_since = time.monotonic()
    return ran


def _next_post(board: Path, joined: set[str]) -> dict[str, str] | None:
    if not board.is_dir():
        return None
    for path in sorted(board.glob("*.json"), key=lambda p: p.stat().st_mtime if p.exists() else 0):
        try:
            post = json.loads(path.read_text())
        except (OSError, ValueError):
            continue  # removed meanwhile
        if post.get("rdzv_id") not in joined:
            return post
    return None
