"""Resume: kill `tunepipe run` during SFT at ~70% of its steps, rerun, and compare.

    .venv/bin/python benchmarks/resume.py                                       # the quickstart, 3 repeats
    .venv/bin/python benchmarks/resume.py --max-steps 10 --save-steps 3 --repeats 1   # a smoke run

A warm-up run computes every stage up to sft once (sft always: it tells the sft runs' step
counts and order; per-task adapters train one after another). Then, N times, in alternating order:
- uninterrupted: `tunepipe run --until sft` with no published sft artifact, to the end;
- killed + resumed: the same run, SIGKILLed (its whole process group: the CLI and the Prefect
  server it started) as soon as the sft stage has completed the optimizer step at `--kill-at`
  (0.7) of its total steps; then the same command again, which resumes from the last checkpoint
  in the stage's staging dir.
Before the uninterrupted and the killed run, the published sft artifact (in the benchmark's own
workdir) is deleted, so each computes sft as a first run would; data, base model and pretrain
stay cached.

Figures per repeat, medians reported:
- remainder_s: the uninterrupted run's wall from the end of the step the killed run had last
  completed to the end of the run (what was left to do at the moment of the kill);
- resume_s: the rerun's wall, start to exit (Prefect start-up, model load, checkpoint restore,
  the lost steps again, the rest); ratio = resume_s / remainder_s, and resume_s - remainder_s is
  the cost of the interruption;
- steps recomputed: optimizer steps the rerun executed that the killed run had already completed
  (exact, from the step log; see benchmarks/_common.py). Target: at most one checkpoint interval
  (`training.save_steps`) per training run.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks._common import (  # noqa: E402
    QUICKSTART,
    CliRun,
    Step,
    bench_config,
    cumulative_step,
    header,
    kill_group,
    median,
    print_result,
    ratio,
    read_step_log,
    recomputed_steps,
    remove_published,
    require_training,
    rounded,
    run_cli,
    run_order,
    start_cli,
)

STAGE = "sft"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("config", nargs="?", default=str(QUICKSTART), help="pipeline YAML (default: the quickstart)")
    parser.add_argument("--repeats", type=int, default=3, help="uninterrupted / killed+resumed pairs (alternating order)")
    parser.add_argument("--kill-at", type=float, default=0.7, help="fraction of the sft steps after which the run is killed")
    parser.add_argument("--max-steps", type=int, default=None, help="override training.max_steps of every training stage")
    parser.add_argument("--save-steps", type=int, default=None, help="override training.save_steps (the checkpoint interval)")
    parser.add_argument("--no-heldout", action="store_true", help="turn off the sft held-out generation check (shorter runs)")
    parser.add_argument("--cpus", type=int, default=None, help="pin the measured processes to this many CPUs")
    parser.add_argument("--timeout", type=float, default=3600, help="seconds to wait for the kill point")
    parser.add_argument("--workdir", default=None, help="where the benchmark writes (default: a new temp dir)")
    return parser


def kill_target(order: dict[str, int], fraction: float) -> int:
    """The cumulative sft step after which the run is killed (at least 1, before the last)."""
    total = sum(order.values())
    if total < 2:
        raise SystemExit(f"sft trains {total} step(s): too few to kill in the middle (raise --max-steps)")
    return min(max(1, math.ceil(fraction * total)), total - 1)


def run_killed(config: Path, work: Path, index: int, order: dict[str, int], target: int, cpus: int | None, timeout: float) -> tuple[list[Step], float]:
    """Start the run, SIGKILL it once the sft stage has completed cumulative step `target`."""
    step_log = work / "steps" / f"killed-{index}.jsonl"
    step_log.parent.mkdir(parents=True, exist_ok=True)
    proc, handle, started = start_cli(config, "--until", STAGE, log=work / "logs" / f"killed-{index}.log", cpus=cpus, step_log=step_log)
    try:
        deadline = time.monotonic() + timeout
        while True:
            steps = read_step_log(step_log, STAGE)
            if steps and cumulative_step(steps[-1], order) >= target:
                break
            if proc.poll() is not None:
                raise RuntimeError(f"the run ended (exit {proc.returncode}) before sft step {target}: see {handle.name}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"sft did not reach step {target} within {timeout:.0f}s: see {handle.name}")
            time.sleep(0.02)
    finally:
        kill_group(proc)
        handle.close()
    return read_step_log(step_log, STAGE), time.time() - started


def run_logged(config: Path, work: Path, name: str, cpus: int | None) -> tuple[CliRun, list[Step]]:
    step_log = work / "steps" / f"{name}.jsonl"
    step_log.parent.mkdir(parents=True, exist_ok=True)
    run = run_cli(config, "--until", STAGE, log=work / "logs" / f"{name}.log", cpus=cpus, step_log=step_log)
    return run, read_step_log(step_log, STAGE)


def remainder_s(uninterrupted: CliRun, steps: list[Step], last: Step) -> float:
    """Wall of the uninterrupted run from the end of step `last` (same run, same step) to its exit."""
    for step in steps:
        if (step.run, step.step) == (last.run, last.step):
            return uninterrupted.ended - step.t
    raise RuntimeError(f"the uninterrupted run has no step {last.run}/{last.step}")


def resumed_from(resumed: CliRun) -> dict[str, Any]:
    metrics = json.loads((Path(resumed.stage(STAGE)["path"]) / "metrics.json").read_text())
    return {run: m.get("resumed_from") for run, m in metrics.items()}


def one_repeat(config: Path, work: Path, index: int, order: dict[str, int], target: int, args: argparse.Namespace) -> dict[str, Any]:
    sides = ["uninterrupted", "killed"] if index % 2 == 0 else ["killed", "uninterrupted"]
    figures: dict[str, Any] = {"order": f"{sides[0]}-first"}
    for side in sides:
        remove_published(config.parent / "workdir", STAGE)
        if side == "uninterrupted":
            figures["_u"] = run_logged(config, work, f"uninterrupted-{index}", args.cpus)
        else:
            killed_steps, killed_wall = run_killed(config, work, index, order, target, args.cpus, args.timeout)
            resumed, resumed_steps = run_logged(config, work, f"resumed-{index}", args.cpus)
            if resumed.stage(STAGE)["cached"]:
                raise RuntimeError(f"the rerun after the kill found sft cached: nothing resumed (log {resumed.log})")
            # Read now: the uninterrupted run, when it comes second, republishes sft at the same path.
            figures["resumed_from"] = resumed_from(resumed)
            figures["_k"] = (killed_steps, killed_wall, resumed, resumed_steps)
    uninterrupted, u_steps = figures.pop("_u")
    killed_steps, killed_wall, resumed, resumed_steps = figures.pop("_k")
    last = killed_steps[-1]
    left = remainder_s(uninterrupted, u_steps, last)
    again = recomputed_steps(killed_steps, resumed_steps)
    figures.update({
        "killed_after_s": rounded(killed_wall),
        "killed_at_step": {"run": last.run, "step": last.step, "cumulative": cumulative_step(last, order)},
        "uninterrupted_wall_s": rounded(uninterrupted.wall_s),
        "remainder_s": rounded(left),
        "resume_s": rounded(resumed.wall_s),
        "ratio": rounded(ratio(resumed.wall_s, left)),
        "interruption_cost_s": rounded(resumed.wall_s - left),
        "steps_recomputed": again,
        "steps_recomputed_total": sum(again.values()),
    })
    return figures


def main() -> None:
    args = build_parser().parse_args()
    work = Path(args.workdir or tempfile.mkdtemp(prefix="bench-resume-")).resolve()
    config_path, config = bench_config(
        args.config, work, max_steps=args.max_steps, save_steps=args.save_steps, heldout=not args.no_heldout
    )
    require_training(config, args.config, (STAGE,))
    save_steps = config[STAGE].get("training", {}).get("save_steps")
    if save_steps is None:
        from tunepipe.schemas.training import TrainingConfig

        save_steps = TrainingConfig().save_steps
    remove_published(config_path.parent / "workdir", STAGE)  # the warm-up must train sft to log its steps
    warmup, warmup_steps = run_logged(config_path, work, "warmup", args.cpus)
    order = run_order(warmup_steps)
    if not order:
        raise SystemExit(f"the warm-up run logged no sft steps (log {warmup.log}): is the launcher in_process?")
    target = kill_target(order, args.kill_at)
    repeats = []
    for index in range(args.repeats):
        figures = one_repeat(config_path, work, index, order, target, args)
        repeats.append(figures)
        print(
            f"repeat {index}: killed at {figures['killed_at_step']}, resume {figures['resume_s']}s vs remainder "
            f"{figures['remainder_s']}s, {figures['steps_recomputed_total']} step(s) recomputed", file=sys.stderr,
        )
    worst = max(max(r["steps_recomputed"].values(), default=0) for r in repeats)
    print_result({
        **header("resume.py", sys.argv[1:]),
        "config": str(Path(args.config).resolve()),
        "workdir": str(work),
        "sft_runs": order,
        "sft_steps": sum(order.values()),
        "save_steps": save_steps,
        "kill_at": args.kill_at,
        "kill_after_cumulative_step": target,
        "remainder_s_median": rounded(median(r["remainder_s"] for r in repeats)),
        "resume_s_median": rounded(median(r["resume_s"] for r in repeats)),
        "ratio_median": rounded(median(r["ratio"] for r in repeats)),
        "interruption_cost_s_median": rounded(median(r["interruption_cost_s"] for r in repeats)),
        "steps_recomputed_median": median(r["steps_recomputed_total"] for r in repeats),
        "steps_recomputed_max_per_run": worst,
        "target_steps_recomputed": save_steps,
        "meets_target": worst <= save_steps,
        "repeats": repeats,
    })


if __name__ == "__main__":
    main()
