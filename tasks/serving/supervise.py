"""Run a resolved serve config in the foreground, whatever the engine: what `tunepipe serve` does after parsing.

    port check   a busy --port is found before the model loads (which takes a while), not after
    build        the engine's app (and its child server, for vllm and llamacpp)
    start        the child started and answering (its log's tail in the error when it does not)
    serve        uvicorn on --host/--port; the child exiting stops it (and `serve` returns 1); SIGTERM or Ctrl-C
                 stops accepting, lets requests in flight finish up to drain_timeout_s, then stops the child (an
                 in-process engine ends by the signal itself once drained, as uvicorn.run does)
"""

from __future__ import annotations

import signal
import sys
import threading
from typing import Callable

from tunepipe.schemas.environment import EnvironmentProfile
from tunepipe.schemas.serve import ServeConfig
from tunepipe.tasks.serving.engines import engine_named
from tunepipe.tasks.serving.vllm import port_in_use


class PortBusy(RuntimeError):
    """The port `tunepipe serve` should listen on is taken."""


def check_port(config: ServeConfig) -> None:
    if config.port and port_in_use(config.host, config.port):
        raise PortBusy(f"port {config.port} on {config.host} is already in use (another server?): stop it or choose "
                       "another --port")


def describe(config: ServeConfig, url: str, say: Callable[[str], None] = print) -> None:
    adapters = ", ".join(f"{name}={path}" for name, path in config.lora_modules.items()) or "none yet"
    say(f"serving {config.served_model_name or config.base} ({config.engine}) at {url}/v1")
    say(f"  adapters: {adapters}")
    if config.router:
        split = ", ".join(f"{v} {w:g}" for v, w in config.router.versions.items())
        say(f"  A/B router {config.router.name}: {split}; log {config.router.log_path}")


def _interrupt(signum, frame) -> None:
    raise KeyboardInterrupt  # a service manager's SIGTERM ends the child engine too (the `finally` below)


def serve(config: ServeConfig, profile: EnvironmentProfile, workdir: str) -> int:
    """Serve until stopped; 0 on a requested stop, 1 when the engine's own server exited under us."""
    import uvicorn

    say = lambda line: print(line, flush=True)  # noqa: E731
    check_port(config)
    built = engine_named(config.engine).build(config, profile, workdir)
    label = getattr(built, "label", config.engine)
    # With a child engine, SIGTERM must reach the `finally` that stops it. Without one, uvicorn re-raises the signal
    # once requests have drained, under the default handler: the process ends at once, as a service manager expects.
    previous = signal.signal(signal.SIGTERM, _interrupt) if built.has_process else None
    try:
        if built.has_process:
            say(f"starting {label}: {' '.join(built.server.command)} (log {built.log_file})")
        built.start()
        server = uvicorn.Server(uvicorn.Config(built.app, host=config.host, port=config.port,
                                               log_level="warning" if built.has_process else "info",
                                               timeout_graceful_shutdown=config.drain_timeout_s))
        exited: list[int] = []
        if built.has_process:
            def watch() -> None:  # the engine's server gone: the front has nothing to serve
                exited.append(built.wait())
                server.should_exit = True

            threading.Thread(target=watch, name=f"{config.engine}-watch", daemon=True).start()
        describe(config, f"http://{config.host}:{config.port}", say)
        if built.has_process:
            say(f"Ctrl-C stops {label}.")
        server.run()
        if exited:
            print(f"tunepipe serve: {label} exited with {exited[0]} (log {built.log_file})", file=sys.stderr)
            return 1
        return 0
    except KeyboardInterrupt:
        return 0
    finally:
        if built.has_process:
            say(f"stopping {label} ...")
        built.stop()
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
