"""The `data:` section of the pipeline YAML: sources → clean → dedup → validate → split → mix.

Everything that can be checked without reading the data is checked here, so a bad config
fails at load time with the field path (`data.sources[1].path: ...`), before any work.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Literal

from pydantic import Field, ValidationInfo, field_validator, model_validator
from tunepipe.schemas.base import StrictModel, glob_files, looks_like_hub_id, resolve_path
from tunepipe.schemas.records import SPLITS

SourceFormat = Literal["auto", "alpaca", "sharegpt", "messages", "preference", "text"]
FileType = Literal["auto", "jsonl", "json", "csv", "parquet", "txt", "datasets"]

# File extensions the readers understand; anything else in a directory source is skipped.
EXTENSION_TYPES: dict[str, str] = {
    ".jsonl": "jsonl",
    ".ndjson": "jsonl",
    ".json": "json",
    ".csv": "csv",
    ".parquet": "parquet",
    ".txt": "txt",
}
# Columns of the validation frame a user rule may test (see tasks/data/validate.py).
RULE_COLUMNS = ("id", "kind", "task", "split", "prompt", "response")
_GLOB_CHARS = "*?["


def is_datasets_dir(path: Path) -> bool:
    """A directory written by `datasets.Dataset(Dict).save_to_disk`."""
    return path.is_dir() and (
        (path / "dataset_dict.json").exists() or ((path / "state.json").exists() and (path / "dataset_info.json").exists())
    )


def is_hub_id(path: str) -> bool:
    """`owner/name` that is not a local path and holds no glob: read with `datasets.load_dataset`."""
    return not any(ch in path for ch in _GLOB_CHARS) and looks_like_hub_id(path)


class SourceConfig(StrictModel):
    """One input: a file, a directory, a glob, a `save_to_disk` directory or a hub dataset id."""

    # Declared before `path` so the path validator can see it.
    file_type: FileType = Field(
        default="auto",
        description="How to read the files; auto picks by extension (and detects `save_to_disk` directories).",
    )
    path: str = Field(
        description="File (.jsonl/.ndjson/.json/.csv/.parquet/.txt), directory, glob, `save_to_disk` directory "
        "or hub dataset id (`owner/name`). Relative paths resolve against the YAML's directory."
    )
    format: SourceFormat = Field(
        default="auto",
        description="Record layout: alpaca (instruction/input/output[/system/history]), sharegpt "
        "(conversations of from/value), messages (role/content), preference (prompt/chosen/rejected), "
        "text (raw corpus), or auto to detect per record from its keys.",
    )
    task: str = Field(
        default="default",
        pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$",
        description="Task name of these records: splits are stratified and mixing ratios set per task.",
    )
    task_field: str | None = Field(
        default=None,
        description="Field of each raw record holding its own task name (a file mixing tasks, e.g. preference pairs "
        "of several tasks); records without it get `task`.",
    )
    field_map: dict[str, str] = Field(
        default_factory=dict,
        description="Column renames applied before parsing, source name → canonical name "
        "(e.g. {question: instruction, answer: output}).",
    )
    text_unit: Literal["paragraph", "line", "file"] = Field(
        default="paragraph",
        description="For .txt files: one document per blank-line-separated paragraph, per non-empty line, or per file.",
    )
    split: str = Field(default="train", description="Split to read from a hub dataset or a saved DatasetDict.")
    subset: str | None = Field(default=None, description="Hub dataset configuration name (`name=` of load_dataset).")
    revision: str | None = Field(default=None, description="Hub dataset revision; enters the cache key in place of content.")

    @field_validator("path")
    @classmethod
    def _resolve_and_check(cls, value: str, info: ValidationInfo) -> str:
        value = resolve_path(value, info)
        if "://" in value or is_hub_id(value):
            return value
        files = source_files(value)
        if not files:
            raise ValueError(f"{value}: no such file or directory, or no readable data files in it")
        for file in files:
            if not os.access(file, os.R_OK):
                raise ValueError(f"{file}: not readable")
        path = Path(value)
        if info.data.get("file_type", "auto") == "auto" and path.is_file() and path.suffix.lower() not in EXTENSION_TYPES:
            raise ValueError(
                f"{value}: unknown file type {path.suffix or '(none)'}; use one of {sorted(EXTENSION_TYPES)} or set file_type"
            )
        return value

    @property
    def is_remote(self) -> bool:
        """True for hub ids and URLs (read through `datasets.load_dataset`)."""
        return "://" in self.path or is_hub_id(self.path)


def source_files(path: str) -> list[Path]:
    """The data files a local source path names (a `save_to_disk` directory counts as one)."""
    p = Path(path)
    if is_datasets_dir(p):
        return [p]
    if p.is_file():
        return [p]
    return [f for f in glob_files(path) if f.suffix.lower() in EXTENSION_TYPES]


class CleanConfig(StrictModel):
    """Text normalisation and per-record filters."""

    unicode_nfkc: bool = Field(default=True, description="Apply Unicode NFKC normalisation to every text field.")
    strip_html: bool = Field(default=True, description="Remove HTML tags (html.parser), keep their text, decode entities.")
    remove_control_chars: bool = Field(default=True, description="Drop control and zero-width characters (newlines and tabs kept).")
    collapse_whitespace: bool = Field(
        default=True, description="Collapse runs of spaces/tabs, trim lines, and allow at most one blank line in a row."
    )
    min_chars: int = Field(default=1, ge=0, description="Reject records whose total text is shorter (characters, after cleaning).")
    max_chars: int = Field(default=100_000, ge=1, description="Reject records whose total text is longer (characters, after cleaning).")
    tokenizer: str | None = Field(
        default=None, description="Tokenizer (tokenizer.json, a directory holding one, or a hub id) for token length bounds."
    )
    min_tokens: int | None = Field(default=None, ge=0, description="Reject records with fewer tokens (needs tokenizer).")
    max_tokens: int | None = Field(default=None, ge=1, description="Reject records with more tokens (needs tokenizer).")
    mask_pii: bool = Field(default=False, description="Replace e-mail addresses and phone numbers by placeholders; counts go into the report.")
    pii_kinds: list[Literal["email", "phone"]] = Field(default=["email", "phone"], description="Which PII kinds to mask.")
    email_placeholder: str = Field(default="<EMAIL>", description="Replacement for a masked e-mail address.")
    phone_placeholder: str = Field(default="<PHONE>", description="Replacement for a masked phone number.")

    @field_validator("tokenizer")
    @classmethod
    def _resolve_tokenizer(cls, value: str | None, info: ValidationInfo) -> str | None:
        return None if value is None else resolve_path(value, info)

    @model_validator(mode="after")
    def _check_bounds(self) -> CleanConfig:
        if self.min_chars > self.max_chars:
            raise ValueError(f"min_chars ({self.min_chars}) > max_chars ({self.max_chars})")
        if (self.min_tokens is not None or self.max_tokens is not None) and self.tokenizer is None:
            raise ValueError("min_tokens/max_tokens need clean.tokenizer")
        if self.min_tokens is not None and self.max_tokens is not None and self.min_tokens > self.max_tokens:
            raise ValueError(f"min_tokens ({self.min_tokens}) > max_tokens ({self.max_tokens})")
        return self


class DedupConfig(StrictModel):
    """Exact and near-duplicate removal (MinHash + LSH with rensa), and eval contamination."""

    exact: bool = Field(default=True, description="Drop records whose normalised (lower-cased, whitespace-collapsed) content repeats.")
    near: bool = Field(default=True, description="Drop near-duplicates (MinHash + LSH over word n-grams) within and across sources.")
    threshold: float = Field(default=0.8, gt=0.0, lt=1.0, description="Jaccard similarity at or above which two records are near-duplicates.")
    num_perm: int = Field(default=128, ge=8, le=1024, description="MinHash permutations (signature length).")
    num_bands: int | None = Field(
        default=None,
        ge=1,
        description="LSH bands; must divide num_perm. Default: the divisor minimising false positives + negatives at threshold.",
    )
    ngram: int = Field(default=3, ge=1, le=16, description="Word n-gram (shingle) size.")
    seed: int = Field(default=42, ge=0, description="MinHash seed.")
    contamination: bool = Field(
        default=True, description="Drop train records whose prompt is a (near-)duplicate of a validation or test prompt."
    )

    @model_validator(mode="after")
    def _check_bands(self) -> DedupConfig:
        if self.num_bands is not None and (self.num_bands > self.num_perm or self.num_perm % self.num_bands):
            raise ValueError(f"num_bands ({self.num_bands}) must divide num_perm ({self.num_perm})")
        return self


class RuleConfig(StrictModel):
    """A user regex rule on one column of the validation frame."""

    column: Literal["id", "kind", "task", "split", "prompt", "response"] = Field(
        description="Column tested: prompt (instruction+input / user turns / preference prompt), response "
        "(output / last assistant turn / chosen / text), or id, kind, task, split."
    )
    regex: str = Field(description="Python regular expression (re.search semantics).")
    mode: Literal["match", "not_match"] = Field(default="match", description="match: every value must match; not_match: none may.")
    blocking: bool = Field(
        default=True, description="True: a failing row fails the stage. False: failing rows are rejected (reason `rule:<name>`)."
    )
    name: str | None = Field(default=None, description="Name used in reasons and messages; default `<column>~<regex>`.")

    @field_validator("regex")
    @classmethod
    def _compiles(cls, value: str) -> str:
        try:
            re.compile(value)
        except re.error as exc:
            raise ValueError(f"invalid regex {value!r}: {exc}") from exc
        return value

    @property
    def label(self) -> str:
        return self.name or f"{self.column}{'~' if self.mode == 'match' else '!~'}{self.regex}"


class ValidationConfig(StrictModel):
    """Great Expectations checks on the kept rows."""

    enabled: bool = Field(default=True, description="Run the Great Expectations suite (validation.json is written either way).")
    rules: list[RuleConfig] = Field(default_factory=list, description="User regex rules.")
    min_rows: dict[Literal["train", "validation", "test"], int] = Field(
        default_factory=lambda: {"train": 1, "validation": 0, "test": 0},
        description="Minimum rows per task and split (supervised and preference tasks); fewer fails the stage.",
    )

    @field_validator("min_rows")
    @classmethod
    def _non_negative(cls, value: dict[str, int]) -> dict[str, int]:
        bad = {k: v for k, v in value.items() if v < 0}
        if bad:
            raise ValueError(f"min_rows must be >= 0: {bad}")
        return {split: value.get(split, 0) for split in SPLITS}


class SplitConfig(StrictModel):
    """Deterministic train/validation/test split by a hash of the record id, stratified per task."""

    validation: float = Field(default=0.05, ge=0.0, lt=1.0, description="Fraction of each task's records for validation.")
    test: float = Field(default=0.05, ge=0.0, lt=1.0, description="Fraction of each task's records for test.")
    seed: int = Field(default=0, description="Salt of the id hash that orders records for splitting.")

    @model_validator(mode="after")
    def _fractions(self) -> SplitConfig:
        if self.validation + self.test >= 1.0:
            raise ValueError(f"validation + test fractions must be < 1 (got {self.validation} + {self.test})")
        return self


class MixConfig(StrictModel):
    """Multi-task mixing of the train split only (validation and test stay as split)."""

    ratios: dict[str, float] | None = Field(
        default=None,
        description="Task → weight; listed tasks are resampled to these proportions of `total` (up- or down-sampling).",
    )
    total: int | None = Field(default=None, ge=1, description="Train size of the listed tasks after mixing; default: their size before.")
    caps: dict[str, int] | None = Field(default=None, description="Task → maximum train rows (downsampled deterministically).")
    seed: int = Field(default=42, description="Seed of the sampling.")

    @field_validator("ratios")
    @classmethod
    def _positive_ratios(cls, value: dict[str, float] | None) -> dict[str, float] | None:
        if value is not None:
            if not value:
                raise ValueError("ratios must name at least one task")
            bad = {k: v for k, v in value.items() if not v > 0}
            if bad:
                raise ValueError(f"ratios must be > 0: {bad}")
        return value

    @field_validator("caps")
    @classmethod
    def _positive_caps(cls, value: dict[str, int] | None) -> dict[str, int] | None:
        if value is not None:
            bad = {k: v for k, v in value.items() if v < 1}
            if bad:
                raise ValueError(f"caps must be >= 1: {bad}")
        return value

    @model_validator(mode="after")
    def _total_needs_ratios(self) -> MixConfig:
        if self.total is not None and self.ratios is None:
            raise ValueError("total needs ratios")
        return self


class DataRayConfig(StrictModel):
    """Where the `ray` engine runs (like the training launcher's `ray` profile section)."""

    address: str | None = Field(
        default=None,
        description="Ray cluster to join: `auto`, `HOST:PORT` of the head, or `ray://HOST:10001` (Ray Client). "
        "None: RAY_ADDRESS if set, else a Ray started on this machine for the run. Not part of the stage key.",
    )
    batch_size: int = Field(
        default=4096, ge=1, description="Records per Ray Data batch in the per-record steps (signatures, ids)."
    )


class DataConfig(StrictModel):
    """The `data` stage: raw sources → cleaned, deduplicated, validated, split instruction JSON."""

    sources: list[SourceConfig] = Field(min_length=1, description="Input sources, read in order (earlier ones win duplicates).")
    clean: CleanConfig = Field(default_factory=CleanConfig, description="Normalisation and per-record filters.")
    dedup: DedupConfig = Field(default_factory=DedupConfig, description="Exact/near duplicate and contamination removal.")
    validation: ValidationConfig = Field(default_factory=ValidationConfig, description="Great Expectations checks.")
    split: SplitConfig = Field(default_factory=SplitConfig, description="Train/validation/test split.")
    mix: MixConfig = Field(default_factory=MixConfig, description="Train-only multi-task mixing.")
    max_rejected_fraction: float = Field(
        default=0.5,
        ge=0.0,
        le=1.0,
        description="Fail the stage when more than this fraction of read records is rejected (mixing excluded).",
    )
    engine: Literal["local", "streaming", "ray"] = Field(
        default="local",
        description="Where the records flow: `local` (this process, records in memory), `streaming` (this process, "
        "records on the staging disk in batches, exact-dedup keys in sqlite, signatures memory-mapped: for inputs "
        "larger than memory) or `ray` (Ray Data on the cluster of `data.ray.address`: files read and cleaned in "
        "parallel, dedup and contamination bands shuffled by key across workers). All give the same files byte for "
        "byte, so the engine is not part of the stage key.",
    )
    ray: DataRayConfig = Field(default_factory=DataRayConfig, description="The Ray cluster of `engine: ray`.")
    fail_on_empty_source: bool = Field(
        default=False,
        description="Fail the stage when every record of a source file is rejected; by default that is a warning in "
        "the report (`warnings`) and the log.",
    )

    @model_validator(mode="after")
    def _mix_tasks_exist(self) -> DataConfig:
        if any(source.task_field for source in self.sources):
            return self  # tasks named inside the records are only known once they are read
        tasks = {source.task for source in self.sources}
        for name in ("ratios", "caps"):
            unknown = sorted(set(getattr(self.mix, name) or {}) - tasks)
            if unknown:
                raise ValueError(f"mix.{name} names tasks no source has: {unknown} (tasks: {sorted(tasks)})")
        return self
