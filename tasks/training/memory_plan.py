"""Parameter counts and a peak-memory estimate from a model's config alone (no weights loaded).

The model is built on the meta device (`accelerate.init_empty_weights`), the real PEFT config
of the chosen method is applied to it, and PEFT counts (`get_nb_trainable_parameters`), so the
trainable count is the one training will print. Memory is an estimate per device:

    weights      all parameters at the profile dtype (a Mixture of Experts holds every expert,
                 though a token uses only `active_params`); QLoRA: 4-bit linear layers (+ quantization
                 constants) and the rest in float32 (prepare_model_for_kbit_training)
    gradients    trainable parameters (PEFT keeps adapters in float32)
    optimizer    AdamW: 2 states per trainable parameter (8-bit optimisers: 1 byte each); DeepSpeed
                 mixed precision: fp32 master + 2 fp32 states;
                 LOMO: none, and its update is fused into the backward pass, so only the largest
                 trainable tensor's gradient exists at a time; AdaLomo: the same plus factored second
                 moments (a row and a column vector per matrix, float32)
    activations  tokens per micro-batch x blocks gradients flow through x values kept per token per block:
                 8.5*h + 4*i (Korthikanti et al.'s count for a SwiGLU block without dropout; MoE: i = the k
                 routed experts' widths plus any shared expert's); Liger keeps
                 4*h + 3*i (its RMSNorm keeps no float32 copies, its SwiGLU recomputes the activation). Under
                 QLoRA the residual stream and the norm outputs (~4*h) are float32 (prepare_model_for_kbit_training
                 upcasts the norms and embeddings). With gradient checkpointing: each block's input plus one block
                 recomputed. Tokens per micro-batch are batch x max_length whether rows are padded (the longest
                 batch is the peak) or packed (best-fit rows are full).
    attention    what the kernel keeps beyond q/k/v/out, per block:
                   flash-attn, flex_attention: nothing quadratic (per-example blocks; flex's block mask is tiny)
                 (with gradient checkpointing, one block's)
                   sdpa: the mask as an additive bias in the compute dtype, which the memory-efficient kernel keeps
                         for backward: batch x s^2 for padded rows, L^2 for a packed batch, which TRL flattens into one
                         row of L = batch x max_length tokens (16k tokens: 0.5 GiB per block, 12 GiB over 24 blocks;
                         this is what the planner missed on the H100 with Liger + packing; inferred from those
                         figures, the benchmark's planned-vs-measured column checks it). Under QLoRA the bias is
                         planned in float32: prepare_model_for_kbit_training upcasts the embeddings and bitsandbytes'
                         Linear4bit returns its input's dtype, and the packed QLoRA peaks sat ~10 GiB above LoRA's
                         (a fit to the H100 figures, like the rest of this term)
                   eager: the scores and probabilities, 2.5 x heads x s^2 values per row, or x L^2 for a packed batch
    reference    DPO (`stage="dpo"`): TRL's frozen `ref` copy of the continued adapter (the base weights are shared);
                 a full-model policy: a whole second model
    logits       by loss path: `nll` (a plain Trainer): the logits at the head's dtype, their float32 copy and the
                 float32 log-softmax kept for backward (+8 bytes per position and vocabulary entry); TRL's default
                 `chunked_nll` (what the sft and pretrain stages run): the head runs on chunks of 256 labelled
                 tokens, so only one chunk's logits exist, in float32 at any model dtype, with its log-softmax, exp,
                 entropy product and gradient (5 x 4 bytes per entry); DPO: the policy's logits over every position
                 kept for backward plus one tensor that size (the reference's logits, then their gradient); a reward
                 model: one value per position; Liger's fused linear cross-entropy: likewise chunked,
                 planned as nothing. QLoRA's head is float32. (The plain Trainer's full logits are the 2x memory gap
                 between it and tunepipe measured unpacked on the H100: benchmarks/README.md.)
    overhead     10% of the above (allocator fragmentation, workspaces)
    process      the profile's `process_memory_gb`: what the training process holds besides tensors (interpreter,
                 libraries, tokenizer), which on a CPU host shares the RAM (measured: benchmarks/cpu_memory_plan.py)

Reward and DPO (`stage`) run each pair's chosen and rejected rows as one batch: twice the rows of sft's
micro-batch for activations and attention. A reward model has a one-output score head and no LM head.

Sharding (`sharding`): with several processes, weights, gradients and optimizer states are divided by
the world size as the profile's ZeRO stage or FSDP mode says (and offloaded ones leave the device);
activations, attention and logits belong to each process's own micro-batch and are never divided.

`check_fit` is what the sft, pretrain, reward and align (pairwise methods) stages run first: it raises
`StageFailed` naming what to change.
"""

from __future__ import annotations

from typing import Any, Literal

from tunepipe.schemas.environment import EnvironmentProfile
from tunepipe.schemas.methods import FreezeMethod, QLoraMethod
from tunepipe.schemas.training import LOMO_OPTIMIZERS, TrainingConfig
from tunepipe.tasks.core.environment import load_environment
from tunepipe.tasks.core.stage import StageFailed
from tunepipe.tasks.lm.modeling import check_loadable, llama_config, load_config
from tunepipe.tasks.training import moe, peft_methods
from tunepipe.tasks.training.hardware import hardware

GIB = 2**30
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
OVERHEAD = 0.10


def model_config(model: Any) -> Any:
    """A transformers config from a config object, a local directory or a hub id."""
    if hasattr(model, "to_dict") and hasattr(model, "model_type"):
        return model

    return load_config(check_loadable(str(model)))


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


CHUNKED_LOSS_TOKENS = 256  # TRL's chunked_nll chunk (trl.trainer.sft_trainer._CHUNKED_LM_HEAD_CHUNK_SIZE)
# TRL's chunk works in float32 whatever the model's dtype (`h.float() @ w.float().t()`) and holds the chunk's logits,
# their log-softmax, its exp and the entropy product it logs; in backward a gradient of that size joins them.
CHUNKED_LOSS_COPIES = 5
PlanStage = Literal["sft", "reward", "dpo"]
# Rows a micro-batch of `per_device_batch_size` examples runs: reward and DPO concatenate chosen and rejected.
ROWS_PER_EXAMPLE = {"sft": 1, "reward": 2, "dpo": 2}
DPO_LOGITS_COPIES = 2  # the kept logits + the reference's logits (forward) or the logits' gradient (backward)


def score_head_delta(model: Any, h: int) -> int:
    """Parameters a sequence-classification model has beyond the causal LM's count: its one-output score head,
    less an untied LM head it does not have (tied embeddings stay: the input embedding is still needed)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    head, embed = base.get_output_embeddings(), base.get_input_embeddings()
    untied = head is not None and embed is not None and head.weight is not embed.weight
    return h - (head.weight.numel() if untied else 0)


def reference_bytes(stage: str, method: Any, trainable: int, total: int, dt: int, trainable_bytes: int) -> float:
    """DPO's frozen reference: for a PEFT policy, TRL's `ref` copy of the continued adapter (the base weights
    are shared, the adapter disabled or swapped); for a full-model policy, a whole second model."""
    if stage != "dpo":
        return 0.0
    return trainable * trainable_bytes if method.is_peft else total * dt


def activation_bytes_per_token(
    h: int, inter: int, blocks: int, dt: int, *, liger: bool, qlora: bool, checkpointing: bool
) -> float:
    """Bytes kept for backward per token, over the blocks gradients flow through (see the module docstring)."""
    per_block_values = (4 * h + 3 * inter) if liger else (8.5 * h + 4 * inter)
    per_block = per_block_values * dt + (4 * h * (4 - dt) if qlora else 0)  # float32 residual and norm outputs
    if checkpointing:
        return blocks * h * (4 if qlora else dt) + per_block
    return blocks * per_block


def attention_bytes(kernel: str, b: int, s: int, heads: int, blocks: int, dt: int, *, padding_free: bool) -> float:
    """Quadratic attention state kept for backward (see the module docstring): none for flash-attn and flex."""
    # A padding-free batch is one flattened row of b*s tokens; padded rows are b rows of s.
    rows, length = (1, b * s) if padding_free else (b, s)
    if kernel == "sdpa":
        return blocks * rows * length * length * dt
    if kernel == "eager":
        return blocks * rows * 2.5 * heads * length * length * dt
    return 0.0


def logits_bytes(loss: str, tokens: int, vocab: int, dt: int, *, float32_head: bool) -> float:
    """Peak logits memory of the loss path: `nll`, `chunked_nll` (TRL's default), `liger` (fused, chunked),
    `preference` (DPO: the policy's full logits) or `score` (a reward model's one output per position)."""
    head = 4 if float32_head else dt
    if loss == "liger":
        return 0.0
    if loss == "score":
        return tokens * head
    if loss == "preference":
        # TRL's DPO keeps the policy's logits over every position for backward (selective_log_softmax saves them),
        # and a second tensor of that size exists twice: the reference's logits during its no-grad forward, then
        # the logits' gradient in backward.
        return tokens * vocab * head * DPO_LOGITS_COPIES
    if loss == "chunked_nll":
        return min(tokens, CHUNKED_LOSS_TOKENS) * vocab * 4 * CHUNKED_LOSS_COPIES
    return tokens * vocab * (head + 4 + 4)  # logits, their float32 copy, the float32 log-softmax


def memory_estimate(
    prepared: Any,
    method: Any,
    env: EnvironmentProfile,
    seq_len: int,
    trainable: int,
    total: int,
    training: TrainingConfig | None = None,
    *,
    packing: bool | str = False,
    loss_type: str = "chunked_nll",
    stage: PlanStage = "sft",
) -> dict[str, Any]:
    """Peak training memory per device (each of the profile's processes) in GiB, by component (see the module
    docstring); weights, gradients and optimizer states divided over the processes as `sharding` says.

    `stage`: what trains: `sft` (and pretrain: a causal LM on rows), `reward` (a sequence classifier on
    chosen + rejected rows) or `dpo` (a causal LM on chosen + rejected rows, with its reference)."""
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
    dt = DTYPE_BYTES[hardware(env).dtype]
    ds = hardware(env).deepspeed()
    n = env.world_size

    if isinstance(method, QLoraMethod):
        quantized = _quantized_params(prepared)
        double = peft_methods.quantization_settings(method, env)["double_quant"]
        per_param = 0.5 + (1 / 64 + 4 / (64 * 256) if double else 4 / 64)
        weights = quantized * per_param + (total - quantized) * 4
    else:
        weights = total * dt
    if stage == "reward":
        weights += score_head_delta(prepared, h) * (4 if isinstance(method, QLoraMethod) else dt)
    trainable_bytes = 4 if method.is_peft else dt
    grads = trainable * trainable_bytes
    # The optimizer the trainer will build from the same configs (an 8-bit one holds 2 bytes per
    # trainable parameter, not Adam's 8).
    optim = peft_methods.optimizer_name(method, training or TrainingConfig())
    if ds["stage"] > 0:
        # DeepSpeed keeps fp32 master weights + two fp32 Adam states (divided over the ranks below).
        optimizer = trainable * (4 + 8)
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

    shards = hardware(env).sharding()
    state = {"weights": weights, "gradients": grads, "optimizer": optimizer}
    for name in shards["divided"]:
        state[name] /= n
    for name in shards["offloaded"]:
        state[name] = 0.0
    weights, grads, optimizer = state["weights"], state["gradients"], state["optimizer"]

    blocks = _grad_blocks(prepared, method, layers)
    rows = b * ROWS_PER_EXAMPLE[stage]  # reward and DPO run each pair's chosen and rejected rows as one batch
    tokens = rows * s  # per micro-batch: full rows, packed or padded to the longest
    acts = tokens * activation_bytes_per_token(h, inter, blocks, dt, liger=env.liger_kernel,
                                               qlora=isinstance(method, QLoraMethod), checkpointing=env.gradient_checkpointing)
    attention = hardware(env).planned_attention(padding_free=peft_methods.is_padding_free(packing))
    # Under QLoRA the bias is float32: the packed QLoRA peaks measured on the H100 sat ~10 GiB above LoRA's,
    # what a float32 L^2 bias adds (float32 hidden states reach attention there; see the docstring).
    bias_bytes = 4 if isinstance(method, QLoraMethod) else dt
    attn = attention_bytes(attention, rows, s, heads, 1 if env.gradient_checkpointing else blocks, bias_bytes,
                           padding_free=peft_methods.is_padding_free(packing))
    loss = {"reward": "score", "dpo": "preference"}.get(stage, "liger" if env.liger_kernel else loss_type)
    logits = logits_bytes(loss, tokens, vocab, dt, float32_head=isinstance(method, QLoraMethod))
    reference = reference_bytes(stage, method, trainable, total, dt, trainable_bytes)
    components = {
        "weights_gb": weights / GIB,
        "gradients_gb": grads / GIB,
        "optimizer_gb": optimizer / GIB,
        "reference_gb": reference / GIB,
        "activations_gb": acts / GIB,
        "attention_gb": attn / GIB,
        "logits_gb": logits / GIB,
    }
    subtotal = sum(components.values())
    components["overhead_gb"] = subtotal * OVERHEAD
    # The process's own footprint is measured, not derived from the tensors: no overhead on it.
    components["process_gb"] = env.process_memory_gb
    out = {k: round(v, 4) for k, v in components.items()}
    out["total_gb"] = round(subtotal * (1 + OVERHEAD) + env.process_memory_gb, 4)
    out["device_memory_gb"] = env.device_memory_gb
    out["fits"] = out["total_gb"] <= env.device_memory_gb
    out["assumptions"] = {
        "batch": b, "seq_len": s, "dtype": hardware(env).dtype, "gradient_checkpointing": env.gradient_checkpointing,
        "attn_implementation": attention, "liger_kernel": env.liger_kernel, "zero_stage": ds["stage"],
        "packing": packing, "padding_free": peft_methods.is_padding_free(packing), "loss": loss,
        "processes": n, "optimizer": optim, "sharding": shards, "stage": stage, "rows_per_micro_batch": rows,
    }
    return out


def plan(
    model_name_or_path: Any,
    method_config: Any,
    env: EnvironmentProfile,
    seq_len: int,
    training: TrainingConfig | None = None,
    *,
    packing: bool | str = False,
    loss_type: str = "chunked_nll",
    stage: PlanStage = "sft",
) -> dict[str, Any]:
    """Parameter counts and memory estimate of training `method_config` on the model under `env` in `stage`.

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
        "memory": memory_estimate(
            prepared, method_config, env, seq_len, trainable, total, training, packing=packing, loss_type=loss_type,
            stage=stage,
        ),
    }


def plan_profiles(model_name_or_path: Any, method_config: Any, envs: list[EnvironmentProfile], seq_len: int) -> list[dict[str, Any]]:
    """`plan` for each profile (one table row per profile)."""
    return [plan(model_name_or_path, method_config, env, seq_len) for env in envs]


def suggestions(
    model_name_or_path: Any,
    method: Any,
    env: EnvironmentProfile,
    seq_len: int,
    training: TrainingConfig | None = None,
    packing: bool | str = False,
    stage: PlanStage = "sft",
) -> list[str]:
    """What would make an over-budget run fit, each with its estimated total for the same `stage`."""
    out: list[str] = []

    def total(m: Any, e: EnvironmentProfile) -> float:
        return plan(model_name_or_path, m, e, seq_len, training, packing=packing, stage=stage)["memory"]["total_gb"]

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
    if "weights" not in hardware(env).sharding()["divided"]:
        same_batch = {"per_device_batch_size": env.per_device_batch_size, "device_memory_gb": env.device_memory_gb}
        zero3 = load_environment("multi-gpu-deepspeed-zero3").model_copy(update=same_batch)
        fsdp = load_environment("multi-gpu-fsdp").model_copy(update=same_batch)
        out.append(
            f"shard with DeepSpeed ZeRO (profile multi-gpu-deepspeed for ZeRO-2, multi-gpu-deepspeed-zero3 for "
            f"ZeRO-3 with CPU offload: ~{total(method, zero3):.1f} GiB per GPU on {zero3.num_processes} GPUs) or FSDP2 "
            f"(profile multi-gpu-fsdp: ~{total(method, fsdp):.1f} GiB per GPU on {fsdp.num_processes} GPUs)"
        )
    out.append(f"lower max_length from {seq_len}")
    return out


def check_fit(
    model_name_or_path: Any,
    method: Any,
    env: EnvironmentProfile,
    seq_len: int,
    training: TrainingConfig | None = None,
    packing: bool | str = False,
    stage: PlanStage = "sft",
) -> dict[str, Any]:
    """The plan, or StageFailed saying what to change when the estimate exceeds the device's memory.

    `training` is the stage's own TrainingConfig, the object the trainer is built from. `stage` is what trains
    (see `memory_estimate`): the sft and pretrain stages plan `sft`, the reward stage `reward`, align's
    pairwise methods `dpo` (the SFT policy's method on chosen + rejected rows, with its reference)."""
    result = plan(model_name_or_path, method, env, seq_len, training, packing=packing, stage=stage)
    mem = result["memory"]
    if not mem["fits"]:
        parts = ", ".join(f"{k[:-3]} {v:.1f}" for k, v in mem.items() if k.endswith("_gb") and k != "total_gb" and k != "device_memory_gb")
        training_as = "" if stage == "sft" else f" as {stage} (chosen + rejected rows per pair)"
        raise StageFailed(
            f"{method.name} on this model{training_as} needs ~{mem['total_gb']:.1f} GiB per device ({parts} GiB) but "
            f"profile {env.name} has {env.device_memory_gb:g} GiB. To fit: "
            + "; or ".join(suggestions(model_name_or_path, method, env, seq_len, training, packing, stage))
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
        model = llama_config(config.base_model, vocab_size=config.base_model.tokenizer.vocab_size)
    return model, config.sft.method, config.sft.max_length, config.sft.training


def recommended_profile(total_params: int, device: str, profiles: dict[str, EnvironmentProfile]) -> str | None:
    """The profile for a `device` host whose `sized_for` range holds a model of `total_params` (the narrowest
    range when several do), or None when no profile of that device is sized for it."""
    fitting = [
        (p.sized_for.max_params or float("inf")) - p.sized_for.min_params
        for p in profiles.values() if p.device == device and p.sized_for is not None and p.sized_for.covers(total_params)
    ]
    names = [n for n, p in profiles.items() if p.device == device and p.sized_for is not None and p.sized_for.covers(total_params)]
    return min(zip(fitting, names))[1] if names else None


def advice(total_params: int, host: str, current: str, profiles: dict[str, EnvironmentProfile]) -> dict[str, Any]:
    """`tunepipe plan`'s profile advice: which bundled profile is sized for this model on a `host` machine."""
    name = recommended_profile(total_params, host, profiles)
    if name is None:
        return {"host": host, "profile": None,
                "reason": f"no bundled {host} profile is sized for {total_params:,} parameters: choose by the table"}
    sized = profiles[name].sized_for
    upper = f"{sized.max_params:,}" if sized.max_params is not None else "any"
    reason = f"sized for {sized.min_params:,}-{upper} parameters on a {host} host"
    return {"host": host, "profile": name, "reason": reason, "is_current": name == current}
