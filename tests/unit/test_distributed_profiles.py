"""Multi-GPU profiles without launching anything: what the planner divides by the world size (checked against
hand-computed bytes), how the FSDP profile reaches the Trainer and bitsandbytes, what profiles refuse, and how a
dead worker is named from torchrun's summary. The two-process runs are in tests/stage/test_multiprocess.py."""

from __future__ import annotations

import json

import pytest

from tunepipe.schemas.environment import EnvironmentProfile
from tunepipe.schemas.sft import SFTConfig
from tunepipe.tasks.core.environment import load_environment
from tunepipe.tasks.training.hardware import hardware
from tunepipe.tasks.training.memory_plan import GIB, plan

SEQ = 256


def _config():
    """A 0.2B-parameter Llama shape (meta device: nothing is allocated)."""
    from transformers import LlamaConfig

    return LlamaConfig(hidden_size=1024, intermediate_size=2816, num_hidden_layers=8, num_attention_heads=16,
                       num_key_value_heads=4, vocab_size=32000)


def _method(name: str):
    return SFTConfig.model_validate({"method": name}).method


def _zero(tmp_path, stage: int, **offload) -> str:
    path = tmp_path / f"zero{stage}.json"
    zero = {"stage": stage, **{k: {"device": "cpu"} for k, on in offload.items() if on}}
    path.write_text(json.dumps({"zero_optimization": zero}))
    return str(path)


def _gpu(**update) -> EnvironmentProfile:
    """8 bf16 GPUs, no sharding unless `update` says so."""
    base = load_environment("single-gpu-80gb").model_copy(update={"launcher": "torchrun", "num_processes": 8})
    return base.model_copy(update=update)


@pytest.mark.parametrize("profile,divided,offloaded", [
    ("multi-gpu-deepspeed", ["gradients", "optimizer"], []),
    ("multi-gpu-deepspeed-zero3", ["weights", "gradients", "optimizer"], ["optimizer", "weights"]),
    ("multi-gpu-deepspeed-zero3-no-offload", ["weights", "gradients", "optimizer"], []),
    ("multi-gpu-fsdp", ["weights", "gradients", "optimizer"], []),
    ("single-gpu-24gb", [], []),
])
def test_bundled_profiles_shard_what_they_say(profile, divided, offloaded):
    shards = hardware(load_environment(profile)).sharding()
    assert shards["divided"] == divided and shards["offloaded"] == offloaded


def test_plan_divides_weights_gradients_and_optimizer_by_the_world_size(tmp_path):
    """Per-device bytes by hand: bf16 full fine-tuning holds weights (2 B/param), gradients (2 B/param) and AdamW's
    two states (2 x 2 B/param) in the unsharded run; DeepSpeed keeps fp32 master weights + two fp32 states
    (12 B/param). Each scheme divides its components by 8 and offload zeroes them on the GPU; activations are
    each process's own and stay."""
    from tunepipe.tasks.core.environment import load_environment as load
    from tunepipe.schemas.environment import FsdpProfile

    full = _method("full")
    one = plan(_config(), full, _gpu(num_processes=1, launcher="in_process"), SEQ)
    p = one["total_params"]
    assert p == one["trainable_params"] and 1.5e8 < p < 2.5e8

    def memory(env):
        m = plan(_config(), full, env, SEQ)["memory"]
        assert m["activations_gb"] == one["memory"]["activations_gb"]  # never divided
        return m["weights_gb"], m["gradients_gb"], m["optimizer_gb"]

    def gb(value: float) -> float:
        return round(value / GIB, 4)

    assert memory(_gpu(num_processes=1, launcher="in_process")) == (gb(2 * p), gb(2 * p), gb(4 * p))
    assert memory(_gpu()) == (gb(2 * p), gb(2 * p), gb(4 * p))  # DDP: every GPU holds everything
    assert memory(_gpu(deepspeed_config=_zero(tmp_path, 1))) == (gb(2 * p), gb(2 * p), gb(12 * p / 8))
    assert memory(_gpu(deepspeed_config=_zero(tmp_path, 2))) == (gb(2 * p), gb(2 * p / 8), gb(12 * p / 8))
    assert memory(_gpu(deepspeed_config=_zero(tmp_path, 3))) == (gb(2 * p / 8), gb(2 * p / 8), gb(12 * p / 8))
    assert memory(_gpu(deepspeed_config=_zero(tmp_path, 3, offload_optimizer=True, offload_param=True))) == (0, gb(2 * p / 8), 0)
    assert memory(_gpu(fsdp=FsdpProfile())) == (gb(2 * p / 8), gb(2 * p / 8), gb(4 * p / 8))
    assert memory(_gpu(fsdp=FsdpProfile(reshard_after_forward=False))) == (gb(2 * p), gb(2 * p / 8), gb(4 * p / 8))
    assert memory(_gpu(fsdp=FsdpProfile(cpu_offload=True))) == (0, 0, 0)
    # The bundled FSDP profile: 8 processes, full shard.
    fsdp = plan(_config(), full, load("multi-gpu-fsdp"), SEQ)["memory"]
    assert fsdp["weights_gb"] == gb(2 * p / 8) and fsdp["assumptions"]["sharding"]["world_size"] == 8


def test_plan_divides_lora_state_under_fsdp():
    """LoRA: the frozen bf16 base is sharded with the adapters; the adapters' gradients and states are float32."""
    from tunepipe.schemas.environment import FsdpProfile

    lora = _method("lora")
    single = plan(_config(), lora, _gpu(num_processes=1, launcher="in_process"), SEQ)
    sharded = plan(_config(), lora, _gpu(fsdp=FsdpProfile()), SEQ)
    total, trainable = single["total_params"], single["trainable_params"]
    assert sharded["memory"]["weights_gb"] == round(2 * total / 8 / GIB, 4)
    assert sharded["memory"]["gradients_gb"] == round(4 * trainable / 8 / GIB, 4)
    assert sharded["memory"]["optimizer_gb"] == round(8 * trainable / 8 / GIB, 4)
    assert sharded["memory"]["total_gb"] < single["memory"]["total_gb"]


def test_fsdp_profile_reaches_the_trainer_as_fsdp2():
    from tunepipe.schemas.training import TrainingConfig
    from tunepipe.tasks.training.peft_methods import training_arguments

    env = load_environment("multi-gpu-fsdp")
    args = training_arguments(TrainingConfig(), env, output_dir="/tmp/unused", optim="adamw_torch")
    assert args["fsdp"] is True and args["deepspeed"] is None
    assert args["fsdp_config"] == {"version": 2, "reshard_after_forward": True, "cpu_offload": False,
                                   "state_dict_type": "FULL_STATE_DICT", "activation_checkpointing": True,
                                   "auto_wrap_policy": "TRANSFORMER_BASED_WRAP"}
    # FSDP's own activation checkpointing replaces the Trainer's (which would all-gather each block again).
    assert args["gradient_checkpointing"] is False
    plain = training_arguments(TrainingConfig(), load_environment("single-gpu-24gb"), output_dir="/tmp/unused", optim="adamw_torch")
    assert "fsdp" not in plain and plain["gradient_checkpointing"] is True


def test_qlora_under_fsdp_stores_4bit_weights_in_the_compute_dtype():
    import torch

    from tunepipe.tasks.training.peft_methods import bnb_config

    qlora = _method("qlora")
    assert bnb_config(qlora, load_environment("multi-gpu-fsdp")).bnb_4bit_quant_storage == torch.bfloat16
    assert bnb_config(qlora, load_environment("single-gpu-24gb")).bnb_4bit_quant_storage == torch.uint8


def test_profiles_refuse_fsdp_on_cpu_and_with_deepspeed():
    """On CPU accelerate would drop the FSDP plugin and train unsharded DDP: refused with the reason."""
    from pydantic import ValidationError

    fsdp = load_environment("multi-gpu-fsdp").model_dump()
    cpu = {**fsdp, "device": "cpu", "dtype": "float32", "attn_implementation": "sdpa", "packed_attention": []}
    with pytest.raises(ValidationError, match="fsdp needs a CUDA device"):
        EnvironmentProfile.model_validate(cpu)
    with pytest.raises(ValidationError, match="choose one"):
        EnvironmentProfile.model_validate({**fsdp, "deepspeed_config": "deepspeed/zero3.json"})


TORCHRUN_SUMMARY = """\
[rank0]: RuntimeError: [../gloo/transport/tcp/pair.cc:553] Connection closed by peer [127.0.0.1]:41378
E1130 07:15:33.676000 9646 torch/distributed/elastic/multiprocessing/api.py:1002] failed (exitcode: -9) local_rank: 1
torch.distributed.elastic.multiprocessing.errors.ChildFailedError:
============================================================
tunepipe.tasks.training.launcher FAILED
------------------------------------------------------------
Failures:
[1]:
  time      : 2026-11-30_07:15:33
  host      : localhost
  rank      : 0 (local_rank: 0)
  exitcode  : 1 (pid: 9657)
  error_file: <N/A>
  traceback : To enable traceback see: https://pytorch.org/docs/stable/elastic/errors.html
------------------------------------------------------------
Root Cause (first observed failure):
[0]:
  time      : 2026-11-30_07:15:33
  host      : localhost
  rank      : 1 (local_rank: 1)
  exitcode  : -9 (pid: 9658)
  error_file: <N/A>
  traceback : Signal 9 (SIGKILL) received by PID 9658
============================================================"""


def test_a_killed_rank_is_named_from_torchruns_summary():
    from tunepipe.tasks.training.launcher import failure_summary, root_cause

    lines = TORCHRUN_SUMMARY.splitlines()
    assert root_cause(lines) == {"rank": "1", "exitcode": "-9", "traceback": "Signal 9 (SIGKILL) received by PID 9658"}
    errors = [lines[0]]
    assert failure_summary(lines, errors) == (
        ". Rank 1 failed first (exit code -9: Signal 9 (SIGKILL) received by PID 9658). Other ranks then reported: "
        + lines[0]
    )
    # A rank's own exception line comes without its [rankN] prefix; no summary: the last exception line.
    own = "[rank1]: ValueError: bad batch"
    assert ". Worker error: ValueError: bad batch." in failure_summary(lines, [own, lines[0]]) + "."
    assert failure_summary(["no summary here"], ["KeyError: x"]) == ". Worker error: KeyError: x"
