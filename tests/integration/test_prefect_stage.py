"""Stage tasks under a real Prefect server: caching on the stage key, artifacts in the UI."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from prefect import flow

from tunepipe.tasks.core.prefect_stage import stage_task
from tunepipe.tasks.core.graph import register_stage
from tests.helpers.toy_stages import ToyConfig

pytestmark = pytest.mark.prefect

register_stage("producer", "tests.helpers.toy_stages", "Producer")
register_stage("consumer", "tests.helpers.toy_stages", "Consumer")
producer_task = stage_task("producer")
consumer_task = stage_task("consumer")


@flow(name="toy-pipeline")
def toy_pipeline(up: ToyConfig, down: ToyConfig, env, workdir: str):
    up_state = producer_task(up, {}, env, workdir, return_state=True)
    up_ref = up_state.result()
    down_state = consumer_task(down, {"producer": up_ref}, env, workdir, return_state=True)
    return {"producer": (up_state.name, up_ref), "consumer": (down_state.name, down_state.result())}


def test_rerun_is_cached_and_downstream_change_reruns_only_downstream(prefect_server, tmp_path, cpu_env):
    workdir = str(tmp_path)
    first = toy_pipeline(ToyConfig(), ToyConfig(), cpu_env, workdir)
    assert [ref.cached for _, ref in first.values()] == [False, False]

    second = toy_pipeline(ToyConfig(), ToyConfig(), cpu_env, workdir)
    assert [ref.cached for _, ref in second.values()] == [True, True]
    third = toy_pipeline(ToyConfig(), ToyConfig(), cpu_env, workdir)
    # By the third run Prefect itself answers from its cache (the UI shows "Cached").
    assert [state for state, _ in third.values()] == ["Cached", "Cached"]
    assert third["consumer"][1].path == first["consumer"][1].path

    changed = toy_pipeline(ToyConfig(), ToyConfig(text="other"), cpu_env, workdir)
    assert changed["producer"][1].cached is True
    assert changed["consumer"][1].cached is False
    assert changed["consumer"][1].key != first["consumer"][1].key


def test_prefect_cache_never_returns_a_deleted_artifact(prefect_server, tmp_path, cpu_env):
    workdir = str(tmp_path)
    for _ in range(3):
        result = toy_pipeline(ToyConfig(repeat=5), ToyConfig(), cpu_env, workdir)
    assert result["producer"][0] == "Cached"
    shutil.rmtree(result["producer"][1].path)
    again = toy_pipeline(ToyConfig(repeat=5), ToyConfig(), cpu_env, workdir)
    state, ref = again["producer"]
    assert state != "Cached" and ref.cached is False
    assert (Path(ref.path) / "out.txt").read_text().count("\n") == 5
    assert again["consumer"][1].cached is True  # same upstream key: downstream still valid


def test_two_workdirs_do_not_share_prefect_records(prefect_server, tmp_path, cpu_env):
    for workdir in (tmp_path / "a", tmp_path / "b"):
        for _ in range(2):
            result = toy_pipeline(ToyConfig(), ToyConfig(), cpu_env, str(workdir))
        assert Path(result["producer"][1].path).is_relative_to(workdir)


def test_stage_publishes_summary_artifacts(prefect_server, tmp_path, cpu_env):
    from prefect.client.orchestration import get_client

    toy_pipeline(ToyConfig(repeat=4), ToyConfig(), cpu_env, str(tmp_path))

    async def latest(key):
        async with get_client() as client:
            return await client.read_latest_artifacts()

    import asyncio

    artifacts = {a.key: a for a in asyncio.run(latest(None))}
    assert "wrote 4 lines" in artifacts["producer-summary"].data
    assert "producer-table" in artifacts
