"""torchrun across two "nodes" on localhost: the stage's launcher and a `tunepipe join` launcher
(one process each, `nnodes 2`) meet at a c10d rendezvous and form one gloo job of world size 2.

The stage posts its job on the profile's job board; the joiner (a separate `tunepipe join`
process, as a cluster scheduler would start on the second node) runs its torchrun for it. The
data is split between the two ranks (half the optimizer steps of one process), rank 0 writes the
adapter, the stage publishes once, and the key equals that of one node with two processes.
"""

from __future__ import annotations

import json
import logging
import math
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from tunepipe.schemas.sft import SFTConfig
from tunepipe.tasks.core.artifacts import ArtifactStore
from tunepipe.tasks.core.environment import load_environment
from tunepipe.tasks.core.stage import identify, run_stage
from tunepipe.tasks.sft.stage import SFTStage
from tunepipe.tasks.training.launcher import launch_command
from tests.helpers.training import build_tiny_model, collecting_logger, cpu_profile, records, write_data_artifact

pytestmark = pytest.mark.distributed


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _profile(tmp_path: Path) -> Path:
    profile = cpu_profile(launcher="torchrun", num_processes=1, per_device_batch_size=2).model_dump(mode="json")
    profile.update(name="two-nodes-localhost", multi_node={
        "nodes": 2, "rdzv_endpoint": f"127.0.0.1:{_free_port()}", "job_board": str(tmp_path / "board"),
    })
    path = tmp_path / "two-nodes.yaml"
    path.write_text(yaml.safe_dump(profile))
    return path


def test_multi_node_arguments_replace_standalone(tmp_path):
    env = load_environment("multi-node-torchrun")
    cmd = launch_command(env, tmp_path / "job.json", rdzv_id="r1")
    assert "--standalone" not in cmd
    args = dict(zip(cmd[3:13:2], cmd[4:14:2]))
    assert args == {"--nnodes": "2", "--rdzv-backend": "c10d", "--rdzv-endpoint": "node-0.cluster.local:29400", "--rdzv-id": "r1",
                    "--rdzv-conf": "join_timeout=600"}
    assert cmd[cmd.index("--nproc_per_node") + 1] == "8" and env.world_size == 16
    static = env.model_copy(update={"multi_node": env.multi_node.model_copy(update={"rdzv_backend": "static", "node_rank": 1})})
    cmd = launch_command(static, tmp_path / "job.json", rdzv_id="r1")
    assert cmd[cmd.index("--node-rank") + 1] == "1" and cmd[cmd.index("--rdzv-backend") + 1] == "static"


def test_two_launchers_on_localhost_form_one_job(tmp_path):
    profile_path = _profile(tmp_path)
    env = load_environment(str(profile_path))
    model, data = build_tiny_model(tmp_path / "model"), write_data_artifact(tmp_path / "data")
    config = SFTConfig.model_validate({
        "model": str(model), "method": {"name": "lora", "r": 4, "target_modules": ["q_proj", "v_proj"]}, "max_length": 64,
        "heldout": {"max_examples_per_task": 0}, "training": {"epochs": 1, "warmup_ratio": 0.0, "learning_rate": 0.01},
    })
    store = ArtifactStore(tmp_path / "artifacts")
    logger, lines = collecting_logger("tunepipe.test-multinode")

    started = time.perf_counter()
    joiner = subprocess.Popen(
        [sys.executable, "-m", "tunepipe.flows.cli.main", "join", "--env", str(profile_path), "--max-jobs", "1", "--idle-timeout", "300"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    try:
        ref = run_stage(SFTStage(), config, {"data": data}, store, env, logger=logger)
        joined_output, _ = joiner.communicate(timeout=120)
    finally:
        if joiner.poll() is None:
            joiner.kill()
    print(f"two-node job: {time.perf_counter() - started:.1f} s")
    assert joiner.returncode == 0 and "joined 1 training job(s)" in joined_output, joined_output[-3000:]
    assert "exited with code" not in joined_output

    # One job of world size 2: each rank took half the data (one process would take twice the steps).
    rows = len(records("train"))
    manifest = json.loads((Path(ref.path) / "manifest.json").read_text())
    assert manifest["metrics"]["global_step"] == {"all": math.ceil(rows / (2 * 2))} != {"all": math.ceil(rows / 2)}
    # Published once, by the stage; rank 0 wrote the adapter; the post is gone from the board.
    assert [r.key for r in store.published("sft")] == [ref.key] and store.verify(ref.path) == []
    assert (Path(ref.path) / "adapter" / "adapter_config.json").exists()
    assert list((tmp_path / "board").glob("*.json")) == []
    # The same job as one node with two processes: same key.
    one_node = cpu_profile(launcher="torchrun", num_processes=2, per_device_batch_size=2)
    assert ref.key == identify(SFTStage(), config, {"data": data}, one_node).key
    log = "\n".join(lines)
    assert "multi-node: job posted on" in log and "--nnodes 2" in log and "--standalone" not in log


def test_a_node_that_never_joins_fails_the_launch_at_the_join_timeout(tmp_path):
    from tunepipe.tasks.core.stage import StageFailed
    from tunepipe.tasks.training.launcher import run_training

    env = load_environment(str(_profile(tmp_path)))
    env = env.model_copy(update={"multi_node": env.multi_node.model_copy(update={"join_timeout_s": 3})})
    logger = logging.getLogger("tunepipe.test-multinode-timeout")
    started = time.perf_counter()
    with pytest.raises(StageFailed) as failure:
        run_training("tunepipe.tasks.training.launcher:main", {}, env, logger, tmp_path / "launch")
    assert "RendezvousTimeoutError" in str(failure.value), str(failure.value)[-2000:]
    assert time.perf_counter() - started < 120 and list((tmp_path / "board").glob("*.json")) == []
