"""Config → library object, one small function per object.

`sft.method` / `pretrain.method` (schemas/methods.py) become a `peft.*Config`, a
`BitsAndBytesConfig`, an optimiser name, a `trl.SFTConfig`; full / freeze / bitfit (which PEFT
does not have) become `requires_grad` flags. Nothing here decides hardware: precision, FSDP,
checkpointing and attention are `tasks/training/hardware.py`'s decisions, the batch the profile's.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from tunepipe.schemas.environment import EnvironmentProfile
from tunepipe.schemas.methods import (
    AdaLoraMethod,
    AdapterDropMethod,
    AdapterFusionMethod,
    AdapterMethod,
    BitFitMethod,
    FreezeMethod,
    FullMethod,
    GaLoreMethod,
    IA3Method,
    LoraMethod,
    LoraPlusMethod,
    LoraSettings,
    MamAdapterMethod,
    PrefixTuningMethod,
    PromptTuningMethod,
    PTuningMethod,
    PTuningV2Method,
    QLoraMethod,
    UniPeltMethod,
)
from tunepipe.schemas.training import LOMO_OPTIMIZERS, TrainingConfig
from tunepipe.tasks.core.environment import apply_allocator_settings, deepspeed_config_path
from tunepipe.tasks.core.stage import StageFailed
from tunepipe.tasks.core.tracking import trainer_report_to
from tunepipe.tasks.training.hardware import hardware

CAUSAL_LM = "CAUSAL_LM"
_LORA_INIT = {"default": True, "gaussian": "gaussian", "pissa": "pissa", "olora": "olora"}


def _targets(value: Any) -> Any:
    return list(value) if isinstance(value, list) else value


def lora_config(method: LoraSettings, *, for_counting: bool = False) -> Any:
    """`peft.LoraConfig` of any LoRA settings: sft/pretrain's LoRA methods and align's adapter alike.
    `for_counting`: default init (PiSSA/OLoRA need real weights; counts are the same)."""
    from peft import LoraConfig

    return LoraConfig(
        task_type=CAUSAL_LM,
        r=method.r,
        lora_alpha=method.alpha,
        lora_dropout=method.dropout,
        target_modules=_targets(method.target_modules),
        target_parameters=list(method.target_parameters) or None,
        use_rslora=method.use_rslora,
        use_dora=method.use_dora,
        bias=method.bias,
        modules_to_save=list(method.modules_to_save) or None,
        init_lora_weights=True if for_counting else _LORA_INIT[getattr(method, "init", "default")],
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


def p_tuning_v2_config(method: PTuningV2Method) -> Any:
    """P-Tuning v2: `peft.PrefixTuningConfig` with the prefixes trained directly (no projection MLP)."""
    from peft import PrefixTuningConfig

    return PrefixTuningConfig(task_type=CAUSAL_LM, num_virtual_tokens=method.num_virtual_tokens, prefix_projection=False)


def bottleneck_config(method: AdapterMethod | AdapterDropMethod) -> Any:
    """The `BottleneckConfig` of the bottleneck-adapter PEFT method (tasks/lm/bottleneck.py)."""
    from tunepipe.tasks.lm import bottleneck  # lazy: pulls in torch

    config_cls = bottleneck.register()
    return config_cls(
        task_type=CAUSAL_LM,
        target_modules=list(method.target_modules),
        bottleneck_size=method.bottleneck_size,
        placement=method.placement,
        non_linearity=method.non_linearity,
        scaling=method.scaling,
        drop_first_layers=getattr(method, "drop_first_layers", 0),
    )


def mam_config(method: MamAdapterMethod) -> Any:
    """MAM Adapter: a prefix on every attention plus a scaled parallel adapter on every FFN."""
    from tunepipe.tasks.lm import bottleneck  # lazy: pulls in torch

    return bottleneck.register()(
        task_type=CAUSAL_LM, target_modules=[method.ffn_module], bottleneck_size=method.bottleneck_size,
        placement="parallel", scaling=method.scaling, non_linearity=method.non_linearity,
        prefix_length=method.prefix_length, prefix_modules=[method.key_module],
    )


def unipelt_config(method: UniPeltMethod) -> Any:
    """UniPELT: gated LoRA, gated prefix and a gated sequential FFN adapter."""
    from tunepipe.tasks.lm import bottleneck  # lazy: pulls in torch

    return bottleneck.register()(
        task_type=CAUSAL_LM, target_modules=[method.ffn_module], bottleneck_size=method.bottleneck_size,
        placement="sequential", non_linearity=method.non_linearity, gated=True,
        prefix_length=method.prefix_length, prefix_modules=[method.key_module],
        lora_r=method.lora_r, lora_alpha=method.lora_alpha, lora_modules=list(method.lora_modules),
    )


def fusion_components(method: AdapterFusionMethod) -> dict[str, Path]:
    """The task adapters AdapterFusion fuses: {task: directory} from the per-task sft artifact."""
    root = Path(method.adapters_from)
    adapters = root / "adapters"
    found = sorted(p.name for p in adapters.iterdir() if (p / "adapter_config.json").is_file()) if adapters.is_dir() else []
    if len(found) < 2:
        raise ValueError(
            f"adapter_fusion: {root} has {len(found)} per-task adapter(s) under adapters/ (need at least two): "
            "point adapters_from at an sft artifact trained with method adapter and adapters: per_task"
        )
    wanted = method.fuse or found
    missing = sorted(set(wanted) - set(found))
    if missing:
        raise ValueError(f"adapter_fusion: fuse names {missing}, not in {root}/adapters (has {found})")
    components = {task: adapters / task for task in wanted}
    settings = {}
    for task, path in components.items():
        cfg = json.loads((path / "adapter_config.json").read_text())
        if cfg.get("peft_type") != "BOTTLENECK" or cfg.get("prefix_length") or cfg.get("lora_r") or cfg.get("gated") or cfg.get("fusion"):
            raise ValueError(f"adapter_fusion: {path} is not a plain bottleneck adapter (train the tasks with method adapter)")
        settings[task] = {k: cfg.get(k) for k in ("target_modules", "bottleneck_size", "placement", "non_linearity", "scaling", "drop_first_layers")}
    if len({json.dumps(v, sort_keys=True) for v in settings.values()}) > 1:
        raise ValueError(f"adapter_fusion: the task adapters differ in their bottleneck settings: {settings}")
    return components


def fusion_config(method: AdapterFusionMethod) -> Any:
    """A bottleneck config holding the task adapters (their own settings) and a fusion layer."""
    from tunepipe.tasks.lm import bottleneck  # lazy: pulls in torch

    components = fusion_components(method)
    first = json.loads((next(iter(components.values())) / "adapter_config.json").read_text())
    return bottleneck.register()(
        task_type=CAUSAL_LM, fusion=list(components),
        **{k: first[k] for k in ("target_modules", "bottleneck_size", "placement", "non_linearity", "scaling", "drop_first_layers")},
    )


def load_fusion_components(model: Any, method: AdapterFusionMethod, adapter_name: str = "default") -> int:
    """Copy each task adapter's trained weights into the fusion layers' frozen copies; returns the
    number of tensors copied (every one of the fusion's task-adapter tensors, or ValueError)."""
    import torch
    from safetensors.torch import load_file

    params = dict(model.named_parameters())
    copied = 0
    for index, (task, path) in enumerate(fusion_components(method).items()):
        for key, value in load_file(str(path / "adapter_model.safetensors")).items():
            kind = "down" if ".bottleneck_down." in key else "up"
            module, leaf = key.split(f".bottleneck_{kind}.")  # leaf: weight | bias
            target = f"{module}.bottleneck_fusion_{kind}_{leaf}.{adapter_name}"
            if target not in params or params[target][index].shape != value.shape:
                raise ValueError(f"adapter_fusion: {path}: {key} has no place in the fusion model (another base model?)")
            with torch.no_grad():
                params[target][index].copy_(value.to(params[target].dtype))
            copied += 1
    layers = sum(1 for n in params if ".bottleneck_fusion_down_weight." in n)
    expected = 4 * layers * len(fusion_components(method))
    if copied != expected:
        raise ValueError(f"adapter_fusion: filled {copied} of the fusion's {expected} task-adapter tensors")
    return copied


def peft_config(method: Any, *, total_step: int = 1, tokenizer_path: str | None = None, for_counting: bool = False) -> Any:
    """The PEFT config of a PEFT method; None for full / freeze / bitfit / galore."""
    if isinstance(method, (LoraMethod, QLoraMethod, LoraPlusMethod)):
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
    if isinstance(method, PTuningV2Method):
        return p_tuning_v2_config(method)
    if isinstance(method, (AdapterMethod, AdapterDropMethod)):
        return bottleneck_config(method)
    if isinstance(method, MamAdapterMethod):
        return mam_config(method)
    if isinstance(method, UniPeltMethod):
        return unipelt_config(method)
    if isinstance(method, AdapterFusionMethod):
        return fusion_config(method)
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
        # FSDP flattens every parameter of a block into one tensor of one dtype: the packed 4-bit weights must be
        # stored in the dtype of the rest (transformers' FSDP-QLoRA recipe), not bitsandbytes' default uint8.
        bnb_4bit_quant_storage=getattr(torch, s["compute_dtype"]) if hardware(env).quant_storage_is_compute_dtype() else torch.uint8,
    )


def optimizer_name(method: Any, training: TrainingConfig) -> str:
    """The `TrainingArguments.optim` value (GaLore: the Trainer's galore optimizer, layerwise or not)."""
    if isinstance(method, GaLoreMethod):
        return method.optimizer + ("_layerwise" if method.layerwise else "")
    return method.optimizer if isinstance(method, QLoraMethod) else training.optimizer


def optimizer_arguments(method: Any) -> dict[str, Any]:
    """Extra `TrainingArguments` of the method's optimizer: GaLore's target modules and projection."""
    if not isinstance(method, GaLoreMethod):
        return {}
    return {
        "optim_target_modules": list(method.target_modules),
        "optim_args": f"rank={method.rank},update_proj_gap={method.update_proj_gap},scale={method.scale},proj_type={method.proj_type}",
    }


def optimizer_class(optim: str) -> type:
    """The optimizer class behind a `TrainingArguments.optim` name (what LoRA+ builds its groups for)."""
    import torch

    if optim == "adamw_torch":
        return torch.optim.AdamW
    if optim == "sgd":
        return torch.optim.SGD
    import bitsandbytes as bnb

    return {"adamw_8bit": bnb.optim.AdamW8bit, "paged_adamw_8bit": bnb.optim.PagedAdamW8bit,
            "paged_adamw_32bit": bnb.optim.PagedAdamW32bit}[optim]


def custom_optimizer(model: Any, method: Any, training: TrainingConfig) -> Any:
    """LoRA+'s optimizer (B matrices at `lr_ratio` times the learning rate); None: the Trainer builds its own."""
    if not isinstance(method, LoraPlusMethod):
        return None
    from peft.optimizers import create_loraplus_optimizer

    optim = optimizer_name(method, training)
    kwargs: dict[str, Any] = {"weight_decay": training.weight_decay}
    return create_loraplus_optimizer(
        model, optimizer_class(optim), lr=training.learning_rate, loraplus_lr_ratio=method.lr_ratio,
        loraplus_lr_embedding=method.embedding_lr, **kwargs,
    )


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
    """Names of the parameters that train under full / freeze / bitfit / galore (GaLore trains every
    parameter; only its optimizer states are low-rank)."""
    names = [n for n, _ in model.named_parameters()]
    if isinstance(method, (FullMethod, GaLoreMethod)):
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
    model = get_peft_model(model, config)
    if isinstance(method, AdapterFusionMethod):
        load_fusion_components(model, method)
    return model


def count_parameters(model: Any) -> tuple[int, int]:
    """(trainable, total): PEFT's own count for a PeftModel, plain sums otherwise."""
    if hasattr(model, "get_nb_trainable_parameters"):
        return tuple(int(x) for x in model.get_nb_trainable_parameters())  # type: ignore[return-value]
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return trainable, sum(p.numel() for p in model.parameters())


# --------------------------------------------------------------------------------------------
# Trainer arguments


def training_arguments(training: TrainingConfig, env: EnvironmentProfile, *, output_dir: str | Path, optim: str) -> dict[str, Any]:
    """`TrainingArguments` keywords every TRL config shares (SFTConfig, DPOConfig, RewardConfig,
    PPOConfig, ...): hyper-parameters from the stage config, hardware from the profile."""
    # Every trainer's arguments come from here, in the process that will train with them: the profile's
    # allocator setting takes effect before the first training step allocates.
    apply_allocator_settings(env)
    ds_config = deepspeed_config_path(env)
    if optim in LOMO_OPTIMIZERS and env.gradient_accumulation_steps > 1:
        # LOMO applies each micro-batch's gradient inside its backward pass: nothing accumulates.
        raise StageFailed(
            f"training.optimizer {optim} updates the weights during every backward pass, so it cannot accumulate "
            f"gradients: profile {env.name} has gradient_accumulation_steps {env.gradient_accumulation_steps}; use a "
            "profile with 1 (raise per_device_batch_size instead)"
        )
    hw = hardware(env)
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
        "gradient_checkpointing": hw.trainer_checkpointing(),
        "gradient_checkpointing_kwargs": {"use_reentrant": False} if hw.trainer_checkpointing() else None,
        "deepspeed": str(ds_config) if ds_config else None,
        **hw.fsdp_arguments(),
        "use_liger_kernel": env.liger_kernel,
        # The running stage's tracking backend (tasks/core/tracking.py), through the trainer's own integration.
        **trainer_report_to(),
        "dataloader_num_workers": 0,
        "eval_strategy": "no",
        **hw.precision_flags(),
    }


def is_padding_free(packing: bool | str) -> bool:
    """Whether packed rows reach the model padding-free: one flattened row per batch, `position_ids` that restart
    at 0 for every example and no attention mask (TRL's collator for best-fit packing). Attention then stays
    within each example: transformers derives a per-example mask from the restarts, and flash-attn/flex_attention
    compute only the per-example blocks. `wrapped` packing is a plain stream: its documents attend to each other."""
    return packing is True or packing in ("bfd", "bfd_split")


def trainer_args(
    training: TrainingConfig,
    env: EnvironmentProfile,
    *,
    output_dir: str | Path,
    max_length: int,
    packing: bool | str,
    optim: str,
    has_eval: bool,
    extra: dict[str, Any] | None = None,
) -> Any:
    """`trl.SFTConfig`: the shared training arguments, plus packing, length, evaluation and the
    method's optimizer arguments (`extra`)."""
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
            # Said explicitly (TRL turns it on for bfd packing by itself): packed rows reach the model as
            # position_ids without an attention mask, the input flash-attn's varlen and flex_attention expect.
            "padding_free": is_padding_free(packing),
            "torch_compile": env.torch_compile,
            # Sequence-length bucketing for unpacked rows: similar lengths share a batch, less padding.
            "train_sampling_strategy": "group_by_length" if env.length_bucketing and not packing else "random",
            "disable_tqdm": False,  # the console progress bar; the Prefect UI gets a progress artifact
            "include_num_input_tokens_seen": "non_padding",
            "dataset_num_proc": None,
            **eval_kwargs,
            **(extra or {}),
        }
    )
