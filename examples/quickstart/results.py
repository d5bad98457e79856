"""The quickstart README's results table, written from a run's manifests (never typed by hand).

    python examples/quickstart/results.py [WORKDIR]            # print the tables of the latest evaluate run
    python examples/quickstart/results.py [WORKDIR] --write    # replace them in examples/quickstart/README.md
    python examples/quickstart/results.py [WORKDIR] --check    # exit 1 when the README's table differs

WORKDIR defaults to ./runs/quickstart. The run is found from its newest `evaluate` artifact and the
artifacts that fed it (each manifest names its inputs' keys), so other configs' artifacts in the
same workdir do not mix in. The results table holds only what a stage computed from its inputs
(same key, same bytes), so a fresh run reproduces it exactly; wall times vary with the machine and
live in a second table that --check leaves alone.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

README = Path(__file__).resolve().parent / "README.md"
RESULTS_BEGIN, RESULTS_END = "<!-- results:begin -->", "<!-- results:end -->"
TIMES_BEGIN, TIMES_END = "<!-- times:begin -->", "<!-- times:end -->"
STAGE_ORDER = ("data", "base_model", "pretrain", "sft", "reward", "align", "evaluate", "export", "deploy")


def _manifest(path: Path) -> dict[str, Any]:
    return json.loads((path / "manifest.json").read_text())


def latest_artifact(workdir: Path, stage: str) -> Path:
    """The published artifact of `stage` that finished last (staging and failed runs are not published)."""
    published = [p for p in (workdir / "artifacts" / stage).glob("*") if (p / "manifest.json").is_file()]
    if not published:
        raise FileNotFoundError(f"no published {stage} artifact under {workdir}/artifacts/{stage}: run the quickstart first")
    return max(published, key=lambda p: _manifest(p)["timings"]["finished_at"])


def lineage(workdir: Path, last: Path) -> dict[str, dict[str, Any]]:
    """stage → manifest of `last` and every artifact it was computed from."""
    found: dict[str, dict[str, Any]] = {}
    todo = [last]
    while todo:
        path = todo.pop()
        manifest = _manifest(path)
        found[manifest["stage"]] = manifest
        for ref in manifest.get("inputs", {}).values():
            if ref["stage"] not in found:
                todo.append(workdir / "artifacts" / ref["stage"] / ref["key"])
    return found


def _f(value: float | None, digits: int = 2) -> str:
    return "—" if value is None else f"{value:.{digits}f}"


def _task_rows(sft: dict[str, Any], evaluate: dict[str, Any]) -> list[str]:
    """Base, SFT and the evaluate candidate per task, on the same first test records of each task."""
    rows = []
    heldout = sft["metrics"].get("heldout", {})
    candidate = evaluate["metrics"].get("candidate_metrics", {})
    baseline = evaluate["metrics"].get("baseline_metrics", {})
    for task in sorted(heldout):
        h, c = heldout[task], candidate.get(task, {})
        for metric, label in (("exact_match", "exact match"), ("token_f1", "token F1")):
            rows.append(
                f"| {task} | {label} (n={h['n']}) | {_f(h[f'base_{metric}'])} | {_f(h[metric])} | "
                f"{_f(c.get(metric))} | {_f(baseline.get(task, {}).get(metric))} |"
            )
    return rows


def _align_rows(align: dict[str, Any]) -> list[str]:
    m = align["metrics"]
    rows = []
    for run, h in sorted(m.get("heldout", {}).items()):
        prefs, task = h.get("preferences") or {}, h.get("task") or {}
        if prefs:
            rows.append(
                f"| `align` {run} | held-out pairs (n={prefs['n']}): log-likelihood prefers chosen, SFT → aligned | "
                f"{_f(prefs['sft_accuracy'])} → **{_f(prefs['aligned_accuracy'])}** |"
            )
            rows.append(
                f"| | DPO implicit reward vs SFT: accuracy / mean margin | "
                f"{_f(prefs['implicit_reward_accuracy'])} / {prefs['implicit_reward_margin']:+.3f} |"
            )
        if task:
            metric = task["task_metric"]
            rows.append(
                f"| | {metric.replace('_', ' ')} SFT → aligned (n={task['n']}, tolerance {m.get('task_tolerance')}) | "
                f"{_f(task['sft'][metric])} → {_f(task['aligned'][metric])}: "
                f"{'within' if task['task_metric_within_tolerance'] else '**beyond**'} |"
            )
            extra = f"; reward model win rate over SFT {_f(task['win_rate'])}" if "win_rate" in task else ""
            rows.append(f"| | KL(aligned ‖ SFT) per answer token | {task['kl_to_sft']:.4f}{extra} |")
    return rows


def results_markdown(stages: dict[str, dict[str, Any]]) -> str:
    """The results tables of one run (stage → manifest), deterministic given the artifacts."""
    sft, evaluate = stages["sft"], stages["evaluate"]
    e = evaluate["metrics"]
    base = "the `pretrain` stage's model" if "pretrain" in stages else "the `base_model` stage's model"
    lines = [
        f"Held-out test records, greedy answers. Base = {base} (the adapter disabled); SFT = the per-task "
        f"`{sft['metrics']['method']}` adapters; candidate = evaluate's `{e['candidate']}`, compared with its "
        f"baseline `{e['baseline']}` on the same prompts.",
        "",
        "| task | metric | base | SFT | candidate | evaluate's baseline |",
        "|---|---|---|---|---|---|",
        *_task_rows(sft, evaluate),
        "",
        "| stage | what | result |",
        "|---|---|---|",
    ]
    if "pretrain" in stages:
        p = stages["pretrain"]["metrics"]
        lines.append(
            f"| `pretrain` | corpus validation loss / perplexity after {p['global_step']} steps | "
            f"{_f(p.get('eval_loss'), 3)} / {_f(p.get('eval_perplexity'))} |"
        )
    eval_loss = sft["metrics"].get("eval_loss", {})
    lines.append(
        "| `sft` | validation loss on answer tokens, per task | "
        + ", ".join(f"{run} {_f(loss, 3)}" for run, loss in sorted(eval_loss.items()))
        + " |"
    )
    if "reward" in stages:
        r = stages["reward"]["metrics"]
        lines.append(
            f"| `reward` | held-out pairwise accuracy (n={r['heldout_pairs']}), before → after | "
            f"{_f(r['heldout_accuracy_before'])} → **{_f(r['heldout_accuracy'])}** |"
        )
    if "align" in stages:
        lines.extend(_align_rows(stages["align"]))
    ab = e.get("ab", {})
    win = ab.get("win_rate", {})
    judge = ab.get("judge", "rule")
    judged_on = f" on {e['primary_metric']}" if judge == "rule" else ""
    level = round(100 * win.get("confidence_level", 0.95))
    lines.append(
        f"| `evaluate` | {e['candidate']} vs {e['baseline']} judged by {judge}{judged_on}: wins / ties / losses; share of "
        f"decisive pairs won [exact {level}% CI]; win rate, ties as half | {e['wins']} / {e['ties']} / {e['losses']}; "
        f"{_f(win.get('decisive_win_rate'))} [{_f(e['win_rate_ci_low'])}, {_f(e['win_rate_ci_high'])}]; {_f(e['win_rate'])} |"
    )
    verdict = "**promoted**" if e["gate_passed"] else "**held back**"
    lines.append(f"| | gate | {verdict}: " + "; ".join(r.replace("|", "/") for r in e["gate_reasons"]) + " |")
    return "\n".join(lines)


def times_markdown(stages: dict[str, dict[str, Any]]) -> str:
    """Wall seconds per stage as recorded in the manifests (they vary with the machine and its load)."""
    order = [s for s in STAGE_ORDER if s in stages]
    total = sum(stages[s]["timings"]["seconds"] for s in order)
    return "\n".join(
        [
            "| " + " | ".join(order) + " | sum |",
            "|" + "---|" * (len(order) + 1),
            "| " + " | ".join(f"{stages[s]['timings']['seconds']:.0f} s" for s in order) + f" | {total / 60:.1f} min |",
        ]
    )


def _between(text: str, begin: str, end: str) -> tuple[int, int]:
    start, stop = text.find(begin), text.find(end)
    if start < 0 or stop < start:
        raise ValueError(f"{README}: markers {begin} ... {end} not found")
    return start + len(begin), stop


def readme_block(text: str, begin: str = RESULTS_BEGIN, end: str = RESULTS_END) -> str:
    start, stop = _between(text, begin, end)
    return text[start:stop].strip("\n")


def replace_block(text: str, block: str, begin: str, end: str) -> str:
    start, stop = _between(text, begin, end)
    return text[:start] + "\n" + block + "\n" + text[stop:]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("workdir", nargs="?", default="runs/quickstart", help="the run's workdir (default ./runs/quickstart)")
    action = parser.add_mutually_exclusive_group()
    action.add_argument("--write", action="store_true", help=f"replace the tables in {README.name}")
    action.add_argument("--check", action="store_true", help=f"exit 1 when {README.name}'s results table differs")
    args = parser.parse_args(argv)
    workdir = Path(args.workdir).resolve()
    stages = lineage(workdir, latest_artifact(workdir, "evaluate"))
    results, times = results_markdown(stages), times_markdown(stages)
    if args.check:
        committed = readme_block(README.read_text())
        if committed != results:
            sys.stderr.write(
                f"{README} does not match the run in {workdir}: rerun with --write and commit.\n"
                f"--- README\n{committed}\n--- run\n{results}\n"
            )
            return 1
        return 0
    if args.write:
        text = replace_block(README.read_text(), results, RESULTS_BEGIN, RESULTS_END)
        README.write_text(replace_block(text, times, TIMES_BEGIN, TIMES_END))
        return 0
    print(results + "\n\n" + times)
    return 0


if __name__ == "__main__":
    sys.exit(main())
