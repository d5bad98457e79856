"""The `evaluate:` section: a candidate against a baseline on the same held-out prompts.

Task metrics on the data stage's test split, lm-eval on the same split (and any named lm-eval
task), a forgetting check on tasks the candidate was not trained on, a pairwise A/B judged by a
rule, the reward model or an OpenAI-compatible judge, and a promotion gate over all of that.
Every metric is on a 0..1 scale (sacrebleu's BLEU and chrF are divided by 100).
"""

from __future__ import annotations

import re
from typing import Literal

from pydantic import Field, ValidationInfo, field_validator, model_validator
from tunepipe.schemas.base import StrictModel, resolve_model, resolve_path
from tunepipe.schemas.scoring import ScoringConfig
from tunepipe.schemas.sft import NAMED_CHAT_TEMPLATES
from tunepipe.schemas.secret_refs import check_url

BUILTIN_METRICS = ("exact_match", "token_f1", "rouge_l", "bleu", "chrf")
MODEL_SOURCES = ("auto", "align", "sft", "base", "serving")
_CALLABLE = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_]\w*$")


def _model_source(value: str, info: ValidationInfo, allowed: tuple[str, ...], field: str) -> str:
    """A named source stays a name; anything else is a path to an adapter/model/artifact dir."""
    if value in allowed:
        return value
    if value in MODEL_SOURCES:
        raise ValueError(f"{field}: {value!r} is not offered here; one of {', '.join(allowed)} or a path")
    return resolve_path(value, info)


class EndpointSettings(StrictModel):
    """An OpenAI-compatible server (vLLM, the embedded server, a hosted API)."""

    url: str = Field(description="Base URL of the OpenAI-compatible API, e.g. http://127.0.0.1:8000/v1.")
    api_key_env: str | None = Field(
        default=None, description="Environment variable holding the API key; unset: a placeholder key (vLLM needs none)."
    )
    timeout_s: float = Field(default=60.0, gt=0, description="Timeout of one request, in seconds.")
    max_retries: int = Field(default=2, ge=0, description="Retries of a failed request (the openai client's own).")

    @field_validator("url")
    @classmethod
    def _http(cls, value: str) -> str:
        if not value.startswith(("http://", "https://")):
            raise ValueError(f"url {value!r}: must start with http:// or https://")
        return check_url(value, "url", userinfo=False).rstrip("/")


class GenerationEndpoint(EndpointSettings):
    """Generation through a served model (the vLLM server): raw completions of the rendered prompts."""

    candidate_model: str = Field(
        description="Served model name of the candidate (a LoRA's name on a multi-LoRA server); `{task}` is replaced "
        "by the task name for per-task adapters."
    )
    baseline_model: str = Field(description="Served model name of the baseline; `{task}` as for candidate_model.")


class GenerationSettings(StrictModel):
    """How answers are generated: greedy decoding, batched HF generation or a served endpoint."""

    backend: Literal["hf", "endpoint"] = Field(
        default="hf",
        description="`hf`: batched greedy generation in this process on the profile's device; `endpoint`: the "
        "OpenAI-compatible server of `endpoint` (e.g. vLLM) completes the same rendered prompts.",
    )
    max_new_tokens: int = Field(default=64, ge=1, description="Longest generated answer, in tokens.")
    batch_size: int = Field(default=16, ge=1, description="Prompts generated together (and per endpoint request).")
    endpoint: GenerationEndpoint | None = Field(default=None, description="The server (backend: endpoint).")

    @model_validator(mode="after")
    def _endpoint(self) -> "GenerationSettings":
        if self.backend == "endpoint" and self.endpoint is None:
            raise ValueError("backend endpoint needs `endpoint` (url, candidate_model, baseline_model)")
        if self.backend == "hf" and self.endpoint is not None:
            raise ValueError("endpoint is only used with backend: endpoint")
        return self


class LmEvalSettings(StrictModel):
    """lm-evaluation-harness: the test split as local generate_until tasks, plus named tasks. With
    generation.backend endpoint, lm-eval runs through its OpenAI-compatible completions backend
    against the served models (prompts as token ids from each model's own tokenizer)."""

    enabled: bool = Field(default=True, description="Run lm-eval on the candidate and the baseline.")
    tasks: list[str] = Field(
        default_factory=list,
        description="Extra lm-eval task names: tasks under include_paths (offline), or lm-eval's built-in tasks "
        "(their datasets come from the hub, so only where it is reachable).",
    )
    include_paths: list[str] = Field(default_factory=list, description="Directories of local lm-eval task YAMLs.")
    limit: int | None = Field(default=None, ge=1, description="Examples per extra task (the generated tasks use max_examples_per_task).")
    batch_size: int = Field(default=8, ge=1, description="lm-eval's batch size.")

    @field_validator("include_paths")
    @classmethod
    def _paths(cls, value: list[str], info: ValidationInfo) -> list[str]:
        return [resolve_path(v, info) for v in value]


class RegressionSettings(StrictModel):
    """General ability the candidate must not lose: tasks it was not trained on (the forgetting check)."""

    tasks: list[str] = Field(
        default_factory=list,
        description="Tasks of the data stage's test split the candidate was NOT trained on, scored by primary_metric.",
    )
    lm_eval_tasks: list[str] = Field(
        default_factory=list,
        description="lm-eval tasks (found through lm_eval.include_paths or built in) scored by their first metric.",
    )
    general_set: Literal["auto", "on", "off"] = Field(
        default="auto",
        description="tunepipe's general-knowledge/chat regression set (48 questions: capitals, arithmetic, facts, short "
        "instructions; an answer counts when it contains an accepted answer), as the regression entry `general_chat` "
        "(per-task adapters: `general_chat:<task>`, one per adapter), held to gate.max_forgetting_drop. `auto`: when the "
        "base is a pretrained model, not the pipeline's `base_model` artifact (which knows nothing to lose).",
    )
    general_max_new_tokens: int = Field(default=32, ge=1, description="Longest answer to a general-set question, in tokens.")


class JudgeEndpoint(EndpointSettings):
    """An OpenAI-compatible chat model that judges which of two answers is better."""

    model: str = Field(description="Judge model name on the endpoint.")
    swap_positions: bool = Field(
        default=True,
        description="Ask twice with the answers' order swapped; a verdict that flips with the order counts as a tie "
        "(removes the judge's position bias).",
    )


class ABSettings(StrictModel):
    """Pairwise A/B per prompt: candidate against baseline."""

    judge: Literal["rule", "reward_model", "endpoint"] = Field(
        default="rule",
        description="Who decides each pair: `rule` (primary_metric against the reference), `reward_model` (the "
        "`reward` input's scores), `endpoint` (an OpenAI-compatible judge model).",
    )
    endpoint: JudgeEndpoint | None = Field(default=None, description="The judge (judge: endpoint).")
    tie_margin: float = Field(default=0.0, ge=0, description="Score differences up to this are ties (rule and reward_model).")
    ties: Literal["half", "exclude"] = Field(
        default="half", description="Ties in the win rate: count as half a win, or leave them out of it."
    )
    bootstrap_samples: int = Field(default=2000, ge=100, description="Bootstrap resamples for the paired bootstrap of the metric difference.")
    confidence_level: float = Field(default=0.95, gt=0, lt=1, description="Confidence level of the intervals; alpha is 1 minus it.")
    ci_method: Literal["percentile", "basic", "BCa"] = Field(default="percentile", description="scipy.stats.bootstrap method.")
    significance_test: Literal["sign", "paired_bootstrap"] = Field(
        default="sign",
        description="Test of candidate > baseline on primary_metric per prompt: the sign test (binomial on "
        "wins vs losses) or the paired bootstrap of the mean difference. Both are reported.",
    )
    seed: int = Field(default=0, description="Seed of the bootstrap.")

    @model_validator(mode="after")
    def _endpoint(self) -> "ABSettings":
        if self.judge == "endpoint" and self.endpoint is None:
            raise ValueError("judge endpoint needs `endpoint` (url, model)")
        if self.judge != "endpoint" and self.endpoint is not None:
            raise ValueError(f"endpoint is only used with judge: endpoint (judge is {self.judge})")
        return self


class GateRules(StrictModel):
    """Promotion gate: every set rule must pass for the candidate to be promoted. Unset rules are skipped."""

    min_win_rate_lower_bound: float | None = Field(
        default=0.5, ge=0, le=1,
        description="The lower bound of the exact (Clopper-Pearson) interval, at ab.confidence_level, of the share "
        "of decisive pairs (not ties) the candidate wins must exceed this. At 0.5 and level 0.95 it is the one-sided "
        "sign test at alpha 0.025.",
    )
    min_decisive_pairs: int = Field(
        default=10, ge=1,
        description="Never promote on fewer decisive pairs (prompts the judge did not call a tie) than this, "
        "whatever the interval says: a handful of wins among many ties is noise.",
    )
    max_task_metric_drop: float | None = Field(
        default=0.02, ge=0, description="No task's primary_metric may fall below the baseline's by more than this."
    )
    max_forgetting_drop: float | None = Field(
        default=0.05, ge=0, description="No regression task may fall below the baseline's by more than this."
    )
    require_significant: bool = Field(
        default=False, description="The significance test's p-value must be below alpha (1 - ab.confidence_level)."
    )
    require_align_within_tolerance: bool = Field(
        default=True,
        description="When the candidate is the `align` artifact, its recorded `task_metric_within_tolerance` must be "
        "true: alignment may not buy its objective with a task-metric drop from SFT beyond `align.task_tolerance`.",
    )


class EvaluateConfig(StrictModel):
    """Candidate vs baseline on the test split: metrics, lm-eval, forgetting, A/B, promotion gate and a report."""

    candidate: str = Field(
        default="auto",
        description="What is evaluated: `auto` (the `align` input if present, else `sft`), `align`, `sft`, or a path "
        "to an adapter, model or model artifact directory.",
    )
    baseline: str = Field(
        default="auto",
        description="What it is compared with: `auto` (sft when the candidate is align, else the base model), "
        "`base` (the candidate's base model: adapter disabled), `sft`, `serving` (the versions the registry's "
        "`registry_alias` points at, per task; the base model where nothing is serving yet), or a path to an "
        "adapter, model or model artifact directory. `serving` is stateful: the serving versions enter the key, so a "
        "run after a deploy evaluates again.",
    )
    registry: str | None = Field(
        default=None,
        description="Adapter registry for `baseline: serving` (directory or fsspec URI); default: the pipeline's "
        "`deploy.registry`, else `<workdir>/registry`.",
    )
    registry_name: str | None = Field(
        default=None,
        description="Registered adapter name for `baseline: serving` (per-task adapters: `<name>-<task>`); default: "
        "the pipeline's `deploy.name`.",
    )
    registry_alias: str = Field(default="prod", description="The registry alias that marks what is serving.")
    base_model: str | None = Field(
        default=None,
        description="Base model under the adapters; default: the one named in the candidate's outputs.json, else "
        "the `pretrain` or `base_model` input.",
    )
    tasks: list[str] | None = Field(default=None, description="Tasks to evaluate; default: every task the candidate was trained on.")
    max_examples_per_task: int = Field(default=64, ge=1, description="Test records per task (the first ones, in split order).")
    chat_template: str = Field(
        default="candidate",
        description="How prompts are rendered: `candidate` (the template saved with the candidate, i.e. the one it was "
        f"trained with), a named template ({', '.join(NAMED_CHAT_TEMPLATES)}), or a Jinja template.",
    )
    system_prompt: str | None = Field(
        default=None, description="System message for records without one; default: the candidate's training system prompt."
    )
    metrics: list[str] = Field(
        default_factory=lambda: list(BUILTIN_METRICS),
        description=f"Task metrics to compute, of {', '.join(BUILTIN_METRICS)}.",
    )
    user_metrics: dict[str, str] = Field(
        default_factory=dict,
        description="Extra per-example metrics, name → `module:function` taking (prediction, reference) and returning "
        "a float in 0..1; averaged per task.",
    )
    primary_metric: str = Field(
        default="token_f1",
        description="The metric the rule judge, the significance tests and the gate's task-drop and forgetting rules use.",
    )
    scoring: ScoringConfig = Field(
        default_factory=ScoringConfig,
        description="How exact match and token F1 are scored (normalisation, labels per task); default: the pipeline's `scoring:`.",
    )
    generation: GenerationSettings = Field(default_factory=GenerationSettings, description="How answers are generated.")
    lm_eval: LmEvalSettings = Field(default_factory=LmEvalSettings, description="lm-evaluation-harness runs.")
    regression: RegressionSettings = Field(default_factory=RegressionSettings, description="The forgetting check.")
    ab: ABSettings = Field(default_factory=ABSettings, description="Pairwise A/B and its statistics.")
    gate: GateRules = Field(default_factory=GateRules, description="Promotion rules.")
    report_examples: int = Field(default=5, ge=0, description="Example prompts per task shown side by side in the report.")

    @field_validator("candidate")
    @classmethod
    def _candidate(cls, value: str, info: ValidationInfo) -> str:
        return _model_source(value, info, ("auto", "align", "sft"), "candidate")

    @field_validator("baseline")
    @classmethod
    def _baseline(cls, value: str, info: ValidationInfo) -> str:
        return _model_source(value, info, ("auto", "base", "sft", "serving"), "baseline")

    @field_validator("registry")
    @classmethod
    def _registry(cls, value: str | None, info: ValidationInfo) -> str | None:
        return None if value is None or "://" in value else resolve_path(value, info)

    @model_validator(mode="after")
    def _serving_needs_a_name(self) -> "EvaluateConfig":
        if self.baseline == "serving" and (self.registry is None or self.registry_name is None):
            raise ValueError(
                "baseline serving needs `registry` and `registry_name` (in a pipeline they default to the deploy "
                "section's registry and name: add a `deploy:` section or set them)"
            )
        return self

    @field_validator("base_model")
    @classmethod
    def _base(cls, value: str | None, info: ValidationInfo) -> str | None:
        return None if value is None else resolve_model(value, info)

    @field_validator("chat_template")
    @classmethod
    def _template(cls, value: str) -> str:
        if value == "candidate" or value in NAMED_CHAT_TEMPLATES or "{{" in value or "{%" in value:
            return value
        raise ValueError(f"chat_template {value!r}: use `candidate`, one of {', '.join(NAMED_CHAT_TEMPLATES)}, or a Jinja template")

    @field_validator("metrics")
    @classmethod
    def _metrics(cls, value: list[str]) -> list[str]:
        unknown = sorted(set(value) - set(BUILTIN_METRICS))
        if unknown:
            raise ValueError(f"unknown metrics {unknown}; built-in: {', '.join(BUILTIN_METRICS)} (add others as user_metrics)")
        return value

    @field_validator("user_metrics")
    @classmethod
    def _callables(cls, value: dict[str, str]) -> dict[str, str]:
        for name, target in value.items():
            if name in BUILTIN_METRICS:
                raise ValueError(f"user_metrics.{name}: the name of a built-in metric")
            if not _CALLABLE.match(target):
                raise ValueError(f"user_metrics.{name}: {target!r} is not `module:function`")
        return value

    @model_validator(mode="after")
    def _combos(self) -> "EvaluateConfig":
        known = set(self.metrics) | set(self.user_metrics)
        if self.primary_metric not in known:
            raise ValueError(f"primary_metric {self.primary_metric!r} is not computed: add it to metrics or user_metrics (have {sorted(known)})")
        if self.tasks is not None and not self.tasks:
            raise ValueError("tasks is empty: omit it to evaluate every task the candidate was trained on")
        overlap = sorted(set(self.regression.tasks) & set(self.tasks or []))
        if overlap:
            raise ValueError(f"regression.tasks {overlap} are also evaluated as trained tasks: a forgetting check needs tasks not trained on")
        if self.candidate == self.baseline and self.candidate != "auto":
            raise ValueError(f"candidate and baseline are both {self.candidate!r}: compare two different models")
        if self.regression.lm_eval_tasks and not self.lm_eval.enabled:
            raise ValueError("regression.lm_eval_tasks needs lm_eval.enabled: true")
        return self
