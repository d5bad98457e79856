"""The engine interface without a model: the registry, what each engine resolves a base and adapters to (the
llama.cpp engine's GGUF choices and refusals), the body it sends llama.cpp, and the one bearer check every app
shares."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from tunepipe.schemas.serve import ServeConfig
from tunepipe.tasks.core.environment import load_environment
from tunepipe.tasks.serving.engines import ENGINES, engine_named
from tunepipe.tasks.serving.protocol import APIError
from tunepipe.tasks.serving.settings import ServeSettingsError, resolve_serve_config


def touch(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"GGUF" + path.name.encode())
    return path


@pytest.fixture
def export_dir(tmp_path) -> Path:
    """An export artifact's gguf output, as export.targets: [gguf] lays it out."""
    art = tmp_path / "export"
    for name in ("model-f16.gguf", "model-q8_0.gguf", "base-f16.gguf", "lora-all.gguf", "imatrix.gguf"):
        touch(art / "gguf" / "all" / name)
    return art


def resolve(**fields) -> ServeConfig:
    return resolve_serve_config(ServeConfig.model_validate({"engine": "llamacpp", **fields}), load_environment("cpu"))


def test_every_engine_is_registered_under_its_name():
    assert set(ENGINES) == {"embedded", "vllm", "llamacpp"}
    assert {name: engine_named(name).name for name in ENGINES} == {name: name for name in ENGINES}
    assert engine_named("llamacpp").capabilities.runtime_adapters is False
    assert engine_named("vllm").capabilities.runtime_adapters is True
    with pytest.raises(KeyError, match="choose one of"):
        engine_named("tgi")


def test_llamacpp_serves_the_export_gguf_asked_for(export_dir):
    assert resolve(base=str(export_dir)).base == str(export_dir / "gguf/all/model-f16.gguf")  # faithful by default
    assert resolve(base=str(export_dir), llamacpp={"gguf_type": "q8_0"}).base == str(export_dir / "gguf/all/model-q8_0.gguf")
    with pytest.raises(ServeSettingsError, match=r"no model-q4_k_m.gguf; this export has \['f16', 'q8_0'\]"):
        resolve(base=str(export_dir), llamacpp={"gguf_type": "q4_k_m"})
    single = touch(export_dir.parent / "single" / "model-q4_k_m.gguf")
    assert resolve(base=str(single.parent)).base == str(single)  # the only one there


def test_llamacpp_adapters_are_gguf_loras_on_the_unmerged_base(export_dir, tmp_path):
    config = resolve(base=str(export_dir), lora_modules={"bot": str(export_dir / "gguf/all")})
    # a LoRA applies to the base it was trained on, never to the merged model (that would apply it twice)
    assert config.base == str(export_dir / "gguf/all/base-f16.gguf")
    assert config.lora_modules == {"bot": str(export_dir / "gguf/all/lora-all.gguf")}
    peft = tmp_path / "peft"
    peft.mkdir()
    (peft / "adapter_config.json").write_text(json.dumps({"r": 8}))
    with pytest.raises(ServeSettingsError, match=r"adapter bot=.*GGUF files .*export.targets: \[gguf\].*--engine embedded or vllm"):
        resolve(base=str(export_dir), lora_modules={"bot": str(peft)})


def test_llamacpp_refuses_a_base_that_is_not_a_gguf(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(ServeSettingsError, match="no GGUF model here"):
        resolve(base=str(tmp_path))
    with pytest.raises(ServeSettingsError, match="serves GGUF files"):
        resolve(base=str(tmp_path / "config.json"))


def test_the_body_llamacpp_gets_means_what_openai_means():
    from tunepipe.tasks.serving.engines.llamacpp import adapt_request

    body = adapt_request({"model": "m", "messages": [], "temperature": None, "max_completion_tokens": 7}, "chat")
    # llama.cpp's own defaults (temperature 0.8, top_k 40, min_p 0.05, repeat_penalty 1.1) would change every answer
    assert body == {"model": "m", "messages": [], "temperature": 1.0, "top_p": 1.0, "top_k": 0, "min_p": 0.0,
                    "repeat_penalty": 1.0, "max_tokens": 7}
    assert adapt_request({"top_k": 5, "repeat_penalty": 1.3}, "chat")["top_k"] == 5
    schema = {"type": "object"}
    assert adapt_request({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": schema}}},
                         "chat")["response_format"] == {"type": "json_object", "schema": schema}
    for body, endpoint, param in (({"prompt": [1, 2]}, "completions", "prompt"),
                                  ({"messages": [{"role": "user", "content": "hi", "name": "ann"}]}, "chat", "messages[0].name")):
        with pytest.raises(APIError) as err:  # llama_cpp.server would answer 422, or drop the name without a word
            adapt_request(body, endpoint)
        assert err.value.status == 400 and err.value.param == param
    assert adapt_request({"prompt": "hi"}, "completions")["prompt"] == "hi"
    for seed in (-1, 2**32, "7"):
        with pytest.raises(APIError) as err:
            adapt_request({"seed": seed}, "chat")
        assert err.value.status == 400 and err.value.param == "seed"


def test_one_bearer_check_guards_every_v1_route_before_the_body_is_read():
    from tunepipe.tasks.serving.app import new_app

    app = new_app("t", ServeConfig(), api_key="k")
    seen = []

    @app.post("/v1/echo")
    async def echo(body: dict):
        seen.append(body)
        return body

    @app.get("/health")
    async def health():
        return "ok"

    client = TestClient(app)
    refused = client.post("/v1/echo", content=b"not json", headers={"Authorization": "Bearer wrong"})
    assert refused.status_code == 401 and refused.json()["error"]["type"] == "authentication_error"
    assert client.post("/v1/echo", json={"a": 1}).status_code == 401 and not seen
    assert client.post("/v1/echo", json={"a": 1}, headers={"Authorization": "Bearer k"}).json() == {"a": 1}
    assert client.get("/health").status_code == 200  # probes carry no key
    open_app = new_app("t", ServeConfig(), api_key=None)
    open_app.add_api_route("/v1/echo", echo, methods=["POST"])
    assert TestClient(open_app).post("/v1/echo", json={"b": 2}).json() == {"b": 2}  # no key set: no check
