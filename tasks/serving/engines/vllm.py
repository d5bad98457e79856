"""The `vllm` engine: vLLM's OpenAI server from its own environment (serving/vllm.py: command line, process) on
a private loopback port and key, behind tunepipe's front (serving/front.py) on --host/--port."""

from __future__ import annotations

from pathlib import Path

from tunepipe.schemas.environment import EnvironmentProfile
from tunepipe.schemas.serve import ServeConfig
from tunepipe.tasks.serving.engines.base import VLLM_CAPABILITIES, Built, Engine
from tunepipe.tasks.serving.settings import api_key, vllm_rank


class ChildBuilt(Built):
    """The front's app, over an engine server running as our child process (VLLMServer or LlamaCppServer)."""

    def __init__(self, app, server, *, label: str, log_file: str):
        super().__init__(app, log_file=log_file)
        self.server = server
        self.label = label

    @property
    def has_process(self) -> bool:
        return True

    def start(self) -> None:
        self.server.start()

    def stop(self) -> None:
        self.server.stop()

    def alive(self) -> bool:
        return self.server.alive()

    def wait(self) -> int:
        return self.server.wait()


class VLLMEngine(Engine):
    name = "vllm"
    summary = "vLLM's OpenAI server from its own environment, behind tunepipe's front"
    capabilities = VLLM_CAPABILITIES

    def resolve_rank(self, rank: int) -> int:
        return vllm_rank(rank)

    def build(self, config: ServeConfig, profile: EnvironmentProfile, workdir: str) -> Built:
        from tunepipe.tasks.serving.front import vllm_behind_front  # lazy: pulls in fastapi, starlette

        log_file = config.vllm.log_file or str(Path(workdir) / "logs" / f"vllm-{config.port}.log")
        app, _, server = vllm_behind_front(config, api_key=api_key(config), log_file=log_file)
        return ChildBuilt(app, server, label="vLLM", log_file=log_file)
