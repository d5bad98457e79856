"""The OpenAI request fields the servers honour, and errors in OpenAI's format.

Request models ignore fields they do not know (clients send many, e.g. `stream_options`), unlike
our config models: a server must accept what the official clients send.
"""

from __future__ import annotations

import re
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator


class APIError(Exception):
    """An error answered as `{"error": {"message", "type", "param", "code"}}` with an HTTP status."""

    TYPES = {
        400: "invalid_request_error", 401: "authentication_error", 403: "permission_error", 404: "not_found_error",
        413: "invalid_request_error", 429: "rate_limit_error", 500: "internal_error", 503: "service_unavailable",
    }

    def __init__(self, status: int, message: str, *, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code

    def body(self) -> dict[str, Any]:
        kind = self.TYPES.get(self.status, "invalid_request_error")
        return {"error": {"message": self.message, "type": kind, "param": self.param, "code": self.code or kind}}


MAX_STOP_SEQUENCES = 4  # OpenAI: "Up to 4 sequences where the API will stop generating further tokens."
# A seed is a signed 64-bit integer, as vLLM bounds it (torch.iinfo(torch.long)): a larger one used to pass
# validation and fail inside generation, after the request had taken its slot.
SEED_MIN, SEED_MAX = -(2**63), 2**63 - 1
# Served adapter names end up in response headers, logs and metric labels: letters, digits and `._-@` only
# (a CR/LF in a name made every response for it an illegal header and leaked its slot).
ADAPTER_NAME_PATTERN = r"^[A-Za-z0-9._@-]{1,128}$"


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="ignore")

    include_usage: bool = False


class _Request(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: str
    max_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = Field(default=None, ge=0, le=2)
    top_p: float | None = Field(default=None, gt=0, le=1)
    seed: int | None = Field(default=None, ge=SEED_MIN, le=SEED_MAX)
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: int | None = Field(default=1, ge=1)
    user: str | None = None
    # Accepted only at their defaults: the engine has no log-probabilities, penalties or biases.
    logit_bias: dict[str, float] | None = None
    presence_penalty: float | None = Field(default=None, ge=-2, le=2)
    frequency_penalty: float | None = Field(default=None, ge=-2, le=2)

    @field_validator("n")
    @classmethod
    def _one_choice(cls, value: int | None) -> int:
        if value not in (None, 1):
            raise ValueError("only n=1 is supported: send one request per sample")
        return 1

    @field_validator("stop")
    @classmethod
    def _stop_list(cls, value: str | list[str] | None) -> str | list[str] | None:
        if isinstance(value, list) and len(value) > MAX_STOP_SEQUENCES:
            raise ValueError(f"at most {MAX_STOP_SEQUENCES} stop sequences, got {len(value)}")
        return value

    @model_validator(mode="after")
    def _supported(self) -> "_Request":
        if self.stream_options is not None and not self.stream:
            raise UnsupportedField("stream_options", "stream_options is only allowed when stream is true")
        for name in ("presence_penalty", "frequency_penalty"):
            if getattr(self, name):
                raise UnsupportedField(name, f"{name} is not supported by this server (only 0)")
        if self.logit_bias:
            raise UnsupportedField("logit_bias", "logit_bias is not supported by this server")
        return self

    def include_usage(self) -> bool:
        return bool(self.stream and self.stream_options and self.stream_options.include_usage)

    def stop_strings(self) -> list[str]:
        if self.stop is None:
            return []
        return [s for s in ([self.stop] if isinstance(self.stop, str) else self.stop) if s]


class UnsupportedField(ValueError):
    """A request field this server cannot honour: answered 400 with the field as `param`."""

    def __init__(self, param: str, message: str):
        super().__init__(message)
        self.param = param


class CompletionRequest(_Request):
    prompt: str | list[str]
    logprobs: int | None = Field(default=None, ge=0, le=5)
    echo: bool = False
    best_of: int | None = Field(default=None, ge=1)
    suffix: str | None = None

    @field_validator("prompt")
    @classmethod
    def _one_prompt(cls, value: str | list[str]) -> str | list[str]:
        if isinstance(value, list) and len(value) != 1:
            raise ValueError("one prompt per request: send a string (or a list of one string)")
        return value

    @model_validator(mode="after")
    def _completion_supported(self) -> "CompletionRequest":
        if self.logprobs is not None:
            raise UnsupportedField("logprobs", "logprobs are not supported by this server")
        if self.echo:
            raise UnsupportedField("echo", "echo is not supported by this server")
        if self.best_of not in (None, 1):
            raise UnsupportedField("best_of", "only best_of=1 is supported")
        if self.suffix:
            raise UnsupportedField("suffix", "suffix (insertion) is not supported by this server")
        return self

    def prompt_text(self) -> str:
        return self.prompt if isinstance(self.prompt, str) else self.prompt[0]


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")

    role: Literal["system", "user", "assistant", "developer", "tool"]
    content: str | list[dict[str, Any]] | None = None

    def text(self) -> str:
        """String content; list content (OpenAI's parts) keeps its text parts."""
        if self.content is None or isinstance(self.content, str):
            return self.content or ""
        parts = [part.get("text", "") for part in self.content if part.get("type") == "text"]
        if len(parts) != len(self.content):
            raise ValueError("only text content parts are supported")
        return "".join(parts)


class ChatCompletionRequest(_Request):
    messages: list[ChatMessage] = Field(min_length=1)
    logprobs: bool | None = None
    top_logprobs: int | None = Field(default=None, ge=0, le=20)
    max_completion_tokens: int | None = Field(default=None, ge=1)

    @model_validator(mode="after")
    def _chat_supported(self) -> "ChatCompletionRequest":
        if self.logprobs or self.top_logprobs is not None:
            raise UnsupportedField("logprobs", "logprobs are not supported by this server")
        if self.max_completion_tokens is not None:  # the newer name of max_tokens
            if self.max_tokens is not None and self.max_tokens != self.max_completion_tokens:
                raise UnsupportedField("max_completion_tokens", "max_tokens and max_completion_tokens differ: send one")
            self.max_tokens = self.max_completion_tokens
        return self


def check_adapter_name(name: object) -> str:
    """`name` if it may name a served adapter, else ValueError saying what a name may hold."""
    if not isinstance(name, str) or not re.fullmatch(ADAPTER_NAME_PATTERN, name):
        raise ValueError(f"an adapter name is 1-128 letters, digits and `._-@`, got {str(name)[:140]!r}")
    return name


class LoadLoraRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")

    lora_name: str
    lora_path: str = Field(min_length=1)

    _name = field_validator("lora_name")(classmethod(lambda cls, value: check_adapter_name(value)))


class UnloadLoraRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")

    lora_name: str
    lora_int_id: int | None = None

    _name = field_validator("lora_name")(classmethod(lambda cls, value: check_adapter_name(value)))
