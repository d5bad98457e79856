"""Shared base for every config and record model.

Every stage config is a `StrictModel`: unknown keys fail (`extra="forbid"`), and every field
carries a description, because the descriptions are the config reference in the README.
"""

from __future__ import annotations

import re
from pathlib import Path

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


class StrictModel(BaseModel):
    """A config model that refuses unknown keys and validates defaults and assignments."""

    model_config = ConfigDict(extra="forbid", validate_default=True, validate_assignment=True)


# A name ending like a data file is a mistyped local path, not a hub repository: hub ids are
# `owner/name` (`tatsu-lab/alpaca`, `teknium/OpenHermes-2.5`), and `data/nope.jsonl` must fail
# at validate time with "no such file", not at run time with a hub ConnectionError.
_FILE_SUFFIXES = {".jsonl", ".ndjson", ".json", ".csv", ".tsv", ".parquet", ".txt", ".arrow", ".yaml", ".yml", ".gz", ".zip",
                  ".bin", ".safetensors", ".pt", ".gguf"}


def plausible_hub_id(value: str, base_dir: str | Path | None = None) -> bool:
    """`owner/name` that cannot be a local path: no such file, no file suffix, and no local
    directory named like its owner (then `owner/name` is a file missing from that directory)."""
    if not _HUB_ID.match(value) or Path(value).suffix.lower() in _FILE_SUFFIXES:
        return False
    owner = value.split("/", 1)[0]
    for root in (Path(base_dir) if base_dir is not None else None, Path.cwd()):
        if root is not None and ((root / value).exists() or (root / owner).is_dir()):
            return False
    return True


def looks_like_hub_id(value: str) -> bool:
    """`owner/name` with no local file of that name: a hub id, not a relative path."""
    return bool(_HUB_ID.match(value)) and not Path(value).exists() and Path(value).suffix.lower() not in _FILE_SUFFIXES


def resolve_path(value: str, info: ValidationInfo) -> str:
    """Resolve a relative path against the directory of the YAML it came from.

    The loader passes `{"base_dir": <yaml dir>}` as validation context. URLs and hub ids
    (`owner/name` that is not a local path) are returned unchanged.
    """
    if "://" in value or Path(value).is_absolute():
        return value
    base_dir = (info.context or {}).get("base_dir")
    if base_dir is None:
        return value
    candidate = Path(base_dir) / value
    if not candidate.exists() and not any(ch in value for ch in "*?[") and plausible_hub_id(value, base_dir):
        return value
    return str(candidate.resolve())


def resolve_model_path(value: str, info: ValidationInfo) -> str:
    """A model name (hub id, local directory, or GGUF file) resolved like any path; a `.gguf` that is not
    there is a mistyped path, refused at validate time (it can never be a hub id)."""
    value = resolve_path(value, info)
    if Path(value).suffix.lower() == ".gguf" and not Path(value).is_file():
        raise ValueError(f"{value}: no such GGUF file")
    return value


CheckAction = Literal["fail", "warn"]


def self_checks_field(section: str, checks: tuple[str, ...]) -> Any:
    """The `self_checks` field of a stage that proves its own result (tasks/training/checks.py)."""
    return Field(
        default_factory=dict,
        description=f"What a failed self-check does, per check ({', '.join(checks)}): `fail` the stage (the default) or "
        f"`warn` (logged, kept in the metrics' `checks` as `warned`, published anyway), e.g. `{{{checks[0]}: warn}}`. "
        "A failed check's message names this switch.",
    )
