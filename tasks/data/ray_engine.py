"""The `ray` engine of the data stage: the local engine's steps, the first pass on a Ray cluster
through Ray Data, the rest on the driver with the streaming engine's bounded memory.

What runs where:

- on Ray workers, one task per input file: reading, parsing and cleaning (`read_file`,
  `parse_record`, `Cleaner.clean_record`: the local engine's functions), then per batch: token
  bounds, ids, exact keys and MinHash signatures;
- shuffled by key across workers (`groupby` on a hash partition of the key), keys only, never
  whole records: exact dedup ((order, normalised-content key) rows give (duplicate, first)
  pairs; the duplicates are then left out of the records' blocks where they are) and near-dedup
  candidates ((order, band key) rows give candidate pairs);
- on the driver, `RayDataRun` being a `StreamingDataRun`: the kept records read back from Ray in
  reading order a batch at a time (Ray Data's `preserve_order`, checked), exact duplicates
  rejected on the way, into the streaming engine's spill file and per-record columns; then the
  streaming engine's later passes: the candidate pairs' Jaccard check (`dedup.verify_pairs`, the
  local test, texts read back from the spill by offset), the split, contamination (prompt
  signatures and LSH bands on the driver's disk), Great Expectations validation, mixing and
  writing. The driver never holds every record: what it holds per record is the streaming
  engine's columns (tests/stage/test_data_ray.py measures it).

Every row carries `order` = (file index << 40) | index in the file, the local engine's reading
order, and every decision that depends on order (first of a duplicate group, output and
rejected.jsonl line order) uses it, so the files are the local engine's record for record
whatever the number of workers or the block layout.

The one approximation: the local engine pre-filters near-duplicate candidates with rensa's LSH
flags (rows sharing a band *hash* with another row), this engine buckets by the band's exact
values. Both pair a bucket's members the same way (`dedup.bucket_pairs`); the sets agree unless
rensa's flags miss a row that shares a band, which band hashing does not do (a hash collision
only adds a row, and an added row finds no partner in an exact bucket).
tests/stage/test_data_ray.py checks the equality on the quickstart and the dirty fixture.
"""

from __future__ import annotations

import os
import pickle
import time
from array import array
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import pyarrow as pa
from tunepipe.schemas.data import CleanConfig, DedupConfig, SourceConfig
from tunepipe.schemas.records import record_id
from tunepipe.tasks.data import dedup as dedup_mod
from tunepipe.tasks.data.clean import Cleaner, load_token_counter, token_bound_reason
from tunepipe.tasks.data.formats import FAMILY, RecordError, content_parts, parse_record
from tunepipe.tasks.data.sources import Malformed, ReadDigest, read_file
from tunepipe.tasks.core.stage import StageFailed, StageOutput
from tunepipe.tasks.data.streaming import StreamingDataRun

FILE_SHIFT = 40  # order = file index << 40 | record index in the file
# The worker steps that reject records, in the order the local engine writes their rejections.
STEP_READ, STEP_TOKENS = range(2)
_ROWS = pa.schema([
    ("order", pa.int64()),
    ("kind", pa.string()),  # record | reject | stats
    ("step", pa.int64()),
    ("payload", pa.binary()),  # pickled record, reject tuple or file stats
    ("exact_key", pa.binary()),
    ("signature", pa.binary()),
    ("part", pa.int64()),
])
_PAIRS = pa.schema([("a", pa.int64()), ("b", pa.int64())])
_OUT_ROWS = 8192


@contextmanager
def ray_session(address: str | None) -> Iterator[None]:
    """Join (or start) the Ray cluster; leave a Ray this process did not start running."""
    try:
        import ray.data  # noqa: F401  (Ray Data: the `ray` extra)
    except ImportError as exc:
        raise StageFailed(f"data.engine ray needs Ray Data: pip install 'tunepipe[ray]' ({exc})") from exc
    import ray

    # Ray Data's usage collection queries a Prometheus on localhost after every dataset (and
    # reports usage): an offline pipeline wants neither.
    os.environ.setdefault("RAY_DATA_USAGE_DISABLED", "1")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    if ray.is_initialized():
        yield
        return
    ray.init(address=address, include_dashboard=False, log_to_driver=False, configure_logging=False)
    try:
        yield
    finally:
        ray.shutdown()


def _table(rows: list[dict]) -> pa.Table:
    columns = {name: [row.get(name, _EMPTY[name]) for row in rows] for name in _ROWS.names}
    return pa.table(columns, schema=_ROWS)


_EMPTY = {"order": 0, "kind": "record", "step": 0, "payload": b"", "exact_key": b"", "signature": b"", "part": 0}


def _reject_row(order: int, step: int, record: Any, reason: str, location: str, detail: str = "", **extra: Any) -> dict:
    return {"order": order, "kind": "reject", "step": step, "payload": pickle.dumps((record, reason, location, detail, extra))}


# -- worker functions (Ray Data UDFs: module-level, arguments through fn_kwargs) ------------------


def read_clean_files(batch: dict, sources: list[SourceConfig], clean: CleanConfig) -> Iterator[pa.Table]:
    """One file per row of `batch`: its records read, parsed and cleaned as the local engine does."""
    for index, source_index, file, file_type, label in zip(batch["index"], batch["source"], batch["file"], batch["file_type"], batch["label"]):
        source, cleaner = sources[int(source_index)], Cleaner(clean)
        fmt, task, field_map, task_field = source.format, source.task, source.field_map, source.task_field
        base, rows, read, digest = int(index) << FILE_SHIFT, [], 0, ReadDigest()
        for number, (location, raw) in enumerate(read_file(Path(file) if file else None, str(file_type), str(label), source, digest)):
            read += 1
            if type(raw) is Malformed:
                rows.append(_reject_row(base | number, STEP_READ, raw.text, raw.reason, location, raw.error))
            else:
                try:
                    record = parse_record(raw, fmt, task, field_map, task_field)
                    record["chars"] = cleaner.clean_record(record)
                    record["source"] = location
                    rows.append({"order": base | number, "payload": pickle.dumps(record)})
                except RecordError as error:
                    rows.append(_reject_row(base | number, STEP_READ, raw, error.reason, location, error.detail))
            if len(rows) >= _OUT_ROWS:
                yield _table(rows)
                rows = []
        import ray

        node = ray.get_runtime_context().get_node_id()
        stats = {"label": str(label), "source": int(source_index), "sha256": digest.sha256, "read": read,
                 "counts": cleaner.counts, "pii": cleaner.pii, "node": node}
        rows.append({"order": base, "kind": "stats", "payload": pickle.dumps(stats)})
        yield _table(rows)


_COUNTERS: dict[str, Any] = {}  # a worker loads a tokenizer once, not once per batch


def token_bounds(batch: dict, clean: CleanConfig) -> pa.Table:
    """The local engine's token bounds on one batch of records."""
    count_tokens = _COUNTERS.get(clean.tokenizer)
    if count_tokens is None:
        count_tokens = _COUNTERS[clean.tokenizer] = load_token_counter(clean.tokenizer)
    records = [pickle.loads(p) for p in batch["payload"]]
    rows = []
    counts = count_tokens(["\n".join(content_parts(r)) for r in records]) if records else []
    for order, record, count in zip(batch["order"].tolist(), records, counts):
        record["tokens"] = count
        problem = token_bound_reason(count, clean)
        if problem:
            fields = {k: v for k, v in record.items() if k not in ("source", "chars", "tokens")}
            reason, detail = problem
            rows.append(_reject_row(order, STEP_TOKENS, fields, reason, record["source"], detail))
        else:
            rows.append({"order": order, "payload": pickle.dumps(record)})
    return _table(rows)


def key_records(batch: dict, dedup: DedupConfig, collapsed: bool, partitions: int) -> pa.Table:
    """Ids, exact keys (partitioned by key) and MinHash signatures of the near-dedup text."""
    records = [pickle.loads(p) for p in batch["payload"]]
    rows, texts = [], []
    for order, record in zip(batch["order"].tolist(), records):
        parts = content_parts(record)
        record["id"] = record_id(record["task"], record["kind"], *parts)
        key = dedup_mod.exact_key(FAMILY[record["kind"]], parts, collapsed)
        rows.append({"order": order, "payload": pickle.dumps(record), "exact_key": key, "part": int.from_bytes(key[:8], "little") % partitions})
        texts.append(" ".join(parts))
    if dedup.near and texts:
        for row, signature in zip(rows, dedup_mod.signatures(texts, dedup)):
            row["signature"] = signature.tobytes()
    return _table(rows)


def exact_duplicate_pairs(group: dict) -> pa.Table:
    """One hash partition of (order, exact key) rows: (a, b) = (a later record, the first record
    of its key in reading order), as the local engine keeps the first and rejects the others.
    Only the keys travel through this shuffle; the records stay in their blocks."""
    orders = group["order"].astype(np.int64)
    labels = np.unique(group["exact_key"], return_inverse=True)[1].ravel()
    by_key = np.lexsort((orders, labels))
    ordered, grouped = orders[by_key], labels[by_key]
    starts = np.ones(len(ordered), dtype=bool)
    starts[1:] = grouped[1:] != grouped[:-1]
    first = ordered[np.maximum.accumulate(np.where(starts, np.arange(len(ordered)), 0))] if len(ordered) else ordered
    return pa.table({"a": ordered[~starts], "b": first[~starts]}, schema=_PAIRS)


def without_orders(batch: pa.Table, orders: np.ndarray) -> pa.Table:
    """The rows of `batch` whose order is not in `orders` (sorted): the exact duplicates left out."""
    if not len(orders):
        return batch
    found = _members(batch["order"].to_numpy(), orders)
    return batch.filter(pa.array(~found)) if found.any() else batch


def band_rows(batch: dict, num_perm: int, num_bands: int, partitions: int) -> pa.Table:
    """One row per (record, band): the bucket key (family, band, band values)."""
    signatures = np.frombuffer(b"".join(batch["signature"]), dtype=np.uint32).reshape(len(batch["order"]), num_perm)
    tags = [FAMILY[pickle.loads(p)["kind"]].encode() for p in batch["payload"]]
    keys, orders, parts = [], [], []
    rows_per_band = num_perm // num_bands
    for band, block in enumerate(dedup_mod.band_blocks(signatures, num_bands)):
        raw, width = block.tobytes(), 4 * rows_per_band
        values = signatures[:, band * rows_per_band:(band + 1) * rows_per_band].astype(np.uint64)
        with np.errstate(over="ignore"):  # a cheap mix of the band's values picks its partition
            spread = (values * np.uint64(0x9E3779B97F4A7C15)).sum(axis=1, dtype=np.uint64) + np.uint64(band)
        for row in range(len(signatures)):
            keys.append(tags[row] + band.to_bytes(2, "little") + raw[row * width:(row + 1) * width])
        orders.append(batch["order"])
        parts.append((spread % np.uint64(partitions)).astype(np.int64))
    return pa.table({
        "order": np.concatenate(orders) if orders else np.zeros(0, np.int64),
        "exact_key": keys,
        "part": np.concatenate(parts) if parts else np.zeros(0, np.int64),
    }, schema=pa.schema([("order", pa.int64()), ("exact_key", pa.binary()), ("part", pa.int64())]))


def bucket_candidates(group: dict) -> pa.Table:
    """One hash partition of band keys: the local engine's candidate pairs of each bucket (first
    member and predecessor, by reading order)."""
    labels = np.unique(group["exact_key"], return_inverse=True)[1].ravel()
    orders = group["order"].astype(np.int64)
    pairs = dedup_mod.bucket_pairs(labels, orders)
    return pa.table({"a": orders[pairs[:, 0]], "b": orders[pairs[:, 1]]}, schema=_PAIRS)


# -- the driver ---------------------------------------------------------------------------------


class RayDataRun(StreamingDataRun):
    """The stage run with `engine: ray`: the first pass on Ray, the later passes of the streaming
    engine (records spilled to disk, small per-record columns), the same files as `_DataRun`."""

    def run(self) -> StageOutput:
        with ray_session(self.config.ray.address):
            import ray.data

            context = ray.data.DataContext.get_current()
            context.enable_progress_bars = False
            context.print_on_execution_start = False
            # Blocks leave each step in their input order (file, then record in the file): the
            # driver reads the kept records back in reading order, one batch at a time.
            context.execution_options.preserve_order = True
            # Sort-based shuffles run as plain tasks: the hash shuffle's aggregator actors took
            # ~18 s to start per groupby on a small cluster, whatever the data size.
            context.shuffle_strategy = ray.data.context.ShuffleStrategy.SORT_SHUFFLE_PULL_BASED
            cpus = int(ray.cluster_resources().get("CPU", 1))
            self.partitions = max(2, 2 * cpus)  # shuffle partitions: any number gives the same result
            self.log.info("data: engine ray, %d CPUs in the cluster, %d shuffle partitions", cpus, self.partitions)
            return super().run()

    def _split_rows(self, ds) -> tuple[Any, list[dict]]:
        """(record rows of a materialised step, reject/stats rows collected here).

        The record rows stay a lazy filter over the materialised blocks: the next step reads them
        once (a filter fused into its tasks), not a second copy of every record in the object
        store and one more Ray Data execution per step."""
        ds = ds.materialize()
        side = ds.filter(expr="kind != 'record'").take_all()
        return ds.filter(expr="kind == 'record'"), side

    def _kept_batches(self, spill: Path, to_read, count_tokens) -> Iterator[list[dict]]:
        """The first pass on Ray (read, clean, token bounds, ids, exact dedup, near-duplicate
        candidates), then its kept records streamed back in reading order, a batch at a time,
        for `_first_pass` to spill; the candidate pairs wait for `_near_candidates`."""
        import ray.data

        config, clock = self.config, time.perf_counter()
        files, sources = [], [source for source, _ in to_read]
        for source_index, (_, listed) in enumerate(to_read):
            for file, file_type, label in listed:
                files.append({"index": len(files), "source": source_index, "file": str(file) if file else "", "file_type": file_type, "label": label})
        self.log.info("data: reading %d files on Ray: %s", len(files), ", ".join(f["label"] for f in files))
        ds = ray.data.from_items(files, override_num_blocks=max(1, len(files))).map_batches(
            read_clean_files, batch_size=1, batch_format="numpy", fn_kwargs={"sources": sources, "clean": config.clean})
        records, side = self._split_rows(ds)
        rejects = [row for row in side if row["kind"] == "reject"]
        nodes = set()
        for row in side:
            if row["kind"] == "stats":
                stats = pickle.loads(row["payload"])
                self._add_file_stats(stats)
                nodes.add(stats["node"])
        self.log.info("data: read %d records from %d files on %d Ray node(s)", self.read, len(files), len(nodes))
        clock = self._timed("read_clean", clock)
        batch = config.ray.batch_size
        if count_tokens is not None:
            records, side = self._split_rows(records.map_batches(token_bounds, batch_size=batch, batch_format="numpy", fn_kwargs={"clean": config.clean}))
            rejects += side
            clock = self._timed("tokens", clock)
        keyed = records.map_batches(key_records, batch_size=batch, batch_format="numpy", fn_kwargs={
            "dedup": config.dedup, "collapsed": config.clean.collapse_whitespace, "partitions": self.partitions})
        keyed = keyed.materialize()  # read by the key shuffle, the band pass and the driver
        duplicates, firsts = self._exact_duplicates(keyed) if config.dedup.exact else (np.zeros(0, np.int64),) * 2
        unique = keyed
        if len(duplicates):
            unique = keyed.map_batches(without_orders, batch_format="pyarrow", fn_kwargs={"orders": duplicates})
        pairs = self._candidates(unique) if config.dedup.near else np.zeros((0, 2), np.int64)
        self._write_rejects(rejects)  # read and token rejections come before the exact duplicates'
        del rejects, side
        orders = array("q")  # the kept records' orders, to turn the candidate pairs into positions
        for kept in self._stream_kept(keyed, duplicates, firsts):
            orders.extend(record.pop("order") for record in kept)
            yield kept
        self.exact_duplicates = len(duplicates)
        kept_orders = np.frombuffer(orders, dtype=np.int64)
        self._near_pairs = np.searchsorted(kept_orders, pairs) if len(pairs) else np.zeros((0, 2), np.int64)
        del kept_orders, orders
        self._timed("dedup", clock)
        self._progress("read_clean", len(self._columns["offset"]))

    def _stream_kept(self, keyed, duplicates: np.ndarray, firsts: np.ndarray) -> Iterator[list[dict]]:
        """The records of `keyed` in reading order, a batch at a time (never all of them on the
        driver), with their "order"; each exact duplicate rejected on the way (after its first
        record, whose id and source are all that is kept of it)."""
        originals: dict[int, tuple[str, str]] = {}  # order of a duplicated first record -> (id, source)
        wanted = np.unique(firsts)
        last = -1
        for batch in keyed.select_columns(["order", "payload"]).iter_batches(batch_size=_OUT_ROWS, batch_format="numpy"):
            orders = batch["order"].astype(np.int64)
            if len(orders) and (orders[0] <= last or np.any(np.diff(orders) <= 0)):
                raise StageFailed("data: the Ray engine read its records back out of reading order (Ray Data's "
                                  "preserve_order was not kept); nothing was published")
            last = int(orders[-1]) if len(orders) else last
            is_duplicate, is_first = _members(orders, duplicates), _members(orders, wanted)
            kept = []
            for order, payload, duplicate, first in zip(orders.tolist(), batch["payload"], is_duplicate.tolist(), is_first.tolist()):
                record = pickle.loads(payload)
                if duplicate:
                    original = originals[int(firsts[np.searchsorted(duplicates, order)])]
                    self._reject_record(record, "exact_duplicate", f"same normalised content as {original[0]} ({original[1]})", duplicate_of=original[0])
                    continue
                if first:
                    originals[order] = (record["id"], record["source"])
                record["order"] = order
                kept.append(record)
            yield kept

    def _exact_duplicates(self, keyed) -> tuple[np.ndarray, np.ndarray]:
        """(orders of the exact duplicates, ascending; order of each one's first record with its
        key), from a shuffle of (order, exact key) only: whole records shuffled by key took most of
        the Ray run's time."""
        keys = keyed.select_columns(["order", "exact_key", "part"])
        pairs = keys.groupby("part").map_groups(exact_duplicate_pairs, batch_format="numpy")
        found = [(b["a"].astype(np.int64), b["b"].astype(np.int64)) for b in pairs.iter_batches(batch_size=None, batch_format="numpy")]
        duplicates = np.concatenate([a for a, _ in found]) if found else np.zeros(0, np.int64)
        firsts = np.concatenate([b for _, b in found]) if found else np.zeros(0, np.int64)
        by_order = np.argsort(duplicates, kind="stable")
        return duplicates[by_order], firsts[by_order]

    def _add_file_stats(self, stats: dict) -> None:
        # The worker hashed exactly the bytes it read: the same check as the local engine's.
        self._check_read_bytes(stats["source"], stats["label"], ReadDigest(sha256=stats["sha256"]))
        self.read += stats["read"]
        self.per_file[stats["label"]]["read"] += stats["read"]
        for name, value in stats["counts"].items():
            self.cleaner.counts[name] += value
        for name, value in stats["pii"].items():
            self.cleaner.pii[name] += value

    def _write_rejects(self, rows: list[dict]) -> None:
        """Rejections of the Ray steps, in the local engine's order: by step, then reading order."""
        for row in sorted(rows, key=lambda r: (r["step"], r["order"])):
            record, reason, location, detail, extra = pickle.loads(row["payload"])
            self._reject(record, reason, location, detail, **extra)

    def _candidates(self, signed) -> np.ndarray:
        """Near-duplicate candidate pairs (orders) from band buckets shuffled by key across the workers."""
        dedup = self.config.dedup
        bands = signed.map_batches(band_rows, batch_size=self.config.ray.batch_size, batch_format="numpy", fn_kwargs={
            "num_perm": dedup.num_perm, "num_bands": dedup_mod.bands_of(dedup), "partitions": self.partitions})
        pairs = bands.groupby("part").map_groups(bucket_candidates, batch_format="numpy")
        found = [np.stack([b["a"], b["b"]], axis=1) for b in pairs.iter_batches(batch_size=None, batch_format="numpy") if len(b["a"])]
        return np.unique(np.concatenate(found), axis=0) if found else np.zeros((0, 2), np.int64)

    def _near_candidates(self, spill: Path) -> np.ndarray:
        """The candidate pairs Ray's band shuffle found, as spill positions: the streaming
        engine's near pass checks them (texts read back from the spill by offset)."""
        return self._near_pairs


def _members(values: np.ndarray, sorted_set: np.ndarray) -> np.ndarray:
    """Which `values` are in `sorted_set` (ascending): a binary search per value, not a sort of
    the whole set per batch as `np.isin` does."""
    at = np.searchsorted(sorted_set, values)
    found = at < len(sorted_set)
    found[found] = sorted_set[at[found]] == values[found]
    return found
