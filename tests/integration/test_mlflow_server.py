"""`tunepipe up --mlflow`: an `mlflow server` beside Prefect on the pipeline's tracking store."""

from __future__ import annotations

import json
import urllib.request

import pytest

from tunepipe.tasks.core.net import free_port

from tunepipe.tasks.ops.prefect_server import LocalStack

pytestmark = pytest.mark.prefect


def test_mlflow_server_serves_the_pipelines_tracking_store(tmp_path):
    from mlflow.tracking import MlflowClient

    store = f"sqlite:///{tmp_path / 'mlflow.db'}"
    experiment = MlflowClient(store).create_experiment("pipe")
    run = MlflowClient(store).create_run(experiment, run_name="pipe/sft").info.run_id
    stack = LocalStack(prefect_home=tmp_path / "home", port=free_port(), log_dir=tmp_path / "logs")
    try:
        url = stack.start_mlflow(store, free_port(), tmp_path / "artifacts", timeout=180)
        request = urllib.request.Request(f"{url}/api/2.0/mlflow/runs/get?run_id={run}")
        with urllib.request.build_opener(urllib.request.ProxyHandler({})).open(request, timeout=10) as response:
            served = json.loads(response.read())
        assert served["run"]["info"]["run_name"] == "pipe/sft"
        assert stack.alive()
    finally:
        stack.stop()
    assert not stack.workers
