"""torchrun across machines: one launcher per node, meeting at a rendezvous endpoint.

A cluster scheduler (SLURM, a Kubernetes job) starts one process per node; torchrun's own
multi-node mode (`--nnodes N --rdzv-endpoint HOST:PORT`) then makes the launchers of all nodes
one job. In a pipeline, only the node that runs the stage knows when a training job starts and
where its job file is, so it posts each job on a job board (a directory on shared storage) for as
long as its own launcher runs; `tunepipe join` on every other node watches the board and runs the
same torchrun for each posted job (`tasks/training/join.py`). A post carries the job file and the rendezvous id,
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

from tunepipe.schemas.environment import MultiNodeProfile


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
