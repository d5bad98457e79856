"""report.json, the stage metrics, and the markdown/table shown in the Prefect UI."""

from __future__ import annotations

from collections import Counter, defaultdict
from typing import Any

from tunepipe.schemas.records import SPLITS
from tunepipe.tasks.data.formats import FAMILY

# Rejections that are not about data quality: they do not count towards max_rejected_fraction.
NON_QUALITY_REASONS = frozenset({"mix_downsampled"})


def split_counts(records: list[dict], kind_family: str) -> dict[str, dict[str, int]]:
    """task → split → rows, for one family (sft or preference), every split present."""
    counts: dict[str, dict[str, int]] = defaultdict(lambda: {split: 0 for split in SPLITS})
    for record in records:
        if FAMILY[record["kind"]] == kind_family:
            counts[record["task"]][record["split"]] += 1
    return {task: counts[task] for task in sorted(counts)}


def build_report(
    *,
    read: int,
    rejected: Counter,
    sft: list[dict],
    preferences: list[dict],
    corpus: list[dict],
    train_after_mix: int,
    mix_stats: dict[str, dict[str, int]],
    per_file: dict[str, Counter],
    cleaner_counts: dict[str, int],
    pii: dict[str, int],
    dedup: dict[str, Any],
    validation: dict[str, Any],
) -> dict[str, Any]:
    """report.json: what was done to the data, nothing about the run (same key, same bytes);
    step timings go to the manifest's metrics."""
    sft_tasks = split_counts(sft, "sft")
    preference_tasks = split_counts(preferences, "preference")
    splits = {split: sum(task[split] for task in sft_tasks.values()) for split in SPLITS}
    kept = sum(splits.values()) + len(preferences) + len(corpus)
    return {
        "read": read,
        "kept": kept,
        "rejected_total": sum(rejected.values()),
        "rejected": dict(sorted(rejected.items())),
        "splits": splits,
        "tasks": sft_tasks,
        "preferences": {
            "total": len(preferences),
            "splits": {split: sum(t[split] for t in preference_tasks.values()) for split in SPLITS},
            "tasks": preference_tasks,
        },
        "corpus": len(corpus),
        "train_after_mix": train_after_mix,
        "mix": mix_stats,
        "files": {label: dict(sorted(c.items())) for label, c in sorted(per_file.items())},
        "pii": dict(pii),
        "cleaning": dict(cleaner_counts),
        "dedup": dedup,
        "validation": validation,
    }


def quality_rejected(report: dict[str, Any]) -> int:
    return sum(n for reason, n in report["rejected"].items() if reason not in NON_QUALITY_REASONS)


def metrics(report: dict[str, Any], timings: dict[str, float]) -> dict[str, Any]:
    """Flat numbers for the manifest and the CLI JSON (with the seconds of each step)."""
    seconds = sum(timings.values())
    return {
        "read": report["read"],
        "kept": report["kept"],
        "rejected": report["rejected_total"],
        "rejected_fraction": round(quality_rejected(report) / report["read"], 6) if report["read"] else 0.0,
        "train": report["splits"]["train"],
        "validation": report["splits"]["validation"],
        "test": report["splits"]["test"],
        "train_after_mix": report["train_after_mix"],
        "preferences": report["preferences"]["total"],
        "corpus": report["corpus"],
        "tasks": len(report["tasks"]),
        "exact_duplicates": report["dedup"]["exact_duplicates"],
        "near_duplicates": report["dedup"]["near_duplicates"],
        "contamination": report["dedup"]["contamination"],
        "pii_email": report["pii"].get("email", 0),
        "pii_phone": report["pii"].get("phone", 0),
        "seconds": round(seconds, 3),
        "records_per_s": round(report["read"] / seconds, 1) if seconds else 0.0,
        **{f"seconds_{name}": round(value, 3) for name, value in timings.items()},
    }


def table(report: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per task: rows per split for supervised and preference data."""
    rows = []
    for family, tasks in (("sft", report["tasks"]), ("preference", report["preferences"]["tasks"])):
        for task, counts in tasks.items():
            row = {"family": family, "task": task, **counts}
            if family == "sft":
                row["train_after_mix"] = report["mix"].get(task, {}).get("after", counts["train"])
            rows.append(row)
    if report["corpus"]:
        rows.append({"family": "text", "task": "corpus", "train": report["corpus"], "validation": 0, "test": 0})
    return rows


def empty_source_warnings(report: dict[str, Any]) -> list[str]:
    """One line per source file that had records and kept none of them, with its top reasons."""
    out = []
    for label, counts in report["files"].items():
        if counts.get("read") and not counts.get("kept"):
            out.append(f"every record of {label} was rejected ({counts['read']} read); see rejected.jsonl")
    return out


def summary(report: dict[str, Any]) -> str:
    lines = [
        "## Data",
        "",
        f"Read **{report['read']}** records, kept **{report['kept']}**, rejected **{report['rejected_total']}**; "
        f"train {report['splits']['train']} ({report['train_after_mix']} after mixing), "
        f"validation {report['splits']['validation']}, test {report['splits']['test']}; "
        f"preferences {report['preferences']['total']}, corpus {report['corpus']}.",
        "",
    ]
    lines += [f"**Warning:** {w}" for w in report.get("warnings", [])] + ([""] if report.get("warnings") else [])
    if report["rejected"]:
        lines += ["| reason | rejected |", "| --- | ---: |"]
        lines += [f"| {reason} | {n} |" for reason, n in report["rejected"].items()]
        lines.append("")
    lines += ["| family | task | train | validation | test |", "| --- | --- | ---: | ---: | ---: |"]
    for row in table(report):
        lines.append(f"| {row['family']} | {row['task']} | {row['train']} | {row['validation']} | {row['test']} |")
    if any(report["pii"].values()):
        lines += ["", f"PII masked: {report['pii']}."]
    return "\n".join(lines) + "\n"
