"""Readers: locations (`file:line`), malformed input, every file type."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tunepipe.schemas.data import SourceConfig
from tunepipe.tasks.data.sources import Malformed, files_to_read, read_file


def read_all(path: Path, **source) -> list[tuple[str, object]]:
    config = SourceConfig(path=str(path), **source)
    return [item for file, kind, label in files_to_read(config) for item in read_file(file, kind, label, config)]


def test_jsonl_lines_blank_and_malformed(tmp_path):
    (tmp_path / "a.jsonl").write_text('{"text": "one"}\n\n{"text": \n[1]\n')
    items = read_all(tmp_path / "a.jsonl")
    assert [loc for loc, _ in items] == ["a.jsonl:1", "a.jsonl:3", "a.jsonl:4"]
    assert isinstance(items[1][1], Malformed) and items[1][1].text == '{"text": '
    assert items[2][1] == [1]


def test_json_array_elements_know_their_line(tmp_path):
    (tmp_path / "a.json").write_text('[\n {"text": "one"},\n\n {"text":\n  "two"}, {"text": "three"},\n {"broken": \n]')
    items = read_all(tmp_path / "a.json")
    assert [loc for loc, _ in items] == ["a.json:2", "a.json:4", "a.json:5", "a.json:6"]
    assert items[2][1] == {"text": "three"}
    assert isinstance(items[3][1], Malformed)  # the broken rest is one rejected record, not a crash


def test_csv_rows_start_lines_with_multiline_cells(tmp_path):
    (tmp_path / "a.csv").write_text('instruction,output\nq1,"line one\nline two"\nq2,a2\n')
    assert read_all(tmp_path / "a.csv") == [("a.csv:2", {"instruction": "q1", "output": "line one\nline two"}), ("a.csv:4", {"instruction": "q2", "output": "a2"})]


def test_txt_units(tmp_path):
    (tmp_path / "a.txt").write_text("p1 l1\np1 l2\n\n\np2\n")
    assert read_all(tmp_path / "a.txt") == [("a.txt:1", {"text": "p1 l1\np1 l2"}), ("a.txt:5", {"text": "p2"})]
    assert [loc for loc, _ in read_all(tmp_path / "a.txt", text_unit="line")] == ["a.txt:1", "a.txt:2", "a.txt:5"]
    assert len(read_all(tmp_path / "a.txt", text_unit="file")) == 1


def test_directories_globs_and_labels(tmp_path):
    (tmp_path / "d" / "sub").mkdir(parents=True)
    (tmp_path / "d" / "x.jsonl").write_text('{"text": "x"}\n')
    (tmp_path / "d" / "sub" / "y.jsonl").write_text('{"text": "y"}\n')
    (tmp_path / "d" / "README.md").write_text("not data")
    assert [loc for loc, _ in read_all(tmp_path / "d")] == ["d/sub/y.jsonl:1", "d/x.jsonl:1"]
    assert [loc for loc, _ in read_all(tmp_path / "d" / "*.jsonl")] == ["d/x.jsonl:1"]


def test_parquet_and_saved_datasets(tmp_path):
    import datasets

    rows = {"instruction": ["a", "b"], "output": ["1", None]}
    datasets.Dataset.from_dict(rows).to_parquet(str(tmp_path / "p.parquet"))
    assert read_all(tmp_path / "p.parquet") == [("p.parquet:1", {"instruction": "a", "output": "1"}), ("p.parquet:2", {"instruction": "b", "output": None})]
    datasets.DatasetDict({"train": datasets.Dataset.from_dict(rows)}).save_to_disk(str(tmp_path / "saved"))
    items = read_all(tmp_path / "saved")
    assert [loc for loc, _ in items] == ["saved[train]:1", "saved[train]:2"]
    with pytest.raises(ValueError, match="no split 'test'"):
        read_all(tmp_path / "saved", split="test")


def test_missing_file_after_config_is_a_clear_error(tmp_path):
    (tmp_path / "a.jsonl").write_text(json.dumps({"text": "x"}) + "\n")
    config = SourceConfig(path=str(tmp_path / "a.jsonl"))
    (tmp_path / "a.jsonl").unlink()
    with pytest.raises(ValueError, match="a.jsonl"):
        files_to_read(config)


def test_task_field_takes_each_records_task_and_rejects_bad_names():
    from tunepipe.tasks.data.formats import RecordError, parse_record

    pair = {"task": "triples", "prompt": "p", "chosen": "a", "rejected": "b"}
    assert parse_record(dict(pair), "preference", "preferences", {}, "task")["task"] == "triples"
    assert parse_record({**pair, "task": ""}, "preference", "preferences", {}, "task")["task"] == "preferences"
    assert parse_record(dict(pair), "preference", "preferences", {})["task"] == "preferences"  # no task_field: the source's
    with pytest.raises(RecordError, match="not a task name"):
        parse_record({**pair, "task": "two words"}, "preference", "preferences", {}, "task")
