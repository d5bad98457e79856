"""`align.method: grpo`: GRPOTrainer, group-relative advantages over `num_generations` samples per prompt."""

from __future__ import annotations

from typing import Any

from tunepipe.schemas.align import GRPOMethod
from tunepipe.tasks.align.methods.group import GroupUnit


class GRPO(GroupUnit):
    config_cls = GRPOMethod

    def trl_classes(self) -> tuple[Any, Any]:
        from trl import GRPOConfig, GRPOTrainer

        return GRPOConfig, GRPOTrainer

    def own_args(self, method: GRPOMethod) -> dict[str, Any]:
        return {"loss_type": method.loss_type, "epsilon": method.epsilon}


UNIT = GRPO()
