"""Stage routing across work pools with a real Prefect server, two process work pools and two workers.

The pipeline (data → base_model → sft) is deployed with `deployment.stage_environments: {sft:
route-b}`. The first worker runs the deployed run and its data/base_model segment; `sft` is handed
to the second pool, whose worker has its own Prefect home (as a GPU host would), and runs there as
its own flow run, named for what it is. An interrupted earlier run left an sft checkpoint, so the
routed training resumes, and its `tunepipe.train` resume line must reach the Prefect run log.
An `overrides` parameter shrinks the YAML's sft budget for this run, on both pools.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import yaml

from tunepipe.tasks.core.artifacts import ArtifactStore
from tunepipe.tasks.core.net import free_port
from tunepipe.tasks.ops.prefect_server import LocalStack
from tests.helpers.training import SLOW_STEPS, cpu_profile, kill_at_first_checkpoint

pytestmark = pytest.mark.prefect

RECORDS = [{"instruction": f"Say the number {w}.", "output": f"The number is {w}."} for w in
           "one two three four five six seven eight nine ten eleven twelve".split()]
OVERRIDES = {"sft.training.max_steps": 6}  # the YAML's 400 steps would take minutes: the override must reach the routed run


def _write_inputs(tmp_path: Path) -> Path:
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in RECORDS))
    for pool in ("route-a", "route-b"):
        profile = cpu_profile(name=pool, work_pool=pool).model_dump(mode="json")
        (tmp_path / f"{pool}.yaml").write_text(yaml.safe_dump(profile))
    config = {
        "name": "routing",
        "workdir": str(tmp_path / "work"),
        "environment": str(tmp_path / "route-a.yaml"),
        "data": {"sources": [{"path": str(data), "format": "alpaca", "task": "numbers"}], "split": {"validation": 0.0, "test": 0.0}},
        "base_model": {"tokenizer": {"vocab_size": 300, "min_frequency": 1},
                       "architecture": {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
                                        "num_attention_heads": 2, "num_key_value_heads": 2, "max_position_embeddings": 128}},
        "sft": {"method": {"name": "lora", "r": 4, "target_modules": ["q_proj", "v_proj"]}, "max_length": 64,
                "training": {"max_steps": 400, "save_steps": 2, "learning_rate": 0.01, "warmup_ratio": 0.0},
                "heldout": {"max_examples_per_task": 0}},
        "deployment": {"stage_environments": {"sft": str(tmp_path / "route-b.yaml")}},
    }
    path = tmp_path / "routing.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def _interrupted_sft(config_path: Path, tmp_path: Path) -> list[int]:
    """An earlier run of data, base_model and sft (on route-b's profile), killed at sft's first checkpoint."""
    script = SLOW_STEPS + textwrap.dedent(f"""
        from tunepipe.tasks.core.config import load_pipeline_config
        from tunepipe.tasks.core.environment import load_environment
        from tunepipe.tasks.core.graph import get_stage
        from tunepipe.tasks.core.prefect_stage import artifact_store
        from tunepipe.tasks.core.stage import run_stage
        config = load_pipeline_config({str(config_path)!r}, overrides={OVERRIDES!r})
        env, store, refs = load_environment({str(tmp_path / "route-b.yaml")!r}), artifact_store(config.workdir), {{}}
        for name in ("data", "base_model", "sft"):
            refs[name] = run_stage(get_stage(name), getattr(config, name), dict(refs), store, env)
    """)
    with open(tmp_path / "interrupted.log", "wb") as log:
        proc = subprocess.Popen([sys.executable, "-c", script], stdout=log, stderr=subprocess.STDOUT)
        return kill_at_first_checkpoint(proc, tmp_path / "work" / "artifacts", "sft", "all", timeout_s=180)


def _client():
    from prefect.client.orchestration import get_client

    return get_client(sync_client=True)


def _wait_final(run_id, timeout: float, stack: LocalStack):
    deadline = time.monotonic() + timeout
    with _client() as client:
        while time.monotonic() < deadline:
            run = client.read_flow_run(run_id)
            if run.state and run.state.is_final():
                return run
            time.sleep(1)
    logs = "\n".join(p.read_text()[-3000:] for p in sorted(stack.log_dir.glob("worker-*.log")))
    raise AssertionError(f"run {run_id} not final within {timeout}s\n{logs}")


def _logs_once_flushed(client, log_filter, parent_id, timeout: float = 30.0) -> list:
    """The runs' logs, read again until the parent's closing hand-off line and the training's resume line
    have arrived (or `timeout` passed: the assertions then say what is missing)."""
    deadline = time.monotonic() + timeout
    while True:
        logs = _all_logs(client, log_filter)
        ended = any(log.flow_run_id == parent_id and "ended " in log.message for log in logs)
        resumed = any(log.name == "tunepipe.train" and "resuming from" in log.message for log in logs)
        if (ended and resumed) or time.monotonic() > deadline:
            return logs
        time.sleep(1)


def _all_logs(client, log_filter, page: int = 200) -> list:
    """Every log line the filter matches, in time order: the API answers at most its default limit (200) per call."""
    logs: list = []
    while True:
        batch = client.read_logs(log_filter=log_filter, limit=page, offset=len(logs))
        logs += batch
        if len(batch) < page:
            return logs


def _subflows(client, parent_ids: list) -> list:
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterParentFlowRunId

    return client.read_flow_runs(flow_run_filter=FlowRunFilter(parent_flow_run_id=FlowRunFilterParentFlowRunId(any_=parent_ids)))


def test_sft_routed_to_a_second_pool(tmp_path):
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId, LogFilter, LogFilterFlowRunId
    from prefect.deployments import run_deployment
    from prefect.settings import PREFECT_API_URL, temporary_settings
    from tunepipe.flows.deployments import register_deployments
    from tunepipe.tasks.core.config import load_pipeline_config

    started = time.perf_counter()
    config_path = _write_inputs(tmp_path)
    kept = _interrupted_sft(config_path, tmp_path)
    assert kept, "the interrupted run left an sft checkpoint"
    interrupted = time.perf_counter() - started

    stack = LocalStack(prefect_home=tmp_path / "home-a", port=free_port(), log_dir=tmp_path / "logs",
                       env_extra={"PREFECT_UI_ENABLED": "false", "PREFECT_LOGGING_LEVEL": "INFO"})
    try:
        stack.start_server(timeout=120)
        stack.start_worker("route-a", query_seconds=1)
        stack.start_worker("route-b", query_seconds=1, prefect_home=tmp_path / "home-b")  # another host's Prefect home
        with temporary_settings(updates={PREFECT_API_URL: stack.url}):
            ids = register_deployments(config_path, load_pipeline_config(config_path), api_url=stack.url)
            assert set(ids) == {"tunepipe-retrain/routing", "tunepipe-retrain/routing--route-b"}
            parent = run_deployment("tunepipe-retrain/routing", parameters={"overrides": OVERRIDES}, timeout=0)
            parent = _wait_final(parent.id, 420, stack)
            worker_logs = {p.stem: p.read_text() for p in stack.log_dir.glob("worker-*.log")}
            assert parent.state.is_completed(), f"{parent.state.name}: {parent.state.message}\n{worker_logs}"
            with _client() as client:
                children = _subflows(client, [parent.id])
                routed = [r for r in children if r.deployment_id == ids["tunepipe-retrain/routing--route-b"]]
                local = [r for r in children if r.deployment_id is None]  # the pipeline sub-run on route-a
                routed_pipeline = _subflows(client, [r.id for r in routed])
                tasks = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[r.id for r in routed_pipeline])))
                # A run's last log lines reach the API in the log handler's next batch, which may come after the
                # run is recorded final (on a loaded machine it did): read until the lines asserted below are there.
                run_ids = [parent.id, *[r.id for r in children], *[r.id for r in routed_pipeline]]
                logs = _logs_once_flushed(client, LogFilter(flow_run_id=LogFilterFlowRunId(any_=run_ids)), parent.id)
    finally:
        stack.stop()
    print(f"interrupted pre-run {interrupted:.1f} s, whole test {time.perf_counter() - started:.1f} s")

    # Parent on the first pool; the routed segment is its own flow run on the second pool, named for what it is.
    assert parent.work_pool_name == "route-a" and parent.name == "routing@all-data"
    (segment,) = routed
    assert segment.work_pool_name == "route-b" and segment.state.is_completed()
    assert segment.name == "routing@all-data → route-b (up to sft)" != parent.name
    assert segment.parameters["overrides"] == OVERRIDES and segment.parameters["routed"] is False
    assert len(local) == 1 and len(routed_pipeline) == 1
    # The parent's log says where sft went and how that run ended.
    parent_log = [log.message for log in logs if log.flow_run_id == parent.id]
    assert any("hand-off: sft run on work pool 'route-b'" in m for m in parent_log), parent_log
    assert any(f"flow run {segment.name!r}" in m and "ended Completed" in m for m in parent_log), parent_log
    # On the second worker (its own Prefect home), the earlier stages are Prefect cache hits.
    states = {t.name.rsplit("-", 1)[0]: t.state.name for t in tasks}
    assert {k: states.get(k) for k in ("data", "base_model", "sft")} == {"data": "Cached", "base_model": "Cached", "sft": "Completed"}, states
    # The training's resume line (logger tunepipe.train, in the routed run's process) is in the run log.
    resumed = [log for log in logs if log.name == "tunepipe.train" and "resuming from" in log.message]
    assert resumed and f"checkpoint-{max(kept)}" in resumed[0].message, sorted({log.name for log in logs})

    # One sft artifact, published on the second pool from the resumed checkpoint with the overridden budget.
    store = ArtifactStore(tmp_path / "work" / "artifacts")
    (sft,) = store.published("sft")
    assert store.verify(sft.path) == []
    run = json.loads((Path(sft.path) / "metrics.json").read_text())["all"]
    assert run["resumed_from"] == max(kept) and run["global_step"] == 6
