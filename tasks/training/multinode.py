"""torchrun across machines: one launcher per node, meeting at a rendezvous endpoint.

A cluster scheduler (SLURM, a Kubernetes job) starts one process per node; torchrun's own
multi-node mode (`--nnodes N --rdzv-endpoint HOST:PORT`) then makes the launchers of all nodes
one job. In a pipeline, only the node that runs the stage knows when a training job starts and
where its job file is, so it posts each job on a job board (a directory on shared storage) for as
long as its own launcher runs; `tunepipe join` on every other node watches the board and runs the
same torchrun for each posted job (`follow`). A post carries the job file and the rendezvous id,
so every node's launcher joins the same rendezvous, and a rerun gets a fresh one.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import time
from pathlib import Path
from typing import Iterator

from tunepipe.schemas.environment import EnvironmentProfile, MultiNodeProfile


def torchrun_node_arguments(multi_node: MultiNodeProfile, rdzv_id: str | None) -> list[str]:
    """torchrun's multi-node arguments (instead of `--standalone`)."""
    args = [
        "--nnodes", str(multi_node.nodes),
        "--rdzv-backend", multi_node.rdzv_backend,
        "--rdzv-endpoint", multi_node.rdzv_endpoint,
        "--rdzv-id", rdzv_id or multi_node.rdzv_id or "tunepipe",
        "--rdzv-conf", f"join_timeout={multi_node.join_timeout_s}",
    ]
    if multi_node.node_rank is not None:
        args += ["--node-rank", str(multi_node.node_rank)]
    return args


def new_rdzv_id(multi_node: MultiNodeProfile, job_file: Path) -> str:
    """The profile's id, else one per launch: a rerun of the same job must not meet a stale rendezvous."""
    if multi_node.rdzv_id:
        return multi_node.rdzv_id
    digest = hashlib.sha256(str(job_file.resolve()).encode()).hexdigest()[:12]
    return f"tunepipe-{digest}-{time.time_ns()}"


@contextlib.contextmanager
def posted_job(multi_node: MultiNodeProfile, job_file: Path, logger: logging.Logger) -> Iterator[str]:
    """Post `job_file` on the job board while the block runs (this node's launcher); yields the rendezvous id."""
    board = Path(multi_node.job_board)
    board.mkdir(parents=True, exist_ok=True)
    rdzv_id = new_rdzv_id(multi_node, job_file)
    post = board / f"{rdzv_id}.json"
    tmp = post.with_suffix(".tmp")
    tmp.write_text(json.dumps({"job": str(job_file.resolve()), "rdzv_id": rdzv_id, "posted_by": os.uname().nodename}))
    tmp.rename(post)  # a follower never reads half a post
    logger.info(
        "multi-node: job posted on %s for %d more node(s) (rendezvous %s at %s)",
        post, multi_node.nodes - 1, rdzv_id, multi_node.rdzv_endpoint,
    )
    try:
        yield rdzv_id
    finally:
        post.unlink(missing_ok=True)


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
    from tunepipe.tasks.core.stage import StageFailed
    from tunepipe.tasks.training.launcher import launch_command, stream_command

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
