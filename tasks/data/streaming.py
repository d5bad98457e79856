"""The `streaming` engine of the data stage: the local engine's steps with the records on disk,
for inputs larger than memory. It publishes the local engine's files byte for byte.

How memory stays bounded:

- records are read, cleaned, token-counted, given ids and exact-deduplicated in batches
  (`BATCH`), then pickled to a spill file on the staging disk; rejections are written as they
  happen (those of later steps go to side files appended in the local engine's order);
- exact dedup looks its normalised-content keys up in an on-disk sqlite table (key, id,
  source), not in a dict of every key;
- MinHash signatures go to a flat file, read back sequentially in chunks; LSH buckets are formed
  band by band from one 8-byte hash per row (written per band to disk in that pass): the rows
  whose hash is shared are found a range of hash values at a time (`dedup.repeated_rows`), then
  split by the band's exact values read for those rows only;
- the split, mixing and the report run on small per-record arrays (position in the spill file,
  kind, task, file, split hash, alive, split: 27 bytes per record, plus one positions array of 8
  bytes per record at a time) and are written by reading records back from the spill file; the
  mix's order is an int64 array (`split.mix_positions`), not a list of records.

What is not bounded (README: "Streaming"): those per-record arrays (memory proportional to the
number of records, not to their text: tests/stage/test_data_streaming.py holds every step under
72 bytes per record); the texts of near-duplicate and contamination *candidates* (checked on
their exact shingle sets). In validation, Great Expectations' rows suite runs over frames of
`validate.ROWS_PER_RUN` rows merged into one run's result (`validate._MergedRows`), whose id
uniqueness check keeps the ids on disk.
"""

from __future__ import annotations

import os
import pickle
import sqlite3
from array import array
import tempfile
import time
from hashlib import blake2b
from pathlib import Path
from typing import Any, Iterable, Iterator

import numpy as np
from tunepipe.schemas.records import record_id
from tunepipe.tasks.core.stage import StageOutput
from tunepipe.tasks.data import dedup as dedup_mod
from tunepipe.tasks.data.clean import batched, load_token_counter, token_bound_reason
from tunepipe.tasks.data.formats import FAMILY, content_parts, prompt_text, public_record
from tunepipe.tasks.data.report import build_report
from tunepipe.tasks.data.sources import files_to_read
from tunepipe.tasks.data.split import _rounded, mix_positions
from tunepipe.tasks.data.run import _DataRun, _dumps
from tunepipe.tasks.data.validate import ValidationOutcome, validate_counts, validate_rows

BATCH = 4096  # records cleaned, counted and deduplicated together (the local engine's token batch)
WRITE_BUFFER = 1 << 20  # bytes buffered per file written (and per copy of a side file)
PROGRESS_EVERY = 1_000_000  # records read between two progress lines of the first pass
_ROWS = 1 << 14  # signature rows read per step of the band pass (8 MiB at 128 permutations)
VERIFY_PAIRS = 1 << 13  # candidate pairs checked together (~2.6 KB each: texts, shingles, signatures)
_KINDS = ("instruction", "chat", "preference", "text")
# Kind codes of each family (sft, preference, text), for comparing the kind column per family.
_FAMILY_KINDS = {family: [i for i, k in enumerate(_KINDS) if FAMILY[k] == family] for family in ("sft", "preference", "text")}
_SPLITS = ("train", "validation", "test")
_NO_SPLIT = 3  # text records
_SQL_VARS = 900  # keys per sqlite IN (...) query (below every sqlite's variable limit)


class _Lite:
    """Sized, re-iterable {kind, task, split} views of records (what the report counts)."""

    def __init__(self, run: "StreamingDataRun", positions: np.ndarray) -> None:
        self.run, self.positions = run, positions

    def __len__(self) -> int:
        return len(self.positions)

    def __iter__(self) -> Iterator[dict]:
        kinds, tasks, splits = self.run.kind, self.run.task, self.run.split
        for p in self.positions:  # numpy ints: a list of Python ints costs ~36 bytes per record
            code = splits[p]
            yield {"kind": _KINDS[kinds[p]], "task": self.run.tasks[tasks[p]], "split": _SPLITS[code] if code < _NO_SPLIT else None}


class StreamingDataRun(_DataRun):
    """The stage run with `engine: streaming`: the local engine's files, records kept on disk."""

    def run(self) -> StageOutput:
        config = self.config
        to_read = [(source, files_to_read(source)) for source in config.sources]
        count_tokens = load_token_counter(config.clean.tokenizer) if config.clean.tokenizer else None
        self.out.mkdir(parents=True, exist_ok=True)
        # Under the key's checkpoint dir: same disk as the artifacts, never published, and wiped
        # with the staging dir if a crash leaves it behind (the stage is not resumable).
        self.ctx.checkpoint_dir.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(prefix="data-stream-", dir=self.ctx.checkpoint_dir) as spill:
            return self._run(Path(spill), to_read, count_tokens)

    def _run(self, spill: Path, to_read, count_tokens) -> StageOutput:
        with open(self.out / "rejected.jsonl", "wb", buffering=WRITE_BUFFER) as self._rejected_file:
            dedup_counts = self._first_pass(spill, to_read, count_tokens)
            self.records_file = open(spill / "records.pickle", "rb")
            with self.records_file:
                clock = time.perf_counter()
                dedup_counts["near_duplicates"] = self._near_pass(spill)
                self._timed("dedup", clock)
                self._progress("dedup", self._alive_count())
                clock = time.perf_counter()
                self._assign_splits()
                dedup_counts["contamination"] = self._contamination_pass(spill)
                clock = self._timed("split_contamination", clock)
                self._progress("split_contamination", self._alive_count())
                outcome = self._validate_streamed()
                clock = self._timed("validate", clock)
                self._progress("validate", self._alive_count())
                mixed, mix_stats = self._mix_streamed()
                clock = self._timed("mix", clock)
                self._write_streamed(mixed)
                self._timed("write", clock)
        # Kind codes compared per family, not a per-record array of family names (a '<U10' array
        # is 40 bytes per record: at 5M records the largest thing the run held).
        sft = self._kept_of("sft")
        sft = np.concatenate([sft[self.split[sft] != 0], sft[self.split[sft] == 0]])
        preferences, corpus = self._kept_of("preference"), self._kept_of("text")
        for label, n in enumerate(np.bincount(self.label[self.alive], minlength=len(self.labels)).tolist()):
            if n:
                self.per_file[self.labels[label]]["kept"] += n
        report = build_report(
            read=self.read, rejected=self.rejected, sft=_Lite(self, sft), preferences=_Lite(self, preferences),
            corpus=_Lite(self, corpus), train_after_mix=len(mixed), mix_stats=mix_stats, per_file=self.per_file,
            cleaner_counts=self.cleaner.counts, pii=self.cleaner.pii, dedup=dedup_counts,
            validation={
                "success": outcome.success,
                "blocking_failures": sum(f.blocking for f in outcome.failures),
                "failures": [{"name": f.name, "count": f.count, "blocking": f.blocking, "examples": f.examples} for f in outcome.failures],
            },
        )
        return self._finish(report, outcome)

    def _kept_of(self, family: str) -> np.ndarray:
        """Positions of the kept records of a family (sft, preference, text), ascending."""
        return np.flatnonzero(self.alive & np.isin(self.kind, _FAMILY_KINDS[family]))

    def _progress(self, step: str, kept: int) -> None:  # type: ignore[override]
        self.log.info("data: %s done: %d read, %d kept, %d rejected so far", step, self.read, kept, sum(self.rejected.values()))

    def _alive_count(self) -> int:
        return int(self.alive.sum())

    # -- pass 1: read, clean, token bounds, ids, exact dedup, signatures -----------------------

    def _first_pass(self, spill: Path, to_read, count_tokens) -> dict[str, Any]:
        """The kept records of the first pass (`_kept_batches`) appended to the spill file, and
        their per-record columns; the dedup counts so far."""
        config = self.config
        self.tasks: list[str] = []
        self.labels: list[str] = []
        task_codes: dict[str, int] = {}
        # array.array, not lists: 8 bytes or fewer per record instead of a pointer and an int object.
        columns = self._columns = {"offset": array("q"), "kind": array("b"), "task": array("i"), "label": array("i"), "split_hash": array("Q")}
        salt = f"{config.split.seed}:".encode()
        self.exact_duplicates = 0
        with open(spill / "records.pickle", "wb", buffering=WRITE_BUFFER) as records:
            for kept in self._kept_batches(spill, to_read, count_tokens):
                for record in kept:
                    columns["offset"].append(records.tell())
                    pickle.dump(record, records, protocol=pickle.HIGHEST_PROTOCOL)
                    columns["kind"].append(_KINDS.index(record["kind"]))
                    code = task_codes.get(record["task"])
                    if code is None:
                        code = task_codes[record["task"]] = len(self.tasks)
                        self.tasks.append(record["task"])
                    columns["task"].append(code)
                    columns["label"].append(self._label_code(record["source"]))
                    columns["split_hash"].append(int.from_bytes(blake2b(salt + record["id"].encode(), digest_size=8).digest(), "big"))
        self.offset = np.frombuffer(columns["offset"], dtype=np.int64)
        self.kind = np.frombuffer(columns["kind"], dtype=np.int8)
        self.task = np.frombuffer(columns["task"], dtype=np.int32)
        self.label = np.frombuffer(columns["label"], dtype=np.int32)
        self.split_hash = np.frombuffer(columns["split_hash"], dtype=np.uint64)
        del columns, self._columns
        self.alive = np.ones(len(self.offset), dtype=bool)
        self.split = np.full(len(self.offset), _NO_SPLIT, dtype=np.int8)
        return self._dedup_counts(self.exact_duplicates, 0)

    def _kept_batches(self, spill: Path, to_read, count_tokens) -> Iterator[list[dict]]:
        """This process's first pass: batches of records read, cleaned, token-bounded, given ids,
        exact-deduplicated and signed (signatures to `signatures.u32`), in reading order; its
        rejections written in the local engine's order. The Ray engine has its own."""
        config = self.config
        seen = sqlite3.connect(str(spill / "exact.sqlite"))
        seen.execute("CREATE TABLE seen (key BLOB PRIMARY KEY, id TEXT, source TEXT) WITHOUT ROWID")
        clock = time.perf_counter()
        batch_work = 0.0
        with open(spill / "tokens.rejects", "wb+") as token_rejects, open(spill / "exact.rejects", "wb+") as exact_rejects, \
                open(spill / "signatures.u32", "wb", buffering=WRITE_BUFFER) as signatures:
            next_progress = PROGRESS_EVERY
            for batch in batched(self.read_records(to_read), BATCH):
                started = time.perf_counter()
                if self.read >= next_progress:  # a long first pass shows it is moving (Prefect task log)
                    self.log.info("data: streaming: %d read, %d kept, %d rejected so far", self.read, len(self._columns["offset"]), sum(self.rejected.values()))
                    next_progress = self.read + PROGRESS_EVERY
                if count_tokens is not None:
                    batch = self._token_batch(batch, count_tokens, token_rejects)
                for record in batch:
                    record["id"] = record_id(record["task"], record["kind"], *content_parts(record))
                kept = self._exact_batch(batch, seen, exact_rejects) if config.dedup.exact else batch
                self.exact_duplicates += len(batch) - len(kept)
                if config.dedup.near and kept:
                    signatures.write(dedup_mod.signatures([" ".join(content_parts(r)) for r in kept], config.dedup).tobytes())
                yield kept  # spilled by `_first_pass` before this generator resumes
                batch_work += time.perf_counter() - started
            # The local engine's steps are sequential; here they interleave per batch: token
            # bounds, exact dedup, signatures and spilling count as dedup.
            self.timings["read_clean"] = time.perf_counter() - clock - batch_work
            self.timings["dedup"] = batch_work
            self._progress("read_clean", len(self._columns["offset"]))
            for side in (token_rejects, exact_rejects):  # the local engine writes these after all reading
                side.seek(0)
                while chunk := side.read(WRITE_BUFFER):
                    self._rejected_file.write(chunk)
        seen.close()

    def _label_code(self, location: str) -> int:
        label = location.rpartition(":")[0]
        if not self.labels or self.labels[-1] != label:  # files are read one after the other
            if label not in self.labels:
                self.labels.append(label)
            return self.labels.index(label)
        return len(self.labels) - 1

    def _side_reject(self, handle, record: Any, reason: str, location: str, detail: str, **extra: Any) -> None:
        """`_reject`, into a side file appended to rejected.jsonl later."""
        main, self._rejected_file = self._rejected_file, handle
        try:
            self._reject(record, reason, location, detail, **extra)
        finally:
            self._rejected_file = main

    def _token_batch(self, batch: list[dict], count_tokens, side) -> list[dict]:
        kept = []
        for record, count in zip(batch, count_tokens(["\n".join(content_parts(r)) for r in batch])):
            record["tokens"] = count
            problem = token_bound_reason(count, self.config.clean)
            if problem:
                fields = {k: v for k, v in record.items() if k not in ("source", "chars", "tokens")}
                self._side_reject(side, fields, problem[0], record["source"], problem[1])
            else:
                kept.append(record)
        return kept

    def _exact_batch(self, batch: list[dict], seen: sqlite3.Connection, side) -> list[dict]:
        collapsed = self.config.clean.collapse_whitespace
        keys = [dedup_mod.exact_key(FAMILY[r["kind"]], content_parts(r), collapsed) for r in batch]
        earlier: dict[bytes, tuple[str, str]] = {}
        unique = list(dict.fromkeys(keys))
        for chunk in batched(unique, _SQL_VARS):
            query = f"SELECT key, id, source FROM seen WHERE key IN ({','.join('?' * len(chunk))})"
            earlier.update((key, (id_, source)) for key, id_, source in seen.execute(query, chunk))
        kept, new = [], []
        for record, key in zip(batch, keys):
            first = earlier.get(key)
            if first is not None:
                self._side_reject(side, public_record(record), "exact_duplicate", record["source"],
                                  f"same normalised content as {first[0]} ({first[1]})", duplicate_of=first[0])
                continue
            earlier[key] = (record["id"], record["source"])
            new.append((key, record["id"], record["source"]))
            kept.append(record)
        seen.executemany("INSERT INTO seen VALUES (?, ?, ?)", new)
        return kept

    # -- records back from the spill file -------------------------------------------------------

    def _load(self, position: int) -> dict:
        self.records_file.seek(int(self.offset[position]))
        record = pickle.load(self.records_file)
        code = self.split[position]
        if code < _NO_SPLIT:
            record["split"] = _SPLITS[code]
        return record

    def _stream(self, positions: Iterable[int]) -> Iterator[dict]:
        """Records at increasing `positions`, read sequentially (no seek between neighbours).
        Callers pass numpy arrays, not lists: a list of Python ints costs ~36 bytes per record."""
        handle = self.records_file
        for position in positions:
            if handle.tell() != self.offset[position]:
                handle.seek(int(self.offset[position]))
            record = pickle.load(handle)
            code = self.split[position]
            if code < _NO_SPLIT:
                record["split"] = _SPLITS[code]
            yield record

    # -- near duplicates and contamination: LSH band by band over signatures on disk -------------

    def _band_pairs(self, path: Path, tags: np.ndarray, key) -> np.ndarray:
        """Candidate pairs (row indices) of the signatures in `path` sharing an exact band bucket
        (tag + band values), paired as the local engine does (`dedup.bucket_pairs` with the
        order `key(rows)`: a function, so no per-record key array is held).

        One sequential pass over the signatures writes one 8-byte hash per (row, band) to a file
        per band; then band by band, the rows whose hash is shared are found from that file a
        hash range at a time (`dedup.repeated_rows`), and only their band values are read back
        (`_gather`) and bucketed by their exact values.
        """
        dedup = self.config.dedup
        num_bands = dedup_mod.bands_of(dedup)
        width, rows = dedup.num_perm // num_bands, len(tags)
        band_paths = [path.with_name(f"{path.name}.band{band}") for band in range(num_bands)]
        with open(path, "rb") as handle:
            outputs = [open(band_path, "wb") for band_path in band_paths]
            try:
                for start in range(0, rows, _ROWS):
                    count = min(_ROWS, rows - start)
                    chunk = np.fromfile(handle, dtype=np.uint32, count=count * dedup.num_perm).reshape(count, dedup.num_perm)
                    for band, output in enumerate(outputs):
                        _band_hash(chunk[:, band * width:(band + 1) * width], tags[start:start + count]).tofile(output)
            finally:
                for output in outputs:
                    output.close()
        found = []
        signatures = open(path, "rb")
        for band, band_path in enumerate(band_paths):
            with open(band_path, "rb") as hashes:
                shared = dedup_mod.repeated_rows(hashes, rows)
            band_path.unlink()
            if len(shared) < 2:
                continue
            block = _gather(signatures, shared, dedup.num_perm, band * width, width)
            exact = np.concatenate([tags[shared, None].astype(np.uint32), block], axis=1)
            labels = np.unique(exact, axis=0, return_inverse=True)[1].ravel()
            found.append(shared[dedup_mod.bucket_pairs(labels, key(shared))])
        signatures.close()
        return np.unique(np.concatenate(found), axis=0) if found else np.zeros((0, 2), np.int64)

    def _verified(self, pairs: np.ndarray, text_of) -> np.ndarray:
        """Pairs (positions) passing the local engine's similarity test (`dedup.verify_pairs`),
        `VERIFY_PAIRS` at a time: the test is per pair, so chunks give the same pairs while only
        one chunk's texts, shingles and signatures are in memory."""
        if len(pairs) == 0:
            return pairs
        kept = []
        for start in range(0, len(pairs), VERIFY_PAIRS):
            chunk = pairs[start:start + VERIFY_PAIRS]
            involved, local = np.unique(chunk, return_inverse=True)
            texts = [text_of(record) for record in self._stream(involved.tolist())]
            kept.append(chunk[dedup_mod.verify_pairs(texts, local.reshape(chunk.shape), self.config.dedup)])
        return np.concatenate(kept)

    def _near_pass(self, spill: Path) -> int:
        config = self.config.dedup
        if not config.near or len(self.offset) < 2:
            return 0
        pairs = self._near_candidates(spill)
        similar = self._verified(pairs, lambda r: " ".join(content_parts(r)))
        duplicate_of: dict[int, int] = {}
        for earlier, later in sorted(zip(similar.min(axis=1).tolist(), similar.max(axis=1).tolist())) if len(similar) else []:
            duplicate_of.setdefault(later, earlier)
        for position in sorted(duplicate_of):
            record, original = self._load(position), self._load(duplicate_of[position])
            self._reject_record(record, "near_duplicate", f"near-duplicate of {original['id']} ({original['source']})", duplicate_of=original["id"])
            self.alive[position] = False
        return len(duplicate_of)

    def _near_candidates(self, spill: Path) -> np.ndarray:
        """Candidate pairs (positions) of near duplicates: LSH buckets of the first pass's
        signatures, within a family."""
        families = np.array([list(dict.fromkeys(FAMILY.values())).index(FAMILY[k]) for k in _KINDS], dtype=np.int8)[self.kind]
        return self._band_pairs(spill / "signatures.u32", families, lambda rows: rows)

    def _assign_splits(self) -> None:
        """`split.assign_splits` on the arrays: per (family, task), ordered by the salted id hash."""
        config = self.config.split
        family_code = np.array([("sft", "preference", "text").index(FAMILY[k]) for k in _KINDS], dtype=np.int32)[self.kind]
        live = np.flatnonzero(self.alive & (family_code < 2))
        group = family_code[live] * (len(self.tasks) + 1) + self.task[live]  # int32: 4 bytes per live record
        del family_code
        for value in np.unique(group).tolist():
            members = live[group == value]
            members = members[np.argsort(self.split_hash[members], kind="stable")]
            n = len(members)
            n_validation = _rounded(n * config.validation)
            n_test = min(_rounded(n * config.test), n - n_validation)
            self.split[members[:n_validation]] = 1
            self.split[members[n_validation:n_validation + n_test]] = 2
            self.split[members[n_validation + n_test:]] = 0

    def _contamination_pass(self, spill: Path) -> int:
        config = self.config.dedup
        if not config.contamination:
            return 0
        supervised = np.flatnonzero(self.alive & (self.split < _NO_SPLIT))
        is_train = self.split[supervised] == 0
        if is_train.all() or not is_train.any():
            return 0
        path = spill / "prompts.u32"
        with open(path, "wb", buffering=WRITE_BUFFER) as handle:
            for chunk in batched(self._stream(supervised), BATCH):
                handle.write(dedup_mod.signatures([prompt_text(r) for r in chunk], config).tobytes())
        # Eval rows sort first in a bucket, so a train row is paired with an eval row.
        def key(rows: np.ndarray) -> np.ndarray:
            return is_train[rows].astype(np.int64) * (len(supervised) + 1) + rows

        pairs = self._band_pairs(path, np.zeros(len(supervised), np.int8), key)
        pairs = pairs[is_train[pairs[:, 0]] != is_train[pairs[:, 1]]] if len(pairs) else pairs
        similar = self._verified(supervised[pairs], prompt_text) if len(pairs) else pairs
        hits: dict[int, int] = {}
        for a, b in similar.tolist():
            eval_position, train_position = (a, b) if self.split[a] != 0 else (b, a)
            if train_position not in hits or eval_position < hits[train_position]:
                hits[train_position] = eval_position
        for position in sorted(hits):
            other = self._load(hits[position])
            self._reject_record(self._load(position), "contamination",
                                f"prompt near-duplicates {other['split']} record {other['id']} ({other['source']})", duplicate_of=other["id"])
            self.alive[position] = False
        return len(hits)

    # -- validation, mixing, writing -------------------------------------------------------------

    def _validate_streamed(self) -> ValidationOutcome:
        if not self.config.validation.enabled:
            return ValidationOutcome(True, [], {"skipped": True})
        outcome = validate_rows(self._stream(np.flatnonzero(self.alive)), self.config)
        reject_ids: dict[str, str] = {}
        for failure in outcome.failures:
            for record_id_ in failure.ids:
                reject_ids.setdefault(record_id_, failure.name.removeprefix("rule "))
        if reject_ids:
            positions = np.flatnonzero(self.alive)
            for position, record in zip(positions, self._stream(positions)):
                rule = reject_ids.get(record["id"])
                if rule is not None:
                    self._reject_record(record, f"rule:{rule}", f"failed non-blocking rule {rule}")
                    self.alive[position] = False
        counts = validate_counts(self._stream(np.flatnonzero(self.alive)), self.config)
        return ValidationOutcome(outcome.success and counts.success, outcome.failures + counts.failures,
                                 {"rows": outcome.results, "counts": counts.results})

    def _mix_streamed(self) -> tuple[np.ndarray, dict[str, dict[str, int]]]:
        train = np.flatnonzero(self.alive & np.isin(self.kind, _FAMILY_KINDS["sft"]) & (self.split == 0))
        mixed, dropped, stats = mix_positions(train, self.task[train], self.tasks, self.config.mix)
        for position in dropped.tolist():
            record = self._load(position)
            self._reject_record(record, "mix_downsampled", f"train of task {record['task']} downsampled by mix")
            self.alive[position] = False
        return mixed, stats

    def _write_streamed(self, mixed: np.ndarray) -> None:
        sft = self.alive & np.isin(self.kind, _FAMILY_KINDS["sft"])
        files: dict[str, Iterable[dict]] = {
            "train.jsonl": (self._load(position) for position in mixed),  # numpy ints: no list of Python ints
            "validation.jsonl": self._stream(np.flatnonzero(sft & (self.split == 1))),
            "test.jsonl": self._stream(np.flatnonzero(sft & (self.split == 2))),
        }
        for name, family in (("preferences.jsonl", "preference"), ("corpus.jsonl", "text")):
            positions = self._kept_of(family)
            if len(positions):
                files[name] = self._stream(positions)
        for name, rows in files.items():
            with open(self.out / name, "wb", buffering=WRITE_BUFFER) as handle:
                for record in rows:  # one at a time: memory bounded by the largest record, not a batch
                    handle.write(_dumps(public_record(record)) + b"\n")


def _gather(handle, rows: np.ndarray, row_values: int, start: int, width: int) -> np.ndarray:
    """Values [start, start + width) of `rows` of a flat uint32 file of `row_values` per row, read
    row by row. Not a memory map: its touched pages stay in the process's RSS, and over the bands
    they cover most of the signatures (512 bytes per record at 128 permutations)."""
    out = np.empty((len(rows), width), dtype=np.uint32)
    fd, size, stride, offset = handle.fileno(), 4 * width, 4 * row_values, 4 * start
    for index, row in enumerate(rows.tolist()):
        out[index] = np.frombuffer(os.pread(fd, size, row * stride + offset), dtype=np.uint32)
    return out


def _band_hash(values: np.ndarray, tags: np.ndarray) -> np.ndarray:
    """One 8-byte hash per row of a band's values and the row's tag (family): rows with equal
    values hash equally; unequal rows that collide are told apart by their exact values later."""
    with np.errstate(over="ignore"):
        mixed = tags.astype(np.uint64) * np.uint64(0xD6E8FEB86659FD93)
        for column in range(values.shape[1]):
            mixed = (mixed ^ values[:, column].astype(np.uint64)) * np.uint64(0x9E3779B97F4A7C15)
            mixed ^= mixed >> np.uint64(29)
    return mixed
