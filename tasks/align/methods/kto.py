"""`align.method: kto`: KTOTrainer on unpaired examples, each preference pair giving one desirable
(chosen) and one undesirable (rejected) example."""

from __future__ import annotations

from typing import Any

from tunepipe.schemas.align import KTOMethod
from tunepipe.tasks.align.methods.base import AlignRun
from tunepipe.tasks.align.methods.pairwise import PairwiseUnit
from tunepipe.tasks.lm.encoding import data_messages
from tunepipe.tasks.training.moe import router_loss_weight


def kto_examples(pairs: list[dict[str, Any]], tokenizer: Any = None) -> list[dict[str, Any]]:
    """Each pair as two unpaired KTO examples: chosen (desirable) and rejected (undesirable)."""
    def text(messages: list[dict[str, str]]) -> list[dict[str, str]]:  # contents tokenize as text
        return data_messages(tokenizer, messages) if tokenizer is not None else messages

    out = []
    for pair in pairs:
        prompt = text([{"role": "user", "content": pair["prompt"]}])
        out.append({"prompt": prompt, "completion": text([{"role": "assistant", "content": pair["chosen"]}]), "label": True})
        out.append({"prompt": prompt, "completion": text([{"role": "assistant", "content": pair["rejected"]}]), "label": False})
    return out


class KTO(PairwiseUnit):
    config_cls = KTOMethod

    def pair_trainer(self, run: AlignRun, pairs: list[dict[str, Any]]) -> Any:
        from datasets import Dataset
        from trl import KTOConfig, KTOTrainer

        method = run.config.method
        args = KTOConfig(
            **run.base_args, beta=method.beta, desirable_weight=method.desirable_weight,
            undesirable_weight=method.undesirable_weight, max_length=run.config.max_length, disable_dropout=True,
            router_aux_loss_coef=router_loss_weight(run.model),
        )
        dataset = Dataset.from_list(kto_examples(pairs, run.tokenizer))
        return KTOTrainer(
            model=run.model, ref_model=None, args=args, train_dataset=dataset, processing_class=run.tokenizer,
            callbacks=run.callbacks,
        )


UNIT = KTO()
