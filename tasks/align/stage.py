"""The `align` stage: the SFT policy optimised on preferences (DPO, KTO, ORPO) or against
rewards (PPO with a reward model; GRPO and RLOO with rule-based and/or reward-model rewards).

Inputs: `data` (required: preferences.jsonl for the pairwise methods, the train split's prompts
and reference answers for the online ones, the test split for the held-out checks), `sft`
(required: the policy starts from it; per-task SFT adapters are aligned per task), `reward`
(required by ppo, by `reward_model` rewards and scorers; optional otherwise, then it also gives
the win rate).

Artifact layout, the same as sft's so evaluate/export treat both alike:

    adapter/ | adapters/<task>/   the SFT adapter trained further (loads on the SFT adapter's base)
    outputs.json                  {"kind": adapter|adapters, "paths", "method", "base_model", "sft_method"}
    metrics.json                  per-run training metrics, step metrics and the held-out checks
    preferences.on_policy.jsonl   (preferences.source on_policy) the generated pairs
    loss_curve.png, metrics.png

Checkpoints live in the staging dir's `.checkpoints/<run>/`; a rerun after a crash resumes from
the last one and does not retrain finished per-task runs.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal

from tunepipe.schemas.align import AlignConfig
from tunepipe.schemas.environment import EnvironmentProfile
from tunepipe.schemas.handoffs import ModelOutputs, SFTKeyedConfig
from tunepipe.tasks.align.evaluation import general_retention, preference_metrics, task_and_reward_metrics, verdict
from tunepipe.tasks.align.job import AlignJob
from tunepipe.tasks.align.policy import PolicyPair
from tunepipe.tasks.core.handoff import read_handoff, read_manifest_config, write_handoff
from tunepipe.tasks.core.jsonl import read_jsonl
from tunepipe.tasks.core.stage import Stage, StageContext, StageFailed, StageOutput
from tunepipe.tasks.lm.judge import CachedJudge
from tunepipe.tasks.lm.modeling import load_tokenizer
from tunepipe.tasks.lm.pairs import prompt_records, read_pairs, split_pairs
from tunepipe.tasks.lm.retention import applies
from tunepipe.tasks.lm.reward_model import load_reward_model
from tunepipe.tasks.lm.scoring import task_scorers
from tunepipe.tasks.training.hardware import hardware
from tunepipe.tasks.training.launcher import run_training
from tunepipe.tasks.training.memory_plan import check_fit
from tunepipe.tasks.training.plots import plot_loss, plot_series, summarize_series
from tunepipe.tasks.training.stage_base import training_env_payload
from tunepipe.tasks.training.trainer import write_json

ENTRYPOINT = "tunepipe.tasks.align.train:align_job"
ON_POLICY_FILE = "preferences.on_policy.jsonl"
JUDGE_CACHE = "judge_cache.jsonl"  # RLAIF judgments by sha256 of the request (tasks/lm/judge.py)
# Held-out share for pairs without a `split` (the data stage gives every pair one): by prompt hash.
HELDOUT_FRACTION = 0.1


def runs_to_align(sft_dir: Path, outputs: ModelOutputs, tasks: list[str] | None) -> dict[str, dict[str, Any]]:
    """{run: {tasks, sft_dir, save_to}}: one run for a shared adapter or full model, one per task otherwise."""
    if outputs.kind == "adapters":
        chosen = [t for t in outputs.paths if tasks is None or t in tasks]
        if not chosen:
            raise StageFailed(f"align: align.tasks {tasks} names none of the sft adapters' tasks {sorted(outputs.paths)}")
        return {t: {"tasks": [t], "sft_dir": str(sft_dir / outputs.paths[t]), "save_to": f"adapters/{t}"} for t in chosen}
    (only,) = outputs.paths.values()
    return {"all": {"tasks": tasks, "sft_dir": str(sft_dir / only), "save_to": "adapter"}}


def heldout_prompts(data_dir: str, tasks: list[str] | None, per_task: int) -> list[dict[str, Any]]:
    """Up to `per_task` test-split prompts (with reference answers) of each task."""
    counts: dict[str, int] = {}
    out = []
    for record in prompt_records(data_dir, "test", tasks):
        if counts.get(record["task"], 0) < per_task:
            counts[record["task"]] = counts.get(record["task"], 0) + 1
            out.append(record)
    return out


def check_memory(config: AlignConfig, ctx: StageContext, base_model: str, sft_config: SFTKeyedConfig) -> dict[str, Any] | None:
    """The memory plan of a pairwise method (the SFT policy's method trained further on chosen + rejected rows,
    with its reference), or StageFailed saying what to change when it does not fit the profile; read from the
    configs alone, before any weights load. Online methods (ppo, grpo, rloo) hold generation state the planner
    does not model: they are not planned (None)."""
    if not config.trains_on_pairs():
        ctx.logger.info("align: %s is not memory-planned (the planner models sft, reward and pairwise methods)", config.method.name)
        return None
    method = sft_config.method
    plan = check_fit(base_model, method, ctx.env, config.max_length, config.training, stage="dpo")
    ctx.logger.info("align: %s continuing the %s policy, ~%.2f GiB per device", config.method.name, method.name,
                    plan["memory"]["total_gb"])
    return plan


def asks_general_set(setting: Literal["auto", "on", "off"], sft_outputs: ModelOutputs, sft_config: SFTKeyedConfig, inputs: dict[str, Any]) -> bool:
    """Whether the general-knowledge set is asked of SFT and aligned (tasks/lm/retention.py `applies`), judged
    on what the SFT policy was trained from: its adapters' base; a full fine-tune's configured `sft.model` (the
    manifest knows it by fingerprint only: a model the user brought, pretrained, never one the pipeline
    initialised); else the pretrain or base_model input it started from."""
    if sft_outputs.base_model is None and sft_config.base_model_fingerprint is not None:
        return setting != "off"
    origin = sft_outputs.base_model or next((inputs[n].path for n in ("pretrain", "base_model") if n in inputs), "")
    return applies(setting, origin, inputs)


class AlignStage(Stage):
    """Preference optimisation / RL of the SFT policy; one adapter per SFT adapter."""

    name = "align"
    config_model = AlignConfig
    resumable = True

    def env_payload(self, env: EnvironmentProfile) -> dict[str, Any]:
        return training_env_payload(env)

    def run(self, config: AlignConfig, ctx: StageContext) -> StageOutput:
        method = config.method
        if config.needs_reward_model() and "reward" not in ctx.inputs:
            raise StageFailed(
                f"align: method {method.name} (with its rewards/scorer settings) needs a reward model: add a `reward:` "
                "section to the pipeline, or use rule-based rewards (grpo/rloo `rewards`, preferences.scorer: rule)"
            )
        data_dir = ctx.inputs["data"].path
        sft_ref = ctx.inputs["sft"]
        sft_outputs = read_handoff(sft_ref, ModelOutputs, reader="align")
        sft_config = read_manifest_config(sft_ref, SFTKeyedConfig, reader="align")
        reward_dir = ctx.inputs["reward"].path if "reward" in ctx.inputs else None
        runs = runs_to_align(Path(sft_ref.path), sft_outputs, config.tasks)
        base_model = sft_outputs.base_model if sft_outputs.kind != "model" else runs["all"]["sft_dir"]
        check_memory(config, ctx, base_model, sft_config)
        has_pairs = (Path(data_dir) / "preferences.jsonl").is_file()

        metrics_by_run: dict[str, dict[str, Any]] = {}
        heldout_pairs: dict[str, list[dict[str, Any]]] = {}
        dataset_pairs: dict[str, list[dict[str, Any]]] = {}  # held-out first: the judge's agreement check
        for run, spec in runs.items():
            trains_on_pairs = config.trains_on_pairs() and config.preferences.source == "dataset"
            pairs: list[dict[str, Any]] = []
            if trains_on_pairs:  # required: fail naming the file and the tasks present
                pairs = read_pairs(data_dir, f"align ({run})", spec["tasks"])
            elif has_pairs:  # only for the held-out preference accuracy
                pairs = [p for p in read_jsonl(Path(data_dir) / "preferences.jsonl") if spec["tasks"] is None or p.get("task") in spec["tasks"]]
            train_pairs, heldout_pairs[run] = split_pairs(pairs, HELDOUT_FRACTION)
            dataset_pairs[run] = heldout_pairs[run] + train_pairs
            prompts = prompt_records(data_dir, "train", spec["tasks"], config.max_prompts)
            if config.samples_prompts() and not prompts:
                raise StageFailed(f"align ({run}): no train prompts of tasks {spec['tasks'] or 'all'} in {data_dir}/train.jsonl")
            if trains_on_pairs and not train_pairs:
                raise StageFailed(f"align ({run}): every preference pair in {data_dir} is held out: none left to train on")
            done_file = ctx.checkpoint_dir / f"{run}.metrics.json"
            if done_file.exists() and (ctx.staging_dir / spec["save_to"]).exists():
                ctx.logger.info("align: %s already trained in an earlier attempt", run)
                metrics_by_run[run] = json.loads(done_file.read_text())
                continue
            job = AlignJob(
                config=config, env=ctx.env, run=run, sft_dir=spec["sft_dir"], sft_kind=sft_outputs.kind,
                sft_method=sft_config.method, base_model=base_model, reward_dir=reward_dir, train_pairs=train_pairs, prompts=prompts,
                pairs_file=str(ctx.staging_dir / (ON_POLICY_FILE if run == "all" else f"preferences.on_policy.{run}.jsonl")),
                output_dir=str(ctx.staging_dir), save_to=spec["save_to"], checkpoint_dir=str(ctx.checkpoint_dir / run),
                judge_cache=str(ctx.checkpoint_dir / JUDGE_CACHE),
            )
            ctx.logger.info("align: %s on %s → %s", method.name, run, spec["save_to"])
            metrics = run_training(ENTRYPOINT, job, ctx.env, ctx.logger, ctx.checkpoint_dir / f"{run}.launch")
            ctx.checkpoint_dir.mkdir(parents=True, exist_ok=True)
            write_json(done_file, metrics)
            metrics_by_run[run] = metrics

        for run, m in metrics_by_run.items():
            for name, check in m.get("checks", {}).items():
                if "warned" in check:
                    ctx.logger.warning("align: self-check %s failed (configured to warn): %s", name, check["warned"])
        outputs = ModelOutputs(
            kind="adapters" if sft_outputs.kind == "adapters" else "adapter",
            method=method.name,
            base_model=base_model,
            sft_method=sft_outputs.method,
            paths={run: spec["save_to"] for run, spec in runs.items()},
        )
        write_handoff(ctx.staging_dir, outputs)
        heldout = self._heldout(config, ctx, runs, outputs, sft_outputs, sft_config, heldout_pairs, data_dir, reward_dir)
        judge = self._judge_agreement(config, ctx, metrics_by_run, dataset_pairs)
        write_json(ctx.staging_dir / "metrics.json", {"runs": metrics_by_run, "heldout": heldout, "judge": judge})
        self._plots(config, ctx, metrics_by_run, plot_loss, plot_series)
        output = self._output(config, runs, outputs, metrics_by_run, heldout)
        if judge is not None:
            output.metrics["judge"] = judge
            if judge.get("agreement"):
                a = judge["agreement"]
                output.summary += (
                    f"\n\nAI judge `{config.judge.model}`: agrees with {a['agree']} of {a['pairs']} dataset preferences "
                    f"({a['disagree']} disagree, {a['tie']} ties incl. order flips); {judge['calls']} calls, {judge['cache_hits']} cached."
                )
        return output

    def _judge_agreement(self, config, ctx, metrics_by_run, dataset_pairs) -> dict[str, Any] | None:
        """The AI judge's use during training, and its agreement with the dataset's preferences."""
        if config.judge is None:
            return None
        used = {run: m["judge"] for run, m in metrics_by_run.items() if "judge" in m}
        calls = sum(u["calls"] for u in used.values())
        out: dict[str, Any] = {"runs": used, "calls": calls, "cache_hits": sum(u["cache_hits"] for u in used.values())}
        pairs = [p for run_pairs in dataset_pairs.values() for p in run_pairs][: config.judge.agreement_pairs]
        if pairs:
            judge = CachedJudge(config.judge, ctx.checkpoint_dir / JUDGE_CACHE, who="align (judge agreement)")
            out["agreement"] = judge.agreement(pairs)
            out["agreement_counts"] = judge.stats()
            out["calls"] += judge.counts["calls"]
            out["cache_hits"] += judge.counts["cache_hits"]
            ctx.logger.info("align: the AI judge agrees with the dataset on %s", out["agreement"])
        return out

    def _heldout(self, config, ctx, runs, outputs, sft_outputs, sft_config, heldout_pairs, data_dir, reward_dir) -> dict[str, Any]:
        """The aligned-vs-SFT checks of every run (tasks/align/evaluation.py)."""
        settings = config.heldout
        general = asks_general_set(settings.general_set, sft_outputs, sft_config, ctx.inputs)
        reward = load_reward_model(reward_dir, hardware(ctx.env).dtype) if reward_dir else None
        beta = getattr(config.method, "beta", None)
        results: dict[str, Any] = {}
        for run, spec in runs.items():
            aligned_dir = str(ctx.staging_dir / spec["save_to"])
            pair = PolicyPair(outputs.base_model, spec["sft_dir"], aligned_dir, sft_outputs.kind, sft_config.method, ctx.env)
            tokenizer = load_tokenizer(aligned_dir)
            pairs = heldout_pairs.get(run, [])[: settings.max_pairs] if settings.max_pairs else []
            examples = heldout_prompts(data_dir, spec["tasks"], settings.max_examples_per_task) if settings.max_examples_per_task else []
            scorers = task_scorers(config.scoring, data_dir, sorted({e["task"] for e in examples}))
            results[run] = {
                "preferences": preference_metrics(pair, tokenizer, pairs, settings.batch_size, beta),
                "task": task_and_reward_metrics(pair, tokenizer, examples, config, reward, scorers),
            }
            kept = general_retention(pair, tokenizer, settings) if general else None
            if kept:
                results[run]["retention"] = kept
                ctx.logger.info("align: %s general-set retention %.3f (sft) -> %.3f (aligned), n=%d", run, kept["sft"], kept["aligned"], kept["n"])
            ctx.logger.info("align: %s held-out %s", run, {k: v for k, v in results[run]["task"].items() if k != "examples"})
        return results

    def _plots(self, config, ctx, metrics_by_run, plot_loss, plot_series) -> None:
        history = [{**p, "series": run} for run, m in metrics_by_run.items() for p in m.get("loss_history", [])]
        plot_loss(history, ctx.staging_dir / "loss_curve.png", f"align ({config.method.name})")
        series = {
            f"{name} ({run})" if len(metrics_by_run) > 1 else name: points
            for run, m in metrics_by_run.items() for name, points in m.get("step_metrics", {}).items()
        }
        plot_series(series, ctx.staging_dir / "metrics.png", f"align ({config.method.name}): per step")

    def _output(self, config, runs, outputs, metrics_by_run, heldout) -> StageOutput:
        method = config.method
        task = {run: h["task"] for run, h in heldout.items() if h["task"]}
        prefs = {run: h["preferences"] for run, h in heldout.items() if h["preferences"]}
        within = [t["task_metric_within_tolerance"] for t in task.values()]
        metrics: dict[str, Any] = {
            "method": method.name,
            "beta": getattr(method, "beta", None),
            "kind": outputs.kind,
            "runs": list(runs),
            "global_step": {run: m["global_step"] for run, m in metrics_by_run.items()},
            "world_size": {run: m.get("world_size", 1) for run, m in metrics_by_run.items()},  # training processes
            "checks": {run: m.get("checks", {}) for run, m in metrics_by_run.items()},
            "train_loss": {run: m.get("train_loss") for run, m in metrics_by_run.items()},
            "trainable_parameters": next(iter(metrics_by_run.values()))["trainable_parameters"],
            "step_metrics": {run: m["step_metrics"] for run, m in metrics_by_run.items()},
            "step_summary": {run: summarize_series(m["step_metrics"]) for run, m in metrics_by_run.items()},
            "loss_history": {run: m["loss_history"] for run, m in metrics_by_run.items()},
            "peak_memory_gb": max(m["peak_memory_gb"] for m in metrics_by_run.values()),
            "heldout": heldout,
            # general-set retention per run, SFT -> aligned (pretrained bases; align.heldout.general_set)
            "retention": {run: h["retention"] for run, h in heldout.items() if h.get("retention")} or None,
            "task_metric": config.task_metric,
            "task_tolerance": config.task_tolerance,
            "task_metric_within_tolerance": all(within) if within else None,
            "kl_to_sft": {run: t["kl_to_sft"] for run, t in task.items()},
            "win_rate": {run: t["win_rate"] for run, t in task.items() if "win_rate" in t} or None,
            "preference_accuracy": {run: {"sft": p["sft_accuracy"], "aligned": p["aligned_accuracy"]} for run, p in prefs.items()} or None,
            "trainable_parameters_by_model": next(iter(metrics_by_run.values())).get("trainable_parameters_by_model"),
        }
        # Objective (reward) together with the task metric and KL: better than SFT only with both.
        verdicts = {run: verdict(config, task.get(run, {}), prefs.get(run, {})) for run in runs}
        metrics["verdict"] = verdicts
        metrics["better_than_sft"] = all(v["better_than_sft"] for v in verdicts.values())
        warned = {
            f"{run}: {name}": c["warned"] for run, m in metrics_by_run.items() for name, c in m.get("checks", {}).items() if "warned" in c
        }
        on_policy = {run: m["on_policy"] for run, m in metrics_by_run.items() if "on_policy" in m}
        if on_policy:
            metrics["on_policy"] = on_policy
        table = []
        for run in runs:
            t, p = task.get(run, {}), prefs.get(run, {})
            table.append(
                {
                    "run": run, "steps": metrics["global_step"][run],
                    f"sft {config.task_metric}": t.get("sft", {}).get(config.task_metric),
                    f"aligned {config.task_metric}": t.get("aligned", {}).get(config.task_metric),
                    "within tolerance": t.get("task_metric_within_tolerance"),
                    "KL to sft": t.get("kl_to_sft"), "win rate": t.get("win_rate"),
                    "reward sft": t.get("sft_reward_mean"), "reward aligned": t.get("aligned_reward_mean"),
                    "pref acc sft": p.get("sft_accuracy"), "pref acc aligned": p.get("aligned_accuracy"),
                    "better than sft": verdicts[run]["better_than_sft"],
                }
            )
        lines = [
            f"Alignment with **{method.name}**" + (f" (beta {metrics['beta']})" if metrics["beta"] is not None else "")
            + f" of the SFT policy ({outputs.kind}: {', '.join(runs)}).",
            "",
            "| run | sft " + config.task_metric + " | aligned | within tolerance | KL to sft | win rate | pref. acc. sft → aligned |",
            "|---|---|---|---|---|---|---|",
        ]
        for row in table:
            lines.append(
                f"| {row['run']} | {row[f'sft {config.task_metric}']} | {row[f'aligned {config.task_metric}']} | "
                f"{row['within tolerance']} | {row['KL to sft']} | {row['win rate']} | {row['pref acc sft']} → {row['pref acc aligned']} |"
            )
        lines += ["", *(f"- {run}: {v['reason']}" for run, v in verdicts.items())]
        lines += [f"- **warning** (self-check {name}, configured to warn): {why}" for name, why in warned.items()]
        return StageOutput(metrics=metrics, summary="\n".join(lines), table=table)
