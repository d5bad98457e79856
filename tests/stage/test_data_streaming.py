"""The data stage's `streaming` engine publishes the local engine's files, byte for byte, and its
memory does not grow with the size of the records' texts."""

from __future__ import annotations

import json
import logging
import random
import string
import tracemalloc
from pathlib import Path

import numpy as np
import pytest

from tests.helpers.memory import traced_peak
from tests.stage.test_data import OUTPUTS, load_config, run
from tests.stage.test_data_ray import quickstart_config, word_tokenizer
from tunepipe.schemas.data import DataConfig
from tunepipe.tasks.data import dedup, streaming, validate
from tunepipe.tasks.data.stage import DataStage

PUBLISHED = (*OUTPUTS, "rejected.jsonl", "report.json", "validation.json")


def published(out: Path) -> dict[str, bytes]:
    return {name: (out / name).read_bytes() for name in PUBLISHED if (out / name).exists()}


@pytest.mark.parametrize("which", ["quickstart", "fixtures", "fixtures-mix"])
def test_streaming_engine_publishes_the_local_engines_files(tmp_path, monkeypatch, caplog, which):
    if which == "quickstart":
        make = quickstart_config
    elif which == "fixtures":  # the dirty data with token bounds: every rejection of the first pass, in the local order
        tokens = {"clean__tokenizer": word_tokenizer(tmp_path / "tokenizer.json"), "clean__min_tokens": 12}
        make = lambda **fields: load_config(**tokens, **fields)  # noqa: E731
    else:  # mixing: general downsampled 8 -> 3, chat upsampled 4 -> 9, capitals capped at 1
        mix = {"mix__ratios": {"general": 1, "chat": 3}, "mix__caps": {"capitals": 1}}
        make = lambda **fields: load_config(**mix, **fields)  # noqa: E731
    monkeypatch.setattr(streaming, "BATCH", 5)  # many batches: exact duplicates across batches, side files
    monkeypatch.setattr(streaming, "_ROWS", 3)  # the band pass reads its signatures in many chunks
    monkeypatch.setattr(dedup, "PARTITION_ROWS", 32)  # shared band hashes found over many hash ranges
    monkeypatch.setattr(streaming, "VERIFY_PAIRS", 2)  # candidate pairs checked in many chunks
    monkeypatch.setattr(streaming, "PROGRESS_EVERY", 20)
    caplog.set_level(logging.INFO, logger="test.data")
    local_config, streaming_config = make(), make(engine="streaming")
    assert DataStage().key_payload(streaming_config) == DataStage().key_payload(local_config)
    run(local_config, tmp_path / "local")
    run(streaming_config, tmp_path / "streaming")
    local, streamed = published(tmp_path / "local"), published(tmp_path / "streaming")
    assert {"train.jsonl", "rejected.jsonl", "report.json", "validation.json"} <= local.keys()
    assert streamed.keys() == local.keys()
    assert [name for name in local if streamed[name] != local[name]] == []
    report = json.loads(local["report.json"])
    if which == "fixtures":
        assert {"exact_duplicate", "near_duplicate", "contamination", "malformed_json", "too_few_tokens"} <= set(report["rejected"])
    if which == "fixtures-mix":
        assert report["mix"]["general"]["downsampled"] == 5 and report["mix"]["chat"]["upsampled_copies"] == 5
        assert report["mix"]["capitals"]["after"] == 1
    progress = [r.getMessage() for r in caplog.records if r.getMessage().startswith("data: streaming:")]
    assert progress and all(" read, " in line for line in progress), progress
    # The spill files lived under the staging dir's (never published) checkpoint dir and are gone.
    assert not list((tmp_path / "streaming" / ".checkpoints").iterdir())


def test_band_hash_collisions_do_not_change_the_result(tmp_path, monkeypatch):
    """Every row's band hash collides (a constant hash): buckets are still split by the band's
    exact values, so the near-duplicate and contamination decisions stay the local engine's."""
    monkeypatch.setattr(streaming, "_band_hash", lambda values, tags: np.zeros(len(values), dtype=np.uint64))
    run(load_config(), tmp_path / "local")
    run(load_config(engine="streaming"), tmp_path / "streaming")
    local, streamed = published(tmp_path / "local"), published(tmp_path / "streaming")
    assert [name for name in local if streamed.get(name) != local[name]] == []
    rejected = json.loads(local["report.json"])["rejected"]
    assert rejected["near_duplicate"] == 2 and rejected["contamination"] == 4


def write_records(path: Path, count: int, words: int) -> Path:
    rng = random.Random(7)
    with open(path, "w") as handle:
        for _ in range(count):
            text = " ".join("".join(rng.choices(string.ascii_lowercase, k=6)) for _ in range(words))
            handle.write(json.dumps({"instruction": f"Summarise: {text[:60]}", "output": text}) + "\n")
    return path


def peak_bytes(tmp_path: Path, count: int, engine: str, validation: bool = False) -> int:
    source = write_records(tmp_path / f"records-{count}.jsonl", count, WORDS)
    config = DataConfig.model_validate({
        "sources": [{"path": str(source), "format": "alpaca", "task": "t"}], "engine": engine,
        "clean": {"max_chars": 10_000_000}, "validation": {"enabled": validation},
    })
    return traced_peak(lambda: run(config, tmp_path / f"out-{engine}-{count}-{validation}"))


WORDS = 3000  # words of 6 letters per record: ~21 KB of text each


def test_streaming_memory_does_not_grow_with_the_input(tmp_path, monkeypatch):
    """50 vs 250 records of ~21 KB of text (4 MB more text): the streaming engine's peak Python
    allocations (numpy's included) stay within a fraction of the added text, since one batch of
    8 records is in memory at a time; the local engine's grow by more than the added text.
    (Great Expectations' rows frame holds every kept row's text: validation is off here.)"""
    monkeypatch.setattr(streaming, "BATCH", 8)
    few, many = 50, 250
    added_text = (many - few) * WORDS * 7
    streaming_growth = peak_bytes(tmp_path, many, "streaming") - peak_bytes(tmp_path, few, "streaming")
    local_growth = peak_bytes(tmp_path, many, "local") - peak_bytes(tmp_path, few, "local")
    assert local_growth > added_text, (local_growth, added_text)
    assert streaming_growth < added_text / 10, (streaming_growth, added_text)


def test_streaming_memory_with_validation_does_not_grow_with_the_input(tmp_path, monkeypatch):
    """As above with Great Expectations on: the rows suite runs over batches of 25 rows, so its
    frames do not hold the texts of every kept row (the local engine's frame did)."""
    monkeypatch.setattr(streaming, "BATCH", 8)
    monkeypatch.setattr(validate, "ROWS_PER_RUN", 25)
    peak_bytes(tmp_path, 2, "streaming", True)  # imports Great Expectations (~110 MB) before measuring
    few, many = 50, 250
    added_text = (many - few) * WORDS * 7
    streaming_growth = peak_bytes(tmp_path, many, "streaming", True) - peak_bytes(tmp_path, few, "streaming", True)
    assert streaming_growth < added_text / 10, (streaming_growth, added_text)
    validation = json.loads((tmp_path / "out-streaming-250-True" / "validation.json").read_text())
    assert validation["rows"]["success"] is True
    assert {item["result"]["element_count"] for item in validation["rows"]["results"]} == {250}


def write_small_records(path: Path, count: int) -> Path:
    """`count` short, distinct alpaca records (a few words each): memory per record, not per byte of text."""
    rng = random.Random(3)
    with open(path, "w") as handle:
        for i in range(count):
            words = " ".join("".join(rng.choices(string.ascii_lowercase, k=5)) for _ in range(6))
            handle.write(json.dumps({"instruction": f"Q{i} {words}", "output": f"A{i} {words}"}) + "\n")
    return path


STEPS = ("_first_pass", "_near_pass", "_assign_splits", "_contamination_pass", "_validate_streamed", "_mix_streamed", "_write_streamed", "_finish")


def step_peaks(tmp_path: Path, count: int, monkeypatch) -> dict[str, int]:
    """Peak traced bytes (numpy's included) of the streaming engine between each two step edges
    (a step's start or end: the records' arrays are built and used in between too)."""
    tmp_path.mkdir(exist_ok=True)
    source = write_small_records(tmp_path / f"small-{count}.jsonl", count)
    config = DataConfig.model_validate({"sources": [{"path": str(source), "format": "alpaca", "task": "t"}], "engine": "streaming",
                                        "validation": {"enabled": False}})
    peaks: dict[str, int] = {}
    edge = ["start"]

    def mark(name: str) -> None:
        peaks[f"{edge[0]} -> {name}"] = tracemalloc.get_traced_memory()[1]
        tracemalloc.reset_peak()
        edge[0] = name

    def timed(name, step):
        def wrapper(*args, **kwargs):
            mark(f"{name} start")
            try:
                return step(*args, **kwargs)
            finally:
                mark(f"{name} end")
        return wrapper

    with monkeypatch.context() as patch:
        for name in STEPS:
            patch.setattr(streaming.StreamingDataRun, name, timed(name, getattr(streaming.StreamingDataRun, name)))
        tracemalloc.start()
        try:
            run(config, tmp_path / f"out-small-{count}")
        finally:
            tracemalloc.stop()
    return peaks


def test_streaming_memory_per_record_stays_small(tmp_path, monkeypatch):
    """What the streaming engine holds per record is a few fixed-width arrays (offset, kind, task,
    file, split hash, alive, split: 27 bytes) and a positions array at a time; at 5M records every
    further byte per record is 5 MB. 2,000 vs 20,000 short records, every batch-sized buffer
    small: between any two step edges the peak grows by less than 72 bytes per added record. The
    split assignment's sort temporaries measure ~62 (its real cost, so 65 failed by 0.1 inside the
    whole suite); a per-record array of family names, or the mix's train rows as a list of Python
    ints, each add 40-80 bytes per record on top and go past the bound. Validation's share (the ids' uniqueness check) is tested in
    tests/unit/test_data_validate_batches.py."""
    monkeypatch.setattr(streaming, "BATCH", 200)
    monkeypatch.setattr(streaming, "_ROWS", 64)
    monkeypatch.setattr(streaming, "VERIFY_PAIRS", 64)
    monkeypatch.setattr(dedup, "PARTITION_ROWS", 500)  # band hashes searched for repeats a range at a time
    monkeypatch.setattr(streaming, "WRITE_BUFFER", 1 << 12)  # a 1 MiB file buffer would hide 10,000 records' arrays
    step_peaks(tmp_path / "warm", 10, monkeypatch)  # imports (rensa, sqlite, ...) before measuring
    few, many = step_peaks(tmp_path, 2_000, monkeypatch), step_peaks(tmp_path, 20_000, monkeypatch)
    assert few.keys() == many.keys() and len(few) == 2 * len(STEPS)
    per_record = {interval: (many[interval] - few[interval]) / 18_000 for interval in few}
    assert max(per_record.values()) < 72, per_record
