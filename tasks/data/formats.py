"""Source layouts → internal records (plain dicts, see `schemas/records.py` for the contract).

An internal record is a dict with `kind` (instruction | chat | preference | text), `task` and
the kind's text fields. A record that cannot be parsed raises `RecordError(reason, detail)`;
the stage turns that into a line of rejected.jsonl.
"""

from __future__ import annotations

import re
from typing import Any, Callable

# Aliases seen in the wild for chat roles (sharegpt uses human/gpt).
TASK_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")  # the pattern of a source's `task`

ROLE_ALIASES = {
    "system": "system",
    "user": "user",
    "human": "user",
    "prompter": "user",
    "assistant": "assistant",
    "gpt": "assistant",
    "bot": "assistant",
    "model": "assistant",
    "chatgpt": "assistant",
    "tool": "tool",
    "function": "tool",
    "observation": "tool",
}

# Which text fields of each kind are cleaned, and which one is the training target.
TEXT_FIELDS = {
    "instruction": ("instruction", "input", "output", "system"),
    "preference": ("prompt", "chosen", "rejected"),
    "text": ("text",),
}
FAMILY = {"instruction": "sft", "chat": "sft", "preference": "preference", "text": "text"}


class RecordError(Exception):
    """A record that cannot become a canonical record; `reason` goes into the report."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(reason, detail)
        self.reason = reason
        self.detail = detail


def _text(raw: dict, name: str, required: bool = True) -> str:
    value = raw.get(name)
    if value is None:
        if required:
            raise RecordError("missing_field", f"missing {name!r}")
        return ""
    if isinstance(value, str):
        return value
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)  # csv/parquet numbers as answers ("42") are legitimate text
    raise RecordError("invalid_field", f"{name!r} is a {type(value).__name__}, not text")


def detect_format(raw: dict) -> str | None:
    """The layout of one record from its keys (for `format: auto`)."""
    if "conversations" in raw:
        return "sharegpt"
    if "messages" in raw:
        return "messages"
    if "chosen" in raw or "rejected" in raw:
        return "preference"
    if "instruction" in raw or "output" in raw:
        return "alpaca"
    if "text" in raw:
        return "text"
    return None


def parse_alpaca(raw: dict, task: str) -> dict:
    instruction = _text(raw, "instruction")
    output = _text(raw, "output")
    extra = _text(raw, "input", required=False)
    system = _text(raw, "system", required=False) or None
    history = raw.get("history")
    if history:
        # Multi-turn alpaca: earlier (instruction, response) pairs make it a conversation.
        if not isinstance(history, list):
            raise RecordError("invalid_field", "'history' is not a list of [instruction, response] pairs")
        messages = [{"role": "system", "content": system}] if system else []
        for pair in history:
            if not (isinstance(pair, (list, tuple)) and len(pair) == 2 and all(isinstance(x, str) for x in pair)):
                raise RecordError("invalid_field", "'history' item is not an [instruction, response] pair of strings")
            messages.append({"role": "user", "content": pair[0]})
            messages.append({"role": "assistant", "content": pair[1]})
        messages.append({"role": "user", "content": instruction + (f"\n\n{extra}" if extra else "")})
        messages.append({"role": "assistant", "content": output})
        return {"kind": "chat", "task": task, "messages": messages}
    return {"kind": "instruction", "task": task, "instruction": instruction, "input": extra, "output": output, "system": system}


def _messages(items: Any, role_key: str, content_key: str, field: str) -> list[dict]:
    if not isinstance(items, list) or not items:
        raise RecordError("missing_field" if not items else "invalid_field", f"{field!r} is not a non-empty list")
    messages = []
    for item in items:
        if not isinstance(item, dict):
            raise RecordError("invalid_messages", f"{field!r} item is not an object")
        role = item.get(role_key, item.get("role"))
        content = item.get(content_key, item.get("content"))
        mapped = ROLE_ALIASES.get(str(role).lower()) if role is not None else None
        if mapped is None:
            raise RecordError("invalid_messages", f"unknown role {role!r}")
        if not isinstance(content, str):
            raise RecordError("invalid_messages", f"{field!r} item has no text content")
        messages.append({"role": mapped, "content": content})
    return messages


def parse_sharegpt(raw: dict, task: str) -> dict:
    messages = _messages(raw.get("conversations"), "from", "value", "conversations")
    system = raw.get("system")
    if isinstance(system, str) and system.strip() and messages[0]["role"] != "system":
        messages.insert(0, {"role": "system", "content": system})
    return {"kind": "chat", "task": task, "messages": messages}


def parse_messages(raw: dict, task: str) -> dict:
    return {"kind": "chat", "task": task, "messages": _messages(raw.get("messages"), "role", "content", "messages")}


def _last_content(value: Any, name: str) -> str:
    # chosen/rejected given as conversations (HH-RLHF style): the final turn is the response.
    if isinstance(value, list) and value and isinstance(value[-1], dict):
        content = value[-1].get("content", value[-1].get("value"))
        if isinstance(content, str):
            return content
    raise RecordError("invalid_field", f"{name!r} is neither text nor a list of messages")


def parse_preference(raw: dict, task: str) -> dict:
    fields = {}
    for name in ("chosen", "rejected"):
        value = raw.get(name)
        fields[name] = _last_content(value, name) if isinstance(value, list) else _text(raw, name)
    if raw.get("prompt") is None and isinstance(raw.get("chosen"), list):
        turns = [m.get("content", "") for m in raw["chosen"][:-1] if isinstance(m, dict) and m.get("role", m.get("from")) != "system"]
        prompt = "\n\n".join(t for t in turns if isinstance(t, str))
    else:
        prompt = _text(raw, "prompt")
    return {"kind": "preference", "task": task, "prompt": prompt, **fields}


def parse_text(raw: dict, task: str) -> dict:
    return {"kind": "text", "task": task, "text": _text(raw, "text")}


PARSERS: dict[str, Callable[[dict, str], dict]] = {
    "alpaca": parse_alpaca,
    "sharegpt": parse_sharegpt,
    "messages": parse_messages,
    "preference": parse_preference,
    "text": parse_text,
}


def parse_record(raw: Any, fmt: str, task: str, field_map: dict[str, str], task_field: str | None = None) -> dict:
    """One raw record → internal record dict (not yet cleaned)."""
    if not isinstance(raw, dict):
        raise RecordError("not_an_object", f"record is a {type(raw).__name__}, not an object")
    if field_map:
        raw = {field_map.get(key, key): value for key, value in raw.items()}
    if task_field and raw.get(task_field) not in (None, ""):
        task = record_task(raw.pop(task_field), task_field)
    if fmt == "auto":
        fmt = detect_format(raw)
        if fmt is None:
            raise RecordError("unknown_format", f"cannot tell the format from keys {sorted(raw)[:8]}")
    return PARSERS[fmt](raw, task)


def record_task(value: Any, field: str) -> str:
    """A task name read from a record: the same rule as a source's `task`."""
    if not isinstance(value, str) or not TASK_NAME.fullmatch(value):
        raise RecordError("bad_task", f"{field} {value!r} is not a task name (letters, digits, _ . -)")
    return value


# Which role may follow which (after an optional leading system message): a user turn, then the
# assistant; after the assistant another user turn or a tool result; after a tool result more
# results or the assistant. Chat templates assume this order (Mistral and Gemma raise on anything
# else, others render a conversation the model never sees in serving).
_NEXT_ROLES = {None: ("user",), "user": ("assistant",), "assistant": ("user", "tool"), "tool": ("tool", "assistant")}


def validate_chat(messages: list[dict]) -> None:
    """A trainable conversation: system first if any, then user/assistant alternating (tool results
    after an assistant turn), ending in an assistant turn. The reason names the first bad turn."""
    if len(messages) < 2 or messages[-1]["role"] != "assistant":
        raise RecordError("invalid_messages", "the last turn is not an assistant turn")
    if not any(m["role"] == "user" for m in messages):
        raise RecordError("invalid_messages", "no user turn")
    previous = None
    for index, message in enumerate(messages):
        role = message["role"]
        if role == "system" and index == 0:
            continue
        if role not in _NEXT_ROLES[previous]:
            roles = ", ".join(m["role"] for m in messages)
            expected = " or ".join(_NEXT_ROLES[previous])
            where = "a system message must come first" if role == "system" else f"expected {expected}"
            raise RecordError(
                "role_order", f"turn {index + 1} is {role}: {where} (roles [{roles}]; system first if any, then user and "
                "assistant alternating, ending in assistant)"
            )
        previous = role


def prompt_text(record: dict) -> str:
    """The prompt side of a record (contamination is checked on this); empty for text."""
    kind = record["kind"]
    if kind == "instruction":
        return f"{record['instruction']}\n{record['input']}" if record["input"] else record["instruction"]
    if kind == "chat":
        # System turns are boilerplate shared across examples: leave them out of the comparison.
        return "\n".join(m["content"] for m in record["messages"][:-1] if m["role"] != "system")
    if kind == "preference":
        return record["prompt"]
    return ""


def response_text(record: dict) -> str:
    """The training target: output, last assistant turn, chosen response, or the document."""
    kind = record["kind"]
    if kind == "instruction":
        return record["output"]
    if kind == "chat":
        return record["messages"][-1]["content"]
    if kind == "preference":
        return record["chosen"]
    return record["text"]


def content_parts(record: dict) -> list[str]:
    """All text of a record, in a fixed order: the basis of ids, exact keys and shingles."""
    kind = record["kind"]
    if kind == "instruction":
        return [record["system"] or "", record["instruction"], record["input"], record["output"]]
    if kind == "chat":
        return [f"{m['role']}: {m['content']}" for m in record["messages"]]
    return [record[name] for name in TEXT_FIELDS[kind]]


def public_record(record: dict) -> dict:
    """The record as written to the artifact (the `schemas/records.py` shape)."""
    kind = record["kind"]
    if kind == "instruction":
        out = {"id": record["id"], "task": record["task"], "instruction": record["instruction"], "input": record["input"], "output": record["output"]}
        if record["system"]:
            out["system"] = record["system"]
    elif kind == "chat":
        out = {"id": record["id"], "task": record["task"], "messages": record["messages"]}
    elif kind == "preference":
        out = {
            "id": record["id"], "task": record["task"], "prompt": record["prompt"], "chosen": record["chosen"],
            "rejected": record["rejected"], "split": record.get("split", "train"),
        }
    else:
        out = {"id": record["id"], "text": record["text"]}
    out["source"] = record["source"]
    return out
