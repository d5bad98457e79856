"""The data stage's key and its records come from the same bytes (issue 29, item 1)."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest

from tunepipe.schemas.data import DataConfig
from tunepipe.tasks.core.artifacts import ArtifactStore
from tunepipe.tasks.core.environment import load_environment
from tunepipe.tasks.core.stage import StageFailed, run_stage
from tunepipe.tasks.data import sources
from tunepipe.tasks.data.stage import DataStage


def write_rows(path: Path, count: int) -> None:
    path.write_text("".join(json.dumps({"instruction": f"question number {i}?", "output": f"answer {i}"}) + "\n" for i in range(count)))


def config_for(path: Path, engine: str = "local") -> DataConfig:
    return DataConfig(sources=[{"path": str(path), "format": "alpaca", "task": "t"}], split={"validation": 0.0, "test": 0.0},
                      dedup={"near": False, "contamination": False}, engine=engine)


def published_rows(ref) -> int:
    return len((Path(ref.path) / "train.jsonl").read_text().splitlines())


@pytest.mark.parametrize("rewrite, engine", [("replace", "local"), ("in_place_mid_read", "local"), ("in_place_mid_read", "streaming")])
def test_a_file_rewritten_while_the_stage_reads_it_does_not_poison_the_cache(tmp_path, monkeypatch, rewrite, engine):
    data = tmp_path / "big.jsonl"
    write_rows(data, 3000)
    original = data.read_bytes()
    store, env = ArtifactStore(tmp_path / "artifacts"), load_environment("cpu")
    log = logging.getLogger("test.integrity")

    def swap(file: Path) -> None:  # runs after the key was computed, as the reader opens the file
        monkeypatch.setattr(sources, "_on_open", None)
        if rewrite == "replace":
            small = tmp_path / "small.jsonl"
            write_rows(small, 17)
            small.replace(file)  # a new inode: the reader keeps the opened (old) file
        else:
            with open(file, "r+b") as handle:  # same inode: the reader sees part old, part new bytes
                handle.seek(len(original) // 2)
                handle.write(b'{"instruction": "injected?", "output": "x"}\n' * 10)
                handle.truncate()

    monkeypatch.setattr(sources, "_on_open", swap)
    config = config_for(data, engine)
    if rewrite == "replace":
        # The reader opened the old inode before the swap: it read the keyed bytes, so the result
        # is right for its key; the next run sees the new file under a new key.
        ref = run_stage(DataStage(), config, {}, store, env, logger=log)
        assert published_rows(ref) == 3000
        again = run_stage(DataStage(), config, {}, store, env, logger=log)
        assert again.key != ref.key and published_rows(again) == 17 and not again.cached
        return
    with pytest.raises(StageFailed, match="big.jsonl changed while the stage was reading it"):
        run_stage(DataStage(), config, {}, store, env, logger=log)
    assert not any((tmp_path / "artifacts" / "data").glob("[0-9a-f]*")), "nothing may be published"
    data.write_bytes(original)
    ref = run_stage(DataStage(), config, {}, store, env, logger=log)
    assert not ref.cached and published_rows(ref) == 3000


def test_a_file_replaced_between_keying_and_reading_fails_the_stage(tmp_path, monkeypatch):
    """The issue's case: the file is overwritten as the stage starts, before it is opened."""
    data = tmp_path / "big.jsonl"
    write_rows(data, 3000)
    original = data.read_bytes()
    store, env = ArtifactStore(tmp_path / "artifacts"), load_environment("cpu")
    real_plan = sources.files_to_read

    def plan_then_overwrite(source):  # files_to_read runs in the stage, after the key was computed
        write_rows(data, 17)
        return real_plan(source)

    monkeypatch.setattr("tunepipe.tasks.data.run.files_to_read", plan_then_overwrite)
    config = config_for(data)
    with pytest.raises(StageFailed, match="changed while the stage was reading it"):
        run_stage(DataStage(), config, {}, store, env)
    monkeypatch.undo()
    data.write_bytes(original)
    ref = run_stage(DataStage(), config, {}, store, env)
    assert not ref.cached and published_rows(ref) == 3000


def test_an_over_long_rejected_record_is_capped(tmp_path):
    from tunepipe.tasks.core.stage import StageContext
    from tunepipe.tasks.data.sources import MAX_RAW_CHARS

    data = tmp_path / "d.jsonl"
    huge = "word " * 400_000  # 2 MB: over clean.max_chars
    data.write_text(json.dumps({"instruction": "q?", "output": "fine"}) + "\n" + json.dumps({"instruction": huge, "output": "x"}) + "\n"
                    + "{not json " + "y" * 300_000 + "\n")
    config = DataConfig(sources=[{"path": str(data), "format": "alpaca", "task": "t"}], split={"validation": 0.0, "test": 0.0},
                        max_rejected_fraction=1.0, clean={"max_chars": 1000})
    out = tmp_path / "out"
    out.mkdir()
    DataStage().run(config, StageContext("data", "t", out, {}, load_environment("cpu"), logging.getLogger("t")))
    lines = (out / "rejected.jsonl").read_bytes().splitlines()
    rows = [json.loads(line) for line in lines]
    assert [r["source"] for r in rows] == ["d.jsonl:2", "d.jsonl:3"]
    assert all(len(line) < 5 * MAX_RAW_CHARS for line in lines)
    assert rows[0]["record_truncated_from_bytes"] > 2_000_000 and rows[0]["record"].startswith('{"instruction":"word word')
    assert rows[1]["record_truncated_from_bytes"] > 300_000 and rows[1]["reason"] == "malformed_json"


def test_a_hub_dataset_offline_is_one_line_with_the_fix(tmp_path, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    config = DataConfig(sources=[{"path": "someorg/no-such-dataset", "format": "alpaca", "task": "t"}])
    with pytest.raises(StageFailed, match="someorg/no-such-dataset: a hub dataset id, but the hub is offline.*download it once"):
        run_stage(DataStage(), config, {}, ArtifactStore(tmp_path / "a"), load_environment("cpu"))
