"""What `tunepipe serve` serves: the registry's current adapters, the profile's limits, the flags over both;
and the A/B router's split and log."""

from __future__ import annotations

import argparse
import json
from collections import Counter
from pathlib import Path

import pytest
from pydantic import ValidationError

from tunepipe.schemas.registry import Lineage
from tunepipe.schemas.serve import RouterConfig, ServeConfig
from tunepipe.tasks.core.registry import AdapterRegistry
from tunepipe.tasks.core.environment import load_environment
from tunepipe.tasks.serving.settings import ServeSettingsError, api_key, choose_engine, resolve_serve_config, registry_serving, vllm_rank
from tunepipe.tasks.serving.router import WeightedRouter, read_log


def write_adapter(path: Path, r: int, **extra) -> Path:
    path.mkdir(parents=True)
    (path / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": r, **extra}))
    (path / "adapter_model.safetensors").write_bytes(f"weights-{path.name}-{r}".encode())
    return path


@pytest.fixture
def registry(tmp_path) -> AdapterRegistry:
    reg = AdapterRegistry(tmp_path / "registry")
    for name, r, rank_pattern in (("notes", 8, {}), ("triage", 4, {"q_proj": 32})):
        v1 = reg.register(name, write_adapter(tmp_path / "src" / f"{name}1", r, rank_pattern=rank_pattern),
                          Lineage(base_model=str(tmp_path / "base")))
        reg.promote(name, v1)
    reg.register("notes", write_adapter(tmp_path / "src" / "notes2", 8), Lineage(base_model=str(tmp_path / "base")))
    reg.register("draft", write_adapter(tmp_path / "src" / "draft", 8), Lineage(base_model=str(tmp_path / "base")))  # no alias
    return reg


def test_registry_serving_serves_what_the_alias_points_at_on_the_common_base(registry, tmp_path):
    served = registry_serving(registry.root)
    assert served.base == str(tmp_path / "base")
    assert sorted(served.adapters) == ["notes", "triage"]  # `draft` has no prod alias
    assert served.adapters["notes"] == registry.resolve("notes@prod").path and served.adapters["notes"].endswith("/notes/1")
    assert served.max_rank == 32  # triage's rank_pattern
    assert served.root == str((tmp_path / "registry").resolve())

    registry.promote("notes", 2)
    assert registry_serving(registry.root).adapters["notes"].endswith("/notes/2")


def test_registry_serving_refuses_adapters_of_two_bases(registry, tmp_path):
    other = registry.register("other", write_adapter(tmp_path / "src" / "other", 8), Lineage(base_model="org/another-base"))
    registry.promote("other", other)
    with pytest.raises(ServeSettingsError, match="different bases"):
        registry_serving(registry.root)


def test_flags_override_the_registry_and_the_profile_fills_the_rest(registry, tmp_path):
    served = registry_serving(registry.root)
    cpu = load_environment("cpu")
    resolved = resolve_serve_config(ServeConfig(), cpu, served)
    assert resolved.engine == "embedded" and resolved.base == served.base and resolved.lora_modules == served.adapters
    assert resolved.max_lora_rank == max(cpu.serving.max_lora_rank, 32)
    assert resolved.allowed_adapter_dirs == [served.root]  # deploy hot-loads from the registry

    mine = write_adapter(tmp_path / "mine", 4)
    explicit = resolve_serve_config(ServeConfig(base="org/base", lora_modules={"mine": str(mine)}, max_loras=2), cpu, served)
    assert explicit.base == "org/base" and explicit.lora_modules == {"mine": str(mine)} and explicit.max_loras == 2

    with pytest.raises(ServeSettingsError, match="no base model to serve"):
        resolve_serve_config(ServeConfig(), cpu)


def test_engine_auto_picks_vllm_only_where_its_environment_exists(tmp_path, monkeypatch):
    monkeypatch.setenv("TUNEPIPE_CACHE", str(tmp_path / "cache"))
    vllm_profile = load_environment("serve-vllm")  # vllm_env cuda: not built in this cache
    assert choose_engine(ServeConfig(), vllm_profile) == "embedded"
    assert choose_engine(ServeConfig(), load_environment("cpu")) == "embedded"
    python = tmp_path / "vllm-env" / "bin" / "python"
    python.parent.mkdir(parents=True)
    python.write_text("")
    assert choose_engine(ServeConfig(vllm={"python": str(python)}), vllm_profile) == "vllm"
    assert choose_engine(ServeConfig(engine="vllm"), load_environment("cpu")) == "vllm"  # asked for explicitly
    managed = tmp_path / "cache" / "vllm" / "cpu-0.32.0" / "bin" / "python"  # `tunepipe vllm-env cpu` built it
    managed.parent.mkdir(parents=True)
    managed.write_text("")
    assert choose_engine(ServeConfig(), load_environment("serve-vllm-cpu")) == "vllm"
    assert [vllm_rank(r) for r in (1, 2, 8, 9, 300, 512)] == [1, 8, 8, 16, 320, 512]
    with pytest.raises(ServeSettingsError):
        vllm_rank(513)


def test_config_validation_and_api_key_env(tmp_path, monkeypatch):
    with pytest.raises(ValidationError, match="at least two versions"):
        RouterConfig(name="bot", versions={"a": 1.0}, log_path="x.jsonl")
    with pytest.raises(ValidationError, match=r"weights must be finite and > 0 .*\['b'\]"):
        RouterConfig(name="bot", versions={"a": 1.0, "b": 0}, log_path="x.jsonl")
    # nan compared false with 0 and inf swallowed the other arm: both sent all traffic to one version
    # (every config refuses non-finite numbers itself, naming the field: `versions.b ... finite number`)
    for weird in (float("nan"), float("inf"), float("-inf")):
        with pytest.raises(ValidationError, match=r"finite and > 0 .*\['b'\]|versions\.b\n.*finite number"):
            RouterConfig(name="bot", versions={"a": 1.0, "b": weird}, log_path="x.jsonl")
    with pytest.raises(ValidationError, match="not in lora_modules"):
        ServeConfig(lora_modules={"a": "/x"}, router={"name": "bot", "versions": {"a": 1, "c": 1}, "log_path": "x"})
    with pytest.raises(ValidationError, match="adapter names"):
        ServeConfig(lora_modules={"a b": "/x"})
    with pytest.raises(ValidationError, match="one of python, executable, image"):
        ServeConfig(vllm={"python": "/p", "image": "i"})
    monkeypatch.setenv("MY_KEY", "s3cret")
    assert api_key(ServeConfig(api_key_env="MY_KEY")) == "s3cret"
    with pytest.raises(ServeSettingsError, match="NOT_SET_HERE"):
        api_key(ServeConfig(api_key_env="NOT_SET_HERE"))


def test_serve_flags_become_a_config_over_the_registry(registry, tmp_path):
    from tunepipe.flows.cli.serve import add_parsers, serve_config_from_args

    parser = argparse.ArgumentParser()
    add_parsers(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["serve", "--registry", registry.root, "--workdir", str(tmp_path / "w"), "--port", "9001",
                              "--max-lora-rank", "64", "--router", "bot=notes:0.9,triage:0.1"])
    config, env, workdir = serve_config_from_args(args)
    assert config.port == 9001 and config.max_lora_rank == 64 and sorted(config.lora_modules) == ["notes", "triage"]
    assert config.router.versions == {"notes": 0.9, "triage": 0.1}
    assert config.router.log_path == str((tmp_path / "w" / "logs" / "ab-bot.jsonl").resolve())
    with pytest.raises(SystemExit):
        parser.parse_args(["serve", "--lora-modules", "no-equals-sign"])


def test_router_splits_by_weight_sticks_to_users_and_logs_each_request(tmp_path):
    router = WeightedRouter(RouterConfig(name="bot", versions={"v1": 0.8, "v2": 0.2}, log_path=str(tmp_path / "ab.jsonl"), seed=7))
    counts = Counter(router.choose().version for _ in range(2000))
    assert 0.76 < counts["v1"] / 2000 < 0.84  # 80/20 within sampling error (sd ~0.009)
    by_user = {u: router.choose(u).version for u in map(str, range(500))}
    assert all(router.choose(u).version == v for u, v in list(by_user.items())[:50])
    assert 0.74 < Counter(by_user.values())["v1"] / 500 < 0.86

    assignment = router.choose("alice")
    router.record(assignment, endpoint="/v1/chat/completions", status="ok", prompt_tokens=5, completion_tokens=7)
    [line] = read_log(tmp_path / "ab.jsonl")
    assert line["version"] == assignment.version and line["user"] == "alice" and line["completion_tokens"] == 7
    assert line["request_id"] == assignment.request_id and line["latency_ms"] >= 0


def test_api_key_is_a_reference_in_configs_and_the_cli_flag_keeps_working(monkeypatch):
    import argparse

    from tunepipe.flows.cli.serve import CLI_API_KEY_ENV, _overrides, add_parsers

    with pytest.raises(ValueError, match="literal credential"):
        ServeConfig(api_key="plain-key")
    monkeypatch.setenv("MY_SERVE_KEY", "from-env-123")
    assert api_key(ServeConfig(api_key="${MY_SERVE_KEY}")) == "from-env-123"
    with pytest.raises(ServeSettingsError, match="api_key: the environment variable UNSET_SERVE_KEY is not set"):
        api_key(ServeConfig(api_key="${UNSET_SERVE_KEY}"))
    monkeypatch.delenv(CLI_API_KEY_ENV, raising=False)
    # The flags as the real parser leaves them, with only --api-key given.
    parser = argparse.ArgumentParser()
    add_parsers(parser.add_subparsers(dest="command"))
    fields = _overrides(parser.parse_args(["serve", "--api-key", "cli-key-456"]), "/tmp")
    assert fields == {"api_key": "${TUNEPIPE_SERVE_API_KEY}"} and api_key(ServeConfig(**fields)) == "cli-key-456"
