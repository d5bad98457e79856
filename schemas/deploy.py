"""The `deploy:` section: register the exported adapters, promote them, hot-load them, smoke-test them.

The deploy stage acts on the world (the registry and a running server), so its artifact is the
record of one deployment decision: see `tasks/deploy/stage.py` for what its key means.
"""

from __future__ import annotations

import re
from typing import Any

from pydantic import Field, ValidationInfo, field_validator
from tunepipe.schemas.base import StrictModel, resolve_path
from tunepipe.schemas.registry import NAME_PATTERN
from tunepipe.schemas.secret_refs import check_url


class SmokeTest(StrictModel):
    """One real chat request to the freshly loaded adapter; a failure rolls the alias back."""

    prompt: str = Field(default="Say hello.", min_length=1, description="User message sent to the adapter.")
    expect_regex: str | None = Field(
        default=None, description="Regular expression (re.search) the answer must match; default: any non-empty answer."
    )
    max_tokens: int = Field(default=32, ge=1, description="Longest answer, in tokens.")

    @field_validator("expect_regex")
    @classmethod
    def _compiles(cls, value: str | None) -> str | None:
        if value is not None:
            try:
                re.compile(value)
            except re.error as exc:
                raise ValueError(f"expect_regex does not compile: {exc}") from None
        return value


class DeployConfig(StrictModel):
    """Register the export's adapters, point the serving alias at them and hot-load them into the server."""

    name: str = Field(
        pattern=NAME_PATTERN,
        description="Registry name of the adapter (clients request it as `model`). Per-task adapters are registered "
        "as `<name>-<task>`.",
    )
    registry: str | None = Field(
        default=None, description="Registry root: a directory or an fsspec URI (s3://...). Default: `<workdir>/registry`."
    )
    alias: str = Field(default="prod", pattern=NAME_PATTERN, description="The serving alias that is promoted (and rolled back).")
    server_url: str | None = Field(
        default=None,
        description="Base URL of the running OpenAI-compatible server (vLLM with runtime LoRA updating, or `tunepipe serve`), "
        "e.g. http://127.0.0.1:8000. Unset: register and promote only (servers pick the alias up when they start).",
    )
    api_key_env: str | None = Field(
        default=None, description="Environment variable holding the server's API key (sent as a Bearer token)."
    )
    timeout_s: float = Field(default=60.0, gt=0, description="Timeout of each request to the server, in seconds.")
    require_gate: bool = Field(
        default=True,
        description="Promote only on a passed evaluate gate; with no evaluate input the stage then records a refusal.",
    )
    smoke: SmokeTest = Field(default_factory=SmokeTest, description="The smoke test run against the hot-loaded adapter.")

    @field_validator("registry")
    @classmethod
    def _resolve_registry(cls, value: str | None, info: ValidationInfo) -> str | None:
        return None if value is None else resolve_path(value, info)

    @field_validator("server_url")
    @classmethod
    def _url(cls, value: Any) -> Any:
        if value is not None and not str(value).startswith(("http://", "https://")):
            raise ValueError(f"server_url {value!r}: give an http:// or https:// URL")
        return check_url(value, "server_url", userinfo=False).rstrip("/") if value else value
