"""The `sft:` section: instruction fine-tuning on the data splits, one method per run.

The method is a model of `schemas/methods.py` (`method: lora` is shorthand for `{name: lora}`);
the training hyper-parameters (`training:`) are `schemas/training.py`'s, shared with pretrain,
reward and align. Batch size, accumulation, precision, gradient checkpointing, attention kernel
and launcher come from the hardware profile (environments/), never from here.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, ValidationInfo, field_validator, model_validator
from tunepipe.schemas.base import CheckAction, StrictModel, resolve_model, resolve_path, self_checks_field
from tunepipe.schemas.methods import LoraMethod, MethodConfig, method_shorthand
from tunepipe.schemas.scoring import ScoringConfig
from tunepipe.schemas.training import LOMO_OPTIMIZERS, TrainingConfig

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

SFT_CHECKS = ("label_mask", "steps", "loss", "adapter_effect")  # the self-checks the stage runs (tasks/lm/checks.py)


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
