"""The `ray` engine's per-batch and per-partition functions, called directly (no Ray): near-dup
candidates bucketed by band key in hash partitions give the local engine's result, and the one
approximation the engine documents (rensa's band-hash flags vs exact band buckets) does not drop
a candidate on the test data."""

from __future__ import annotations

import pickle
import random
from collections import defaultdict

import numpy as np
import pytest

from tunepipe.schemas.data import DedupConfig
from tunepipe.tasks.data import ray_engine
from tunepipe.tasks.data.dedup import SignatureIndex, band_blocks, near_duplicates, optimal_bands, signatures, verify_pairs
from tests.unit.test_data_dedup import corpus

CONFIG = DedupConfig()
BANDS = optimal_bands(CONFIG.threshold, CONFIG.num_perm)


def planted(n: int = 1500, copies: int = 200, seed: int = 3) -> list[str]:
    rng = random.Random(seed)
    texts = corpus(n, words=(20, 60))
    for original in rng.sample(range(n), copies):
        words = texts[original].split()
        for _ in range(rng.randint(1, 3)):
            words[rng.randrange(len(words))] = f"changed{rng.randrange(9)}"
        texts.insert(rng.randrange(len(texts) + 1), " ".join(words))
    return texts


def partitioned_near_duplicates(texts: list[str], partitions: int, batch: int) -> dict[int, int]:
    """The engine's path: batches → band rows → hash partitions → bucket pairs → verify → earliest."""
    by_part: dict[int, list] = defaultdict(list)
    for start in range(0, len(texts), batch):
        chunk = texts[start:start + batch]
        rows = ray_engine.band_rows({
            "order": np.arange(start, start + len(chunk), dtype=np.int64),
            "signature": [s.tobytes() for s in signatures(chunk, CONFIG)],
            "payload": [pickle.dumps({"kind": "instruction"})] * len(chunk),
        }, num_perm=CONFIG.num_perm, num_bands=BANDS, partitions=partitions).to_pylist()
        for row in rows:
            by_part[row["part"]].append(row)
    pairs = []
    for rows in by_part.values():
        group = {"order": np.array([r["order"] for r in rows]),
                 "exact_key": np.array([r["exact_key"] for r in rows], dtype=object)}
        found = ray_engine.bucket_candidates(group)
        pairs += list(zip(found["a"].to_pylist(), found["b"].to_pylist()))
    if not pairs:
        return {}
    pairs_array = np.unique(np.array(pairs, dtype=np.int64), axis=0)
    mask = verify_pairs(texts, pairs_array, CONFIG)
    duplicate_of: dict[int, int] = {}
    for earlier, later in sorted((min(a, b), max(a, b)) for a, b in pairs_array[mask].tolist()):
        duplicate_of.setdefault(later, earlier)
    return duplicate_of


@pytest.mark.parametrize("partitions,batch", [(1, 10_000), (5, 256)])
def test_band_partitions_give_the_local_near_duplicates(partitions, batch):
    texts = planted()
    expected = near_duplicates(texts, CONFIG)
    assert len(expected) > 50  # planted copies above the threshold are found...
    assert partitioned_near_duplicates(texts, partitions, batch) == expected  # ...the same way


def test_rensa_flags_cover_every_exact_band_bucket():
    """The documented approximation: the local engine looks only at rows rensa flags (a shared band
    hash), the ray engine at exact band buckets; no bucket member may be unflagged."""
    texts = planted(800, 150, seed=5) + ["short text", "short text", "", ""]
    flags = SignatureIndex(texts, CONFIG).flags
    in_buckets = np.zeros(len(texts), dtype=bool)
    for block in band_blocks(signatures(texts, CONFIG), BANDS):
        _, inverse, counts = np.unique(block, return_inverse=True, return_counts=True)
        in_buckets |= counts[inverse.ravel()] > 1
    assert in_buckets.sum() > 150
    assert not (in_buckets & ~flags).any()


def test_exact_groups_keep_the_first_in_reading_order():
    """Only (order, exact key) rows reach the exact-dedup shuffle: each later record of a key is
    paired with the key's first record in reading order, whatever the partition's row order."""
    keys = [b"k1", b"k2", b"k1", b"k1", b"k3", b"k3"]
    orders = [7, 3, 5, 1, 9, 8]  # reading order differs from the partition's row order
    table = ray_engine.exact_duplicate_pairs({"order": np.array(orders), "exact_key": np.array(keys, dtype=object),
                                             "part": np.zeros(len(keys), dtype=np.int64)}).to_pylist()
    assert sorted((row["a"], row["b"]) for row in table) == [(5, 1), (7, 1), (9, 8)]
    empty = ray_engine.exact_duplicate_pairs({"order": np.zeros(0, np.int64), "exact_key": np.array([], dtype=object), "part": np.zeros(0, np.int64)})
    assert empty.num_rows == 0


def test_exact_duplicates_leave_the_record_blocks_where_they_are():
    import pyarrow as pa

    block = pa.table({"order": np.array([4, 1, 9, 6]), "payload": [b"a", b"b", b"c", b"d"]})
    assert ray_engine.without_orders(block, np.array([1, 6]))["payload"].to_pylist() == [b"a", b"c"]
    assert ray_engine.without_orders(block, np.array([2])) is block
    assert ray_engine.without_orders(block, np.zeros(0, np.int64)) is block


def test_without_ray_data_the_stage_fails_saying_what_to_install(monkeypatch):
    from tunepipe.tasks.core.stage import StageFailed

    monkeypatch.setitem(__import__("sys").modules, "ray.data", None)  # as if the `ray` extra were missing
    with pytest.raises(StageFailed, match=r"pip install 'tunepipe\[ray\]'"):
        with ray_engine.ray_session(None):
            pass


class _Blocks:
    """Stands in for the materialised keyed dataset: `select_columns(...).iter_batches(...)`
    yields the given numpy batches in the given order."""

    def __init__(self, batches: list[dict]) -> None:
        self.batches = batches

    def select_columns(self, columns):
        return self

    def iter_batches(self, **kwargs):
        return iter(self.batches)


def _driver(tmp_path):
    import io
    import logging

    from tunepipe.schemas.data import DataConfig
    from tunepipe.tasks.core.environment import load_environment
    from tunepipe.tasks.core.stage import StageContext

    (tmp_path / "f.jsonl").write_text('{"instruction": "q", "output": "a"}\n')
    config = DataConfig.model_validate({"sources": [{"path": str(tmp_path / "f.jsonl"), "format": "alpaca", "task": "t"}], "engine": "ray"})
    run = ray_engine.RayDataRun(config, StageContext("data", "t", tmp_path, {}, load_environment("cpu"), logging.getLogger("t")))
    run._rejected_file = io.BytesIO()
    return run


def _batch(orders: list[int]) -> dict:
    records = [{"instruction": f"q{o}", "input": "", "output": "a", "system": None, "task": "t", "kind": "instruction", "id": f"id{o}",
                "source": f"f.jsonl:{o}"} for o in orders]
    return {"order": np.array(orders, dtype=np.int64), "payload": np.array([pickle.dumps(r) for r in records], dtype=object)}


def test_the_driver_streams_kept_records_in_order_and_rejects_exact_duplicates_on_the_way(tmp_path):
    """Exact duplicates (5 and 9 duplicate 2) leave the stream as rejections naming their first
    record's id and source; the kept records keep their reading order and carry it."""
    import json

    run = _driver(tmp_path)
    stream = run._stream_kept(_Blocks([_batch([1, 2, 5]), _batch([7, 9])]), np.array([5, 9]), np.array([2, 2]))
    kept = [(record["order"], record["id"]) for batch in stream for record in batch]
    assert kept == [(1, "id1"), (2, "id2"), (7, "id7")]
    lines = [json.loads(line) for line in run._rejected_file.getvalue().splitlines()]
    assert [(line["source"], line["reason"], line["duplicate_of"]) for line in lines] == [
        ("f.jsonl:5", "exact_duplicate", "id2"), ("f.jsonl:9", "exact_duplicate", "id2")]
    assert lines[0]["detail"] == "same normalised content as id2 (f.jsonl:2)"


@pytest.mark.parametrize("batches", [[[1, 5], [3]], [[4, 2]]])
def test_records_read_back_out_of_reading_order_fail_the_stage(tmp_path, batches):
    """The files' line order rests on Ray Data keeping the blocks' order: if it does not, the
    stage fails (nothing published) rather than writing another order."""
    from tunepipe.tasks.core.stage import StageFailed

    run = _driver(tmp_path)
    stream = run._stream_kept(_Blocks([_batch(orders) for orders in batches]), np.zeros(0, np.int64), np.zeros(0, np.int64))
    with pytest.raises(StageFailed, match="out of reading order"):
        list(stream)
