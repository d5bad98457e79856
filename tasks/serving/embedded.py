"""The embedded engine's HTTP server: the OpenAI-compatible endpoints vLLM serves, as far as we use them.

    GET  /health                    200 once the model is loaded
    GET  /v1/models                 the base, each adapter (`parent` = the base), the A/B router's name
    POST /v1/completions            text completion, optionally streamed (SSE, ending `data: [DONE]`)
    POST /v1/chat/completions       chat through the tokenizer's chat template, optionally streamed
    POST /v1/load_lora_adapter      {"lora_name", "lora_path"}: only from `allowed_adapter_dirs`
    POST /v1/unload_lora_adapter    {"lora_name"}

A request picks an adapter by its `model` field, as in vLLM. Errors are OpenAI's JSON shape:
400 bad request, 401 bad key, 403 load from outside the allowed directories, 404 unknown model,
413 body too large, 429 too many requests in flight.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import urllib.parse
import uuid
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, AsyncIterator

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from tunepipe.schemas.environment import EnvironmentProfile
from tunepipe.schemas.serve import ServeConfig
from tunepipe.tasks.serving.app import new_app
from tunepipe.tasks.serving.batcher import Batcher
from tunepipe.tasks.serving.engine import AdapterError, MultiLoraEngine, Row, Sampling
from tunepipe.tasks.serving.grammar import GrammarError
from tunepipe.tasks.serving.protocol import (
    APIError,
    ChatCompletionRequest,
    CompletionRequest,
    LoadLoraRequest,
    UnloadLoraRequest,
)
from tunepipe.tasks.serving.metrics import UNKNOWN_MODEL, ServingMetrics, tunepipe_version
from tunepipe.tasks.serving.router import Assignment, WeightedRouter
from tunepipe.tasks.serving.settings import api_key
from tunepipe.tasks.serving.tools import (
    TOOL_CALL_PARSERS,
    forced_schema,
    history_for_template,
    template_takes_tools,
    tool_call_parser,
    tool_message,
)
from tunepipe.tasks.training.hardware import hardware

log = logging.getLogger("tunepipe.serve")


@dataclass
class Limits:
    """The resolved bounds (config fields the profile may have filled)."""

    max_loras: int
    max_tokens: int
    max_request_bytes: int
    max_concurrency: int
    allowed_dirs: tuple[Path, ...]
    api_key: str | None


def build_app(config: ServeConfig, profile: EnvironmentProfile) -> FastAPI:
    """Load the base (on the profile's device, at its dtype and attention kernel) and the start-up adapters, and
    return the app. `config` must be resolved (settings.resolve_serve_config)."""
    hw = hardware(profile)
    engine = MultiLoraEngine(config.base, dtype=hw.dtype, attn_implementation=hw.attention(padding_free=False),
                             max_rank=config.max_lora_rank or 64, device=hw.device)
    if len(config.lora_modules) > (config.max_loras or 1):
        raise AdapterError(f"{len(config.lora_modules)} adapters to load but max_loras is {config.max_loras}: raise --max-loras")
    for name, path in config.lora_modules.items():
        engine.load_adapter(name, path)
    return create_app(engine, config, api_key=api_key(config))


def create_app(engine: MultiLoraEngine, config: ServeConfig, *, api_key: str | None = None) -> FastAPI:
    """The app for an engine with its start-up adapters already loaded. `config` must be resolved
    (see settings.resolve_serve_config): max_loras set."""
    limits = Limits(
        max_loras=config.max_loras or 1, max_tokens=config.max_tokens_limit, max_request_bytes=config.max_request_bytes,
        max_concurrency=config.max_concurrency,
        allowed_dirs=tuple(Path(d).resolve() for d in config.allowed_adapter_dirs), api_key=api_key,
    )
    base_name = config.served_model_name or config.base or engine.base
    router = WeightedRouter(config.router) if config.router else None
    state = _State(engine, limits, base_name, router, Batcher(engine, max_batch_size=config.max_batch_size,
                                                              window_s=config.batch_window_ms / 1000))

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        state.batcher.start()
        yield
        await state.batcher.stop()

    app = new_app("tunepipe embedded server", config, api_key=api_key, lifespan=lifespan)
    app.state.serve = state

    @app.get("/health")
    async def health() -> PlainTextResponse:
        return PlainTextResponse("")

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(state.metrics.render(), media_type=state.metrics.content_type)

    @app.get("/version")
    async def version() -> dict:
        return {"version": tunepipe_version(), "engine": "embedded", "model": state.base_name}

    @app.get("/v1/models")
    async def models(request: Request) -> dict:
        return {"object": "list", "data": state.model_cards()}

    @app.get("/v1/models/{model:path}")
    async def model(model: str, request: Request) -> dict:
        return state.model_card(model)

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request):
        return await state.respond(body, request, chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatCompletionRequest, request: Request):
        return await state.respond(body, request, chat=True)

    @app.post("/v1/load_lora_adapter")
    async def load_lora_adapter(body: LoadLoraRequest, request: Request) -> PlainTextResponse:
        await state.load_adapter(body.lora_name, body.lora_path)
        return PlainTextResponse(f"Success: LoRA adapter '{body.lora_name}' added successfully.")

    @app.post("/v1/unload_lora_adapter")
    async def unload_lora_adapter(body: UnloadLoraRequest, request: Request) -> PlainTextResponse:
        await state.unload_adapter(body.lora_name)
        return PlainTextResponse(f"Success: LoRA adapter '{body.lora_name}' removed successfully.")

    return app


class _State:
    def __init__(self, engine: MultiLoraEngine, limits: Limits, base_name: str, router: WeightedRouter | None,
                 batcher: Batcher):
        self.engine = engine
        self.limits = limits
        self.base_name = base_name
        self.router = router
        self.batcher = batcher
        self.in_flight = 0
        self.created = int(time.time())
        self.metrics = ServingMetrics("embedded")

    # ------------------------------------------------------------ models

    def model_cards(self) -> list[dict[str, Any]]:
        card = {"object": "model", "created": self.created, "owned_by": "tunepipe", "max_model_len": self.engine.context_length or None}
        cards = [{**card, "id": self.base_name, "root": self.engine.base, "parent": None}]
        cards += [{**card, "id": name, "root": path, "parent": self.base_name} for name, path in self.engine.adapters.items()]
        if self.router is not None:
            cards.append({**card, "id": self.router.name, "root": "router:" + ",".join(self.router.versions), "parent": self.base_name})
        return cards

    def serves(self, model: str) -> bool:
        return model in (self.base_name, self.engine.base) or model in self.engine.adapters

    def model_card(self, model: str) -> dict[str, Any]:
        for card in self.model_cards():
            if card["id"] == model:
                return card
        raise APIError(404, f"The model `{model}` does not exist.", param="model", code="model_not_found")

    def adapter_for(self, model: str) -> str | None:
        """None for the base model; the adapter's name otherwise; 404 for anything else."""
        if model in (self.base_name, self.engine.base):
            return None
        if model in self.engine.adapters:
            return model
        raise APIError(404, f"The model `{model}` does not exist.", param="model", code="model_not_found")

    # ------------------------------------------------------------ adapters

    def _allowed(self, path: str) -> Path:
        resolved = Path(path).resolve()  # follows symlinks: a link inside an allowed dir pointing out is refused
        if not any(resolved.is_relative_to(root) for root in self.limits.allowed_dirs):
            where = ", ".join(map(str, self.limits.allowed_dirs)) or "none configured (runtime loading is off)"
            raise APIError(403, f"{path}: adapters may only be loaded from the allowed directories: {where}", param="lora_path")
        if not resolved.is_dir():
            raise APIError(404, f"{path}: no such adapter directory", param="lora_path")
        return resolved

    async def load_adapter(self, name: str, path: str) -> None:
        if name in (self.base_name, self.engine.base) or (self.router and name == self.router.name):
            raise APIError(400, f"{name!r} is the name of the base model or the A/B router", param="lora_name")
        if name in self.engine.adapters:
            raise APIError(400, f"The lora adapter '{name}' has already been loaded.", param="lora_name")
        if len(self.engine.adapters) >= self.limits.max_loras:
            raise APIError(400, f"{len(self.engine.adapters)} adapters are loaded, the server's max_loras: unload one first")
        resolved = self._allowed(path)
        try:
            await self.batcher.call(self.engine.load_adapter, name, resolved)
        except AdapterError as exc:
            raise APIError(400, str(exc), param="lora_path") from None
        except Exception as exc:  # noqa: BLE001 - whatever a broken adapter makes peft raise is the adapter's fault
            raise APIError(400, f"{path}: cannot load this adapter ({type(exc).__name__}: {exc})"[:1000],
                           param="lora_path") from None

    async def unload_adapter(self, name: str) -> None:
        try:
            await self.batcher.call(self.engine.unload_adapter, name)
        except KeyError:
            raise APIError(404, f"The lora adapter '{name}' cannot be found.", param="lora_name") from None

    # ------------------------------------------------------------ generation

    def _prompt_ids(self, body: CompletionRequest | ChatCompletionRequest, chat: bool) -> list[int]:
        try:
            if chat:
                ids = self.engine.chat_ids(history_for_template([m.for_template() for m in body.messages]),
                                           tools=self._tools(body))
            elif isinstance(prompt := body.prompt_text(), list):  # token ids
                vocab = len(self.engine.tokenizer)
                if any(not 0 <= token < vocab for token in prompt):
                    raise ValueError(f"prompt token ids must lie in [0, {vocab}) for this model's vocabulary")
                ids = list(prompt)
            else:
                ids = self.engine.completion_ids(prompt, add_special_tokens=body.add_special_tokens)
        except (ValueError, TypeError, KeyError) as exc:  # the chat template's own checks (roles, order) included
            raise APIError(400, str(exc) or type(exc).__name__, param="messages" if chat else "prompt") from None
        if ids:
            return ids
        # An empty prompt: as OpenAI does, generate from the start of a new document.
        tokenizer = self.engine.tokenizer
        start = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
        if start is None:
            raise APIError(400, "the prompt is empty and this model has no start-of-text token to begin from",
                           param="messages" if chat else "prompt")
        return [start]

    def _tools(self, body: ChatCompletionRequest) -> list[dict[str, Any]] | None:
        """The request's tools for the chat template; 400 naming `tools` when this model's template takes none,
        or (tool_choice auto) writes calls in a format no parser here reads."""
        if not body.calls_tools():
            return None
        template = self.engine.tokenizer.chat_template
        if not template_takes_tools(template):
            raise APIError(400, f"tools: the model {self.base_name} has no tool support in its chat template",
                           param="tools", code="unsupported_parameter")
        if body.tool_choice in (None, "auto") and tool_call_parser(template) is None:
            raise APIError(400, f"tools: the chat template of {self.base_name} writes tool calls in a format this "
                           f"server cannot parse (it reads {', '.join(TOOL_CALL_PARSERS)}); send tool_choice "
                           "'required' or a named function", param="tools", code="unsupported_parameter")
        return [tool.for_template() for tool in body.tools]

    def _max_tokens(self, body: CompletionRequest | ChatCompletionRequest, prompt_len: int) -> int:
        wanted = body.max_tokens or self.limits.max_tokens
        if wanted > self.limits.max_tokens:
            raise APIError(400, f"max_tokens {wanted} exceeds this server's limit {self.limits.max_tokens}", param="max_tokens")
        context = self.engine.context_length
        if context and prompt_len + wanted > context:
            raise APIError(
                400, f"This model's maximum context length is {context} tokens; the prompt has {prompt_len} and "
                f"max_tokens asks {wanted}: shorten the prompt or lower max_tokens", param="max_tokens",
            )
        return wanted

    async def respond(self, body: CompletionRequest | ChatCompletionRequest, request: Request, *, chat: bool):
        assignment = None
        if self.router is not None and body.model == self.router.name:
            assignment = self.router.choose(body.user)
        served = assignment.version if assignment else body.model
        try:
            adapter = self.adapter_for(served)
            prompt_ids = self._prompt_ids(body, chat)
            max_tokens = self._max_tokens(body, len(prompt_ids))
            if self.in_flight >= self.limits.max_concurrency:
                raise APIError(429, f"{self.in_flight} requests in flight (max_concurrency): retry later")
        except APIError as exc:
            if assignment:
                self.router.record(assignment, endpoint=request.url.path, status=f"error {exc.status}")
            self.metrics.refused(request.url.path, served if self.serves(served) else UNKNOWN_MODEL, exc.status)
            raise
        constraint = body.response_format.constraint() if chat and body.response_format else None
        tool_schema = forced_schema(body.tools, body.tool_choice, body.parallel_tool_calls) if chat and body.calls_tools() else None
        if tool_schema is not None:  # tool_choice required or named: the answer is a valid call
            constraint = {"type": "json_schema", "json_schema": {"schema": tool_schema}}
        grammar = await self._grammar(constraint) if constraint else None
        job = _Job(self, body, request, chat, served, assignment, prompt_ids)
        if chat:
            logprobs = (body.top_logprobs or 0) if body.logprobs else None
        else:
            logprobs = body.logprobs
        job.row = Row(prompt_ids=prompt_ids, adapter=adapter, max_tokens=max_tokens, emit=job.emit,
                      stop=body.stop_strings(), sampling=Sampling(temperature=body.temperature, top_p=body.top_p,
                                                                  seed=body.seed),
                      logprobs=logprobs, echo=not chat and body.echo and logprobs is not None, grammar=grammar)
        if chat and body.calls_tools():
            job.tool_parser = tool_call_parser(self.engine.tokenizer.chat_template)
            job.row.skip_special_tokens = tool_schema is not None  # auto: keep the call markers for the parser
        headers = job.headers()
        self.admit(served)
        # Admitted: from here every path (an exception, a client gone, a response that cannot be sent) ends in
        # job.abandon() or the job's own release, or the slot would be held until restart.
        try:
            self.batcher.submit(job.row)
            if body.stream:
                return _GuardedStream(job, job.sse(), media_type="text/event-stream", headers=headers)
            payload = await until_disconnected(job.result(), request)
            if payload is None:  # the client went away: nobody to answer (nginx's 499 in the access log)
                return Response(status_code=499)
            return JSONResponse(payload, headers=headers)
        except BaseException:
            job.abandon()
            raise

    async def _grammar(self, constraint: dict[str, Any]):
        """A grammar matcher for the request's response_format, compiled off the event loop; 400 if it cannot be."""
        try:
            return await asyncio.to_thread(lambda: self.engine.grammars.matcher(constraint))
        except GrammarError as exc:
            raise APIError(400, str(exc), param="response_format") from None

    def admit(self, served: str) -> None:
        self.in_flight += 1
        self.metrics.in_flight.labels(model=served).inc()


class _Job:
    """One request's events (from the engine thread) turned into an OpenAI response or SSE stream."""

    def __init__(self, state: _State, body, request: Request, chat: bool, served: str, assignment: Assignment | None,
                 prompt_ids: list[int]):
        self.state = state
        self.body = body
        self.request = request
        self.chat = chat
        self.served = served
        self.assignment = assignment
        self.prompt_tokens = len(prompt_ids)
        self.id = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex
        self.created = int(time.time())
        self.loop = asyncio.get_running_loop()
        self.events: asyncio.Queue[tuple] = asyncio.Queue()
        self.row: Row | None = None
        self.released = False
        self.started = time.monotonic()
        self.first_token = False
        self.tool_parser: str | None = None  # set when the request offers tools (see tools.tool_message)

    def emit(self, event: tuple) -> None:  # called on the engine thread
        self.loop.call_soon_threadsafe(self.events.put_nowait, event)

    def headers(self) -> dict[str, str]:
        # percent-encoded: a base served under a path with non-ASCII characters must not make the header illegal
        model = urllib.parse.quote(self.served, safe="/@:._-~")
        return {"x-tunepipe-model": model, **({"x-tunepipe-ab-request": self.assignment.request_id} if self.assignment else {})}

    def abandon(self) -> None:
        """The request ends without its answer (client gone, response failed): stop its row, free its slot."""
        if not self.released:
            if self.row is not None:
                self.row.cancelled = True
            self._release("cancelled")

    def _release(self, status: str, completion_tokens: int = 0) -> None:
        if self.released:
            return
        self.released = True
        self.state.in_flight -= 1
        self.state.metrics.finished(self.request.url.path, self.served, status, time.monotonic() - self.started,
                                    prompt_tokens=self.prompt_tokens, completion_tokens=completion_tokens)
        if self.assignment is not None:
            self.state.router.record(self.assignment, endpoint=self.request.url.path, status=status,
                                     prompt_tokens=self.prompt_tokens, completion_tokens=completion_tokens)

    def _prompt_text(self) -> str:
        prompt = self.body.prompt_text()
        return prompt if isinstance(prompt, str) else self.state.engine.tokenizer.decode(prompt)

    def _token(self, token: int) -> str:
        return self.state.engine.tokenizer.decode([token])

    def _chat_logprobs(self) -> dict[str, Any] | None:
        """OpenAI's chat shape: one entry per generated token, each with its `top_logprobs` alternatives."""
        if self.row.logprobs is None:
            return None

        def entry(token: int, logprob: float) -> dict[str, Any]:
            text = self._token(token)
            return {"token": text, "logprob": logprob, "bytes": list(text.encode("utf-8"))}

        return {"content": [{**entry(token, logprob), "top_logprobs": [entry(t, lp) for t, lp in top]}
                            for token, logprob, top in self.row.token_logprobs]}

    def _completion_logprobs(self) -> dict[str, Any] | None:
        """OpenAI's completions shape (tokens, token_logprobs, top_logprobs, text_offset), the prompt's tokens
        first with echo (the first has no log-probability). Alternatives include the chosen token, as vLLM's do."""
        if self.row.logprobs is None:
            return None
        tokens, token_logprobs, tops, offsets, offset = [], [], [], [], 0
        for token, logprob, top in [*self.row.prompt_logprobs, *self.row.token_logprobs]:
            text = self._token(token)
            tokens.append(text)
            token_logprobs.append(logprob)
            if logprob is None:
                tops.append(None)
            else:
                alternatives = {self._token(t): lp for t, lp in top}
                alternatives.setdefault(text, logprob)
                tops.append(alternatives)
            offsets.append(offset)
            offset += len(text)
        return {"tokens": tokens, "token_logprobs": token_logprobs, "top_logprobs": tops, "text_offset": offsets}

    def _first_token(self) -> None:
        if not self.first_token:
            self.first_token = True
            self.state.metrics.first_token.labels(endpoint=self.request.url.path, model=self.served).observe(
                time.monotonic() - self.started)

    def _usage(self, completion_tokens: int) -> dict[str, int]:
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": completion_tokens,
                "total_tokens": self.prompt_tokens + completion_tokens}

    async def result(self) -> dict[str, Any]:
        text = []
        try:
            while True:
                event = await self.events.get()
                if event[0] == "delta":
                    self._first_token()
                    text.append(event[1])
                elif event[0] == "error":
                    self._release("error 500")
                    raise APIError(500, event[1])
                else:
                    _, finish_reason, n = event
                    self._release("ok", n)
                    break
        finally:
            self.abandon()  # a no-op once answered; else the request was cancelled mid-generation
        content = "".join(text)
        if self.chat:
            message = {"role": "assistant", "content": content}
            if self.body.calls_tools():
                message, finish_reason = tool_message(content, self.body.tool_choice, self.tool_parser, finish_reason)
            choice = {"index": 0, "message": message, "logprobs": self._chat_logprobs(), "finish_reason": finish_reason}
        else:
            echoed = self._prompt_text() if self.body.echo else ""
            choice = {"index": 0, "text": echoed + content, "logprobs": self._completion_logprobs(),
                      "finish_reason": finish_reason}
        return {"id": self.id, "object": "chat.completion" if self.chat else "text_completion", "created": self.created,
                "model": self.served, "choices": [choice], "usage": self._usage(n)}

    def _chunk(self, delta: str | None, finish_reason: str | None, *, first: bool = False) -> str:
        if self.chat:
            content = {"role": "assistant", "content": ""} if first else ({} if delta is None else {"content": delta})
            choice = {"index": 0, "delta": content, "logprobs": None, "finish_reason": finish_reason}
        else:
            choice = {"index": 0, "text": delta or "", "logprobs": None, "finish_reason": finish_reason}
        chunk = {"id": self.id, "object": "chat.completion.chunk" if self.chat else "text_completion",
                 "created": self.created, "model": self.served, "choices": [choice]}
        if self.body.include_usage():  # every other chunk carries usage: null
            chunk["usage"] = None
        return f"data: {json.dumps(chunk)}\n\n"

    def _usage_chunk(self, completion_tokens: int) -> str:
        chunk = {"id": self.id, "object": "chat.completion.chunk" if self.chat else "text_completion",
                 "created": self.created, "model": self.served, "choices": [], "usage": self._usage(completion_tokens)}
        return f"data: {json.dumps(chunk)}\n\n"

    async def sse(self) -> AsyncIterator[str]:
        try:
            if self.chat:
                yield self._chunk(None, None, first=True)
            while True:
                event = await self.events.get()
                if event[0] == "delta":
                    self._first_token()
                    yield self._chunk(event[1], None)
                elif event[0] == "error":
                    self._release("error 500")
                    yield f"data: {json.dumps(APIError(500, event[1]).body())}\n\n"
                    break
                else:
                    _, finish_reason, n = event
                    self._release("ok", n)
                    yield self._chunk(None, finish_reason)
                    if self.body.include_usage():  # OpenAI: one more chunk, no choices, the request's usage
                        yield self._usage_chunk(n)
                    break
            yield "data: [DONE]\n\n"
        finally:
            self.abandon()  # a no-op once answered; else the client disconnected mid-stream


class _GuardedStream(StreamingResponse):
    """A stream whose request slot is freed however the response ends: finished, client gone, or never started
    (the generator's own `finally` does not run when the response fails before its first chunk)."""

    def __init__(self, job: "_Job", *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.job = job

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.job.abandon()


async def until_disconnected(awaitable, request: Request):
    """`awaitable`'s result, or None once the client disconnects first (then `awaitable` is cancelled).
    A non-streaming handler is not cancelled by the server when its client goes away (vLLM's `with_cancellation`
    does the same race)."""
    work = asyncio.ensure_future(awaitable)
    gone = asyncio.ensure_future(_disconnected(request))
    try:
        done, _ = await asyncio.wait({work, gone}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        gone.cancel()
        if not work.done():
            work.cancel()
    if work in done:
        return work.result()
    try:
        await work
    except asyncio.CancelledError:
        pass
    return None


async def _disconnected(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass
