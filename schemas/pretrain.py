"""The `pretrain:` section: continued pretraining on the data artifact's corpus (optional stage).

The result is always a full model directory (LoRA is merged into the weights), so the `sft`
stage takes it as its base exactly like a hub model.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal, Union

from pydantic import Field, ValidationInfo, field_validator
from tunepipe.schemas.base import CheckAction, StrictModel, resolve_model, self_checks_field
from tunepipe.schemas.methods import FreezeMethod, FullMethod, LoraMethod, method_shorthand
from tunepipe.schemas.training import TrainingConfig

PretrainMethod = Annotated[Union[FullMethod, FreezeMethod, LoraMethod], Field(discriminator="name")]


def _pretrain_training() -> TrainingConfig:
    return TrainingConfig(learning_rate=5e-5)


PRETRAIN_CHECKS = ("labels", "steps", "loss")  # the self-checks the stage runs (tasks/lm/checks.py)

class PretrainConfig(StrictModel):
    """Continued pretraining (next-token loss on every token) of the base model on `corpus.jsonl`."""

    model: str | None = Field(
        default=None,
        description="Model to continue from: hub id, local directory, or GGUF file. Default: the `base_model` input artifact.",
    )
    revision: str | None = Field(default=None, description="Hub revision (commit sha for reproducible caching).")
    method: PretrainMethod = Field(
        default_factory=lambda: FullMethod(name="full"),
        description="`full`, `freeze` (last layers / named modules) or `lora` (merged into the weights on save).",
    )
    max_length: int = Field(default=512, ge=8, description="Block length of the packed training rows.")
    packing: Literal["bfd_split", "bfd", "wrapped"] = Field(
        default="bfd_split",
        description="How documents fill blocks: `bfd_split` (best-fit, long documents split into pieces, no "
        "cross-document attention), `bfd` (best-fit, long documents cut at max_length: counted as truncated), "
        "`wrapped` (concatenate and cut: documents attend to each other).",
    )
    validation_fraction: float = Field(
        default=0.05, ge=0, lt=0.5, description="Share of corpus documents held out for eval loss / perplexity."
    )
    training: TrainingConfig = Field(default_factory=_pretrain_training, description="Optimisation hyper-parameters.")
    self_checks: dict[Literal[PRETRAIN_CHECKS], CheckAction] = self_checks_field("pretrain", PRETRAIN_CHECKS)

    @field_validator("model")
    @classmethod
    def _resolve_model(cls, value: str | None, info: ValidationInfo) -> str | None:
        return None if value is None else resolve_model(value, info)

    @field_validator("method", mode="before")
    @classmethod
    def _shorthand(cls, value: Any) -> Any:
        return method_shorthand(value)
