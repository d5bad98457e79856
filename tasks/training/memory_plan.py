"""Parameter counts and a peak-memory estimate from a model's config alone (no weights loaded).

The model is built on the meta device (`accelerate.init_empty_weights`), the real PEFT config
of the chosen method is applied to it, and PEFT counts (`get_nb_trainable_parameters`), so the
trainable count is the one training will print. Memory is an estimate per device:

    weights      all parameters at the profile dtype (a Mixture of Experts holds every expert,
                 though a token uses only `active_params`); QLoRA: 4-bit linear layers (+ quantization
                 constants) and the rest in float32 (prepare_model_for_kbit_training)
    gradients    trainable parameters (PEFT keeps adapters in float32)
    optimizer    AdamW: 2 states per trainable parameter (8-bit optimisers: 1 byte each); DeepSpeed
                 mixed precision: fp32 master + 2 fp32 states, partitioned by ZeRO stage / offloaded;
                 LOMO: none, and its update is fused into the backward pass, so only the largest
                 trainable tensor's gradient exists at a time; AdaLomo: the same plus factored second
                 moments (a row and a column vector per matrix, float32)
    activations  per token per block about 8.5*h + 4*i values (MoE: i = k experts' widths + shared) (+ 2.5*heads*seq for eager attention),
                 for the blocks gradients flow through; with gradient checkpointing only each block's
                 input plus one block recomputed; plus the logits (profile dtype, float32 under QLoRA,
                 and float32 for the loss),
                 which a profile with `liger_kernel` never materialises (fused, chunked cross-entropy)
    overhead     10% of the above (allocator fragmentation, workspaces)

`check_fit` is what the sft stage runs first: it raises `StageFailed` naming what to change.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from tunepipe.schemas.environment import EnvironmentProfile
from tunepipe.schemas.sft import (
    LOMO_OPTIMIZERS,
    FreezeMethod,
    QLoraMethod,
    TrainingConfig,
)
from tunepipe.tasks.core.environment import deepspeed_config_path
from tunepipe.tasks.core.stage import StageFailed
from tunepipe.tasks.training import moe, peft_methods

GIB = 2**30
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
OVERHEAD = 0.10


def model_config(model: Any) -> Any:
    """A transformers config from a config object, a local directory or a hub id."""
    if hasattr(model, "to_dict") and hasattr(model, "model_type"):
        return model
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(str(model))


def meta_model(model: Any) -> Any:
    """The causal LM of a config, on the meta device: shapes only, no memory, no weights read."""
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    with init_empty_weights():
        meta = AutoModelForCausalLM.from_config(model_config(model))
    meta.tie_weights()  # tied embeddings count once, as on a real model
    return meta


def with_method(model: Any, method: Any) -> Any:
    """The meta model with the method applied (a PeftModel, or flags set for full/freeze/bitfit)."""
    if not method.is_peft:
        try:
            peft_methods.mark_trainable(model, method)
        except ValueError as exc:
            raise StageFailed(str(exc)) from exc
        return model
    from peft import get_peft_model

    prepared = get_peft_model(model, peft_methods.peft_config(method, total_step=1000, for_counting=True))
    for name, param in prepared.named_parameters():
        if ".ranknum." in name:
            # AdaLoRA's rank counter is a frozen parameter; moving it to the meta device re-wraps it
            # as a trainable one, which a real model never has.
            param.requires_grad_(False)
    return prepared


def count(model: Any, method: Any) -> tuple[int, int, Any]:
    """(trainable, total, prepared meta model) for `method` on the model named or configured."""
    prepared = with_method(meta_model(model), method)
    trainable, total = peft_methods.count_parameters(prepared)
    return trainable, total, prepared


def _deepspeed(env: EnvironmentProfile) -> dict[str, Any]:
    path = deepspeed_config_path(env)
    if path is None:
        return {"stage": 0, "offload_optimizer": False, "offload_param": False}
    zero = json.loads(Path(path).read_text()).get("zero_optimization", {})
    return {
        "stage": int(zero.get("stage", 0)),
        "offload_optimizer": (zero.get("offload_optimizer") or {}).get("device", "none") not in ("none", None),
        "offload_param": (zero.get("offload_param") or {}).get("device", "none") not in ("none", None),
    }


def _is_linear(module: Any) -> bool:
    import torch

    return isinstance(module, torch.nn.Linear) or type(module).__name__ == "Conv1D"


def _quantized_params(model: Any) -> int:
    """Parameters bitsandbytes stores in 4 bits: linear layers other than the output head."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    head = base.get_output_embeddings()
    total = 0
    for name, module in base.named_modules():
        if _is_linear(module) and module is not head and "lora_" not in name and hasattr(module, "weight"):
            total += module.weight.numel()
    return total


def _largest_trainable(model: Any) -> int:
    return max((p.numel() for p in model.parameters() if p.requires_grad), default=0)


def _factored_moments(model: Any) -> int:
    """AdaLomo's state: a row and a column second-moment vector per matrix, the full tensor otherwise."""
    total = 0
    for param in model.parameters():
        if param.requires_grad:
            total += sum(param.shape[-2:]) if param.dim() >= 2 else param.numel()
    return total


def _grad_blocks(model: Any, method: Any, layers: int) -> int:
    """Transformer blocks activations must be kept for (gradients flow through them)."""
    if isinstance(method, FreezeMethod) and not method.train_modules:
        return min(method.train_last_layers, layers)
    return layers


def memory_estimate(
    prepared: Any, method: Any, env: EnvironmentProfile, seq_len: int, trainable: int, total: int, training: TrainingConfig | None = None
) -> dict[str, Any]:
    """Peak training memory per device in GiB, by component (see the module docstring)."""
    cfg = prepared.config if not hasattr(prepared, "get_base_model") else prepared.get_base_model().config
    text_cfg = cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg
    h = text_cfg.hidden_size
    layers = text_cfg.num_hidden_layers
    heads = text_cfg.num_attention_heads
    inter = getattr(text_cfg, "intermediate_size", None) or getattr(text_cfg, "n_inner", None) or 4 * h
    if (counts := moe.experts(text_cfg)) is not None:
        # A token's FFN activations: its k routed experts (+ a shared expert), not all E of them.
        expert_inter = getattr(text_cfg, "moe_intermediate_size", None) or inter
        inter = counts[1] * expert_inter + (getattr(text_cfg, "shared_expert_intermediate_size", None) or 0)
    vocab = text_cfg.vocab_size
    b, s = env.per_device_batch_size, seq_len
    dt = DTYPE_BYTES[env.dtype]
    ds = _deepspeed(env)
    n = env.num_processes

    if isinstance(method, QLoraMethod):
        quantized = _quantized_params(prepared)
        double = peft_methods.quantization_settings(method, env)["double_quant"]
        per_param = 0.5 + (1 / 64 + 4 / (64 * 256) if double else 4 / 64)
        weights = quantized * per_param + (total - quantized) * 4
    else:
        weights = total * dt
    trainable_bytes = 4 if method.is_peft else dt
    grads = trainable * trainable_bytes
    # The optimizer the trainer will build from the same configs (an 8-bit one holds 2 bytes per
    # trainable parameter, not Adam's 8).
    optim = peft_methods.optimizer_name(method, training or TrainingConfig())
    if ds["stage"] > 0:
        # DeepSpeed mixed precision: fp32 master weights + two fp32 Adam states, partitioned over ranks.
        optimizer = trainable * (4 + 8) / n
        if ds["offload_optimizer"]:
            optimizer = 0.0
        if ds["stage"] >= 2:
            grads /= n
        if ds["stage"] >= 3:
            weights = 0.0 if ds["offload_param"] else weights / n
    elif optim in LOMO_OPTIMIZERS:
        # Fused update: each gradient is applied and freed as soon as backward produces it.
        grads = _largest_trainable(prepared) * trainable_bytes
        optimizer = _factored_moments(prepared) * 4 if optim == "adalomo" else 0.0
    elif "8bit" in optim:
        optimizer = trainable * 2.0
    elif optim == "sgd":
        optimizer = 0.0
    else:
        optimizer = trainable * 2 * trainable_bytes

    blocks = _grad_blocks(prepared, method, layers)
    per_token_block = 8.5 * h + 4 * inter + (2.5 * heads * s if env.attn_implementation == "eager" else 0)
    if env.gradient_checkpointing:
        acts = b * s * (blocks * h + per_token_block) * dt
    else:
        acts = b * s * blocks * per_token_block * dt
    # The logits in the training dtype plus their float32 copy for the loss. QLoRA's output head is
    # float32 (prepare_model_for_kbit_training), so its logits are float32 from the start: measured
    # on an H100, the dtype figure under-estimated a QLoRA peak by 20%. Liger's cross-entropy is
    # fused with the output head and works on chunks of tokens, so it never holds them.
    logit_bytes = 4 + 4 if isinstance(method, QLoraMethod) else dt + 4
    logits = 0 if env.liger_kernel else b * s * vocab * logit_bytes
    components = {
        "weights_gb": weights / GIB,
        "gradients_gb": grads / GIB,
        "optimizer_gb": optimizer / GIB,
        "activations_gb": acts / GIB,
        "logits_gb": logits / GIB,
    }
    subtotal = sum(components.values())
    components["overhead_gb"] = subtotal * OVERHEAD
    out = {k: round(v, 4) for k, v in components.items()}
    out["total_gb"] = round(subtotal * (1 + OVERHEAD), 4)
    out["device_memory_gb"] = env.device_memory_gb
    out["fits"] = out["total_gb"] <= env.device_memory_gb
    out["assumptions"] = {
        "batch": b, "seq_len": s, "dtype": env.dtype, "gradient_checkpointing": env.gradient_checkpointing,
        "attn_implementation": env.attn_implementation, "liger_kernel": env.liger_kernel, "zero_stage": ds["stage"],
        "processes": n, "optimizer": optim,
    }
    return out


def plan(
    model_name_or_path: Any, method_config: Any, env: EnvironmentProfile, seq_len: int, training: TrainingConfig | None = None
) -> dict[str, Any]:
    """Parameter counts and memory estimate of training `method_config` on the model under `env`.

    `model_name_or_path`: a local directory, a hub id, or a transformers config object.
    Raises StageFailed when the method cannot train the model at all (bitfit on a bias-less model).
    """
    trainable, total, prepared = count(model_name_or_path, method_config)
    base = prepared.get_base_model() if hasattr(prepared, "get_base_model") else prepared
    counts = moe.experts(base.config)
    return {
        "method": method_config.name,
        "environment": env.name,
        "total_params": total,
        # Mixture of Experts: all parameters are held in memory, a token runs through the active ones.
        "active_params": moe.active_parameters(base, total),
        "experts": {"per_block": counts[0], "active_per_token": counts[1]} if counts else None,
        "trainable_params": trainable,
        "trainable_percent": round(100 * trainable / total, 4) if total else 0.0,
        "memory": memory_estimate(prepared, method_config, env, seq_len, trainable, total, training),
    }


def plan_profiles(model_name_or_path: Any, method_config: Any, envs: list[EnvironmentProfile], seq_len: int) -> list[dict[str, Any]]:
    """`plan` for each profile (one table row per profile)."""
    return [plan(model_name_or_path, method_config, env, seq_len) for env in envs]


def suggestions(
    model_name_or_path: Any, method: Any, env: EnvironmentProfile, seq_len: int, training: TrainingConfig | None = None
) -> list[str]:
    """What would make an over-budget run fit, each with its estimated total."""
    out: list[str] = []

    def total(m: Any, e: EnvironmentProfile) -> float:
        return plan(model_name_or_path, m, e, seq_len, training)["memory"]["total_gb"]

    if method.is_peft and not isinstance(method, QLoraMethod) and hasattr(method, "r"):
        qlora = QLoraMethod(name="qlora", r=method.r, alpha=method.alpha, target_modules=method.target_modules)
        out.append(f"use method qlora (4-bit base): ~{total(qlora, env):.1f} GiB")
    elif not method.is_peft:
        qlora = QLoraMethod(name="qlora")
        out.append(f"use a PEFT method such as qlora (4-bit base, LoRA r=8): ~{total(qlora, env):.1f} GiB")
    if env.per_device_batch_size > 1:
        smaller = env.model_copy(update={"per_device_batch_size": 1, "gradient_accumulation_steps": env.gradient_accumulation_steps * env.per_device_batch_size})
        out.append(
            f"lower per_device_batch_size from {env.per_device_batch_size} to 1 (raise gradient_accumulation_steps "
            f"to {smaller.gradient_accumulation_steps} to keep the effective batch): ~{total(method, smaller):.1f} GiB"
        )
    if not env.gradient_checkpointing:
        out.append(f"turn on gradient_checkpointing: ~{total(method, env.model_copy(update={'gradient_checkpointing': True})):.1f} GiB")
    if _deepspeed(env)["stage"] < 3:
        from tunepipe.tasks.core.environment import load_environment

        zero3 = load_environment("multi-gpu-deepspeed-zero3").model_copy(
            update={"per_device_batch_size": env.per_device_batch_size, "device_memory_gb": env.device_memory_gb}
        )
        out.append(
            f"shard with DeepSpeed ZeRO (profile multi-gpu-deepspeed for ZeRO-2, multi-gpu-deepspeed-zero3 for "
            f"ZeRO-3 with CPU offload: ~{total(method, zero3):.1f} GiB per GPU on {zero3.num_processes} GPUs)"
        )
    out.append(f"lower max_length from {seq_len}")
    return out


def check_fit(
    model_name_or_path: Any, method: Any, env: EnvironmentProfile, seq_len: int, training: TrainingConfig | None = None
) -> dict[str, Any]:
    """The plan, or StageFailed saying what to change when the estimate exceeds the device's memory.

    `training` is the stage's own TrainingConfig, the object the trainer is built from."""
    result = plan(model_name_or_path, method, env, seq_len, training)
    mem = result["memory"]
    if not mem["fits"]:
        parts = ", ".join(f"{k[:-3]} {v:.1f}" for k, v in mem.items() if k.endswith("_gb") and k != "total_gb" and k != "device_memory_gb")
        raise StageFailed(
            f"{method.name} on this model needs ~{mem['total_gb']:.1f} GiB per device ({parts} GiB) but profile "
            f"{env.name} has {env.device_memory_gb:g} GiB. To fit: "
            + "; or ".join(suggestions(model_name_or_path, method, env, seq_len, training))
        )
    return result


def pipeline_plan_target(config: Any) -> tuple[Any, Any, int, TrainingConfig]:
    """(model, method, seq_len, training) the `sft` stage of a pipeline config would train.

    A pipeline that builds its base model has no weights to read before it runs: the model is
    then the Llama config its `base_model` section describes, with the tokenizer's vocabulary
    cap as vocab size (an upper bound on the built model's).
    """
    if config.sft is None:
        raise ValueError(f"{config.name}: the pipeline has no sft section to plan")
    model = config.sft.model or (config.pretrain.model if config.pretrain else None)
    if model is None and config.base_model is not None:
        from tunepipe.tasks.training.modeling import llama_config

        model = llama_config(config.base_model, vocab_size=config.base_model.tokenizer.vocab_size)
    return model, config.sft.method, config.sft.max_length, config.sft.training
