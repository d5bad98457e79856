"""The `ray` launcher: a training job on Ray Train workers (TorchTrainer) across a Ray cluster.

`python -m tunepipe.tasks.training.ray_launcher JOB.json --address ... --workers N` is the
driver the stage supervises like any launcher (its output is the stage's log, its exit code the
stage's fate). It joins the profile's Ray cluster (KubeRay, `ray start` on SLURM or bare hosts)
and starts `num_processes` TorchTrainer workers wherever the cluster has room; Ray Train forms
their process group (gloo on CPU, nccl on CUDA) and sets RANK / LOCAL_RANK / WORLD_SIZE as
torchrun would, and each worker runs the job's entry point, the same function every launcher
runs (`worker.run_job`). The Trainer checkpoints into the job's checkpoint dir and rank 0
writes the artifact's files and the result, so the workdir must be on storage every node sees;
Ray's own checkpointing and retries stay off (a rerun of the stage resumes instead).
"""

from __future__ import annotations

import argparse
import io
import json
import logging
import os
import sys
import threading
from pathlib import Path
from typing import Any

from tunepipe.schemas.environment import EnvironmentProfile
from tunepipe.tasks.training.hardware import hardware

# Ray Train's placement-group cleaner says this once a second, for the whole run, where the cluster
# has no State API (a Ray without the dashboard of `ray[default]`, like the `ray[train]` extra alone).
_NO_STATE_API = "Failed to query Ray Train Controller actor state"

# Variables a training worker on another node must see as the driver does (offline hubs, caches).
_PASSED_ENV_PREFIXES = ("HF_", "TRANSFORMERS_", "TUNEPIPE_", "TOKENIZERS_", "OMP_NUM_THREADS")


def driver_command(env: EnvironmentProfile, job_file: str) -> list[str]:
    """The supervised command of a `ray` launch."""
    cmd = [sys.executable, "-m", "tunepipe.tasks.training.ray_launcher", job_file, "--workers", str(env.num_processes)]
    if env.ray.address:
        cmd += ["--address", env.ray.address]
    if env.ray.resources_per_worker:
        cmd += ["--resources", json.dumps(env.ray.resources_per_worker, sort_keys=True)]
    if hardware(env).on_gpu:
        cmd += ["--gpu"]
    return cmd + ["--placement-strategy", env.ray.placement_strategy]


class _OnceNoise(io.TextIOBase):
    """The driver's stdout/stderr, passing the workers' forwarded lines through, except repeats of
    the cleaner's State API warning after the first (line-buffered; Ray prints from a thread)."""

    def __init__(self, stream: Any):
        self._stream, self._partial, self._seen = stream, "", False
        self._lock = threading.Lock()

    def write(self, text: str) -> int:
        with self._lock:
            *lines, self._partial = (self._partial + text).split("\n")
            for line in lines:
                if _NO_STATE_API in line:
                    if self._seen:
                        continue
                    self._seen = True
                    line += " [repeats dropped: this cluster has no State API; `ray[default]` on the cluster provides it]"
                self._stream.write(line + "\n")
        return len(text)

    def flush(self) -> None:
        with self._lock:
            self._stream.flush()


def train_loop_per_worker(job: dict[str, Any]) -> None:
    """What each Ray Train worker runs: the job's entry point, as under torchrun."""
    # imported where it runs: the driver is `python -m` (__main__), so Ray ships this function by value
    from tunepipe.tasks.training.worker import run_job

    # Our loggers at INFO (the resume line reaches the stage log); the root stays at WARNING: a
    # root at INFO inside a Ray worker printed other libraries' debug output (bytecode listings).
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s %(levelname)s %(message)s", force=True)
    logging.getLogger("tunepipe").setLevel(logging.INFO)
    import ray

    logging.getLogger("tunepipe.train").info(
        "ray worker rank %s of %s on node %s", os.environ.get("RANK"), os.environ.get("WORLD_SIZE"),
        ray.get_runtime_context().get_node_id(),
    )
    run_job(job)


def run(job_file: Path, *, workers: int, address: str | None, resources: dict[str, float], gpu: bool, strategy: str) -> None:
    """Join the cluster and train; raises Ray Train's error if a worker fails."""
    import ray
    from ray.train import FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    job = json.loads(job_file.read_text())
    # Plain `(RayTrainWorker pid=…)` prefixes and every rank's lines: the stage log (and its
    # error-line search) gets no colour codes and no `[repeated 3x across cluster]` summaries.
    os.environ.setdefault("RAY_COLOR_PREFIX", "0")
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    passed = {k: v for k, v in os.environ.items() if k.startswith(_PASSED_ENV_PREFIXES)}
    # Joining a cluster (address or RAY_ADDRESS) takes its settings; a Ray started for the run needs no dashboard.
    local = {} if address or os.environ.get("RAY_ADDRESS") else {"include_dashboard": False}
    ray.init(address=address, runtime_env={"env_vars": passed} if passed else None, log_to_driver=True,
             logging_level=logging.WARNING, **local)
    print(f"ray: cluster {ray.get_runtime_context().gcs_address}, {ray.cluster_resources()}", flush=True)
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config=job,
        torch_config=TorchConfig(backend="nccl" if gpu else "gloo"),
        scaling_config=ScalingConfig(
            num_workers=workers, use_gpu=gpu, resources_per_worker=resources or None, placement_strategy=strategy
        ),
        # Ray's run directory sits beside the job (the stage's staging dir, shared storage), never ~/ray_results.
        run_config=RunConfig(
            name=job_file.parent.name, storage_path=str(job_file.parent.resolve() / "ray"),
            failure_config=FailureConfig(max_failures=0),
        ),
    )
    trainer.fit()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tunepipe.tasks.training.ray_launcher")
    parser.add_argument("job", type=Path)
    parser.add_argument("--workers", type=int, required=True)
    parser.add_argument("--address", default=None)
    parser.add_argument("--resources", type=json.loads, default={})
    parser.add_argument("--gpu", action="store_true")
    parser.add_argument("--placement-strategy", default="PACK")
    args = parser.parse_args(argv)
    sys.stdout, sys.stderr = _OnceNoise(sys.stdout), _OnceNoise(sys.stderr)
    try:
        run(args.job, workers=args.workers, address=args.address, resources=args.resources, gpu=args.gpu,
            strategy=args.placement_strategy)
    except Exception as exc:  # noqa: BLE001 - the driver's one job is to report why the workers failed
        import ray

        ray.shutdown()  # the workers' forwarded lines come first: the launcher reports the last error line
        print(f"ray: training failed ({type(exc).__name__})", flush=True)
        for line in failure_lines(exc):
            print(line, flush=True)
        return 1
    return 0


def failure_lines(exc: BaseException) -> list[str]:
    """One `ErrorType: message (rank R)` line per failed worker (Ray Train's WorkerGroupError maps
    ranks to their exceptions), else the root cause: the launcher reports the last such line."""
    failures = getattr(exc, "worker_failures", None) or {}
    causes = [(f" (rank {rank})", error) for rank, error in sorted(failures.items())]
    if not causes:
        causes = [("", getattr(exc, "controller_failure", None) or exc)]
    lines = []
    for where, error in causes:
        while getattr(error, "cause", None) is not None or error.__cause__ is not None:  # RayTaskError wraps the user's error
            error = getattr(error, "cause", None) or error.__cause__
        message = (str(error).strip().splitlines() or [""])[0]
        lines.append(f"{type(error).__name__}: {message}{where}")
    return lines


if __name__ == "__main__":
    sys.exit(main())
