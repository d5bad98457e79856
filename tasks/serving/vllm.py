"""The `vllm` engine: build vLLM's OpenAI server command line and environment, and run it as a child.

vLLM cannot share our environment (it pins another torch and transformers), so it starts from its
own: an interpreter (`python -m vllm.entrypoints.openai.api_server --model BASE`: the same server as
`vllm serve`, and the one entry point that works in the CPU build, whose CLI fails looking up the
distribution `vllm`; `tunepipe vllm-env` builds that interpreter), a `vllm` executable, or a
container image (`docker run ... IMAGE BASE ...`: the image's entrypoint is `vllm serve`). Always
with `--enable-lora` and `VLLM_ALLOW_RUNTIME_LORA_UPDATING=True`, so the deploy stage can hot-load
adapters over HTTP. The API key travels in the environment (`VLLM_API_KEY`), never on the command
line where `ps` shows it.

Lifecycle: `start()` launches it in its own process group with output to a log file and waits
for `/health`; an early exit or a timeout stops it and raises with the log's last lines;
`stop()` sends SIGTERM to the group (docker forwards it to the container) and SIGKILL after
`stop_timeout_s`. Before starting: the interpreter must have vLLM (else: how to build it) and the
port must be free. Every failure is a `VLLMError` whose message names the cause, the fix and the
log's tail.
"""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path

from tunepipe.schemas.serve import ServeConfig
from tunepipe.tasks.serving.process import ChildServer, HealthTimeout, is_healthy, wait_healthy
from tunepipe.tasks.serving.vllm_env import check_python

SERVER_MODULE = "vllm.entrypoints.openai.api_server"
RUNTIME_LORA_ENV = "VLLM_ALLOW_RUNTIME_LORA_UPDATING"
# Constrained JSON (response_format, forced tool calls) as the embedded engine decodes it: xgrammar, no free
# whitespace. With vLLM's default (any whitespace) an untrained or small model filled max_tokens with blanks
# and the answer did not parse (measured on the tiny Qwen2.5 of test_serve_vllm_tools.py).
STRUCTURED_OUTPUTS_FLAG = "--structured-outputs-config"
STRUCTURED_OUTPUTS = {"backend": "xgrammar", "disable_any_whitespace": True}
KVCACHE_ENV = "VLLM_CPU_KVCACHE_SPACE"


class VLLMError(RuntimeError):
    """vLLM could not be started (or did not become healthy); the message carries its log's tail."""


def _launcher_prefix(config: ServeConfig) -> list[str]:
    options = config.vllm
    if options.executable:
        return [options.executable, "serve", config.base]
    if options.image:
        return [*_docker_run(config), options.image, config.base]
    if options.python:
        return [options.python, "-m", SERVER_MODULE, "--model", config.base]
    raise VLLMError(
        "no vLLM environment: build one with `tunepipe vllm-env cpu` (or `cuda`) and use a profile with "
        "serving.vllm_env (e.g. --env serve-vllm-cpu), or pass --vllm-python / --vllm-executable / --vllm-image"
    )


def _mounts(config: ServeConfig) -> list[str]:
    """Local directories the container must see, at the same paths, read-only."""
    paths = [config.base, *config.lora_modules.values(), *config.allowed_adapter_dirs]
    seen: list[str] = []
    for path in paths:
        if path and Path(path).exists() and str(Path(path).resolve()) not in seen:
            seen.append(str(Path(path).resolve()))
    return seen


def _docker_run(config: ServeConfig) -> list[str]:
    cmd = [config.vllm.docker, "run", "--rm", "--name", f"tunepipe-vllm-{config.port}", "--gpus", "all", "--ipc=host",
           "-p", f"{config.host}:{config.port}:{config.port}", "-e", f"{RUNTIME_LORA_ENV}=True", "-e", "VLLM_API_KEY"]
    for path in _mounts(config):
        cmd += ["-v", f"{path}:{path}:ro"]
    return cmd


def vllm_command(config: ServeConfig) -> list[str]:
    """The full command line for a resolved config (see settings.resolve_serve_config)."""
    host = "0.0.0.0" if config.vllm.image else config.host  # inside a container, listen on its interface
    cmd = [*_launcher_prefix(config), "--host", host, "--port", str(config.port), "--enable-lora"]
    if config.lora_modules:
        cmd += ["--lora-modules", *(f"{name}={path}" for name, path in config.lora_modules.items())]
    cmd += ["--max-loras", str(config.max_loras), "--max-lora-rank", str(config.max_lora_rank)]
    options = config.vllm
    if config.served_model_name:  # requests naming the base's path are mapped to this name by the front
        cmd += ["--served-model-name", config.served_model_name]
    optional = {
        "--max-cpu-loras": options.max_cpu_loras,
        "--quantization": options.quantization, "--dtype": options.dtype,
        "--gpu-memory-utilization": options.gpu_memory_utilization, "--tensor-parallel-size": options.tensor_parallel_size,
        "--max-model-len": options.max_model_len,
    }
    for flag, value in optional.items():
        if value is not None:
            cmd += [flag, str(value)]
    if options.tool_call_parser:
        cmd += ["--enable-auto-tool-choice", "--tool-call-parser", options.tool_call_parser]
    if not any(arg.startswith(STRUCTURED_OUTPUTS_FLAG) for arg in options.extra_args):
        cmd += [STRUCTURED_OUTPUTS_FLAG, json.dumps(STRUCTURED_OUTPUTS)]
    return [*cmd, *options.extra_args]


def vllm_env(api_key: str | None, base: dict[str, str] | None = None, *, cpu_kvcache_gb: float | None = None) -> dict[str, str]:
    env = dict(os.environ if base is None else base)
    env[RUNTIME_LORA_ENV] = "True"
    if cpu_kvcache_gb is not None:
        env[KVCACHE_ENV] = f"{cpu_kvcache_gb:g}"
    if api_key:
        env["VLLM_API_KEY"] = api_key
    else:
        env.pop("VLLM_API_KEY", None)  # an inherited key would lock out the clients we configure
    return env


class VLLMServer(ChildServer):
    """A `vllm serve` child process: `with VLLMServer(config, api_key, log_file) as server: ...`."""

    def __init__(self, config: ServeConfig, *, api_key: str | None = None, log_file: str | Path):
        self.config = config
        self.command = vllm_command(config)
        self.env = vllm_env(api_key, cpu_kvcache_gb=config.vllm.cpu_kvcache_gb)
        self.log_file = Path(log_file)
        self.stop_timeout_s = config.vllm.stop_timeout_s

    @property
    def url(self) -> str:
        host = "127.0.0.1" if self.config.host in ("0.0.0.0", "::", "") else self.config.host
        return f"http://{host}:{self.config.port}"

    def preflight(self) -> None:
        """What can be known wrong before starting: a missing or broken environment, a busy port."""
        if self.config.vllm.python and (problem := check_python(self.config.vllm.python)):
            raise VLLMError(problem)
        if is_healthy(f"{self.url}/health") or port_in_use(self.config.host, self.config.port):
            raise VLLMError(f"port {self.config.port} on {self.config.host} is already in use (another server?): "
                            "stop it or choose another --port")

    def start(self) -> "VLLMServer":
        self.preflight()
        self.spawn(self.command, self.env)
        try:
            wait_healthy(f"{self.url}/health", self.config.vllm.health_timeout_s, alive=self.alive, interval=0.5,
                         describe=self.log_tail)
        except HealthTimeout as exc:
            self.stop()
            raise VLLMError(f"vLLM did not start: {exc}\n{explain(self.log_tail(200))}") from None
        return self


def port_in_use(host: str, port: int) -> bool:
    """True when something listens on host:port (binding it fails)."""
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM) as sock:
        try:
            sock.bind((host or "0.0.0.0", port))
        except OSError:
            return True
    return False


# Causes recognised in vLLM's log → what to do. The first that matches is named in the error.
KNOWN_FAILURES = (
    ("PackageNotFoundError", "vLLM's CLI cannot find its own distribution (the CPU build's snag): start it through "
     "--vllm-python (python -m vllm.entrypoints.openai.api_server), as `tunepipe vllm-env` environments are"),
    ("torchvision::nms", "torchvision does not match vLLM's torch: rebuild the environment with `tunepipe vllm-env --force`"),
    ("Address already in use", "the port is in use: choose another --port"),
    ("is greater than max_lora_rank", "an adapter's rank is above --max-lora-rank: raise --max-lora-rank"),
    ("support DoRA", "vLLM does not serve DoRA adapters: export without use_dora, or serve with --engine embedded"),
    ("supports modules_to_save", "vLLM does not serve adapters with modules_to_save: train without them or use --engine embedded"),
    ("Unsupported LoRA", "vLLM refused an adapter: check it with the export stage's vLLM compatibility check"),
    ("No available memory for the cache blocks", "the KV cache does not fit: raise serving.vllm_cpu_kvcache_gb / "
     "--gpu-memory-utilization, or lower --max-model-len"),
    ("VLLM_CPU_KVCACHE_SPACE", "the CPU KV cache does not fit: change serving.vllm_cpu_kvcache_gb"),
)


def explain(log: str) -> str:
    """The fix for the first known failure in vLLM's log, else a pointer to the log."""
    for needle, fix in KNOWN_FAILURES:
        if needle in log:
            return f"cause: {needle!r} in vLLM's log. Fix: {fix}"
    return "Fix: see the log's tail above for vLLM's own error"
