"""The OpenAI request fields the servers honour, and errors in OpenAI's format.

No field is silently ignored: a request field is honoured, accepted at a value that asks for nothing
(`response_format: {"type": "text"}`, `tool_choice: "none"`), or answered 400 naming it, OpenAI's
"Unrecognized request argument supplied" for fields OpenAI does not have (`check_fields`).
"""

from __future__ import annotations

import json
import re
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from tunepipe.tasks.serving.tools import NamedToolChoice, Tool, ToolChoice, tool_named


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


# Every field of OpenAI's request bodies (API reference, checked 2026-12), by endpoint. A field outside these
# (and outside the engine's own extras) is refused as OpenAI refuses it: a client that misspells a field, or
# relies on a newer one, learns it at once instead of getting an answer that silently ignored it.
OPENAI_FIELDS = {
    "chat": frozenset({
        "messages", "model", "audio", "frequency_penalty", "function_call", "functions", "logit_bias", "logprobs",
        "max_completion_tokens", "max_tokens", "metadata", "modalities", "n", "parallel_tool_calls", "prediction",
        "presence_penalty", "prompt_cache_key", "reasoning_effort", "response_format", "safety_identifier", "seed",
        "service_tier", "stop", "store", "stream", "stream_options", "temperature", "tool_choice", "tools",
        "top_logprobs", "top_p", "user", "verbosity", "web_search_options",
    }),
    "completions": frozenset({
        "model", "prompt", "best_of", "echo", "frequency_penalty", "logit_bias", "logprobs", "max_tokens", "n",
        "presence_penalty", "seed", "stop", "stream", "stream_options", "suffix", "temperature", "top_p", "user",
    }),
}


def _text_only(value: Any) -> bool:
    return value is None or value == ["text"]


# OpenAI fields the embedded engine has no machinery for, with the values that ask for nothing (accepted:
# they change nothing). Any other value is a 400 naming the field. Fields it honours are modelled below.
EMBEDDED_NEUTRAL: dict[str, Any] = {
    "functions": lambda v: not v,  # the deprecated form of `tools`, which is honoured
    "function_call": lambda v: v in (None, "none"),
    "audio": lambda v: v is None,
    "modalities": _text_only,
    "prediction": lambda v: v is None,
    "web_search_options": lambda v: v is None,
    "reasoning_effort": lambda v: v is None,
    "verbosity": lambda v: v is None,
    "store": lambda v: not v,  # nothing is stored: a request asking to store its answer is refused
    "metadata": lambda v: not v,  # metadata belongs to stored completions
    "service_tier": lambda v: v in (None, "auto", "default"),
    "prompt_cache_key": lambda v: True,  # a cache-routing hint: one server, nothing to route
    "safety_identifier": lambda v: True,  # an end-user id for the provider's abuse checks: none here
}
# vLLM extensions the embedded engine honours too (the evaluate stage sends them to either engine).
EMBEDDED_EXTRA_FIELDS = frozenset({"add_special_tokens", "skip_special_tokens"})
# vLLM's front: what vLLM's OpenAI server honours besides OpenAI's fields (its sampling and chat extras,
# vllm/entrypoints/openai/protocol.py); everything else outside OPENAI_FIELDS is refused before vLLM would
# log and drop it. OpenAI fields vLLM does not implement are refused too.
VLLM_EXTRA_FIELDS = frozenset({
    "top_k", "min_p", "repetition_penalty", "length_penalty", "stop_token_ids", "include_stop_str_in_output",
    "ignore_eos", "min_tokens", "skip_special_tokens", "spaces_between_special_tokens", "truncate_prompt_tokens",
    "prompt_logprobs", "allowed_token_ids", "bad_words", "echo", "add_generation_prompt", "continue_final_message",
    "add_special_tokens", "chat_template", "chat_template_kwargs", "documents", "structured_outputs", "guided_json",
    "guided_regex", "guided_choice", "guided_grammar", "guided_decoding_backend", "guided_whitespace_pattern",
    "priority", "request_id", "return_tokens_as_token_ids", "return_token_ids", "cache_salt", "use_beam_search",
})
VLLM_NEUTRAL: dict[str, Any] = {
    "audio": lambda v: v is None, "modalities": _text_only, "prediction": lambda v: v is None,
    "web_search_options": lambda v: v is None, "verbosity": lambda v: v is None, "store": lambda v: not v,
    "metadata": lambda v: not v, "service_tier": lambda v: v in (None, "auto", "default"),
    "functions": lambda v: not v, "function_call": lambda v: v in (None, "none"),
    "prompt_cache_key": lambda v: True, "safety_identifier": lambda v: True,
}


def check_fields(body: Any, endpoint: str, neutral: dict[str, Any], extra: frozenset[str] = frozenset()) -> None:
    """UnsupportedField for the first field of `body` that is neither OpenAI's (for `endpoint`) nor one of
    `extra`, or that is in `neutral` with a value asking for something the engine does not do."""
    if not isinstance(body, dict):
        return  # the model's own validation says what is wrong with a non-object
    for name, value in body.items():
        if name not in OPENAI_FIELDS[endpoint] and name not in extra:
            raise UnsupportedField(name, f"Unrecognized request argument supplied: {name}")
        if name in neutral and not neutral[name](value):
            raise UnsupportedField(name, f"{name}={json.dumps(value)[:200]} is not supported by this server's engine; "
                                   "leave it out (see the README's table of request fields)")


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
    # vLLM's extension: answers are decoded without special tokens; keeping them is not offered here
    skip_special_tokens: Literal[True] = True
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
    prompt: str | list[int] | list[str] | list[list[int]]
    # vLLM's extension: whether the tokenizer adds its special tokens (BOS) to a text prompt; False when the
    # prompt was rendered with them already (the evaluate stage's prompts)
    add_special_tokens: bool = True

    @model_validator(mode="before")
    @classmethod
    def _known_fields(cls, data: Any) -> Any:
        check_fields(data, "completions", EMBEDDED_NEUTRAL, EMBEDDED_EXTRA_FIELDS)
        return data

    logprobs: int | None = Field(default=None, ge=0, le=5)
    echo: bool = False
    best_of: int | None = Field(default=None, ge=1)
    suffix: str | None = None

    @field_validator("prompt")
    @classmethod
    def _one_prompt(cls, value):
        if isinstance(value, list) and value and all(isinstance(v, int) for v in value):
            return value  # one prompt as token ids (lm-eval's local-completions sends these)
        if isinstance(value, list) and len(value) != 1:
            raise ValueError("one prompt per request: send a string (or a list of one string or of one token-id list)")
        return value

    @model_validator(mode="after")
    def _completion_supported(self) -> "CompletionRequest":
        if self.stream and (self.logprobs is not None or self.echo):
            raise UnsupportedField("logprobs" if self.logprobs is not None else "echo",
                                   "logprobs and echo are answered without stream only")
        if self.best_of not in (None, 1):
            raise UnsupportedField("best_of", "only best_of=1 is supported")
        if self.suffix:
            raise UnsupportedField("suffix", "suffix (insertion) is not supported by this server")
        return self

    def prompt_text(self) -> str | list[int]:
        """The prompt as text, or as token ids when it was sent as ids."""
        if isinstance(self.prompt, str) or (self.prompt and isinstance(self.prompt[0], int)):
            return self.prompt
        return self.prompt[0]


MESSAGE_FIELDS = frozenset({"role", "content", "name", "tool_calls", "tool_call_id", "refusal", "audio", "function_call"})
# Rendered by the chat template (tools.py): an assistant's earlier calls and the tool results answering them.
RENDERED_MESSAGE_FIELDS = frozenset({"role", "content", "tool_calls", "tool_call_id"})


class ToolCallFunction(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str
    arguments: str  # JSON text, as OpenAI sends it


class ToolCallMessage(BaseModel):
    """One call in an assistant message of the history (as the answer that made it carried it)."""

    model_config = ConfigDict(extra="forbid")

    id: str | None = None
    type: Literal["function"] = "function"
    function: ToolCallFunction


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")

    role: Literal["system", "user", "assistant", "developer", "tool"]
    content: str | list[dict[str, Any]] | None = None
    tool_calls: list[ToolCallMessage] | None = None
    tool_call_id: str | None = None

    @model_validator(mode="before")
    @classmethod
    def _known_fields(cls, data: Any) -> Any:
        """A message's fields other than role and content (a participant's name, tool calls and results) are
        not rendered by the embedded engine: refused rather than dropped."""
        if isinstance(data, dict):
            for name, value in data.items():
                if name not in MESSAGE_FIELDS:
                    raise UnsupportedField(name, f"Unrecognized message field supplied: {name}")
                if name not in RENDERED_MESSAGE_FIELDS and value not in (None, "", []):
                    raise UnsupportedField(name, f"the message field {name} is not supported by this server's engine")
        return data

    def text(self) -> str:
        """String content; list content (OpenAI's parts) keeps its text parts."""
        if self.content is None or isinstance(self.content, str):
            return self.content or ""
        parts = [part.get("text", "") for part in self.content if part.get("type") == "text"]
        if len(parts) != len(self.content):
            raise ValueError("only text content parts are supported")
        return "".join(parts)


    def for_template(self) -> dict[str, Any]:
        """The message as the chat template takes it (tool calls and the id a tool result answers included)."""
        message: dict[str, Any] = {"role": self.role, "content": self.text()}
        if self.tool_calls:
            message["tool_calls"] = [call.model_dump() for call in self.tool_calls]
        if self.tool_call_id is not None:
            message["tool_call_id"] = self.tool_call_id
        return message


class JSONSchemaFormat(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = "response"
    description: str | None = None
    schema_: dict[str, Any] = Field(default_factory=dict, alias="schema")
    strict: bool | None = None


class ResponseFormat(BaseModel):
    """OpenAI's response_format: text (no constraint), json_object (any JSON object), json_schema (that schema)."""

    model_config = ConfigDict(extra="forbid")

    type: Literal["text", "json_object", "json_schema"]
    json_schema: JSONSchemaFormat | None = None

    @model_validator(mode="after")
    def _schema_given(self) -> "ResponseFormat":
        if self.type == "json_schema" and self.json_schema is None:
            raise ValueError("response_format type json_schema needs json_schema: {name, schema}")
        return self

    def constraint(self) -> dict[str, Any] | None:
        """What the grammar compiler takes, or None for plain text."""
        if self.type == "text":
            return None
        if self.type == "json_object":
            return {"type": "json_object"}
        return {"type": "json_schema", "json_schema": {"schema": self.json_schema.schema_}}


class ChatCompletionRequest(_Request):
    messages: list[ChatMessage] = Field(min_length=1)
    response_format: ResponseFormat | None = None
    tools: list[Tool] | None = None
    tool_choice: ToolChoice | None = None
    parallel_tool_calls: bool | None = None

    @model_validator(mode="before")
    @classmethod
    def _known_fields(cls, data: Any) -> Any:
        check_fields(data, "chat", EMBEDDED_NEUTRAL, EMBEDDED_EXTRA_FIELDS)
        return data

    logprobs: bool | None = None
    top_logprobs: int | None = Field(default=None, ge=0, le=20)
    max_completion_tokens: int | None = Field(default=None, ge=1)

    @model_validator(mode="after")
    def _chat_supported(self) -> "ChatCompletionRequest":
        if self.top_logprobs and not self.logprobs:
            raise UnsupportedField("top_logprobs", "top_logprobs needs logprobs: true")
        if self.logprobs and self.stream:
            raise UnsupportedField("logprobs", "logprobs are answered without stream only")
        if self.max_completion_tokens is not None:  # the newer name of max_tokens
            if self.max_tokens is not None and self.max_tokens != self.max_completion_tokens:
                raise UnsupportedField("max_completion_tokens", "max_tokens and max_completion_tokens differ: send one")
            self.max_tokens = self.max_completion_tokens
        self._check_tools()
        return self

    def _check_tools(self) -> None:
        if self.tool_choice not in (None, "none", "auto") and not self.tools:
            raise UnsupportedField("tool_choice", "tool_choice asks for a tool call but no `tools` are given")
        if isinstance(self.tool_choice, NamedToolChoice):
            try:
                tool_named(self.tools, self.tool_choice.function.name)
            except ValueError as exc:
                raise UnsupportedField("tool_choice", str(exc)) from None
        if self.calls_tools() and self.response_format is not None and self.response_format.type != "text":
            raise UnsupportedField("response_format", "response_format and tools exclude each other: send one")
        if self.calls_tools() and self.stream:
            raise UnsupportedField("stream", "tool calls are answered without stream only: send stream: false")

    def calls_tools(self) -> bool:
        """Whether the model is offered the tools (tool_choice none renders no tools, as vLLM does not parse)."""
        return bool(self.tools) and self.tool_choice != "none"


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
