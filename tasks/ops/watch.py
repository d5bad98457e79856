"""Data drops: inbox files → content-addressed data versions, a ledger, and a Prefect event.

Layout under `<workdir>/data_versions/`:

    <version>/               a snapshot: the dropped files, copied with their inbox-relative names
    ledger.jsonl             append-only: {"op": "version", ...} per snapshot, {"op": "emitted", ...}
                             once its event was accepted by the Prefect server
    .staging/                snapshots being copied (a crash leaves them here, never half a version)
    .lock                    one writer at a time (fcntl), across watchers and runs

A file is identified by the sha256 of its bytes. The ledger holds every digest ever snapshotted,
so a file is taken once: a re-uploaded or touched file with the same bytes is skipped, a file
edited in place (new bytes) is taken again. The version id is the digest of the snapshot's
(name, content) pairs, so the same drop gives the same version.

A run trains on the configured sources plus every data version up to the one it was started for
(all of them for a scheduled run), in ledger order: files that arrive while a run is going are
snapshotted into a later version whose event queues the next run (the deployment's concurrency
limit enqueues it). None is lost, none is processed twice, and a re-delivered event for a version
already trained on hits the cache.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import fnmatch
import hashlib
import json
import logging
import os
import shutil
import time
import uuid
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Iterator

from tunepipe.schemas.operations import DATA_VERSION_EVENT, WatchConfig
from tunepipe.tasks.core.fingerprint import content_digest

LEDGER = "ledger.jsonl"
VERSION_LENGTH = 16
_CHUNK = 1 << 20

log = logging.getLogger("tunepipe.watch")


def versions_root(workdir: str | Path) -> Path:
    return Path(workdir) / "data_versions"


@dataclass(frozen=True)
class DataVersion:
    """One snapshot: its id, directory, files and place in the ledger."""

    version: str
    path: str
    seq: int
    files: list[dict[str, Any]]
    created_at: str


class Ledger:
    """The append-only record of data versions and of which file digests they hold."""

    def __init__(self, workdir: str | Path):
        self.root = versions_root(workdir).resolve()

    @contextlib.contextmanager
    def lock(self) -> Iterator[None]:
        self.root.mkdir(parents=True, exist_ok=True)
        with open(self.root / ".lock", "w") as handle:
            fcntl.flock(handle, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)

    def _entries(self) -> list[dict[str, Any]]:
        path = self.root / LEDGER
        if not path.exists():
            return []
        entries = []
        for line in path.read_text().splitlines():
            line = line.strip()
            if not line:
                continue
            try:
                entries.append(json.loads(line))
            except json.JSONDecodeError:
                continue  # a torn last line after a crash: the version it described was never complete
        return entries

    def _append(self, entry: dict[str, Any]) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        with open(self.root / LEDGER, "a") as handle:
            handle.write(json.dumps(entry, sort_keys=True) + "\n")
            handle.flush()
            os.fsync(handle.fileno())

    def versions(self) -> list[DataVersion]:
        """Every complete data version, oldest first."""
        out = []
        for entry in self._entries():
            if entry.get("op") == "version" and (self.root / entry["version"]).is_dir():
                out.append(
                    DataVersion(entry["version"], str(self.root / entry["version"]), entry["seq"], entry["files"], entry["created_at"])
                )
        return out

    def processed_digests(self) -> set[str]:
        return {f["sha256"] for v in self.versions() for f in v.files}

    def unemitted(self) -> list[DataVersion]:
        """Versions whose event the server has not accepted yet (emit again: a rerun is a cache hit)."""
        emitted = {e["version"] for e in self._entries() if e.get("op") == "emitted"}
        return [v for v in self.versions() if v.version not in emitted]

    def mark_emitted(self, version: str) -> None:
        with self.lock():
            self._append({"op": "emitted", "version": version, "at": _now()})

    def up_to(self, version: str | None) -> list[DataVersion]:
        """The versions a run for `version` trains on: every one up to it (all when None)."""
        versions = self.versions()
        if version is None:
            return versions
        ids = [v.version for v in versions]
        if version not in ids:
            known = ", ".join(ids[-5:]) or "none yet"
            raise ValueError(f"data version {version!r} is not in {self.root / LEDGER} (latest: {known})")
        return versions[: ids.index(version) + 1]

    def snapshot(self, files: list["InboxFile"], read: Callable[["InboxFile"], Iterator[bytes]]) -> DataVersion | None:
        """Copy the files not yet processed into a new version; None when every one was seen before."""
        with self.lock():
            seen = self.processed_digests()
            staging = self.root / ".staging" / uuid.uuid4().hex
            staging.mkdir(parents=True)
            try:
                taken = []
                for file in files:
                    target = staging / file.name
                    target.parent.mkdir(parents=True, exist_ok=True)
                    digest = hashlib.sha256()
                    size = 0
                    with open(target, "wb") as out:
                        for chunk in read(file):
                            digest.update(chunk)
                            size += len(chunk)
                            out.write(chunk)
                    sha = digest.hexdigest()
                    if sha in seen:
                        target.unlink()
                        continue
                    seen.add(sha)
                    taken.append({"name": file.name, "sha256": sha, "size": size})
                if not taken:
                    return None
                version = content_digest(staging)[:VERSION_LENGTH]
                final = self.root / version
                if final.exists():  # same names and bytes as an existing version (its ledger line was lost)
                    shutil.rmtree(staging)
                else:
                    os.rename(staging, final)
                seq = 1 + max((v.seq for v in self.versions()), default=0)
                created = _now()
                self._append({"op": "version", "version": version, "seq": seq, "files": taken, "created_at": created})
                return DataVersion(version, str(final), seq, taken, created)
            finally:
                shutil.rmtree(staging, ignore_errors=True)


@dataclass(frozen=True)
class InboxFile:
    name: str  # path relative to the inbox, with / separators
    url: str  # what the filesystem opens
    size: int
    mtime: float


@dataclass
class Inbox:
    """A local directory or fsspec prefix, scanned for files matching the patterns."""

    location: str
    patterns: list[str]
    _fs: Any = field(init=False, repr=False)
    _root: str = field(init=False)

    def __post_init__(self) -> None:
        from fsspec.core import url_to_fs

        self._fs, root = url_to_fs(self.location)
        self._root = root.rstrip("/")

    def scan(self) -> list[InboxFile]:
        try:
            found = self._fs.find(self._root, detail=True)
        except FileNotFoundError:
            return []
        files = []
        for path, info in sorted(found.items()):
            if info.get("type") != "file":
                continue
            name = path[len(self._root) :].lstrip("/")
            base = name.rsplit("/", 1)[-1]
            if any(part.startswith(".") for part in name.split("/")):
                continue
            if not any(fnmatch.fnmatch(base, pattern) for pattern in self.patterns):
                continue
            files.append(InboxFile(name, path, int(info.get("size") or 0), _mtime(info)))
        return files

    def read(self, file: InboxFile) -> Iterator[bytes]:
        with self._fs.open(file.url, "rb") as handle:
            while chunk := handle.read(_CHUNK):
                yield chunk


def _mtime(info: dict[str, Any]) -> float:
    for key in ("mtime", "LastModified", "last_modified", "updated", "created"):
        value = info.get(key)
        if value is None:
            continue
        if isinstance(value, datetime):
            return value.timestamp()
        if isinstance(value, (int, float)):
            return float(value)
        try:
            return datetime.fromisoformat(str(value).replace("Z", "+00:00")).timestamp()
        except ValueError:
            continue
    return 0.0


class Debouncer:
    """Holds each file back until its (size, mtime) has been steady for `seconds`."""

    def __init__(self, seconds: float, clock: Callable[[], float] = time.monotonic):
        self.seconds = seconds
        self.clock = clock
        self._seen: dict[str, tuple[tuple[int, float], float]] = {}
        self._taken: dict[str, tuple[int, float]] = {}

    def ready(self, files: list[InboxFile]) -> list[InboxFile]:
        now = self.clock()
        out = []
        present = set()
        for file in files:
            present.add(file.name)
            signature = (file.size, file.mtime)
            if self._taken.get(file.name) == signature:
                continue  # already handed out in this state; a change makes it eligible again
            previous = self._seen.get(file.name)
            if previous is None or previous[0] != signature:
                self._seen[file.name] = (signature, now)
                if self.seconds > 0:
                    continue
            elif now - previous[1] < self.seconds:
                continue
            out.append(file)
        for name in list(self._seen):
            if name not in present:
                del self._seen[name]
        return out

    def taken(self, files: list[InboxFile]) -> None:
        for file in files:
            self._taken[file.name] = (file.size, file.mtime)


def emit_version_event(pipeline: str, workdir: str | Path, version: DataVersion) -> None:
    """Send the data-version event to the Prefect server and wait until it is sent."""
    from prefect.events import Event
    from prefect.events.clients import get_events_client

    event = Event(
        event=DATA_VERSION_EVENT,
        resource={
            "prefect.resource.id": f"tunepipe.data-version.{version.version}",
            "prefect.resource.name": version.version,
            "tunepipe.pipeline": pipeline,
            "tunepipe.workdir": str(Path(workdir).resolve()),
        },
        payload={
            "version": version.version,
            "path": version.path,
            "seq": version.seq,
            "files": [f["name"] for f in version.files],
            "pipeline": pipeline,
        },
    )

    async def send() -> None:
        async with get_events_client() as client:
            await client.emit(event)

    asyncio.run(send())


@dataclass
class Watcher:
    """Scan → debounce → snapshot → event, one poll at a time (`run` loops)."""

    pipeline: str
    workdir: str
    inbox: Inbox
    debounce: Debouncer
    emit: Callable[[str, str, DataVersion], None] = emit_version_event
    ledger: Ledger = field(init=False)

    def __post_init__(self) -> None:
        self.ledger = Ledger(self.workdir)

    @classmethod
    def from_config(cls, pipeline: str, workdir: str, inbox: str, watch: WatchConfig, **kwargs: Any) -> "Watcher":
        return cls(pipeline, workdir, Inbox(inbox, watch.patterns), Debouncer(watch.debounce_s), **kwargs)

    def flush_unemitted(self) -> list[str]:
        """Emit events the server never got (a watcher stopped between snapshot and event)."""
        sent = []
        for version in self.ledger.unemitted():
            self._emit(version)
            sent.append(version.version)
        return sent

    def poll(self) -> DataVersion | None:
        ready = self.debounce.ready(self.inbox.scan())
        if not ready:
            return None
        version = self.ledger.snapshot(ready, self.inbox.read)
        self.debounce.taken(ready)
        if version is None:
            return None
        log.info("data version %s: %s", version.version, ", ".join(f["name"] for f in version.files))
        self._emit(version)
        return version

    def _emit(self, version: DataVersion) -> None:
        self.emit(self.pipeline, self.workdir, version)
        self.ledger.mark_emitted(version.version)

    def run(self, poll_s: float, stop: Callable[[], bool] = lambda: False) -> None:
        self.flush_unemitted()
        while not stop():
            try:
                self.poll()
            except Exception as exc:  # noqa: BLE001 - a server hiccup must not stop the watcher; the ledger keeps the version
                log.warning("watch: %s: %s (will retry)", type(exc).__name__, exc)
            time.sleep(poll_s)
            with contextlib.suppress(Exception):
                self.flush_unemitted()


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")
