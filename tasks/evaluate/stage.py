"""The `evaluate` stage: a candidate against a baseline on the same held-out prompts, and the
verdict of the promotion gate.

Inputs: `data` (required: its test split), `sft` (required), `align` (optional: the default
candidate when present), `reward` (optional: the reward-model judge), `pretrain` / `base_model`
(optional: the base under the adapters when the artifacts' own base path is gone).

Artifact layout:

    report.md, report.html   metrics, per-task breakdown, A/B with intervals, verdict, examples
    task_metrics.png, ab.png
    predictions.jsonl        every prompt: task, reference, both answers, metric values, outcome
    lm_eval_tasks/           the generated lm-eval tasks (run from inside the directory)
    lm_eval_results.json     lm-eval's figures per model
    metrics.json             the stage metrics (also in the manifest)

The verdict is `gate_passed` with one line per rule in `gate_reasons`; deploy promotes only
when it passed.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tunepipe.schemas.environment import EnvironmentProfile
from tunepipe.schemas.evaluate import BUILTIN_METRICS, EvaluateConfig
from tunepipe.schemas.handoffs import AlignKeyedConfig, GateVerdict
from tunepipe.tasks.core.artifacts import read_manifest
from tunepipe.tasks.core.fingerprint import content_digest
from tunepipe.tasks.core.handoff import read_manifest_config, write_handoff
from tunepipe.tasks.core.registry import AdapterRegistry
from tunepipe.tasks.core.stage import Stage, StageContext, StageFailed, StageOutput
from tunepipe.tasks.evaluate.backends import EndpointGenerator, HFGenerator
from tunepipe.tasks.evaluate.gate import AlignmentEvidence, GateEvidence, decide
from tunepipe.tasks.evaluate.lm_eval_tasks import (
    headline,
    lm_eval_task_name,
    run_lm_eval,
    task_manager,
    write_local_tasks,
)
from tunepipe.tasks.evaluate.metrics import aggregate, callable_digest, metric_functions, per_example
from tunepipe.tasks.evaluate.report import write_report
from tunepipe.tasks.evaluate.sources import (
    ModelSource,
    ModelSpec,
    artifact_source,
    base_source,
    resolve_baseline,
    resolve_candidate,
    trained_tasks,
)
from tunepipe.tasks.lm import modeling, retention  # modeling.load_tokenizer is looked up per call: tests replace it
from tunepipe.tasks.lm.encoding import record_messages, resolve_chat_template
from tunepipe.tasks.lm.generation import heldout_examples, prompts_and_references
from tunepipe.tasks.lm.modeling import model_fingerprint
from tunepipe.tasks.lm.scoring import task_scorers
from tunepipe.tasks.training.hardware import hardware
from tunepipe.tasks.training.trainer import write_json

ARTIFACT_FILES = ("report.md", "report.html", "task_metrics.png", "ab.png", "predictions.jsonl", "metrics.json", GateVerdict.FILE)


@dataclass
class TaskRun:
    """One task's prompts and both models' answers and scores."""

    task: str
    messages: list[list[dict[str, str]]]
    prompts: list[str]
    references: list[str]
    candidate: list[str]
    baseline: list[str]
    candidate_values: dict[str, list[float]]
    baseline_values: dict[str, list[float]]
    candidate_spec: ModelSpec
    baseline_spec: ModelSpec


def serving_digests(config: EvaluateConfig) -> dict[str, str]:
    """What the registry serves now, by content: `baseline: serving` is compared against it."""
    return {name: entry.digest for name, entry in AdapterRegistry(str(config.registry)).serving(config.registry_alias).items()}


class EvaluateStage(Stage):
    """Task metrics, lm-eval, forgetting check, A/B with intervals, and the promotion gate."""

    name = "evaluate"
    config_model = EvaluateConfig

    def key_payload(self, config: EvaluateConfig) -> Any:
        payload = config.model_dump(mode="json")
        for field in ("candidate", "baseline"):
            if payload[field] not in ("auto", "align", "sft", "base", "serving"):
                payload[field] = model_fingerprint(payload[field])  # a path enters by content
        if config.baseline == "serving":
            payload["serving"] = serving_digests(config)
        if payload["base_model"]:
            payload["base_model"] = model_fingerprint(payload["base_model"])
        payload["lm_eval"]["include_paths"] = [content_digest(p) for p in config.lm_eval.include_paths]
        payload["user_metrics"] = {name: callable_digest(target) for name, target in config.user_metrics.items()}
        return payload

    def env_payload(self, env: EnvironmentProfile) -> dict[str, Any]:
        # Greedy answers depend on the numerics: device, dtype and attention kernel.
        return {"device": env.device, "dtype": env.dtype, "attn_implementation": env.attn_implementation}

    def run(self, config: EvaluateConfig, ctx: StageContext) -> StageOutput:
        if config.ab.judge == "reward_model" and "reward" not in ctx.inputs:
            raise StageFailed("evaluate: ab.judge is reward_model but the stage has no `reward` input: add the reward stage, or use judge rule or endpoint")
        data_dir = ctx.inputs["data"].path
        candidate = resolve_candidate(config, ctx.inputs)
        baseline = resolve_baseline(config, ctx.inputs, candidate)
        if (candidate.kind, candidate.root, candidate.base_model) == (baseline.kind, baseline.root, baseline.base_model):
            raise StageFailed(f"evaluate: candidate and baseline are the same model ({candidate.name}): set evaluate.candidate or evaluate.baseline")
        trained = trained_tasks(candidate, data_dir)
        tasks = config.tasks or trained
        forgotten = sorted(set(config.regression.tasks) & set(trained))
        if forgotten:
            raise StageFailed(
                f"evaluate: regression.tasks {forgotten} were trained on by the candidate ({candidate.name}: {trained}): "
                "the forgetting check needs tasks it did not see"
            )
        if config.regression.tasks and candidate.kind == "adapters":
            raise StageFailed("evaluate: regression.tasks need one model for all tasks, but the candidate has per-task adapters")
        wanted = list(dict.fromkeys([*tasks, *config.regression.tasks]))
        examples = heldout_examples(data_dir, wanted, config.max_examples_per_task)
        missing = [t for t in wanted if t not in examples]
        if missing:
            raise StageFailed(f"evaluate: tasks {missing} have no records in {data_dir}/test.jsonl: check evaluate.tasks / regression.tasks")
        ctx.logger.info("evaluate: %s against %s on %s (regression: %s)", candidate.name, baseline.name, tasks, config.regression.tasks or "none")

        scorers = task_scorers(config.scoring, data_dir, wanted)
        generator = make_generator(config, ctx.env)
        runs = {
            task: answer_task(task, examples[task], candidate, baseline, config, generator, metric_functions(config.metrics, config.user_metrics, scorers[task]))
            for task in wanted
        }
        for task, run in runs.items():
            ctx.logger.info(
                "evaluate: %s: %s %.3f (candidate) vs %.3f (baseline), n=%d", task, config.primary_metric,
                _mean(run.candidate_values[config.primary_metric]), _mean(run.baseline_values[config.primary_metric]), len(run.prompts),
            )
        task_runs = {t: runs[t] for t in tasks}

        ab, outcomes = pairwise(config, task_runs, ctx)
        lm_eval = run_lm_eval_all(config, task_runs, generator, ctx, scorers) if config.lm_eval.enabled else {"figures": {}, "agreement": {}}
        regression = regression_scores(config, runs, lm_eval["figures"])
        general = general_runs(config, candidate, baseline, generator, ctx)
        regression.update(general_scores(general))

        metrics = stage_metrics(config, candidate, baseline, task_runs, ab, regression, lm_eval, align_tolerance(candidate, ctx.inputs))
        fallback = None
        candidate_stage = stage_of(candidate, ctx.inputs)
        if not metrics["gate_passed"] and candidate_stage == "align" and "sft" in ctx.inputs:
            fallback = sft_against_base(config, ctx, candidate, examples, scorers, generator)
        metrics.update(winner(candidate_stage, metrics, fallback))
        ctx.logger.info("evaluate: ships %s: %s", metrics["winner"] or "nothing", metrics["winner_reason"])
        examples_shown = report_examples(task_runs, outcomes, config.report_examples)
        write_predictions(ctx.staging_dir / "predictions.jsonl", {**runs, **general}, outcomes)
        summary = write_report(ctx.staging_dir, metrics, examples_shown)
        write_json(ctx.staging_dir / "metrics.json", metrics)
        write_handoff(ctx.staging_dir, gate_verdict(metrics, ctx.inputs))
        ctx.logger.info("evaluate: gate %s: %s", "passed" if metrics["gate_passed"] else "FAILED", "; ".join(metrics["gate_reasons"]))
        return StageOutput(metrics=metrics, summary=summary, table=summary_table(metrics))


# --------------------------------------------------------------------------------------------
# Answers and scores


def make_generator(config: EvaluateConfig, env: EnvironmentProfile) -> Any:
    settings = config.generation
    if settings.backend == "endpoint":
        return EndpointGenerator(settings.endpoint, max_new_tokens=settings.max_new_tokens, batch_size=settings.batch_size)
    return HFGenerator(env, max_new_tokens=settings.max_new_tokens, batch_size=settings.batch_size)


def prompt_template(config: EvaluateConfig, tokenizer: Any) -> str:
    return resolve_chat_template("model" if config.chat_template == "candidate" else config.chat_template, tokenizer)


def answer_task(
    task: str, records: list[dict[str, Any]], candidate: ModelSource, baseline: ModelSource, config: EvaluateConfig,
    generator: Any, functions: dict[str, Any],
) -> TaskRun:
    """Render the task's prompts once (the candidate's template), answer them with both models, score both."""
    cand_spec, base_spec = candidate.spec(task), baseline.spec(task)
    tokenizer = modeling.load_tokenizer(cand_spec.tokenizer)
    system_prompt = config.system_prompt or candidate.system_prompt
    prompts, references = prompts_and_references(records, tokenizer, prompt_template(config, tokenizer), system_prompt)
    messages = []
    for record in records:
        conversation = record_messages(record, system_prompt)
        last = max(i for i, m in enumerate(conversation) if m["role"] == "assistant")
        messages.append(conversation[:last])
    if config.generation.backend == "endpoint":
        cand_spec = cand_spec.served(config.generation.endpoint.candidate_model, task)
        base_spec = base_spec.served(config.generation.endpoint.baseline_model, task)
    cand_answers = generator.answers(cand_spec, prompts)
    base_answers = generator.answers(base_spec, prompts)
    return TaskRun(
        task, messages, prompts, references, cand_answers, base_answers,
        per_example(functions, cand_answers, references), per_example(functions, base_answers, references), cand_spec, base_spec,
    )


# --------------------------------------------------------------------------------------------
# A/B


def pairwise(config: EvaluateConfig, runs: dict[str, TaskRun], ctx: StageContext) -> tuple[dict[str, Any], dict[str, list[str]]]:
    """Judge every pair; the win rate and its interval; the sign test and paired bootstrap on primary_metric."""
    from tunepipe.tasks.evaluate import judges, stats  # lazy: pulls in numpy

    settings = config.ab
    pairs = {
        task: [judges.Pair(task, m, ref, c, b) for m, ref, c, b in zip(run.messages, run.references, run.candidate, run.baseline)]
        for task, run in runs.items()
    }
    extra: dict[str, Any] = {}
    outcomes: dict[str, list[str]] = {}
    if settings.judge == "rule":
        for task, run in runs.items():
            outcomes[task] = judges.rule_outcomes(run.candidate_values[config.primary_metric], run.baseline_values[config.primary_metric], settings.tie_margin)
    elif settings.judge == "reward_model":
        flat = [p for task_pairs in pairs.values() for p in task_pairs]
        hw = hardware(ctx.env)
        cand, base = judges.reward_model_scores(ctx.inputs["reward"].path, flat, hw.dtype, hw.device)
        flat_outcomes = judges.rule_outcomes(cand, base, settings.tie_margin)
        extra = {"reward_candidate_mean": round(_mean(cand), 4), "reward_baseline_mean": round(_mean(base), 4)}
        start = 0
        for task, task_pairs in pairs.items():
            outcomes[task] = flat_outcomes[start : start + len(task_pairs)]
            start += len(task_pairs)
    else:
        for task, task_pairs in pairs.items():
            outcomes[task], info = judges.endpoint_outcomes(settings.endpoint, task_pairs)
            for key, value in info.items():
                extra[key] = extra.get(key, 0) + value
    everything = [o for task_outcomes in outcomes.values() for o in task_outcomes]
    options = {"confidence_level": settings.confidence_level, "n_resamples": settings.bootstrap_samples, "method": settings.ci_method, "seed": settings.seed}
    cand_scores = [v for run in runs.values() for v in run.candidate_values[config.primary_metric]]
    base_scores = [v for run in runs.values() for v in run.baseline_values[config.primary_metric]]
    ab = {
        "judge": settings.judge,
        "win_rate": stats.win_rate(everything, ties=settings.ties, confidence_level=settings.confidence_level),
        "per_task": {task: {k: v for k, v in zip(("wins", "ties", "losses"), _counts(o))} for task, o in outcomes.items()},
        "sign_test": stats.sign_test(cand_scores, base_scores, tie_margin=settings.tie_margin),
        "paired_bootstrap": stats.paired_bootstrap(cand_scores, base_scores, **options),
        **extra,
    }
    return ab, outcomes


def _counts(outcomes: list[str]) -> tuple[int, int, int]:
    counts = Counter(outcomes)
    return counts["win"], counts["tie"], counts["loss"]


# --------------------------------------------------------------------------------------------
# lm-eval


def run_lm_eval_all(config: EvaluateConfig, runs: dict[str, TaskRun], generator: Any, ctx: StageContext, scorers: dict[str, Any]) -> dict[str, Any]:
    """The generated task of each evaluated task on its own candidate/baseline spec, and the extra
    and regression lm-eval tasks on the first task's specs. Returns figures and the agreement of
    lm-eval's exact match with the stage's own."""
    settings = config.lm_eval
    rows = {task: list(zip(run.prompts, run.references)) for task, run in runs.items()}
    max_new = config.generation.max_new_tokens
    local_dir = ctx.checkpoint_dir / "lm_eval_tasks"
    names = write_local_tasks(local_dir, rows, max_new, cache_dir=str(ctx.checkpoint_dir / "hf_datasets"), scorers=scorers)
    write_local_tasks(ctx.staging_dir / "lm_eval_tasks", rows, max_new, portable=True, scorers=scorers)
    extra = list(dict.fromkeys([*settings.tasks, *config.regression.lm_eval_tasks]))
    manager = task_manager([str(local_dir), *settings.include_paths], [*names.values(), *extra])
    figures: dict[str, dict[str, dict[str, float]]] = {}
    samples: dict[str, dict[str, Any]] = {}
    for task, run in runs.items():
        jobs = [(names[task], None)] + ([(t, settings.limit) for t in extra] if task == next(iter(runs)) else [])
        for side, spec in (("candidate", run.candidate_spec), ("baseline", run.baseline_spec)):
            for lm_task, limit in jobs:
                with generator.active(spec) as model:
                    if hasattr(generator, "lm_eval_model"):  # a served model: lm-eval's OpenAI-compatible backend
                        model = generator.lm_eval_model(spec, settings.batch_size)
                    out = run_lm_eval(model, generator.tokenizer(spec), [lm_task], manager, batch_size=settings.batch_size, limit=limit)
                for name, values in out["results"].items():
                    figures.setdefault(name, {})[side] = values
                samples.setdefault(side, {}).update(out["samples"])
    agreement = {}
    for task, run in runs.items():
        name = lm_eval_task_name(task)
        stage_em = round(_mean([scorers[task].exact_match(p, r) for p, r in zip(run.candidate, run.references)]), 4)
        lm_em = figures.get(name, {}).get("candidate", {}).get("exact_match,normalised")
        agreement[task] = {"stage_exact_match": stage_em, "lm_eval_exact_match": lm_em}
        if lm_em is None or abs(lm_em - stage_em) > 1e-9:
            ctx.logger.warning("evaluate: %s: lm-eval exact match %s differs from the stage's %s", task, lm_em, stage_em)
    (ctx.staging_dir / "lm_eval_results.json").write_text(json.dumps({"figures": figures, "samples": samples}, indent=1, default=str))
    return {"figures": figures, "agreement": agreement}


# --------------------------------------------------------------------------------------------
# Forgetting, metrics, report pieces


def regression_scores(config: EvaluateConfig, runs: dict[str, TaskRun], lm_figures: dict[str, Any]) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}
    metric = config.primary_metric
    for task in config.regression.tasks:
        run = runs[task]
        out[task] = {
            "candidate": round(_mean(run.candidate_values[metric]), 4), "baseline": round(_mean(run.baseline_values[metric]), 4),
            "source": f"test split ({metric})", "n": len(run.prompts),
        }
    for task in config.regression.lm_eval_tasks:
        by_model = lm_figures.get(task, {})
        cand, base = headline(by_model.get("candidate", {})), headline(by_model.get("baseline", {}))
        if cand is None or base is None:
            raise StageFailed(f"evaluate: lm-eval gave no figure for regression task {task}")
        out[task] = {"candidate": cand[1], "baseline": base[1], "source": f"lm-eval {cand[0]}"}
    return out


def general_runs(config: EvaluateConfig, candidate: ModelSource, baseline: ModelSource, generator: Any, ctx: StageContext) -> dict[str, TaskRun]:
    """The general-knowledge set (tasks/lm/retention.py) answered by both models, once per
    adapter of the candidate (`general_chat:<task>` for per-task adapters), where it applies: a
    pretrained base (`regression.general_set: auto`) or `on`, and a base model that answers at least
    one of its questions (a model with nothing to lose is not checked)."""
    if not retention.applies(config.regression.general_set, candidate.base_model, ctx.inputs):
        return {}
    runs = {}
    for task in (sorted(candidate.paths) if candidate.kind == "adapters" else [None]):
        name = retention.SET_NAME if task is None else f"{retention.SET_NAME}:{task}"
        run = general_run(config, candidate, baseline, generator, task or retention.SET_NAME)
        if run is None:
            ctx.logger.info("evaluate: %s: the base model answers none of its %d questions: nothing to lose, not checked", name, len(retention.general_set()))
            continue
        runs[name] = run
        ctx.logger.info("evaluate: %s: answered %.3f (candidate) vs %.3f (baseline)", name,
                        _mean(runs[name].candidate_values[retention.METRIC]), _mean(runs[name].baseline_values[retention.METRIC]))
    return runs


def general_run(config: EvaluateConfig, candidate: ModelSource, baseline: ModelSource, generator: Any, task: str) -> TaskRun | None:
    """Both models' answers to the general set; None when the base model answers none of it."""
    cand_spec, base_spec = candidate.spec(task), baseline.spec(task)
    if config.generation.backend == "endpoint":
        cand_spec = cand_spec.served(config.generation.endpoint.candidate_model, task)
        base_spec = base_spec.served(config.generation.endpoint.baseline_model, task)
    tokenizer = modeling.load_tokenizer(cand_spec.tokenizer)
    system_prompt = config.system_prompt or candidate.system_prompt
    prompts = retention.prompts(tokenizer, prompt_template(config, tokenizer), system_prompt)
    items = retention.general_set()
    messages = [([{"role": "system", "content": system_prompt}] if system_prompt else []) + [{"role": "user", "content": i["prompt"]}] for i in items]
    # Whether there is anything to lose is the base model's question (the baseline may be SFT, which
    # could have lost it already); through an endpoint only the served baseline can be asked.
    origin = base_spec if baseline.kind == "base" or config.generation.backend == "endpoint" else base_source(candidate).spec(task)
    kept, generator.max_new_tokens = generator.max_new_tokens, config.regression.general_max_new_tokens
    try:
        origin_answers = generator.answers(origin, prompts)
        if not any(retention.scores(origin_answers)):
            return None  # the base knows none of it: nothing to lose (a model initialised from a seed)
        base_answers = origin_answers if origin == base_spec else generator.answers(base_spec, prompts)
        cand_answers = generator.answers(cand_spec, prompts)
    finally:
        generator.max_new_tokens = kept
    references = [" | ".join(i["answers"]) for i in items]
    return TaskRun(
        task, messages, prompts, references, cand_answers, base_answers,
        {retention.METRIC: retention.scores(cand_answers)}, {retention.METRIC: retention.scores(base_answers)}, cand_spec, base_spec,
    )


def general_scores(general: dict[str, TaskRun]) -> dict[str, dict[str, Any]]:
    """Regression entries of the general set: the share of its questions each model answered."""
    out = {}
    for name, run in general.items():
        cand, base = run.candidate_values[retention.METRIC], run.baseline_values[retention.METRIC]
        out[name] = {
            "candidate": round(_mean(cand), 4), "baseline": round(_mean(base), 4),
            "source": f"tunepipe {retention.SET_NAME} set ({retention.METRIC})", "n": len(run.prompts),
            "lost": [item["id"] for item, c, b in zip(retention.general_set(), cand, base) if b > c],
        }
    return out


def stage_of(source: ModelSource, inputs: dict[str, Any]) -> str | None:
    """`align` or `sft` when the source is that input artifact (what export can ship), else None."""
    for name in ("align", "sft"):
        ref = inputs.get(name)
        if ref is not None and source.root is not None and Path(source.root).resolve() == Path(ref.path).resolve():
            return name
    return None


def sft_against_base(
    config: EvaluateConfig, ctx: StageContext, candidate: ModelSource, examples: dict[str, list[dict[str, Any]]],
    scorers: dict[str, Any], generator: Any,
) -> dict[str, Any]:
    """The aligned candidate was held back: do the SFT adapters it started from pass the same gate
    against the base (task metrics, A/B by the same judge, regression tasks and the general set)?
    lm-eval's regression tasks are not rerun for it (a SKIP line says so)."""
    sft = artifact_source("sft", ctx.inputs["sft"], config.base_model, candidate.base_model)
    base = base_source(sft)
    data_dir = ctx.inputs["data"].path
    tasks = config.tasks or trained_tasks(sft, data_dir)
    needed = [t for t in dict.fromkeys([*tasks, *config.regression.tasks]) if t not in examples]
    examples = {**examples, **heldout_examples(data_dir, needed, config.max_examples_per_task)}
    scorers = {**scorers, **task_scorers(config.scoring, data_dir, needed)}
    ctx.logger.info("evaluate: the aligned candidate was held back: sft against the base on %s", tasks)
    runs = {
        task: answer_task(task, examples[task], sft, base, config, generator, metric_functions(config.metrics, config.user_metrics, scorers[task]))
        for task in dict.fromkeys([*tasks, *config.regression.tasks]) if task in examples
    }
    task_runs = {t: runs[t] for t in tasks if t in runs}
    ab, _ = pairwise(config, task_runs, ctx)
    without_lm_eval = config.model_copy(update={"regression": config.regression.model_copy(update={"lm_eval_tasks": []})})
    regression = regression_scores(without_lm_eval, runs, {})
    regression.update(general_scores(general_runs(config, sft, base, generator, ctx)))
    metrics = stage_metrics(config, sft, base, task_runs, ab, regression, {"figures": {}, "agreement": {}}, None)
    reasons = list(metrics["gate_reasons"])
    if config.regression.lm_eval_tasks:
        reasons.append(f"SKIP lm-eval regression tasks {config.regression.lm_eval_tasks}: not rerun for sft against the base")
    keys = ("candidate", "baseline", "tasks", "wins", "ties", "losses", "win_rate", "win_rate_ci_low", "win_rate_ci_high", "regression")
    return {**{k: metrics[k] for k in keys}, "gate_passed": metrics["gate_passed"], "gate_reasons": reasons}


def winner(candidate_stage: str | None, metrics: dict[str, Any], fallback: dict[str, Any] | None) -> dict[str, Any]:
    """What ships, and why: the candidate when it passed; else the SFT adapters when they passed
    against the base (`fallback`); else nothing."""
    against = f"against {metrics['baseline']}"
    if metrics["gate_passed"]:
        if candidate_stage is None:
            return {"winner": None, "winner_reason": f"the candidate {metrics['candidate']} passed {against}, but it is not a "
                    "pipeline artifact (export ships align or sft)", "fallback": None}
        return {"winner": candidate_stage, "winner_reason": f"{candidate_stage} passed the gate {against}", "fallback": None}
    failed = "; ".join(r for r in metrics["gate_reasons"] if r.startswith("FAIL")) or "the gate failed"
    if fallback is None:
        return {"winner": None, "winner_reason": f"{metrics['candidate']} was held back {against} ({failed}): nothing ships", "fallback": None}
    if fallback["gate_passed"]:
        return {"winner": "sft", "fallback": fallback, "winner_reason": (
            f"{metrics['candidate']} was held back {against} ({failed}); the sft adapters passed the same gate against the base: "
            "they ship instead")}
    sft_failed = "; ".join(r for r in fallback["gate_reasons"] if r.startswith("FAIL"))
    return {"winner": None, "fallback": fallback, "winner_reason": (
        f"{metrics['candidate']} was held back {against} ({failed}), and the sft adapters failed against the base ({sft_failed}): nothing ships")}


def gate_verdict(metrics: dict[str, Any], inputs: dict[str, Any]) -> GateVerdict:
    won = metrics["winner"]
    return GateVerdict(
        passed=metrics["gate_passed"], reasons=metrics["gate_reasons"], candidate=metrics["candidate"],
        winner=won, winner_key=inputs[won].key if won else None, winner_reason=metrics["winner_reason"],
        fallback_reasons=(metrics.get("fallback") or {}).get("gate_reasons", []),
    )


def align_tolerance(candidate: ModelSource, inputs: dict[str, Any]) -> AlignmentEvidence | None:
    """What the align stage recorded of the candidate's task metric against SFT, when the candidate
    is the align artifact: its verdict, the drop per run and the tolerance it was held to."""
    if stage_of(candidate, inputs) != "align":
        return None
    manifest = read_manifest(inputs["align"].path)
    aligned_with = read_manifest_config(inputs["align"], AlignKeyedConfig, reader="evaluate")
    task = {run: h["task"] for run, h in (manifest.metrics.get("heldout") or {}).items() if h.get("task")}
    return AlignmentEvidence(
        within=manifest.metrics.get("task_metric_within_tolerance"),
        drops={run: t["task_metric_drop"] for run, t in task.items() if "task_metric_drop" in t},
        metric=next((t.get("task_metric") for t in task.values() if t.get("task_metric")), None),
        tolerance=aligned_with.task_tolerance,
    )


def stage_metrics(
    config: EvaluateConfig, candidate: ModelSource, baseline: ModelSource, runs: dict[str, TaskRun],
    ab: dict[str, Any], regression: dict[str, Any], lm_eval: dict[str, Any], alignment: AlignmentEvidence | None = None,
) -> dict[str, Any]:
    names = [m for m in BUILTIN_METRICS if m in config.metrics] + list(config.user_metrics)
    tasks = {
        task: {
            "n": len(run.prompts),
            "candidate": aggregate(run.candidate_values, run.candidate, run.references),
            "baseline": aggregate(run.baseline_values, run.baseline, run.references),
        }
        for task, run in runs.items()
    }
    primary = config.primary_metric
    test = ab["sign_test"] if config.ab.significance_test == "sign" else ab["paired_bootstrap"]
    evidence = GateEvidence(
        primary_metric=primary,
        win=ab["win_rate"],
        judge=config.ab.judge,
        tasks={t: (s["candidate"][primary], s["baseline"][primary]) for t, s in tasks.items()},
        regression={t: (r["candidate"], r["baseline"]) for t, r in regression.items()},
        p_value=test["p_value"],
        test=config.ab.significance_test,
        confidence_level=config.ab.confidence_level,
        alignment=alignment,
    )
    passed, reasons = decide(config.gate, evidence)
    win = ab["win_rate"]
    return {
        "candidate": candidate.name, "candidate_kind": candidate.kind,
        "baseline": baseline.name, "baseline_kind": baseline.kind,
        "primary_metric": primary, "metric_names": names,
        "tasks": tasks,
        "candidate_metrics": {t: s["candidate"] for t, s in tasks.items()},
        "baseline_metrics": {t: s["baseline"] for t, s in tasks.items()},
        "ab": ab,
        "wins": win["wins"], "ties": win["ties"], "losses": win["losses"],
        "win_rate": win["win_rate"], "win_rate_ci_low": win["ci_low"], "win_rate_ci_high": win["ci_high"],
        "sign_test_p_value": ab["sign_test"]["p_value"], "paired_bootstrap_p_value": ab["paired_bootstrap"]["p_value"],
        "regression": regression,
        "lm_eval": lm_eval["figures"], "lm_eval_agreement": lm_eval["agreement"],
        "gate_passed": passed, "gate_reasons": reasons,
    }


def report_examples(runs: dict[str, TaskRun], outcomes: dict[str, list[str]], per_task: int) -> dict[str, list[dict[str, Any]]]:
    """The first examples of each task, with the last user message as the prompt (readable, unlike the rendering)."""
    shown = {}
    for task, run in runs.items():
        rows = []
        for i in range(min(per_task, len(run.prompts))):
            user = next((m["content"] for m in reversed(run.messages[i]) if m["role"] == "user"), run.prompts[i])
            rows.append({"prompt": user, "reference": run.references[i], "baseline": run.baseline[i], "candidate": run.candidate[i], "outcome": outcomes[task][i]})
        shown[task] = rows
    return shown


def write_predictions(path, runs: dict[str, TaskRun], outcomes: dict[str, list[str]]) -> None:
    """Every prompt's answers and scores; regression tasks have no A/B outcome."""
    with open(path, "w", encoding="utf-8") as handle:
        for task, run in runs.items():
            for i, prompt in enumerate(run.prompts):
                row = {
                    "task": task, "prompt": prompt, "reference": run.references[i],
                    "candidate": run.candidate[i], "baseline": run.baseline[i], "outcome": outcomes[task][i] if task in outcomes else None,
                    "candidate_scores": {k: v[i] for k, v in run.candidate_values.items()},
                    "baseline_scores": {k: v[i] for k, v in run.baseline_values.items()},
                }
                handle.write(json.dumps(row) + "\n")


def summary_table(metrics: dict[str, Any]) -> list[dict[str, Any]]:
    rows = []
    for task, scores in metrics["tasks"].items():
        counts = metrics["ab"]["per_task"].get(task, {})
        rows.append({
            "task": task, "n": scores["n"],
            **{f"candidate_{k}": v for k, v in scores["candidate"].items()},
            **{f"baseline_{k}": v for k, v in scores["baseline"].items()},
            **counts,
        })
    return rows


def _mean(values: list[float]) -> float:
    return sum(values) / len(values) if values else 0.0
