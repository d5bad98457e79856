"""`align.method: rloo`: RLOOTrainer, REINFORCE with the group's leave-one-out mean as baseline."""

from __future__ import annotations

from typing import Any

from tunepipe.schemas.align import RLOOMethod
from tunepipe.tasks.align.methods.group import GroupUnit


class RLOO(GroupUnit):
    config_cls = RLOOMethod

    def trl_classes(self) -> tuple[Any, Any]:
        from trl import RLOOConfig, RLOOTrainer

        return RLOOConfig, RLOOTrainer


UNIT = RLOO()
