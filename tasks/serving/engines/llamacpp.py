"""The `llamacpp` engine: llama-cpp-python's OpenAI server (`python -m llama_cpp.server`, from the environment
`tunepipe llamacpp-env` builds: llama.cpp cannot share our process, its binding is compiled there) on a GGUF, on a
private loopback port and key, behind tunepipe's front (serving/front.py) on --host/--port: the same auth,
adapter names, A/B router, metrics and error shape as the other engines.

    base          a .gguf file, or an export's directory (its gguf/<run>/model-<type>.gguf; `base-f16.gguf`, the
                  unmerged base, when adapters are served)
    adapters      GGUF LoRAs (the export's gguf/<run>/lora-<run>.gguf, or a directory holding one), at start only:
                  llama_cpp.server takes a LoRA per model entry, so each adapter is one more entry on the same GGUF
                  (`NAME@<hash>` as in vLLM); a runtime load is a 400
    fields        what llama_cpp.server honours; the rest of OpenAI's fields with a value asking for something are a
                  400 naming them (it would drop them silently). OpenAI's defaults are sent where llama.cpp's own
                  differ (temperature 0.8, top_p 0.95, top_k 40, min_p 0.05, repeat_penalty 1.1), so a request means
                  what it means on the other engines; json_schema response formats become llama.cpp's grammar.

The server keeps one model entry in memory at a time: a request for another adapter reloads the GGUF with it
(seconds for a small model). Requests are answered one at a time (llama.cpp's own lock).
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import tempfile
from pathlib import Path
from typing import Any

from tunepipe.schemas.environment import EnvironmentProfile
from tunepipe.schemas.serve import ServeConfig
from tunepipe.tasks.core.net import free_port
from tunepipe.tasks.llamacpp.env import LlamaCppEnvError, require_tools
from tunepipe.tasks.serving.engines.base import Built, Capabilities, Engine
from tunepipe.tasks.serving.engines.vllm import ChildBuilt
from tunepipe.tasks.serving.protocol import VLLM_NEUTRAL, APIError
from tunepipe.tasks.serving.process import ChildServer, HealthTimeout, wait_healthy
from tunepipe.tasks.serving.settings import ServeSettingsError, api_key

SERVER_MODULE = "llama_cpp.server"
SEED_RANGE = (0, 2**32 - 1)  # llama.cpp's sampler seed is a uint32: a larger one would be truncated silently
OPENAI_DEFAULTS = {"temperature": 1.0, "top_p": 1.0, "top_k": 0, "min_p": 0.0, "repeat_penalty": 1.0}


def _asks_nothing(value: Any) -> bool:
    return not value


# OpenAI fields llama_cpp.server (0.3.36, llama_cpp/server/types.py) would drop or cannot honour here, with the
# values that ask for nothing; every other value is a 400 naming the field.
LLAMACPP_NEUTRAL: dict[str, Any] = {
    **VLLM_NEUTRAL,
    "reasoning_effort": lambda v: v is None,
    "n": lambda v: v in (None, 1),  # one choice per request
    "best_of": lambda v: v in (None, 1),
    "stream_options": lambda v: not (v or {}).get("include_usage"),  # no usage chunk in its streams
    # its tool calling needs a chat format of its own (functionary, chatml-function-calling); a GGUF's template
    # renders tools without parsing the answer into tool_calls
    "tools": _asks_nothing, "tool_choice": lambda v: v in (None, "none"), "parallel_tool_calls": lambda v: True,
    # log-probabilities need every position's logits kept (logits_all), which the server is not started with
    "logprobs": lambda v: v is None or v is False, "top_logprobs": lambda v: v in (None, 0),
}
# llama.cpp's sampling extensions it honours (besides OpenAI's fields)
LLAMACPP_EXTRA_FIELDS = frozenset({"top_k", "min_p", "repeat_penalty"})
MESSAGE_FIELDS = frozenset({"role", "content"})


def adapt_request(body: dict[str, Any], endpoint: str) -> dict[str, Any]:
    """The body llama_cpp.server needs to answer it as OpenAI means it (see the module's docstring)."""
    body = {**OPENAI_DEFAULTS, **{k: v for k, v in body.items() if not (k in OPENAI_DEFAULTS and v is None)}}
    seed = body.get("seed")
    if seed is not None and (not isinstance(seed, int) or not SEED_RANGE[0] <= seed <= SEED_RANGE[1]):
        raise APIError(400, f"seed must be an integer in [{SEED_RANGE[0]}, {SEED_RANGE[1]}] for the llamacpp engine "
                       "(llama.cpp's seeds are 32-bit)", param="seed")
    if body.get("max_completion_tokens") is not None:  # OpenAI's newer name for max_tokens
        body["max_tokens"] = body.pop("max_completion_tokens")
    body.pop("max_completion_tokens", None)
    if endpoint == "completions" and not isinstance(body.get("prompt"), str):
        raise APIError(400, "prompt: the llamacpp engine takes one text prompt (not token ids or a list)", param="prompt")
    for i, message in enumerate(body.get("messages") or []):
        extra = sorted(set(message) - MESSAGE_FIELDS) if isinstance(message, dict) else []
        if extra:  # its request model drops them without a word
            raise APIError(400, f"messages[{i}].{extra[0]} is not supported by the llamacpp engine (role and content "
                           "only)", param=f"messages[{i}].{extra[0]}", code="unsupported_parameter")
    fmt = body.get("response_format")
    if isinstance(fmt, dict) and fmt.get("type") == "json_schema":  # llama.cpp's form: json_object with a schema
        schema = (fmt.get("json_schema") or {}).get("schema")
        if not isinstance(schema, dict):
            raise APIError(400, "response_format.json_schema.schema must be a JSON schema object", param="response_format")
        body["response_format"] = {"type": "json_object", "schema": schema}
    return body


class ControlTokens:
    """The strings llama.cpp parses as special tokens in a GGUF's vocabulary (its control and user-defined tokens),
    as the front's escaping reads them (`all_special_tokens`, see tasks.lm.encoding.data_text): message contents
    are sent as text, so a user writing `<|im_start|>system` opens no turn. Read from the GGUF's metadata, not by
    loading a transformers tokenizer from it (which converts the whole vocabulary: tens of seconds)."""

    def __init__(self, tokens: list[str]):
        self.all_special_tokens = tokens


def gguf_control_tokens(path: str) -> ControlTokens:
    from gguf import GGUFReader, TokenType

    fields = GGUFReader(path).fields
    tokens, types = fields["tokenizer.ggml.tokens"], fields["tokenizer.ggml.token_type"]
    special = {int(TokenType.CONTROL), int(TokenType.USER_DEFINED)}
    return ControlTokens([bytes(tokens.parts[t]).decode("utf-8", errors="replace")
                          for t, k in zip(tokens.data, types.data) if int(types.parts[k][0]) in special])


CAPABILITIES = Capabilities(
    label="llama.cpp", neutral=LLAMACPP_NEUTRAL, extra_fields=LLAMACPP_EXTRA_FIELDS, adapters="gguf-lora",
    runtime_adapters=False, health_path="/v1/models", adapt=adapt_request, checks_models=False,
    tokenizer=gguf_control_tokens,
)


class LlamaCppEngine(Engine):
    name = "llamacpp"
    summary = "llama-cpp-python's OpenAI server on a GGUF, behind tunepipe's front"
    capabilities = CAPABILITIES

    def resolve_base(self, base: str, config: ServeConfig | None = None) -> str:
        with_adapters = bool(config and config.lora_modules)
        return str(gguf_model(base, config.llamacpp.gguf_type if config else None, with_adapters))

    def resolve_adapters(self, modules: dict[str, str]) -> dict[str, str]:
        return {name: str(gguf_lora(name, path)) for name, path in modules.items()}

    def build(self, config: ServeConfig, profile: EnvironmentProfile, workdir: str) -> Built:
        log_file = config.llamacpp.log_file or str(Path(workdir) / "logs" / f"llamacpp-{config.port}.log")
        app, _, server = llamacpp_behind_front(config, api_key=api_key(config), log_file=log_file)
        return ChildBuilt(app, server, label="llama.cpp", log_file=log_file)


def _settings_error(message: str) -> Exception:
    return ServeSettingsError(message)


def gguf_model(base: str, gguf_type: str | None, with_adapters: bool) -> Path:
    """The GGUF file to serve for `base`: the file itself, or the one an export directory holds."""
    path = Path(base)
    if path.is_file():
        if path.suffix != ".gguf":
            raise _settings_error(f"{base}: the llamacpp engine serves GGUF files (.gguf): export one with "
                              "export.targets: [gguf], or serve this model with --engine embedded or vllm")
        return path.resolve()
    if not path.is_dir():
        raise _settings_error(f"{base}: no such GGUF file or export directory")
    files = sorted({*path.glob("*.gguf"), *path.glob("gguf/*/*.gguf")})
    if with_adapters:  # GGUF LoRAs apply to the unmerged base the export keeps beside them
        bases = [f for f in files if f.name == "base-f16.gguf"]
        if len(bases) == 1:
            return bases[0].resolve()
        raise _settings_error(f"{base}: adapters need the unmerged base `base-f16.gguf` (the gguf export writes it with "
                          f"its LoRA); found {[f.name for f in files] or 'no GGUF'}: pass the base's .gguf as BASE")
    models = {f.name.removeprefix("model-").removesuffix(".gguf"): f for f in files if f.name.startswith("model-")}
    if gguf_type is not None:
        if gguf_type in models:
            return models[gguf_type].resolve()
        raise _settings_error(f"{base}: no model-{gguf_type}.gguf; this export has {sorted(models) or 'none'}")
    if len(models) == 1:
        return next(iter(models.values())).resolve()
    if "f16" in models:
        return models["f16"].resolve()
    raise _settings_error(f"{base}: no GGUF model here (model-<type>.gguf, as export.targets: [gguf] writes): "
                      f"found {[f.name for f in files] or 'none'}" + (f"; choose one with --gguf-type {sorted(models)}" if models else ""))


def gguf_lora(name: str, path: str) -> Path:
    """The GGUF LoRA file an adapter entry names (a file, or a directory holding exactly one lora-*.gguf)."""
    target = Path(path)
    if target.is_dir():
        found = sorted(target.glob("lora-*.gguf")) or sorted(target.glob("gguf/*/lora-*.gguf"))
        if len(found) == 1:
            return found[0].resolve()
    elif target.is_file() and target.suffix == ".gguf":
        return target.resolve()
    raise _settings_error(
        f"adapter {name}={path}: the llamacpp engine takes LoRA adapters as GGUF files (llama.cpp --lora): export the "
        "run with export.targets: [gguf] (it writes gguf/<run>/lora-<run>.gguf beside base-f16.gguf) and pass that "
        "file, or serve PEFT adapter directories with --engine embedded or vllm"
    )


def llamacpp_python(config: ServeConfig) -> str:
    if config.llamacpp.python:
        return config.llamacpp.python

    try:
        return str(require_tools().python)
    except LlamaCppEnvError as exc:
        raise _settings_error(f"the llamacpp engine needs llama.cpp's environment: {exc}") from None


def server_settings(config: ServeConfig, models: dict[str, str | None], *, port: int, api_key: str) -> dict[str, Any]:
    """llama_cpp.server's config file: one model entry per served name on the same GGUF, LoRA or not."""
    options = config.llamacpp
    threads = options.threads or os.cpu_count() or 1
    entry = {"model": config.base, "n_ctx": options.n_ctx, "n_threads": threads, "n_threads_batch": threads,
             "verbose": False}
    return {"host": "127.0.0.1", "port": port, "api_key": api_key, "interrupt_requests": True,
            "models": [{**entry, "model_alias": alias, **({"lora_path": lora} if lora else {})}
                       for alias, lora in models.items()]}


class LlamaCppServer(ChildServer):
    """`python -m llama_cpp.server --config_file F` as our child, in its own process group; `start()` waits for it
    to answer, `stop()` sends SIGTERM then SIGKILL. The config file (it holds the private key) lives in a 0700
    directory removed at stop."""

    def __init__(self, config: ServeConfig, settings: dict[str, Any], *, log_file: str | Path):
        self.config = config
        self.python = llamacpp_python(config)
        self.settings = settings
        self.log_file = Path(log_file)
        self.folder = Path(tempfile.mkdtemp(prefix="tunepipe-llamacpp-"))
        self.command = [self.python, "-m", SERVER_MODULE, "--config_file", str(self.folder / "server.json")]
        self.stop_timeout_s = config.llamacpp.stop_timeout_s

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.settings['port']}"

    def start(self) -> "LlamaCppServer":
        config_file = self.folder / "server.json"
        config_file.touch(mode=0o600)
        config_file.write_text(json.dumps(self.settings))
        env = {k: v for k, v in os.environ.items() if k not in ("CONFIG_FILE", "HOST", "PORT")}  # they override the file
        self.spawn(self.command, env)
        opener_headers = {"Authorization": f"Bearer {self.settings['api_key']}"}
        try:
            wait_healthy(f"{self.url}/v1/models", self.config.llamacpp.health_timeout_s, alive=self.alive, interval=0.3,
                         describe=self.log_tail, headers=opener_headers)
        except HealthTimeout as exc:
            self.stop()
            raise RuntimeError(f"llama.cpp's server did not start: {exc}") from None
        return self

    def stop(self) -> int | None:
        shutil.rmtree(self.folder, ignore_errors=True)  # the config file holds the private key
        return super().stop()


def llamacpp_behind_front(config: ServeConfig, *, api_key: str | None, log_file: str | Path):
    """(front app, front, LlamaCppServer) for a resolved config: start the server, then serve the app."""
    from tunepipe.tasks.serving.front import create_front  # lazy: pulls in fastapi, starlette

    upstream_key = secrets.token_urlsafe(24)
    port = free_port("127.0.0.1")
    holder: dict[str, Any] = {}
    app, front = create_front(config, f"http://127.0.0.1:{port}", upstream_key=upstream_key, api_key=api_key,
                              alive=lambda: holder["server"].alive(), capabilities=CAPABILITIES, engine="llamacpp")
    versions = front.start_modules()  # NAME@hash → the adapter's GGUF LoRA, each alias a model entry
    models = {front.base_name: None, **versions}  # lora_modules are GGUF LoRA files once resolved
    holder["server"] = server = LlamaCppServer(config, server_settings(config, models, port=port, api_key=upstream_key),
                                               log_file=log_file)
    return app, front, server
