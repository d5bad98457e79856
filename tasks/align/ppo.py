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
import statistics
import time
from contextlib import contextmanager
from typing import Any, Iterator

from tunepipe.schemas.align import AlignConfig, PPOMethod
from tunepipe.schemas.environment import EnvironmentProfile
from tunepipe.tasks.align.policy import REF_ADAPTER, add_reference_adapter
from tunepipe.tasks.core.stage import StageFailed
from tunepipe.tasks.lm.pairs import render_prompt
from tunepipe.tasks.training import peft_methods

# The last TRL release that ships `trl.experimental.ppo` (pyproject's range admits later ones).
PPO_TRL = "1.12.0"

STEP_METRICS = {
    "loss": "loss",  # not TRL's: written into the log history by `train_ppo` (see `ppo_loss`)
    "reward_std": "reward_std",  # not TRL's either: recorded by `train_ppo` (see `recorded_scores`)
    "objective/scores": "reward_mean",
    "objective/non_score_reward": "kl_penalty",
    "objective/kl": "kl",
    "objective/rlhf_reward": "rlhf_reward",
    "objective/entropy": "entropy",
    "loss/policy_avg": "policy_loss",
    "loss/value_avg": "value_loss",
    "policy/clipfrac_avg": "clip_fraction",
    "val/clipfrac_avg": "value_clip_fraction",
    "policy/approxkl_avg": "approx_kl",
}


def trl_ppo() -> Any:
    """`trl.experimental.ppo`, or a StageFailed naming the TRL pin PPO needs.

    tunepipe's range admits newer TRL so that it installs beside a user's own stack; on those,
    every align method but PPO works, and PPO stops here with the fix instead of an ImportError.
    """
    try:
        from trl.experimental import ppo
    except ImportError as exc:
        import trl

        raise StageFailed(
            f"align.method ppo needs trl=={PPO_TRL}: TRL removed trl.experimental.ppo after 1.12 and this environment "
            f"has trl {trl.__version__} ({exc}). Install it with: pip install 'trl=={PPO_TRL}' "
            "(or use grpo/rloo, TRL's maintained online methods, which need no value model)"
        ) from None
    return ppo


def ppo_args(config: AlignConfig, env: EnvironmentProfile, base_args: dict[str, Any], tokenizer: Any) -> Any:
    """`trl.experimental.ppo.PPOConfig`: PPO's knobs from `align.method`, the rest as for every trainer."""
    PPOConfig = trl_ppo().PPOConfig

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

    from torch.nn.parallel import DistributedDataParallel

    class PPOTrainer(trainer_cls):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            # Set by transformers' Trainer.__init__, which TRL's PPOTrainer never calls; read when a rank other
            # than 0 skips writing a checkpoint.
            if not hasattr(self, "is_distributed_loading_by_transformers"):
                self.is_distributed_loading_by_transformers = False
            if isinstance(self.model, DistributedDataParallel):
                _see_through(self.model)

    return PPOTrainer


def ppo_trainer(
    config: AlignConfig, env: EnvironmentProfile, model: Any, tokenizer: Any, prompts: list[dict[str, Any]],
    base_args: dict[str, Any], callbacks: list[Any], reward: tuple[Any, Any],
) -> Any:
    """The PPOTrainer: policy (PeftModel, `default` adapter trains), ref adapter, reward and value models."""
    import torch

    PPOTrainer = trl_ppo().PPOTrainer

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


def ppo_loss(entry: dict[str, Any], vf_coef: float) -> float | None:
    """The loss PPO minimised in one update: TRL 1.12 optimises `pg_loss + vf_coef * vf_loss` per
    micro-batch and logs the two parts' means (`loss/policy_avg`, `loss/value_avg`), never their sum;
    the mean of the sum is this sum of the means."""
    if "loss/policy_avg" not in entry or "loss/value_avg" not in entry:
        return None
    return float(entry["loss/policy_avg"]) + vf_coef * float(entry["loss/value_avg"])


@contextmanager
def recorded_scores(trainer: Any) -> Iterator[dict[int, list[float]]]:
    """{update: the reward model's score of each rollout}: TRL 1.12 logs only their mean
    (`objective/scores`), and a spread of zero (every rollout scored the same) is the failure the
    stage must see. TRL scores through the module-level `get_reward`; it is wrapped for the run."""
    module = trl_ppo().ppo_trainer

    original = module.get_reward
    scores: dict[int, list[float]] = {}

    def get_reward(model: Any, *args: Any, **kwargs: Any) -> Any:
        out = original(model, *args, **kwargs)
        if model is trainer.reward_model:  # not the value model, scored through the same function
            scores.setdefault(int(trainer.state.global_step) + 1, []).extend(float(x) for x in out[1].flatten())
        return out

    module.get_reward = get_reward
    try:
        yield scores
    finally:
        module.get_reward = original


def train_ppo(trainer: Any, vf_coef: float) -> dict[str, Any]:
    """Run PPO; the policy (PeftModel) is `trainer.policy_model` afterwards. Each logged update
    gets `loss` (what PPO minimised) and `reward_std` (of this process's rollouts) added to the
    log history, so loss curves, step metrics and self-checks read PPO like any other trainer."""
    started = time.perf_counter()
    with recorded_scores(trainer) as scores:
        trainer.train()
    losses = []
    for entry in trainer.state.log_history:
        if "step" in entry and (loss := ppo_loss(entry, vf_coef)) is not None:
            entry["loss"] = loss
            losses.append(loss)
            if len(scores.get(int(entry["step"]), [])) > 1:
                entry["reward_std"] = statistics.pstdev(scores[int(entry["step"])])
    return {
        "global_step": int(trainer.state.global_step),
        "episodes": int(trainer.state.episode),
        "train_loss": round(sum(losses) / len(losses), 6) if losses else None,
        "train_seconds": round(time.perf_counter() - started, 3),
        "resumed_from": None,
    }


def trainable_parameters(trainer: Any) -> dict[str, tuple[int, int]]:
    """{role: (trainable, total)}: PPO trains the policy's adapter and the whole value model."""
    return {"policy": peft_methods.count_parameters(trainer.policy_model), "value_model": peft_methods.count_parameters(trainer.value_model)}
