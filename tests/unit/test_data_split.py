"""Deterministic stratified splits; train-only mixing."""

from __future__ import annotations

import random
from collections import Counter

from tunepipe.schemas.data import MixConfig, SplitConfig
import numpy as np
import pytest

from tunepipe.tasks.data.split import _shuffled, assign_splits, mix_positions, mix_train


def records(task: str, n: int, kind: str = "instruction") -> list[dict]:
    return [{"id": f"{task}-{i:05d}", "task": task, "kind": kind} for i in range(n)]


def test_split_is_stratified_and_independent_of_order():
    rows = records("a", 1000) + records("b", 37) + records("c", 3) + records("t", 5, kind="text")
    assign_splits(rows, SplitConfig(validation=0.1, test=0.2))
    count = Counter((r["task"], r.get("split")) for r in rows)
    assert (count[("a", "validation")], count[("a", "test")], count[("a", "train")]) == (100, 200, 700)
    assert (count[("b", "validation")], count[("b", "test")], count[("b", "train")]) == (4, 7, 26)
    assert (count[("c", "validation")], count[("c", "test")], count[("c", "train")]) == (0, 1, 2)
    assert count[("t", None)] == 5  # text has no split
    first = {r["id"]: r["split"] for r in rows if "split" in r}
    shuffled = [dict(r) for r in rows]
    random.Random(3).shuffle(shuffled)
    assign_splits(shuffled, SplitConfig(validation=0.1, test=0.2))
    assert {r["id"]: r["split"] for r in shuffled if "split" in r} == first
    assign_splits(shuffled, SplitConfig(validation=0.1, test=0.2, seed=1))
    assert {r["id"]: r["split"] for r in shuffled if "split" in r} != first  # the seed salts the order


def test_mix_ratios_caps_and_accounting():
    train = records("a", 10) + records("b", 40) + records("c", 5)
    mixed, dropped, stats = mix_train(train, MixConfig(ratios={"a": 1, "b": 1}, total=30, caps={"c": 2}, seed=7))
    assert stats == {
        "a": {"before": 10, "after": 15, "upsampled_copies": 5, "downsampled": 0},
        "b": {"before": 40, "after": 15, "upsampled_copies": 0, "downsampled": 25},
        "c": {"before": 5, "after": 2, "upsampled_copies": 0, "downsampled": 3},
    }
    assert len(mixed) == 32 and len(dropped) == 28
    assert {r["id"] for r in records("a", 10)} <= {r["id"] for r in mixed}  # upsampling keeps every row
    kept_ids = {r["id"] for r in mixed}
    assert kept_ids.isdisjoint(r["id"] for r in dropped)
    assert len(kept_ids) + len(dropped) == len(train)  # nothing lost
    again = mix_train(train, MixConfig(ratios={"a": 1, "b": 1}, total=30, caps={"c": 2}, seed=7))[0]
    assert [r["id"] for r in again] == [r["id"] for r in mixed]


def test_no_mix_keeps_train():
    train = records("a", 10)
    mixed, dropped, stats = mix_train(train, MixConfig())
    assert sorted(r["id"] for r in mixed) == [r["id"] for r in train] and dropped == []
    assert stats["a"] == {"before": 10, "after": 10, "upsampled_copies": 0, "downsampled": 0}


@pytest.mark.parametrize("n", [0, 1, 2, 7, 1000])
def test_array_shuffle_is_random_shuffle(n):
    """The streaming engine's shuffle of an int64 array permutes as `random.Random(seed).shuffle` on a list."""
    values = list(range(100, 100 + n))
    expected = list(values)
    random.Random(11).shuffle(expected)
    assert _shuffled([np.array(values[:3], dtype=np.int64), np.array(values[3:], dtype=np.int64)], 11).tolist() == expected


@pytest.mark.parametrize("mix", [
    {},
    {"ratios": {"a": 1, "b": 3}},  # a downsampled, b upsampled
    {"ratios": {"a": 1, "b": 1}, "total": 50, "caps": {"c": 2}, "seed": 5},
])
def test_mix_positions_is_mix_train_on_positions(mix):
    """Positions with task codes mix to the records' mix: same order, same dropped rows, same numbers."""
    rows = records("b", 13) + records("a", 40) + records("c", 9)
    random.Random(2).shuffle(rows)
    positions = np.arange(1000, 1000 + len(rows)) * 3  # positions of the train rows in a larger file
    names = ["c", "b", "a"]
    codes = np.array([names.index(r["task"]) for r in rows], dtype=np.int32)
    config = MixConfig(**mix)
    mixed, dropped, stats = mix_train(rows, config)
    at = {id(r): p for r, p in zip(rows, positions.tolist())}
    got_mixed, got_dropped, got_stats = mix_positions(positions, codes, names, config)
    assert got_mixed.tolist() == [at[id(r)] for r in mixed]
    assert got_dropped.tolist() == [at[id(r)] for r in dropped]
    assert got_stats == stats
