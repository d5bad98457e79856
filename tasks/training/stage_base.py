"""The base of every stage that trains a model: the model enters the key by content, and so do
the environment profile's training fields.
"""

from __future__ import annotations

from typing import Any

from tunepipe.schemas.environment import EnvironmentProfile
from tunepipe.tasks.core.stage import Stage, StageFailed
from tunepipe.tasks.lm.modeling import gguf_provenance, gguf_source, model_dir, model_fingerprint


def resolve_model(config_model: str | None, inputs: dict[str, Any], stage: str, order: tuple[str, ...]) -> str:
    """The base model path: the config's (a GGUF as its converted directory), else the first input
    artifact of `order` present."""
    if config_model:
        return model_dir(config_model)
    for name in order:
        if name in inputs:
            return inputs[name].path
    raise StageFailed(f"{stage}: no base model: set {stage}.model, or give the stage a {' or '.join(order)} input")


def model_payload(model: str | None, revision: str | None) -> str | None:
    """A local model enters the key as a digest of its files, a hub model as id@revision."""
    if model is None:
        return None

    return model_fingerprint(model, revision)


def gguf_payload(model: str | None) -> dict[str, str] | None:
    """For a GGUF base: the quantisation its weights were dequantised from (a property of the file's
    bytes, so it moves no key the file's digest does not), from its conversion's provenance (the
    stage converts it anyway)."""
    if model is None or gguf_source(model) is None:
        return None
    quantisation = gguf_provenance(model)["dequantised_from"]
    return {"dequantised_from": quantisation, "note": f"weights dequantised from {quantisation}"}


def training_env_payload(env: EnvironmentProfile) -> dict[str, Any]:
    """Profile fields that change a training result (not launcher, memory size or work pool)."""
    return {
        "dtype": env.dtype,
        "quantization": env.quantization.model_dump(mode="json"),
        "per_device_batch_size": env.per_device_batch_size,
        "gradient_accumulation_steps": env.gradient_accumulation_steps,
        # Every rank's processes: the global batch (a multi-node job's nodes x per-node processes;
        # one machine's value is unchanged, so its keys did not move).
        "num_processes": env.world_size,
        "attn_implementation": env.attn_implementation,
        "liger_kernel": env.liger_kernel,
        "packed_attention": list(env.packed_attention),
        "torch_compile": env.torch_compile,
        "length_bucketing": env.length_bucketing,
        "deepspeed_config": env.deepspeed_config,
    }


class TrainingStage(Stage):
    """A stage that trains a model: the model enters the key by content, and so do the profile's
    training fields (dtype, batch, accumulation, ...)."""

    def key_payload(self, config: Any) -> Any:
        payload = config.model_dump(mode="json")
        payload["model"] = model_payload(config.model, config.revision)
        if (source := gguf_payload(config.model)) is not None:
            payload["model_gguf"] = source  # the manifest says the weights are a dequantisation
        return payload

    def env_payload(self, env: EnvironmentProfile) -> dict[str, Any]:
        return training_env_payload(env)
