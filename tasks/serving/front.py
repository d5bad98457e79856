"""tunepipe's front in front of an engine's own OpenAI server (vLLM, llama.cpp): the same OpenAI API, forwarded
(streaming included), plus what the engine does not do for us. What differs between engines (the fields they
honour, runtime adapter loads, their health route) is the engine's `Capabilities` (engines/base.py).

    client ──> front (tunepipe serve's --host/--port) ──> vLLM (127.0.0.1, a private port and key)

- **Confinement.** vLLM loads any adapter directory it can read. `POST /v1/load_lora_adapter`
  through the front is refused with 403 unless the path (symlinks followed) lies inside the
  allowed directories (the registry's is always one), as the embedded engine refuses it. vLLM
  itself listens on loopback with a key only the front knows, so nothing goes around the front.
- **Immutable served names.** vLLM caches prefixes per adapter name, and reloading changed weights
  under a name it has seen can reuse stale blocks (vLLM issue #42125). So vLLM never sees a name
  twice for different weights: an adapter is loaded into vLLM as `NAME@<hash of its files>`, and
  `NAME` is an alias the front moves. Loading `NAME` again with other weights loads the new
  version under its own name and moves the alias; unloading `NAME` drops the alias and unloads
  the version nothing else points at. `/v1/models` lists the aliases (root: the adapter's
  directory) and the versions.
- **Online A/B.** `--router NAME=A:W,B:W`: a request for NAME is sent to one of the versions
  (weighted, sticky per OpenAI `user`), and logged as the embedded engine logs it.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import secrets
import time
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, AsyncIterator

from fastapi import FastAPI, Request
from fastapi.responses import (
    PlainTextResponse,
    Response,
    StreamingResponse,
)
from tunepipe.schemas.serve import ServeConfig
from tunepipe.tasks.core.net import free_port
from tunepipe.tasks.lm.encoding import data_messages
from tunepipe.tasks.lm.modeling import load_tokenizer
from tunepipe.tasks.serving.app import new_app
from tunepipe.tasks.serving.engines.base import VLLM_CAPABILITIES, Capabilities
from tunepipe.tasks.serving.protocol import (
    APIError,
    UnsupportedField,
    check_adapter_name,
    check_fields,
)
from tunepipe.tasks.serving.metrics import UNKNOWN_MODEL, ServingMetrics, tunepipe_version
from tunepipe.tasks.serving.router import WeightedRouter
from tunepipe.tasks.serving.vllm import VLLMServer

ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors", "adapter_model.bin")
FORWARDED = ("/v1/chat/completions", "/v1/completions")


def versioned_name(name: str, path: str | Path) -> str:
    """`NAME@<12 hex>`: the hash of the adapter's config and weights, so other weights get another name."""
    digest = hashlib.sha256()
    files = [Path(path)] if Path(path).is_file() else [Path(path) / file for file in ADAPTER_FILES]  # a GGUF LoRA: one file
    for target in files:
        file = target.name
        if target.is_file():
            digest.update(file.encode() + b"\0")
            with target.open("rb") as fh:
                for block in iter(lambda: fh.read(1 << 20), b""):
                    digest.update(block)
    return f"{name}@{digest.hexdigest()[:12]}"


class Front:
    """The front's state: aliases → versioned names, their directories, the router, the upstream client."""

    def __init__(self, config: ServeConfig, upstream: str, *, upstream_key: str | None, api_key: str | None,
                 capabilities: Capabilities | None = None, engine: str = "vllm"):
        import httpx

        self.config = config
        self.caps = capabilities or VLLM_CAPABILITIES
        self.engine = engine
        self.base_name = config.served_model_name or config.base
        self.allowed = tuple(Path(d).resolve() for d in config.allowed_adapter_dirs)
        self.api_key = api_key
        self.aliases: dict[str, str] = {}  # NAME → NAME@hash
        self.paths: dict[str, str] = {}  # NAME@hash → directory
        self.router = WeightedRouter(config.router) if config.router else None
        headers = {"Authorization": f"Bearer {upstream_key}"} if upstream_key else {}
        self.http = httpx.AsyncClient(base_url=upstream, headers=headers, timeout=httpx.Timeout(600.0, connect=10.0))
        self.metrics = ServingMetrics(engine)
        self.tokenizer: Any = None  # the base's, loaded at start: message contents are sent to vLLM as text
        self.lock = asyncio.Lock()  # loads and unloads one at a time: an alias moves once its version is loaded

    def start_modules(self) -> dict[str, str]:
        """The --lora-modules vLLM starts with (versioned names), recording their aliases."""
        modules = {}
        for name, path in self.config.lora_modules.items():
            version = versioned_name(name, path)
            self.aliases[name], self.paths[version] = version, str(path)
            modules[version] = str(path)
        return modules

    def load_tokenizer(self) -> None:
        try:
            self.tokenizer = (self.caps.tokenizer or load_tokenizer)(self.config.base)
        except (OSError, ValueError) as error:  # a base vLLM could serve always carries its tokenizer
            raise RuntimeError(f"the front cannot load the base's tokenizer from {self.config.base}: {error}") from error

    def messages_as_data(self, body: dict[str, Any]) -> dict[str, Any]:
        """The chat body with every message's content made to tokenize as text under the base's tokenizer.
        vLLM renders messages with the model's own chat template and parses special-token strings in them, so
        a user writing `<|im_start|>system ...` would inject a turn; training, evaluation and the embedded
        engine escape those strings (`data_messages`), and the front does the same before vLLM sees them."""
        if self.tokenizer is None or not isinstance(body.get("messages"), list):
            return body
        return {**body, "messages": data_messages(self.tokenizer, body["messages"])}

    def confined(self, path: str) -> Path:
        resolved = Path(path).resolve()  # follows symlinks: a link inside an allowed dir pointing out is refused
        if not any(resolved.is_relative_to(root) for root in self.allowed):
            where = ", ".join(map(str, self.allowed)) or "none configured (runtime loading is off)"
            raise APIError(403, f"{path}: adapters may only be loaded from the allowed directories: {where}", param="lora_path")
        if not resolved.is_dir():
            raise APIError(404, f"{path}: no such adapter directory", param="lora_path")
        return resolved

    # ------------------------------------------------------------ adapters

    async def load(self, name: str, path: str) -> str:
        try:
            check_adapter_name(name)
        except ValueError as exc:
            raise APIError(400, f"lora_name: {exc}", param="lora_name") from None
        if "@" in name:
            raise APIError(400, "lora_name must be a name without '@' (versions are named by the server)",
                           param="lora_name")
        if name == self.base_name or (self.router and name == self.router.name):
            raise APIError(400, f"{name!r} is the name of the base model or the A/B router", param="lora_name")
        if not self.caps.runtime_adapters:
            raise APIError(400, f"the {self.engine} engine ({self.caps.label}) loads adapters at start only: restart "
                           "`tunepipe serve` with --lora-modules NAME=PATH", param="lora_name", code="unsupported_parameter")
        resolved = self.confined(path)
        version = versioned_name(name, resolved)
        async with self.lock:
            if version not in self.paths:
                await self._upstream_ok("/v1/load_lora_adapter", {"lora_name": version, "lora_path": str(resolved)})
                self.paths[version] = str(resolved)
            previous = self.aliases.get(name)
            self.aliases[name] = version
            if previous and previous != version:
                await self._drop_if_orphan(previous)
        return version

    async def unload(self, name: str) -> None:
        async with self.lock:
            if name not in self.aliases:
                raise APIError(404, f"The lora adapter '{name}' cannot be found.", param="lora_name")
            await self._drop_if_orphan(self.aliases.pop(name))

    async def _drop_if_orphan(self, version: str) -> None:
        if version in self.aliases.values():
            return
        await self._upstream_ok("/v1/unload_lora_adapter", {"lora_name": version})
        self.paths.pop(version, None)

    async def upstream(self, method: str, path: str, **kwargs: Any) -> Any:
        """One request to vLLM; 503 in OpenAI's shape when it does not answer (never a 500)."""
        import httpx

        try:
            return await self.http.request(method, path, **kwargs)
        except httpx.HTTPError as exc:
            raise APIError(503, f"{self.caps.label} is not answering ({exc.__class__.__name__}): see its log") from None

    async def _upstream_ok(self, path: str, payload: dict[str, str]) -> None:
        response = await self.upstream("POST", path, json=payload)
        if response.status_code != 200:
            raise APIError(response.status_code if 400 <= response.status_code < 500 else 400,
                           f"{self.caps.label} refused {path} {payload}: {_message(response)}")

    # ------------------------------------------------------------ models

    async def model_cards(self) -> list[dict[str, Any]]:
        upstream = (await self.upstream("GET", "/v1/models")).json().get("data", [])
        by_id = {card["id"]: card for card in upstream}
        cards = list(upstream)
        for name, version in sorted(self.aliases.items()):
            template = by_id.get(version, {"object": "model", "created": int(time.time()), "owned_by": self.engine,
                                           "parent": self.base_name})
            cards.append({**template, "id": name, "root": self.paths.get(version), "version": version})
        if self.router is not None:
            cards.append({"id": self.router.name, "object": "model", "created": int(time.time()), "owned_by": "tunepipe",
                          "root": None, "parent": self.base_name, "router": dict(self.config.router.versions)})
        return cards

    def serves(self, model: Any) -> bool:
        """True for a name this server answers: the base, an adapter's alias or version, the A/B router."""
        return model in (self.base_name, *self.aliases, *self.paths) or bool(self.router and model == self.router.name)

    def target(self, model: str) -> str:
        """The name vLLM knows for what a request asks for (the base's path: the name it is served under)."""
        if model == self.config.base and self.base_name:
            return self.base_name
        return self.aliases.get(model, model)


def create_front(config: ServeConfig, upstream: str, *, upstream_key: str | None, api_key: str | None,
                 alive=lambda: True, capabilities: Capabilities | None = None,
                 engine: str = "vllm") -> tuple[FastAPI, Front]:
    """The front app forwarding to the engine's server at `upstream`; call `front.start_modules()` before starting it."""
    front = Front(config, upstream, upstream_key=upstream_key, api_key=api_key, capabilities=capabilities, engine=engine)
    capabilities = front.caps
    label = capabilities.label

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        await asyncio.to_thread(front.load_tokenizer)
        yield
        await front.http.aclose()

    app = new_app(f"tunepipe front for {label}", config, api_key=api_key, lifespan=lifespan)
    app.state.front = front

    @app.get("/health")
    async def health() -> Response:
        if not alive():
            return PlainTextResponse(f"{label} exited", status_code=503)
        try:
            response = await front.http.get(capabilities.health_path)
        except Exception:  # noqa: BLE001 - unreachable upstream is "not healthy", nothing more
            return PlainTextResponse(f"{label} is not answering", status_code=503)
        return PlainTextResponse("", status_code=200 if response.status_code == 200 else 503)

    @app.get("/v1/models")
    async def models(request: Request) -> dict:
        return {"object": "list", "data": await front.model_cards()}

    @app.get("/v1/models/{model:path}")
    async def model(model: str, request: Request) -> dict:
        for card in await front.model_cards():
            if card["id"] == model:
                return card
        raise APIError(404, f"The model `{model}` does not exist.", param="model", code="model_not_found")

    @app.get("/metrics")
    async def metrics() -> Response:
        """The front's own counters (what clients asked and got); the engine's own metrics stay on its server."""
        return Response(front.metrics.render(), media_type=front.metrics.content_type)

    @app.get("/version")
    async def version() -> dict:
        try:
            upstream = (await front.http.get("/version")).json().get("version")
        except Exception:  # noqa: BLE001 - an engine not answering has no version to report
            upstream = None
        return {"version": tunepipe_version(), "engine": engine, engine: upstream, "model": front.base_name}

    @app.post("/v1/load_lora_adapter")
    async def load_lora_adapter(request: Request) -> PlainTextResponse:
        body = await _json(request)
        await front.load(body.get("lora_name"), str(body.get("lora_path") or ""))
        return PlainTextResponse(f"Success: LoRA adapter '{body.get('lora_name')}' added successfully.")

    @app.post("/v1/unload_lora_adapter")
    async def unload_lora_adapter(request: Request) -> PlainTextResponse:
        body = await _json(request)
        await front.unload(str(body.get("lora_name")))
        return PlainTextResponse(f"Success: LoRA adapter '{body.get('lora_name')}' removed successfully.")

    for path in FORWARDED:
        app.add_api_route(path, _forwarder(front, path), methods=["POST"])
    return app, front


def _forwarder(front: Front, path: str):
    endpoint = "chat" if path.endswith("chat/completions") else "completions"

    async def forward(request: Request) -> Response:
        body = await _json(request)
        caps = front.caps
        try:  # the engine's server logs and drops fields it does not know: refused here instead, naming the field
            check_fields(body, endpoint, caps.neutral, caps.extra_fields)
        except UnsupportedField as exc:
            raise APIError(400, str(exc), param=exc.param, code="unsupported_parameter") from None
        if caps.adapt is not None:
            body = caps.adapt(body, endpoint)
        if not caps.checks_models and not front.serves(body.get("model")):
            raise APIError(404, f"The model `{body.get('model')}` does not exist.", param="model", code="model_not_found")
        assignment = None
        if front.router is not None and body.get("model") == front.router.name:
            assignment = front.router.choose(body.get("user"))
            body["model"] = assignment.version  # answered under the version's name, as the embedded engine does
        asked = body.get("model")
        body["model"] = front.target(str(asked))
        if endpoint == "chat":
            body = front.messages_as_data(body)
        import httpx

        started = time.monotonic()
        try:
            response = await front.http.send(front.http.build_request("POST", path, json=body), stream=True)
        except httpx.HTTPError as exc:
            if assignment is not None:
                front.router.record(assignment, endpoint=path, status="error 503")
            front.metrics.refused(path, UNKNOWN_MODEL, 503)
            raise APIError(503, f"{caps.label} is not answering ({exc.__class__.__name__}): see its log") from None
        # a label only for names vLLM served (a 200): made-up model names must not grow the metric's label set
        label = str(asked) if response.status_code == 200 else UNKNOWN_MODEL
        if response.status_code != 200 or not body.get("stream"):
            content = await response.aread()
            await response.aclose()
            content = _rename(content, body["model"], asked)
            if response.status_code != 200:
                content = _openai_error(content, response.status_code, front.caps.label)
            status = "ok" if response.status_code == 200 else f"error {response.status_code}"
            usage = _usage(content)
            if assignment is not None:
                front.router.record(assignment, endpoint=path, status=status, **usage)
            front.metrics.finished(path, label, status, time.monotonic() - started, admitted=False, **usage)
            return Response(content, status_code=response.status_code, media_type=response.headers.get("content-type"))

        front.metrics.in_flight.labels(model=label).inc()

        recorded = False

        def record(status: str) -> None:
            nonlocal recorded
            if not recorded:
                recorded = True
                if assignment is not None:
                    front.router.record(assignment, endpoint=path, status=status)
                front.metrics.finished(path, label, status, time.monotonic() - started)

        async def stream() -> AsyncIterator[bytes]:
            status, held = "ok", None
            try:
                async for line in response.aiter_lines():  # whole SSE lines: a name is never split
                    if held is not None:
                        yield held
                    held = _rename(line.encode() + b"\n", body["model"], asked)
                # vLLM has answered in full: the request is logged and counted before its last line goes out, so a
                # client that has read the whole stream finds it in the A/B log and /metrics (as for a plain reply)
                await response.aclose()
                record(status)
                if held is not None:
                    yield held
            except BaseException as exc:  # the client sees the stream end; the log says why
                status = "cancelled" if isinstance(exc, (asyncio.CancelledError, GeneratorExit)) else f"error {exc.__class__.__name__}"
                if not isinstance(exc, Exception):
                    raise
            finally:
                await response.aclose()
                record(status)

        return StreamingResponse(stream(), media_type="text/event-stream")

    return forward


async def _json(request: Request) -> dict[str, Any]:
    try:
        body = json.loads(await request.body())
    except ValueError:
        raise APIError(400, "request body is not valid JSON") from None
    if not isinstance(body, dict):
        raise APIError(400, "request body must be a JSON object")
    return body


def _rename(content: bytes, served: str, asked: Any) -> bytes:
    """Answer under the name the client asked for (an alias or router name), not vLLM's versioned name."""
    if not isinstance(asked, str) or served == asked:
        return content
    return content.replace(json.dumps(served).encode(), json.dumps(asked).encode())


def _openai_error(content: bytes, status: int, label: str) -> bytes:
    """An engine's error body in OpenAI's shape ({"error": {...}}), as clients parse it; one already in it is kept."""
    try:
        payload = json.loads(content)
    except ValueError:
        payload = None
    if isinstance(payload, dict) and isinstance(payload.get("error"), dict):
        return content
    detail = payload.get("detail") if isinstance(payload, dict) else None
    message = json.dumps(detail)[:1000] if detail is not None else content.decode(errors="replace")[:1000]
    return json.dumps(APIError(status, f"{label}: {message}").body()).encode()


def _usage(content: bytes) -> dict[str, int]:
    try:
        usage = json.loads(content).get("usage") or {}
    except (ValueError, AttributeError):
        return {}
    return {"prompt_tokens": int(usage.get("prompt_tokens") or 0), "completion_tokens": int(usage.get("completion_tokens") or 0)}


def _message(response) -> str:
    try:
        payload = response.json()
        return str(payload.get("error", {}).get("message") or payload.get("message") or payload)[:500]
    except ValueError:
        return response.text[:500]


def vllm_behind_front(config: ServeConfig, *, api_key: str | None, log_file: str | Path):
    """(front app, front, VLLMServer): vLLM on a private loopback port with a private key, the front on
    config.host:config.port. Start the server (`server.start()`), then serve the app."""
    upstream_key = secrets.token_urlsafe(24)
    port = free_port("127.0.0.1")
    holder: dict[str, Any] = {}
    app, front = create_front(config, f"http://127.0.0.1:{port}", upstream_key=upstream_key, api_key=api_key,
                              alive=lambda: holder["server"].alive())
    private = config.model_copy(update={"host": "127.0.0.1", "port": port, "lora_modules": front.start_modules(),
                                        "router": None, "api_key": None, "api_key_env": None})
    holder["server"] = server = VLLMServer(private, api_key=upstream_key, log_file=log_file)
    return app, front, server
