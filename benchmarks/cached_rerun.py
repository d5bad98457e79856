"""Cached rerun: `tunepipe run` of an unchanged pipeline against its first run.

    .venv/bin/python benchmarks/cached_rerun.py --cpus 2                        # the quickstart, 3 reruns
    .venv/bin/python benchmarks/cached_rerun.py --max-steps 5 --repeats 1       # a smoke run

The first run computes every stage in a fresh workdir (the baseline); then the same command
runs N more times unchanged. Each rerun must report every stage cached (same keys as the first
run); its wall time (process start to exit, Python and Prefect start-up included, as a user
waits for it) is the figure. Reported: the first run's wall, the reruns' median, their ratio,
and whether the median meets the target of 30 s (on 2 cores: pin with `--cpus 2` on a bigger
machine).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks._common import QUICKSTART, bench_config, header, median, print_result, ratio, rounded, run_cli  # noqa: E402

TARGET_S = 30.0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("config", nargs="?", default=str(QUICKSTART), help="pipeline YAML (default: the quickstart)")
    parser.add_argument("--repeats", type=int, default=3, help="unchanged reruns after the first run")
    parser.add_argument("--max-steps", type=int, default=None, help="override training.max_steps of every training stage")
    parser.add_argument("--cpus", type=int, default=None, help="pin every run to this many CPUs (the target is for 2)")
    parser.add_argument("--workdir", default=None, help="where the benchmark writes (default: a new temp dir)")
    return parser


def check_cached(first: dict, rerun: dict) -> list[str]:
    """Problems of a rerun: a stage not reported cached, or a key that changed."""
    problems = []
    for name, stage in first["stages"].items():
        again = rerun["stages"].get(name)
        if again is None:
            problems.append(f"{name}: missing from the rerun")
        elif not again["cached"]:
            problems.append(f"{name}: recomputed")
        elif again["key"] != stage["key"]:
            problems.append(f"{name}: key changed {stage['key']} -> {again['key']}")
    return problems


def main() -> None:
    args = build_parser().parse_args()
    work = Path(args.workdir or tempfile.mkdtemp(prefix="bench-cached-")).resolve()
    if (work / "workdir" / "artifacts").exists():
        raise SystemExit(f"{work}/workdir already has artifacts: the first run must compute every stage (use a new --workdir)")
    config_path, config = bench_config(args.config, work, max_steps=args.max_steps)
    first = run_cli(config_path, log=work / "logs" / "first.log", cpus=args.cpus)
    if len(first.computed_stages()) != len(first.summary["stages"]):
        raise RuntimeError(f"the first run reused cached stages: {first.summary['stages']}")
    reruns = []
    for index in range(args.repeats):
        run = run_cli(config_path, log=work / "logs" / f"rerun-{index}.log", cpus=args.cpus)
        problems = check_cached(first.summary, run.summary)
        reruns.append({
            "wall_s": rounded(run.wall_s),
            "cached": {name: s["cached"] for name, s in run.summary["stages"].items()},
            "problems": problems,
        })
        print(f"rerun {index}: {run.wall_s:.1f}s{'; ' + '; '.join(problems) if problems else ''}", file=sys.stderr)
    rerun_s = median(r["wall_s"] for r in reruns)
    all_cached = all(not r["problems"] for r in reruns)
    print_result({
        **header("cached_rerun.py", sys.argv[1:]),
        "config": str(Path(args.config).resolve()),
        "workdir": str(work),
        "stages": list(first.summary["stages"]),
        "cpus": args.cpus,
        "first_run_wall_s": rounded(first.wall_s),
        "first_run_stage_s": {name: rounded(first.stage_seconds(name)) for name in first.computed_stages()},
        "rerun_wall_s_median": rounded(rerun_s),
        "rerun_to_first_ratio": rounded(ratio(rerun_s, first.wall_s)),
        "every_stage_cached": all_cached,
        "target_s": TARGET_S,
        "meets_target": all_cached and rerun_s <= TARGET_S,
        "reruns": reruns,
    })


if __name__ == "__main__":
    main()
