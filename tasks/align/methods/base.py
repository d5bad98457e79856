"""What every align method's unit is: its config class, its step metrics, how its trainer is built
and trained. One subclass per method, one module each (`tasks/align/methods/<name>.py`), the way
TRL pairs `dpo_config.py` with `dpo_trainer.py`; `tasks/align/train.py` runs any of them alike.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

from tunepipe.schemas.align import AlignConfig, AlignMethodConfig, method_name
from tunepipe.schemas.environment import EnvironmentProfile
from tunepipe.tasks.align.job import AlignJob
from tunepipe.tasks.training import peft_methods
from tunepipe.tasks.training.trainer import fit



@dataclass
class AlignRun:
    """What one run's trainer is built from: the validated config and profile, the job's data and
    paths, the loaded policy and scorers. `extra` collects what the method adds to the run's metrics."""

    config: AlignConfig
    env: EnvironmentProfile
    job: AlignJob
    model: Any
    tokenizer: Any
    base_args: dict[str, Any]
    callbacks: list[Any]
    reward: tuple[Any, Any] | None = None
    judge: Any = None
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def name(self) -> str:
        """The run's name (a task, or `all`)."""
        return self.job.run


class AlignMethodUnit:
    """One align method. Subclasses set `config_cls` and build the trainer; the defaults fit a
    `transformers.Trainer`-based TRL trainer whose model is the policy."""

    config_cls: ClassVar[type[AlignMethodConfig]]
    # The Trainer's step count is checked against training.max_steps (false for a loop of its own).
    counts_steps: ClassVar[bool] = True

    @property
    def name(self) -> str:
        return method_name(self.config_cls)

    def step_metrics(self, method: Any) -> dict[str, str]:
        """{TRL log key: our metric name} of what this method's trainer logs per step."""
        raise NotImplementedError(f"{type(self).__name__} names no step metrics")

    def build_trainer(self, run: AlignRun) -> Any:
        """The ready trainer of one run."""
        raise NotImplementedError(f"{type(self).__name__} builds no trainer")

    def policy(self, trainer: Any) -> Any:
        """The model being aligned (a PeftModel whose `default` adapter trains)."""
        return trainer.model

    def count_parameters(self, trainer: Any, run: AlignRun) -> tuple[int, int]:
        """(trainable, total) parameters of what trains."""
        return peft_methods.count_parameters(self.policy(trainer))

    def train(self, trainer: Any, run: AlignRun) -> dict[str, Any]:
        """Train (resuming from the run's last checkpoint); step, timing and token metrics."""
        return fit(trainer, run.job.checkpoint_dir)

    def zero_std_fractions(self, steps: dict[str, list[dict[str, float]]]) -> list[float]:
        """Per step, the share of reward groups whose samples all earned the same reward (online methods)."""
        return [p["value"] for p in steps.get("frac_reward_zero_std", [])]

    def sample_size_knob(self, method: Any) -> str:
        """The knob that sets how many samples a reward group has, as advice names it."""
        return f"num_generations ({method.num_generations})"
