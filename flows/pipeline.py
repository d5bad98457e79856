"""The pipeline flow: wires the stage tasks in order and passes artifact references along."""

from __future__ import annotations

from typing import Any

from prefect import flow

from schemas.pipeline import PipelineConfig
from tasks.environment import load_environment
from tasks.notify import on_completion, on_failure
from tasks.prefect_stage import stage_task
from tasks.reporting import summarize_run
from tasks.run_plan import RunPlan

data_task = stage_task("data")
base_model_task = stage_task("base_model")
pretrain_task = stage_task("pretrain")
sft_task = stage_task("sft")
reward_task = stage_task("reward")
align_task = stage_task("align")
evaluate_task = stage_task("evaluate")
export_task = stage_task("export")
deploy_task = stage_task("deploy")


# The hooks post the `notifications:` webhook (failure: stage, reason, fix; completion and gate verdicts).
@flow(name="tunepipe-pipeline", flow_run_name="{config.name}", on_failure=[on_failure], on_completion=[on_completion])
def pipeline(config: PipelineConfig, plan: RunPlan) -> dict[str, Any]:
    env = load_environment(config.environment)
    common = {"env": env, "workdir": config.workdir}
    refs = {}
    if plan.includes("data"):
        refs["data"] = data_task(config.data, {}, refresh=plan.refresh("data"), **common)
    if plan.includes("base_model"):
        refs["base_model"] = base_model_task(config.base_model, {"data": refs["data"]}, refresh=plan.refresh("base_model"), **common)
    if plan.includes("pretrain"):
        refs["pretrain"] = pretrain_task(config.pretrain, _upstream(refs, "data", "base_model"), refresh=plan.refresh("pretrain"), **common)
    if plan.includes("sft"):
        refs["sft"] = sft_task(config.sft, _upstream(refs, "data", "base_model", "pretrain"), refresh=plan.refresh("sft"), **common)
    if plan.includes("reward"):
        refs["reward"] = reward_task(config.reward, _upstream(refs, "data", "base_model", "pretrain", "sft"), refresh=plan.refresh("reward"), **common)
    if plan.includes("align"):
        refs["align"] = align_task(config.align, _upstream(refs, "data", "base_model", "pretrain", "sft", "reward"), refresh=plan.refresh("align"), **common)
    if plan.includes("evaluate"):
        refs["evaluate"] = evaluate_task(
            config.evaluate, _upstream(refs, "data", "base_model", "pretrain", "sft", "reward", "align"), refresh=plan.refresh("evaluate"), **common
        )
    if plan.includes("export"):
        refs["export"] = export_task(
            config.export, _upstream(refs, "data", "base_model", "pretrain", "sft", "align", "evaluate"), refresh=plan.refresh("export"), **common
        )
    if plan.includes("deploy"):
        refs["deploy"] = deploy_task(config.deploy, _upstream(refs, "export", "evaluate"), refresh=plan.refresh("deploy"), **common)
    return summarize_run(config.workdir, refs)


def _upstream(refs: dict[str, Any], *names: str) -> dict[str, Any]:
    """The named upstream artifacts this run has (optional stages may be absent)."""
    return {name: refs[name] for name in names if name in refs}
