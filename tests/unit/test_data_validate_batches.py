"""The rows suite validated in batches (bounded memory) gives the result of one Great
Expectations run over every row: validation.json's bytes, the pass/fail decision and the rows a
non-blocking rule rejects."""

from __future__ import annotations

import json

import pytest

from tunepipe.schemas.data import DataConfig
from tunepipe.tasks.data import validate


def config(tmp_path, rules: bool = True) -> DataConfig:
    source = tmp_path / "source.jsonl"
    source.write_text('{"instruction": "q", "output": "a"}\n')
    rules_ = [
        {"column": "prompt", "regex": "^Explain", "mode": "not_match", "blocking": False, "name": "no-explain"},
        {"column": "response", "regex": "resp 1", "mode": "not_match", "blocking": True, "name": "no-resp-1"},
    ]
    return DataConfig.model_validate({"sources": [{"path": str(source), "format": "alpaca", "task": "t"}],
                                      "validation": {"rules": rules_ if rules else []}})


def records() -> list[dict]:
    """450 rows: ids repeated within and across batches, a blank response, more failing values
    of a non-blocking rule than one run lists (200) and ties in their value counts."""
    rows = []
    for i in range(450):
        rows.append({
            "id": f"{i % 23:016x}" if i % 5 else f"{1000 + i:016x}", "kind": "instruction", "task": "t", "split": "train",
            "instruction": f"Explain {i % 7}" if i % 10 != 9 else "Say y", "input": "",
            "output": "" if i == 4 else f"resp {i % 4}", "chars": 10 + i % 50,
        })
    return rows


def one_run(rows: list[dict], cfg: DataConfig) -> tuple[str, list]:
    """Great Expectations over one frame of every row (the unbatched validation)."""
    validate._quiet_gx()
    checks = validate._row_expectations(cfg, with_tokens=False)
    result = validate._run_suite(validate._context(), "rows", validate.rows_frame(rows, False), checks, "id").to_json_dict()
    failures = validate._failures(result, checks, "id")  # before _trim cuts the lists
    return json.dumps(validate._trim(result), indent=1, default=str), failures


@pytest.mark.parametrize("rows_per_run", [60, 1000])
def test_batched_rows_suite_equals_one_run(tmp_path, monkeypatch, rows_per_run):
    cfg, rows = config(tmp_path), records()
    expected_json, expected_failures = one_run(rows, cfg)
    monkeypatch.setattr(validate, "ROWS_PER_RUN", rows_per_run)
    outcome = validate.validate_rows(iter(rows), cfg)  # a one-pass iterator, as the streaming engine passes
    assert json.dumps(outcome.results, indent=1, default=str) == expected_json
    assert outcome.failures == expected_failures
    assert outcome.success is False
    by_name = {failure.name: failure for failure in outcome.failures}
    assert set(by_name) == {"id unique", "response not blank", "rule no-resp-1", "rule no-explain"}
    assert by_name["id unique"].count == 360  # 23 ids repeated: every row but the 90 unique ids (i % 5 == 0)
    failing = [row["id"] for row in rows if row["instruction"].startswith("Explain")]
    assert by_name["rule no-explain"].ids == failing and len(failing) == 405


def test_batched_rows_suite_passes_clean_rows(tmp_path, monkeypatch):
    cfg = config(tmp_path, rules=False)
    rows = [{"id": f"{i:016x}", "kind": "instruction", "task": "t", "split": "train", "instruction": f"Q {i}", "input": "",
             "output": f"A {i}", "chars": 10} for i in range(9)]
    expected_json, _ = one_run(rows, cfg)
    monkeypatch.setattr(validate, "ROWS_PER_RUN", 4)
    outcome = validate.validate_rows(rows, cfg)
    assert outcome.success and outcome.failures == []
    assert json.dumps(outcome.results, indent=1, default=str) == expected_json
    empty_json, _ = one_run([], cfg)
    assert json.dumps(validate.validate_rows([], cfg).results, indent=1, default=str) == empty_json


def test_id_uniqueness_holds_no_ids_in_memory(monkeypatch):
    """The uniqueness check over every batch keeps the ids on disk (8 bytes each) and searches them a
    range of values at a time: 200,000 ids, 3 of them repeated, peak traced memory under 8 bytes
    per id (holding them as 16-byte strings and sorting them cost ~150 bytes per record)."""
    import tracemalloc

    import numpy as np
    import pandas as pd
    from tunepipe.tasks.data import dedup

    monkeypatch.setattr(dedup, "PARTITION_ROWS", 20_000)
    merged = validate._MergedRows([], "id")
    merged.template = {"results": []}  # add() only needs the frame's ids here
    count, batch = 200_000, 20_000
    for start in range(0, count, batch):
        values = np.arange(start, start + batch, dtype=np.uint64) * np.uint64(0x9E3779B97F4A7C15)
        ids = [f"{v:016x}" for v in values.tolist()]
        if start == 0:
            ids[5] = ids[7] = ids[11] = ids[3]
        merged.add({"results": []}, pd.DataFrame({"id": ids}))
    del ids, values
    item: dict = {}
    tracemalloc.start()
    try:
        merged._duplicate_ids(item)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    first = f"{3 * 0x9E3779B97F4A7C15 % 2**64:016x}"
    assert item["unexpected"] == 4 and item["values"] == [first] * 4
    assert peak < 8 * count, peak
