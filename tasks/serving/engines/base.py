"""What every serving engine is: a name, its capabilities, and how it is built, started, checked and stopped.

An engine module (engines/embedded.py, vllm.py, llamacpp.py) defines one `Engine` subclass; `engines/__init__.py`
registers them by name, and `tasks/serving/supervise.py` runs whichever the config names, the same way for all:

    resolve_base(base)      what the engine loads for a base (a model directory, or a GGUF file)
    resolve_adapters(...)   the adapters as it loads them; refuses at start what it cannot take (naming the fix)
    build(config, profile)  a `Built`: the ASGI app clients talk to (tunepipe's own app or its front), and the
                            engine's child process if it has one
    Built.start/stop/alive  the child's lifecycle (no-ops for an in-process engine); /health of the app is the check

Anchor: vLLM's OpenAIServingChat(GenerateBaseServing), one serving class per endpoint over an engine client.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Any, Callable, ClassVar

from tunepipe.schemas.environment import EnvironmentProfile
from tunepipe.schemas.serve import ServeConfig
from tunepipe.tasks.serving.protocol import VLLM_EXTRA_FIELDS, VLLM_NEUTRAL


@dataclass(frozen=True)
class Capabilities:
    """What an engine honours. The front refuses, with a 400 naming the field, any request field outside OpenAI's
    and `extra_fields`, and any field of `neutral` whose value asks for something (`neutral[name](value)` False)."""

    label: str  # how messages name the engine ("vLLM", "llama.cpp")
    neutral: dict[str, Callable[[Any], bool]]
    extra_fields: frozenset[str] = frozenset()
    adapters: str = "peft"  # the adapter format it takes at start: "peft" (directories) or "gguf-lora" (files)
    runtime_adapters: bool = True  # POST /v1/load_lora_adapter works
    health_path: str = "/health"  # the upstream's readiness route
    # the request body as the engine's server needs it to honour OpenAI's meaning (its own defaults where they differ,
    # a field renamed), raising APIError 400 for values it would answer with a 500 or silently change
    adapt: Callable[[dict[str, Any], str], dict[str, Any]] | None = None
    checks_models: bool = True  # False: the server answers an unknown model name with its default model (the front 404s)
    # what the front escapes message contents under (special-token strings made text), from the resolved base;
    # None: the base's transformers tokenizer
    tokenizer: Callable[[str], Any] | None = None

class Built:
    """An engine ready to serve: `app` on tunepipe's --host/--port, and the lifecycle of what stands behind it."""

    def __init__(self, app, *, log_file: str | None = None):
        self.app = app
        self.log_file = log_file

    def start(self) -> None:
        """Start the engine's own process (if any) and wait until it answers."""

    def stop(self) -> None:
        """Stop the engine's process (if any); safe to call twice."""

    def alive(self) -> bool:
        return True

    def wait(self) -> int:
        """Block until the engine's process exits (never, for an in-process engine); its exit code."""
        threading.Event().wait()
        return 0

    @property
    def has_process(self) -> bool:
        return False


# vLLM's fields, here rather than in engines/vllm.py: the front defaults to them, and the vLLM engine
# builds the front, so the front must not import that engine.
VLLM_CAPABILITIES = Capabilities(label="vLLM", neutral=VLLM_NEUTRAL, extra_fields=VLLM_EXTRA_FIELDS)


class Engine:
    """One serving engine. Subclasses set `name`, `capabilities` and implement `build`."""

    name: ClassVar[str]
    summary: ClassVar[str]
    capabilities: ClassVar[Capabilities | None] = None  # None: the engine validates requests itself (embedded)

    def resolve_base(self, base: str, config: ServeConfig | None = None) -> str:
        """What this engine loads for `base` (config: the served adapters and the engine's options)."""
        from tunepipe.tasks.lm.modeling import model_dir  # lazy: kept off `tunepipe` start-up

        return model_dir(base)  # a GGUF: served from its converted directory

    def resolve_rank(self, rank: int) -> int:
        return rank

    def resolve_adapters(self, modules: dict[str, str]) -> dict[str, str]:
        """The adapters as this engine loads them; ServeSettingsError (naming the fix) for one it cannot take."""
        return modules

    def build(self, config: ServeConfig, profile: EnvironmentProfile, workdir: str) -> Built:
        raise NotImplementedError
