"""The cache key changes exactly when config, inputs, environment payload or code change."""

from __future__ import annotations

import shutil

from tunepipe.tasks.core.fingerprint import code_identity, content_digest, stage_key
from tunepipe.tasks.core.stage import identify
from tests.helpers.toy_stages import Consumer, Producer, ToyConfig
from tunepipe.schemas.manifest import ArtifactRef

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


def _write(path, text):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def _fake_stages(root):
    """A package whose stage `a` reaches `shared` through a lazy import and an entry-point string,
    and whose stage `b` reaches neither."""
    _write(root / "fakepipe" / "__init__.py", "")
    _write(root / "fakepipe" / "shared.py", "import yaml\nX = 1\n")
    _write(root / "fakepipe" / "job.py", "def run():\n    from fakepipe.shared import X\n    return X\n")
    _write(root / "fakepipe" / "a.py", 'ENTRYPOINT = "fakepipe.job:run"\n')
    _write(root / "fakepipe" / "b.py", "import json\nY = 2\n")


def test_code_identity_follows_the_import_closure(tmp_path, monkeypatch):
    _fake_stages(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    a, b = code_identity("fakepipe.a"), code_identity("fakepipe.b")
    assert {"fakepipe", "fakepipe.a", "fakepipe.job", "fakepipe.shared"} <= set(a.modules)
    assert "fakepipe.shared" not in b.modules
    # Third-party imports of the closure enter with their versions; the stdlib does not.
    assert "pyyaml" in a.libraries and "pyyaml" not in b.libraries and b.libraries == {}

    (tmp_path / "fakepipe" / "shared.py").write_text("import yaml\nX = 2\n")
    assert code_identity("fakepipe.a").version != a.version
    assert code_identity("fakepipe.b").version == b.version


def test_comments_and_docstrings_do_not_change_the_code_identity(tmp_path, monkeypatch):
    _fake_stages(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    before = code_identity("fakepipe.a").version
    (tmp_path / "fakepipe" / "shared.py").write_text('"""Now documented."""\nimport yaml  # why\n\nX = 1  # one\n')
    assert code_identity("fakepipe.a").version == before


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
