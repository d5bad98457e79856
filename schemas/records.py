"""Canonical records written by the `data` stage and read by the training stages.

Every source format (alpaca, sharegpt, messages, preference, text) is normalised into one of
four shapes. The data stage builds these as plain dicts in its hot loop (pydantic per record
would cost more than the rest of the cleaning); the models below are the documented contract,
used by downstream readers and by the tests to check every written line.

Files in a data artifact:
- `train.jsonl`, `validation.jsonl`, `test.jsonl`: `InstructionRecord` or `ChatRecord` lines
  (a single-turn alpaca record stays an instruction record; multi-turn data is a chat record).
- `preferences.jsonl`: `PreferenceRecord` lines, each with its `split`.
- `corpus.jsonl`: `TextRecord` lines (continued pretraining).
"""

from __future__ import annotations

import hashlib
from typing import Literal

from pydantic import Field, TypeAdapter
from tunepipe.schemas.base import StrictModel

Role = Literal["system", "user", "assistant", "tool"]
Split = Literal["train", "validation", "test"]
SPLITS: tuple[str, ...] = ("train", "validation", "test")


class Message(StrictModel):
    """One chat turn."""

    role: Role = Field(description="Who speaks: system, user, assistant or tool.")
    content: str = Field(description="What is said, cleaned (NFKC, no control characters, no HTML).")


class InstructionRecord(StrictModel):
    """A single-turn supervised example (alpaca style)."""

    id: str = Field(description="Deterministic id: hash of task, kind and normalised content.")
    task: str = Field(description="Task name from the source config; splits are stratified per task.")
    instruction: str = Field(min_length=1, description="What the model is asked to do.")
    input: str = Field(default="", description="Optional context for the instruction; empty when absent.")
    output: str = Field(min_length=1, description="The target response; never empty.")
    system: str | None = Field(default=None, description="Optional system prompt.")
    source: str = Field(description="Where the record came from: `file:line` (row number for csv/parquet/datasets).")


class ChatRecord(StrictModel):
    """A (possibly multi-turn) conversation whose last turn is the assistant's target."""

    id: str = Field(description="Deterministic id: hash of task, kind and normalised content.")
    task: str = Field(description="Task name from the source config; splits are stratified per task.")
    messages: list[Message] = Field(min_length=2, description="The turns; the last one is an assistant turn.")
    source: str = Field(description="Where the record came from: `file:line` (row number for csv/parquet/datasets).")


class PreferenceRecord(StrictModel):
    """A pairwise preference example for DPO/reward modelling."""

    id: str = Field(description="Deterministic id: hash of task, kind and normalised content.")
    task: str = Field(description="Task name from the source config; splits are stratified per task.")
    prompt: str = Field(min_length=1, description="The prompt both responses answer.")
    chosen: str = Field(min_length=1, description="The preferred response.")
    rejected: str = Field(min_length=1, description="The dispreferred response.")
    split: Split = Field(description="The split this pair belongs to (hash of its id, stratified per task).")
    source: str = Field(description="Where the record came from: `file:line` (row number for csv/parquet/datasets).")


class TextRecord(StrictModel):
    """A raw document for continued pretraining."""

    id: str = Field(description="Deterministic id: hash of the source task and normalised text.")
    text: str = Field(min_length=1, description="The cleaned document.")
    source: str = Field(description="Where the record came from: `file:line`.")


SFTRecord = InstructionRecord | ChatRecord
_SFT_ADAPTER: TypeAdapter[SFTRecord] = TypeAdapter(SFTRecord)


def record_id(task: str, kind: str, *parts: str) -> str:
    """Deterministic 16-hex id from the task, the record kind and its normalised content."""
    text = "\x1e".join((f"{task}\x1f{kind}", *parts))
    return hashlib.blake2b(text.encode(), digest_size=8).hexdigest()


def parse_sft(row: dict) -> SFTRecord:
    """Validate one train/validation/test line as an instruction or chat record."""
    return _SFT_ADAPTER.validate_python(row)


def to_messages(row: dict) -> list[dict[str, str]]:
    """Chat turns for any SFT line, so trainers handle instruction and chat data alike."""
    if "messages" in row:
        return [{"role": m["role"], "content": m["content"]} for m in row["messages"]]
    messages = []
    if row.get("system"):
        messages.append({"role": "system", "content": row["system"]})
    user = row["instruction"] + (f"\n\n{row['input']}" if row.get("input") else "")
    messages.append({"role": "user", "content": user})
    messages.append({"role": "assistant", "content": row["output"]})
    return messages
