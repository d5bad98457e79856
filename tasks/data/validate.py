"""Great Expectations checks on the kept rows.

Two suites, built from the config, each on an in-memory pandas dataframe (ephemeral context):

- `rows`: one row per kept record with only the columns the checks need (id, kind, task,
  split, prompt, response, chars[, tokens]): ids not null and unique, response not null and not
  blank (regex: not-null alone lets "" through), prompt not blank (null for text records, which
  map expectations skip), character/token bounds, and the user regex rules;
- `counts`: one row per (family, task, split) with its row count and the configured minimum.

The rows suite runs over frames of `ROWS_PER_RUN` rows, merged into the result of one run over
every row (`_MergedRows`), so memory does not grow with the kept text.

A failing blocking expectation fails the stage; rows failing a non-blocking rule are returned
so the stage can reject them (reason `rule:<name>`). GX is imported here, lazily: importing it
takes seconds.
"""

from __future__ import annotations

import hashlib
import logging
import os
import sys
import tempfile
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Iterable

import numpy as np
from tunepipe.schemas.data import DataConfig
from tunepipe.schemas.records import SPLITS
from tunepipe.tasks.data.clean import batched
from tunepipe.tasks.data.dedup import repeated_rows
from tunepipe.tasks.data.formats import FAMILY, prompt_text, response_text

_KEEP_UNEXPECTED = 20  # unexpected values kept per expectation in validation.json
ROWS_PER_RUN = 50_000  # rows per Great Expectations run of the rows suite: its frame's memory bound


@dataclass
class Failure:
    """A failed expectation."""

    name: str
    count: int
    blocking: bool
    examples: list[Any] = field(default_factory=list)
    ids: list[str] = field(default_factory=list)  # rows to reject (non-blocking rules only)


@dataclass
class ValidationOutcome:
    success: bool
    failures: list[Failure]
    results: dict[str, Any]  # JSON for validation.json


def _quiet_gx() -> None:
    os.environ.setdefault("GX_ANALYTICS_ENABLED", "false")
    logging.getLogger("great_expectations").setLevel(logging.ERROR)


def _context():
    import great_expectations as gx
    from great_expectations.data_context.types.base import ProgressBarsConfig

    context = gx.get_context(mode="ephemeral")
    context.variables.progress_bars = ProgressBarsConfig(globally=False)
    return context


def rows_frame(records: list[dict], with_tokens: bool):
    import pandas as pd

    columns: dict[str, list] = {"id": [], "kind": [], "task": [], "split": [], "prompt": [], "response": [], "chars": []}
    if with_tokens:
        columns["tokens"] = []
    for record in records:
        columns["id"].append(record["id"])
        columns["kind"].append(record["kind"])
        columns["task"].append(record["task"])
        columns["split"].append(record.get("split", "corpus"))
        columns["prompt"].append(prompt_text(record) if record["kind"] != "text" else None)
        columns["response"].append(response_text(record))
        columns["chars"].append(record["chars"])
        if with_tokens:
            columns["tokens"].append(record.get("tokens", 0))
    return pd.DataFrame(columns)


def counts_frame(records: list[dict], config: DataConfig):
    import pandas as pd

    counts: dict[tuple[str, str, str], int] = {}
    for record in records:
        family = FAMILY[record["kind"]]
        if family == "text":
            continue
        for split in SPLITS:
            counts.setdefault((family, record["task"], split), 0)
        counts[(family, record["task"], record["split"])] += 1
    minimum = config.validation.min_rows
    rows = [
        {"group": f"{family}/{task}/{split}", "rows": n, "min_rows": minimum.get(split, 0)}
        for (family, task, split), n in sorted(counts.items())
    ]
    return pd.DataFrame(rows, columns=["group", "rows", "min_rows"])


def _row_expectations(config: DataConfig, with_tokens: bool) -> list[tuple[Any, str, bool, Any]]:
    """(expectation, name, blocking, rule) for the rows suite."""
    import great_expectations as gx

    E = gx.expectations
    clean = config.clean
    checks = [
        (E.ExpectColumnValuesToNotBeNull(column="id"), "id not null", True, None),
        (E.ExpectColumnValuesToBeUnique(column="id"), "id unique", True, None),
        (E.ExpectColumnValuesToNotBeNull(column="response"), "response not null", True, None),
        (E.ExpectColumnValuesToMatchRegex(column="response", regex=r"\S"), "response not blank", True, None),
        (E.ExpectColumnValuesToMatchRegex(column="prompt", regex=r"\S"), "prompt not blank", True, None),
        (E.ExpectColumnValuesToBeBetween(column="chars", min_value=clean.min_chars, max_value=clean.max_chars), "chars within bounds", True, None),
        (E.ExpectColumnValuesToBeInSet(column="split", value_set=[*SPLITS, "corpus"]), "split known", True, None),
    ]
    if with_tokens:
        checks.append((E.ExpectColumnValuesToBeBetween(column="tokens", min_value=clean.min_tokens, max_value=clean.max_tokens), "tokens within bounds", True, None))
    for rule in config.validation.rules:
        cls = E.ExpectColumnValuesToMatchRegex if rule.mode == "match" else E.ExpectColumnValuesToNotMatchRegex
        checks.append((cls(column=rule.column, regex=rule.regex), f"rule {rule.label}", rule.blocking, rule))
    return checks


def _definition(context, name: str, checks: list[tuple[Any, str, bool, Any]]):
    import great_expectations as gx

    asset = context.data_sources.add_pandas(f"{name}-source").add_dataframe_asset(f"{name}-asset")
    batch = asset.add_batch_definition_whole_dataframe(f"{name}-batch")
    suite = context.suites.add(gx.ExpectationSuite(name=f"data-{name}"))
    for expectation, label, blocking, _ in checks:
        expectation.meta = {"name": label, "blocking": blocking}
        suite.add_expectation(expectation)
    return context.validation_definitions.add(gx.ValidationDefinition(name=f"data-{name}", data=batch, suite=suite))


def _result_format(id_column: str) -> dict:
    return {"result_format": "COMPLETE", "unexpected_index_column_names": [id_column], "partial_unexpected_count": _KEEP_UNEXPECTED}


def _run_suite(context, name: str, frame, checks: list[tuple[Any, str, bool, Any]], id_column: str):
    definition = _definition(context, name, checks)
    return definition.run(batch_parameters={"dataframe": frame}, result_format=_result_format(id_column))


# What Great Expectations stamps on every run (fresh uuids, clock times): left out of
# validation.json so the same key publishes the same bytes.
_RUN_STAMPS = ("validation_id", "run_id", "validation_time")


def _trim(result: dict) -> dict:
    result.pop("id", None)
    meta = result.get("meta") or {}
    for key in _RUN_STAMPS:
        meta.pop(key, None)
    (meta.get("batch_markers") or {}).pop("ge_load_time", None)
    # COMPLETE results list every unexpected row: keep validation.json readable and bounded.
    for item in result.get("results", []):
        (item.get("expectation_config") or {}).pop("id", None)
        res = item.get("result") or {}
        for key in ("unexpected_list", "unexpected_index_list", "partial_unexpected_index_list", "partial_unexpected_counts"):
            if isinstance(res.get(key), list) and len(res[key]) > _KEEP_UNEXPECTED:
                res[key] = res[key][:_KEEP_UNEXPECTED]
        res.pop("unexpected_index_query", None)
    return result


def _failures(result: dict, checks, id_column: str, ids_of: dict[str, list[str]] | None = None) -> list[Failure]:
    """Failed expectations of a result (JSON form); `ids_of` holds the complete list of failing
    ids per label where the result's own lists were cut (a batched run)."""
    by_name = {label: (blocking, rule) for _, label, blocking, rule in checks}
    failures = []
    for item in result.get("results", []):
        if item.get("success"):
            continue
        config = item.get("expectation_config") or {}
        label = (config.get("meta") or {}).get("name", config.get("type"))
        blocking, rule = by_name.get(label, (True, None))
        res = item.get("result") or {}
        if ids_of is not None and label in ids_of:
            ids = ids_of[label]
        else:
            index_list = res.get("unexpected_index_list") or []
            ids = [row[id_column] for row in index_list if isinstance(row, dict) and id_column in row]
        count = res.get("unexpected_count")
        failures.append(Failure(label, int(count if count is not None else len(ids) or 1), blocking, list(res.get("partial_unexpected_list") or [])[:5], ids if not blocking else []))
    return failures


def _id_numbers(ids: list[str]) -> np.ndarray:
    """Record ids (16 lowercase hex digits: `schemas.records.record_id`) as the uint64 each spells."""
    raw = np.array(ids, dtype="S17")  # one byte more than an id, so a longer one is seen, not cut
    digits = np.frombuffer(raw.tobytes(), dtype=np.uint8).reshape(len(ids), 17)
    hex_digit = ((digits >= ord("0")) & (digits <= ord("9"))) | ((digits >= ord("a")) & (digits <= ord("f")))
    if len(ids) and not (hex_digit[:, :16].all() and (digits[:, 16] == 0).all()):
        bad = next(i for i in ids if len(i) != 16 or i.strip("0123456789abcdef"))
        raise ValueError(f"record id {bad!r} is not 16 lowercase hex digits (schemas.records.record_id)")
    nibbles = np.where(digits[:, :16] <= ord("9"), digits[:, :16] - ord("0"), digits[:, :16] - (ord("a") - 10)).astype(np.uint64)
    return (nibbles << np.arange(60, -1, -4, dtype=np.uint64)).sum(axis=1, dtype=np.uint64)


class _MergedRows:
    """The rows suite's result over the whole input, from runs over batches of it.

    Every rows expectation is a column map expectation: its result is a function of the counts
    (rows, nulls, unexpected), the unexpected values in row order and their value counts. Those are
    summed and concatenated over the batches (the first `_KEEP_UNEXPECTED` of each list is all
    validation.json keeps) and formatted by Great Expectations' own map formatter, so the merged
    result is the one a single run over every row gives. Uniqueness is not a per-batch property:
    its unexpected rows (every row whose id occurs twice or more) come from all ids, written to a
    temporary file as the 64-bit numbers they spell (8 bytes per record, `_id_numbers`) and
    searched for repeats a range of values at a time (`dedup.repeated_rows`): memory does not
    grow with the number of records (16-byte ids held and sorted in memory cost ~150 bytes per
    record at the peak).
    """

    def __init__(self, checks, id_column: str) -> None:
        self.checks, self.id_column = checks, id_column
        self.template: dict | None = None
        self.items: list[dict] = []
        self.id_file = tempfile.TemporaryFile()
        self.id_rows = 0
        self.rejected_ids: dict[str, list[str]] = {}  # complete, for non-blocking rules
        self.rows = 0
        # Great Expectations' batch marker: md5 of the frame's row hashes (index included), one
        # uint64 per row, so it is fed batch by batch with the rows' positions as the index.
        self.fingerprint = hashlib.md5(usedforsecurity=False)

    def frame(self, batch: list[dict], with_tokens: bool):
        """The rows frame of a batch, indexed by the rows' positions in the whole input."""
        import pandas as pd

        frame = rows_frame(batch, with_tokens)
        frame.index = pd.RangeIndex(self.rows, self.rows + len(frame))
        self.rows += len(frame)
        self.fingerprint.update(pd.util.hash_pandas_object(frame, index=True).values)
        return frame

    def add(self, result: dict, frame) -> None:
        from great_expectations.constants import MAX_RESULT_RECORDS

        if self.template is None:
            self.template = result
            self.items = [self._empty() for _ in result["results"]]
        ids = _id_numbers(frame[self.id_column].dropna().astype(str).tolist())
        self.id_file.write(ids.tobytes())
        self.id_rows += len(ids)
        blocking = {label: blocking for _, label, blocking, _ in self.checks}
        for merged, item in zip(self.items, result["results"]):
            res, label = item.get("result") or {}, ((item.get("expectation_config") or {}).get("meta") or {}).get("name")
            if (item.get("exception_info") or {}).get("raised_exception"):
                merged["raised"] = merged["raised"] or item
                continue
            merged["elements"] += res.get("element_count") or 0
            merged["missing"] += res.get("missing_count") or 0
            merged["reports_missing"] = "missing_count" in res
            merged["unexpected"] += res.get("unexpected_count") or 0
            values = res.get("unexpected_list") or []
            # One run counts the values of its (capped) unexpected list: the first MAX_RESULT_RECORDS.
            merged["counts"].update(values[:max(0, MAX_RESULT_RECORDS - merged["counted"])])
            merged["counted"] = min(MAX_RESULT_RECORDS, merged["counted"] + len(values))
            room = _KEEP_UNEXPECTED - len(merged["values"])
            merged["values"].extend(values[:room])
            index_list = res.get("unexpected_index_list") or []
            merged["index"].extend(index_list[:_KEEP_UNEXPECTED - len(merged["index"])])
            if not blocking.get(label, True):
                self.rejected_ids.setdefault(label, []).extend(row[self.id_column] for row in index_list)

    @staticmethod
    def _empty() -> dict:
        return {"elements": 0, "missing": 0, "reports_missing": True, "unexpected": 0, "values": [], "index": [], "counts": Counter(), "counted": 0, "raised": None}

    def _duplicate_ids(self, merged: dict) -> None:
        """The unique expectation's unexpected rows over all batches, not within each."""
        from great_expectations.constants import MAX_RESULT_RECORDS

        self.id_file.flush()
        rows = repeated_rows(self.id_file, self.id_rows)
        fd = self.id_file.fileno()
        listed = [f"{int.from_bytes(os.pread(fd, 8, 8 * row), sys.byteorder):016x}" for row in rows.tolist()]
        self.id_file.close()
        merged["unexpected"], merged["counts"] = len(listed), Counter(listed[:MAX_RESULT_RECORDS])
        merged["values"] = listed[:_KEEP_UNEXPECTED]
        merged["index"] = [{self.id_column: value} for value in merged["values"]]

    def result(self) -> dict:
        from great_expectations.expectations.expectation import _format_map_output, _mostly_success

        assert self.template is not None, "at least one batch is validated (an empty frame for no rows)"
        results = []
        for merged, item in zip(self.items, self.template["results"]):
            if merged["raised"] is not None:
                results.append(merged["raised"])
                continue
            config = item.get("expectation_config") or {}
            if config.get("type") == "expect_column_values_to_be_unique":
                self._duplicate_ids(merged)
            # Not-null expectations report no missing count (their unexpected rows are the nulls).
            nonnull = merged["elements"] - merged["missing"] if merged["reports_missing"] else None
            considered = merged["elements"] if nonnull is None else nonnull
            mostly = (config.get("kwargs") or {}).get("mostly", 1)
            success = True if considered == 0 else _mostly_success(considered, merged["unexpected"], mostly)
            res = _format_map_output(
                {**_result_format(self.id_column), "include_unexpected_rows": False}, success, merged["elements"], nonnull,
                merged["unexpected"], merged["values"], merged["index"], None, [self.id_column],
            )["result"]
            if "partial_unexpected_counts" in res:  # over every unexpected value, as one run counts them
                top = merged["counts"].most_common(_KEEP_UNEXPECTED)
                res["partial_unexpected_counts"] = [{"value": k, "count": v} for k, v in sorted(top, key=lambda x: (-x[1], x[0]))]
            results.append({**item, "success": success, "result": res})
        passed = sum(1 for item in results if item.get("success"))
        statistics = {"evaluated_expectations": len(results), "successful_expectations": passed,
                      "unsuccessful_expectations": len(results) - passed,
                      "success_percent": passed / len(results) * 100 if results else None}
        meta = dict(self.template.get("meta") or {})
        if "pandas_data_fingerprint" in (meta.get("batch_markers") or {}):
            meta["batch_markers"] = {**meta["batch_markers"], "pandas_data_fingerprint": self.fingerprint.hexdigest()}
        return {**self.template, "success": passed == len(results), "results": results, "meta": meta,
                "statistics": {**self.template.get("statistics", {}), **statistics}}


def validate_rows(records: Iterable[dict], config: DataConfig) -> ValidationOutcome:
    """The rows suite: blocking failures and rows that fail non-blocking rules.

    Runs over batches of `ROWS_PER_RUN` records (memory: one batch's frame), merged into the
    result one run over every record gives (`_MergedRows`)."""
    _quiet_gx()
    with_tokens = config.clean.tokenizer is not None
    context = _context()
    checks = _row_expectations(config, with_tokens)
    definition = _definition(context, "rows", checks)
    merged = _MergedRows(checks, "id")

    def validate(batch: list[dict]) -> None:
        frame = merged.frame(batch, with_tokens)
        merged.add(definition.run(batch_parameters={"dataframe": frame}, result_format=_result_format("id")).to_json_dict(), frame)

    for batch in batched(records, ROWS_PER_RUN):
        validate(batch)
    if merged.template is None:  # no rows: one run over the empty frame, as before
        validate([])
    result = merged.result()
    failures = _failures(result, checks, "id", merged.rejected_ids)
    return ValidationOutcome(result["success"], failures, _trim(result))


def validate_counts(records: list[dict], config: DataConfig) -> ValidationOutcome:
    """The counts suite: minimum rows per task and split."""
    import great_expectations as gx

    _quiet_gx()
    context = _context()
    expectation = gx.expectations.ExpectColumnPairValuesAToBeGreaterThanB(column_A="rows", column_B="min_rows", or_equal=True)
    checks = [(expectation, "min rows per task and split", True, None)]
    frame = counts_frame(records, config)
    if frame.empty:
        return ValidationOutcome(True, [], {"success": True, "results": [], "note": "no supervised or preference rows"})
    result = _run_suite(context, "counts", frame, checks, "group").to_json_dict()
    failures = _failures(result, checks, "group")
    for failure in failures:
        short = frame[frame["rows"] < frame["min_rows"]]
        failure.examples = [f"{g}: {r} < {m}" for g, r, m in short.itertuples(index=False)][:10]
    return ValidationOutcome(result["success"], failures, _trim(result))
