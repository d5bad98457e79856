"""`align.method` → a ready TRL trainer, one small function per method family.

DPO, KTO (pairs split into desirable/undesirable examples) and ORPO train on preference pairs;
GRPO and RLOO sample `num_generations` completions per prompt and score them with rule-based
rewards and/or the reward model. PPO lives in `tasks/align/ppo.py` (why: see there).

Every trainer gets the policy as a PeftModel whose `default` adapter is the SFT adapter; with
`ref_model=None` TRL then keeps a frozen copy of it as the reference (tasks/align/policy.py).
"""

from __future__ import annotations

from typing import Any

from tunepipe.schemas.align import (
    AlignConfig,
    DPOMethod,
    GRPOMethod,
    KTOMethod,
    ORPOMethod,
    RLOOMethod,
)
from tunepipe.tasks.training.encoding import reasoning_end
from tunepipe.tasks.training.moe import router_loss_weight
from tunepipe.tasks.training.pairs import conversational_pair

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


def group_step_metrics(method: GRPOMethod | RLOOMethod) -> dict[str, str]:
    """GROUP_STEP_METRICS plus each reward function's own mean and std (TRL: `rewards/<name>/mean`)."""
    keys = dict(GROUP_STEP_METRICS)
    for name in method.rewards:
        # `judge_reward`: the name the RLAIF metrics have always had (tests/integration/test_align_judge.py)
        keys[f"rewards/{name}/mean"] = "judge_reward" if name == "judge" else f"reward_{name}_mean"
        keys[f"rewards/{name}/std"] = f"reward_{name}_std"
    return keys


def kto_examples(pairs: list[dict[str, Any]], tokenizer: Any = None) -> list[dict[str, Any]]:
    """Each pair as two unpaired KTO examples: chosen (desirable) and rejected (undesirable)."""
    from tunepipe.tasks.training.encoding import data_messages

    def text(messages: list[dict[str, str]]) -> list[dict[str, str]]:  # contents tokenize as text
        return data_messages(tokenizer, messages) if tokenizer is not None else messages

    out = []
    for pair in pairs:
        prompt = text([{"role": "user", "content": pair["prompt"]}])
        out.append({"prompt": prompt, "completion": text([{"role": "assistant", "content": pair["chosen"]}]), "label": True})
        out.append({"prompt": prompt, "completion": text([{"role": "assistant", "content": pair["rejected"]}]), "label": False})
    return out


def pairwise_trainer(
    config: AlignConfig, model: Any, tokenizer: Any, pairs: list[dict[str, Any]], base_args: dict[str, Any], callbacks: list[Any]
) -> Any:
    """DPOTrainer / KTOTrainer / ORPOTrainer on the train pairs."""
    from datasets import Dataset

    method = config.method
    if isinstance(method, DPOMethod):
        from trl import DPOConfig, DPOTrainer

        args = DPOConfig(
            **base_args, beta=method.beta, loss_type=list(method.loss_type), loss_weights=method.loss_weights,
            label_smoothing=method.label_smoothing, max_length=config.max_length, disable_dropout=True,
            # DPO computes its own loss and adds the router's load-balancing loss itself (MoE policies).
            router_aux_loss_coef=router_loss_weight(model),
        )
        dataset = Dataset.from_list([conversational_pair(p, tokenizer) for p in pairs])
        return DPOTrainer(model=model, ref_model=None, args=args, train_dataset=dataset, processing_class=tokenizer, callbacks=callbacks)
    if isinstance(method, KTOMethod):
        from trl import KTOConfig, KTOTrainer

        args = KTOConfig(
            **base_args, beta=method.beta, desirable_weight=method.desirable_weight,
            undesirable_weight=method.undesirable_weight, max_length=config.max_length, disable_dropout=True,
            router_aux_loss_coef=router_loss_weight(model),
        )
        dataset = Dataset.from_list(kto_examples(pairs, tokenizer))
        return KTOTrainer(model=model, ref_model=None, args=args, train_dataset=dataset, processing_class=tokenizer, callbacks=callbacks)
    if isinstance(method, ORPOMethod):
        from trl.experimental.orpo import ORPOConfig, ORPOTrainer

        args = ORPOConfig(**base_args, beta=method.beta, max_length=config.max_length, disable_dropout=True)
        dataset = Dataset.from_list([conversational_pair(p, tokenizer) for p in pairs])
        return ORPOTrainer(model=model, args=args, train_dataset=dataset, processing_class=tokenizer, callbacks=callbacks)
    raise TypeError(f"{method.name} does not train on pairs")


def reward_funcs(
    method: GRPOMethod | RLOOMethod, reward: tuple[Any, Any] | None, judge: Any = None, think_end: str | None = None
) -> list[Any]:
    """The TRL reward functions named in `method.rewards` (rules and judge score the answer after a
    reasoning family's think block, `think_end`)."""
    from tunepipe.tasks.align.rewards import judge_reward_func, rule_reward_func
    from tunepipe.tasks.training.reward_model import reward_model_func

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


def group_trainer(
    config: AlignConfig, model: Any, tokenizer: Any, prompts: list[dict[str, Any]], base_args: dict[str, Any],
    callbacks: list[Any], reward: tuple[Any, Any] | None, judge: Any = None,
) -> Any:
    """GRPOTrainer / RLOOTrainer over prompts with their reference answers (for rule rewards)."""
    from datasets import Dataset

    method = config.method
    common = {
        "num_generations": method.num_generations, "max_completion_length": method.max_completion_length,
        "temperature": method.temperature, "beta": method.beta, "reward_weights": method.reward_weights,
        "disable_dropout": True, "log_completions": False,
        "router_aux_loss_coef": router_loss_weight(model),  # TRL adds the MoE load-balancing loss itself
    }
    from tunepipe.tasks.training.encoding import data_messages

    dataset = Dataset.from_list([{"prompt": data_messages(tokenizer, p["prompt"]), "reference": p["reference"]} for p in prompts])
    if isinstance(method, GRPOMethod):
        from trl import GRPOConfig, GRPOTrainer

        args = GRPOConfig(**base_args, **common, loss_type=method.loss_type, epsilon=method.epsilon)
        trainer_cls = GRPOTrainer
    elif isinstance(method, RLOOMethod):
        from trl import RLOOConfig, RLOOTrainer

        args = RLOOConfig(**base_args, **common)
        trainer_cls = RLOOTrainer
    else:
        raise TypeError(f"{method.name} is not a group-sampling method")
    return trainer_cls(
        model=model, reward_funcs=reward_funcs(method, reward, judge, reasoning_end(tokenizer)), args=args, train_dataset=dataset,
        processing_class=tokenizer, callbacks=callbacks,
    )
