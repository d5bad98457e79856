"""The multi-gpu-deepspeed profile's ZeRO-2 config trains a few real steps on CPU in one process.

The profile's hardware fields are swapped for CPU ones (device, dtype, attention, one process);
its DeepSpeed config, batch/accumulation wiring and the Trainer's DeepSpeed path are the real
ones. The first run on a machine JIT-builds DeepSpeed's CPU comm op (minutes; cached after).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from tunepipe.schemas.sft import SFTConfig
from tunepipe.tasks.core.environment import load_environment
from tests.helpers.training import build_tiny_model, write_data_artifact

torch.set_num_threads(1)


@pytest.fixture
def single_process_distributed(monkeypatch):
    """The variables a launcher would set for rank 0 of 1; every global DeepSpeed/accelerate
    state the run leaves behind is undone afterwards, so later tests train without DeepSpeed."""
    for name, value in {
        "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29513", "RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1",
        "ACCELERATE_USE_DEEPSPEED": "false",  # TrainingArguments(deepspeed=...) sets it to true
    }.items():
        monkeypatch.setenv(name, value)
    yield
    from accelerate.state import AcceleratorState
    from transformers.integrations.deepspeed import unset_hf_deepspeed_config

    unset_hf_deepspeed_config()
    AcceleratorState._reset_state(reset_partial_state=True)
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def test_zero2_profile_runs_steps_on_cpu(tmp_path, single_process_distributed):
    pytest.importorskip("deepspeed")
    from tunepipe.tasks.sft.train import train_job

    env = load_environment("multi-gpu-deepspeed").model_copy(
        update={"device": "cpu", "dtype": "float32", "attn_implementation": "sdpa", "packed_attention": [], "launcher": "in_process",
                "num_processes": 1, "gradient_checkpointing": False, "per_device_batch_size": 2, "gradient_accumulation_steps": 2}
    )
    model, data = build_tiny_model(tmp_path / "model"), write_data_artifact(tmp_path / "data")
    config = SFTConfig.model_validate(
        {"model": str(model), "method": "full", "max_length": 64, "training": {"max_steps": 3, "save_steps": 2, "warmup_ratio": 0.0}}
    )
    job = {"config": config.model_dump(mode="json"), "env": env.model_dump(mode="json"), "model_path": str(model),
           "data_dir": data.path, "tasks": None, "output_dir": str(tmp_path), "save_to": "out",
           "checkpoint_dir": str(tmp_path / "ckpt")}
    result = train_job(job)
    assert result["global_step"] == 3 and len(result["loss_history"]) == 3
    ckpt = tmp_path / "ckpt" / "checkpoint-2"
    assert (ckpt / "global_step2").is_dir(), "a DeepSpeed (ZeRO) checkpoint was written"
    ds = json.loads((Path(env.deepspeed_config) if Path(env.deepspeed_config).is_absolute() else
                     Path(__file__).resolve().parents[2] / "environments" / env.deepspeed_config).read_text())
    assert ds["zero_optimization"]["stage"] == 2
    assert (tmp_path / "out" / "model.safetensors").exists()


def test_training_after_zero2_runs_without_deepspeed(tmp_path):
    """Guards the fixture above: a plain run in the same process does not inherit DeepSpeed."""
    from tunepipe.tasks.sft.train import train_job
    from tests.helpers.training import cpu_profile

    model, data = build_tiny_model(tmp_path / "model"), write_data_artifact(tmp_path / "data")
    config = SFTConfig.model_validate({"model": str(model), "method": "lora", "max_length": 64,
                                        "training": {"max_steps": 1, "warmup_ratio": 0.0}})  # one warmup step is lr 0: nothing trains
    job = {"config": config.model_dump(mode="json"), "env": cpu_profile().model_dump(mode="json"), "model_path": str(model),
           "data_dir": data.path, "tasks": None, "output_dir": str(tmp_path), "save_to": "out",
           "checkpoint_dir": str(tmp_path / "ckpt")}
    assert train_job(job)["global_step"] == 1
