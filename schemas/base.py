"""Shared base for every config and record model.

Every stage config is a `StrictModel`: unknown keys fail (`extra="forbid"`), and every field
carries a description, because the descriptions are the config reference in the README.
"""

from __future__ import annotations

import glob
import re
import types
import typing
from pathlib import Path

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, model_validator

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def _takes_numbers_not_bools(annotation: Any) -> bool:
    """An int or float field (or an optional one) that takes no bool."""
    if annotation in (int, float):
        return True
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        args = typing.get_args(annotation)
        return bool not in args and any(a in (int, float) for a in args)
    return False


class StrictModel(BaseModel):
    """A config model that refuses unknown keys and validates defaults and assignments. Numbers are
    finite (`.inf` and `.nan` fail here, not as a NaN loss after training), and a boolean is not a
    number (`max_steps: true` is an error, not 1)."""

    model_config = ConfigDict(extra="forbid", validate_default=True, validate_assignment=True, allow_inf_nan=False)

    @model_validator(mode="before")
    @classmethod
    def _no_bool_for_a_number(cls, data: Any) -> Any:
        # A model validator, not a field one: pydantic allows no before-validator on the
        # discriminator fields of tagged unions. The errors still carry each field's location.
        if not isinstance(data, dict):
            return data
        # pydantic's own `value_error` type (a custom one needs pydantic_core, which would enter
        # every stage's key as one more library): the loc still names the field.
        errors = [
            {"type": "value_error", "loc": (name,), "input": value,
             "ctx": {"error": ValueError(f"{str(value).lower()} is a boolean, not a number: give a number")}}
            for name, value in data.items()
            if isinstance(value, bool) and name in cls.model_fields and _takes_numbers_not_bools(cls.model_fields[name].annotation)
        ]
        if errors:
            raise ValidationError.from_exception_data(cls.__name__, errors)
        return data


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


def resolve_model(value: str, info: ValidationInfo) -> str:
    """A model field: a hub id, or a local directory (or GGUF file) resolved like any path that must exist, so a
    mistyped directory is a config error at `tunepipe validate`, not a failure when training starts.
    (Checked for YAML configs, which carry their directory as validation context.)"""
    resolved = resolve_path(value, info)
    if Path(resolved).suffix.lower() == ".gguf" and not Path(resolved).is_file():
        raise ValueError(f"{resolved}: no such GGUF file")  # a .gguf name can never be a hub id
    if (info.context or {}).get("base_dir") is not None and Path(resolved).is_absolute() and not Path(resolved).exists():
        raise ValueError(f"{value!r}: no such local model directory ({resolved}), and not a hub id (owner/name): give the "
                         "directory that holds the model's config.json, or a hub id")
    return resolved


CheckAction = Literal["fail", "warn"]


def self_checks_field(section: str, checks: tuple[str, ...]) -> Any:
    """The `self_checks` field of a stage that proves its own result (tasks/lm/checks.py)."""
    return Field(
        default_factory=dict,
        description=f"What a failed self-check does, per check ({', '.join(checks)}): `fail` the stage (the default) or "
        f"`warn` (logged, kept in the metrics' `checks` as `warned`, published anyway), e.g. `{{{checks[0]}: warn}}`. "
        "A failed check's message names this switch.",
    )


def glob_files(pattern_or_dir: str | Path) -> list[Path]:
    """The files a source path names: a file, every file below a directory, or a glob's matches.

    Here, below tasks/core/, because validators (data sources) list files too; content digests use it."""
    path = Path(pattern_or_dir)
    if path.is_file():
        return [path]
    if path.is_dir():
        return sorted(p for p in path.rglob("*") if p.is_file() and not p.name.startswith("."))
    return sorted(Path(p) for p in glob.glob(str(pattern_or_dir), recursive=True) if Path(p).is_file())
