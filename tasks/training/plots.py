"""Loss curves and per-step metric series: from a Trainer's log history to PNGs and summaries.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any


def plot_loss(history: list[dict[str, float]], path: Path, title: str) -> None:
    """The loss curve as a PNG (matplotlib, Agg backend)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=100)
    for label, points in _by_series(history).items():
        ax.plot([p["step"] for p in points], [p["loss"] for p in points], marker=".", label=label)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("training loss")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    if len(_by_series(history)) > 1:
        ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def _by_series(history: list[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    series: dict[str, list[dict[str, Any]]] = {}
    for point in history:
        series.setdefault(point.get("series", "train"), []).append(point)
    return series



def step_history(log_history: list[dict[str, Any]], keys: dict[str, str]) -> dict[str, list[dict[str, float]]]:
    """{our name: [{step, value}]} for the TRL log keys in `keys` ({trl key: our name})."""
    out: dict[str, list[dict[str, float]]] = {}
    for entry in log_history:
        if "step" not in entry:
            continue
        for trl_key, name in keys.items():
            if trl_key in entry and entry[trl_key] is not None:
                out.setdefault(name, []).append({"step": int(entry["step"]), "value": round(float(entry[trl_key]), 6)})
    return out


def plot_series(series: dict[str, list[dict[str, float]]], path: Path, title: str) -> None:
    """One small panel per metric, value against optimizer step (PNG, Agg backend)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [n for n, points in series.items() if points] or ["(no metrics)"]
    cols = min(3, len(names))
    rows = (len(names) + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(4 * cols, 2.8 * rows), dpi=90, squeeze=False)
    for ax, name in zip(axes.flat, names):
        points = series.get(name, [])
        ax.plot([p["step"] for p in points], [p["value"] for p in points], marker=".")
        ax.set_title(name, fontsize=9)
        ax.set_xlabel("step", fontsize=8)
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(names):]:
        ax.axis("off")
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def summarize_series(series: dict[str, list[dict[str, float]]]) -> dict[str, dict[str, float]]:
    """First, last and mean value of each step metric."""
    out = {}
    for name, points in series.items():
        values = [p["value"] for p in points]
        if values:
            out[name] = {"first": values[0], "last": values[-1], "mean": round(sum(values) / len(values), 6)}
    return out
