"""The `reward:` section: a reward model learned from preference pairs (TRL's RewardTrainer).

The model is the base with a one-output sequence-classification head; `method` is `lora` /
`qlora` (an adapter on the backbone, the head trained in full and saved with it) or `full`.
Batch, precision and launcher come from the hardware profile, like every training stage.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal, Union

from pydantic import Field, ValidationInfo, field_validator
from tunepipe.schemas.base import CheckAction, StrictModel, resolve_model, self_checks_field
from tunepipe.schemas.methods import FullMethod, LoraMethod, method_shorthand, QLoraMethod
from tunepipe.schemas.training import TrainingConfig

RewardMethod = Annotated[Union[FullMethod, LoraMethod, QLoraMethod], Field(discriminator="name")]


def _reward_training() -> TrainingConfig:
    return TrainingConfig(learning_rate=1e-3, max_steps=None, epochs=1.0, warmup_ratio=0.0)


REWARD_CHECKS = ("steps", "loss", "reward_scores")  # the self-checks the stage runs (tasks/lm/checks.py)

class RewardConfig(StrictModel):
    """Reward model on the data artifact's `preferences.jsonl` (train pairs; held-out pairs for accuracy)."""

    model: str | None = Field(
        default=None,
        description="Start from this model (hub id, local directory, or GGUF file). Default: see `start_from`.",
    )
    revision: str | None = Field(default=None, description="Hub revision of `model` (commit sha for reproducible caching).")
    start_from: Literal["sft", "base"] = Field(
        default="sft",
        description="Without `model`: `sft` starts from the SFT result when the stage has an `sft` input (a full "
        "model as it is; a shared adapter merged into its base; per-task adapters: their base), `base` from the "
        "`pretrain` or `base_model` input (or the SFT artifact's base).",
    )
    method: RewardMethod = Field(
        default_factory=lambda: LoraMethod(name="lora"),
        description="How the reward model trains: `lora`, `qlora` (adapter on the backbone; the score head trains in "
        "full and is saved with the adapter) or `full`. `method: lora` is shorthand for `{name: lora}`.",
    )
    tasks: list[str] | None = Field(
        default=None, description="Only pairs of these tasks (the preference records' `task`); default: every pair."
    )
    max_length: int = Field(default=512, ge=8, description="Longest tokenized prompt + response; longer pairs are truncated.")
    center_rewards_coefficient: float | None = Field(
        default=None, ge=0, description="Push the rewards' mean towards zero with this weight (TRL's centring term)."
    )
    heldout_fraction: float = Field(
        default=0.1,
        gt=0,
        lt=1,
        description="Held-out share of pairs, used only for pairs that carry no `split` (the data stage splits them; "
        "then its validation and test pairs are the held-out ones). Chosen by a hash of the prompt, so it is stable.",
    )
    min_accuracy: float | None = Field(
        default=0.6, ge=0, le=1,
        description="Smallest held-out pairwise accuracy (share of held-out pairs whose chosen answer scores above the "
        "rejected one) at which the reward model is published: below it the stage fails, so no align run optimises "
        "against a reward model that cannot tell preferred from rejected answers (a policy would learn to game it). "
        "Calibration (ECE, Brier of sigmoid(r_chosen - r_rejected)) is reported next to it. `null`: no minimum.",
    )
    training: TrainingConfig = Field(default_factory=_reward_training, description="Optimisation hyper-parameters.")
    self_checks: dict[Literal[REWARD_CHECKS], CheckAction] = self_checks_field("reward", REWARD_CHECKS)

    @field_validator("method", mode="before")
    @classmethod
    def _shorthand(cls, value: Any) -> Any:
        return method_shorthand(value)

    @field_validator("model")
    @classmethod
    def _resolve_model(cls, value: str | None, info: ValidationInfo) -> str | None:
        return None if value is None else resolve_model(value, info)

    @field_validator("tasks")
    @classmethod
    def _non_empty(cls, value: list[str] | None) -> list[str] | None:
        if value is not None and not value:
            raise ValueError("tasks is empty: omit it to use every pair")
        return value
