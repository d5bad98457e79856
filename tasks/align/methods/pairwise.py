"""The methods that train on preference pairs (DPO, KTO, ORPO): the pairs come from the data
artifact or are sampled from the SFT policy and ranked (`align.preferences.source: on_policy`)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from tunepipe.tasks.align.methods.base import AlignMethodUnit, AlignRun
from tunepipe.tasks.align.preferences import on_policy_pairs, require_pairs
from tunepipe.tasks.lm.pairs import conversational_pair
from tunepipe.tasks.training.trainer import is_main_process

# TRL's step-log keys → our metric names.
PAIRWISE_STEP_METRICS = {
    "loss": "loss",
    "rewards/chosen": "reward_chosen",
    "rewards/rejected": "reward_rejected",
    "rewards/margins": "margin",
    "rewards/accuracies": "accuracy",
    "kl": "kl",
    "log_odds_ratio": "log_odds_ratio",
    "router_aux_loss": "router_aux_loss",  # MoE policies (tasks/training/moe.py)
}


class PairwiseUnit(AlignMethodUnit):
    """A method on pairs: subclasses turn the pairs into their trainer (`pair_trainer`)."""

    def step_metrics(self, method: Any) -> dict[str, str]:
        return PAIRWISE_STEP_METRICS

    def build_trainer(self, run: AlignRun) -> Any:
        pairs = self.train_pairs(run)
        run.extra["train_pairs"] = len(pairs)
        return self.pair_trainer(run, pairs)

    def pair_trainer(self, run: AlignRun, pairs: list[dict[str, Any]]) -> Any:
        raise NotImplementedError(f"{type(self).__name__} builds no trainer on pairs")

    def train_pairs(self, run: AlignRun) -> list[dict[str, Any]]:
        """The data artifact's train pairs, or the SFT policy's own samples ranked (written to the artifact)."""
        config, job = run.config, run.job
        if config.preferences.source != "on_policy":
            return job.train_pairs
        pairs, run.extra["on_policy"] = on_policy_pairs(
            run.model, run.tokenizer, job.prompts, config.preferences, run.reward, config.training.seed, run.judge
        )
        if is_main_process():
            Path(job.pairs_file).write_text("".join(json.dumps(p) + "\n" for p in pairs))
        require_pairs(run.name, config, run.extra["on_policy"])
        return pairs


def pair_dataset(pairs: list[dict[str, Any]], tokenizer: Any) -> Any:
    """Conversational prompt/chosen/rejected rows (DPO, ORPO)."""
    from datasets import Dataset


    return Dataset.from_list([conversational_pair(p, tokenizer) for p in pairs])
