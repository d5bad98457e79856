"""Run a training job in this process or under a multi-process launcher, supervised.

`in_process`: the entry point is called here. `accelerate` / `deepspeed` / `torchrun`: the job
is written to a JSON file and `python -m tunepipe.tasks.training.launcher JOB` runs in every worker the launcher
starts; their output is streamed line by line to the stage's logger, and a worker that dies
fails the stage with the tail of the log. Rank 0 writes the entry point's result (a metrics
dict) next to the job file.

`ray`: the supervised command is a Ray Train driver (`tasks/training/ray_launcher.py`) whose
workers run the same job on a Ray cluster. `torchrun` with `multi_node`: the job is also posted on
the profile's job board (`tasks/training/multinode.py`), where `tunepipe join` on the other nodes
starts their launchers (`tasks/training/join.py`). What a worker runs is `tasks/training/worker.py`.
"""

from __future__ import annotations

import collections
import json
import logging
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

from tunepipe.schemas.environment import EnvironmentProfile
from tunepipe.schemas.jobs import TrainingJob
from tunepipe.tasks.core.environment import deepspeed_config_path
from tunepipe.tasks.core.stage import StageFailed
from tunepipe.tasks.core.net import free_port
from tunepipe.tasks.core.tracking import current_stage_name, environment, tracked_training
from tunepipe.tasks.training.hardware import hardware
from tunepipe.tasks.training.multinode import posted_job, torchrun_node_arguments
from tunepipe.tasks.training.ray_launcher import driver_command
from tunepipe.tasks.training.worker import entry_point, job_payload, run_job

TAIL_LINES = 40
# A Python exception line (`ValueError: ...`, `torch.OutOfMemoryError: ...`) in a worker's output.
# A launcher's prefix comes first: `[rank1]:` (torchrun), `(RayTrainWorker pid=12, ip=10.0.0.2)` (Ray).
_ERROR_LINE = re.compile(r"^\s*(?:\[[^\]]*\]:?\s*|\([^)]*\)\s*)?[\w.]*(?:Error|Exception|Interrupt)\b.*")


# torchrun's summary of the first worker that failed ("Root Cause (first observed failure)"), one field a line.
_ROOT_FIELD = re.compile(r"^\s*(rank|exitcode|traceback)\s*:\s*(.*)$")
_RANK_PREFIX = re.compile(r"^\s*\[rank(\d+)\]:")


def root_cause(lines: list[str]) -> dict[str, str] | None:
    """The failed rank, its exit code and torchrun's note on it (`Signal 9 (SIGKILL) received by PID ...`), from
    the summary torchrun prints when a worker fails; None when there is none."""
    try:
        start = max(i for i, line in enumerate(lines) if "Root Cause (first observed failure)" in line)
    except ValueError:
        return None
    found: dict[str, str] = {}
    for line in lines[start:]:
        if (match := _ROOT_FIELD.match(line)) and match.group(1) not in found:
            found[match.group(1)] = match.group(2).strip()
    if "rank" not in found:
        return None
    for field in ("rank", "exitcode"):  # `1 (local_rank: 1)`, `-9 (pid: 123)`: the number
        if field in found:
            found[field] = found[field].split()[0]
    return found


def failure_summary(lines: list[str], errors: list[str]) -> str:
    """Which worker failed and how: the first failed rank (torchrun's root cause) with its own exception line when
    it printed one (a rank killed by a signal prints none: its exit code and signal say it), else the last
    exception line any worker printed."""
    cause = root_cause(lines)
    if cause is None:
        return f". Worker error: {errors[-1]}" if errors else ""
    rank = cause["rank"]
    own = [_RANK_PREFIX.sub("", e).strip() for e in errors if (m := _RANK_PREFIX.match(e)) and m.group(1) == rank]
    # Lines without a [rankN] prefix (a worker that never joined a process group) cannot be told apart: its own.
    own = own or [e for e in errors if not _RANK_PREFIX.match(e)]
    others = [e for e in errors if (m := _RANK_PREFIX.match(e)) and m.group(1) != rank]
    text = f". Rank {rank} failed first (exit code {cause.get('exitcode', '?')}"
    if cause.get("traceback") and not cause["traceback"].startswith("To enable traceback"):
        text += f": {cause['traceback']}"
    text += ")"
    if own:
        text += f". Worker error: {own[-1]}"
    if others:
        text += f". Other ranks then reported: {others[-1]}"
    return text


def launch_command(env: EnvironmentProfile, job_file: str | Path, *, rdzv_id: str | None = None) -> list[str]:
    """The command that runs `python -m tunepipe.tasks.training.launcher JOB` in `env.num_processes` workers
    (for `ray`: the driver whose Ray workers run the job; `rdzv_id`: a multi-node torchrun's rendezvous id)."""
    n = str(env.num_processes)
    job = str(job_file)
    # accelerate and deepspeed default to port 29500 for their single-node rendezvous, so two jobs on one
    # machine (two runs, two stages routed to one worker) collided: each gets a free port (torchrun's
    # --standalone picks its own).
    if env.launcher == "ray":
        return driver_command(env, job)
    if env.launcher == "accelerate":
        cmd = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", n, "--num_machines", "1",
               "--main_process_port", str(free_port())]
        # accelerate takes one mode flag (two fail its launch). `--cpu` starts a single process whatever
        # --num_processes says (more CPU processes need mpirun), so several processes on any device go
        # through `--multi_gpu`, i.e. torchrun; the workers' TrainingArguments choose the device and backend.
        if hardware(env).backend == "deepspeed":
            cmd += ["--use_deepspeed", "--deepspeed_config_file", str(deepspeed_config_path(env))]
        elif env.num_processes > 1:
            cmd += ["--multi_gpu"]
        elif not hardware(env).on_gpu:
            cmd += ["--cpu"]
        return cmd + ["--module", "tunepipe.tasks.training.launcher", job]
    if env.launcher == "deepspeed":
        # The DeepSpeed config itself reaches the workers through TrainingArguments.deepspeed.
        return [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", n, "--master_port", str(free_port()),
                "--module", "tunepipe.tasks.training.launcher", job]
    if env.launcher == "torchrun":
        if env.multi_node is not None:
            nodes = torchrun_node_arguments(env.multi_node, rdzv_id)
        else:
            nodes = ["--standalone"]
        return [sys.executable, "-m", "torch.distributed.run", *nodes, "--nproc_per_node", n, "-m", "tunepipe.tasks.training.launcher", job]
    raise ValueError(f"launcher {env.launcher!r} runs in process: no command")


def stream_command(
    cmd: list[str],
    logger: logging.Logger,
    *,
    cwd: str | Path | None = None,
    extra_env: dict[str, str] | None = None,
    what: str = "training",
    log_file: str | Path | None = None,
) -> None:
    """Run `cmd`, log each output line (and keep them in `log_file`), and raise StageFailed with
    the workers' exception lines and the log's tail if it fails."""
    environ = {**os.environ, **(extra_env or {})}
    environ.setdefault("PYTHONUNBUFFERED", "1")
    tail: collections.deque[str] = collections.deque(maxlen=TAIL_LINES)
    errors: collections.deque[str] = collections.deque(maxlen=20)
    logger.info("%s: %s", what, " ".join(cmd))
    try:
        proc = subprocess.Popen(
            cmd, cwd=cwd, env=environ, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1
        )
    except OSError as exc:
        raise StageFailed(f"{what}: could not start {cmd[0]}: {exc}") from exc
    assert proc.stdout is not None
    sink = open(log_file, "a", encoding="utf-8") if log_file else None
    try:
        for line in proc.stdout:
            line = line.rstrip("\n")
            tail.append(line)
            if _ERROR_LINE.match(line) and "ChildFailedError" not in line:
                errors.append(line.strip())
            if sink:
                sink.write(line + "\n")
            logger.info("[%s] %s", what, line)
        code = proc.wait()
    finally:
        if sink:
            sink.close()
        if proc.poll() is None:
            proc.kill()
    if code != 0:
        raise StageFailed(
            f"{what}: `{' '.join(cmd[:6])} ...` exited with code {code}"
            + failure_summary(list(tail), list(errors))
            + (f". Full log: {log_file}" if log_file else "")
            + f". Last {len(tail)} lines of its log:\n" + "\n".join(tail)
        )


def run_training(
    entrypoint: str, job: TrainingJob | dict[str, Any], env: EnvironmentProfile, logger: logging.Logger, work_dir: str | Path
) -> dict[str, Any]:
    """Run `entrypoint(job)` as the profile says and return its result, tracked as the running
    stage's task named by `work_dir` (`<task>.launch`; a plain `launch`: the stage's one job)."""
    from tunepipe.tasks.training.progress import JOB_LABEL_ENV  # lazy: pulls in transformers

    name = Path(work_dir).name
    task = name.removesuffix(".launch") if name.endswith(".launch") else None
    stage = current_stage_name()
    label = "/".join(part for part in (stage, task) if part)
    with tracked_training(task), environment({JOB_LABEL_ENV: label}):
        return _run_training(entrypoint, job, env, logger, work_dir)


def _run_training(
    entrypoint: str, job: TrainingJob | dict[str, Any], env: EnvironmentProfile, logger: logging.Logger, work_dir: str | Path
) -> dict[str, Any]:
    if env.launcher == "in_process":  # the typed job itself: nothing to serialise or validate again
        return entry_point(entrypoint)(job)
    work = Path(work_dir)
    work.mkdir(parents=True, exist_ok=True)
    job_file, result_file = work / "job.json", work / "result.json"
    result_file.unlink(missing_ok=True)
    job_file.write_text(json.dumps({**job_payload(job), "_entrypoint": entrypoint, "_result_file": str(result_file)}, default=str))
    what = f"{env.launcher} x{env.num_processes}"
    if env.launcher == "torchrun" and env.multi_node is not None:
        with posted_job(env.multi_node, job_file, logger) as rdzv_id:
            stream_command(
                launch_command(env, job_file, rdzv_id=rdzv_id), logger,
                what=f"torchrun {env.multi_node.nodes} nodes x{env.num_processes}", log_file=work / "launch.log",
            )
    else:
        stream_command(launch_command(env, job_file), logger, what=what, log_file=work / "launch.log")
    if not result_file.exists():
        raise StageFailed(f"{env.launcher}: the workers exited cleanly but rank 0 wrote no result ({result_file})")
    return json.loads(result_file.read_text())


def main(argv: list[str] | None = None) -> int:
    """Worker side: `python -m tunepipe.tasks.training.launcher JOB.json` (the installed tunepipe:
workers need no PYTHONPATH from us)."""
    args = sys.argv[1:] if argv is None else argv
    args = [a for a in args if not a.startswith("--local_rank") and not a.startswith("--local-rank")]
    if len(args) != 1:
        print("usage: python -m tunepipe.tasks.training.launcher JOB.json", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    run_job(json.loads(Path(args[0]).read_text()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
