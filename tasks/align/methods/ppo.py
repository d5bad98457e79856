"""`align.method: ppo`: PPO with a value model, a frozen reference and the reward model. Every use
of TRL's experimental PPO stays in `tasks/align/ppo.py` (why: see there); this unit only plugs it
into the align run: PPO's own loop (no Trainer step count), its policy and value model, its metrics."""

from __future__ import annotations

from typing import Any, ClassVar

from tunepipe.schemas.align import PPOMethod
from tunepipe.tasks.align import ppo
from tunepipe.tasks.align.methods.base import AlignMethodUnit, AlignRun


class PPO(AlignMethodUnit):
    config_cls = PPOMethod
    counts_steps: ClassVar[bool] = False  # TRL's PPO loop keeps no Trainer step count

    def step_metrics(self, method: Any) -> dict[str, str]:
        return ppo.STEP_METRICS

    def build_trainer(self, run: AlignRun) -> Any:
        return ppo.ppo_trainer(
            run.config, run.env, run.model, run.tokenizer, run.job.prompts, run.base_args, run.callbacks, run.reward
        )

    def policy(self, trainer: Any) -> Any:
        return trainer.policy_model

    def count_parameters(self, trainer: Any, run: AlignRun) -> tuple[int, int]:
        """The policy's adapter and the value model (it trains in full), each also reported by role."""
        counts = ppo.trainable_parameters(trainer)
        run.extra["trainable_parameters_by_model"] = {role: c[0] for role, c in counts.items()}
        return sum(c[0] for c in counts.values()), sum(c[1] for c in counts.values())

    def train(self, trainer: Any, run: AlignRun) -> dict[str, Any]:
        return ppo.train_ppo(trainer, run.config.method.vf_coef)

    def zero_std_fractions(self, steps: dict[str, list[dict[str, float]]]) -> list[float]:
        # One group per update: the rollout batch.
        return [float(p["value"] == 0.0) for p in steps.get("reward_std", [])]

    def sample_size_knob(self, method: PPOMethod) -> str:
        return "response_length"


UNIT = PPO()
