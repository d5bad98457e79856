"""The `serve:` section and `tunepipe serve`: one base model, many LoRA adapters, OpenAI-compatible HTTP.

Three engines answer the same API: `embedded` (transformers + peft in this process, for CPU hosts,
tests and small deployments), `vllm` (vLLM's OpenAI server started from its own environment,
which `tunepipe vllm-env` builds: vLLM cannot share ours) and `llamacpp` (llama-cpp-python's OpenAI server on
a GGUF, from the environment `tunepipe llamacpp-env` builds); the last two behind tunepipe's front, which confines
runtime loads, versions adapter names and runs the A/B router. Settings that depend on the hardware (engine choice, vLLM interpreter,
max-loras, max-lora-rank, GPU memory share) default to the environment profile's `serving:`
block; a field set here overrides it. Flags of `tunepipe serve` are named as vLLM names them.
"""

from __future__ import annotations

import math
import re
from typing import Literal

from pydantic import Field, ValidationInfo, field_validator, model_validator
from tunepipe.schemas.base import StrictModel, resolve_model, resolve_path
from tunepipe.schemas.secret_refs import check_literal

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.:-]*$")


class VLLMOptions(StrictModel):
    """How `--engine vllm` starts vLLM. Unset fields come from the environment profile's `serving:`."""

    python: str | None = Field(
        default=None,
        description="Interpreter of vLLM's own environment; runs `python -m vllm.entrypoints.openai.api_server`. "
        "Default: the profile's serving.vllm_python, else the managed environment its serving.vllm_env names.",
    )
    executable: str | None = Field(
        default=None, description="A `vllm` executable to run as `vllm serve ...` (instead of python or image)."
    )
    image: str | None = Field(
        default=None,
        description="Container image with vLLM (e.g. vllm/vllm-openai), run with docker; the base and adapter "
        "directories are mounted read-only at the same paths. Default: the profile's serving.vllm_image.",
    )
    docker: str = Field(default="docker", description="Container CLI used with `image` (docker or podman).")
    quantization: Literal["bitsandbytes", "awq", "gptq", "fp8"] | None = Field(
        default=None, description="vLLM --quantization; default: what the registry says the base was exported as."
    )
    dtype: Literal["auto", "bfloat16", "float16", "float32"] | None = Field(
        default=None, description="vLLM --dtype; default: the profile's dtype."
    )
    gpu_memory_utilization: float | None = Field(
        default=None, gt=0, le=1, description="vLLM --gpu-memory-utilization; default: the profile's."
    )
    tensor_parallel_size: int | None = Field(default=None, ge=1, description="vLLM --tensor-parallel-size; default: the profile's.")
    max_cpu_loras: int | None = Field(default=None, ge=1, description="vLLM --max-cpu-loras; default: the profile's.")
    max_model_len: int | None = Field(
        default=None, ge=1, description="vLLM --max-model-len; default: the profile's serving.vllm_max_model_len, else the model's."
    )
    cpu_kvcache_gb: float | None = Field(
        default=None, gt=0, description="KV-cache GiB of a CPU vLLM (VLLM_CPU_KVCACHE_SPACE); default: the profile's."
    )
    tool_call_parser: str | None = Field(
        default=None, pattern=r"^[a-z0-9_]{1,40}$",
        description="vLLM --tool-call-parser (started with --enable-auto-tool-choice), e.g. hermes, llama3_json, mistral; "
        "`none`: tool calling off. Default: derived from the base's chat template (hermes for `<tool_call>` templates: "
        "Qwen2.5/Qwen3 and ChatML tool templates; llama3_json for Llama 3.1+; mistral for `[TOOL_CALLS]`); off when the "
        "template takes no tools.",
    )
    extra_args: list[str] = Field(default_factory=list, description="Further `vllm serve` arguments, appended verbatim.")
    health_timeout_s: float = Field(
        default=900.0, gt=0, description="Seconds to wait for vLLM's /health after starting (model load and CUDA graphs)."
    )
    stop_timeout_s: float = Field(default=30.0, gt=0, description="Seconds between SIGTERM and SIGKILL when stopping vLLM.")
    log_file: str | None = Field(default=None, description="Where vLLM's stdout/stderr go; default `<workdir>/logs/vllm-<port>.log`.")


class LlamaCppOptions(StrictModel):
    """How `--engine llamacpp` starts llama-cpp-python's OpenAI server (llama_cpp.server) on a GGUF."""

    python: str | None = Field(
        default=None,
        description="Interpreter of llama.cpp's environment (runs `python -m llama_cpp.server`). Default: the one "
        "`tunepipe llamacpp-env` builds into tunepipe's cache.",
    )
    gguf_type: str | None = Field(
        default=None,
        description="Which GGUF of an export's gguf output to serve when `base` is an export directory "
        "(`model-<type>.gguf`, e.g. q8_0). Default: the only one there, else f16.",
    )
    n_ctx: int = Field(default=0, ge=0, description="Context length llama.cpp allocates; 0: the model's own.")
    threads: int | None = Field(default=None, ge=1, description="CPU threads llama.cpp uses; default: all cores.")
    health_timeout_s: float = Field(default=300.0, gt=0, description="Seconds to wait for the server to answer after starting.")
    stop_timeout_s: float = Field(default=10.0, gt=0, description="Seconds between SIGTERM and SIGKILL when stopping it.")
    log_file: str | None = Field(
        default=None, description="Where the server's stdout/stderr go; default `<workdir>/logs/llamacpp-<port>.log`."
    )


class RouterConfig(StrictModel):
    """Online A/B: requests for `name` are split between adapter versions by weight, each logged."""

    name: str = Field(description="Model name clients request (e.g. `support-bot`); not an adapter's own name.")
    versions: dict[str, float] = Field(
        description="Served adapter name → traffic weight (weights are normalised), e.g. {bot-v3: 0.9, bot-v4: 0.1}."
    )
    log_path: str = Field(
        description="JSONL file that gets one line per routed request: time, request id, router, version served, "
        "user, tokens, latency, status."
    )
    sticky: bool = Field(
        default=True,
        description="Requests carrying the OpenAI `user` field always go to the same version (hash of the user), "
        "so one user sees one arm; requests without it are assigned at random.",
    )
    seed: int | None = Field(default=None, description="Seed of the random assignment (reproducible splits in tests).")

    @field_validator("versions")
    @classmethod
    def _two_positive(cls, value: dict[str, float]) -> dict[str, float]:
        if len(value) < 2:
            raise ValueError("an A/B router needs at least two versions")
        bad = [name for name, weight in value.items() if not math.isfinite(weight) or weight <= 0]
        if bad:  # nan compares false with everything and inf swallows the rest: both sent all traffic to one arm
            raise ValueError(f"weights must be finite and > 0 (drop a version instead of weighting it 0): {bad}")
        return value

    @field_validator("log_path")
    @classmethod
    def _resolve(cls, value: str, info: ValidationInfo) -> str:
        return resolve_path(value, info)


class ServeConfig(StrictModel):
    """A multi-LoRA OpenAI-compatible server: the base, its adapters, the engine, and the limits."""

    base: str | None = Field(
        default=None, description="Base model: hub id, local directory, or GGUF file. Default: the adapter registry's current base."
    )
    served_model_name: str | None = Field(
        default=None, description="Name the base model is listed and addressed under (vLLM --served-model-name). Default: "
        "a hub id (or the registry's base) as given, a local directory by its name (a GGUF file by its stem); requests "
        "naming the base's path are still served."
    )
    lora_modules: dict[str, str] = Field(
        default_factory=dict,
        description="Adapters loaded at start, name → directory (vLLM --lora-modules name=path; llamacpp: a GGUF LoRA file). "
        "Default: the registry's current adapters.",
    )
    engine: Literal["auto", "embedded", "vllm", "llamacpp"] = Field(
        default="auto",
        description="`embedded` (transformers + peft in-process), `vllm` (a vLLM process from its own environment), "
        "`llamacpp` (llama.cpp's server on a GGUF; adapters as GGUF LoRAs), or `auto`: vllm where the profile says so "
        "and its interpreter/image/executable exists, else embedded.",
    )
    host: str = Field(default="127.0.0.1", description="Address the server listens on.")
    port: int = Field(default=8000, ge=0, le=65535, description="Port the server listens on (0: any free port, embedded only).")
    api_key: str | None = Field(
        default=None,
        description="Require `Authorization: Bearer <key>` on /v1 (vLLM --api-key), the key given by environment "
        "variable: `${SERVE_API_KEY}` (a literal key is refused: configs are stored with their runs).",
    )
    api_key_env: str | None = Field(default=None, description="Name of an environment variable holding the API key.")
    max_loras: int | None = Field(
        default=None, ge=1,
        description="Adapters resident at once (vLLM --max-loras); embedded refuses loads beyond it. Default: the profile's.",
    )
    max_lora_rank: int | None = Field(
        default=None, ge=1, description="Largest adapter rank accepted (vLLM --max-lora-rank). Default: the profile's."
    )
    allowed_adapter_dirs: list[str] = Field(
        default_factory=list,
        description="Directories `POST /v1/load_lora_adapter` may load from (the path must resolve inside one, "
        "symlinks followed). Empty: runtime loading is refused. `tunepipe serve` adds the registry's directory.",
    )
    max_tokens_limit: int = Field(
        default=512, ge=1, description="Largest `max_tokens` a request may ask for; also the default when it asks none."
    )
    max_request_bytes: int = Field(default=1_000_000, ge=1024, description="Largest request body accepted (413 beyond).")
    request_body_timeout_s: float = Field(
        default=30.0, gt=0,
        description="Seconds a request's body may take to arrive; a slower one is answered 408 and its connection "
        "closed (a client trickling bytes would otherwise hold the connection as long as it likes).",
    )
    drain_timeout_s: float = Field(
        default=5.0, ge=0,
        description="On SIGTERM or Ctrl-C: seconds to let requests in flight finish before they are cut; the "
        "server exits right after they drain or this bound passes.",
    )
    max_concurrency: int = Field(
        default=64, ge=1, description="Generation requests in flight at once; more are answered 429 (retry later)."
    )
    max_batch_size: int = Field(default=8, ge=1, description="Sequences generated together in one batch (any mix of adapters).")
    batch_window_ms: float = Field(
        default=10.0, ge=0, description="How long the embedded batcher waits for more requests to join a batch."
    )
    vllm: VLLMOptions = Field(default_factory=VLLMOptions, description="How the vLLM engine is started.")
    llamacpp: LlamaCppOptions = Field(default_factory=LlamaCppOptions, description="How the llama.cpp engine is started.")
    router: RouterConfig | None = Field(default=None, description="Online A/B split between two adapter versions.")

    @field_validator("api_key")
    @classmethod
    def _key_by_reference(cls, value: str | None) -> str | None:
        return None if value is None else check_literal(value, "api_key")

    @field_validator("base")
    @classmethod
    def _resolve_base(cls, value: str | None, info: ValidationInfo) -> str | None:
        return None if value is None else resolve_model(value, info)

    @field_validator("lora_modules")
    @classmethod
    def _resolve_modules(cls, value: dict[str, str], info: ValidationInfo) -> dict[str, str]:
        bad = [name for name in value if not _NAME.match(name)]
        if bad:
            raise ValueError(f"adapter names must be letters, digits and _ . : - (no spaces, no '/'): {bad}")
        return {name: resolve_path(path, info) for name, path in value.items()}

    @field_validator("allowed_adapter_dirs")
    @classmethod
    def _resolve_dirs(cls, value: list[str], info: ValidationInfo) -> list[str]:
        return [resolve_path(path, info) for path in value]

    @model_validator(mode="after")
    def _consistent(self) -> "ServeConfig":
        if self.api_key and self.api_key_env:
            raise ValueError("set api_key or api_key_env, not both")
        if self.router is not None:
            if self.router.name in self.lora_modules:
                raise ValueError(f"router.name {self.router.name!r} is also an adapter's name: choose another")
            if self.lora_modules and (missing := sorted(set(self.router.versions) - set(self.lora_modules))):
                raise ValueError(f"router.versions names adapters that are not in lora_modules: {missing}")
        launchers = [name for name in ("python", "executable", "image") if getattr(self.vllm, name)]
        if len(launchers) > 1:
            raise ValueError(f"vllm: set one of python, executable, image (got {launchers})")
        return self
