"""Fine-tuning methods: how a model is adapted (`sft.method`, `pretrain.method`, `reward.method`).

One model per method, a discriminated union on `name`, each holding only the knobs that method
has, so a knob of another method (say `r` under `ia3`) or an impossible combination (PiSSA init
on a 4-bit base) fails at load time with its field path. `method: lora` is shorthand for
`method: {name: lora}`. `LoraSettings` are LoRA's settings wherever a LoRA adapter is trained
(align's adapter on a full-model SFT result too).
"""

from __future__ import annotations

from typing import Annotated, Any, Literal, Union

from pydantic import Field, ValidationInfo, field_validator, model_validator
from tunepipe.schemas.base import StrictModel, resolve_path

ALL_LINEAR = "all-linear"


class _Method(StrictModel):
    """Common base of the method models."""

    @property
    def is_peft(self) -> bool:
        """True when the result is a PEFT adapter (the base weights stay frozen and unsaved)."""
        return self.name not in ("full", "freeze", "bitfit", "galore")  # type: ignore[attr-defined]

    @property
    def is_prompt_learning(self) -> bool:
        """Virtual-token methods (prompt, prefix, P-tuning)."""
        return self.name in ("prompt_tuning", "prefix_tuning", "p_tuning", "p_tuning_v2")  # type: ignore[attr-defined]


class FullMethod(_Method):
    """Full fine-tuning: every parameter trains."""

    name: Literal["full"] = Field(description="Method: full fine-tuning.")


class FreezeMethod(_Method):
    """Partial fine-tuning: only the last N transformer blocks and/or named modules train."""

    name: Literal["freeze"] = Field(description="Method: freeze everything but the last layers / named modules.")
    train_last_layers: int = Field(default=1, ge=0, description="Number of last transformer blocks that train.")
    train_modules: list[str] = Field(
        default_factory=list,
        description="Regular expressions matched (re.search) against parameter names that also train, "
        "e.g. `lm_head`, `norm`. With tied embeddings, training lm_head trains the embedding too.",
    )

    @model_validator(mode="after")
    def _something_trains(self) -> "FreezeMethod":
        if self.train_last_layers == 0 and not self.train_modules:
            raise ValueError("freeze: train_last_layers is 0 and train_modules is empty: nothing would train")
        return self


class BitFitMethod(_Method):
    """BitFit: only the bias terms train. Needs a model that has biases (Llama-family models have none)."""

    name: Literal["bitfit"] = Field(description="Method: train the biases only.")


class LoraSettings(StrictModel):
    """A LoRA adapter's settings, the same wherever one is trained (sft/pretrain `lora`/`qlora`/`lora_plus`,
    align's adapter on a full-model SFT result); `peft_methods.lora_config` turns them into a `peft.LoraConfig`."""

    r: int = Field(default=8, ge=1, description="LoRA rank.")
    alpha: float = Field(default=16, gt=0, description="LoRA scaling numerator (scale = alpha / r, or alpha / sqrt(r) with rsLoRA).")
    dropout: float = Field(default=0.05, ge=0, lt=1, description="Dropout on the LoRA input.")
    target_modules: list[str] | Literal["all-linear"] = Field(
        default=ALL_LINEAR,
        description="Module names to adapt (e.g. [q_proj, v_proj]) or `all-linear` (every linear layer but the output head).",
    )
    target_parameters: list[str] = Field(
        default_factory=list,
        description="Parameters (not modules) to adapt, by name suffix: the fused 3-D expert weights of a Mixture-of-"
        "Experts model, e.g. [mlp.experts.gate_up_proj, mlp.experts.down_proj] (PEFT's `target_parameters`: one "
        "low-rank update shared by all experts of a block). Empty: none.",
    )
    use_rslora: bool = Field(default=False, description="Rank-stabilised LoRA: scale by alpha / sqrt(r).")
    use_dora: bool = Field(default=False, description="DoRA: weight-decomposed LoRA (magnitude + direction).")
    bias: Literal["none", "all", "lora_only"] = Field(default="none", description="Which biases train alongside the adapter.")
    modules_to_save: list[str] = Field(
        default_factory=list, description="Modules trained in full and saved with the adapter (e.g. lm_head)."
    )

    @field_validator("target_modules")
    @classmethod
    def _non_empty(cls, value: Any) -> Any:
        if isinstance(value, list) and not value:
            raise ValueError("target_modules is empty: name modules or use all-linear")
        return value

    @model_validator(mode="after")
    def _parameter_lora(self) -> "LoraSettings":
        if self.target_parameters and self.dropout:
            raise ValueError(
                f"target_parameters {self.target_parameters} needs dropout: 0 (PEFT's LoRA on parameters has no input "
                f"dropout); dropout is {self.dropout}"
            )
        return self


class _LoraFields(_Method, LoraSettings):
    """The LoRA-family methods of sft/pretrain: a method (`name`) with LoRA's settings."""


class LoraMethod(_LoraFields):
    """LoRA on a full-precision (or bf16) base."""

    name: Literal["lora"] = Field(description="Method: LoRA.")
    init: Literal["default", "gaussian", "pissa", "olora"] = Field(
        default="default",
        description="Adapter initialisation. `pissa` / `olora` start from the principal components of the base "
        "weights (the base is adjusted to compensate); the saved adapter is converted back to a plain LoRA on the "
        "original base, so it loads and serves like any other.",
    )

    @model_validator(mode="after")
    def _combos(self) -> "LoraMethod":
        if self.init in ("pissa", "olora") and self.use_dora:
            raise ValueError(f"init {self.init} cannot be combined with use_dora: choose one")
        return self


class QLoraMethod(_LoraFields):
    """QLoRA: LoRA on a 4-bit (bitsandbytes) frozen base. Unset quantization fields come from the profile."""

    name: Literal["qlora"] = Field(description="Method: LoRA on a 4-bit quantized base.")
    quant_type: Literal["nf4", "fp4"] | None = Field(default=None, description="4-bit data type; default: the profile's.")
    double_quant: bool | None = Field(default=None, description="Quantize the quantization constants; default: the profile's.")
    compute_dtype: Literal["float32", "bfloat16", "float16"] | None = Field(
        default=None, description="dtype weights are dequantized to for matmuls; default: the profile's."
    )
    optimizer: Literal["paged_adamw_8bit", "paged_adamw_32bit", "adamw_8bit", "adamw_torch"] = Field(
        default="paged_adamw_8bit",
        description="Optimiser: paged (spills to CPU under memory spikes) and/or 8-bit (bitsandbytes) AdamW.",
    )
    init: Literal["default", "gaussian"] = Field(
        default="default",
        description="Adapter initialisation. PiSSA/OLoRA are not offered: they rewrite base weights, which are "
        "frozen in 4 bits here (use method lora for them).",
    )


class AdaLoraMethod(_Method):
    """AdaLoRA: LoRA whose rank budget is re-allocated across layers during training."""

    name: Literal["adalora"] = Field(description="Method: AdaLoRA.")
    init_r: int = Field(default=12, ge=1, description="Initial rank of every adapted matrix.")
    target_r: int = Field(default=8, ge=1, description="Average rank the budget is pruned down to.")
    alpha: float = Field(default=16, gt=0, description="Scaling numerator.")
    dropout: float = Field(default=0.05, ge=0, lt=1, description="Dropout on the adapter input.")
    target_modules: list[str] | Literal["all-linear"] = Field(default=ALL_LINEAR, description="Modules to adapt.")
    tinit: int = Field(default=0, ge=0, description="Warm-up steps before rank pruning starts.")
    tfinal: int = Field(default=0, ge=0, description="Final steps with the ranks fixed.")
    delta_t: int = Field(default=1, ge=1, description="Steps between two budget re-allocations.")
    beta1: float = Field(default=0.85, gt=0, lt=1, description="EMA factor of the sensitivity.")
    beta2: float = Field(default=0.85, gt=0, lt=1, description="EMA factor of the uncertainty.")
    orth_reg_weight: float = Field(default=0.5, ge=0, description="Weight of the orthogonality regulariser.")

    @model_validator(mode="after")
    def _ranks(self) -> "AdaLoraMethod":
        if self.target_r > self.init_r:
            raise ValueError(f"target_r ({self.target_r}) must not exceed init_r ({self.init_r})")
        return self


class IA3Method(_Method):
    """(IA)^3: learned scaling vectors on keys, values and the feed-forward input."""

    name: Literal["ia3"] = Field(description="Method: (IA)^3.")
    target_modules: list[str] | None = Field(
        default=None, description="Modules to scale; default: PEFT's choice for the architecture (k, v, down projections)."
    )
    feedforward_modules: list[str] | None = Field(
        default=None, description="Which of target_modules are feed-forward (scaled on their input); default: PEFT's."
    )

    @model_validator(mode="after")
    def _subset(self) -> "IA3Method":
        if self.feedforward_modules is not None:
            if self.target_modules is None:
                raise ValueError("feedforward_modules needs target_modules (they must be a subset of it)")
            extra = sorted(set(self.feedforward_modules) - set(self.target_modules))
            if extra:
                raise ValueError(f"feedforward_modules {extra} are not in target_modules {self.target_modules}")
        return self


class PromptTuningMethod(_Method):
    """Prompt tuning: trainable virtual-token embeddings prepended to the input."""

    name: Literal["prompt_tuning"] = Field(description="Method: prompt tuning.")
    num_virtual_tokens: int = Field(default=16, ge=1, description="Virtual tokens prepended to every input.")
    init: Literal["random", "text"] = Field(default="random", description="Initialise from random vectors or from a text's embeddings.")
    init_text: str | None = Field(default=None, description="Text whose token embeddings initialise the prompt (init: text).")

    @model_validator(mode="after")
    def _text(self) -> "PromptTuningMethod":
        if self.init == "text" and not self.init_text:
            raise ValueError("init text needs init_text")
        if self.init == "random" and self.init_text:
            raise ValueError("init_text is only used with init: text")
        return self


class PrefixTuningMethod(_Method):
    """Prefix tuning: trainable key/value prefixes in every attention layer."""

    name: Literal["prefix_tuning"] = Field(description="Method: prefix tuning.")
    num_virtual_tokens: int = Field(default=16, ge=1, description="Prefix length.")
    prefix_projection: bool = Field(default=False, description="Re-parameterise the prefix through an MLP.")
    encoder_hidden_size: int | None = Field(default=None, ge=1, description="Hidden size of that MLP (prefix_projection only).")

    @model_validator(mode="after")
    def _projection(self) -> "PrefixTuningMethod":
        if self.encoder_hidden_size is not None and not self.prefix_projection:
            raise ValueError("encoder_hidden_size is only used with prefix_projection: true")
        return self


class PTuningMethod(_Method):
    """P-tuning: virtual tokens produced by a small prompt encoder (MLP or LSTM)."""

    name: Literal["p_tuning"] = Field(description="Method: P-tuning.")
    num_virtual_tokens: int = Field(default=16, ge=1, description="Virtual tokens prepended to every input.")
    encoder_type: Literal["MLP", "LSTM"] = Field(default="MLP", description="Prompt encoder re-parameterisation.")
    encoder_hidden_size: int | None = Field(default=None, ge=1, description="Prompt encoder width; default: the model's hidden size.")
    encoder_num_layers: int = Field(default=2, ge=1, description="Prompt encoder layers.")
    encoder_dropout: float = Field(default=0.0, ge=0, lt=1, description="Prompt encoder dropout.")


class PTuningV2Method(_Method):
    """P-Tuning v2 (Liu et al. 2022): deep prompts, i.e. trainable key/value prefixes in every
    attention layer, trained directly (no re-parameterisation encoder). PEFT's prefix tuning with
    `prefix_projection: false`, by its own name."""

    name: Literal["p_tuning_v2"] = Field(description="Method: P-Tuning v2 (deep prompt tuning).")
    num_virtual_tokens: int = Field(
        default=16, ge=1, description="Prompt length per layer (the paper uses 20-128 for generation and hard NLU tasks)."
    )


class LoraPlusMethod(_LoraFields):
    """LoRA+ (Hayou et al. 2024): LoRA whose B matrices learn `lr_ratio` times faster than the A
    matrices (peft.optimizers.create_loraplus_optimizer). Same adapter as LoRA: it saves, merges and
    serves like one."""

    name: Literal["lora_plus"] = Field(description="Method: LoRA+.")
    lr_ratio: float = Field(
        default=16.0, gt=0, description="Learning rate of B over that of A (the paper's lambda; 2^4 recommended)."
    )
    embedding_lr: float = Field(
        default=1e-6, gt=0, description="Learning rate of LoRA on embedding layers (the paper keeps them small)."
    )


class GaLoreMethod(_Method):
    """GaLore (Zhao et al. 2024): every parameter trains, but the gradients of the chosen linear
    layers are projected to a low-rank subspace (refreshed every `update_proj_gap` steps) where the
    optimizer keeps its states. transformers' Trainer builds it (`optim=galore_adamw*`, galore-torch)."""

    name: Literal["galore"] = Field(description="Method: GaLore (full-parameter training, low-rank optimizer states).")
    rank: int = Field(default=128, ge=1, description="Rank of the gradient projection (the paper: 128 for 60M-1B, 512 for 7B).")
    update_proj_gap: int = Field(default=200, ge=1, description="Steps between two recomputations of the projection (SVD of the gradient).")
    scale: float = Field(default=0.25, gt=0, description="Scale of the projected-back update (the paper's alpha).")
    proj_type: Literal["std", "reverse_std", "left", "right", "full"] = Field(default="std", description="Which side the gradient is projected on.")
    target_modules: list[str] = Field(
        default_factory=lambda: [r".*attn.*", r".*mlp.*"],
        description="Regular expressions of the linear layers whose gradients are projected (the other parameters "
        "get plain AdamW).",
    )
    optimizer: Literal["galore_adamw", "galore_adamw_8bit", "galore_adafactor"] = Field(
        default="galore_adamw", description="The GaLore optimizer of transformers' Trainer."
    )
    layerwise: bool = Field(
        default=False, description="Update each layer during the backward pass (saves the gradient memory; needs "
        "gradient_accumulation_steps 1)."
    )


class _BottleneckFields(_Method):
    bottleneck_size: int = Field(
        default=16, ge=1, description="Width m of the adapter's down-projection (Houlsby et al.: 8-256; 2mr + d + m "
        "parameters per adapter for hidden size d)."
    )
    target_modules: list[str] = Field(
        default_factory=lambda: ["self_attn", "mlp"],
        description="Sub-layers whose output gets an adapter (module names: Llama/Qwen `self_attn`, `mlp`; GPT-2 "
        "`attn`, `mlp`). Houlsby places one after attention and one after the feed-forward block.",
    )
    non_linearity: Literal["relu", "gelu", "silu", "tanh"] = Field(default="relu", description="Activation between down and up projection.")

    @field_validator("target_modules")
    @classmethod
    def _non_empty(cls, value: list[str]) -> list[str]:
        if not value:
            raise ValueError("target_modules is empty: name the sub-layers to adapt (e.g. [self_attn, mlp])")
        return value


class AdapterMethod(_BottleneckFields):
    """Adapter Tuning: bottleneck adapters (down-project, non-linearity, up-project, residual) on the
    sub-layers' outputs. `sequential` is Houlsby et al. 2019 (the adapter reads the sub-layer's
    output); `parallel` is He et al. 2022 (it reads the sub-layer's input, its output is added)."""

    name: Literal["adapter"] = Field(description="Method: bottleneck adapters (Adapter Tuning).")
    placement: Literal["sequential", "parallel"] = Field(default="sequential", description="Sequential (Houlsby) or parallel (He et al.) adapters.")
    scaling: float = Field(default=1.0, gt=0, description="Multiplier s of the adapter's output (He et al. use 4 for parallel adapters).")


class AdapterDropMethod(_BottleneckFields):
    """AdapterDrop (Rücklé et al. 2021): bottleneck adapters with those of the lowest transformer
    blocks removed, for training and inference: backpropagation stops above them and inference
    skips them (the paper keeps most accuracy dropping adapters from the first 5 of 12 layers)."""

    name: Literal["adapter_drop"] = Field(description="Method: AdapterDrop (adapters in the upper layers only).")
    placement: Literal["sequential", "parallel"] = Field(default="sequential", description="Sequential (Houlsby) or parallel adapters.")
    scaling: float = Field(default=1.0, gt=0, description="Multiplier of the adapter's output.")
    drop_first_layers: int = Field(default=1, ge=1, description="Number of lowest transformer blocks without adapters.")


class MamAdapterMethod(_Method):
    """MAM Adapter (He et al. 2022, "Towards a Unified View of Parameter-Efficient Transfer
    Learning"): prefix tuning on the attention (a small share of the budget) plus a parallel,
    scaled bottleneck adapter on the feed-forward block (most of it)."""

    name: Literal["mam_adapter"] = Field(description="Method: MAM Adapter (prefix on attention + parallel FFN adapter).")
    prefix_length: int = Field(default=30, ge=1, description="Prefix keys/values per attention layer (the paper: 30).")
    bottleneck_size: int = Field(default=512, ge=1, description="Width of the parallel FFN adapter (the paper: 512 on 1024-wide models).")
    scaling: float = Field(default=4.0, gt=0, description="Multiplier s of the parallel adapter's output (the paper: 4).")
    ffn_module: str = Field(default="mlp", description="Feed-forward sub-layer that gets the parallel adapter (Llama/Qwen: mlp).")
    key_module: str = Field(default="k_proj", description="Key projection of each attention layer; its attention gets the prefix.")
    non_linearity: Literal["relu", "gelu", "silu", "tanh"] = Field(default="relu", description="Activation of the adapter.")


class UniPeltMethod(_Method):
    """UniPELT (Mao et al. 2022): LoRA on the query/value projections, prefix tuning on the
    attention and a sequential bottleneck adapter after the feed-forward block, each scaled by its
    own learned gate sigmoid(W x) per token, so training decides which sub-method matters where."""

    name: Literal["unipelt"] = Field(description="Method: UniPELT (gated LoRA + prefix + adapter).")
    lora_r: int = Field(default=8, ge=1, description="LoRA rank (the paper: 8).")
    lora_alpha: float = Field(default=16, gt=0, description="LoRA scaling numerator (scale alpha / r).")
    lora_modules: list[str] = Field(default_factory=lambda: ["q_proj", "v_proj"], description="Linear layers with gated LoRA (the paper: W_q, W_v).")
    prefix_length: int = Field(default=10, ge=1, description="Prefix keys/values per attention layer (the paper: 10).")
    key_module: str = Field(default="k_proj", description="Key projection of each attention layer; its attention gets the gated prefix.")
    bottleneck_size: int = Field(default=48, ge=1, description="Width of the gated adapter after the feed-forward block (the paper: 48).")
    ffn_module: str = Field(default="mlp", description="Feed-forward sub-layer followed by the adapter.")
    non_linearity: Literal["relu", "gelu", "silu", "tanh"] = Field(default="relu", description="Activation of the adapter.")

    @model_validator(mode="after")
    def _disjoint(self) -> "UniPeltMethod":
        if not self.lora_modules:
            raise ValueError("lora_modules is empty: name the projections to adapt (e.g. [q_proj, v_proj])")
        if self.key_module in self.lora_modules:
            raise ValueError(f"{self.key_module} is both the prefix's key_module and a lora_module: one layer holds one role")
        return self


class AdapterFusionMethod(_Method):
    """AdapterFusion (Pfeiffer et al. 2021), the second of its two stages: the per-task bottleneck
    adapters of an earlier sft run (`method: adapter`, `adapters: per_task`) are loaded frozen, and
    a fusion layer after each adapter learns, per token, an attention over their outputs
    (query: the sub-layer's output; keys/values: each adapter's output) on the union of tasks. The
    result is one adapter directory holding the task adapters and the fusion weights."""

    name: Literal["adapter_fusion"] = Field(description="Method: AdapterFusion over per-task adapters.")
    adapters_from: str = Field(
        description="The per-task sft artifact to fuse: its directory (with adapters/<task>/), relative to this "
        "config file. Like a local `model:` directory, the path (not its content) is part of the cache key: point at "
        "a published artifact, whose directory name is its own content key."
    )
    fuse: list[str] | None = Field(default=None, description="Task adapters to fuse; default: all of the artifact's.")

    @field_validator("adapters_from")
    @classmethod
    def _resolve(cls, value: str, info: ValidationInfo) -> str:
        return resolve_path(value, info)

    @field_validator("fuse")
    @classmethod
    def _two(cls, value: list[str] | None) -> list[str] | None:
        if value is not None and len(set(value)) < 2:
            raise ValueError("fuse needs at least two task adapters (fusing one is that adapter)")
        return value

MethodConfig = Annotated[
    Union[
        FullMethod, FreezeMethod, BitFitMethod, LoraMethod, QLoraMethod, AdaLoraMethod, IA3Method,
        PromptTuningMethod, PrefixTuningMethod, PTuningMethod, PTuningV2Method, LoraPlusMethod, GaLoreMethod,
        AdapterMethod, AdapterDropMethod, MamAdapterMethod, UniPeltMethod, AdapterFusionMethod,
    ],
    Field(discriminator="name"),
]

METHOD_NAMES = (
    "full", "freeze", "bitfit", "lora", "qlora", "adalora", "ia3", "prompt_tuning", "prefix_tuning", "p_tuning",
    "p_tuning_v2", "lora_plus", "galore", "adapter", "adapter_drop", "mam_adapter", "unipelt", "adapter_fusion",
)


def method_shorthand(value: Any) -> Any:
    """`method: lora` → `{name: lora}`."""
    return {"name": value} if isinstance(value, str) else value
