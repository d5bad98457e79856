"""Optimisation hyper-parameters (`training:` of sft, pretrain, reward and align).

Batch size, accumulation, precision, gradient checkpointing, attention kernel and launcher come
from the hardware profile (environments/, decided by tasks/training/hardware.py), never from here.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field
from tunepipe.schemas.base import StrictModel


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
