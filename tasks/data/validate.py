"""Great Expectations checks on the kept rows.

Two suites, built from the config, each on an in-memory pandas dataframe (ephemeral context):

- `rows`: one row per kept record with only the columns the checks need (id, kind, task,
  split, prompt, response, chars[, tokens]): ids not null and unique, response not null and not
  blank (regex: not-null alone lets "" through), prompt not blank (null for text records, which
  map expectations skip), character/token bounds, and the user regex rules;
- `counts`: one row per (family, task, split) with its row count and the configured minimum.

A failing blocking expectation fails the stage; rows failing a non-blocking rule are returned
so the stage can reject them (reason `rule:<name>`). GX is imported here, lazily: importing it
takes seconds.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from typing import Any

from tunepipe.schemas.data import DataConfig
from tunepipe.schemas.records import SPLITS
from tunepipe.tasks.data.formats import FAMILY, prompt_text, response_text

_KEEP_UNEXPECTED = 20  # unexpected values kept per expectation in validation.json


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


def _run_suite(context, name: str, frame, checks: list[tuple[Any, str, bool, Any]], id_column: str):
    import great_expectations as gx

    asset = context.data_sources.add_pandas(f"{name}-source").add_dataframe_asset(f"{name}-asset")
    batch = asset.add_batch_definition_whole_dataframe(f"{name}-batch")
    suite = context.suites.add(gx.ExpectationSuite(name=f"data-{name}"))
    for expectation, label, blocking, _ in checks:
        expectation.meta = {"name": label, "blocking": blocking}
        suite.add_expectation(expectation)
    definition = context.validation_definitions.add(gx.ValidationDefinition(name=f"data-{name}", data=batch, suite=suite))
    return definition.run(
        batch_parameters={"dataframe": frame},
        result_format={"result_format": "COMPLETE", "unexpected_index_column_names": [id_column], "partial_unexpected_count": _KEEP_UNEXPECTED},
    )


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


def _failures(result, checks, id_column: str) -> list[Failure]:
    by_name = {label: (blocking, rule) for _, label, blocking, rule in checks}
    failures = []
    for item in result.results:
        if item.success:
            continue
        label = item.expectation_config.meta.get("name", item.expectation_config.type)
        blocking, rule = by_name.get(label, (True, None))
        res = item.result or {}
        index_list = res.get("unexpected_index_list") or []
        ids = [row[id_column] for row in index_list if isinstance(row, dict) and id_column in row]
        count = res.get("unexpected_count")
        failures.append(Failure(label, int(count if count is not None else len(ids) or 1), blocking, list(res.get("partial_unexpected_list") or [])[:5], ids if not blocking else []))
    return failures


def validate_rows(records: list[dict], config: DataConfig) -> ValidationOutcome:
    """The rows suite: blocking failures and rows that fail non-blocking rules."""
    _quiet_gx()
    with_tokens = config.clean.tokenizer is not None
    context = _context()
    checks = _row_expectations(config, with_tokens)
    result = _run_suite(context, "rows", rows_frame(records, with_tokens), checks, "id")
    failures = _failures(result, checks, "id")
    return ValidationOutcome(result.success, failures, _trim(result.to_json_dict()))


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
    result = _run_suite(context, "counts", frame, checks, "group")
    failures = _failures(result, checks, "group")
    for failure in failures:
        short = frame[frame["rows"] < frame["min_rows"]]
        failure.examples = [f"{g}: {r} < {m}" for g, r, m in short.itertuples(index=False)][:10]
    return ValidationOutcome(result.success, failures, _trim(result.to_json_dict()))
