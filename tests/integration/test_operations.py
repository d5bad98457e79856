"""Operations against a real, long-lived Prefect server with its event services and a process worker:
deploy (schedule read back), a data drop triggering a retraining run, queued runs, reuse of the
cache, concurrent runs on one workdir, and webhook notifications with the failure's stage and fix.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from tunepipe.tasks.core.artifacts import ArtifactStore
from tunepipe.tasks.core.net import free_port
from tunepipe.tasks.ops.prefect_server import LocalStack
from tests.conftest import REPO
from tests.unit.test_notify import Receiver

pytestmark = pytest.mark.prefect

POOL = "tunepipe-test"
RECORDS = [
    {"instruction": "Name the largest planet in the solar system.", "output": "Jupiter is the largest planet."},
    {"instruction": "What colour is a clear daytime sky?", "output": "A clear daytime sky looks blue."},
    {"instruction": "How many legs does a spider have?", "output": "A spider has eight legs."},
    {"instruction": "Which gas do plants absorb from the air?", "output": "Plants absorb carbon dioxide."},
    {"instruction": "What is the boiling point of water at sea level?", "output": "Water boils at 100 degrees Celsius."},
]
DROP_A = [{"instruction": "Translate 'thank you' into French.", "output": "Merci."}]
DROP_B = [{"instruction": "What is the capital of Japan?", "output": "Tokyo is the capital of Japan."}]


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def tiny_config(tmp_path: Path, name: str, **sections) -> Path:
    base = write_jsonl(tmp_path / f"{name}-data" / "base.jsonl", RECORDS)
    config = {
        "name": name,
        "workdir": str(tmp_path / f"{name}-work"),
        "data": {"sources": [{"path": str(base), "format": "alpaca", "task": "qa"}], "split": {"validation": 0.0, "test": 0.0}},
        "deployment": {"work_pool": POOL},
        **sections,
    }
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    from prefect.settings import PREFECT_API_URL, temporary_settings

    home = tmp_path_factory.mktemp("prefect-server")
    stack = LocalStack(
        prefect_home=home / "home",
        port=free_port(),
        log_dir=home / "logs",
        env_extra={"PREFECT_UI_ENABLED": "false", "PREFECT_LOGGING_LEVEL": "INFO"},
    )
    try:
        stack.start_server(timeout=120)
        stack.start_worker(POOL, query_seconds=1)
        with temporary_settings(updates={PREFECT_API_URL: stack.url}):
            yield stack
            from prefect.events.worker import EventsWorker
            from prefect.logging.handlers import APILogWorker

            APILogWorker.drain_all(timeout=5)  # this process's run logs and events reach the server before it stops
            EventsWorker.drain_all(timeout=5)
    finally:
        stack.stop()


def cli(*args: str, api_url: str, timeout: float = 180) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO), "PREFECT_API_URL": api_url}
    proc = subprocess.run([sys.executable, "-m", "tunepipe.flows.cli.main", *args], env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"tunepipe {' '.join(args)} exited {proc.returncode}\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}"
    return proc


def deployment_runs(deployment_id) -> list:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterId
    from prefect.client.schemas.sorting import FlowRunSort

    with get_client(sync_client=True) as client:
        return client.read_flow_runs(
            deployment_filter=DeploymentFilter(id=DeploymentFilterId(any_=[deployment_id])), sort=FlowRunSort.START_TIME_ASC
        )


def wait_for_runs(deployment_id, count: int, stack: LocalStack, timeout: float = 150) -> list:
    """Wait until `count` runs of the deployment have finished; fail on any that did not complete."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        runs = [r for r in deployment_runs(deployment_id) if r.state and not r.state.is_scheduled()]
        done = [r for r in runs if r.state.is_final()]
        bad = [r for r in done if not r.state.is_completed()]
        assert not bad, f"run {bad[0].name} ended {bad[0].state.name}: {bad[0].state.message}\n{worker_log(stack)}"
        if len(done) >= count:
            return done
        time.sleep(1)
    raise AssertionError(f"{count} runs did not finish in {timeout}s: {[(r.name, r.state_name) for r in deployment_runs(deployment_id)]}\n{worker_log(stack)}")


def worker_log(stack: LocalStack) -> str:
    path = stack.log_dir / f"worker-{POOL}.log"
    return path.read_text()[-3000:] if path.exists() else ""


def run_summary_of(flow_run_id) -> str:
    """The run-summary markdown of the pipeline sub-run of a retrain run."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey, FlowRunFilter, FlowRunFilterParentFlowRunId

    with get_client(sync_client=True) as client:
        subs = client.read_flow_runs(flow_run_filter=FlowRunFilter(parent_flow_run_id=FlowRunFilterParentFlowRunId(any_=[flow_run_id])))
        assert subs, "the retrain run started no pipeline sub-run"
        from prefect.client.schemas.filters import ArtifactFilterFlowRunId

        arts = client.read_artifacts(
            artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=["run-summary"]), flow_run_id=ArtifactFilterFlowRunId(any_=[subs[0].id]))
        )
    assert arts, "no run-summary artifact"
    return arts[0].data


def test_deploy_drop_trigger_queue_and_reuse(stack, tmp_path):
    from prefect.client.orchestration import get_client

    inbox = tmp_path / "inbox"
    inbox.mkdir()
    config_path = tiny_config(
        tmp_path,
        "drops",
        schedule={"cron": "0 3 * * 1", "timezone": "Europe/Berlin"},
        watch={"inbox": str(inbox), "debounce_s": 0.2, "poll_s": 0.2, "source": {"format": "alpaca", "task": "feedback"}},
    )
    out = cli("deployments", str(config_path), api_url=stack.url).stdout
    assert "tunepipe-retrain/drops" in out

    # The schedule, read back through the API, is the configured one; the trigger is registered.
    with get_client(sync_client=True) as client:
        deployment = client.read_deployment_by_name("tunepipe-retrain/drops")
        automations = client.read_automations_by_name("drops-data-drop")
    (schedule,) = deployment.schedules
    assert schedule.schedule.cron == "0 3 * * 1" and schedule.schedule.timezone == "Europe/Berlin" and schedule.active
    assert deployment.work_pool_name == POOL and deployment.global_concurrency_limit.limit == 1
    assert deployment.concurrency_options.collision_strategy == "ENQUEUE"
    assert automations and automations[0].trigger.expect == {"tunepipe.data.version.created"}

    # A drop: the watcher snapshots it and announces it; the trigger starts a run on that version.
    write_jsonl(inbox / "a.jsonl", DROP_A)
    out = cli("watch", str(inbox), "-c", str(config_path), "--once", api_url=stack.url).stdout
    version_a = out.split("data version ")[1].split(":")[0]
    (run_a,) = wait_for_runs(deployment.id, 1, stack)
    assert run_a.parameters["data_version"] == version_a
    workdir = tmp_path / "drops-work"
    store = ArtifactStore(workdir / "artifacts")
    (data_a,) = store.published("data")
    assert store.verify(data_a.path) == []
    manifest = json.loads((Path(data_a.path) / "manifest.json").read_text())
    assert manifest["metrics"]["read"] == len(RECORDS) + len(DROP_A)
    assert f"| data | `{data_a.key}` | False |" in run_summary_of(run_a.id)

    # The same bytes again (touched, re-uploaded under another name): not a new version.
    from tunepipe.tasks.core.config import load_pipeline_config
    from tunepipe.tasks.ops.watch import Debouncer, Ledger, Watcher, emit_version_event

    config = load_pipeline_config(config_path)
    watcher = Watcher.from_config("drops", config.workdir, str(inbox), config.watch)
    watcher.debounce = Debouncer(0)
    write_jsonl(inbox / "a-again.jsonl", DROP_A)
    assert watcher.poll() is None

    # A re-delivered event for version A and a new drop B, back to back: the deployment's
    # concurrency limit queues them; A's rerun reuses the cached data stage, B's adds B to A.
    emit_version_event("drops", str(workdir), Ledger(workdir).versions()[0])
    write_jsonl(inbox / "b.jsonl", DROP_B)
    version_b = watcher.poll().version
    runs = wait_for_runs(deployment.id, 3, stack)
    by_version = {}
    for run in runs[1:]:
        by_version[run.parameters["data_version"]] = run
    assert set(by_version) == {version_a, version_b}
    assert f"| data | `{data_a.key}` | True |" in run_summary_of(by_version[version_a].id)  # reused, not recomputed
    keys = {ref.key for ref in store.published("data")}
    assert len(keys) == 2 and data_a.key in keys
    data_b = next(ref for ref in store.published("data") if ref.key != data_a.key)
    assert json.loads((Path(data_b.path) / "manifest.json").read_text())["metrics"]["read"] == len(RECORDS) + 2
    assert store.verify(data_a.path) == [] and store.verify(data_b.path) == []
    # Never two at once: the second run started after the first ended.
    ordered = sorted(runs[1:], key=lambda r: r.start_time)
    assert ordered[1].start_time >= ordered[0].end_time


def test_two_concurrent_runs_on_one_workdir(stack, tmp_path):
    """Two pipeline runs at once (threads: the store's flock is per open file, so they contend exactly
    as two processes do), both against the server, both on one fresh workdir."""
    import contextvars
    from concurrent.futures import ThreadPoolExecutor

    from tunepipe.flows.pipeline import pipeline
    from tunepipe.tasks.core.config import load_pipeline_config
    from tunepipe.tasks.core.selection import StageSelection

    config = load_pipeline_config(tiny_config(tmp_path, "concurrent"))
    # Each thread runs in a copy of this context: Prefect's settings (the test server's API URL) live in
    # context variables, which a new thread does not inherit; without the copy each thread started its own
    # ephemeral server (two at once race in Prefect: "Server process did not start"), and leaked it.
    with ThreadPoolExecutor(2) as pool:
        futures = [
            pool.submit(contextvars.copy_context().run, pipeline, config=config, selection=StageSelection(stages=config.stages()))
            for _ in range(2)
        ]
        summaries = [f.result(timeout=180) for f in futures]
    data = [s["stages"]["data"] for s in summaries]
    assert data[0]["key"] == data[1]["key"] and data[0]["path"] == data[1]["path"]
    assert sorted(d["cached"] for d in data) == [False, True]  # one computed, the other waited and reused it
    store = ArtifactStore(tmp_path / "concurrent-work" / "artifacts")
    assert store.verify(data[0]["path"]) == []
    assert [ref.key for ref in store.published("data")] == [data[0]["key"]]
    assert not (store.root / "data" / ".trash").exists()
    assert not any((store.root / "data" / ".staging").iterdir())


def test_notifications_on_completion_gate_and_failure(stack, tmp_path):
    from prefect.client.orchestration import get_client

    from tunepipe.flows.pipeline import pipeline
    from tunepipe.tasks.core.config import load_pipeline_config
    from tunepipe.tasks.core.selection import StageSelection

    with Receiver() as receiver:
        notifications = {"webhook_url": receiver.url, "on": ["failure", "completion", "gate"], "allow_remote": False, "timeout_s": 5}
        ok = load_pipeline_config(tiny_config(tmp_path, "notify-ok", notifications=notifications))
        pipeline(config=ok, selection=StageSelection(stages=ok.stages()))
        rule = {"column": "response", "regex": "(?i)celsius", "mode": "not_match", "name": "no-units"}
        bad_path = tiny_config(tmp_path, "notify-bad", notifications=notifications)
        bad_yaml = yaml.safe_load(bad_path.read_text())
        bad_yaml["data"]["validation"] = {"rules": [rule]}
        bad_path.write_text(yaml.safe_dump(bad_yaml))
        bad = load_pipeline_config(bad_path)
        state = pipeline(config=bad, selection=StageSelection(stages=bad.stages()), return_state=True)

    assert state.is_failed()
    # The run's state message carries the stage's reason: which expectation, how many rows, where.
    with get_client(sync_client=True) as client:
        message = client.read_flow_run(state.state_details.flow_run_id).state.message
    assert "expectation 'rule no-units' failed for 1 row(s)" in message and "rejected.jsonl" in message

    (completion,) = receiver.events("completion")
    assert completion["pipeline"] == "notify-ok" and completion["stages"]["data"]["cached"] is False
    (gate,) = receiver.events("gate")
    assert gate["passed"] is True and gate["gates"][0]["details"]["kept"] == len(RECORDS)
    (failure,) = receiver.events("failure")
    assert failure["pipeline"] == "notify-bad" and failure["state"] == "Failed"
    assert failure["failure"]["stage"] == "data"
    assert "expectation 'rule no-units' failed for 1 row(s)" in failure["failure"]["reason"]
    assert "rejected.jsonl" in failure["failure"]["reason"] and failure["failure"]["fix"]


# Dependency-sensitive server services. The scheduler, the trigger evaluator and the concurrency
# endpoints run SQL that a resolver change can break without breaking anything else (SQLAlchemy 2.1
# made prefect 3.8.8's scheduler fail on every pass while deploys and manual runs still worked):
# each is checked by what the server itself does. Deployments go to a pool no worker polls, so
# what the server creates stays there to be read.
IDLE_POOL = "tunepipe-nobody-polls"


def scheduled_runs(deployment_id, count: int, timeout: float = 60) -> list:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        runs = [r for r in deployment_runs(deployment_id) if r.state and r.state.is_scheduled()]
        if len(runs) >= count:
            return sorted(runs, key=lambda r: r.expected_start_time)
        time.sleep(1)
    raise AssertionError(f"the server's scheduler created no {count} runs in {timeout}s (is SQLAlchemy pinned as pyproject says?)")


def test_server_scheduler_creates_cron_and_interval_runs(stack, tmp_path):
    import datetime
    from zoneinfo import ZoneInfo

    from tunepipe.flows.deployments import register_deployments
    from tunepipe.tasks.core.config import load_pipeline_config

    ids = {}
    for name, schedule in {
        "weekly": {"cron": "0 3 * * 1", "timezone": "Europe/Berlin"},
        "daily": {"interval_s": 86400},
    }.items():
        path = tiny_config(tmp_path, name, schedule=schedule, deployment={"work_pool": IDLE_POOL})
        ids.update(register_deployments(path, load_pipeline_config(path), api_url=stack.url))
    cron_runs = scheduled_runs(ids["tunepipe-retrain/weekly"], 3)
    interval_runs = scheduled_runs(ids["tunepipe-retrain/daily"], 3)
    now = datetime.datetime.now(datetime.timezone.utc)
    for run in cron_runs:
        local = run.expected_start_time.astimezone(ZoneInfo("Europe/Berlin"))
        assert (local.weekday(), local.hour, local.minute) == (0, 3, 0) and run.expected_start_time > now
    starts = [r.expected_start_time for r in interval_runs]
    assert all(b - a == datetime.timedelta(days=1) for a, b in zip(starts, starts[1:])) and starts[0] > now
    assert all(r.parameters["pipeline_name"] == "daily" for r in interval_runs)


def test_server_trigger_starts_a_run_on_an_event(stack, tmp_path):
    from tunepipe.flows.deployments import register_deployments
    from tunepipe.tasks.core.config import load_pipeline_config
    from tunepipe.tasks.ops.watch import DataVersion, emit_version_event

    inbox = tmp_path / "trigger-inbox"
    inbox.mkdir()
    path = tiny_config(tmp_path, "triggered", watch={"inbox": str(inbox)}, deployment={"work_pool": IDLE_POOL})
    config = load_pipeline_config(path)
    (deployment_id,) = register_deployments(path, config, api_url=stack.url).values()
    version = DataVersion(version="v-planted", path=str(inbox), seq=1, files=[], created_at="2026-01-01T00:00:00Z")
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        emit_version_event("triggered", config.workdir, version)  # again until the automation is loaded
        runs = deployment_runs(deployment_id)
        if runs:
            break
        time.sleep(3)
    assert runs, "the deployment's trigger started no run for its event"
    assert {r.parameters["data_version"] for r in runs} == {"v-planted"}


def test_server_global_concurrency_limit_holds_slots(stack):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import GlobalConcurrencyLimitCreate
    from prefect.concurrency.sync import concurrency

    with get_client(sync_client=True) as client:
        client.create_global_concurrency_limit(GlobalConcurrencyLimitCreate(name="tunepipe-gpu-test", limit=1))
    with concurrency("tunepipe-gpu-test", occupy=1):
        with get_client(sync_client=True) as client:
            assert client.read_global_concurrency_limit_by_name("tunepipe-gpu-test").active_slots == 1
        with pytest.raises(TimeoutError):
            with concurrency("tunepipe-gpu-test", occupy=1, timeout_seconds=2):
                pass
    with concurrency("tunepipe-gpu-test", occupy=1, timeout_seconds=10):  # released: free again
        pass
