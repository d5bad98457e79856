"""A small real OpenAI-compatible judge server for the RLAIF tests (no tests here).

FastAPI + uvicorn answering `POST /v1/chat/completions` in the OpenAI chat-completion shape, with
bearer-key auth and OpenAI-shaped errors. Its verdicts follow a fixed rule, so tests know them:
the answer sharing more words with the reference answer wins (with no reference given: with the
user's message); then the shorter answer; answers equal on both get "A", a deliberate position
bias that asking both orders must turn into a tie.
"""

import re
import time
from typing import Any

# Module-level imports, no `from __future__ import annotations`: FastAPI resolves the handler's
# `Request` annotation at route registration.
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

_SECTION = re.compile(r"\[(Conversation|Reference answer|Answer A|Answer B)\]\n(.*?)(?=\n\n\[|\n\nWhich is better|\Z)", re.S)
NO_REFERENCE = "(none given)"


def words(text: str) -> set[str]:
    return set(re.findall(r"[a-z0-9]+", text.lower()))


def verdict(prompt: str) -> str:
    parts = dict(_SECTION.findall(prompt))
    reference = parts.get("Reference answer", "").strip()
    if reference == NO_REFERENCE or not reference:
        reference = " ".join(line.split(":", 1)[1] for line in parts.get("Conversation", "").splitlines() if line.startswith("user:"))
    target = words(reference)
    a, b = parts.get("Answer A", "").strip(), parts.get("Answer B", "").strip()
    score_a, score_b = (len(words(a) & target), -len(a)), (len(words(b) & target), -len(b))
    return "B" if score_b > score_a else "A"


def judge_app(api_key: str, requests: list[dict[str, Any]]) -> FastAPI:
    app = FastAPI()

    def error(status: int, message: str, kind: str) -> JSONResponse:
        return JSONResponse({"error": {"message": message, "type": kind, "param": None, "code": None}}, status_code=status)

    @app.get("/health")
    def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        if request.headers.get("authorization") != f"Bearer {api_key}":
            return error(401, "invalid API key", "authentication_error")
        body = await request.json()
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages:
            return error(400, "messages must be a non-empty list", "invalid_request_error")
        requests.append(body)
        answer = verdict(messages[-1]["content"])
        return {
            "id": f"chatcmpl-{len(requests)}", "object": "chat.completion", "created": int(time.time()), "model": body["model"],
            "choices": [{"index": 0, "message": {"role": "assistant", "content": answer}, "finish_reason": "stop"}],
            "usage": {"prompt_tokens": 0, "completion_tokens": 1, "total_tokens": 1},
        }

    return app
