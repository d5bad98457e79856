"""The `sft` stage: instruction fine-tuning on the data artifact's splits.

Inputs: `data` (required); the base model is `sft.model` if set, else the `pretrain` input, else
the `base_model` input. The memory plan runs first and refuses a run that would not fit.

Artifact layout (also described by `outputs.json`):

    adapter/                 shared PEFT adapter (adapter_config.json, adapter_model.safetensors, tokenizer)
    adapters/<task>/         per-task PEFT adapters (adapters: per_task)
    model/                   full weights + tokenizer (full, freeze, bitfit)
    outputs.json             {"kind": adapter|adapters|model, "paths": {...}, "method", "base_model"}
    metrics.json             per-run metrics incl. the loss per step
    loss_curve.png
    metrics.png              (Mixture-of-Experts models) the router load-balancing loss per step

Checkpoints live in the staging dir's `.checkpoints/<run>/` and a rerun after a crash resumes
from the last one; finished per-task adapters are not retrained.
"""

from __future__ import annotations

import json
from typing import Any

from tunepipe.schemas.handoffs import ModelOutputs
from tunepipe.schemas.sft import SFTConfig
from tunepipe.tasks.sft.train import SFTJob
from tunepipe.tasks.core.handoff import write_handoff
from tunepipe.tasks.core.stage import StageContext, StageFailed, StageOutput
from tunepipe.tasks.lm.checks import warned_markdown
from tunepipe.tasks.lm.encoding import read_split
from tunepipe.tasks.lm.retention import applies
from tunepipe.tasks.sft.heldout import heldout_metrics
from tunepipe.tasks.training.launcher import run_training
from tunepipe.tasks.training.memory_plan import check_fit
from tunepipe.tasks.training.plots import plot_loss, plot_series
from tunepipe.tasks.training.stage_base import TrainingStage, resolve_model
from tunepipe.tasks.training.trainer import write_json

ENTRYPOINT = "tunepipe.tasks.sft.train:train_job"


def loss_table(runs: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    rows = []
    for run, m in runs.items():
        rows.append(
            {
                "run": run,
                "steps": m.get("global_step"),
                "train_loss": m.get("train_loss"),
                "eval_loss": m.get("eval_loss", _mean_eval(m)),
                "examples": m.get("train_examples"),
                "truncated": m.get("truncated"),
                "trainable_params": m.get("trainable_parameters"),
                "trainable_%": m.get("trainable_percent"),
                "tokens/s": m.get("tokens_per_second"),
                "peak_memory_gb": m.get("peak_memory_gb"),
            }
        )
    return rows


def heldout_markdown(heldout: dict[str, dict[str, Any]]) -> str:
    if not heldout:
        return ""
    rows = ["", "", "| task | exact match | base | token F1 | base | n |", "|---|---|---|---|---|---|"]
    for task, s in heldout.items():
        rows.append(f"| {task} | {s['exact_match']:.3f} | {s['base_exact_match']:.3f} | {s['token_f1']:.3f} | {s['base_token_f1']:.3f} | {s['n']} |")
    return "\n".join(rows)


def _mean_eval(m: dict[str, Any]) -> float | None:
    values = [v for k, v in m.items() if k.startswith("eval_") and k.endswith("_loss")]
    return round(sum(values) / len(values), 6) if values else None


class SFTStage(TrainingStage):
    """Instruction SFT with any method of `sft.method`; shared or per-task adapters."""

    name = "sft"
    config_model = SFTConfig
    resumable = True

    def run(self, config: SFTConfig, ctx: StageContext) -> StageOutput:
        data_dir = ctx.inputs["data"].path
        model_path = resolve_model(config.model, ctx.inputs, "sft", ("pretrain", "base_model"))
        plan = check_fit(model_path, config.method, ctx.env, config.max_length, config.training, config.packing)
        ctx.logger.info(
            "sft: %s, %d of %d parameters trainable (%.3f%%), ~%.2f GiB per device",
            config.method.name, plan["trainable_params"], plan["total_params"], plan["trainable_percent"],
            plan["memory"]["total_gb"],
        )

        present = sorted({str(r.get("task") or "default") for r in read_split(data_dir, "train")})
        tasks = config.tasks or present
        missing = sorted(set(tasks) - set(present))
        if missing:
            raise StageFailed(f"sft: tasks {missing} have no records in {data_dir}/train.jsonl (present: {present})")

        if config.adapters == "per_task":
            runs = {task: {"tasks": [task], "save_to": f"adapters/{task}"} for task in tasks}
            kind = "adapters"
        else:
            runs = {"all": {"tasks": config.tasks, "save_to": "adapter" if config.method.is_peft else "model"}}
            kind = "adapter" if config.method.is_peft else "model"

        metrics_by_run: dict[str, dict[str, Any]] = {}
        for run, spec in runs.items():
            done_file = ctx.checkpoint_dir / f"{run}.metrics.json"
            if done_file.exists() and (ctx.staging_dir / spec["save_to"]).exists():
                ctx.logger.info("sft: %s already trained in an earlier attempt", run)
                metrics_by_run[run] = json.loads(done_file.read_text())
                continue
            job = SFTJob(
                config=config, env=ctx.env, model_path=model_path, data_dir=data_dir, tasks=spec["tasks"],
                output_dir=str(ctx.staging_dir), save_to=spec["save_to"], checkpoint_dir=str(ctx.checkpoint_dir / run),
            )
            ctx.logger.info("sft: training %s → %s", run, spec["save_to"])
            metrics = run_training(ENTRYPOINT, job, ctx.env, ctx.logger, ctx.checkpoint_dir / f"{run}.launch")
            ctx.checkpoint_dir.mkdir(parents=True, exist_ok=True)
            write_json(done_file, metrics)
            metrics_by_run[run] = metrics

        history = [
            {**point, "series": run} for run, m in metrics_by_run.items() for point in m.get("loss_history", [])
        ]
        plot_loss(history, ctx.staging_dir / "loss_curve.png", f"sft ({config.method.name})")
        step_metrics = {run: m.get("step_metrics", {}) for run, m in metrics_by_run.items()}
        if any(step_metrics.values()):  # a MoE model's router load-balancing loss
            plot_series(
                {f"{name} ({run})" if len(runs) > 1 else name: points for run, series in step_metrics.items() for name, points in series.items()},
                ctx.staging_dir / "metrics.png", f"sft ({config.method.name}): per step",
            )
        outputs = ModelOutputs(
            kind=kind, method=config.method.name, base_model=model_path, paths={run: spec["save_to"] for run, spec in runs.items()}
        )
        write_handoff(ctx.staging_dir, outputs)
        write_json(ctx.staging_dir / "metrics.json", metrics_by_run)
        heldout, kept = {}, {}
        if config.heldout.max_examples_per_task:
            general = applies(config.heldout.general_set, model_path, ctx.inputs)
            heldout, kept = heldout_metrics(config, outputs, ctx.staging_dir, model_path, data_dir, ctx.env, tasks, general)
            for run, r in kept.items():
                ctx.logger.info("sft: %s general-set retention %.3f (base) -> %.3f (trained), n=%d", run, r["base"], r["trained"], r["n"])
            for task, scores in heldout.items():
                ctx.logger.info(
                    "sft: held-out %s exact match %.3f (base %.3f), token F1 %.3f (base %.3f), n=%d",
                    task, scores["exact_match"], scores["base_exact_match"], scores["token_f1"], scores["base_token_f1"], scores["n"],
                )

        first = next(iter(metrics_by_run.values()))
        metrics = {
            "method": config.method.name,
            "adapters": config.adapters,
            "kind": kind,
            "runs": list(runs),
            "trainable_parameters": first["trainable_parameters"],
            "total_parameters": first["total_parameters"],
            "trainable_percent": first["trainable_percent"],
            "global_step": {run: m["global_step"] for run, m in metrics_by_run.items()},
            # The checkpoint step a run resumed from (None: trained from the start), and each rank's parameter and
            # optimizer bytes (a multi-process profile: 1/world of them per rank under ZeRO-3 or FSDP).
            "world_size": {run: m.get("world_size", 1) for run, m in metrics_by_run.items()},
            "resumed_from": {run: m.get("resumed_from") for run, m in metrics_by_run.items()},
            "per_rank_state": {run: m.get("per_rank_state") for run, m in metrics_by_run.items()},
            "train_loss": {run: m["train_loss"] for run, m in metrics_by_run.items()},
            "eval_loss": {run: _mean_eval(m) for run, m in metrics_by_run.items()},
            "truncated": sum(m["truncated"] for m in metrics_by_run.values()),
            "train_examples": sum(m["train_examples"] for m in metrics_by_run.values()),
            "tokens_per_second": {run: m["tokens_per_second"] for run, m in metrics_by_run.items()},
            "peak_memory_gb": max(m["peak_memory_gb"] for m in metrics_by_run.values()),
            "planned_memory_gb": plan["memory"]["total_gb"],
            "loss_history": {run: m["loss_history"] for run, m in metrics_by_run.items()},
            "step_metrics": step_metrics,
            "heldout": heldout,
            "retention": kept or None,  # general-set retention per run, base -> trained (pretrained bases)
            "checks": {run: m.get("checks", {}) for run, m in metrics_by_run.items()},
        }
        truncated_note = (
            f" {metrics['truncated']} example(s) were longer than max_length {config.max_length} and were cut."
            if metrics["truncated"] else ""
        )
        summary = (
            f"SFT with **{config.method.name}** ({config.adapters} adapters: {', '.join(runs)}) on "
            f"{metrics['train_examples']} examples; {metrics['trainable_parameters']:,} of "
            f"{metrics['total_parameters']:,} parameters trainable ({metrics['trainable_percent']:.3f}%).{truncated_note}"
        )
        summary += heldout_markdown(heldout)
        summary += "".join(warned_markdown(results, run) for run, results in metrics["checks"].items())
        return StageOutput(metrics=metrics, summary=summary, table=loss_table(metrics_by_run))
