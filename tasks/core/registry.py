"""The adapter registry: named adapters with integer versions, aliases and lineage, in plain files.

Layout under the root (a local directory, or any fsspec URI such as `s3://bucket/registry`):

    index.json                  the whole state (schemas.registry.RegistryIndex), rewritten atomically
    adapters/<name>/<version>/  a copy of the adapter directory as it was registered
    .lock                       (local roots) the write lock shared by every process

References: `notes@3` (version 3), `notes@prod` (the version alias `prod` points at), `notes`
(the latest version).

    registry = AdapterRegistry("runs/x/registry")
    v = registry.register("notes", "/path/to/adapter", Lineage(data_key=..., base_model=...))
    registry.promote("notes", v)               # alias prod -> v; the alias keeps its history
    registry.rollback("notes")                 # prod -> the version it pointed at before
    registry.resolve("notes@prod").path        # where the adapter lives
    registry.serving("prod")                   # {name: AdapterVersion} for a server to load

For servers: serve every entry of `serving(alias)` under its adapter name (clients send
`model: <name>`); `local_path(entry)` is a local directory of the adapter (a remote root's
copy is downloaded into a cache first); `entry.base_model` says which base it applies to.

Writes: the adapter's files are copied first and the index is written last (temp file and
rename on local roots, a single-object put on object stores), so a crash never leaves the
index pointing at a half-copied adapter. Registering content that is already registered
(same file digest) returns the existing version: reruns never create duplicates. Local roots
are locked with `fcntl` across processes; on object stores the lock only covers this process
(one writer per remote registry, e.g. the pipeline's deploy stage).
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import re
import tempfile
import threading
from datetime import datetime, timezone
from pathlib import Path
from typing import Iterator

from tunepipe.schemas.registry import (
    NAME_PATTERN,
    AdapterRecord,
    AdapterVersion,
    Lineage,
    RegistryEvent,
    RegistryIndex,
)
from tunepipe.tasks.core.fingerprint import content_digest

INDEX = "index.json"
DEFAULT_ALIAS = "prod"
_NAME = re.compile(NAME_PATTERN)
_PROCESS_LOCK = threading.Lock()


class RegistryError(ValueError):
    """A reference or operation the registry cannot satisfy; the message says what exists instead."""


def parse_ref(ref: str) -> tuple[str, str | None]:
    """`notes@3` → (notes, "3"); `notes@prod` → (notes, "prod"); `notes` → (notes, None)."""
    name, _, selector = ref.partition("@")
    if not _NAME.match(name):
        raise RegistryError(f"{ref!r}: an adapter name starts with a letter and has only letters, digits, '_', '.', '-'")
    return name, (selector or None)


class AdapterRegistry:
    """A file-based registry of named, versioned adapters (see the module docstring)."""

    def __init__(self, root: str | os.PathLike, *, cache_dir: str | os.PathLike | None = None):
        import fsspec

        self.root = str(root)
        self.fs, self._root_path = fsspec.core.url_to_fs(self.root)
        self.is_local = "file" in _protocols(self.fs)
        if self.is_local:
            self._root_path = str(Path(self._root_path).resolve())
        self.cache_dir = Path(cache_dir or Path(tempfile.gettempdir()) / "tunepipe-registry-cache")

    # -- reading ---------------------------------------------------------------------------
    def index(self) -> RegistryIndex:
        """The current state (empty for a new root), with every version's full `path` filled in."""
        path = self._join(INDEX)
        if not self.fs.exists(path):
            return RegistryIndex()
        index = RegistryIndex.model_validate_json(self.fs.cat_file(path))
        for record in index.adapters.values():
            for entry in record.versions:
                entry.path = self._location(entry.location)
        return index

    def list(self) -> dict[str, AdapterRecord]:
        return self.index().adapters

    def resolve(self, ref: str) -> AdapterVersion:
        """The version a reference names: `name@<version>`, `name@<alias>` or `name` (latest)."""
        name, selector = parse_ref(ref)
        return _select(self.index(), name, selector)

    def serving(self, alias: str = DEFAULT_ALIAS) -> dict[str, AdapterVersion]:
        """{name: the version `alias` points at} for every adapter that has the alias."""
        index = self.index()
        return {name: _version(record, name, record.aliases[alias]) for name, record in index.adapters.items() if alias in record.aliases}

    def local_path(self, entry: AdapterVersion) -> str:
        """A local directory holding the adapter (downloaded into the cache for remote roots)."""
        if self.is_local:
            return entry.path
        target = self.cache_dir / entry.name / f"{entry.version}-{entry.digest.split(':')[-1][:12]}"
        if not target.exists():
            partial = target.with_name(f"{target.name}.{os.getpid()}.partial")
            remote = self._join(entry.location)
            for file in self.fs.find(remote):
                local = partial / file[len(remote) :].lstrip("/")
                local.parent.mkdir(parents=True, exist_ok=True)
                self.fs.get_file(file, str(local))
            partial.rename(target)
        return str(target)

    # -- writing ---------------------------------------------------------------------------
    def register(self, name: str, path: str | os.PathLike, lineage: Lineage | None = None) -> int:
        """Copy the adapter at `path` in as the next version of `name`; identical content returns its version."""
        parse_ref(name)
        source = Path(path)
        if not (source / "adapter_config.json").is_file():
            raise RegistryError(f"{source}: not a PEFT adapter directory (no adapter_config.json)")
        lineage = lineage or Lineage()
        digest = f"sha256:{content_digest(source)}"
        with self._locked():
            index = self.index()
            record = index.adapters.setdefault(name, AdapterRecord())
            for entry in record.versions:
                if entry.digest == digest:
                    return entry.version
            version = max((e.version for e in record.versions), default=0) + 1
            location = f"adapters/{name}/{version}"
            self._copy_in(source, location)
            record.versions.append(
                AdapterVersion(
                    name=name, version=version, location=location, digest=digest,
                    base_model=lineage.base_model, lineage=lineage, registered_at=_now(),
                )
            )
            index.events.append(RegistryEvent(at=_now(), action="register", name=name, version=version))
            self._write(index)
            return version

    def set_alias(self, name: str, alias: str, version: int, *, action: str = "set_alias", reason: str | None = None) -> int | None:
        """Point `alias` at `version` (recorded in the alias history); returns the version it pointed at before."""
        _check_alias(alias)
        with self._locked():
            index = self.index()
            record = _record(index, name)
            _version(record, name, version)
            previous = record.aliases.get(alias)
            if previous == version:
                return previous  # idempotent: no new history entry, no event
            record.aliases[alias] = version
            record.alias_history.setdefault(alias, []).append(version)
            index.events.append(RegistryEvent(at=_now(), action=action, name=name, alias=alias, version=version, previous=previous, reason=reason))
            self._write(index)
            return previous

    def promote(self, name: str, version: int, alias: str = DEFAULT_ALIAS, *, reason: str | None = None) -> int | None:
        """Make `version` what `alias` serves; returns the version it served before (None if new)."""
        return self.set_alias(name, alias, version, action="promote", reason=reason)

    def rollback(self, name: str, alias: str = DEFAULT_ALIAS, *, reason: str | None = None) -> AdapterVersion:
        """Point `alias` back at the version it pointed at before the current one; returns that version."""
        with self._locked():
            index = self.index()
            record = _record(index, name)
            history = record.alias_history.get(alias, [])
            if alias not in record.aliases:
                raise RegistryError(f"{name}@{alias}: no such alias (aliases: {sorted(record.aliases) or 'none'})")
            if len(history) < 2:
                raise RegistryError(f"{name}@{alias}: nothing to roll back to (it has only ever pointed at version {record.aliases[alias]})")
            current = history.pop()
            record.aliases[alias] = history[-1]
            index.events.append(
                RegistryEvent(at=_now(), action="rollback", name=name, alias=alias, version=history[-1], previous=current, reason=reason)
            )
            self._write(index)
            return _version(record, name, history[-1])

    def unset_alias(self, name: str, alias: str = DEFAULT_ALIAS, *, reason: str | None = None) -> None:
        """Remove `alias` (a failed first deployment: there is nothing earlier to roll back to)."""
        with self._locked():
            index = self.index()
            record = _record(index, name)
            if alias not in record.aliases:
                return
            previous = record.aliases.pop(alias)
            record.alias_history.pop(alias, None)
            index.events.append(RegistryEvent(at=_now(), action="unset_alias", name=name, alias=alias, previous=previous, reason=reason))
            self._write(index)

    # -- storage ---------------------------------------------------------------------------
    def _join(self, relative: str) -> str:
        return f"{self._root_path.rstrip('/')}/{relative}"

    def _location(self, relative: str) -> str:
        if self.is_local:
            return self._join(relative)
        return self.fs.unstrip_protocol(self._join(relative))

    def _copy_in(self, source: Path, location: str) -> None:
        # The index does not name this directory yet: leftovers of a crashed copy are garbage.
        dest = self._join(location)
        if self.fs.exists(dest):
            self.fs.rm(dest, recursive=True)
        self.fs.makedirs(dest, exist_ok=True)
        for file in sorted(p for p in source.rglob("*") if p.is_file()):
            target = f"{dest}/{file.relative_to(source).as_posix()}"
            self.fs.makedirs(target.rsplit("/", 1)[0], exist_ok=True)
            self.fs.put_file(str(file), target)

    def _write(self, index: RegistryIndex) -> None:
        payload = index.model_dump_json(indent=1).encode()
        path = self._join(INDEX)
        if self.is_local:
            tmp = self._join(f".{INDEX}.{os.getpid()}.tmp")
            with open(tmp, "wb") as handle:
                handle.write(payload)
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(tmp, path)
        else:
            self.fs.pipe_file(path, payload)

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        with _PROCESS_LOCK:
            if not self.is_local:
                self.fs.makedirs(self._root_path, exist_ok=True)
                yield
                return
            Path(self._root_path).mkdir(parents=True, exist_ok=True)
            with open(self._join(".lock"), "w") as handle:
                fcntl.flock(handle, fcntl.LOCK_EX)
                try:
                    yield
                finally:
                    fcntl.flock(handle, fcntl.LOCK_UN)


def _protocols(fs) -> tuple[str, ...]:
    protocol = fs.protocol
    return tuple(protocol) if isinstance(protocol, (tuple, list)) else (protocol,)


def _record(index: RegistryIndex, name: str) -> AdapterRecord:
    if name not in index.adapters:
        raise RegistryError(f"no adapter named {name!r} (registered: {sorted(index.adapters) or 'none'})")
    return index.adapters[name]


def _version(record: AdapterRecord, name: str, version: int) -> AdapterVersion:
    for entry in record.versions:
        if entry.version == version:
            return entry
    raise RegistryError(f"{name}@{version}: no such version (versions: {[e.version for e in record.versions]})")


def _select(index: RegistryIndex, name: str, selector: str | None) -> AdapterVersion:
    record = _record(index, name)
    if selector is None:
        if not record.versions:
            raise RegistryError(f"{name}: no versions registered")
        return max(record.versions, key=lambda e: e.version)
    if selector.isdigit():
        return _version(record, name, int(selector))
    if selector not in record.aliases:
        raise RegistryError(f"{name}@{selector}: no such alias (aliases: {sorted(record.aliases) or 'none'})")
    return _version(record, name, record.aliases[selector])


def _check_alias(alias: str) -> None:
    if not _NAME.match(alias):
        raise RegistryError(f"alias {alias!r}: starts with a letter (so it never reads as a version), then letters, digits, '_', '.', '-'")


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")
