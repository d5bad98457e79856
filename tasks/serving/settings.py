"""What a server serves: the CLI's and config's values, over the registry's current adapters, over
the environment profile's serving defaults. One function per source, one to merge them.

Precedence: a value given on the command line or in `serve:` wins; the base and adapters not given
come from the adapter registry (`AdapterRegistry.serving(alias)`); limits not given come from the
profile, raised where the registry needs more (a larger rank, more adapters than slots).
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

from tunepipe.schemas.environment import EnvironmentProfile
from tunepipe.schemas.serve import ServeConfig
from tunepipe.tasks.core.registry import AdapterRegistry
from tunepipe.tasks.core.secrets import SecretMissing, remember, resolve
from tunepipe.tasks.serving.engines import engine_named
from tunepipe.tasks.serving.tools import base_chat_template, tool_call_parser
from tunepipe.tasks.serving.vllm_env import env_python
from tunepipe.tasks.training.hardware import hardware

# vLLM accepts only these --max-lora-rank values (vllm/config/lora.py, MaxLoRARanks).
VLLM_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)
# transformers' quantization_config.quant_method → vLLM --quantization.
VLLM_QUANTIZATION = {"bitsandbytes": "bitsandbytes", "awq": "awq", "gptq": "gptq", "fp8": "fp8"}


class ServeSettingsError(ValueError):
    """Nothing (or something inconsistent) to serve; the message says what to pass instead."""


@dataclass
class RegistryServing:
    """What the registry says is current: one base, its adapters by serving name."""

    base: str | None
    adapters: dict[str, str] = field(default_factory=dict)
    max_rank: int = 0
    quantization: str | None = None
    root: str | None = None  # the registry's local root: runtime loads from it are allowed


def adapter_rank(path: str | Path) -> int:
    """The largest rank in an adapter directory's adapter_config.json (r, or a rank_pattern entry)."""
    config = json.loads((Path(path) / "adapter_config.json").read_text())
    return max([int(config.get("r") or 0), *(int(v) for v in (config.get("rank_pattern") or {}).values())])


def base_quantization(base: str | None) -> str | None:
    """vLLM's --quantization for a pre-quantized local base (its config.json's quantization_config), else None."""
    if base is None or not (Path(base) / "config.json").is_file():
        return None
    method = (json.loads((Path(base) / "config.json").read_text()).get("quantization_config") or {}).get("quant_method")
    return VLLM_QUANTIZATION.get(str(method).lower()) if method else None


def registry_serving(root: str | os.PathLike, alias: str = "prod") -> RegistryServing:
    """Every adapter `alias` points at in the registry, under its adapter name, and their common base."""
    registry = AdapterRegistry(root)
    entries = registry.serving(alias)
    adapters = {name: registry.local_path(entry) for name, entry in sorted(entries.items())}
    bases = sorted({entry.base_model for entry in entries.values() if entry.base_model})
    if len(bases) > 1:
        raise ServeSettingsError(
            f"registry {root}: the `{alias}` adapters apply to different bases {bases}; one server serves one base: "
            "start one server per base (tunepipe serve BASE --lora-modules ...)"
        )
    base = bases[0] if bases else None
    return RegistryServing(
        base=base, adapters=adapters, max_rank=max((adapter_rank(p) for p in adapters.values()), default=0),
        quantization=base_quantization(base), root=str(Path(root).resolve()) if registry.is_local else None,
    )


def vllm_rank(rank: int) -> int:
    """The smallest --max-lora-rank vLLM accepts that holds `rank`."""
    for allowed in VLLM_LORA_RANKS:
        if allowed >= rank:
            return allowed
    raise ServeSettingsError(f"adapter rank {rank} exceeds vLLM's largest --max-lora-rank {VLLM_LORA_RANKS[-1]}")


def vllm_launcher(config: ServeConfig, profile: EnvironmentProfile) -> dict[str, str | None]:
    """Which of vLLM's environments starts it: {"executable"|"image"|"python": value, the others None}.
    The config's choice wins over the profile's; an image wins over an interpreter."""
    options = config.vllm
    none = {"executable": None, "image": None, "python": None}
    managed = str(env_python(profile.serving.vllm_env)) if profile.serving.vllm_env else None
    for kind, value in (("executable", options.executable), ("image", options.image), ("python", options.python),
                        ("image", profile.serving.vllm_image), ("python", profile.serving.vllm_python),
                        ("python", managed)):
        if value:
            return {**none, kind: value}
    return none


def vllm_launcher_available(config: ServeConfig, profile: EnvironmentProfile) -> bool:
    """True when the vLLM environment that would start it is present on this host."""
    launcher = vllm_launcher(config, profile)
    if launcher["executable"]:
        return Path(launcher["executable"]).exists() or shutil.which(launcher["executable"]) is not None
    if launcher["image"]:
        return shutil.which(config.vllm.docker) is not None
    return bool(launcher["python"]) and Path(launcher["python"]).exists()


def choose_engine(config: ServeConfig, profile: EnvironmentProfile) -> str:
    """`auto`: vLLM where the profile serves with vLLM (GPU, or the CPU build) and vLLM's environment exists,
    else embedded."""
    if config.engine != "auto":
        return config.engine
    wants_vllm = profile.serving.engine == "vllm"
    return "vllm" if wants_vllm and vllm_launcher_available(config, profile) else "embedded"


def resolve_serve_config(config: ServeConfig, profile: EnvironmentProfile, from_registry: RegistryServing | None = None) -> ServeConfig:
    """A copy of `config` with the base, adapters, engine and limits filled in."""
    from_registry = from_registry or RegistryServing(base=None)
    base = config.base or from_registry.base
    if base is None:
        raise ServeSettingsError(
            "no base model to serve: pass one (tunepipe serve BASE), set serve.base, or register adapters with their "
            "base model (the deploy stage does)"
        )

    engine = choose_engine(config, profile)
    server = engine_named(engine)
    modules = server.resolve_adapters(dict(config.lora_modules) if config.lora_modules else dict(from_registry.adapters))
    base = server.resolve_base(base, config.model_copy(update={"lora_modules": modules}))  # a GGUF: see the engine
    ranks = [adapter_rank(p) for p in modules.values() if (Path(p) / "adapter_config.json").is_file()]
    max_rank = server.resolve_rank(config.max_lora_rank or max([profile.serving.max_lora_rank, *ranks]))
    allowed = list(config.allowed_adapter_dirs)
    if from_registry.root and from_registry.root not in allowed:
        allowed.append(from_registry.root)  # the registry's own copies are what deploy hot-loads
    vllm = config.vllm.model_copy(update={
        **vllm_launcher(config, profile),
        "quantization": config.vllm.quantization or from_registry.quantization or base_quantization(base),
        "dtype": config.vllm.dtype or hardware(profile).dtype,
        "gpu_memory_utilization": config.vllm.gpu_memory_utilization or profile.serving.gpu_memory_utilization,
        "tensor_parallel_size": config.vllm.tensor_parallel_size or profile.serving.tensor_parallel_size,
        "max_model_len": config.vllm.max_model_len or profile.serving.vllm_max_model_len,
        "cpu_kvcache_gb": config.vllm.cpu_kvcache_gb or profile.serving.vllm_cpu_kvcache_gb,
    })
    max_loras = config.max_loras or max(profile.serving.max_loras, len(modules), 1)
    vllm = vllm.model_copy(update={"max_cpu_loras": vllm.max_cpu_loras or max(profile.serving.max_cpu_loras, max_loras)})
    vllm = vllm.model_copy(update={"tool_call_parser": vllm_tool_call_parser(config.vllm.tool_call_parser, base)})
    resolved = config.model_copy(update={
        "base": base, "lora_modules": modules, "engine": engine, "max_lora_rank": max_rank, "max_loras": max_loras,
        "allowed_adapter_dirs": allowed, "vllm": vllm,
        "served_model_name": config.served_model_name or served_base_name(config.base or from_registry.base),
    })
    check_router(resolved)
    return resolved


def check_router(config: ServeConfig) -> None:
    if config.router is None:
        return
    missing = sorted(set(config.router.versions) - set(config.lora_modules))
    if missing:
        raise ServeSettingsError(
            f"router {config.router.name!r}: versions {missing} are not among the served adapters "
            f"{sorted(config.lora_modules)}: add them with --lora-modules NAME=PATH"
        )


def api_key(config: ServeConfig) -> str | None:
    """The key from the environment variable `api_key_env` names, or `api_key`'s `${NAME}`
    reference resolved; in memory only."""
    if config.api_key_env:
        value = os.environ.get(config.api_key_env)
        if not value:
            raise ServeSettingsError(f"api_key_env: the environment variable {config.api_key_env} is not set")
        remember(value)
        return value
    if config.api_key is None:
        return None
    try:
        return resolve(config.api_key, "api_key")
    except SecretMissing as exc:
        raise ServeSettingsError(str(exc)) from None


def served_base_name(given: str) -> str:
    """The name the base is listed and addressed under by default: a hub id (or the registry's name) as given, a
    local directory by its own name (a GGUF file by its stem), never its absolute path (which says where the
    server's disk keeps it, and changes from host to host)."""
    path = Path(given).expanduser()
    if not (path.exists() or path.is_absolute() or given.startswith(".")):
        return given  # a hub id: already a name
    return path.stem if path.suffix == ".gguf" else path.resolve().name


def vllm_tool_call_parser(chosen: str | None, base: str) -> str | None:
    """vLLM's --tool-call-parser: the configured one, or the one the base's chat template's family needs (None:
    the template takes no tools, or writes calls in a format no parser here names; `none` turns it off)."""
    if chosen is not None:
        return None if chosen == "none" else chosen
    return tool_call_parser(base_chat_template(base))
