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
