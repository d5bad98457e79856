"""`align.method: orpo`: ORPOTrainer (trl.experimental.orpo): SFT loss plus an odds-ratio term, no reference."""

from __future__ import annotations

from typing import Any

from tunepipe.schemas.align import ORPOMethod
from tunepipe.tasks.align.methods.base import AlignRun
from tunepipe.tasks.align.methods.pairwise import PairwiseUnit, pair_dataset


class ORPO(PairwiseUnit):
    config_cls = ORPOMethod

    def pair_trainer(self, run: AlignRun, pairs: list[dict[str, Any]]) -> Any:
        from trl.experimental.orpo import ORPOConfig, ORPOTrainer

        args = ORPOConfig(**run.base_args, beta=run.config.method.beta, max_length=run.config.max_length, disable_dropout=True)
        return ORPOTrainer(
            model=run.model, args=args, train_dataset=pair_dataset(pairs, run.tokenizer), processing_class=run.tokenizer,
            callbacks=run.callbacks,
        )


UNIT = ORPO()
