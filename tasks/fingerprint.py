"""Content hashing: file and directory digests, code versions, and the stage cache key.

A stage's key is a hash of exactly (stage name, config payload, environment payload, input
artifact keys, code version). Paths, timestamps and run ids never enter it.
"""

from __future__ import annotations

import glob
import hashlib
import importlib.util
import json
from pathlib import Path
from typing import Any, Iterable

KEY_LENGTH = 16  # hex chars: 64 bits, ample for one workdir's artifacts
_CHUNK = 1 << 20


def canonical_json(obj: Any) -> str:
    """JSON with sorted keys and fixed separators, so equal payloads hash equally."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False, default=str)


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def sha256_file(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _digest_named_files(files: Iterable[tuple[str, Path]]) -> str:
    digest = hashlib.sha256()
    for name, path in sorted(files):
        digest.update(name.encode())
        digest.update(b"\0")
        digest.update(sha256_file(path).encode())
        digest.update(b"\n")
    return digest.hexdigest()


def glob_files(pattern_or_dir: str | Path) -> list[Path]:
    """The files a source path names: a file, every file below a directory, or a glob's matches."""
    path = Path(pattern_or_dir)
    if path.is_file():
        return [path]
    if path.is_dir():
        return sorted(p for p in path.rglob("*") if p.is_file() and not p.name.startswith("."))
    return sorted(Path(p) for p in glob.glob(str(pattern_or_dir), recursive=True) if Path(p).is_file())


def content_digest(path: str | Path) -> str:
    """sha256 of a file's bytes, or of a directory's (or glob's) files with their relative names.

    Moving or renaming the directory leaves the digest unchanged; editing, adding or renaming a
    file inside it changes it.
    """
    path = Path(path)
    if path.is_file():
        return sha256_file(path)
    files = glob_files(path)
    if not files:
        raise FileNotFoundError(f"{path}: no such file, directory or matching files")
    root = path if path.is_dir() else Path(_glob_root(str(path)))
    return _digest_named_files((str(f.relative_to(root)), f) for f in files)


def _glob_root(pattern: str) -> str:
    """The directory part of a glob before its first wildcard."""
    parts = Path(pattern).parts
    fixed = [p for p in parts[: next((i for i, p in enumerate(parts) if any(c in p for c in "*?[")), len(parts))]]
    return str(Path(*fixed)) if fixed else "."


def module_files(module_name: str) -> list[tuple[str, Path]]:
    """(name, path) of a module's source file, or of every module file in a package."""
    spec = importlib.util.find_spec(module_name)
    if spec is None or spec.origin is None:
        raise ImportError(f"cannot find module {module_name!r} to version its code")
    origin = Path(spec.origin)
    if spec.submodule_search_locations:
        package_dir = origin.parent
        return [(f"{module_name}/{p.relative_to(package_dir)}", p) for p in sorted(package_dir.rglob("*.py"))]
    return [(module_name, origin)]


def code_version(modules: Iterable[str]) -> str:
    """Hash of the source of the given modules/packages: edits to a stage's code change its key."""
    return _digest_named_files(named for module in modules for named in module_files(module))[:KEY_LENGTH]


def stage_key(
    stage: str,
    config_payload: Any,
    env_payload: dict[str, Any],
    input_keys: dict[str, str],
    code: str,
) -> str:
    """The content key of a stage's artifact."""
    payload = {
        "stage": stage,
        "config": config_payload,
        "environment": env_payload,
        "inputs": dict(sorted(input_keys.items())),
        "code": code,
    }
    return sha256_bytes(canonical_json(payload).encode())[:KEY_LENGTH]
