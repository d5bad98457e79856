"""SFT inside a Prefect task: live progress reaches the UI as a progress artifact."""

from __future__ import annotations

import asyncio

import pytest
from prefect import flow

from tunepipe.schemas.sft import SFTConfig
from tunepipe.tasks.core.prefect_stage import stage_task
from tests.helpers.training import build_tiny_model, cpu_profile, write_data_artifact

pytestmark = pytest.mark.prefect
sft_task = stage_task("sft")


@flow(name="sft-progress")
def sft_only(config: SFTConfig, data, env, workdir: str):
    return sft_task(config, {"data": data}, env, workdir)


def test_training_progress_artifact_reaches_100(prefect_server, tmp_path):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterType

    model = build_tiny_model(tmp_path / "model")
    data = write_data_artifact(tmp_path / "data")
    config = SFTConfig(model=str(model), method={"name": "lora", "r": 4}, max_length=96,
                       training={"max_steps": 4, "warmup_ratio": 0.0}, heldout={"max_examples_per_task": 2, "max_new_tokens": 4})
    ref = sft_only(config, data, cpu_profile(), str(tmp_path / "work"))
    assert ref.cached is False

    async def progress_artifacts():
        async with get_client() as client:
            return await client.read_artifacts(artifact_filter=ArtifactFilter(type=ArtifactFilterType(any_=["progress"])))

    progress = [a for a in asyncio.run(progress_artifacts()) if "training progress" in (a.description or "")]
    assert progress and max(float(a.data) for a in progress) == 100.0


def test_training_loss_lines_reach_the_run_log_with_tags_and_distinct_labels(prefect_server, tmp_path, capfd):
    """Per-task sft in a Prefect flow: each job's loss reaches the run log (every logging step, at most
    one line a second), the task run carries the `tunepipe` and stage tags, the two jobs' progress
    artifacts tell apart, and the console holds no per-step dicts."""
    import json
    from pathlib import Path

    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId, TaskRunFilter, TaskRunFilterName
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterType

    model = build_tiny_model(tmp_path / "model")
    data = write_data_artifact(tmp_path / "data")
    config = SFTConfig(model=str(model), method={"name": "lora", "r": 4}, max_length=96, adapters="per_task",
                       training={"max_steps": 3, "warmup_ratio": 0.0, "logging_steps": 1})
    state = sft_only(config, data, cpu_profile(), str(tmp_path / "work"), return_state=True)
    ref = state.result()
    history = json.loads((Path(ref.path) / "manifest.json").read_text())["metrics"]["loss_history"]

    with get_client(sync_client=True) as client:
        logs = client.read_logs(log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=[state.state_details.flow_run_id])))
        task_runs = client.read_task_runs(task_run_filter=TaskRunFilter(name=TaskRunFilterName(like_="sft")))
        progress = client.read_artifacts(artifact_filter=ArtifactFilter(type=ArtifactFilterType(any_=["progress"])))
    lines = [log.message for log in logs if log.name == "tunepipe.metrics"]
    for task in ("count", "sentiment"):
        ours = [line for line in lines if line.startswith(f"sft/{task} step ")]
        assert ours, lines
        last = history[task][-1]
        # the last step's line is always there (earlier ones at most one a second), with the recorded loss
        assert ours[-1].startswith(f"sft/{task} step {last['step']}/3: loss {last['loss']:.4f}")
    assert any({"tunepipe", "sft"} <= set(run.tags) for run in task_runs)
    labels = {a.description for a in progress if "sft/" in (a.description or "")}
    assert {"sft/count: training progress (%)", "sft/sentiment: training progress (%)"} <= labels
    console = capfd.readouterr()
    assert "{'loss'" not in console.out + console.err  # the Trainer's per-step dicts are off by default
