"""The launcher: commands per profile, a supervised multi-process launch that streams its log
and fails with the log's tail, and ZeRO-2 (the multi-gpu-deepspeed profile's DeepSpeed config)
running a few real steps on CPU in one process."""

from __future__ import annotations

import sys

import pytest

from tunepipe.tasks.core.environment import load_environment
from tunepipe.tasks.training.launcher import launch_command, run_training
from tunepipe.tasks.core.stage import StageFailed
from tests.helpers.training import collecting_logger


def test_launch_commands_per_profile(tmp_path):
    job = tmp_path / "job.json"
    zero2 = load_environment("multi-gpu-deepspeed")
    cmd = launch_command(zero2, job)
    assert cmd[:3] == [sys.executable, "-m", "deepspeed.launcher.runner"]
    assert cmd[cmd.index("--num_gpus") + 1] == "8" and cmd[-3:] == ["--module", "tunepipe.tasks.training.launcher", str(job)]
    acc = launch_command(zero2.model_copy(update={"launcher": "accelerate"}), job)
    assert "--use_deepspeed" in acc and acc[acc.index("--deepspeed_config_file") + 1].endswith("deepspeed/zero2.json")
    assert acc[acc.index("--num_processes") + 1] == "8"
    ddp = launch_command(zero2.model_copy(update={"launcher": "accelerate", "deepspeed_config": None}), job)
    assert "--multi_gpu" in ddp and "--use_deepspeed" not in ddp
    tr = launch_command(zero2.model_copy(update={"launcher": "torchrun", "num_processes": 2}), job)
    assert tr[2] == "torch.distributed.run" and tr[tr.index("--nproc_per_node") + 1] == "2"
    with pytest.raises(ValueError):
        launch_command(load_environment("cpu"), job)


def _torchrun_cpu():
    return load_environment("cpu").model_copy(update={"launcher": "torchrun", "num_processes": 1})


def test_supervised_launch_streams_logs_and_returns_the_result(tmp_path):
    logger, lines = collecting_logger("tunepipe.test-launcher")
    result = run_training("tests.helpers.training:echo_job", {"message": "hello"}, _torchrun_cpu(), logger, tmp_path)
    assert result == {"message": "hello", "rank": 0, "world": 1}
    assert any("worker says hello" in line for line in lines)


def test_dead_worker_fails_with_the_tail_of_its_log(tmp_path):
    logger, _ = collecting_logger("tunepipe.test-launcher")
    with pytest.raises(StageFailed) as info:
        run_training("tests.helpers.training:failing_job", {}, _torchrun_cpu(), logger, tmp_path)
    message = str(info.value)
    assert "exited with code" in message and "Worker error: RuntimeError: planted failure in the worker" in message
    assert "about to fail" in (tmp_path / "launch.log").read_text()


def test_in_process_launcher_calls_the_entry_point(tmp_path):
    logger, _ = collecting_logger("tunepipe.test-launcher")
    assert run_training("tests.helpers.training:echo_job", {"message": "x"}, load_environment("cpu"), logger, tmp_path)["message"] == "x"
