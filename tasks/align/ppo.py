"""PPO for `align.method: ppo`, through `trl.experimental.ppo` (the only module that imports it).

Why this module exists: TRL moved `PPOTrainer` to `trl.experimental.ppo` in 1.10 and deleted it
after 1.12 (upstream PR #7020); its maintained online methods are GRPO and RLOO, which need no
value model. The product promises RLHF as the seeds describe it (a reward model, then PPO with a
value model, a frozen reference and a KL penalty), so we pin `trl==1.12.0`, the last release
that ships PPO, and keep every use of the experimental API here, behind `ppo_trainer()` and
`train_ppo()`. When we move past 1.12, this file is the one to replace (a vendored copy of the
1.12 trainer, or another implementation); nothing else in the pipeline names TRL's PPO. The pin
costs nothing elsewhere: SFT, reward, DPO, KTO, ORPO, GRPO and RLOO all train under 1.12.

Roles: the policy is the SFT adapter trained further; the reference is a frozen copy of that
adapter (`ref_adapter_name`, no second copy of the base weights); the reward model is the
`reward` artifact merged into a plain sequence-classification model; the value model starts as
a copy of the reward model (the usual initialisation) and trains in full. PPO's loop has no
checkpoint resume in TRL 1.12: an interrupted PPO run restarts that run (finished per-task runs
are kept by the stage).
"""

from __future__ import annotations

import copy
from typing import Any

from tunepipe.schemas.align import AlignConfig, PPOMethod
from tunepipe.schemas.environment import EnvironmentProfile
from tunepipe.tasks.align.policy import REF_ADAPTER, add_reference_adapter
from tunepipe.tasks.training.pairs import render_prompt

STEP_METRICS = {
    "objective/scores": "reward_mean",
    "objective/kl": "kl",
    "objective/rlhf_reward": "rlhf_reward",
    "objective/entropy": "entropy",
    "loss/policy_avg": "policy_loss",
    "loss/value_avg": "value_loss",
    "policy/clipfrac_avg": "clip_fraction",
    "val/clipfrac_avg": "value_clip_fraction",
    "policy/approxkl_avg": "approx_kl",
}


def ppo_args(config: AlignConfig, env: EnvironmentProfile, base_args: dict[str, Any], tokenizer: Any) -> Any:
    """`trl.experimental.ppo.PPOConfig`: PPO's knobs from `align.method`, the rest as for every trainer."""
    from trl.experimental.ppo import PPOConfig

    method: PPOMethod = config.method  # type: ignore[assignment]
    args = {k: v for k, v in base_args.items() if k not in ("max_steps", "eval_strategy")}
    batch = env.per_device_batch_size * env.gradient_accumulation_steps * env.world_size
    return PPOConfig(
        **args,
        # PPO counts episodes (prompts), not optimizer steps: one update per rollout batch.
        total_episodes=config.training.max_steps * batch if config.training.max_steps else None,
        num_ppo_epochs=method.num_ppo_epochs,
        num_mini_batches=method.num_mini_batches,
        whiten_rewards=method.whiten_rewards,
        kl_coef=method.kl_coef,
        kl_estimator=method.kl_estimator,
        cliprange=method.cliprange,
        cliprange_value=method.cliprange_value,
        vf_coef=method.vf_coef,
        gamma=method.gamma,
        lam=method.lam,
        response_length=method.response_length,
        temperature=method.temperature,
        missing_eos_penalty=method.missing_eos_penalty,
        stop_token_id=tokenizer.eos_token_id,
        local_rollout_forward_batch_size=env.per_device_batch_size,
        num_sample_generations=0,
        model_adapter_name="default",
        ref_adapter_name=REF_ADAPTER,
    )


def prompt_dataset(tokenizer: Any, prompts: list[dict[str, Any]]) -> Any:
    """Rendered, tokenized prompts (PPO generates from `input_ids`, left-padded by its collator)."""
    from datasets import Dataset

    rows = [{"input_ids": tokenizer(render_prompt(tokenizer, p["prompt"]), add_special_tokens=False)["input_ids"]} for p in prompts]
    return Dataset.from_list(rows)


def _see_through(wrapper: Any) -> None:
    """Let attribute reads on a DistributedDataParallel wrapper fall through to the module it wraps (its class
    becomes a subclass whose `__getattr__` tries the wrapped module last): what TRL's PPO reads off its
    policy-and-value model (`.policy`, `.config`) then works on the wrapper too. Parameters, state dict and
    forward are untouched."""
    base = type(wrapper)

    def __getattr__(self: Any, name: str) -> Any:
        try:
            return base.__getattr__(self, name)
        except AttributeError:
            return getattr(base.__getattr__(self, "module"), name)

    wrapper.__class__ = type(f"SeeThrough{base.__name__}", (base,), {"__getattr__": __getattr__})


def _multiprocess_safe(trainer_cls: Any) -> Any:
    """TRL 1.12's PPOTrainer made to run under DDP (several processes).

    TRL reads its policy-and-value model's attributes off `self.model` (`self.model.policy` for the reference
    adapter switch and the reference forward pass, `.config` for the checkpoint's model card), but once
    `accelerate` has wrapped that model for several processes `self.model` is a DistributedDataParallel
    without them (AttributeError on every rank). One process never wraps it and is rank 0: nothing changes there."""

    class PPOTrainer(trainer_cls):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            # Set by transformers' Trainer.__init__, which TRL's PPOTrainer never calls; read when a rank other
            # than 0 skips writing a checkpoint.
            if not hasattr(self, "is_distributed_loading_by_transformers"):
                self.is_distributed_loading_by_transformers = False
            if isinstance(self.model, __import__("torch").nn.parallel.DistributedDataParallel):
                _see_through(self.model)

    return PPOTrainer


def ppo_trainer(
    config: AlignConfig, env: EnvironmentProfile, model: Any, tokenizer: Any, prompts: list[dict[str, Any]],
    base_args: dict[str, Any], callbacks: list[Any], reward: tuple[Any, Any],
) -> Any:
    """The PPOTrainer: policy (PeftModel, `default` adapter trains), ref adapter, reward and value models."""
    import torch
    from trl.experimental.ppo import PPOTrainer

    reward_model, _ = reward
    value_model = copy.deepcopy(reward_model)
    for param in value_model.parameters():
        param.requires_grad_(True)
    value_model.train()
    add_reference_adapter(model)
    tokenizer.padding_side = "left"  # PPO takes the prompt as everything before column `context_length`
    torch.manual_seed(config.training.seed)
    dataset = prompt_dataset(tokenizer, prompts)
    return _multiprocess_safe(PPOTrainer)(
        args=ppo_args(config, env, base_args, tokenizer),
        processing_class=tokenizer,
        model=model,
        ref_model=None,
        reward_model=reward_model,
        value_model=value_model,
        train_dataset=dataset,
        eval_dataset=dataset,
        callbacks=callbacks,
    )


def train_ppo(trainer: Any) -> dict[str, Any]:
    """Run PPO; the policy (PeftModel) is `trainer.policy_model` afterwards."""
    import time

    started = time.perf_counter()
    trainer.train()
    return {
        "global_step": int(trainer.state.global_step),
        "episodes": int(trainer.state.episode),
        "train_seconds": round(time.perf_counter() - started, 3),
        "resumed_from": None,
    }
