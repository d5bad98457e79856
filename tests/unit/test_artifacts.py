"""The artifact store: publish, verify, distrust tampering, survive kills."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from tunepipe.tasks.core.artifacts import ArtifactStore, MANIFEST
from tunepipe.tasks.core.stage import StageFailed, run_stage
from tests.conftest import REPO
from tests.helpers.toy_stages import Consumer, Counter, Producer, ToyConfig


def test_publish_then_reuse(tmp_path, cpu_env):
    store = ArtifactStore(tmp_path / "artifacts")
    first = run_stage(Producer(), ToyConfig(), {}, store, cpu_env)
    second = run_stage(Producer(), ToyConfig(), {}, store, cpu_env)
    assert (first.cached, second.cached) == (False, True)
    assert first.key == second.key and first.path == second.path
    assert Path(first.path) == tmp_path / "artifacts" / "producer" / first.key
    manifest = json.loads((Path(first.path) / MANIFEST).read_text())
    assert manifest["stage"] == "producer" and manifest["key"] == first.key
    assert manifest["config"] == {"text": "hello", "repeat": 2, "sleep_per_chunk": 0.0}
    assert manifest["metrics"] == {"lines": 2}
    assert {f["path"] for f in manifest["files"]} == {"out.txt", "pid", "summary.md", "summary_table.json"}
    # The libraries that entered the key: what the stage's import closure imports (the toy stage
    # and tunepipe's contract import pydantic and nothing else from outside the stdlib).
    from importlib.metadata import version

    assert manifest["libraries"] == {"pydantic": version("pydantic")}
    assert manifest["timings"]["seconds"] >= 0
    assert not (tmp_path / "artifacts" / "producer" / ".staging" / first.key).exists()


def test_inputs_are_recorded_and_feed_the_key(tmp_path, cpu_env):
    store = ArtifactStore(tmp_path / "artifacts")
    up_a = run_stage(Producer(), ToyConfig(repeat=2), {}, store, cpu_env)
    up_b = run_stage(Producer(), ToyConfig(repeat=3), {}, store, cpu_env)
    down_a = run_stage(Consumer(), ToyConfig(), {"producer": up_a}, store, cpu_env)
    down_b = run_stage(Consumer(), ToyConfig(), {"producer": up_b}, store, cpu_env)
    assert down_a.key != down_b.key
    manifest = json.loads((Path(down_b.path) / MANIFEST).read_text())
    assert manifest["inputs"] == {"producer": {"stage": "producer", "key": up_b.key}}
    assert (Path(down_b.path) / "count.txt").read_text() == "3 hello\n"


@pytest.mark.parametrize("damage", ["edit", "delete", "extra", "manifest"])
def test_damaged_artifact_is_recomputed_not_trusted(tmp_path, cpu_env, damage, caplog):
    store = ArtifactStore(tmp_path / "artifacts")
    ref = run_stage(Producer(), ToyConfig(), {}, store, cpu_env)
    path = Path(ref.path)
    if damage == "edit":
        (path / "out.txt").write_text("hello\nhellO\n")
    elif damage == "delete":
        (path / "out.txt").unlink()
    elif damage == "extra":
        (path / "stray.bin").write_bytes(b"?")
    else:
        (path / MANIFEST).write_text("{not json")
    assert store.verify(path)
    with caplog.at_level("WARNING", logger="tunepipe.artifacts"):
        again = run_stage(Producer(), ToyConfig(), {}, store, cpu_env)
    assert again.cached is False and again.path == ref.path
    # Said in the log: which artifact, which files, where it went.
    named = {"edit": "out.txt: content differs from manifest", "delete": "out.txt: missing", "extra": "stray.bin: not in manifest",
             "manifest": "manifest.json: unreadable"}[damage]
    (warning,) = [r.getMessage() for r in caplog.records if r.name == "tunepipe.artifacts"]
    assert f"artifact producer/{ref.key} failed verification (1 file(s): " in warning and named in warning
    assert "/.trash/" in warning and warning.endswith("recomputing")
    assert (path / "out.txt").read_text() == "hello\nhello\n"
    assert store.verify(path) == []
    trashed = list((tmp_path / "artifacts" / "producer" / ".trash").iterdir())
    assert len(trashed) == 1 and (trashed[0] / ".discarded-because").read_text().strip()


def test_failed_stage_publishes_nothing(tmp_path, cpu_env):
    class Failing(Producer):
        def run(self, config, ctx):
            (ctx.staging_dir / "half.txt").write_text("partial")
            raise StageFailed("planted failure")

    store = ArtifactStore(tmp_path / "artifacts")
    with pytest.raises(StageFailed, match="planted failure"):
        run_stage(Failing(), ToyConfig(), {}, store, cpu_env)
    assert store.published("producer") == []
    ref = run_stage(Producer(), ToyConfig(), {}, store, cpu_env)
    # Not resumable: the failed attempt's file must not leak into the published artifact.
    assert not (Path(ref.path) / "half.txt").exists()


def _spawn(stage: str, staging_marker: str, store_root: Path, repeat: int, sleep: float) -> subprocess.Popen:
    script = textwrap.dedent(
        f"""
        from tunepipe.tasks.core.artifacts import ArtifactStore
        from tunepipe.tasks.core.environment import load_environment
        from tunepipe.tasks.core.stage import run_stage
        from tests.helpers.toy_stages import {stage}, ToyConfig
        run_stage({stage}(), ToyConfig(repeat={repeat}, sleep_per_chunk={sleep}), {{}}, ArtifactStore({str(store_root)!r}), load_environment("cpu"))
        """
    )
    return subprocess.Popen([sys.executable, "-c", script], cwd=REPO)


def _wait_for(predicate, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError("condition not reached")
        time.sleep(0.05)


def test_killed_mid_write_leaves_nothing_published(tmp_path, cpu_env):
    root = tmp_path / "artifacts"
    proc = _spawn("Producer", "out.txt", root, repeat=200, sleep=0.05)
    staging = root / "producer" / ".staging"
    _wait_for(lambda: any(staging.glob("*/out.txt")) and next(staging.glob("*/out.txt")).stat().st_size > 20)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    store = ArtifactStore(root)
    assert store.published("producer") == []
    assert not any(p.name != ".staging" and p.name != ".locks" for p in (root / "producer").iterdir())
    ref = run_stage(Producer(), ToyConfig(repeat=200), {}, store, cpu_env)
    assert ref.cached is False
    assert (Path(ref.path) / "out.txt").read_text().count("\n") == 200
    assert store.verify(ref.path) == []


def test_resumable_stage_continues_after_kill(tmp_path, cpu_env):
    root = tmp_path / "artifacts"
    proc = _spawn("Counter", "", root, repeat=40, sleep=0.1)
    checkpoints = root / "counter" / ".staging"
    _wait_for(lambda: len(list(checkpoints.glob("*/.checkpoints/*.ckpt"))) >= 5)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    done = len(list(checkpoints.glob("*/.checkpoints/*.ckpt")))
    ref = run_stage(Counter(), ToyConfig(repeat=40, sleep_per_chunk=0.1), {}, ArtifactStore(root), cpu_env)
    resumed_from = int((Path(ref.path) / "result.txt").read_text().split("=")[1])
    assert resumed_from == done >= 5
    # Checkpoints are scaffolding: never part of the published artifact.
    assert not (Path(ref.path) / ".checkpoints").exists()
    assert ArtifactStore(root).verify(ref.path) == []


def test_refresh_replaces_published_artifact(tmp_path, cpu_env):
    store = ArtifactStore(tmp_path / "artifacts")
    first = run_stage(Producer(), ToyConfig(), {}, store, cpu_env)
    pid_before = (Path(first.path) / "pid").read_text()
    again = run_stage(Producer(), ToyConfig(), {}, store, cpu_env, refresh=True)
    assert again.cached is False and again.path == first.path
    assert store.verify(again.path) == [] and (Path(again.path) / "pid").read_text() == pid_before


def test_a_stage_without_its_required_inputs_fails_before_it_runs(tmp_path, cpu_env):
    """The runner checks the graph's required inputs (schemas/graph.py), so no stage repeats it."""
    from tunepipe.schemas.graph import STAGE_GRAPH
    from tunepipe.schemas.sft import SFTConfig
    from tunepipe.tasks.core.graph import get_stage

    assert STAGE_GRAPH["align"].required == ("data", "sft")
    store = ArtifactStore(tmp_path / "artifacts")
    with pytest.raises(StageFailed, match=r"^sft: needs the `data` stage's artifact as input `data`$"):
        run_stage(get_stage("sft"), SFTConfig.model_validate({"model": "x/y"}), {}, store, cpu_env)
    assert not (tmp_path / "artifacts" / "sft").exists()  # nothing staged


def test_trash_and_stale_staging_are_bounded(tmp_path):
    """`.trash` keeps the newest KEEP_TRASH entries; `.staging` the newest KEEP_STAGING other keys,
    except one whose key another process holds locked (issue 29, item 12)."""
    import fcntl
    import os

    from tunepipe.tasks.core import artifacts

    store = ArtifactStore(tmp_path / "artifacts")
    for i in range(artifacts.KEEP_TRASH + 3):
        victim = tmp_path / f"victim{i}"
        victim.mkdir()
        store._discard("s", victim, reason=f"number {i}")
    trash = sorted((tmp_path / "artifacts" / "s" / ".trash").iterdir())
    assert len(trash) == artifacts.KEEP_TRASH
    assert sorted((t / ".discarded-because").read_text() for t in trash) == [f"number {i}\n" for i in range(3, 6)]

    keys = [f"k{i}" for i in range(artifacts.KEEP_STAGING + 3)]
    with store.lock("s", keys[0]):
        store.open_staging("s", keys[0])
    for age, key in enumerate(keys[1:], start=1):  # k1 oldest after k0, k5 newest
        with store.lock("s", key):
            staging = store.open_staging("s", key)
        os.utime(staging, (1000 + age, 1000 + age))
    os.utime(store.staging_dir("s", "k0"), (10, 10))  # the oldest of all, but locked by another process
    lock = open(tmp_path / "artifacts" / "s" / ".locks" / "k0.lock", "a")
    fcntl.flock(lock, fcntl.LOCK_EX)
    try:
        with store.lock("s", "current"):
            store.open_staging("s", "current")
    finally:
        fcntl.flock(lock, fcntl.LOCK_UN)
        lock.close()
    left = sorted(d.name for d in (tmp_path / "artifacts" / "s" / ".staging").iterdir())
    assert left == ["current", "k0", "k3", "k4", "k5"]
