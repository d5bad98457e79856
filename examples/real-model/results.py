"""The real-model README's tables, written from a run's manifests (never typed by hand).

    python examples/real-model/results.py [WORKDIR]            # print the tables of the latest evaluate run
    python examples/real-model/results.py [WORKDIR] --write    # replace them in examples/real-model/README.md
    python examples/real-model/results.py [WORKDIR] --check    # exit 1 when the README's results differ

WORKDIR defaults to pipeline.yaml's, examples/real-model/runs/real-model. The run is the newest `evaluate` artifact and what fed it (the
quickstart's results.py finds it the same way and is reused here). Metrics are read generically: every
metric evaluate reports per task becomes a row (base, SFT, aligned), and every regression set evaluate
scored (the forgetting check: general-chat retention and the like) and every `retention` figure a stage
reports becomes a row, so new metrics and sets appear without editing this script. Wall times vary with
the machine and live in a second table that --check leaves alone.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from tunepipe.examples.quickstart.results import (
    RESULTS_BEGIN,
    RESULTS_END,
    TIMES_BEGIN,
    TIMES_END,
    latest_artifact,
    lineage,
    readme_block,
    replace_block,
    times_markdown,
)

README = Path(__file__).resolve().parent / "README.md"


def with_export(workdir: Path, stages: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """`stages` plus the newest export of this run's trained artifacts (export reads sft/align, not evaluate, so
    evaluate's lineage does not reach it), for its wall time."""
    trained = {(s, stages[s]["key"]) for s in ("sft", "align") if s in stages}
    exports = [json.loads(p.read_text()) for p in (workdir / "artifacts" / "export").glob("*/manifest.json")]
    mine = [m for m in exports if {(r["stage"], r["key"]) for r in m.get("inputs", {}).values()} & trained]
    if not mine:
        return stages
    return {**stages, "export": max(mine, key=lambda m: m["timings"]["finished_at"])}


def _f(value: Any, digits: int = 2) -> str:
    return f"{value:.{digits}f}" if isinstance(value, (int, float)) and not isinstance(value, bool) else "—"


def _metric_names(evaluate: dict[str, Any]) -> list[str]:
    """The metrics evaluate scored, in its own order, then any other numeric one its tasks hold."""
    m = evaluate["metrics"]
    names = list(m.get("metric_names") or [])
    for scores in m.get("candidate_metrics", {}).values():
        names += [k for k, v in scores.items() if isinstance(v, (int, float)) and not isinstance(v, bool) and k not in names]
    return names


def task_rows(stages: dict[str, dict[str, Any]]) -> list[str]:
    """Per task and metric: the base, the SFT adapter and the aligned adapter on the same test prompts.

    Base: evaluate's baseline when it is the base model, else what SFT's held-out check measured with its
    adapter disabled. SFT: SFT's held-out check (same first test records per task when its
    max_examples_per_task equals evaluate's). Aligned: evaluate's candidate when it is the align artifact.
    """
    e = stages["evaluate"]["metrics"]
    heldout = stages["sft"]["metrics"].get("heldout", {}) if "sft" in stages else {}
    candidate, baseline = e.get("candidate_metrics", {}), e.get("baseline_metrics", {})
    rows = []
    for task in sorted(set(candidate) | set(heldout)):
        h = heldout.get(task, {})
        n = e.get("tasks", {}).get(task, {}).get("n") or h.get("n")
        for metric in _metric_names(stages["evaluate"]):
            base = baseline.get(task, {}).get(metric) if e.get("baseline") == "base" else h.get(f"base_{metric}")
            aligned = candidate.get(task, {}).get(metric) if e.get("candidate") == "align" else None
            if base is None and h.get(metric) is None and aligned is None:
                continue
            rows.append(f"| {task} | {metric.replace('_', ' ')} (n={n}) | {_f(base)} | {_f(h.get(metric))} | {_f(aligned)} |")
    return rows


def _leaves(value: Any, prefix: str = "") -> list[tuple[str, Any]]:
    """Numeric leaves of a nested metrics value, as (dotted path, number)."""
    if isinstance(value, dict):
        return [leaf for k, v in value.items() for leaf in _leaves(v, f"{prefix}.{k}" if prefix else str(k))]
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return [(prefix, value)]
    return []


def retention_rows(stages: dict[str, dict[str, Any]]) -> list[str]:
    """Evaluate's regression sets (candidate against its baseline), and any `retention` figure a stage reports."""
    e = stages["evaluate"]["metrics"]
    rows = []
    for task, r in sorted((e.get("regression") or {}).items()):
        n = f", n={r['n']}" if "n" in r else ""
        rows.append(f"| `evaluate` | regression set {task} ({r.get('source', '')}{n}): {e.get('baseline')} → {e.get('candidate')} | "
                    f"{_f(r.get('baseline'))} → {_f(r.get('candidate'))} |")
    for stage in ("sft", "align", "evaluate"):
        for key, value in sorted((stages.get(stage, {}).get("metrics") or {}).items()):
            if "retention" in key:
                figures = ", ".join(f"{path} {number if isinstance(number, int) else _f(number)}"
                                    for path, number in _leaves(value)) or str(value)
                rows.append(f"| `{stage}` | {key.replace('_', ' ')} | {figures} |")
    return rows


def stage_rows(stages: dict[str, dict[str, Any]]) -> list[str]:
    rows = []
    sft = stages["sft"]["metrics"]
    if sft.get("eval_loss"):
        rows.append("| `sft` | validation loss on answer tokens | "
                    + ", ".join(f"{run} {_f(loss, 3)}" for run, loss in sorted(sft["eval_loss"].items())) + " |")
    for run, h in sorted((stages.get("align", {}).get("metrics", {}).get("heldout") or {}).items()):
        prefs = h.get("preferences") or {}
        if prefs:
            rows.append(f"| `align` {run} | held-out pairs (n={prefs['n']}): log-likelihood prefers chosen, SFT → aligned | "
                        f"{_f(prefs.get('sft_accuracy'))} → {_f(prefs.get('aligned_accuracy'))} |")
    rows += retention_rows(stages)
    e = stages["evaluate"]["metrics"]
    rows.append(gate_row(e))
    fallback = e.get("fallback")
    if fallback:  # the candidate was held back: evaluate judged the SFT adapters against the base by the same gate
        for task, r in sorted((fallback.get("regression") or {}).items()):
            n = f", n={r['n']}" if "n" in r else ""
            rows.append(f"| `evaluate` | regression set {task} ({r.get('source', '')}{n}): {fallback.get('baseline')} → "
                        f"{fallback.get('candidate')} | {_f(r.get('baseline'))} → {_f(r.get('candidate'))} |")
        rows.append(gate_row(fallback))
    if "winner" in e:
        rows.append(f"| `evaluate` | what export and deploy ship | {shipped(e)} |")
    return rows


def shipped(e: dict[str, Any]) -> str:
    """Evaluate's winner and the decisions that made it (each gate's rule lines are the rows above)."""
    def judged(m: dict[str, Any]) -> str:
        return f"{m.get('candidate')} {'passed' if m.get('gate_passed') else 'held back'} against {m.get('baseline')}"

    steps = [judged(e)] + ([judged(e["fallback"])] if e.get("fallback") else [])
    return f"**{e['winner'] or 'nothing'}** ({'; '.join(steps)})"


def _cell(text: Any) -> str:
    return str(text).replace("|", "/")


def gate_row(e: dict[str, Any]) -> str:
    """The gate's verdict on one candidate against its baseline, with every rule's line."""
    verdict = "**promoted**" if e.get("gate_passed") else "**held back**"
    return (f"| `evaluate` | gate, {e.get('candidate')} against {e.get('baseline')} | {verdict}: "
            + "; ".join(_cell(r) for r in e.get("gate_reasons", [])) + " |")


def results_markdown(stages: dict[str, dict[str, Any]]) -> str:
    """The results tables of one run (stage → manifest), deterministic given the artifacts."""
    e = stages["evaluate"]["metrics"]
    model = (stages["sft"].get("config") or {}).get("model_gguf", {}).get("note")
    base = "SmolLM2-135M-Instruct" + (f" ({model})" if model else "")
    return "\n".join([
        f"Test records, greedy answers. Base = {base}; SFT = the `{stages['sft']['metrics'].get('method', 'sft')}` adapter; "
        f"aligned = the DPO adapter (evaluate's candidate `{e.get('candidate')}`, against baseline `{e.get('baseline')}`).",
        "",
        "| task | metric | base | SFT | aligned |",
        "|---|---|---|---|---|",
        *task_rows(stages),
        "",
        "| stage | what | result |",
        "|---|---|---|",
        *stage_rows(stages),
    ])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("workdir", nargs="?", default=str(README.parent / "runs" / "real-model"),
                        help="the run's workdir (default: pipeline.yaml's, examples/real-model/runs/real-model)")
    action = parser.add_mutually_exclusive_group()
    action.add_argument("--write", action="store_true", help=f"replace the tables in {README.name}")
    action.add_argument("--check", action="store_true", help=f"exit 1 when {README.name}'s results table differs")
    args = parser.parse_args(argv)
    workdir = Path(args.workdir).resolve()
    stages = lineage(workdir, latest_artifact(workdir, "evaluate"))
    results, times = results_markdown(stages), times_markdown(with_export(workdir, stages))
    if args.check:
        committed = readme_block(README.read_text(), RESULTS_BEGIN, RESULTS_END)
        if committed != results:
            sys.stderr.write(f"{README} does not match the run in {workdir}: rerun with --write and commit.\n"
                             f"--- README\n{committed}\n--- run\n{results}\n")
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
