"""Data artifact records → token ids and labels, with the loss mask and truncation made explicit.

Every record becomes a conversation (`messages`; instruction/input/output records become
system? + user + assistant), rendered with the chosen chat template. Labels are -100 outside
the assistant's turns unless `train_on_inputs`. The assistant spans come from rendering each
prefix of the conversation, so any template works whose rendering of a prefix is a prefix of
the whole (every common chat template is). Over-long examples are cut, dropped or refused, and
always counted.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tunepipe.schemas.sft import NAMED_CHAT_TEMPLATES
from tunepipe.tasks.core.jsonl import read_jsonl
from tunepipe.tasks.core.stage import StageFailed

IGNORE = -100
SPLIT_FILES = {"train": "train.jsonl", "validation": "validation.jsonl", "test": "test.jsonl"}


def read_split(data_dir: str | Path, split: str) -> list[dict[str, Any]]:
    """The records of one split of a data artifact (empty when the file is absent)."""
    return read_jsonl(Path(data_dir) / SPLIT_FILES[split])


def record_messages(record: dict[str, Any], system_prompt: str | None = None) -> list[dict[str, str]]:
    """A record as a conversation: chat records as they are, instruction records as user + assistant."""
    if record.get("messages"):
        messages = [{"role": m["role"], "content": m["content"]} for m in record["messages"]]
    elif "instruction" in record and "output" in record:
        user = record["instruction"]
        if record.get("input"):
            user = f"{user}\n\n{record['input']}"
        messages = [{"role": "user", "content": user}, {"role": "assistant", "content": record["output"]}]
        if record.get("system"):
            messages.insert(0, {"role": "system", "content": record["system"]})
    else:
        raise StageFailed(f"record {record.get('id', '?')}: neither `messages` nor instruction/output fields")
    if system_prompt and messages[0]["role"] != "system":
        messages.insert(0, {"role": "system", "content": system_prompt})
    if not any(m["role"] == "assistant" for m in messages):
        raise StageFailed(f"record {record.get('id', '?')}: no assistant turn to train on")
    return messages


def resolve_chat_template(spec: str, tokenizer: Any) -> str:
    """`model` → the tokenizer's template; a name → the bundled one; a .jinja path → its text; else the string."""
    if spec == "model":
        if not tokenizer.chat_template:
            raise StageFailed(
                "chat_template: model, but the model's tokenizer has no chat template: set chat_template to "
                f"one of {', '.join(NAMED_CHAT_TEMPLATES)} or give a Jinja template"
            )
        return tokenizer.chat_template
    if spec in NAMED_CHAT_TEMPLATES:
        return NAMED_CHAT_TEMPLATES[spec]
    if spec.endswith((".jinja", ".j2")) and "{" not in spec:
        path = Path(spec)
        if not path.is_file():
            raise StageFailed(f"chat_template: {spec}: no such file")
        return path.read_text()
    return spec


@dataclass
class Encoded:
    input_ids: list[int]
    labels: list[int]
    truncated: bool


def render_messages(tokenizer: Any, template: str, messages: list[dict[str, str]], generation_prompt: bool) -> str:
    return tokenizer.apply_chat_template(
        messages, chat_template=template, tokenize=False, add_generation_prompt=generation_prompt
    )


def encode_conversation(
    tokenizer: Any, template: str, messages: list[dict[str, str]], *, max_length: int | None, train_on_inputs: bool
) -> Encoded:
    """Token ids and labels of one conversation (labels -100 outside assistant turns)."""
    text = render_messages(tokenizer, template, messages, False)
    spans: list[tuple[int, int]] = []
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        before = render_messages(tokenizer, template, messages[:i], True) if i else ""
        upto = render_messages(tokenizer, template, messages[: i + 1], False)
        if not (text.startswith(upto) and upto.startswith(before)):
            raise StageFailed(
                "the chat template does not render a conversation's prefix as a prefix of the whole, so the "
                "assistant's tokens cannot be located: use another chat_template"
            )
        spans.append((len(before), len(upto)))
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids = list(enc["input_ids"])
    if train_on_inputs:
        labels = list(ids)
    else:
        labels = [
            tok if any(start <= a < end for start, end in spans) and b > a else IGNORE
            for tok, (a, b) in zip(ids, enc["offset_mapping"])
        ]
    truncated = max_length is not None and len(ids) > max_length
    if truncated:
        ids, labels = ids[:max_length], labels[:max_length]
    return Encoded(ids, labels, truncated)


@dataclass
class SplitStats:
    """What happened to one split's records."""

    examples: int = 0
    kept: int = 0
    truncated: int = 0
    dropped_overlong: int = 0
    dropped_no_target: int = 0
    tokens: int = 0
    target_tokens: int = 0
    per_task: Counter = field(default_factory=Counter)

    def as_dict(self) -> dict[str, Any]:
        return {
            "examples": self.examples, "kept": self.kept, "truncated": self.truncated,
            "dropped_overlong": self.dropped_overlong, "dropped_no_target": self.dropped_no_target,
            "tokens": self.tokens, "target_tokens": self.target_tokens, "per_task": dict(self.per_task),
        }


def encode_records(
    records: list[dict[str, Any]],
    tokenizer: Any,
    template: str,
    *,
    max_length: int,
    train_on_inputs: bool,
    overlong: str = "truncate",
    system_prompt: str | None = None,
    split: str = "train",
) -> tuple[dict[str, list[dict[str, list[int]]]], SplitStats]:
    """Encode records grouped by task: ({task: [{input_ids, labels}]}, stats)."""
    by_task: dict[str, list[dict[str, list[int]]]] = {}
    stats = SplitStats()
    for record in records:
        stats.examples += 1
        enc = encode_conversation(
            tokenizer, template, record_messages(record, system_prompt), max_length=max_length, train_on_inputs=train_on_inputs
        )
        if enc.truncated:
            if overlong == "fail":
                raise StageFailed(
                    f"{split} record {record.get('id', '?')} is longer than max_length {max_length} tokens "
                    "(overlong: fail): raise max_length, or set overlong to truncate or drop"
                )
            if overlong == "drop":
                stats.dropped_overlong += 1
                continue
            stats.truncated += 1
        if all(label == IGNORE for label in enc.labels):
            stats.dropped_no_target += 1  # truncation cut away the whole answer: no loss to learn from
            continue
        task = str(record.get("task") or "default")
        by_task.setdefault(task, []).append({"input_ids": enc.input_ids, "labels": enc.labels})
        stats.kept += 1
        stats.per_task[task] += 1
        stats.tokens += len(enc.input_ids)
        stats.target_tokens += sum(label != IGNORE for label in enc.labels)
    return by_task, stats


def encode_texts(
    texts: list[str], tokenizer: Any, *, max_length: int | None
) -> tuple[list[dict[str, list[int]]], int]:
    """Plain documents for language modelling (loss on every token, EOS appended): (rows, truncated)."""
    rows, truncated = [], 0
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    for text in texts:
        ids = list(tokenizer(text, add_special_tokens=False)["input_ids"]) + eos
        if max_length is not None and len(ids) > max_length:
            ids, truncated = ids[:max_length], truncated + 1
        rows.append({"input_ids": ids, "labels": list(ids)})
    return rows, truncated
