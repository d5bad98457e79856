"""Byte-order marks and UTF-16/32 in every text source type (issue 29, item 3)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tunepipe.schemas.data import SourceConfig
from tunepipe.tasks.data.sources import Malformed, UnreadableEncoding, files_to_read, read_file

ROWS = [{"instruction": "Qu'est-ce que ça?", "output": "Ünïcode ✓"}, {"instruction": "second", "output": "two"}]


def read_all(path: Path, **source) -> list[tuple[str, object]]:
    config = SourceConfig(path=str(path), **source)
    return [item for file, kind, label in files_to_read(config) for item in read_file(file, kind, label, config)]


def text_of(kind: str) -> str:
    if kind == "jsonl":
        return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in ROWS)
    if kind == "json":
        return json.dumps(ROWS, ensure_ascii=False, indent=1)
    if kind == "csv":
        return "instruction,output\r\n" + "".join(f'"{r["instruction"]}","{r["output"]}"\r\n' for r in ROWS)
    return "\n\n".join(r["instruction"] for r in ROWS) + "\n"


def expected(kind: str) -> list[dict]:
    return [{"text": r["instruction"]} for r in ROWS] if kind == "txt" else ROWS


@pytest.mark.parametrize("encoding", ["utf-8-sig", "utf-16", "utf-16-le-bom", "utf-16-be-bom", "utf-32", "utf-32-be-bom"])
@pytest.mark.parametrize("kind", ["jsonl", "json", "csv", "txt"])
def test_boms_are_read_transparently(tmp_path, kind, encoding):
    text = text_of(kind)
    if encoding.endswith("-bom"):  # an explicit byte order with its BOM written by hand
        codec = encoding.removesuffix("-bom")
        data = "\ufeff".encode(codec) + text.encode(codec)
    else:
        data = text.encode(encoding)
    path = tmp_path / f"data.{kind}"
    path.write_bytes(data)
    records = read_all(path, format="text" if kind == "txt" else "alpaca")
    assert [raw for _, raw in records] == expected(kind)
    assert not any(isinstance(raw, Malformed) for _, raw in records)
    assert records[0][0] == f"data.{kind}:1" or kind in ("csv", "json")


@pytest.mark.parametrize("codec, name", [("utf-16-le", "UTF-16"), ("utf-32-le", "UTF-32")])
def test_utf16_and_32_without_a_bom_are_refused_naming_the_encoding(tmp_path, codec, name):
    path = tmp_path / "data.jsonl"
    path.write_bytes(text_of("jsonl").encode(codec))
    with pytest.raises(UnreadableEncoding, match=f"looks like {name} without a byte-order mark"):
        read_all(path)


def test_a_bom_csv_keeps_its_first_column(tmp_path):
    """Excel's "CSV UTF-8": the BOM must not become part of the first header name."""
    path = tmp_path / "excel.csv"
    path.write_bytes(b"\xef\xbb\xbfinstruction,output\r\nhello,world\r\n")
    assert read_all(path) == [("excel.csv:2", {"instruction": "hello", "output": "world"})]


# -- role order (issue 29, item 5) -----------------------------------------------------------

from tunepipe.tasks.data.formats import RecordError, validate_chat  # noqa: E402


def chat(*roles: str) -> list[dict]:
    return [{"role": r, "content": f"{r} text"} for r in roles]


@pytest.mark.parametrize("roles, turn", [
    (("system", "assistant", "user", "assistant"), 2),
    (("user", "user", "assistant"), 2),
    (("user", "assistant", "system", "user", "assistant"), 3),
    (("assistant", "user", "assistant"), 1),
    (("user", "tool", "assistant"), 2),
])
def test_impossible_role_orders_are_rejected_naming_the_turn(roles, turn):
    with pytest.raises(RecordError) as caught:
        validate_chat(chat(*roles))
    assert caught.value.reason == "role_order" and f"turn {turn} is {roles[turn - 1]}" in caught.value.detail


@pytest.mark.parametrize("roles", [
    ("user", "assistant"), ("system", "user", "assistant"), ("user", "assistant", "user", "assistant"),
    ("user", "assistant", "tool", "tool", "assistant"),
])
def test_possible_role_orders_pass(roles):
    validate_chat(chat(*roles))


def test_sharegpt_with_impossible_order_is_rejected_with_file_and_line(tmp_path):
    import logging

    from tunepipe.schemas.data import DataConfig
    from tunepipe.tasks.core.environment import load_environment
    from tunepipe.tasks.core.stage import StageContext
    from tunepipe.tasks.data.stage import DataStage

    rows = [
        {"conversations": [{"from": "human", "value": "hi there friend"}, {"from": "gpt", "value": "hello to you"}]},
        {"conversations": [{"from": "system", "value": "be nice"}, {"from": "gpt", "value": "answer one"},
                           {"from": "human", "value": "question"}, {"from": "gpt", "value": "answer two"}]},
        {"conversations": [{"from": "human", "value": "first"}, {"from": "human", "value": "second"}, {"from": "gpt", "value": "reply"}]},
    ]
    (tmp_path / "chats.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    config = DataConfig(sources=[{"path": str(tmp_path / "chats.jsonl"), "format": "sharegpt", "task": "chat"}],
                        split={"validation": 0.0, "test": 0.0}, max_rejected_fraction=1.0)
    out = tmp_path / "out"
    out.mkdir()
    DataStage().run(config, StageContext("data", "t", out, {}, load_environment("cpu"), logging.getLogger("t")))
    rejected = [json.loads(line) for line in (out / "rejected.jsonl").read_text().splitlines()]
    assert [(r["reason"], r["source"]) for r in rejected] == [("role_order", "chats.jsonl:2"), ("role_order", "chats.jsonl:3")]
    assert len((out / "train.jsonl").read_text().splitlines()) == 1
