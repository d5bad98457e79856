"""The `sft:` section: instruction fine-tuning on the data splits, one method per run.

`method` is a discriminated union on `name`: one model per fine-tuning method, each holding
only the knobs that method has, so a knob of another method (say `r` under `ia3`) or an
impossible combination (PiSSA init on a 4-bit base, packing with virtual tokens) fails at load
time with its field path. `method: lora` is shorthand for `method: {name: lora}`.

The training hyper-parameters (`training:`) are shared with the `pretrain:` section. Batch size,
accumulation, precision, gradient checkpointing, attention kernel and launcher come from the
hardware profile (environments/), never from here.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal, Union

from pydantic import Field, ValidationInfo, field_validator, model_validator
from tunepipe.schemas.base import CheckAction, StrictModel, resolve_model, resolve_path, self_checks_field
from tunepipe.schemas.scoring import ScoringConfig

ALL_LINEAR = "all-linear"

# Named chat templates (`chat_template: <name>`). Each marks the assistant's answer and its end
# with `eos_token`, so the trained model learns to stop.
NAMED_CHAT_TEMPLATES: dict[str, str] = {
    "chatml": (
        "{%- for message in messages %}"
        "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
        "{%- endfor %}"
        "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
    ),
    "alpaca": (
        "{%- for message in messages %}"
        "{%- if message['role'] == 'system' %}{{- message['content'] + '\\n\\n' }}"
        "{%- elif message['role'] == 'user' %}{{- '### Instruction:\\n' + message['content'] + '\\n\\n' }}"
        "{%- else %}{{- '### Response:\\n' + message['content'] + eos_token + '\\n\\n' }}{%- endif %}"
        "{%- endfor %}"
        "{%- if add_generation_prompt %}{{- '### Response:\\n' }}{%- endif %}"
    ),
    "plain": (
        "{%- for message in messages %}"
        "{%- if message['role'] == 'assistant' %}{{- message['content'] + eos_token + '\\n' }}"
        "{%- else %}{{- message['content'] + '\\n' }}{%- endif %}"
        "{%- endfor %}"
    ),
}


SFT_CHECKS = ("label_mask", "steps", "loss", "adapter_effect")  # the self-checks the stage runs (tasks/training/checks.py)

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


class RouterConfig(StrictModel):
    """The router of a Mixture-of-Experts model (Mixtral, Qwen-MoE, ...) during fine-tuning."""

    output_router_logits: bool = Field(
        default=True,
        description="Add the router's load-balancing (auxiliary) loss to the training loss, so the experts stay evenly "
        "used; it is logged per step as `router_aux_loss`. Sets the model config's `output_router_logits`.",
    )
    router_aux_loss_coef: float | None = Field(
        default=None, ge=0, description="Weight of the load-balancing loss; default: the model config's own (Mixtral 0.02, Qwen-MoE 0.001)."
    )


LOMO_OPTIMIZERS = ("lomo", "adalomo")


class TrainingConfig(StrictModel):
    """Optimisation hyper-parameters (shared by sft and pretrain). Batch and precision come from the profile."""

    epochs: float = Field(default=1.0, gt=0, description="Passes over the training data (ignored when max_steps is set).")
    max_steps: int | None = Field(default=None, ge=1, description="Optimizer steps to run; overrides epochs.")
    learning_rate: float = Field(default=2e-4, gt=0, description="Peak learning rate.")
    lr_scheduler: Literal["linear", "cosine", "constant", "constant_with_warmup"] = Field(
        default="cosine", description="Learning-rate schedule."
    )
    warmup_ratio: float = Field(default=0.03, ge=0, lt=1, description="Fraction of steps spent warming up.")
    weight_decay: float = Field(default=0.0, ge=0, description="AdamW weight decay.")
    max_grad_norm: float = Field(default=1.0, gt=0, description="Gradient clipping norm.")
    optimizer: Literal["adamw_torch", "adamw_8bit", "paged_adamw_8bit", "paged_adamw_32bit", "sgd", "lomo", "adalomo"] = Field(
        default="adamw_torch",
        description="Optimiser (qlora uses its own `method.optimizer`). `lomo` / `adalomo` (the `lomo-optim` package, "
        "full-parameter methods only): the update is fused into the backward pass, so no optimizer state (AdaLomo: "
        "factored second moments) and one parameter's gradient at a time; no gradient accumulation.",
    )
    router: RouterConfig = Field(
        default_factory=lambda: RouterConfig(),
        description="Mixture-of-Experts models only (ignored for dense models): the router's load-balancing loss.",
    )
    seed: int = Field(default=42, description="Seed of initialisation, shuffling and dropout.")
    logging_steps: int = Field(default=1, ge=1, description="Log the loss every N steps (the loss curve's resolution).")
    save_steps: int = Field(default=50, ge=1, description="Checkpoint every N steps (a killed run resumes from the last one).")
    save_total_limit: int = Field(default=2, ge=1, description="Checkpoints kept on disk.")
    eval_steps: int | None = Field(
        default=None, ge=1, description="Evaluate on the validation split every N steps; default: once at the end."
    )


class HeldoutConfig(StrictModel):
    """Greedy answers on the test split after training, scored against the untrained base."""

    max_examples_per_task: int = Field(
        default=64, ge=0, description="Test records per task to answer (0 turns the held-out check off)."
    )
    max_new_tokens: int = Field(default=64, ge=1, description="Longest generated answer, in tokens.")
    batch_size: int = Field(default=16, ge=1, description="Prompts generated together.")
    general_set: Literal["auto", "on", "off"] = Field(
        default="auto",
        description="Retention, base against trained, on tunepipe's general-knowledge/chat regression set (48 questions: capitals, arithmetic, "
        "facts, short instructions; an answer counts when it contains an accepted answer), recorded as `retention`. "
        "`auto`: when the base is a pretrained model (not the pipeline's `base_model` artifact, which knows nothing to lose).",
    )


class SFTConfig(StrictModel):
    """Instruction SFT on the data artifact's splits (train; validation for eval loss)."""

    model: str | None = Field(
        default=None,
        description="Base model: hub id, local directory, or a GGUF file (or a directory holding one `.gguf`: converted once into tunepipe's cache, weights dequantised). Default: the `pretrain` input artifact if the pipeline "
        "has one, else the `base_model` artifact.",
    )
    revision: str | None = Field(default=None, description="Hub revision (commit sha for reproducible caching).")
    method: MethodConfig = Field(
        default_factory=lambda: LoraMethod(name="lora"),
        description="Fine-tuning method and its settings (`name`: full, freeze, bitfit, galore, lora, lora_plus, qlora, "
        "adalora, ia3, prompt_tuning, prefix_tuning, p_tuning, p_tuning_v2, adapter, adapter_drop, mam_adapter, unipelt, "
        "adapter_fusion). `method: lora` is "
        "shorthand for `{name: lora}`.",
    )
    adapters: Literal["shared", "per_task"] = Field(
        default="shared",
        description="Multi-task: one adapter trained on all tasks mixed (`shared`), or one adapter per task "
        "(`per_task`: the artifact has adapters/<task>/).",
    )
    tasks: list[str] | None = Field(default=None, description="Tasks to train on; default: every task in the train split.")
    chat_template: str = Field(
        default="model",
        description="How records become text: `model` (the tokenizer's own chat template), a named template "
        f"({', '.join(NAMED_CHAT_TEMPLATES)}), or an explicit Jinja template (a string with `{{{{`/`{{%`, or a path "
        "to a .jinja file).",
    )
    system_prompt: str | None = Field(default=None, description="System message prepended to records that have none.")
    train_on_inputs: bool = Field(
        default=False, description="Also put loss on prompt tokens. Default false: loss on the assistant's answers only."
    )
    max_length: int = Field(default=512, ge=8, description="Longest tokenized example (the packed block length when packing).")
    overlong: Literal["truncate", "drop", "fail"] = Field(
        default="truncate",
        description="Examples longer than max_length: cut at max_length, drop them, or fail the stage. Always counted "
        "in the metrics (`truncated`, `dropped_overlong`).",
    )
    packing: bool = Field(
        default=False,
        description="Pack several examples per row (best-fit decreasing), padding-free: examples keep their own "
        "positions and do not attend to each other. The profile's `packed_attention` picks the kernel (flash-attn "
        "varlen or flex_attention compute per-example blocks only; sdpa/eager a dense mask over the flattened batch).",
    )
    training: TrainingConfig = Field(default_factory=TrainingConfig, description="Optimisation hyper-parameters.")
    self_checks: dict[Literal[SFT_CHECKS], CheckAction] = self_checks_field("sft", SFT_CHECKS)
    heldout: HeldoutConfig = Field(
        default_factory=HeldoutConfig,
        description="Held-out learning check: exact match / token F1 on the test split, trained vs base, in the metrics.",
    )
    scoring: ScoringConfig = Field(
        default_factory=ScoringConfig,
        description="How the held-out check's answers are scored (normalisation, labels per task); default: the pipeline's `scoring:`.",
    )

    @field_validator("method", mode="before")
    @classmethod
    def _shorthand(cls, value: Any) -> Any:
        return method_shorthand(value)

    @field_validator("model")
    @classmethod
    def _resolve_model(cls, value: str | None, info: ValidationInfo) -> str | None:
        return None if value is None else resolve_model(value, info)

    @field_validator("chat_template")
    @classmethod
    def _template(cls, value: str, info: ValidationInfo) -> str:
        if value == "model" or value in NAMED_CHAT_TEMPLATES or "{{" in value or "{%" in value:
            return value
        if value.endswith((".jinja", ".j2")):
            return resolve_path(value, info)
        raise ValueError(
            f"chat_template {value!r}: use `model`, a named template ({', '.join(NAMED_CHAT_TEMPLATES)}), "
            "a Jinja template string or a .jinja file"
        )

    @model_validator(mode="after")
    def _combos(self) -> "SFTConfig":
        method = self.method
        if self.adapters == "per_task" and not method.is_peft:
            raise ValueError(
                f"adapters: per_task trains one adapter per task, but method {method.name} saves full weights: "
                "use a PEFT method (lora, qlora, adalora, ia3, adapter, prompt/prefix/p_tuning) or adapters: shared"
            )
        if self.adapters == "per_task" and method.name == "adapter_fusion":
            raise ValueError("adapter_fusion trains one fusion over the per-task adapters on the union of tasks: set adapters: shared")
        if self.packing and method.name in ("mam_adapter", "unipelt"):
            raise ValueError(f"packing: {method.name}'s prefix would be attended by every packed example: set packing: false")
        if self.packing and method.is_prompt_learning:
            raise ValueError(
                f"packing: {method.name} prepends virtual tokens to every row, which would be shared by the packed "
                "examples: set packing: false"
            )
        if self.tasks is not None and not self.tasks:
            raise ValueError("tasks is empty: omit it to train on every task")
        if self.training.optimizer in LOMO_OPTIMIZERS and method.is_peft:
            raise ValueError(
                f"training.optimizer {self.training.optimizer} fuses the update into the backward pass of full-parameter "
                f"training: use method full (or freeze/bitfit), not {method.name}"
            )
        return self
