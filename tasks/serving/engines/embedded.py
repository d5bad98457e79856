"""The `embedded` engine: transformers + peft in tunepipe's own process (serving/embedded.py's app and
serving/engine.py's batched multi-LoRA generation). Nothing to start or stop beyond the app itself: the model
loads in `build`, before the port is opened."""

from __future__ import annotations

from tunepipe.schemas.environment import EnvironmentProfile
from tunepipe.schemas.serve import ServeConfig
from tunepipe.tasks.serving.engines.base import Built, Engine


class EmbeddedEngine(Engine):
    name = "embedded"
    summary = "transformers + peft in-process"
    capabilities = None  # its request models validate every field themselves (protocol.py, EMBEDDED_NEUTRAL)

    def build(self, config: ServeConfig, profile: EnvironmentProfile, workdir: str) -> Built:
        from tunepipe.tasks.serving.embedded import build_app  # lazy: pulls in fastapi, starlette, transformers

        return Built(build_app(config, profile))
