"""The group-sampling RL methods (GRPO, RLOO): `num_generations` completions per prompt, scored by
rule-based rewards, the reward model and/or the AI judge."""

from __future__ import annotations

from typing import Any

from tunepipe.tasks.align.methods.base import AlignMethodUnit, AlignRun
from tunepipe.tasks.align.rewards import judge_reward_func, rule_reward_func
from tunepipe.tasks.lm.encoding import data_messages, reasoning_end
from tunepipe.tasks.lm.reward_model import reward_model_func
from tunepipe.tasks.training.moe import router_loss_weight

# TRL's step-log keys → our metric names.
GROUP_STEP_METRICS = {
    "loss": "loss",
    "reward": "reward_mean",
    "reward_std": "reward_std",
    # Share of groups whose samples all earned the same reward: zero advantage, no gradient.
    "frac_reward_zero_std": "frac_reward_zero_std",
    "kl": "kl",  # logged only with beta > 0
    "entropy": "entropy",
    "clip_ratio/region_mean": "clip_fraction",  # tokens whose importance ratio was clipped
    "clip_ratio/low_mean": "clip_fraction_low",
    "clip_ratio/high_mean": "clip_fraction_high",
    "completions/mean_length": "completion_length",
    "completions/clipped_ratio": "completions_truncated",
    "router_aux_loss": "router_aux_loss",
}


def reward_funcs(method: Any, reward: tuple[Any, Any] | None, judge: Any = None, think_end: str | None = None) -> list[Any]:
    """The TRL reward functions named in `method.rewards` (rules and judge score the answer after a
    reasoning family's think block, `think_end`)."""
    funcs = []
    for name in method.rewards:
        if name == "reward_model":
            assert reward is not None, "the stage checks that a reward input exists"
            funcs.append(reward_model_func(*reward))
        elif name == "judge":
            assert judge is not None, "the config requires a judge section for this reward"
            funcs.append(judge_reward_func(judge, think_end))
        else:
            funcs.append(rule_reward_func(name, think_end))
    return funcs


class GroupUnit(AlignMethodUnit):
    """A group-sampling method: subclasses give TRL's config and trainer classes and their own args."""

    def step_metrics(self, method: Any) -> dict[str, str]:
        """GROUP_STEP_METRICS plus each reward function's own mean and std (TRL: `rewards/<name>/mean`)."""
        keys = dict(GROUP_STEP_METRICS)
        for name in method.rewards:
            # `judge_reward`: the name the RLAIF metrics have always had (tests/integration/test_align_judge.py)
            keys[f"rewards/{name}/mean"] = "judge_reward" if name == "judge" else f"reward_{name}_mean"
            keys[f"rewards/{name}/std"] = f"reward_{name}_std"
        return keys

    def trl_classes(self) -> tuple[Any, Any]:
        """(TRL config class, TRL trainer class)."""
        raise NotImplementedError(f"{type(self).__name__} names no TRL trainer")

    def own_args(self, method: Any) -> dict[str, Any]:
        """The method's knobs beyond the group methods' common ones."""
        return {}

    def build_trainer(self, run: AlignRun) -> Any:
        """The trainer over the train prompts with their reference answers (for rule rewards)."""
        from datasets import Dataset


        method, tokenizer = run.config.method, run.tokenizer
        common = {
            "num_generations": method.num_generations, "max_completion_length": method.max_completion_length,
            "temperature": method.temperature, "beta": method.beta, "reward_weights": method.reward_weights,
            "disable_dropout": True, "log_completions": False,
            "router_aux_loss_coef": router_loss_weight(run.model),  # TRL adds the MoE load-balancing loss itself
        }
        dataset = Dataset.from_list(
            [{"prompt": data_messages(tokenizer, p["prompt"]), "reference": p["reference"]} for p in run.job.prompts]
        )
        config_cls, trainer_cls = self.trl_classes()
        return trainer_cls(
            model=run.model, reward_funcs=reward_funcs(method, run.reward, run.judge, reasoning_end(tokenizer)),
            args=config_cls(**run.base_args, **common, **self.own_args(method)), train_dataset=dataset,
            processing_class=tokenizer, callbacks=run.callbacks,
        )
