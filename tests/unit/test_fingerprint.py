"""The cache key changes exactly when config, inputs, environment payload or code change."""

from __future__ import annotations

import shutil

from tasks.fingerprint import code_version, content_digest, stage_key
from tasks.stage import identify
from tests.toy_stages import Consumer, Producer, ToyConfig
from schemas.manifest import ArtifactRef

BASE = dict(stage="s", config_payload={"a": 1, "b": [1, 2]}, env_payload={}, input_keys={"data": "k1"}, code="c1")


def key(**changes):
    return stage_key(**{**BASE, **changes})


def test_key_is_stable_and_order_independent():
    assert key() == key()
    assert key(config_payload={"b": [1, 2], "a": 1}) == key()
    assert len(key()) == 16


def test_key_changes_with_each_ingredient():
    variants = [
        key(config_payload={"a": 2, "b": [1, 2]}),
        key(env_payload={"dtype": "bfloat16"}),
        key(input_keys={"data": "k2"}),
        key(input_keys={"data": "k1", "extra": "k3"}),
        key(code="c2"),
        key(stage="t"),
    ]
    assert len({key(), *variants}) == len(variants) + 1


def test_identify_uses_config_inputs_and_code(cpu_env):
    ref = lambda k: ArtifactRef(stage="producer", key=k, path=f"/anywhere/{k}")
    base = identify(Consumer(), ToyConfig(), {"producer": ref("k1")}, cpu_env).key
    assert identify(Consumer(), ToyConfig(), {"producer": ArtifactRef(stage="producer", key="k1", path="/else")}, cpu_env).key == base
    assert identify(Consumer(), ToyConfig(text="x"), {"producer": ref("k1")}, cpu_env).key != base
    assert identify(Consumer(), ToyConfig(), {"producer": ref("k2")}, cpu_env).key != base
    assert identify(Producer(), ToyConfig(), {}, cpu_env).key != identify(Producer(), ToyConfig(repeat=3), {}, cpu_env).key


def test_code_version_follows_source(tmp_path, monkeypatch):
    pkg = tmp_path / "fakepkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "mod.py").write_text("X = 1\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    before = code_version(["fakepkg"])
    assert code_version(["fakepkg"]) == before
    (pkg / "mod.py").write_text("X = 2\n")
    assert code_version(["fakepkg"]) != before


def test_content_digest_ignores_location_not_content(tmp_path):
    src = tmp_path / "a" / "data"
    src.mkdir(parents=True)
    (src / "x.jsonl").write_text('{"a": 1}\n')
    (src / "y.jsonl").write_text('{"a": 2}\n')
    digest = content_digest(src)
    moved = tmp_path / "elsewhere"
    shutil.copytree(src, moved)
    assert content_digest(moved) == digest
    assert content_digest(str(moved / "*.jsonl")) == digest
    (moved / "y.jsonl").write_text('{"a": 3}\n')
    assert content_digest(moved) != digest
    (src / "y.jsonl").rename(src / "z.jsonl")
    assert content_digest(src) != digest
