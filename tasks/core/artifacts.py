"""The artifact store: staging, atomic publish, manifests, verification and locking.

Layout under `<workdir>/artifacts/`:

    <stage>/<key>/              published artifacts (manifest.json last, then one rename)
    <stage>/.staging/<key>/     work in progress; kept after a crash so a rerun resumes
    <stage>/.locks/<key>.lock   one writer per (stage, key), across processes
    <stage>/.trash/             artifacts that failed verification or were replaced

A directory without a verified manifest is never returned as an artifact. Bookkeeping is
bounded: `.trash` keeps the newest KEEP_TRASH entries per stage, and `.staging` the newest
KEEP_STAGING directories of other keys (failed or interrupted runs, kept for a resume) besides the
one being written; older ones are deleted unless another process holds their key's lock.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import shutil
import time
import uuid
from pathlib import Path
from typing import Iterator

from tunepipe.schemas.manifest import ArtifactRef, FileEntry, Manifest
from tunepipe.tasks.core.fingerprint import sha256_file

MANIFEST = "manifest.json"
KEEP_TRASH = 3  # discarded artifacts per stage, newest first: enough to inspect what went wrong
KEEP_STAGING = 3  # other keys' staging directories per stage (resumable after a crash), newest first
log = logging.getLogger("tunepipe.artifacts")  # reaches the Prefect run log (PREFECT_LOGGING_EXTRA_LOGGERS)


class ArtifactStore:
    """Content-addressed artifact directories under one root."""

    def __init__(self, root: str | Path):
        self.root = Path(root).resolve()

    # -- paths -----------------------------------------------------------------------------
    def final_dir(self, stage: str, key: str) -> Path:
        return self.root / stage / key

    def staging_dir(self, stage: str, key: str) -> Path:
        return self.root / stage / ".staging" / key

    def _trash_dir(self, stage: str) -> Path:
        return self.root / stage / ".trash"

    # -- reading ---------------------------------------------------------------------------
    def read_manifest(self, path: str | Path) -> Manifest:
        return read_manifest(path)

    def verify(self, path: str | Path) -> list[str]:
        """Problems that make an artifact untrustworthy; empty when every file matches."""
        path = Path(path)
        try:
            manifest = self.read_manifest(path)
        except FileNotFoundError:
            return [f"{path}: no {MANIFEST}"]
        except ValueError as exc:
            return [f"{path / MANIFEST}: unreadable ({exc.__class__.__name__})"]
        problems = []
        listed = {entry.path for entry in manifest.files}
        for entry in manifest.files:
            file = path / entry.path
            if not file.is_file():
                problems.append(f"{entry.path}: missing")
            elif file.stat().st_size != entry.size or sha256_file(file) != entry.sha256:
                problems.append(f"{entry.path}: content differs from manifest")
        for file in _files_below(path):
            if file not in listed and file != MANIFEST:
                problems.append(f"{file}: not in manifest")
        return problems

    def lookup(self, stage: str, key: str) -> ArtifactRef | None:
        """The published artifact if it verifies; one that does not is moved aside and ignored."""
        final = self.final_dir(stage, key)
        if not final.exists():
            return None
        problems = self.verify(final)
        if problems:
            target = self._discard(stage, final, reason="; ".join(problems))
            shown = "; ".join(problems[:10]) + (f"; and {len(problems) - 10} more" if len(problems) > 10 else "")
            log.warning(
                "artifact %s/%s failed verification (%d file(s): %s); moved to %s, recomputing",
                stage, key, len(problems), shown, target,
            )
            return None
        return ArtifactRef(stage=stage, key=key, path=str(final), cached=True)

    def published(self, stage: str) -> list[ArtifactRef]:
        """Every published artifact of a stage (unverified listing, newest first)."""
        base = self.root / stage
        if not base.is_dir():
            return []
        dirs = [d for d in base.iterdir() if d.is_dir() and not d.name.startswith(".") and (d / MANIFEST).exists()]
        dirs.sort(key=lambda d: (d / MANIFEST).stat().st_mtime, reverse=True)
        return [ArtifactRef(stage=stage, key=d.name, path=str(d), cached=True) for d in dirs]

    # -- writing ---------------------------------------------------------------------------
    @contextlib.contextmanager
    def lock(self, stage: str, key: str) -> Iterator[None]:
        """Exclusive lock on (stage, key) across processes; a second run waits for the first."""
        lock_path = self.root / stage / ".locks" / f"{key}.lock"
        lock_path.parent.mkdir(parents=True, exist_ok=True)
        with open(lock_path, "w") as handle:
            fcntl.flock(handle, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)

    def open_staging(self, stage: str, key: str, *, fresh: bool = False) -> Path:
        """The staging directory for (stage, key); kept as is (for resume) unless `fresh`."""
        staging = self.staging_dir(stage, key)
        if fresh and staging.exists():
            shutil.rmtree(staging)
        staging.mkdir(parents=True, exist_ok=True)
        self._prune_staging(stage, keep=staging)
        return staging

    def _prune_staging(self, stage: str, keep: Path) -> None:
        """Delete all but the newest KEEP_STAGING staging directories besides `keep`; one whose key
        another process holds locked is in use and stays."""
        others = [d for d in keep.parent.iterdir() if d.is_dir() and d != keep]
        others.sort(key=_mtime, reverse=True)
        for old in others[KEEP_STAGING:]:
            lock_path = self.root / stage / ".locks" / f"{old.name}.lock"
            with open(lock_path, "a") as handle:
                try:
                    fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    continue
                try:
                    shutil.rmtree(old, ignore_errors=True)
                    log.info("removed the stale staging directory %s (keeping the newest %d)", old, KEEP_STAGING)
                finally:
                    fcntl.flock(handle, fcntl.LOCK_UN)

    def publish(self, staging: Path, manifest: Manifest) -> ArtifactRef:
        """Write the manifest into `staging`, then make it the published artifact in one rename.

        The manifest is written last (through a temp file and rename), so a crash before the
        final rename leaves only a staging directory, and a crash after it a complete artifact.
        """
        entries = [
            FileEntry(path=name, sha256=sha256_file(staging / name), size=(staging / name).stat().st_size)
            for name in _files_below(staging)
            if name != MANIFEST
        ]
        manifest = manifest.model_copy(update={"files": entries})
        tmp = staging / f".{MANIFEST}.tmp"
        tmp.write_text(json.dumps(manifest.model_dump(mode="json"), indent=2, sort_keys=False))
        _fsync_file(tmp)
        os.replace(tmp, staging / MANIFEST)
        final = self.final_dir(manifest.stage, manifest.key)
        if final.exists():  # a forced recompute replaces the old artifact
            self._discard(manifest.stage, final, reason="replaced by a recompute")
        final.parent.mkdir(parents=True, exist_ok=True)
        os.rename(staging, final)
        _fsync_dir(final.parent)
        return ArtifactRef(stage=manifest.stage, key=manifest.key, path=str(final), cached=False)

    def _discard(self, stage: str, path: Path, *, reason: str) -> Path:
        trash = self._trash_dir(stage)
        trash.mkdir(parents=True, exist_ok=True)
        target = trash / f"{path.name}-{time.strftime('%Y%m%dT%H%M%S')}-{uuid.uuid4().hex[:6]}"
        os.rename(path, target)
        (target / ".discarded-because").write_text(reason + "\n")
        for old in sorted((d for d in trash.iterdir() if d.is_dir()), key=_mtime, reverse=True)[KEEP_TRASH:]:
            shutil.rmtree(old, ignore_errors=True)
        return target


def _mtime(path: Path) -> float:
    try:
        return path.stat().st_mtime
    except FileNotFoundError:
        return 0.0


def read_manifest(path: str | Path) -> Manifest:
    """The manifest of an artifact directory (unverified: see ArtifactStore.verify)."""
    return Manifest.model_validate_json((Path(path) / MANIFEST).read_text())


def _files_below(root: Path) -> list[str]:
    """Relative paths of all files below root, skipping our own hidden bookkeeping."""
    names = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for filename in sorted(filenames):
            if filename.startswith(f".{MANIFEST}"):
                continue
            names.append(str((Path(dirpath) / filename).relative_to(root)))
    return names


def _fsync_file(path: Path) -> None:
    with open(path, "rb") as handle:
        os.fsync(handle.fileno())


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
