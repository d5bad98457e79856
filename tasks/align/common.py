"""Pieces the reward and align stages share: trainer arguments from the config and profile,
preference pairs and prompts from the data artifact, step metrics and their plot.

Hyper-parameters come from `schemas.sft.TrainingConfig`; batch, accumulation, precision,
checkpointing and device from the `EnvironmentProfile` (through `tasks.peft_methods.precision_flags`,
the same flags the sft stage uses), so a CPU profile yields `use_cpu=True, bf16=False,
gradient_checkpointing=False` here exactly as it does for SFT.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from schemas.environment import EnvironmentProfile
from schemas.manifest import ArtifactRef
from schemas.sft import TrainingConfig
from tasks import peft_methods
from tasks.jsonl import read_jsonl
from tasks.sft.data import read_split, record_messages
from tasks.stage import StageFailed

PREFERENCES_FILE = "preferences.jsonl"
HELDOUT_SPLITS = ("validation", "test")


def training_kwargs(training: TrainingConfig, env: EnvironmentProfile, output_dir: str | Path) -> dict[str, Any]:
    """`TrainingArguments` keywords shared by every TRL config (DPOConfig, RewardConfig, PPOConfig, ...)."""
    return peft_methods.training_arguments(training, env, output_dir=output_dir, optim=training.optimizer)


def read_outputs(ref: ArtifactRef | str, stage: str) -> dict[str, Any]:
    """A training artifact's `outputs.json` ({kind, paths, method, base_model})."""
    path = Path(ref.path if isinstance(ref, ArtifactRef) else ref) / "outputs.json"
    if not path.is_file():
        raise StageFailed(f"{stage}: {path} is missing: the input is not an sft/align/reward artifact")
    return json.loads(path.read_text())


def read_manifest_config(ref: ArtifactRef | str) -> dict[str, Any]:
    path = Path(ref.path if isinstance(ref, ArtifactRef) else ref) / "manifest.json"
    return json.loads(path.read_text()).get("config", {}) if path.is_file() else {}


# --------------------------------------------------------------------------------------------
# Preference pairs and prompts


def is_heldout(pair: dict[str, Any], heldout_fraction: float) -> bool:
    """Held out: the data stage's validation/test pairs; a pair without a split by a hash of its prompt."""
    split = pair.get("split")
    if split is not None:
        return split in HELDOUT_SPLITS
    digest = hashlib.sha256(pair["prompt"].encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64 < heldout_fraction


def read_pairs(data_dir: str | Path, stage: str, tasks: list[str] | None) -> list[dict[str, Any]]:
    """The data artifact's preference pairs (of `tasks`, if given); StageFailed when there are none."""
    path = Path(data_dir) / PREFERENCES_FILE
    if not path.is_file():
        raise StageFailed(
            f"{stage}: {path} does not exist: add a `format: preference` source to data.sources "
            "(records with prompt/chosen/rejected)"
        )
    pairs = read_jsonl(path)
    if tasks is not None:
        present = sorted({p.get("task", "default") for p in pairs})
        pairs = [p for p in pairs if p.get("task", "default") in tasks]
        if not pairs:
            raise StageFailed(f"{stage}: no preference pairs of tasks {tasks} in {path} (tasks present: {present})")
    if not pairs:
        raise StageFailed(f"{stage}: {path} has no preference pairs")
    return pairs


def split_pairs(pairs: list[dict[str, Any]], heldout_fraction: float) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(train pairs, held-out pairs)."""
    train = [p for p in pairs if not is_heldout(p, heldout_fraction)]
    heldout = [p for p in pairs if is_heldout(p, heldout_fraction)]
    return train, heldout


def pair_prompt(pair: dict[str, Any]) -> list[dict[str, str]]:
    """A pair's prompt as messages: its own (on-policy pairs keep the whole conversation) or one user turn."""
    return pair.get("prompt_messages") or [{"role": "user", "content": pair["prompt"]}]


def conversational_pair(pair: dict[str, Any]) -> dict[str, Any]:
    """A pair in TRL's conversational preference format (the tokenizer's chat template renders it)."""
    return {
        "prompt": pair_prompt(pair),
        "chosen": [{"role": "assistant", "content": pair["chosen"]}],
        "rejected": [{"role": "assistant", "content": pair["rejected"]}],
    }


def prompt_records(data_dir: str | Path, split: str, tasks: list[str] | None, limit: int | None = None) -> list[dict[str, Any]]:
    """{prompt: messages up to the last assistant turn, reference: its content, task} of a split."""
    out = []
    for record in read_split(data_dir, split):
        task = str(record.get("task") or "default")
        if tasks is not None and task not in tasks:
            continue
        messages = record_messages(record)
        last = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
        out.append({"prompt": messages[:last], "reference": messages[last]["content"], "task": task})
        if limit is not None and len(out) >= limit:
            break
    return out


def render_prompt(tokenizer: Any, messages: list[dict[str, str]]) -> str:
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def render_conversation(tokenizer: Any, prompt: list[dict[str, str]], response: str) -> str:
    return tokenizer.apply_chat_template([*prompt, {"role": "assistant", "content": response}], tokenize=False)


# --------------------------------------------------------------------------------------------
# Step metrics


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
