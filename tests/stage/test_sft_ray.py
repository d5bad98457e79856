"""The `ray` launcher on a real Ray cluster of two worker nodes on this machine.

One cluster per module (Ray's start-up is the slow part): a head that runs no training (Ray
Train's controller only) and two worker nodes, each with one CPU and one `trainer` slot, so the
two training workers land on two nodes (each logs its Ray node id). The sft stage's own job runs on Ray Train workers (gloo);
the driver is killed after the first checkpoint, the stage fails with the launcher's error and
keeps its staging dir, and the rerun resumes from that checkpoint; rank 0 publishes the artifact
under the key the same config has on any other launcher.
"""

from __future__ import annotations

import json
import os
import re
import signal
import threading
import time
from pathlib import Path

import pytest

from tunepipe.schemas.environment import RayProfile
from tunepipe.schemas.sft import SFTConfig
from tunepipe.tasks.core.artifacts import ArtifactStore
from tunepipe.tasks.core.stage import StageFailed, identify, run_stage
from tunepipe.tasks.sft.stage import SFTStage
from tests.helpers.training import build_tiny_model, collecting_logger, complete_checkpoints, cpu_profile, write_data_artifact

ray = pytest.importorskip("ray", reason="Ray is the optional `ray` extra (pip install tunepipe[ray])")

pytestmark = pytest.mark.distributed
OBJECT_STORE = 80 * 2**20  # Ray's minimum is 75 MiB; the job passes nothing through it


@pytest.fixture(scope="module")
def ray_cluster():
    from ray.cluster_utils import Cluster

    started = time.perf_counter()
    cluster = Cluster(initialize_head=True, connect=False, head_node_args={"num_cpus": 1, "object_store_memory": OBJECT_STORE})
    workers = [cluster.add_node(num_cpus=1, resources={"trainer": 1}, object_store_memory=OBJECT_STORE) for _ in range(2)]
    cluster.wait_for_nodes()
    print(f"ray cluster up in {time.perf_counter() - started:.1f} s")
    yield cluster, workers
    cluster.shutdown()


def _driver_pids(marker: str) -> list[int]:
    """Processes running the Ray driver for a job under `marker`."""
    pids = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            cmdline = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
        if "tunepipe.tasks.training.ray_launcher" in cmdline and marker in cmdline:
            pids.append(int(proc.name))
    return pids


def _kill_driver_at_first_checkpoint(root: Path, marker: str, timeout_s: float, killed: list[int]) -> None:
    deadline = time.monotonic() + timeout_s
    while not complete_checkpoints(root, "sft", "all") and time.monotonic() < deadline:
        time.sleep(0.05)
    for pid in _driver_pids(marker):
        os.kill(pid, signal.SIGKILL)
        killed.append(pid)


def test_ray_launcher_trains_publishes_and_resumes(tmp_path, ray_cluster):
    cluster, _ = ray_cluster
    model, data = build_tiny_model(tmp_path / "model"), write_data_artifact(tmp_path / "data")
    config = SFTConfig.model_validate({
        "model": str(model), "method": {"name": "lora", "r": 4, "target_modules": ["q_proj", "v_proj"]}, "max_length": 64,
        "heldout": {"max_examples_per_task": 0},
        "training": {"max_steps": 60, "save_steps": 3, "warmup_ratio": 0.0, "learning_rate": 0.01},
    })
    env = cpu_profile(
        launcher="ray", num_processes=2, per_device_batch_size=2,
        ray=RayProfile(address=cluster.address, resources_per_worker={"CPU": 1, "trainer": 1}),
    )
    store, inputs = ArtifactStore(tmp_path / "artifacts"), {"data": data}

    killed: list[int] = []
    killer = threading.Thread(target=_kill_driver_at_first_checkpoint, args=(tmp_path / "artifacts", str(tmp_path), 120, killed))
    killer.start()
    first = time.perf_counter()
    with pytest.raises(StageFailed) as failure:
        run_stage(SFTStage(), config, inputs, store, env)
    killer.join()
    first = time.perf_counter() - first
    assert killed, "the driver was found and killed after the first checkpoint"
    assert "exited with code -9" in str(failure.value)
    kept = complete_checkpoints(tmp_path / "artifacts", "sft", "all")
    assert kept and max(kept) < 60, "the staging dir kept the checkpoints of the interrupted run"

    second = time.perf_counter()
    logger, lines = collecting_logger("tunepipe.test-ray")
    ref = run_stage(SFTStage(), config, inputs, store, env, logger=logger)
    log = "\n".join(lines)
    second = time.perf_counter() - second
    print(f"interrupted run {first:.1f} s, resumed run {second:.1f} s")

    # The same job: the key is the one a torchrun (or in-process) launch of two processes computes.
    torchrun = cpu_profile(launcher="torchrun", num_processes=2, per_device_batch_size=2)
    assert ref.key == identify(SFTStage(), config, inputs, torchrun).key
    # Rank 0 published once, under the contract: a manifest whose files verify.
    assert [r.key for r in store.published("sft")] == [ref.key] and store.verify(ref.path) == []
    manifest = json.loads((Path(ref.path) / "manifest.json").read_text())
    assert manifest["metrics"]["global_step"] == {"all": 60}
    run = json.loads((Path(ref.path) / "metrics.json").read_text())["all"]
    assert run["resumed_from"] in kept, "the rerun resumed from a checkpoint the interrupted run left"
    assert run["checks"]["adapter_effect"]["passed"] and (Path(ref.path) / "adapter" / "adapter_config.json").exists()

    # Two Ray Train workers, one per worker node, each in its own process; the resume message of
    # the workers' `tunepipe.train` logger reached the stage's log through the driver.
    pids = {int(pid) for pid in re.findall(r"\(RayTrainWorker pid=(\d+)", log)}
    assert len(pids) == 2, log[-3000:]
    # Ray Train derives node ranks from IPs (all nodes here share one, so both say node_rank 0):
    # each worker logs the Ray node it runs on.
    nodes = dict(re.findall(r"ray worker rank (\d) of 2 on node (\w+)", log))
    assert set(nodes) == {"0", "1"} and len(set(nodes.values())) == 2, log[-3000:]
    assert cluster.head_node.node_id not in nodes.values()
    assert re.search(r"tunepipe\.train INFO resuming from .*checkpoint-\d+", log)


def test_a_failing_worker_fails_the_launch_with_its_error(tmp_path, ray_cluster):
    from tunepipe.tasks.training.launcher import run_training

    cluster, _ = ray_cluster
    env = cpu_profile(launcher="ray", num_processes=2, ray=RayProfile(address=cluster.address, resources_per_worker={"CPU": 1, "trainer": 1}))
    logger, lines = collecting_logger("tunepipe.test-ray")
    with pytest.raises(StageFailed) as failure:
        run_training("tests.helpers.training:failing_job", {}, env, logger, tmp_path)
    message = str(failure.value)
    assert "exited with code 1" in message and "Worker error: RuntimeError: planted failure in the worker" in message, message
    assert "about to fail" in (tmp_path / "launch.log").read_text()
