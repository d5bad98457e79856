"""Config → library object, one small function per object.

`sft.method` / `pretrain.method` (schemas/sft.py) become a `peft.*Config`, a
`BitsAndBytesConfig`, an optimiser name, a `trl.SFTConfig`; full / freeze / bitfit (which PEFT
does not have) become `requires_grad` flags. Nothing here decides hardware: precision, batch,
checkpointing and attention come from the `EnvironmentProfile`.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from tunepipe.schemas.environment import EnvironmentProfile
from tunepipe.schemas.sft import (
    AdaLoraMethod,
    BitFitMethod,
    FreezeMethod,
    FullMethod,
    IA3Method,
    LoraMethod,
    PrefixTuningMethod,
    PromptTuningMethod,
    PTuningMethod,
    QLoraMethod,
    TrainingConfig,
)

CAUSAL_LM = "CAUSAL_LM"
_LORA_INIT = {"default": True, "gaussian": "gaussian", "pissa": "pissa", "olora": "olora"}


def _targets(value: Any) -> Any:
    return list(value) if isinstance(value, list) else value


def lora_config(method: LoraMethod | QLoraMethod, *, for_counting: bool = False) -> Any:
    """`peft.LoraConfig`. `for_counting`: default init (PiSSA/OLoRA need real weights; counts are the same)."""
    from peft import LoraConfig

    return LoraConfig(
        task_type=CAUSAL_LM,
        r=method.r,
        lora_alpha=method.alpha,
        lora_dropout=method.dropout,
        target_modules=_targets(method.target_modules),
        use_rslora=method.use_rslora,
        use_dora=method.use_dora,
        bias=method.bias,
        modules_to_save=list(method.modules_to_save) or None,
        init_lora_weights=True if for_counting else _LORA_INIT[method.init],
    )


def adalora_config(method: AdaLoraMethod, total_step: int) -> Any:
    """`peft.AdaLoraConfig`; the total step count is known only once the data is."""
    from peft import AdaLoraConfig

    total_step = max(int(total_step), method.tinit + method.tfinal + 1)
    return AdaLoraConfig(
        task_type=CAUSAL_LM,
        init_r=method.init_r,
        target_r=method.target_r,
        lora_alpha=method.alpha,
        lora_dropout=method.dropout,
        target_modules=_targets(method.target_modules),
        tinit=method.tinit,
        tfinal=method.tfinal,
        deltaT=method.delta_t,
        beta1=method.beta1,
        beta2=method.beta2,
        orth_reg_weight=method.orth_reg_weight,
        total_step=total_step,
    )


def ia3_config(method: IA3Method) -> Any:
    """`peft.IA3Config` (target/feed-forward modules default to PEFT's per-architecture choice)."""
    from peft import IA3Config

    return IA3Config(
        task_type=CAUSAL_LM,
        target_modules=_targets(method.target_modules),
        feedforward_modules=_targets(method.feedforward_modules),
    )


def prompt_tuning_config(method: PromptTuningMethod, tokenizer_path: str | None = None) -> Any:
    """`peft.PromptTuningConfig`; text init reads the tokenizer from `tokenizer_path`."""
    from peft import PromptTuningConfig, PromptTuningInit

    if method.init == "text" and tokenizer_path is not None:
        return PromptTuningConfig(
            task_type=CAUSAL_LM,
            num_virtual_tokens=method.num_virtual_tokens,
            prompt_tuning_init=PromptTuningInit.TEXT,
            prompt_tuning_init_text=method.init_text,
            tokenizer_name_or_path=tokenizer_path,
        )
    return PromptTuningConfig(
        task_type=CAUSAL_LM, num_virtual_tokens=method.num_virtual_tokens, prompt_tuning_init=PromptTuningInit.RANDOM
    )


def prefix_tuning_config(method: PrefixTuningMethod) -> Any:
    """`peft.PrefixTuningConfig`."""
    from peft import PrefixTuningConfig

    kwargs: dict[str, Any] = {}
    if method.encoder_hidden_size is not None:
        kwargs["encoder_hidden_size"] = method.encoder_hidden_size
    return PrefixTuningConfig(
        task_type=CAUSAL_LM, num_virtual_tokens=method.num_virtual_tokens, prefix_projection=method.prefix_projection, **kwargs
    )


def p_tuning_config(method: PTuningMethod) -> Any:
    """`peft.PromptEncoderConfig` (P-tuning)."""
    from peft import PromptEncoderConfig

    kwargs: dict[str, Any] = {}
    if method.encoder_hidden_size is not None:
        kwargs["encoder_hidden_size"] = method.encoder_hidden_size
    return PromptEncoderConfig(
        task_type=CAUSAL_LM,
        num_virtual_tokens=method.num_virtual_tokens,
        encoder_reparameterization_type=method.encoder_type,
        encoder_num_layers=method.encoder_num_layers,
        encoder_dropout=method.encoder_dropout,
        **kwargs,
    )


def peft_config(method: Any, *, total_step: int = 1, tokenizer_path: str | None = None, for_counting: bool = False) -> Any:
    """The PEFT config of a PEFT method; None for full / freeze / bitfit."""
    if isinstance(method, (LoraMethod, QLoraMethod)):
        return lora_config(method, for_counting=for_counting)
    if isinstance(method, AdaLoraMethod):
        return adalora_config(method, total_step)
    if isinstance(method, IA3Method):
        return ia3_config(method)
    if isinstance(method, PromptTuningMethod):
        return prompt_tuning_config(method, None if for_counting else tokenizer_path)
    if isinstance(method, PrefixTuningMethod):
        return prefix_tuning_config(method)
    if isinstance(method, PTuningMethod):
        return p_tuning_config(method)
    return None


def quantization_settings(method: QLoraMethod, env: EnvironmentProfile) -> dict[str, Any]:
    """The 4-bit settings in effect: the method's where set, the profile's defaults otherwise."""
    q = env.quantization
    return {
        "quant_type": method.quant_type or q.quant_type,
        "double_quant": q.double_quant if method.double_quant is None else method.double_quant,
        "compute_dtype": method.compute_dtype or q.compute_dtype,
    }


def bnb_config(method: QLoraMethod, env: EnvironmentProfile) -> Any:
    """`transformers.BitsAndBytesConfig` for the frozen 4-bit base."""
    import torch
    from transformers import BitsAndBytesConfig

    s = quantization_settings(method, env)
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=s["quant_type"],
        bnb_4bit_use_double_quant=s["double_quant"],
        bnb_4bit_compute_dtype=getattr(torch, s["compute_dtype"]),
    )


def optimizer_name(method: Any, training: TrainingConfig) -> str:
    """The `TrainingArguments.optim` value."""
    return method.optimizer if isinstance(method, QLoraMethod) else training.optimizer


# --------------------------------------------------------------------------------------------
# Methods PEFT does not have: full, freeze, bitfit (requires_grad flags).


def decoder_layers(model: Any) -> tuple[str, int]:
    """(parameter-name prefix, count) of the model's transformer blocks, e.g. ("model.layers", 2).

    The blocks are the longest `nn.ModuleList` (Llama/Qwen: model.layers, GPT-2: transformer.h).
    """
    import torch

    best = ("", 0)
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.ModuleList) and len(module) > best[1]:
            best = (name, len(module))
    if not best[1]:
        raise ValueError(f"{type(model).__name__}: no transformer blocks (nn.ModuleList) found")
    return best


def trainable_names(model: Any, method: Any) -> set[str]:
    """Names of the parameters that train under full / freeze / bitfit."""
    names = [n for n, _ in model.named_parameters()]
    if isinstance(method, FullMethod):
        return set(names)
    if isinstance(method, BitFitMethod):
        return {n for n in names if n.endswith("bias")}
    if isinstance(method, FreezeMethod):
        prefix, count = decoder_layers(model)
        first = max(count - method.train_last_layers, 0)
        layer = re.compile(re.escape(prefix) + r"\.(\d+)\.")
        chosen = set()
        for n in names:
            match = layer.search(n)
            if match and int(match.group(1)) >= first and method.train_last_layers > 0:
                chosen.add(n)
            elif any(re.search(pattern, n) for pattern in method.train_modules):
                chosen.add(n)
        return chosen
    raise TypeError(f"{type(method).__name__} is a PEFT method")


def mark_trainable(model: Any, method: Any) -> int:
    """Set requires_grad for full / freeze / bitfit; return the number of trainable parameters."""
    chosen = trainable_names(model, method)
    if not chosen:
        raise ValueError(_nothing_trains(model, method))
    total = 0
    for name, param in model.named_parameters():
        param.requires_grad_(name in chosen)
        total += param.numel() if name in chosen else 0
    return total


def _nothing_trains(model: Any, method: Any) -> str:
    kind = getattr(getattr(model, "config", None), "model_type", type(model).__name__)
    if isinstance(method, BitFitMethod):
        return (
            f"bitfit: the {kind} model has no bias parameters, so nothing would train (Llama-family models have "
            "none). Use lora or ia3, or a model with biases (e.g. GPT-2, Qwen2 attention, or a Llama built with "
            "attention_bias/mlp_bias)."
        )
    return f"{method.name}: no parameter of the {kind} model matches, so nothing would train"


def apply_method(
    model: Any,
    method: Any,
    *,
    total_step: int = 1,
    tokenizer_path: str | None = None,
    gradient_checkpointing: bool = False,
) -> Any:
    """The model ready to train: a `PeftModel` for PEFT methods, the model with flags set otherwise."""
    if not method.is_peft:
        mark_trainable(model, method)
        return model
    from peft import get_peft_model, prepare_model_for_kbit_training

    if isinstance(method, QLoraMethod):
        model = prepare_model_for_kbit_training(
            model,
            use_gradient_checkpointing=gradient_checkpointing,
            gradient_checkpointing_kwargs={"use_reentrant": False} if gradient_checkpointing else None,
        )
    config = peft_config(method, total_step=total_step, tokenizer_path=tokenizer_path)
    return get_peft_model(model, config)


def count_parameters(model: Any) -> tuple[int, int]:
    """(trainable, total): PEFT's own count for a PeftModel, plain sums otherwise."""
    if hasattr(model, "get_nb_trainable_parameters"):
        return tuple(int(x) for x in model.get_nb_trainable_parameters())  # type: ignore[return-value]
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return trainable, sum(p.numel() for p in model.parameters())


# --------------------------------------------------------------------------------------------
# Trainer arguments


def precision_flags(env: EnvironmentProfile) -> dict[str, Any]:
    """Mixed-precision and device flags of `TrainingArguments` from the profile."""
    return {
        "bf16": env.dtype == "bfloat16",
        "fp16": env.dtype == "float16",
        "use_cpu": env.device == "cpu",
    }


def training_arguments(training: TrainingConfig, env: EnvironmentProfile, *, output_dir: str | Path, optim: str) -> dict[str, Any]:
    """`TrainingArguments` keywords every TRL config shares (SFTConfig, DPOConfig, RewardConfig,
    PPOConfig, ...): hyper-parameters from the stage config, hardware from the profile."""
    from tunepipe.tasks.core.environment import deepspeed_config_path

    ds_config = deepspeed_config_path(env)
    return {
        "output_dir": str(output_dir),
        "num_train_epochs": training.epochs,
        "max_steps": training.max_steps or -1,
        "learning_rate": training.learning_rate,
        "lr_scheduler_type": training.lr_scheduler,
        "warmup_steps": training.warmup_ratio,  # transformers 5: a float < 1 is a ratio
        "weight_decay": training.weight_decay,
        "max_grad_norm": training.max_grad_norm,
        "optim": optim,
        "seed": training.seed,
        "data_seed": training.seed,
        "logging_steps": training.logging_steps,
        # Log a NaN/inf loss as it is: the default filter replaces it with the running mean (0.0 on
        # the first step), which would hide a diverged run from the stages' `loss` self-check.
        "logging_nan_inf_filter": False,
        "save_strategy": "steps",
        "save_steps": training.save_steps,
        "save_total_limit": training.save_total_limit,
        "per_device_train_batch_size": env.per_device_batch_size,
        "per_device_eval_batch_size": env.per_device_batch_size,
        "gradient_accumulation_steps": env.gradient_accumulation_steps,
        "gradient_checkpointing": env.gradient_checkpointing,
        "gradient_checkpointing_kwargs": {"use_reentrant": False} if env.gradient_checkpointing else None,
        "deepspeed": str(ds_config) if ds_config else None,
        "use_liger_kernel": env.liger_kernel,
        "report_to": "none",
        "dataloader_num_workers": 0,
        "eval_strategy": "no",
        **precision_flags(env),
    }


def trainer_args(
    training: TrainingConfig,
    env: EnvironmentProfile,
    *,
    output_dir: str | Path,
    max_length: int,
    packing: bool | str,
    optim: str,
    has_eval: bool,
) -> Any:
    """`trl.SFTConfig`: the shared training arguments, plus packing, length and evaluation."""
    from trl import SFTConfig as TrlSFTConfig

    strategy = packing if isinstance(packing, str) else "bfd"
    eval_kwargs: dict[str, Any] = {}
    if has_eval and training.eval_steps:
        eval_kwargs = {"eval_strategy": "steps", "eval_steps": training.eval_steps}
    return TrlSFTConfig(
        **{
            **training_arguments(training, env, output_dir=output_dir, optim=optim),
            "max_length": max_length,
            "packing": bool(packing),
            "packing_strategy": strategy,
            "disable_tqdm": False,  # the console progress bar; the Prefect UI gets a progress artifact
            "include_num_input_tokens_seen": "non_padding",
            "dataset_num_proc": None,
            **eval_kwargs,
        }
    )
