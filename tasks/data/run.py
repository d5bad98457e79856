"""One run of the data stage on the local engine (`_DataRun`), and the pieces the other engines
reuse from it: the streaming engine (`streaming.py`) and the Ray engine (`ray_engine.py`) subclass
it for its bookkeeping (rejections, progress, the report and the failure checks) and its reading.
It sits below the three, so `stage.py` picks an engine without an import circle.

Records stay plain dicts from reading to writing (pydantic per record would dominate the run
time at 1M records); `schemas/records.py` documents the shapes and the tests validate them.
"""

from __future__ import annotations

import json
import time
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any, BinaryIO, Iterator

import orjson
from tunepipe.schemas.data import DataConfig
from tunepipe.schemas.records import record_id
from tunepipe.tasks.core.stage import StageContext, StageFailed, StageOutput
from tunepipe.tasks.data import dedup as dedup_mod
from tunepipe.tasks.data.clean import (
    Cleaner,
    batched,
    load_token_counter,
    token_bound_reason,
)
from tunepipe.tasks.data.formats import (
    FAMILY,
    RecordError,
    content_parts,
    parse_record,
    prompt_text,
    public_record,
)
from tunepipe.tasks.data.report import (
    build_report,
    empty_source_warnings,
    metrics,
    quality_rejected,
    summary,
    table,
)
from tunepipe.tasks.data.sources import (
    MAX_RAW_CHARS,
    FileChanged,
    Malformed,
    ReadDigest,
    SourceUnavailable,
    UnreadableEncoding,
    files_to_read,
    read_file,
)
from tunepipe.tasks.data.split import assign_splits, mix_train
from tunepipe.tasks.data.validate import (
    ValidationOutcome,
    validate_counts,
    validate_rows,
)

# A rejected record is kept to be read by a person: one longer than this is cut to its first
# MAX_RAW_CHARS characters (as malformed records are) with its original size.
MAX_REJECTED_LINE_BYTES = 4 * MAX_RAW_CHARS

OUTPUT_FILES = ("train.jsonl", "validation.jsonl", "test.jsonl", "preferences.jsonl", "corpus.jsonl")
_DUMPS_OPTIONS = orjson.OPT_SERIALIZE_NUMPY


def _dumps(obj: Any) -> bytes:
    return orjson.dumps(obj, default=str, option=_DUMPS_OPTIONS)


class _DataRun:
    """One execution of the stage; holds the counters the report is built from."""

    def __init__(self, config: DataConfig, ctx: StageContext) -> None:
        self.config = config
        self.ctx = ctx
        self.out = Path(ctx.staging_dir)
        self.log = ctx.logger
        self.read = 0
        self.rejected: Counter = Counter()
        self.per_file: dict[str, Counter] = defaultdict(Counter)
        self.timings: dict[str, float] = {}
        self.cleaner = Cleaner(config.clean)
        self._rejected_file: BinaryIO | None = None

    # -- bookkeeping ------------------------------------------------------------------------

    def _reject(self, record: Any, reason: str, location: str, detail: str = "", **extra: Any) -> None:
        line = {"reason": reason, "source": location, "record": record}
        if detail:
            line["detail"] = detail[:MAX_RAW_CHARS]
        line.update(extra)
        dumped = _dumps(line)
        if len(dumped) > MAX_REJECTED_LINE_BYTES:
            # A 50 MB record is not copied whole: its JSON's first MAX_RAW_CHARS characters, and its size.
            whole = _dumps(record)
            line["record"] = whole[:MAX_RAW_CHARS].decode("utf-8", "ignore")
            line["record_truncated_from_bytes"] = len(whole)
            dumped = _dumps(line)
        self._rejected_file.write(dumped + b"\n")
        self.rejected[reason] += 1
        self.per_file[location.rpartition(":")[0]]["rejected"] += 1

    def _reject_record(self, record: dict, reason: str, detail: str = "", **extra: Any) -> None:
        self._reject(public_record(record), reason, record["source"], detail, **extra)

    def _dedup_counts(self, exact: int, near: int) -> dict[str, Any]:
        """The report's dedup section: what was removed and the MinHash settings that decided it."""
        dedup = self.config.dedup
        return {"exact_duplicates": exact, "near_duplicates": near, "threshold": dedup.threshold, "num_perm": dedup.num_perm,
                "num_bands": dedup_mod.bands_of(dedup), "ngram": dedup.ngram}

    def _timed(self, name: str, started: float) -> float:
        now = time.perf_counter()
        self.timings[name] = self.timings.get(name, 0.0) + now - started
        return now

    # -- the pipeline -----------------------------------------------------------------------

    def run(self) -> StageOutput:
        config = self.config
        # Everything that can fail without reading records fails here, before any work.
        to_read = [(source, files_to_read(source)) for source in config.sources]
        count_tokens = load_token_counter(config.clean.tokenizer) if config.clean.tokenizer else None
        self.out.mkdir(parents=True, exist_ok=True)
        clock = time.perf_counter()
        with open(self.out / "rejected.jsonl", "wb", buffering=1 << 20) as self._rejected_file:
            records, dedup_counts = self._clean_and_deduplicate(to_read, count_tokens)
            clock = time.perf_counter()
            assign_splits(records, config.split)
            records, dedup_counts["contamination"] = self._remove_contamination(records)
            clock = self._timed("split_contamination", clock)
            self._progress("split_contamination", records)
            records, outcome = self._validate(records)
            clock = self._timed("validate", clock)
            self._progress("validate", records)
            sft = [r for r in records if FAMILY[r["kind"]] == "sft"]
            train, mix_stats = self._mix([r for r in sft if r["split"] == "train"])
            clock = self._timed("mix", clock)
        preferences = [r for r in records if r["kind"] == "preference"]
        corpus = [r for r in records if r["kind"] == "text"]
        sft = [r for r in sft if r["split"] != "train"] + [r for r in sft if r["split"] == "train" and not r.get("dropped")]
        self._write_outputs(train, sft, preferences, corpus)
        clock = self._timed("write", clock)
        for record in sft + preferences + corpus:
            self.per_file[record["source"].rpartition(":")[0]]["kept"] += 1
        report = build_report(
            read=self.read,
            rejected=self.rejected,
            sft=sft,
            preferences=preferences,
            corpus=corpus,
            train_after_mix=len(train),
            mix_stats=mix_stats,
            per_file=self.per_file,
            cleaner_counts=self.cleaner.counts,
            pii=self.cleaner.pii,
            dedup=dedup_counts,
            validation={
                "success": outcome.success,
                "blocking_failures": sum(f.blocking for f in outcome.failures),
                "failures": [{"name": f.name, "count": f.count, "blocking": f.blocking, "examples": f.examples} for f in outcome.failures],
            },
        )
        return self._finish(report, outcome)

    def _finish(self, report: dict[str, Any], outcome: ValidationOutcome) -> StageOutput:
        """Warnings, report.json and validation.json, the failure checks, the stage output."""
        report["warnings"] = empty_source_warnings(report)
        for warning in report["warnings"]:
            self.log.warning("data: %s", warning)
        (self.out / "report.json").write_text(json.dumps(report, indent=1, default=str))
        (self.out / "validation.json").write_text(json.dumps(outcome.results, indent=1, default=str))
        assert report["read"] == report["kept"] + report["rejected_total"], "data stage lost records"
        self._fail_if_needed(report, outcome)
        self.log.info("data: read %d, kept %d, rejected %d", report["read"], report["kept"], report["rejected_total"])
        return StageOutput(metrics=metrics(report, self.timings), summary=summary(report), table=table(report))

    def _clean_and_deduplicate(self, to_read, count_tokens) -> tuple[list[dict], dict[str, Any]]:
        """Read, clean, token bounds, ids, exact and near dedup: the kept records in source order."""
        clock = time.perf_counter()
        records = self._read_and_clean(to_read)
        clock = self._timed("read_clean", clock)
        self._progress("read_clean", records)
        if count_tokens is not None:
            records = self._token_bounds(records, count_tokens)
            clock = self._timed("tokens", clock)
            self._progress("tokens", records)
        records, dedup_counts = self._deduplicate(records)
        self._timed("dedup", clock)
        self._progress("dedup", records)
        return records, dedup_counts

    def _progress(self, step: str, records: list[dict]) -> None:
        """One log line per step (the Prefect UI shows the stage's log as it runs)."""
        self.log.info("data: %s done: %d read, %d kept, %d rejected so far", step, self.read, len(records), sum(self.rejected.values()))

    def _read_and_clean(self, to_read) -> list[dict]:
        return list(self.read_records(to_read))

    def read_records(self, to_read) -> Iterator[dict]:
        """Every source file's records, read, parsed and cleaned one at a time (the streaming engine consumes
        them as they come); malformed and unparsable ones are rejected on the way, and each file's bytes are
        checked against the digests the key was computed from once it has been read."""
        clean_record = self.cleaner.clean_record
        for index, (source, files) in enumerate(to_read):
            fmt, task, field_map, task_field = source.format, source.task, source.field_map, source.task_field
            for file, file_type, label in files:
                self.log.info("data: reading %s (%s, %s)", label, file_type, fmt)
                before = self.read
                digest = ReadDigest()
                for location, raw in self._read_checked(file, file_type, label, source, digest):
                    self.read += 1
                    if type(raw) is Malformed:
                        self._reject(raw.text, raw.reason, location, raw.error)
                        continue
                    try:
                        record = parse_record(raw, fmt, task, field_map, task_field)
                        record["chars"] = clean_record(record)
                    except RecordError as error:
                        self._reject(raw, error.reason, location, error.detail)
                        continue
                    record["source"] = location
                    yield record
                self.per_file[label]["read"] += self.read - before
                self._check_read_bytes(index, label, digest)

    def _read_checked(self, file, file_type: str, label: str, source, digest: ReadDigest):
        try:
            yield from read_file(file, file_type, label, source, digest)
        except FileChanged as exc:
            raise StageFailed(f"data: {exc}; nothing was published: rerun once the file is no longer being written") from None
        except (UnreadableEncoding, SourceUnavailable) as exc:
            raise StageFailed(f"data: {exc}") from None

    def _check_read_bytes(self, index: int, label: str, digest: ReadDigest) -> None:
        """The records must come from the bytes the key was computed from: a file rewritten after
        keying (or while it was read) would otherwise publish other records under its old key."""
        payload = self.ctx.key_payload
        if payload is None or digest.sha256 is None:  # a hub dataset, or a run outside run_stage
            return
        keyed = payload["sources"][index]["path"]
        if isinstance(keyed, list) and digest.sha256 not in keyed:
            raise StageFailed(
                f"data: {label} changed while the stage was reading it (its bytes now have sha256 "
                f"{digest.sha256[:12]}…, not one of the digests the cache key was computed from); nothing was "
                "published: rerun once the file is no longer being written"
            )

    def _token_bounds(self, records: list[dict], count_tokens) -> list[dict]:
        kept = []
        for batch in batched(records, 4096):
            counts = count_tokens(["\n".join(content_parts(r)) for r in batch])
            for record, count in zip(batch, counts):
                record["tokens"] = count
                problem = token_bound_reason(count, self.config.clean)
                if problem:
                    self._reject_record_raw(record, *problem)
                else:
                    kept.append(record)
        return kept

    def _reject_record_raw(self, record: dict, reason: str, detail: str) -> None:
        # Before ids exist: write the cleaned fields as they are.
        fields = {k: v for k, v in record.items() if k not in ("source", "chars", "tokens")}
        self._reject(fields, reason, record["source"], detail)

    def _deduplicate(self, records: list[dict]) -> tuple[list[dict], dict[str, Any]]:
        config = self.config.dedup
        seen: dict[bytes, tuple[str, str]] = {}
        collapsed = self.config.clean.collapse_whitespace
        kept = []
        exact = 0
        for record in records:
            parts = content_parts(record)
            record["id"] = record_id(record["task"], record["kind"], *parts)
            if config.exact:
                key = dedup_mod.exact_key(FAMILY[record["kind"]], parts, collapsed)
                first = seen.get(key)
                if first is not None:
                    exact += 1
                    self._reject_record(record, "exact_duplicate", f"same normalised content as {first[0]} ({first[1]})", duplicate_of=first[0])
                    continue
                seen[key] = (record["id"], record["source"])
            kept.append(record)
        seen.clear()
        near = 0
        if config.near:
            by_family: dict[str, list[int]] = defaultdict(list)
            for position, record in enumerate(kept):
                by_family[FAMILY[record["kind"]]].append(position)
            drop: dict[int, int] = {}
            for family, positions in by_family.items():
                texts = [" ".join(content_parts(kept[p])) for p in positions]
                for later, earlier in dedup_mod.near_duplicates(texts, config).items():
                    drop[positions[later]] = positions[earlier]
            for position in sorted(drop):
                record, original = kept[position], kept[drop[position]]
                self._reject_record(record, "near_duplicate", f"near-duplicate of {original['id']} ({original['source']})", duplicate_of=original["id"])
            near = len(drop)
            kept = [r for p, r in enumerate(kept) if p not in drop]
        counts = self._dedup_counts(exact, near)
        return kept, counts

    def _remove_contamination(self, records: list[dict]) -> tuple[list[dict], int]:
        if not self.config.dedup.contamination:
            return records, 0
        train_positions, eval_positions = [], []
        for position, record in enumerate(records):
            if record["kind"] == "text":
                continue
            (train_positions if record["split"] == "train" else eval_positions).append(position)
        hits = self._contamination_hits(records, train_positions, eval_positions)
        drop = {}
        for train_index, eval_index in hits.items():
            drop[train_positions[train_index]] = records[eval_positions[eval_index]]
        for position in sorted(drop):
            other = drop[position]
            self._reject_record(records[position], "contamination", f"prompt near-duplicates {other['split']} record {other['id']} ({other['source']})", duplicate_of=other["id"])
        return [r for p, r in enumerate(records) if p not in drop], len(drop)

    def _contamination_hits(self, records: list[dict], train_positions: list[int], eval_positions: list[int]) -> dict[int, int]:
        """Index in `train_positions` of each contaminated train record → index in `eval_positions`
        of the earliest eval record whose prompt it near-duplicates."""
        train_texts = [prompt_text(records[p]) for p in train_positions]
        eval_texts = [prompt_text(records[p]) for p in eval_positions]
        return dedup_mod.contaminated(train_texts, eval_texts, self.config.dedup)

    def _validate(self, records: list[dict]) -> tuple[list[dict], ValidationOutcome]:
        if not self.config.validation.enabled:
            return records, ValidationOutcome(True, [], {"skipped": True})
        outcome = validate_rows(records, self.config)
        reject_ids: dict[str, str] = {}
        for failure in outcome.failures:
            for record_id_ in failure.ids:
                reject_ids.setdefault(record_id_, failure.name.removeprefix("rule "))
        if reject_ids:
            kept = []
            for record in records:
                rule = reject_ids.get(record["id"])
                if rule is None:
                    kept.append(record)
                else:
                    self._reject_record(record, f"rule:{rule}", f"failed non-blocking rule {rule}")
            records = kept
        counts = validate_counts(records, self.config)
        combined = ValidationOutcome(
            outcome.success and counts.success,
            outcome.failures + counts.failures,
            {"rows": outcome.results, "counts": counts.results},
        )
        return records, combined

    def _mix(self, train: list[dict]) -> tuple[list[dict], dict[str, dict[str, int]]]:
        mixed, dropped, stats = mix_train(train, self.config.mix)
        for record in dropped:
            record["dropped"] = True
            self._reject_record(record, "mix_downsampled", f"train of task {record['task']} downsampled by mix")
        return mixed, stats

    def _write_outputs(self, train: list[dict], sft: list[dict], preferences: list[dict], corpus: list[dict]) -> None:
        files = {
            "train.jsonl": train,
            "validation.jsonl": [r for r in sft if r["split"] == "validation"],
            "test.jsonl": [r for r in sft if r["split"] == "test"],
        }
        if preferences:
            files["preferences.jsonl"] = preferences
        if corpus:
            files["corpus.jsonl"] = corpus
        for name, rows in files.items():
            with open(self.out / name, "wb", buffering=1 << 20) as handle:
                for chunk in batched(rows, 8192):
                    handle.write(b"".join(_dumps(public_record(r)) + b"\n" for r in chunk))

    def _fail_if_needed(self, report: dict[str, Any], outcome: ValidationOutcome) -> None:
        problems = []
        for failure in outcome.failures:
            if failure.blocking:
                examples = f", e.g. {failure.examples[:3]}" if failure.examples else ""
                problems.append(f"expectation '{failure.name}' failed for {failure.count} row(s){examples}")
        if self.config.fail_on_empty_source and report["warnings"]:
            problems += [f"{w} (fail_on_empty_source)" for w in report["warnings"]]
        read, bad = report["read"], quality_rejected(report)
        limit = self.config.max_rejected_fraction
        if read and bad / read > limit:
            top = ", ".join(f"{reason}: {n}" for reason, n in Counter(report["rejected"]).most_common(5))
            problems.append(f"rejected {bad} of {read} records ({bad / read:.1%}) > max_rejected_fraction {limit:.0%} ({top})")
        if problems:
            raise StageFailed(
                "data: " + "; ".join(problems)
                + f". Report: {self.out / 'report.json'}; rejected rows: {self.out / 'rejected.jsonl'}; "
                f"validation results: {self.out / 'validation.json'}"
            )
