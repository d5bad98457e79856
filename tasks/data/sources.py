"""Reading sources: every file type yields `(location, raw)` pairs, one per input record.

`location` is `file:line` (1-based; for csv the line the row starts on, for parquet and
`datasets` data the 1-based row number, for .txt the line a document starts on). `raw` is the
record as read (a dict), or a `Malformed` holding the text that could not be parsed, so a bad
line becomes a rejected record instead of a crash.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import orjson
from tunepipe.schemas.data import (
    EXTENSION_TYPES,
    SourceConfig,
    is_datasets_dir,
    source_files,
)
from tunepipe.tasks.core.fingerprint import content_digest

MAX_RAW_CHARS = 10_000  # a malformed remainder of a .json file is kept only this long in rejected.jsonl


@dataclass(frozen=True)
class Malformed:
    """Text that is not a JSON record; `error` says why, `reason` is its rejection reason."""

    text: str
    error: str
    reason: str = "malformed_json"


class FileChanged(RuntimeError):
    """A source file's bytes differ from those the stage's key was computed from."""


@dataclass
class ReadDigest:
    """sha256 of exactly the bytes a reader consumed from one file (None for a hub dataset).

    The data stage compares it with the digest its cache key was computed from: a file rewritten
    between keying and reading, or while being read, must fail the stage, not publish records of
    other bytes under the old bytes' key."""

    sha256: str | None = None
    _hash: Any = field(default_factory=hashlib.sha256, repr=False)


class _DigestingReader(io.RawIOBase):
    """A binary file that hashes every byte read through it (reads are sequential)."""

    def __init__(self, handle: Any, digest: Any) -> None:
        self._handle, self._digest = handle, digest

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        count = self._handle.readinto(buffer)
        if count:
            self._digest.update(memoryview(buffer)[:count])
        return count

    def close(self) -> None:
        self._handle.close()
        super().close()


# Called with the path each time a reader opens a source file, before the first byte is read:
# the tests use it to rewrite a file mid-read deterministically.
_on_open: Callable[[Path], None] | None = None


def open_digesting(file: Path, digest: ReadDigest) -> io.BufferedReader:
    """`file` opened for buffered binary reading; every byte read updates `digest`."""
    handle = open(file, "rb", buffering=0)
    if _on_open is not None:
        _on_open(file)
    return io.BufferedReader(_DigestingReader(handle, digest._hash), buffer_size=1 << 20)


class SourceUnavailable(ValueError):
    """A source that cannot be read here (a hub dataset while offline); the message says the fix."""


class UnreadableEncoding(ValueError):
    """A file in an encoding the readers cannot take (named in the message)."""


# Byte-order marks, longest first (UTF-32-LE's starts with UTF-16-LE's): the codec named here
# strips the mark, so a BOM never becomes part of the first column's name or the first record.
_BOMS = (
    (b"\xff\xfe\x00\x00", "utf-32"), (b"\x00\x00\xfe\xff", "utf-32"),
    (b"\xef\xbb\xbf", "utf-8-sig"), (b"\xff\xfe", "utf-16"), (b"\xfe\xff", "utf-16"),
)


def detect_encoding(handle: io.BufferedReader, label: str) -> str:
    """The text encoding of a source file from its first bytes: UTF-8 (with or without a BOM,
    as Excel's "CSV UTF-8" writes it), or UTF-16/32 by their BOM. UTF-16/32 without a BOM is
    refused naming the encoding, rather than every line being rejected as malformed."""
    head = handle.peek(4)[:4]
    for bom, encoding in _BOMS:
        if head.startswith(bom):
            return encoding
    if len(head) >= 2 and b"\x00" in head:
        guess = "UTF-32" if head.count(0) >= 3 else "UTF-16"
        raise UnreadableEncoding(
            f"{label}: the file looks like {guess} without a byte-order mark; save it as UTF-8 (or {guess} with a BOM)"
        )
    return "utf-8"


def files_to_read(source: SourceConfig) -> list[tuple[Path | None, str, str]]:
    """(file, file type, label) for each file of a source, checked before any record is read.

    Raises ValueError naming the file when a file vanished or has an unknown type, so the stage
    fails before doing any work.
    """
    if source.is_remote:
        return [(None, "hub", source.path)]
    files = source_files(source.path)
    if not files:
        raise ValueError(f"data source {source.path}: no data files found")
    root = Path(source.path)
    # Labels are relative to the parent of the source (of a glob's fixed directory): stable
    # across machines, readable in reports.
    base = root.parent if (root.is_file() or root.is_dir()) else Path(_glob_root(source.path)).parent
    plan = []
    for file in files:
        if not file.exists():
            raise ValueError(f"data source {source.path}: {file} does not exist")
        if source.file_type != "auto":
            file_type = source.file_type
        elif is_datasets_dir(file):
            file_type = "datasets"
        else:
            file_type = EXTENSION_TYPES.get(file.suffix.lower(), "")
            if not file_type:
                raise ValueError(f"data source {source.path}: {file}: unknown file type {file.suffix!r}")
        try:
            label = str(file.resolve().relative_to(base.resolve()))
        except ValueError:
            label = file.name
        plan.append((file, file_type, label))
    return plan


def _glob_root(pattern: str) -> str:
    parts = Path(pattern).parts
    fixed = []
    for part in parts:
        if any(ch in part for ch in "*?["):
            break
        fixed.append(part)
    return str(Path(*fixed)) if fixed else "."


def read_file(
    file: Path | None, file_type: str, label: str, source: SourceConfig, digest: ReadDigest | None = None
) -> Iterator[tuple[str, Any]]:
    """Yield `(location, raw)` for every record of one file (or hub dataset).

    When the file is exhausted, `digest.sha256` holds the sha256 of the bytes the records came
    from (for a `save_to_disk` directory: its content digest, the same before and after reading,
    or FileChanged)."""
    digest = digest if digest is not None else ReadDigest()
    if file_type == "jsonl":
        yield from _read_jsonl(file, label, digest)
    elif file_type == "json":
        yield from _read_json(file, label, digest)
    elif file_type == "csv":
        yield from _read_csv(file, label, digest)
    elif file_type == "parquet":
        yield from _read_parquet(file, label, digest)
    elif file_type == "txt":
        yield from _read_txt(file, label, source.text_unit, digest)
    elif file_type == "datasets":
        yield from _read_datasets_dir(file, label, source.split, digest)
    elif file_type == "hub":
        yield from _read_hub(source)
        return
    else:  # guarded by files_to_read; kept so a new type cannot be silently skipped
        raise ValueError(f"{label}: unsupported file type {file_type!r}")
    if digest.sha256 is None:
        digest.sha256 = digest._hash.hexdigest()


def _read_jsonl(file: Path, label: str, digest: ReadDigest) -> Iterator[tuple[str, Any]]:
    loads = orjson.loads
    with open_digesting(file, digest) as handle:
        encoding = detect_encoding(handle, label)
        lines: Any = handle
        if encoding == "utf-8-sig":
            handle.read(3)
        elif encoding != "utf-8":  # UTF-16/32: decode, and give orjson UTF-8 lines
            lines = (line.encode("utf-8") for line in io.TextIOWrapper(handle, encoding=encoding, errors="replace", newline=""))
        for number, line in enumerate(lines, start=1):
            if not line.strip():  # blank lines are layout, not records
                continue
            try:
                yield f"{label}:{number}", loads(line)
            except orjson.JSONDecodeError as exc:
                yield f"{label}:{number}", Malformed(line.decode("utf-8", "replace").rstrip("\r\n"), str(exc))


def _read_json(file: Path, label: str, digest: ReadDigest) -> Iterator[tuple[str, Any]]:
    """A JSON array of records. Elements are decoded one at a time to know their line. Anything
    else at the top level (one object, a string) is one rejected record that says what it is,
    not a record "missing 'instruction'"."""
    with open_digesting(file, digest) as handle:
        encoding = detect_encoding(handle, label)
        text = handle.read().decode(encoding, errors="replace")
    decoder = json.JSONDecoder()
    pos = _skip_ws(text, 0)
    if pos < len(text) and text[pos] != "[":
        try:
            obj, end = decoder.raw_decode(text, pos)
            if text[_skip_ws(text, end):].strip():
                raise json.JSONDecodeError("extra data after the top-level value", text, end)
        except json.JSONDecodeError as exc:
            yield f"{label}:{_line_of(text, pos)}", Malformed(text[pos:][:MAX_RAW_CHARS], str(exc))
            return
        yield f"{label}:{_line_of(text, pos)}", Malformed(text[pos:][:MAX_RAW_CHARS], _not_an_array(obj), "json_not_a_list")
        return
    pos += 1
    line, line_pos = 1, 0
    while True:
        pos = _skip_ws(text, pos)
        if pos < len(text) and text[pos] == "]":
            return
        line += text.count("\n", line_pos, pos)
        line_pos = pos
        try:
            obj, end = decoder.raw_decode(text, pos)
        except json.JSONDecodeError as exc:
            # The array is broken from here on: the rest is one malformed record.
            yield f"{label}:{line}", Malformed(text[pos:][:MAX_RAW_CHARS], str(exc))
            return
        yield f"{label}:{line}", obj
        pos = _skip_ws(text, end)
        if pos < len(text) and text[pos] == ",":
            pos += 1
        elif pos < len(text) and text[pos] == "]":
            return
        else:
            line += text.count("\n", line_pos, pos)
            yield f"{label}:{line}", Malformed(text[pos:][:MAX_RAW_CHARS], "expected ',' or ']' in JSON array")
            return


def _not_an_array(obj: Any) -> str:
    if isinstance(obj, dict):
        keys = ", ".join(map(str, list(obj)[:8])) + (", ..." if len(obj) > 8 else "")
        lists = [k for k, v in obj.items() if isinstance(v, list)]
        hint = f"; its key {lists[0]!r} holds a list: make that list the file's content" if lists else ""
        return (f"the file holds one JSON object (keys: {keys}), not an array of records: put the records in a list "
                f"[{{...}}, ...] or write one per line as .jsonl{hint}")
    return f"the file holds a JSON {type(obj).__name__}, not an array of records"


def _skip_ws(text: str, pos: int) -> int:
    while pos < len(text) and text[pos] in " \t\r\n":
        pos += 1
    return pos


def _line_of(text: str, pos: int) -> int:
    return text.count("\n", 0, pos) + 1


def _read_csv(file: Path, label: str, digest: ReadDigest) -> Iterator[tuple[str, Any]]:
    raw = open_digesting(file, digest)
    with io.TextIOWrapper(raw, newline="", encoding=detect_encoding(raw, label), errors="replace") as handle:
        reader = csv.DictReader(handle)
        previous_end = 1  # the header line
        for row in reader:
            if None in row:  # more cells than header columns: keep the extras visible
                row["__extra__"] = row.pop(None)
            yield f"{label}:{previous_end + 1}", row
            previous_end = reader.line_num


def _clean_value(value: Any) -> Any:
    # pandas/arrow give NaN for missing floats; treat as missing like JSON null.
    if isinstance(value, float) and math.isnan(value):
        return None
    return value


def _read_parquet(file: Path, label: str, digest: ReadDigest) -> Iterator[tuple[str, Any]]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    # Parquet is read by seeking (footer first): read the bytes once, hash them, parse those.
    with open_digesting(file, digest) as handle:
        data = handle.read()
    number = 0
    for batch in pq.ParquetFile(pa.BufferReader(data)).iter_batches(batch_size=8192):
        for row in batch.to_pylist():
            number += 1
            yield f"{label}:{number}", {k: _clean_value(v) for k, v in row.items()}


def _read_txt(file: Path, label: str, unit: str, digest: ReadDigest) -> Iterator[tuple[str, Any]]:
    raw = open_digesting(file, digest)
    with io.TextIOWrapper(raw, encoding=detect_encoding(raw, label), errors="replace") as handle:
        if unit == "file":
            text = handle.read()
            if text.strip():
                yield f"{label}:1", {"text": text}
            return
        if unit == "line":
            for number, line in enumerate(handle, start=1):
                if line.strip():
                    yield f"{label}:{number}", {"text": line.rstrip("\r\n")}
            return
        paragraph: list[str] = []
        start = 0
        for number, line in enumerate(handle, start=1):
            if line.strip():
                if not paragraph:
                    start = number
                paragraph.append(line.rstrip("\r\n"))
            elif paragraph:
                yield f"{label}:{start}", {"text": "\n".join(paragraph)}
                paragraph = []
        if paragraph:
            yield f"{label}:{start}", {"text": "\n".join(paragraph)}


def _iter_dataset_rows(dataset: Any, label: str) -> Iterator[tuple[str, Any]]:
    number = 0
    for batch in dataset.iter(batch_size=4096):
        columns = list(batch)
        for values in zip(*(batch[c] for c in columns)):
            number += 1
            yield f"{label}:{number}", {c: _clean_value(v) for c, v in zip(columns, values)}


def _read_datasets_dir(file: Path, label: str, split: str, digest: ReadDigest) -> Iterator[tuple[str, Any]]:
    import datasets

    # Arrow files are memory-mapped, not streamed: compare the directory's digest before and after.
    before = content_digest(file)
    if _on_open is not None:
        _on_open(file)
    loaded = datasets.load_from_disk(str(file))
    if isinstance(loaded, datasets.DatasetDict):
        if split not in loaded:
            raise ValueError(f"{file}: saved DatasetDict has no split {split!r} (has {sorted(loaded)})")
        loaded = loaded[split]
        label = f"{label}[{split}]"
    yield from _iter_dataset_rows(loaded, label)
    if content_digest(file) != before:
        raise FileChanged(f"{file}: the dataset directory changed while it was being read")
    digest.sha256 = before


def _read_hub(source: SourceConfig) -> Iterator[tuple[str, Any]]:
    # Hub datasets: the same code path real users take; tests cover only local data (no hub here).
    import datasets

    from huggingface_hub import constants

    try:
        dataset = datasets.load_dataset(source.path, name=source.subset, split=source.split, revision=source.revision)
    except (ConnectionError, OSError, ValueError) as exc:
        if not (constants.HF_HUB_OFFLINE or os.environ.get("HF_DATASETS_OFFLINE") == "1"):
            raise
        # Offline, a dataset that is not in the local cache is the expected failure: say how to fix it.
        raise SourceUnavailable(
            f"data source {source.path}: a hub dataset id, but the hub is offline (HF_HUB_OFFLINE/HF_DATASETS_OFFLINE) and "
            f"the dataset is not in the local cache ({type(exc).__name__}): download it once where the hub is reachable, "
            "or give a local path"
        ) from None
    yield from _iter_dataset_rows(dataset, f"{source.path}[{source.split}]")
