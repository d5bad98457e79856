"""Multi-node and routing settings without starting anything: profile validation, the world size
in the key, the Ray driver's command, run names and segments of routed runs, deployment overrides."""

from __future__ import annotations

import sys

import pytest
from pydantic import ValidationError

from tunepipe.schemas.environment import EnvironmentProfile
from tunepipe.tasks.core.config import apply_overrides, load_pipeline_config
from tunepipe.tasks.core.environment import load_environment
from tunepipe.tasks.core.loading import ConfigError
from tunepipe.tasks.ops.retrain import run_name, segment_stages
from tunepipe.tasks.training.launcher import _ERROR_LINE, launch_command
from tunepipe.tasks.training.stage_base import training_env_payload

MULTI = {"nodes": 2, "rdzv_endpoint": "h:1", "job_board": "/b"}


def _profile(**fields) -> EnvironmentProfile:
    return EnvironmentProfile.model_validate({"name": "p", "device_memory_gb": 16, **fields})


def test_multi_node_needs_torchrun_and_a_rank_below_nodes():
    with pytest.raises(ValidationError, match="multi_node is a torchrun setting"):
        _profile(launcher="accelerate", num_processes=2, multi_node=MULTI)
    with pytest.raises(ValidationError, match="node_rank 2 is not below nodes 2"):
        _profile(launcher="torchrun", multi_node={**MULTI, "node_rank": 2})
    with pytest.raises(ValidationError, match="nodes"):
        _profile(launcher="torchrun", multi_node={**MULTI, "nodes": 1})
    with pytest.raises(ValidationError, match="extra"):
        _profile(launcher="ray", ray={"adress": "auto"})


def test_the_key_counts_every_node_and_not_the_launcher():
    two_nodes = _profile(launcher="torchrun", num_processes=4, multi_node=MULTI)
    one_node = _profile(launcher="torchrun", num_processes=8)
    ray = _profile(launcher="ray", num_processes=8, ray={"address": "auto"})
    assert two_nodes.world_size == one_node.world_size == ray.world_size == 8
    assert training_env_payload(two_nodes) == training_env_payload(one_node) == training_env_payload(ray)
    assert training_env_payload(_profile(launcher="torchrun", num_processes=4)) != training_env_payload(two_nodes)


def test_ray_driver_command(tmp_path):
    env = _profile(device="cuda", dtype="bfloat16", launcher="ray", num_processes=16,
                   ray={"address": "ray://head:10001", "resources_per_worker": {"GPU": 1, "CPU": 8}, "placement_strategy": "SPREAD"})
    cmd = launch_command(env, tmp_path / "job.json")
    assert cmd[:4] == [sys.executable, "-m", "tunepipe.tasks.training.ray_launcher", str(tmp_path / "job.json")]
    assert cmd[cmd.index("--workers") + 1] == "16" and cmd[cmd.index("--address") + 1] == "ray://head:10001"
    assert cmd[cmd.index("--resources") + 1] == '{"CPU": 8.0, "GPU": 1.0}' and "--gpu" in cmd
    assert cmd[cmd.index("--placement-strategy") + 1] == "SPREAD"
    local = launch_command(_profile(launcher="ray", num_processes=2), tmp_path / "job.json")
    assert "--address" not in local and "--gpu" not in local and "--resources" not in local


def test_worker_error_lines_behind_launcher_prefixes():
    for line in ("(RayTrainWorker pid=12, ip=10.0.0.2) ValueError: bad row", "[rank1]: RuntimeError: boom", "KeyError: 'x'"):
        assert _ERROR_LINE.match(line), line
    assert not _ERROR_LINE.match("(RayTrainWorker pid=12) step 3 loss 1.2")


def test_routed_runs_are_named_for_their_segment():
    assert run_name("bot", None) == "bot@all-data"
    assert run_name("bot", "v3", routed=True, environment="single-gpu-24gb", until="align") == "bot@v3"
    assert run_name("bot", "v3", routed=False, environment="/p/single-gpu-24gb.yaml", until="align") == "bot@v3 → single-gpu-24gb (up to align)"
    stages = ["data", "base_model", "sft", "reward", "align", "evaluate"]
    routed = {"sft": "gpu", "evaluate": "cpu"}
    assert segment_stages(stages, "cpu", routed, "gpu", "align") == ["sft", "reward", "align"]
    assert segment_stages(stages, "cpu", routed, "cpu", "evaluate") == ["evaluate"]


def test_overrides_merge_dotted_and_nested_and_are_validated():
    merged = apply_overrides({"sft": {"training": {"max_steps": 2, "learning_rate": 1.0}}, "name": "a"},
                             {"sft.training.max_steps": 50, "sft": {"max_length": 64}, "name": "b"})
    assert merged == {"sft": {"training": {"max_steps": 50, "learning_rate": 1.0}, "max_length": 64}, "name": "b"}
    config = load_pipeline_config(None, overrides={"sft.training.max_steps": 3})
    assert config.sft.training.max_steps == 3 and config.sft.training.learning_rate == load_pipeline_config(None).sft.training.learning_rate
    with pytest.raises(ConfigError, match=r"sft\.training\.max_stepz .*unknown key"):
        load_pipeline_config(None, overrides={"sft.training.max_stepz": 3})


def test_bundled_multi_node_profile():
    env = load_environment("multi-node-torchrun")
    assert env.launcher == "torchrun" and env.multi_node.nodes == 2 and env.world_size == 16
