"""Shared pieces of the pipeline benchmarks (orchestration_overhead, cached_rerun, resume).

Each benchmark runs the real `tunepipe run CONFIG --json` in a child process on a copy of a
pipeline YAML (the quickstart by default) with its own workdir, so nothing it does touches a
user's runs. The copy has absolute paths and the benchmark's overrides (fewer steps, another
checkpoint interval) applied to every training stage it has.

Run as a script, this file is the `tunepipe` command with one addition when
TUNEPIPE_BENCH_STEP_LOG is set: a Trainer callback that appends one JSON line per optimizer
step (stage, run, step, max_steps, wall time) to that file. The resume benchmark needs it to
kill SFT at a chosen step and to count recomputed steps exactly; it costs a file append per
step and runs in the measured process for the uninterrupted, killed and resumed runs alike.
"""

from __future__ import annotations

import json
import os
import platform
import signal
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from datetime import date
from pathlib import Path
from typing import Any, Iterable

REPO = Path(__file__).resolve().parent.parent
QUICKSTART = REPO / "examples" / "quickstart" / "pipeline.yaml"
TRAINING_STAGES = ("pretrain", "sft")
STEP_LOG_ENV = "TUNEPIPE_BENCH_STEP_LOG"
# Prefect settings of the caller's shell would point the child at another server or state dir:
# each benchmark run uses an ephemeral server with its state under the benchmark's workdir.
_DROPPED_ENV = ("PREFECT_HOME", "PREFECT_API_URL", "PREFECT_PROFILE")


# --------------------------------------------------------------------------------------------
# Figures


def median(values: Iterable[float]) -> float:
    """The median of the repeated measurements (the machines are noisy: medians, not means)."""
    values = list(values)
    if not values:
        raise ValueError("median of no measurements")
    return float(statistics.median(values))


def ratio(numerator: float, denominator: float) -> float | None:
    """numerator / denominator, or None when the denominator is not positive."""
    return numerator / denominator if denominator > 0 else None


def rounded(value: float | None, digits: int = 3) -> float | None:
    return None if value is None else round(value, digits)


def machine() -> dict[str, Any]:
    """What the figures were measured on: CPU, cores usable here, thread settings, versions."""
    from importlib import metadata

    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        usable = os.cpu_count()
    versions = {}
    for name in ("torch", "transformers", "trl", "peft", "prefect"):
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return {
        "platform": f"{platform.machine()}, {platform.processor() or platform.platform()}",
        "cpu_count": os.cpu_count(),
        "usable_cpus": usable,
        "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
        "python": platform.python_version(),
        "libraries": versions,
        "load_average_at_start": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
    }


def header(script: str, argv: list[str]) -> dict[str, Any]:
    """The date, machine and command every result starts with."""
    return {"date": date.today().isoformat(), "machine": machine(), "command": " ".join([f"benchmarks/{script}", *argv])}


def print_result(result: dict[str, Any]) -> None:
    print(json.dumps(result, indent=1, default=str))


# --------------------------------------------------------------------------------------------
# The pipeline under test


def bench_config(
    source: str | Path,
    dest_dir: str | Path,
    *,
    max_steps: int | None = None,
    save_steps: int | None = None,
    heldout: bool = True,
) -> tuple[Path, dict[str, Any]]:
    """Write the benchmark's copy of a pipeline YAML into `dest_dir`; return (path, its data).

    The copy is the loader's validated config (every relative path resolved against the source
    YAML's directory, so it can live anywhere) with `workdir` set to `dest_dir/workdir` and,
    on every training stage present, `training.max_steps` / `training.save_steps` replaced
    when given. `heldout=False` turns off the sft stage's held-out generation check.
    """
    import yaml

    from tunepipe.tasks.core.config import load_pipeline_config

    dest_dir = Path(dest_dir).resolve()
    dest_dir.mkdir(parents=True, exist_ok=True)
    config = load_pipeline_config(source, workdir=str(dest_dir / "workdir"))
    data = config.model_dump(mode="json", exclude_unset=True)
    for stage in training_stages(data):
        training = data[stage].setdefault("training", {})
        if max_steps is not None:
            training["max_steps"] = max_steps
        if save_steps is not None:
            training["save_steps"] = save_steps
    if not heldout and data.get("sft") is not None:
        data["sft"].setdefault("heldout", {})["max_examples_per_task"] = 0
    path = dest_dir / "pipeline.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    load_pipeline_config(path)  # the copy must still be a valid pipeline
    return path, data


def training_stages(config: dict[str, Any]) -> list[str]:
    """The training stages a pipeline config (as a dict) has, in pipeline order."""
    return [name for name in TRAINING_STAGES if config.get(name) is not None]


def require_training(config: dict[str, Any], source: str | Path, needed: tuple[str, ...] = TRAINING_STAGES) -> list[str]:
    stages = [name for name in training_stages(config) if name in needed]
    if not stages:
        raise SystemExit(f"{source}: the pipeline has no {' or '.join(needed)} section: nothing to benchmark")
    return stages


# --------------------------------------------------------------------------------------------
# Running the CLI


@dataclass
class CliRun:
    """One `tunepipe run` in a child process, as the benchmark saw it."""

    started: float  # time.time() just before the child started
    ended: float
    returncode: int | None
    summary: dict[str, Any] | None
    log: Path
    killed: bool = False
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def wall_s(self) -> float:
        return self.ended - self.started

    def stage(self, name: str) -> dict[str, Any]:
        if self.summary is None or name not in self.summary["stages"]:
            raise RuntimeError(f"run logged in {self.log}: no stage {name} in its summary")
        return self.summary["stages"][name]

    def computed_stages(self) -> list[str]:
        return [name for name, s in (self.summary or {"stages": {}})["stages"].items() if not s["cached"]]

    def stage_seconds(self, name: str) -> float:
        """Time inside the stage (its manifest's `timings.seconds`)."""
        return float(manifest(self.stage(name)["path"])["timings"]["seconds"])


def manifest(artifact_path: str | Path) -> dict[str, Any]:
    return json.loads((Path(artifact_path) / "manifest.json").read_text())


def cli_command(config: Path, *args: str) -> list[str]:
    """`tunepipe run CONFIG --json ARGS` through this file (the CLI, plus the step log if asked)."""
    return [sys.executable, str(Path(__file__).resolve()), "run", str(config), "--json", *args]


def child_env(step_log: Path | None = None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in _DROPPED_ENV and k != STEP_LOG_ENV}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    env.setdefault("HF_HUB_OFFLINE", "1")
    env.setdefault("HF_DATASETS_OFFLINE", "1")
    if step_log is not None:
        env[STEP_LOG_ENV] = str(step_log)
    return env


def _pin(cpus: int | None):
    if cpus is None:
        return None
    available = sorted(os.sched_getaffinity(0))
    if cpus > len(available):
        raise SystemExit(f"--cpus {cpus}: only {len(available)} CPUs are available to this process")
    return lambda: os.sched_setaffinity(0, available[:cpus])


def start_cli(config: Path, *args: str, log: Path, cpus: int | None = None, step_log: Path | None = None) -> tuple[subprocess.Popen, Any, float]:
    """Start `tunepipe run` in its own process group (so a kill also reaches Prefect's server)."""
    log.parent.mkdir(parents=True, exist_ok=True)
    if step_log is not None:  # a fresh log per run: the kill point and the counts read it whole
        step_log.parent.mkdir(parents=True, exist_ok=True)
        step_log.write_text("")
    handle = open(log, "w")
    # stdout goes to a file, not a pipe: a run that is killed before anyone reads its stdout
    # would otherwise block on a full pipe (Prefect logs there) and never reach the kill point.
    out = open(summary_file(log), "w")
    started = time.time()
    proc = subprocess.Popen(
        cli_command(config, *args), cwd=REPO, env=child_env(step_log), stdout=out, stderr=handle,
        text=True, start_new_session=True, preexec_fn=_pin(cpus),
    )
    out.close()  # the child holds its own descriptor
    return proc, handle, started


def summary_file(log: Path) -> Path:
    """Where a run's stdout (the `--json` summary on its last line) is written."""
    return log.with_suffix(".stdout")


def run_cli(config: Path, *args: str, log: Path, cpus: int | None = None, step_log: Path | None = None) -> CliRun:
    """Run `tunepipe run CONFIG --json ARGS` to completion; fail loudly if it fails."""
    proc, handle, started = start_cli(config, *args, log=log, cpus=cpus, step_log=step_log)
    proc.wait()
    ended = time.time()
    handle.close()
    stdout = summary_file(log).read_text()
    if proc.returncode != 0:
        tail = log.read_text()[-3000:]
        raise RuntimeError(f"tunepipe run {' '.join(args)} exited {proc.returncode} (log {log}):\n{tail}")
    return CliRun(started, ended, proc.returncode, parse_summary(stdout), log)


def kill_group(proc: subprocess.Popen) -> None:
    """SIGKILL the child's process group (the CLI and the ephemeral Prefect server it started)."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait()


def parse_summary(stdout: str) -> dict[str, Any]:
    """The JSON summary `tunepipe run --json` prints on its last line."""
    lines = [line for line in stdout.strip().splitlines() if line.strip()]
    if not lines:
        raise RuntimeError("tunepipe run printed no summary")
    return json.loads(lines[-1])


def remove_published(workdir: Path, stage: str) -> None:
    """Delete the stage's published artifacts in the benchmark's own workdir, so the next run
    computes the stage as a first run would (no cached artifact, no Prefect cache hit)."""
    import shutil

    root = workdir / "artifacts" / stage
    if root.is_dir():
        for path in root.iterdir():
            if not path.name.startswith(".") and (path / "manifest.json").exists():
                shutil.rmtree(path)


# --------------------------------------------------------------------------------------------
# The step log (see the module docstring)


@dataclass(frozen=True)
class Step:
    stage: str
    run: str
    step: int
    max_steps: int
    t: float


def read_step_log(path: Path, stage: str | None = None) -> list[Step]:
    """The logged optimizer steps (a torn last line from a killed writer is skipped)."""
    steps = []
    if not path.exists():
        return steps
    for line in path.read_text().splitlines():
        try:
            row = json.loads(line)
        except ValueError:
            continue
        if stage is None or row["stage"] == stage:
            steps.append(Step(row["stage"], row["run"], int(row["step"]), int(row["max_steps"]), float(row["t"])))
    return steps


def run_order(steps: list[Step]) -> dict[str, int]:
    """{run: max_steps} in the order the runs trained."""
    order: dict[str, int] = {}
    for s in steps:
        order.setdefault(s.run, s.max_steps)
    return order


def cumulative_step(step: Step, order: dict[str, int]) -> int:
    """The step's position among all the stage's steps (runs one after another, in `order`)."""
    before = 0
    for run, total in order.items():
        if run == step.run:
            return before + step.step
        before += total
    raise KeyError(f"run {step.run} is not in {list(order)}")


def recomputed_steps(killed: list[Step], resumed: list[Step]) -> dict[str, int]:
    """Per run: optimizer steps the resumed run executed that the killed run had completed."""
    done: dict[str, set[int]] = {}
    for s in killed:
        done.setdefault(s.run, set()).add(s.step)
    again: dict[str, int] = {}
    for s in resumed:
        if s.step in done.get(s.run, set()):
            again[s.run] = again.get(s.run, 0) + 1
    return again


def install_step_log(path: str) -> None:
    """Append one JSON line per optimizer step of every training run to `path`."""
    import tunepipe.tasks.sft.train as train

    original = train.make_callbacks

    def make_callbacks(model: Any, method: Any, label: str = "training") -> list[Any]:
        from transformers import TrainerCallback  # imported here: the CLI must start as fast as without the hook

        class StepLog(TrainerCallback):
            def on_step_end(self, args, state, control, **kwargs):
                if not state.is_world_process_zero:
                    return
                parts = Path(args.output_dir).parts  # .../artifacts/<stage>/.staging/<key>/.checkpoints/<run>
                stage = parts[parts.index(".staging") - 1] if ".staging" in parts else "?"
                row = {"stage": stage, "run": parts[-1], "step": state.global_step, "max_steps": state.max_steps, "t": time.time()}
                with open(path, "a") as handle:
                    handle.write(json.dumps(row) + "\n")

        return [*original(model, method, label), StepLog()]

    train.make_callbacks = make_callbacks


if __name__ == "__main__":
    sys.path.insert(0, str(REPO))
    if os.environ.get(STEP_LOG_ENV):
        install_step_log(os.environ[STEP_LOG_ENV])
    from tunepipe.flows.cli.main import main

    sys.exit(main(sys.argv[1:]))
