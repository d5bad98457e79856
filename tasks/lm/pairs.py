"""Pieces the reward and align stages share: trainer arguments from the config and profile,
preference pairs and prompts from the data artifact, step metrics and their plot.

Hyper-parameters come from `schemas.training.TrainingConfig`; batch, accumulation, precision,
checkpointing and device from the `EnvironmentProfile` (through `tasks.training.hardware.Hardware.precision_flags`,
the same flags the sft stage uses), so a CPU profile yields `use_cpu=True, bf16=False,
gradient_checkpointing=False` here exactly as it does for SFT.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

from tunepipe.tasks.core.jsonl import read_jsonl
from tunepipe.tasks.core.stage import StageFailed
from tunepipe.tasks.lm.encoding import data_messages, read_split, record_messages

PREFERENCES_FILE = "preferences.jsonl"


HELDOUT_SPLITS = ("validation", "test")


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


def conversational_pair(pair: dict[str, Any], tokenizer: Any = None) -> dict[str, Any]:
    """A pair in TRL's conversational preference format (the tokenizer's chat template renders it;
    with `tokenizer`, contents are made to tokenize as text: see encoding.data_messages)."""
    def text(messages: list[dict[str, str]]) -> list[dict[str, str]]:
        return data_messages(tokenizer, messages) if tokenizer is not None else messages

    return {
        "prompt": text(pair_prompt(pair)),
        "chosen": text([{"role": "assistant", "content": pair["chosen"]}]),
        "rejected": text([{"role": "assistant", "content": pair["rejected"]}]),
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
    return tokenizer.apply_chat_template(data_messages(tokenizer, messages), tokenize=False, add_generation_prompt=True)


def render_conversation(tokenizer: Any, prompt: list[dict[str, str]], response: str) -> str:
    messages = data_messages(tokenizer, [*prompt, {"role": "assistant", "content": response}])
    return tokenizer.apply_chat_template(messages, tokenize=False)
