"""The one HTTP skeleton every engine's server is built on: `new_app` makes the FastAPI app with OpenAI's error
shape, the body limits and the single bearer check, so an engine adds only its routes.

    BearerAuth     the API key on /v1 (one check for every engine, as vLLM's AuthenticationMiddleware): 401 in
                   OpenAI's shape before the body is read or validated
    BodyLimit      413 above max_request_bytes, 408 when the body does not arrive within request_body_timeout_s
    error handlers every error OpenAI's JSON shape (`APIError.body()`), a validation error a 400 naming the field
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
from typing import Any

from fastapi import FastAPI, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from tunepipe.schemas.serve import ServeConfig
from tunepipe.tasks.serving.protocol import APIError, UnsupportedField

log = logging.getLogger("tunepipe.serve")


def new_app(title: str, config: ServeConfig, *, api_key: str | None, lifespan=None) -> FastAPI:
    """An app with no routes yet: error handlers, the body limits and the bearer check on /v1 in place."""
    app = FastAPI(title=title, lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    _add_error_handlers(app)
    app.add_middleware(BodyLimit, limit=config.max_request_bytes, timeout_s=config.request_body_timeout_s)
    app.add_middleware(BearerAuth, api_key=api_key)  # added last: outermost, so a bad key never reaches the body
    return app


class BearerAuth:
    """`Authorization: Bearer <key>` on every /v1 path when a key is set; /health, /metrics and /version stay open
    (a load balancer's probe and a Prometheus scrape carry no key), as in vLLM."""

    def __init__(self, app, api_key: str | None):
        self.app = app
        self.api_key = api_key

    def authorized(self, scope) -> bool:
        header = dict(scope.get("headers") or []).get(b"authorization", b"").decode("latin-1")
        scheme, _, token = header.partition(" ")
        return scheme.lower() == "bearer" and secrets.compare_digest(token.strip().encode(), self.api_key.encode())

    async def __call__(self, scope, receive, send):
        if (self.api_key is None or scope["type"] != "http" or scope.get("method") == "OPTIONS"
                or not scope["path"].startswith("/v1") or self.authorized(scope)):
            return await self.app(scope, receive, send)
        error = APIError(401, "invalid or missing API key (send Authorization: Bearer <key>)")
        return await _error_response(error)(scope, receive, send)


# ---------------------------------------------------------------------------- errors and limits

def request_error(errors: list[dict[str, Any]]) -> APIError:
    """A request body that failed validation → one 400 naming the field (OpenAI's `param`), not a
    position in the JSON text or pydantic's wording."""
    first = errors[0] if errors else {"loc": ("body",), "msg": "invalid request", "type": "value_error"}
    loc = tuple(first.get("loc", ()))[1:]  # drop "body"
    kind = first.get("type", "")
    cause = (first.get("ctx") or {}).get("error")
    if kind == "json_invalid":
        at = f" at character {loc[0]}" if loc and isinstance(loc[0], int) else ""
        return APIError(400, f"request body is not valid JSON{at}: {cause or first.get('msg')}")
    if isinstance(cause, UnsupportedField):
        return APIError(400, str(cause), param=cause.param, code="unsupported_parameter")
    if not loc:
        if kind == "missing":
            return APIError(400, "request body is missing or null: send a JSON object")
        if kind in ("model_attributes_type", "dict_type", "model_type"):
            return APIError(400, "request body must be a JSON object")
    param = ""
    for part in loc:
        if isinstance(part, int):
            param += f"[{part}]"
        elif not str(part).startswith(("function-", "tagged-union")) and part not in ("str", "list[str]", "int", "list[dict[str,any]]"):
            param += f".{part}" if param else str(part)
    param = param or None
    message = str(first.get("msg", "invalid value")).removeprefix("Value error, ")
    return APIError(400, f"{param or 'body'}: {message}", param=param)


def _error_response(exc: APIError) -> JSONResponse:
    return JSONResponse(exc.body(), status_code=exc.status)


def _add_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def api_error(request: Request, exc: APIError) -> JSONResponse:
        return _error_response(exc)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        return _error_response(request_error(exc.errors()))

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        response = _error_response(APIError(exc.status_code, str(exc.detail)))
        if exc.status_code == 408:  # the rest of the body may still be trickling in: do not keep the connection
            response.headers["connection"] = "close"
        return response

    @app.exception_handler(Exception)
    async def unexpected(request: Request, exc: Exception) -> JSONResponse:
        # A bug of ours: still OpenAI's shape (clients parse it), and the log has the traceback.
        log.exception("unexpected error answering %s", request.url.path)
        return _error_response(APIError(500, f"internal error ({type(exc).__name__}): see the server's log"))


class BodyLimit:
    """Refuse request bodies above `limit` bytes (413), whether or not Content-Length is sent, and bodies that
    have not fully arrived `timeout_s` after the request started (408: a client trickling its body would
    otherwise hold a connection, and a worker, for as long as it likes)."""

    def __init__(self, app, limit: int, timeout_s: float | None = None):
        self.app = app
        self.limit = limit
        self.timeout_s = timeout_s

    def _message(self) -> str:
        return f"request body exceeds this server's limit of {self.limit} bytes"

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.limit:
            return await _error_response(APIError(413, self._message()))(scope, receive, send)
        seen = 0
        complete = False
        deadline = time.monotonic() + self.timeout_s if self.timeout_s else None

        async def limited_receive():
            nonlocal seen, complete
            if complete or deadline is None:  # after the body: a disconnect is awaited for as long as it takes
                message = await receive()
            else:
                try:
                    message = await asyncio.wait_for(receive(), max(deadline - time.monotonic(), 0.0))
                except asyncio.TimeoutError:
                    raise HTTPException(408, f"the request body did not arrive within {self.timeout_s:g} s") from None
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                complete = not message.get("more_body", False)
                if seen > self.limit:  # a chunked body: FastAPI passes HTTPException through its body parsing
                    raise HTTPException(413, self._message())
            return message

        await self.app(scope, limited_receive, send)
