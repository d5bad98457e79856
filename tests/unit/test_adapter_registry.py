"""The adapter registry: versions, aliases with history, references, idempotence, locking, fsspec roots."""

from __future__ import annotations

import json
import multiprocessing
from pathlib import Path

import pytest

from tunepipe.schemas.registry import Lineage
from tunepipe.tasks.core.registry import AdapterRegistry, RegistryError, parse_ref


def adapter(path: Path, content: str) -> Path:
    """A directory shaped like a PEFT adapter (the registry copies files; it never loads them)."""
    path.mkdir(parents=True, exist_ok=True)
    (path / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 4, "tag": content}))
    (path / "adapter_model.safetensors").write_bytes(content.encode() * 10)
    (path / "tokenizer").mkdir(exist_ok=True)
    (path / "tokenizer" / "vocab.json").write_text("{}")
    return path


def test_versions_aliases_and_references(tmp_path):
    registry = AdapterRegistry(tmp_path / "reg")
    v1 = registry.register("notes", adapter(tmp_path / "a1", "one"), Lineage(data_key="d1", base_model="base", run="all"))
    v2 = registry.register("notes", adapter(tmp_path / "a2", "two"), Lineage(data_key="d2", base_model="base"))
    assert (v1, v2) == (1, 2)
    assert registry.register("notes", tmp_path / "a1") == 1, "identical content is the existing version"
    assert registry.promote("notes", 1) is None
    assert registry.promote("notes", 2) == 1
    assert registry.promote("notes", 2) == 2  # promoting the current version is a no-op

    assert registry.resolve("notes").version == 2  # bare name: latest
    assert registry.resolve("notes@1").lineage.data_key == "d1"
    prod = registry.resolve("notes@prod")
    assert prod.version == 2 and prod.base_model == "base"
    assert Path(prod.path, "tokenizer", "vocab.json").is_file() and Path(prod.path).is_relative_to(tmp_path / "reg")
    assert registry.serving() == {"notes": prod}
    assert registry.list()["notes"].alias_history == {"prod": [1, 2]}

    back = registry.rollback("notes")
    assert back.version == 1 and registry.resolve("notes@prod").version == 1
    with pytest.raises(RegistryError, match="nothing to roll back to"):
        registry.rollback("notes")
    actions = [(e.action, e.version, e.previous) for e in registry.index().events]
    assert actions == [("register", 1, None), ("register", 2, None), ("promote", 1, None), ("promote", 2, 1), ("rollback", 1, 2)]

    registry.set_alias("notes", "canary", 2)
    assert registry.resolve("notes@canary").version == 2 and registry.serving("canary")["notes"].version == 2
    registry.unset_alias("notes", "canary")
    assert "canary" not in registry.list()["notes"].aliases


def test_errors_name_what_exists(tmp_path):
    registry = AdapterRegistry(tmp_path / "reg")
    registry.register("notes", adapter(tmp_path / "a1", "one"))
    with pytest.raises(RegistryError, match=r"no such version \(versions: \[1\]\)"):
        registry.resolve("notes@7")
    with pytest.raises(RegistryError, match="no such alias"):
        registry.resolve("notes@prod")
    with pytest.raises(RegistryError, match=r"no adapter named 'other' \(registered: \['notes'\]\)"):
        registry.resolve("other")
    with pytest.raises(RegistryError, match="never reads as a version"):
        registry.set_alias("notes", "3", 1)
    with pytest.raises(RegistryError, match="not a PEFT adapter directory"):
        registry.register("notes", tmp_path)
    with pytest.raises(RegistryError):
        parse_ref("bad name@1")
    assert parse_ref("notes@prod") == ("notes", "prod") and parse_ref("notes") == ("notes", None)


def test_index_is_rewritten_atomically_and_survives_a_reopen(tmp_path):
    root = tmp_path / "reg"
    AdapterRegistry(root).register("notes", adapter(tmp_path / "a1", "one"))
    assert sorted(p.name for p in root.iterdir()) == [".lock", "adapters", "index.json"]  # no temp file left behind
    reopened = AdapterRegistry(root)
    assert reopened.resolve("notes@1").path == str(root.resolve() / "adapters/notes/1")


def _register_many(root: str, src: str, tag: str) -> None:
    registry = AdapterRegistry(root)
    for i in range(5):
        registry.register("notes", adapter(Path(src) / f"{tag}{i}", f"{tag}{i}"))


def test_concurrent_writers_from_several_processes_never_lose_a_version(tmp_path):
    root = str(tmp_path / "reg")
    # spawn, not fork: earlier tests leave threads (Prefect, torch) whose locks a forked child
    # inherits mid-use; the workers failed that way when this ran after them in the full suite.
    context = multiprocessing.get_context("spawn")
    workers = [context.Process(target=_register_many, args=(root, str(tmp_path / "src"), tag)) for tag in "ab"]
    for w in workers:
        w.start()
    for w in workers:
        w.join(60)
    assert [w.exitcode for w in workers] == [0, 0]
    versions = AdapterRegistry(root).list()["notes"].versions
    assert sorted(v.version for v in versions) == list(range(1, 11))
    assert len({v.digest for v in versions}) == 10


def test_fsspec_root_and_local_copies(tmp_path):
    registry = AdapterRegistry("memory://tunepipe-test-registry", cache_dir=tmp_path / "cache")
    version = registry.register("notes", adapter(tmp_path / "a1", "one"), Lineage(base_model="base"))
    registry.promote("notes", version)
    entry = registry.serving()["notes"]
    assert entry.path == "memory:///tunepipe-test-registry/adapters/notes/1"
    local = Path(registry.local_path(entry))
    assert local.is_relative_to(tmp_path / "cache")
    assert (local / "adapter_model.safetensors").read_bytes() == b"one" * 10 and (local / "tokenizer/vocab.json").exists()
    assert AdapterRegistry("memory://tunepipe-test-registry").resolve("notes@prod").version == 1
