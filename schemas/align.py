"""The `align:` section: preference optimisation and RL on top of the SFT result.

`method` is a discriminated union on `name`, like `sft.method`: each method holds only its own
knobs (`beta` of DPO is not `beta` of GRPO: the first scales the implicit reward, the second is
a KL coefficient), so every knob that changes the result is in the config and therefore in the
stage's cache key. `method: dpo` is shorthand for `{name: dpo}`.

Each method's class carries its `category` (what it trains on) and the rewards it asks for; the
stage and the trainer read those, never a list of method names. Its trainer is its unit in
`tasks/align/methods/<name>.py` (like TRL's `dpo_config.py` beside `dpo_trainer.py`). A method
added outside this file registers its class with `register_align_method` (`tasks/align/methods/units.py`
does that), and `align.method` then accepts it by name.
"""

from __future__ import annotations

from typing import Annotated, Any, ClassVar, Literal, Union

from pydantic import Field, SerializeAsAny, ValidatorFunctionWrapHandler, field_validator, model_validator
from tunepipe.schemas.base import CheckAction, StrictModel, self_checks_field
from tunepipe.schemas.scoring import ScoringConfig
from tunepipe.schemas.evaluate import EndpointSettings
from tunepipe.schemas.methods import LoraSettings, method_shorthand
from tunepipe.schemas.training import TrainingConfig

# What trl 1.12's DPOConfig.loss_type accepts.
DPO_LOSS_TYPES = (
    "sigmoid", "hinge", "ipo", "exo_pair", "nca_pair", "robust", "bco_pair", "sppo_hard", "aot", "aot_unpaired",
    "apo_zero", "apo_down", "discopop", "sft", "sigmoid_norm",
)
DPOLoss = Literal[
    "sigmoid", "hinge", "ipo", "exo_pair", "nca_pair", "robust", "bco_pair", "sppo_hard", "aot", "aot_unpaired",
    "apo_zero", "apo_down", "discopop", "sft", "sigmoid_norm",
]
# Rule-based (verifiable) rewards; `reward_model` scores with the `reward` input instead.
RULE_REWARDS = ("exact_match", "token_f1", "triple_format")
RewardName = Literal["exact_match", "token_f1", "triple_format", "reward_model", "judge"]


# The self-checks the stage runs (tasks/lm/checks.py).
ALIGN_CHECKS = ("steps", "loss", "adapter_changed", "reward_variance", "reward_moved")

# What a method trains on: `pairwise` methods on preference pairs (from the dataset or sampled on
# policy); `online` methods sample from the policy while training and learn from rewards.
MethodCategory = Literal["pairwise", "online"]


class AlignMethodConfig(StrictModel):
    """What every align method's config has: its `name` (a Literal in each subclass), its category
    and the reward sources it scores with."""

    category: ClassVar[MethodCategory]

    def reward_sources(self) -> tuple[str, ...]:
        """The rewards this method trains on (`reward_model`, `judge`, rule names); none for pairwise methods."""
        return ()


class DPOMethod(AlignMethodConfig):
    """Direct preference optimisation on chosen/rejected pairs (reference: the frozen SFT policy)."""

    category: ClassVar[MethodCategory] = "pairwise"
    name: Literal["dpo"] = Field(description="Method: DPO.")
    beta: float = Field(default=0.1, gt=0, description="Inverse temperature of the implicit reward (higher: stay closer to the reference).")
    loss_type: list[DPOLoss] = Field(
        default_factory=lambda: ["sigmoid"],
        description=f"DPO loss variant(s) as TRL names them ({', '.join(DPO_LOSS_TYPES)}); several are summed, "
        "weighted by `loss_weights`.",
    )
    loss_weights: list[float] | None = Field(default=None, description="Weights of the loss variants (default: 1 each).")
    label_smoothing: float = Field(default=0.0, ge=0, lt=0.5, description="Assumed label-flip probability (robust DPO, EXO).")

    @field_validator("loss_type", mode="before")
    @classmethod
    def _one_or_many(cls, value: Any) -> Any:
        return [value] if isinstance(value, str) else value

    @model_validator(mode="after")
    def _weights(self) -> "DPOMethod":
        if not self.loss_type:
            raise ValueError("loss_type is empty: name at least one loss (e.g. sigmoid)")
        if self.loss_weights is not None and len(self.loss_weights) != len(self.loss_type):
            raise ValueError(f"loss_weights has {len(self.loss_weights)} entries for {len(self.loss_type)} loss types")
        return self


class KTOMethod(AlignMethodConfig):
    """KTO: unpaired desirable/undesirable examples (each pair gives one of each)."""

    category: ClassVar[MethodCategory] = "pairwise"
    name: Literal["kto"] = Field(description="Method: KTO.")
    beta: float = Field(default=0.1, gt=0, description="Strength of the KL term against the reference.")
    desirable_weight: float = Field(default=1.0, gt=0, description="Loss weight of desirable (chosen) examples.")
    undesirable_weight: float = Field(default=1.0, gt=0, description="Loss weight of undesirable (rejected) examples.")


class ORPOMethod(AlignMethodConfig):
    """ORPO: SFT loss plus an odds-ratio preference term; no reference model."""

    category: ClassVar[MethodCategory] = "pairwise"
    name: Literal["orpo"] = Field(description="Method: ORPO.")
    beta: float = Field(default=0.1, gt=0, description="Weight of the odds-ratio term (lambda in the paper).")


class PPOMethod(AlignMethodConfig):
    """PPO (trl.experimental.ppo): policy, value model, frozen reference, reward model, KL penalty."""

    category: ClassVar[MethodCategory] = "online"
    name: Literal["ppo"] = Field(description="Method: PPO (needs the `reward` input).")
    kl_coef: float = Field(default=0.05, ge=0, description="KL penalty coefficient against the reference (per token).")
    kl_estimator: Literal["k1", "k3"] = Field(default="k1", description="KL estimator: k1 (plain log-ratio) or k3 (lower variance).")
    cliprange: float = Field(default=0.2, gt=0, description="Policy ratio clip range.")
    cliprange_value: float = Field(default=0.2, gt=0, description="Value prediction clip range.")
    vf_coef: float = Field(default=0.1, gt=0, description="Value loss coefficient.")
    gamma: float = Field(default=1.0, gt=0, le=1, description="Discount factor.")
    lam: float = Field(default=0.95, gt=0, le=1, description="GAE lambda.")
    num_ppo_epochs: int = Field(default=4, ge=1, description="Optimisation epochs over each batch of rollouts.")
    num_mini_batches: int = Field(default=1, ge=1, description="Mini-batches per rollout batch.")
    whiten_rewards: bool = Field(default=False, description="Whiten rewards before computing advantages (needs mini-batches of >= 8).")
    response_length: int = Field(default=32, ge=1, description="Longest sampled response, in tokens.")
    temperature: float = Field(default=0.7, gt=0, description="Sampling temperature of the rollouts.")
    missing_eos_penalty: float | None = Field(
        default=None, ge=0, description="Subtracted from the score of responses that do not end with EOS."
    )

    def reward_sources(self) -> tuple[str, ...]:
        return ("reward_model",)


class _GroupMethod(AlignMethodConfig):
    """Common knobs of the group-sampling RL methods (GRPO, RLOO)."""

    category: ClassVar[MethodCategory] = "online"
    num_generations: int = Field(default=4, ge=2, description="Completions sampled per prompt (the group).")
    max_completion_length: int = Field(default=32, ge=1, description="Longest sampled completion, in tokens.")
    temperature: float = Field(default=1.0, gt=0, description="Sampling temperature.")
    beta: float = Field(default=0.04, ge=0, description="KL coefficient against the reference (0: no reference, no KL).")
    rewards: list[RewardName] = Field(
        default_factory=lambda: ["token_f1"],
        description=f"Reward functions, summed (weighted by `reward_weights`): rule-based ({', '.join(RULE_REWARDS)}; "
        "scored against the record's reference answer), `reward_model` (needs the `reward` input) and/or `judge` "
        "(RLAIF: the `judge` endpoint compares the group's completions pairwise; reward = share of comparisons won).",
    )
    reward_weights: list[float] | None = Field(default=None, description="Weights of `rewards` (default: 1 each).")

    @model_validator(mode="after")
    def _rewards(self) -> "_GroupMethod":
        if not self.rewards:
            raise ValueError("rewards is empty: name a rule (exact_match, token_f1, triple_format), reward_model or judge")
        if self.reward_weights is not None and len(self.reward_weights) != len(self.rewards):
            raise ValueError(f"reward_weights has {len(self.reward_weights)} entries for {len(self.rewards)} rewards")
        return self

    def reward_sources(self) -> tuple[str, ...]:
        return tuple(self.rewards)


class GRPOMethod(_GroupMethod):
    """GRPO: group-relative advantages over `num_generations` samples per prompt."""

    name: Literal["grpo"] = Field(description="Method: GRPO.")
    loss_type: Literal["grpo", "dr_grpo", "dapo", "bnpo"] = Field(default="dapo", description="GRPO loss aggregation (TRL's names).")
    epsilon: float = Field(default=0.2, gt=0, description="Clip range of the importance ratio.")


class RLOOMethod(_GroupMethod):
    """RLOO: REINFORCE with the leave-one-out mean of the group as baseline."""

    name: Literal["rloo"] = Field(description="Method: RLOO.")


AlignMethod = Annotated[
    Union[DPOMethod, KTOMethod, ORPOMethod, PPOMethod, GRPOMethod, RLOOMethod], Field(discriminator="name")
]  # keep in step with BUILTIN_METHODS
# Methods defined outside this file, by name (register_align_method).
_REGISTERED_METHODS: dict[str, type[AlignMethodConfig]] = {}


BUILTIN_METHODS = (DPOMethod, KTOMethod, ORPOMethod, PPOMethod, GRPOMethod, RLOOMethod)


def method_name(config_cls: type[AlignMethodConfig]) -> str:
    """The `name` a method class answers to (its `name` field's one Literal value)."""
    return config_cls.model_fields["name"].annotation.__args__[0]


def register_align_method(config_cls: type[AlignMethodConfig]) -> None:
    """Let `align.method` accept `config_cls` by its `name` (a method whose unit lives outside this file;
    the built-in ones are the union above, which the config reference documents)."""
    if config_cls in BUILTIN_METHODS:
        return
    name = method_name(config_cls)
    if name in {method_name(c) for c in BUILTIN_METHODS}:
        raise ValueError(f"align method {name!r} is built in: give {config_cls.__name__} another name")
    _REGISTERED_METHODS[name] = config_cls


def registered_method(value: Any) -> type[AlignMethodConfig] | None:
    """The registered class `value` (a dict with a `name`) names, if any."""
    return _REGISTERED_METHODS.get(value.get("name")) if isinstance(value, dict) else None


class PreferencesConfig(StrictModel):
    """Where the preference pairs of dpo / kto / orpo come from."""

    source: Literal["dataset", "on_policy"] = Field(
        default="dataset",
        description="`dataset`: the data artifact's preferences.jsonl (train pairs; validation/test pairs are held "
        "out). `on_policy`: sample `k` completions per train prompt from the SFT policy, rank them with `scorer`, "
        "and pair the best with the worst (written to the artifact as preferences.on_policy.jsonl).",
    )
    k: int = Field(default=4, ge=2, description="Completions sampled per prompt (on_policy).")
    scorer: Literal["reward_model", "rule", "judge"] = Field(
        default="rule",
        description="What ranks the samples (on_policy): the `reward` input, `rule` against the reference answer, or "
        "`judge` (RLAIF: the `judge` endpoint compares every two samples; ranked by comparisons won).",
    )
    rule: Literal["exact_match", "token_f1", "triple_format"] = Field(default="token_f1", description="The rule of scorer `rule`.")
    max_prompts: int = Field(default=256, ge=1, description="Train prompts sampled from (on_policy).")
    max_new_tokens: int = Field(default=32, ge=1, description="Longest sampled completion (on_policy).")
    temperature: float = Field(default=1.0, gt=0, description="Sampling temperature (on_policy).")
    include_greedy: bool = Field(
        default=True,
        description="Also rank the policy's greedy answer with the `k` samples (on_policy). A weak SFT policy's mode is "
        "often right while its samples are gibberish: on the quickstart's sentiment adapter (64 prompts, k 4, token_f1) "
        "temperature 1.0 gave 8 pairs, all gibberish against gibberish; with the greedy answer 38, each choosing the "
        "right label; temperature 0.3 with it 45. On the triples adapter (32 prompts): 0 pairs without it, 18 with it.",
    )
    min_margin: float = Field(
        default=0.0, ge=0,
        description="Pair the best with the worst distinct answer only when their scores differ by more than this "
        "(on_policy); prompts whose answers all score the same never give a pair.",
    )


class AIJudgeConfig(EndpointSettings):
    """RLAIF: an AI judge behind an OpenAI-compatible chat endpoint (tunepipe serve, vLLM, a hosted API).

    Every setting here enters the stage's key; the API key itself never does: only the name of the
    environment variable holding it (`api_key_env`).
    """

    model: str = Field(description="Judge model name on the endpoint.")
    swap_positions: bool = Field(
        default=True,
        description="Ask every comparison in both orders; a verdict that flips with the order counts as a tie (removes "
        "the judge's position bias; doubles the calls).",
    )
    max_tokens: int = Field(default=8, ge=1, description="Longest judge reply (it should answer A, B or TIE).")
    max_calls: int = Field(
        default=2000, ge=1,
        description="Budget of requests sent to the endpoint by one training run (cached judgments are free), and the "
        "same again for the agreement check; per training process under a multi-process launcher.",
    )
    on_budget_exhausted: Literal["fail", "stop"] = Field(
        default="fail",
        description="When the budget is spent: fail the stage, naming the budget, or `stop` judging (remaining "
        "comparisons count as ties; counted in the metrics as `skipped_over_budget`).",
    )
    agreement_pairs: int = Field(
        default=64, ge=0,
        description="Preference pairs of the data artifact (held-out first) the judge also decides, to report its agreement "
        "with the dataset's preferences (`judge.agreement` in the metrics); 0: off.",
    )


class AlignHeldoutConfig(StrictModel):
    """The stage's own checks after training, aligned policy against the SFT policy."""

    max_pairs: int = Field(default=128, ge=0, description="Held-out preference pairs scored (preference accuracy); 0: off.")
    max_examples_per_task: int = Field(
        default=64, ge=0, description="Test records per task answered greedily (task metric, KL, win rate); 0: off."
    )
    max_new_tokens: int = Field(default=64, ge=1, description="Longest generated answer, in tokens.")
    batch_size: int = Field(default=16, ge=1, description="Prompts generated or scored together.")
    samples_per_prompt: int = Field(
        default=4, ge=0,
        description="grpo/rloo with rule rewards: completions sampled per held-out prompt from each policy at the "
        "method's `temperature` (seeded from `training.seed`, the same draws for both), whose mean rule reward "
        "(`sampled_rule_rewards`) is the expected reward the run maximised. It is reported beside the greedy answers' "
        "rewards, which the verdict uses: a run can raise the one and not the other (on the quickstart's triples, "
        "GRPO raised its samples' reward while the greedy answers' stayed or fell). 0: off.",
    )
    general_set: Literal["auto", "on", "off"] = Field(
        default="auto",
        description="Retention, SFT against aligned (and the base), on tunepipe's general-knowledge/chat regression set (48 questions: capitals, arithmetic, "
        "facts, short instructions; an answer counts when it contains an accepted answer), recorded as `retention`. "
        "`auto`: when the base is a pretrained model (not the pipeline's `base_model` artifact, which knows nothing to lose).",
    )


class AlignChecksConfig(StrictModel):
    """Self-checks of the reward-driven methods (ppo, grpo, rloo): a run whose rewards gave the policy
    nothing to learn from fails, naming the task and the likely cause, instead of publishing the SFT
    policy under a new name. An adapter unchanged from SFT's always fails (every method)."""

    max_zero_std_fraction: float = Field(
        default=0.8, ge=0, le=1,
        description="Largest allowed share of reward groups whose samples all earned the same reward, averaged over "
        "the steps (TRL's `frac_reward_zero_std` for grpo/rloo; for ppo the share of updates whose rollouts all "
        "scored the same). Such groups have zero advantage and so give no gradient.",
    )
    min_reward_range: float = Field(
        default=1e-6, ge=0,
        description="The per-step mean reward must span more than this over the run (max - min); a reward that never "
        "moves gave the policy nothing to follow.",
    )
    on_weak_signal: Literal["fail", "warn"] = Field(
        default="fail",
        description="What a failed zero-variance or flat-reward check does: `fail` the stage, or `warn` (logged, kept "
        "in the metrics' `checks` and the summary) and publish anyway.",
    )


class AlignLoraConfig(LoraSettings):
    """The adapter trained on a full-model SFT result (an SFT adapter is trained further instead), as `sft.method`'s LoRA.

    Dropout defaults to 0 here."""

    dropout: float = Field(default=0.0, ge=0, lt=1, description="Dropout on the LoRA input.")


def _align_training() -> TrainingConfig:
    return TrainingConfig(learning_rate=5e-5, warmup_ratio=0.0)


class AlignConfig(StrictModel):
    """Align the SFT policy: DPO/KTO/ORPO on preference pairs, or PPO/GRPO/RLOO with rewards."""

    # SerializeAsAny: a registered method's fields are dumped too (the key and the job carry them).
    method: SerializeAsAny[AlignMethod] = Field(
        default_factory=lambda: DPOMethod(name="dpo"),
        description="Alignment method and its settings (`name`: dpo, kto, orpo, ppo, grpo, rloo). `method: dpo` is "
        "shorthand for `{name: dpo}`.",
    )
    preferences: PreferencesConfig = Field(
        default_factory=PreferencesConfig, description="Source of the preference pairs (dpo, kto, orpo)."
    )
    tasks: list[str] | None = Field(
        default=None, description="Only these tasks' prompts and pairs; default: all (per-task SFT adapters: each its own)."
    )
    max_length: int = Field(default=512, ge=8, description="Longest tokenized prompt + response.")
    max_prompts: int | None = Field(default=None, ge=1, description="Train prompts used by ppo / grpo / rloo; default: all.")
    task_metric: Literal["exact_match", "token_f1"] = Field(
        default="token_f1", description="The held-out task metric the aligned policy is compared on against SFT."
    )
    task_tolerance: float = Field(
        default=0.05,
        ge=0,
        description="Largest allowed drop of `task_metric` from SFT to aligned; recorded as "
        "`task_metric_within_tolerance` (the evaluate gate acts on it; this stage does not fail).",
    )
    preference_tolerance: float = Field(
        default=0.0, ge=0,
        description="dpo/kto/orpo: largest allowed fall of the held-out preference accuracy (the policy's own log-likelihood "
        "preferring chosen over rejected) from SFT to aligned; a run whose accuracy fell further is not better than SFT, "
        "whatever the reward model says.",
    )
    judge: AIJudgeConfig | None = Field(
        default=None,
        description="The AI judge of RLAIF (preferences.scorer: judge, or a `judge` reward); judgments are cached in the "
        "stage's checkpoint directory by the sha256 of the request.",
    )
    lora: AlignLoraConfig = Field(
        default_factory=AlignLoraConfig, description="The adapter trained on a full-model SFT result."
    )
    training: TrainingConfig = Field(default_factory=_align_training, description="Optimisation hyper-parameters.")
    self_checks: dict[Literal[ALIGN_CHECKS], CheckAction] = self_checks_field("align", ALIGN_CHECKS)
    heldout: AlignHeldoutConfig = Field(default_factory=AlignHeldoutConfig, description="Aligned-vs-SFT checks recorded in the metrics.")
    scoring: ScoringConfig = Field(
        default_factory=ScoringConfig,
        description="How the held-out check's answers are scored (normalisation, labels per task); default: the pipeline's `scoring:`.",
    )
    checks: AlignChecksConfig = Field(
        default_factory=AlignChecksConfig, description="Self-checks that a reward-driven run (ppo, grpo, rloo) learned something."
    )

    @field_validator("method", mode="wrap")
    @classmethod
    def _shorthand(cls, value: Any, handler: ValidatorFunctionWrapHandler) -> Any:
        value = method_shorthand(value)
        registered = registered_method(value)
        return registered.model_validate(value) if registered is not None else handler(value)

    @model_validator(mode="after")
    def _combos(self) -> "AlignConfig":
        if self.tasks is not None and not self.tasks:
            raise ValueError("tasks is empty: omit it to align every task")
        if self.uses_judge() and self.judge is None:
            raise ValueError("a `judge` reward or preferences.scorer: judge needs a `judge:` section (url, model)")
        if self.judge is not None and not self.uses_judge() and not self.judge.agreement_pairs:
            raise ValueError("judge is set but nothing uses it: add a `judge` reward, preferences.scorer: judge, or agreement_pairs")
        return self

    def uses_judge(self) -> bool:
        """True when training asks the AI judge (on-policy pair scoring or a GRPO/RLOO reward)."""
        return "judge" in self.method.reward_sources() or self._ranks_on_policy_with("judge")

    def needs_reward_model(self) -> bool:
        """True when the stage cannot run without the `reward` input."""
        return "reward_model" in self.method.reward_sources() or self._ranks_on_policy_with("reward_model")

    def trains_on_pairs(self) -> bool:
        """True for the pairwise methods (dpo, kto, orpo, ...)."""
        return self.method.category == "pairwise"

    def samples_prompts(self) -> bool:
        """True when training needs the train prompts: an online method, or on-policy pairs."""
        return self.method.category == "online" or (self.trains_on_pairs() and self.preferences.source == "on_policy")

    def _ranks_on_policy_with(self, scorer: str) -> bool:
        return self.trains_on_pairs() and self.preferences.source == "on_policy" and self.preferences.scorer == scorer
