"""The evaluation report: markdown (the Prefect UI summary and report.md), the same rendered as
HTML (report.html, by markdown-it), and matplotlib PNGs next to them."""

from __future__ import annotations

from pathlib import Path
from typing import Any

HTML_STYLE = (
    "body{font-family:sans-serif;max-width:70em;margin:2em auto;padding:0 1em}"
    "table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #ccc;padding:.3em .6em;text-align:left}"
    "th{background:#f3f3f3}img{max-width:48%;margin-right:1%}"
)


def cell(value: Any) -> str:
    """A markdown table cell: numbers rounded, text on one line with pipes escaped."""
    if value is None:
        return "–"
    if isinstance(value, float):
        return f"{value:.2e}" if 0 < abs(value) < 0.001 else f"{value:.3f}"  # small p-values stay visible
    text = str(value).replace("\r", "").replace("\n", " ⏎ ").replace("|", "\\|")
    return text if len(text) <= 200 else text[:197] + "..."


def table(header: list[str], rows: list[list[Any]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def verdict_section(metrics: dict[str, Any]) -> str:
    word = "**PROMOTE**" if metrics["gate_passed"] else "**REJECT**"
    lines = [f"Verdict: {word} candidate `{metrics['candidate']}` over baseline `{metrics['baseline']}`.", ""]
    lines += [f"- {reason}" for reason in metrics["gate_reasons"]]
    if "winner" in metrics:
        lines += ["", f"Ships: **{metrics['winner'] or 'nothing'}**: {metrics['winner_reason']}."]
    fallback = metrics.get("fallback")
    if fallback:
        word = "PASS" if fallback["gate_passed"] else "FAIL"
        lines += ["", f"`sft` against the base ({word}):", ""] + [f"- {reason}" for reason in fallback["gate_reasons"]]
    return "\n".join(lines)


def task_section(metrics: dict[str, Any]) -> str:
    names = metrics["metric_names"]
    rows = []
    for task, scores in metrics["tasks"].items():
        cand, base = scores["candidate"], scores["baseline"]
        for name in names:
            rows.append([task, name, cand[name], base[name], round(cand[name] - base[name], 4), scores["n"]])
    return table(["task", "metric", "candidate", "baseline", "Δ", "n"], rows)


def ab_section(metrics: dict[str, Any]) -> str:
    ab = metrics["ab"]
    win = ab["win_rate"]
    level = round(100 * win["confidence_level"])
    rows = [[ab["judge"], win["n"], win["wins"], win["ties"], win["losses"], win["win_rate"], f"[{cell(win['ci_low'])}, {cell(win['ci_high'])}]"]]
    text = table(["judge", "prompts", "wins", "ties", "losses", f"win rate (ties: {win['ties_policy']})", f"{level}% CI"], rows)
    sign, boot = ab["sign_test"], ab["paired_bootstrap"]
    tests = table(
        ["test on " + metrics["primary_metric"], "result", "p-value"],
        [
            ["sign test", f"{sign['better']} better / {sign['worse']} worse / {sign['ties']} equal", sign["p_value"]],
            ["paired bootstrap", f"mean Δ {cell(boot['mean_difference'])}, {level}% CI [{cell(boot['ci_low'])}, {cell(boot['ci_high'])}]", boot["p_value"]],
        ],
    )
    per_task = table(
        ["task", "wins", "ties", "losses"],
        [[task, c["wins"], c["ties"], c["losses"]] for task, c in ab["per_task"].items()],
    )
    return f"{text}\n\n{tests}\n\n{per_task}"


def regression_section(metrics: dict[str, Any]) -> str:
    rows = [[name, r["candidate"], r["baseline"], round(r["candidate"] - r["baseline"], 4), r["source"]] for name, r in metrics["regression"].items()]
    return table(["regression task", "candidate", "baseline", "Δ", "scored by"], rows)


def lm_eval_section(metrics: dict[str, Any]) -> str:
    rows = []
    for task, by_model in metrics["lm_eval"].items():
        for key in by_model.get("candidate", {}):
            if "_stderr" in key or key == "sample_len":
                continue
            rows.append([task, key, by_model["candidate"].get(key), by_model.get("baseline", {}).get(key)])
    return table(["lm-eval task", "metric", "candidate", "baseline"], rows)


def examples_section(examples: dict[str, list[dict[str, Any]]]) -> str:
    parts = []
    for task, rows in examples.items():
        parts.append(f"**{task}**\n\n" + table(
            ["prompt", "reference", "baseline", "candidate", "judged"],
            [[r["prompt"], r["reference"], r["baseline"], r["candidate"], r["outcome"]] for r in rows],
        ))
    return "\n\n".join(parts)


def markdown_report(metrics: dict[str, Any], examples: dict[str, list[dict[str, Any]]], plots: list[str]) -> str:
    sections = [
        f"# Evaluation: `{metrics['candidate']}` vs `{metrics['baseline']}`",
        verdict_section(metrics),
        "## Task metrics (test split)\n\n" + task_section(metrics),
        f"## A/B ({metrics['ab']['judge']} judge)\n\n" + ab_section(metrics),
    ]
    if metrics["regression"]:
        sections.append("## Forgetting check (tasks not trained on)\n\n" + regression_section(metrics))
    if metrics["lm_eval"]:
        sections.append("## lm-eval\n\n" + lm_eval_section(metrics))
    if plots:
        sections.append("## Plots\n\n" + "\n".join(f"![{Path(p).stem}]({p})" for p in plots))
    if examples:
        sections.append("## Examples\n\n" + examples_section(examples))
    return "\n\n".join(sections) + "\n"


def html_report(markdown: str, title: str) -> str:
    from markdown_it import MarkdownIt

    body = MarkdownIt("commonmark").enable("table").render(markdown)
    return f"<!doctype html>\n<html><head><meta charset='utf-8'><title>{title}</title><style>{HTML_STYLE}</style></head><body>\n{body}</body></html>\n"


def plot_task_metrics(metrics: dict[str, Any], path: Path) -> None:
    """Grouped bars: the primary metric per task, baseline and candidate."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    name = metrics["primary_metric"]
    tasks = list(metrics["tasks"]) + [f"{t} (regression)" for t in metrics["regression"]]
    cand = [s["candidate"][name] for s in metrics["tasks"].values()] + [r["candidate"] for r in metrics["regression"].values()]
    base = [s["baseline"][name] for s in metrics["tasks"].values()] + [r["baseline"] for r in metrics["regression"].values()]
    fig, ax = plt.subplots(figsize=(max(4, 1.4 * len(tasks) + 2), 3.5))
    xs = range(len(tasks))
    ax.bar([x - 0.2 for x in xs], base, width=0.4, label="baseline", color="#999999")
    ax.bar([x + 0.2 for x in xs], cand, width=0.4, label="candidate", color="#3274a1")
    ax.set_xticks(list(xs), tasks, rotation=20, ha="right")
    ax.set_ylim(0, 1.05)
    ax.set_ylabel(name)
    ax.set_title(f"{name} per task")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_ab(metrics: dict[str, Any], path: Path) -> None:
    """Wins / ties / losses per task as stacked bars, and the overall win rate with its interval."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ab = metrics["ab"]
    tasks = list(ab["per_task"])
    fig, (left, right) = plt.subplots(1, 2, figsize=(8, 3.5), gridspec_kw={"width_ratios": [3, 1]})
    bottom = [0] * len(tasks)
    for outcome, colour in (("wins", "#3a923a"), ("ties", "#bbbbbb"), ("losses", "#c03d3e")):
        values = [ab["per_task"][t][outcome] for t in tasks]
        left.bar(tasks, values, bottom=bottom, label=outcome, color=colour)
        bottom = [b + v for b, v in zip(bottom, values)]
    left.set_ylabel("prompts")
    left.set_title(f"A/B per task ({ab['judge']} judge)")
    left.legend()
    win = ab["win_rate"]
    # The interval is on the share of decisive pairs won (ties carry no evidence), so that share is
    # the point it brackets; the tie-as-half win rate can lie outside it.
    point = win.get("decisive_win_rate")
    if point is not None:
        low = win["ci_low"] if win["ci_low"] is not None else point
        high = win["ci_high"] if win["ci_high"] is not None else point
        right.errorbar([0], [point], yerr=[[point - low], [high - point]], fmt="o", capsize=6)
    right.axhline(0.5, color="#999999", linestyle="--", linewidth=1)
    right.set_xlim(-1, 1)
    right.set_xticks([])
    right.set_ylim(0, 1)
    right.set_title("win rate (decisive pairs)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def write_report(directory: Path, metrics: dict[str, Any], examples: dict[str, list[dict[str, Any]]]) -> str:
    """Write the PNGs, report.md and report.html; return the markdown."""
    plot_task_metrics(metrics, directory / "task_metrics.png")
    plot_ab(metrics, directory / "ab.png")
    plots = ["task_metrics.png", "ab.png"]
    markdown = markdown_report(metrics, examples, plots)
    (directory / "report.md").write_text(markdown)
    (directory / "report.html").write_text(html_report(markdown, f"Evaluation: {metrics['candidate']} vs {metrics['baseline']}"))
    return markdown
