"""`align.method: dpo`: DPOTrainer on the preference pairs (reference: the frozen SFT adapter)."""

from __future__ import annotations

from typing import Any

from tunepipe.schemas.align import DPOMethod
from tunepipe.tasks.align.methods.base import AlignRun
from tunepipe.tasks.align.methods.pairwise import PairwiseUnit, pair_dataset
from tunepipe.tasks.training.moe import router_loss_weight


class DPO(PairwiseUnit):
    config_cls = DPOMethod

    def pair_trainer(self, run: AlignRun, pairs: list[dict[str, Any]]) -> Any:
        from trl import DPOConfig, DPOTrainer

        method = run.config.method
        args = DPOConfig(
            **run.base_args, beta=method.beta, loss_type=list(method.loss_type), loss_weights=method.loss_weights,
            label_smoothing=method.label_smoothing, max_length=run.config.max_length, disable_dropout=True,
            # DPO computes its own loss and adds the router's load-balancing loss itself (MoE policies).
            router_aux_loss_coef=router_loss_weight(run.model),
        )
        # ref_model=None: TRL keeps a frozen copy of the SFT adapter as the reference (tasks/align/policy.py).
        return DPOTrainer(
            model=run.model, ref_model=None, args=args, train_dataset=pair_dataset(pairs, run.tokenizer),
            processing_class=run.tokenizer, callbacks=run.callbacks,
        )


UNIT = DPO()
