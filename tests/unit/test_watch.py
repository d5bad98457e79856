"""Inbox → data versions: debounce, content addressing, the ledger (no Prefect server needed)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from tunepipe.tasks.ops.retrain import segments, with_data_versions
from tunepipe.schemas.operations import WatchConfig
from tunepipe.tasks.ops.watch import Debouncer, Inbox, InboxFile, Ledger, Watcher


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def make_watcher(tmp_path: Path, debounce: float = 0.0, clock=None) -> tuple[Watcher, list]:
    sent: list = []
    inbox = tmp_path / "inbox"
    inbox.mkdir(parents=True, exist_ok=True)
    watcher = Watcher(
        "demo",
        str(tmp_path / "work"),
        Inbox(str(inbox), WatchConfig().patterns),
        Debouncer(debounce, clock or Clock()),
        emit=lambda pipeline, workdir, version: sent.append(version),
    )
    return watcher, sent


def drop(tmp_path: Path, name: str, text: str) -> Path:
    path = tmp_path / "inbox" / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def test_new_files_become_one_content_addressed_version(tmp_path):
    watcher, sent = make_watcher(tmp_path)
    drop(tmp_path, "a.jsonl", '{"instruction": "a", "output": "b"}\n')
    drop(tmp_path, "sub/b.csv", "instruction,output\nx,y\n")
    drop(tmp_path, ".hidden.jsonl", "{}\n")
    drop(tmp_path, "upload.jsonl.part", "partial")
    version = watcher.poll()
    assert version is not None and sent == [version]
    assert sorted(f["name"] for f in version.files) == ["a.jsonl", "sub/b.csv"]
    snap = Path(version.path)
    assert snap.parent == tmp_path / "work" / "data_versions" and snap.name == version.version
    assert (snap / "sub" / "b.csv").read_text() == "instruction,output\nx,y\n"
    # Same names and bytes elsewhere give the same version id.
    other, _ = make_watcher(tmp_path / "elsewhere")
    drop(tmp_path / "elsewhere", "a.jsonl", '{"instruction": "a", "output": "b"}\n')
    drop(tmp_path / "elsewhere", "sub/b.csv", "instruction,output\nx,y\n")
    assert other.poll().version == version.version


def test_nothing_is_processed_twice_and_changes_are_taken(tmp_path):
    watcher, sent = make_watcher(tmp_path)
    a = drop(tmp_path, "a.jsonl", "one\n")
    first = watcher.poll()
    assert watcher.poll() is None  # unchanged: nothing new
    os.utime(a, (1, 1))  # touched, same bytes
    drop(tmp_path, "copy-of-a.jsonl", "one\n")  # re-uploaded under another name
    assert watcher.poll() is None
    a.write_text("one\ntwo\n")  # edited in place: new bytes
    second = watcher.poll()
    assert [f["name"] for f in second.files] == ["a.jsonl"]
    assert [v.version for v in sent] == [first.version, second.version]
    ledger = Ledger(tmp_path / "work")
    assert [v.seq for v in ledger.versions()] == [1, 2]
    # A fresh watcher (restart) reads the ledger: still nothing to take.
    again, resent = make_watcher(tmp_path)
    assert again.poll() is None and again.flush_unemitted() == [] and resent == []


def test_debounce_waits_for_a_steady_file(tmp_path):
    clock = Clock()
    watcher, sent = make_watcher(tmp_path, debounce=5.0, clock=clock)
    path = drop(tmp_path, "a.jsonl", "one\n")
    assert watcher.poll() is None
    clock.now = 3.0
    path.write_text("one\ntwo\n")  # still being written
    os.utime(path, (100, 100))
    assert watcher.poll() is None
    clock.now = 7.0  # 4 s after the last change
    assert watcher.poll() is None
    clock.now = 8.5
    version = watcher.poll()
    assert version is not None and (Path(version.path) / "a.jsonl").read_text() == "one\ntwo\n"


def test_a_failed_event_is_sent_again_and_nothing_is_lost(tmp_path):
    watcher, sent = make_watcher(tmp_path)

    def down(*_):
        raise ConnectionError("server down")

    watcher.emit = down
    drop(tmp_path, "a.jsonl", "one\n")
    with pytest.raises(ConnectionError):
        watcher.poll()
    ledger = Ledger(tmp_path / "work")
    assert len(ledger.unemitted()) == 1
    watcher.emit = lambda p, w, v: sent.append(v.version)
    assert watcher.flush_unemitted() == sent and len(sent) == 1
    assert ledger.unemitted() == []


def test_a_run_trains_on_every_version_up_to_its_own(tmp_path):
    watcher, _ = make_watcher(tmp_path)
    versions = []
    for i in range(3):
        drop(tmp_path, f"f{i}.jsonl", f"{i}\n")
        versions.append(watcher.poll())
    ledger = Ledger(tmp_path / "work")
    assert [v.version for v in ledger.up_to(versions[1].version)] == [v.version for v in versions[:2]]
    assert len(ledger.up_to(None)) == 3
    with pytest.raises(ValueError, match="not in"):
        ledger.up_to("0" * 16)
    # a torn last line (crash while appending) is ignored
    with open(ledger.root / "ledger.jsonl", "a") as handle:
        handle.write('{"op": "version", "vers')
    assert len(ledger.versions()) == 3


def test_versions_become_data_sources_per_the_watch_section(tmp_path):
    from tunepipe.schemas.pipeline import PipelineConfig

    base = tmp_path / "base.jsonl"
    base.write_text(json.dumps({"instruction": "q", "output": "a"}) + "\n")
    config = PipelineConfig.model_validate(
        {
            "name": "demo",
            "workdir": str(tmp_path / "work"),
            "data": {"sources": [{"path": str(base), "format": "alpaca"}]},
            "watch": {"source": {"format": "alpaca", "task": "feedback"}},
        }
    )
    watcher, _ = make_watcher(tmp_path)
    drop(tmp_path, "a.jsonl", json.dumps({"instruction": "x", "output": "y"}) + "\n")
    version = watcher.poll()
    extended = with_data_versions(config, [version])
    assert [s.path for s in extended.data.sources] == [str(base), version.path]
    assert extended.data.sources[1].task == "feedback" and extended.data.sources[1].format == "alpaca"
    assert with_data_versions(config, []) is config


def test_segments_route_stages_to_profiles():
    assert segments(["data", "base_model"], "cpu", {}) == [("cpu", "base_model")]
    assert segments(["data", "base_model"], "cpu", {"base_model": "single-gpu-24gb"}) == [
        ("cpu", "data"),
        ("single-gpu-24gb", "base_model"),
    ]


def test_debouncer_hands_out_a_file_once_per_state():
    clock = Clock()
    debounce = Debouncer(0, clock)
    f = InboxFile("a", "a", 1, 1.0)
    assert debounce.ready([f]) == [f]
    debounce.taken([f])
    assert debounce.ready([f]) == []
    g = InboxFile("a", "a", 2, 2.0)
    assert debounce.ready([g]) == [g]
