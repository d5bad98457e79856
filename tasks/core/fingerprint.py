"""Content hashing: file and directory digests, code versions, and the stage cache key.

A stage's key is a hash of exactly (stage name, config payload, environment payload, input
artifact keys, code version). Paths, timestamps and run ids never enter it.
"""

from __future__ import annotations

import ast
import functools
import hashlib
import importlib.util
import json
import re
import sys
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any, Iterable

from tunepipe.schemas.base import glob_files

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


# --------------------------------------------------------------------------------------------
# A stage's code: the import closure of its module


# Distributions that a stage imports but that cannot change the bytes of its artifact: the
# orchestrator, HTTP plumbing and the CLI's YAML reader, and Ray (the `ray` launcher places the
# workers; the profile's launcher stays out of the key too, so installing the optional extra reruns
# nothing). Every other third-party distribution a module of the closure imports enters the key
# with its version.
# The experiment trackers (tasks/core/tracking.py) only watch a run: installing or upgrading one reruns nothing.
NON_RESULT_DISTRIBUTIONS = frozenset({
    "prefect", "httpx", "uvicorn", "fastapi", "openai", "tunepipe", "ray",
    "mlflow", "mlflow-skinny", "mlflow-tracing", "wandb", "tensorboard", "tensorboardx", "apprise",
})


# First-party modules that only watch a run, the way the distributions above only carry it: experiment
# tracking names runs, logs metrics and plots and registers exported models, and changes no byte a stage
# publishes. They stay out of every closure (with what they import), so editing the tracking code, or the
# numpy/PIL/transformers it imports to log plots, re-keys nothing.
OBSERVER_MODULES = frozenset({"tunepipe.tasks.core.tracking"})


@dataclass(frozen=True)
class ModuleCode:
    """One module's normalised source digest and what it imports."""

    digest: str
    first_party: frozenset[str]
    third_party: frozenset[str]


def _module_origin(name: str) -> Path | None:
    """The source file of a first-party module, found on disk without importing anything (a
    name that is an attribute, `pkg.mod.func`, has no file)."""
    top, *rest = name.split(".")
    root = _package_dir(top)
    if root is None:
        return _top_level_file(top) if not rest else None
    path = root.joinpath(*rest)
    for candidate in (path / "__init__.py", path.with_suffix(".py")):
        if candidate.is_file():
            return candidate
    return None


def _top_level_file(top: str) -> Path | None:
    try:
        spec = importlib.util.find_spec(top)
    except (ImportError, ValueError):
        return None
    origin = getattr(spec, "origin", None)
    return Path(origin) if origin and origin.endswith(".py") else None


@functools.lru_cache(maxsize=64)
def _package_dir(top: str) -> Path | None:
    try:
        spec = importlib.util.find_spec(top)
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations)))


def _strip_docstrings(tree: ast.AST) -> ast.AST:
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and node.body:
            first = node.body[0]
            if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant) and isinstance(first.value.value, str):
                node.body = node.body[1:] or [ast.Pass()]
    return tree


_DOTTED = re.compile(r"^([A-Za-z_][\w]*(?:\.[A-Za-z_][\w]*)+)(?::[A-Za-z_][\w.]*)?$")


def _imported_names(tree: ast.AST) -> set[str]:
    """Every module name the source imports, at the top or inside a function, plus dotted names
    in string constants (entry points such as `tunepipe.tasks.sft.train:train_job` are imported
    by name at run time)."""
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
        elif isinstance(node, ast.Constant) and isinstance(node.value, str) and (match := _DOTTED.match(node.value)):
            names.add(match.group(1))
    return names


@functools.lru_cache(maxsize=4096)
def _module_code(name: str, origin: str, mtime_ns: int, size: int) -> ModuleCode:
    # The AST without docstrings, not the text: comments, docstrings and formatting do not change
    # what a stage computes, so editing them keeps every cached artifact.
    tree = ast.parse(Path(origin).read_text(encoding="utf-8"), filename=origin)
    digest = sha256_bytes(ast.dump(_strip_docstrings(tree), include_attributes=False).encode())
    first, third = set(), set()
    root = name.split(".")[0]
    for imported in _imported_names(tree):
        top = imported.split(".")[0]
        if top in (root, "tunepipe"):
            first.add(imported)
        elif top not in sys.stdlib_module_names and top != "__future__":
            third.add(top)
    return ModuleCode(digest, frozenset(first), frozenset(third))


def _load_module_code(name: str) -> ModuleCode | None:
    origin = _module_origin(name)
    if origin is None:
        return None
    stat = origin.stat()
    return _module_code(name, str(origin), stat.st_mtime_ns, stat.st_size)


def _with_parents(name: str) -> list[str]:
    """A module and the packages above it: importing `a.b.c` runs `a/__init__` and `a/b/__init__`."""
    parts = name.split(".")
    return [".".join(parts[:i]) for i in range(1, len(parts) + 1)]


def import_closure(module: str) -> dict[str, ModuleCode]:
    """Every first-party module `module` can run, directly or through other modules: the modules
    of its own top-level package and of tunepipe that it imports, transitively. A name that is an
    attribute rather than a module (`from pkg.mod import func`) resolves to no file and is skipped."""
    seen: dict[str, ModuleCode] = {}
    todo = [module]
    while todo:
        name = todo.pop()
        for candidate in _with_parents(name):
            if candidate in seen or candidate in OBSERVER_MODULES:
                continue
            code = _load_module_code(candidate)
            if code is None:
                continue
            seen[candidate] = code
            todo.extend(code.first_party)
    return seen


@functools.cache
def _distributions() -> dict[str, list[str]]:
    return metadata.packages_distributions()


def library_versions_of(imports: Iterable[str]) -> dict[str, str]:
    """{distribution: version} of the third-party import names, less NON_RESULT_DISTRIBUTIONS."""
    versions = {}
    for top in sorted(set(imports)):
        for dist in _distributions().get(top, []):
            if dist.lower() in NON_RESULT_DISTRIBUTIONS:
                continue
            try:
                versions[dist.lower()] = metadata.version(dist)
            except metadata.PackageNotFoundError:
                continue
    return versions


@dataclass(frozen=True)
class CodeIdentity:
    """What of the code enters a stage's key: its modules' digests and the libraries they import."""

    version: str
    modules: dict[str, str]
    libraries: dict[str, str]


def code_identity(module: str) -> CodeIdentity:
    """The code a stage in `module` runs: a hash over the normalised source of its import closure
    and the versions of the third-party distributions those modules import."""
    closure = import_closure(module)
    modules = {name: code.digest for name, code in sorted(closure.items())}
    libraries = library_versions_of(lib for code in closure.values() for lib in code.third_party)
    version = sha256_bytes(canonical_json({"modules": modules, "libraries": libraries}).encode())[:KEY_LENGTH]
    return CodeIdentity(version, modules, libraries)


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
