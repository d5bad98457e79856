"""The serving engines, by the name `tunepipe serve --engine` and `serve.engine` take.

    embedded   transformers + peft in tunepipe's process (engines/embedded.py → serving/embedded.py's app)
    vllm       vLLM's OpenAI server from its own environment, behind tunepipe's front (engines/vllm.py)
    llamacpp   llama-cpp-python's OpenAI server on a GGUF, from llama.cpp's environment, behind the front
               (engines/llamacpp.py)

Each is an `Engine` (engines/base.py). Modules are imported when an engine is asked for: resolving a config must
not import FastAPI, torch or httpx for engines it does not use.
"""

from __future__ import annotations

from importlib import import_module

from tunepipe.tasks.serving.engines.base import Built, Capabilities, Engine

ENGINES = {
    "embedded": "tunepipe.tasks.serving.engines.embedded:EmbeddedEngine",
    "vllm": "tunepipe.tasks.serving.engines.vllm:VLLMEngine",
    "llamacpp": "tunepipe.tasks.serving.engines.llamacpp:LlamaCppEngine",
}


def engine_named(name: str) -> Engine:
    """The engine registered under `name` (one of ENGINES)."""
    if name not in ENGINES:
        raise KeyError(f"no serving engine {name!r}: choose one of {sorted(ENGINES)}")
    module, _, cls = ENGINES[name].partition(":")
    return getattr(import_module(module), cls)()


__all__ = ["ENGINES", "Built", "Capabilities", "Engine", "engine_named"]
