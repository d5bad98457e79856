"""Two training processes on CPU (gloo), through the launcher the stages use (`torchrun`, 2 workers).

- DDP, DeepSpeed ZeRO-2 and ZeRO-3: 2 processes x per-device batch 2 give the loss curve and the weights of
  1 process x batch 4 (same seed, same data order), LoRA and full fine-tuning (DDP through the kill test);
- each rank's share of the training state: ZeRO-2 divides the optimizer states, ZeRO-3 the parameters too;
- kill -9 of rank 1 fails the sft stage naming rank 1 and the signal; the rerun resumes from the last
  checkpoint and finishes on the uninterrupted curve;
- pretrain, reward and align (DPO, PPO) launch the same way.

Tolerance of the loss/weight comparisons: 1e-4 absolute. Both runs sum the same per-token losses over the
same 4 rows per step; they differ only in where float32 additions happen (each rank's 2 rows, then the
gradient all-reduce), which measured at most 1e-6 on losses near 5 over 4 steps at learning rate 1e-2.
FSDP2 (and QLoRA under it) cannot run on CPU (accelerate drops its FSDP plugin for CPU processes): those cases
run on a host with 2+ GPUs and skip here with the reason; the profile's wiring is checked in
tests/unit/test_distributed_profiles.py.

Each two-process run takes 40-60 s on 2 shared cores (two interpreters importing torch/transformers/deepspeed
dominate; a few steps follow); the whole file about 7.5 minutes. The first ZeRO run on a machine JIT-builds
DeepSpeed's CPU comm op (about 4 minutes, once; tests/stage/test_sft_zero2.py usually pays it first).
"""

from __future__ import annotations

import json
import logging
import os
import signal
import threading
import time
from pathlib import Path

import pytest
import torch

from tunepipe.schemas.sft import SFTConfig
from tunepipe.tasks.core.artifacts import ArtifactStore
from tunepipe.tasks.core.stage import StageFailed, run_stage
from tunepipe.tasks.training.launcher import run_training
from tests.helpers.training import build_tiny_model, complete_checkpoints, cpu_profile, write_data_artifact

pytestmark = pytest.mark.multiprocess
torch.set_num_threads(1)

SFT_ENTRY = "tunepipe.tasks.sft.train:train_job"
# 17 training rows: 4 full global batches of 4. A 5th step would hold the epoch's last row, which one process
# trains alone but DDP pads by repeating rows from the epoch's start (accelerate's `even_batches`), so curves
# are compared over whole batches.
STEPS = 4
LOSS_TOLERANCE = 1e-4
METHODS = {
    # No dropout: each rank would draw its own masks, and the comparison is about the sharded arithmetic.
    "lora": {"name": "lora", "r": 4, "dropout": 0.0, "target_modules": ["q_proj", "v_proj"]},
    "full": {"name": "full"},
}
TRAINING = {"max_steps": STEPS, "save_steps": 2, "warmup_ratio": 0.0, "learning_rate": 1e-2}


def _two_processes(**update):
    return cpu_profile(launcher="torchrun", num_processes=2, per_device_batch_size=2, **update)


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    root = tmp_path_factory.mktemp("multiprocess")
    return {"root": root, "model": build_tiny_model(root / "llama"), "data": write_data_artifact(root / "data")}


def _sft_config(assets, method: str, **extra) -> SFTConfig:
    return SFTConfig.model_validate(
        {"model": str(assets["model"]), "method": METHODS[method], "max_length": 64, "training": TRAINING, **extra}
    )


def _train(assets, root: Path, method: str, env) -> dict:
    """One sft training job under `env`'s launcher, as the stage runs it."""
    job = {"config": _sft_config(assets, method).model_dump(mode="json"), "env": env.model_dump(mode="json"),
           "model_path": str(assets["model"]), "data_dir": assets["data"].path, "tasks": None,
           "output_dir": str(root), "save_to": "out", "checkpoint_dir": str(root / "ckpt")}
    return run_training(SFT_ENTRY, job, env, logging.getLogger("tunepipe.test-multiprocess"), root / "launch")


@pytest.fixture(scope="module")
def one_process(assets):
    """The reference: 1 process x batch 4, in process, per method."""
    return {method: _train(assets, assets["root"] / f"one-{method}", method, cpu_profile(per_device_batch_size=4))
            for method in METHODS}


def _weights(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    name = "adapter_model.safetensors" if (path / "adapter_model.safetensors").exists() else "model.safetensors"
    return load_file(str(path / name))


TWO_GPUS = pytest.mark.skipif(
    torch.cuda.device_count() < 2,
    reason="FSDP2 needs CUDA: accelerate 1.15's AcceleratorState enables the FSDP plugin only for GPU-like distributed "
    "types; CPU workers run as MULTI_CPU (plain DDP, the plugin dropped), and NCCL refuses two ranks on one GPU. "
    "Runs on a host with 2+ GPUs",
)
QLORA_FSDP = pytest.mark.skipif(
    torch.cuda.device_count() < 2,
    reason="QLoRA under FSDP2 needs FSDP (CUDA only, as above); bitsandbytes 0.50 does train QLoRA on CPU, in one "
    "process (tests/stage/test_sft_methods*.py), with no sharding wrapper. Runs on a host with 2+ GPUs",
)


def _profile(kind: str):
    """Two workers of the profile family `kind`: CPU for DDP and ZeRO, the multi-gpu-fsdp profile on CUDA at
    float32 (the one-process reference's precision) for FSDP."""
    from tunepipe.tasks.core.environment import load_environment

    if kind.startswith("fsdp"):
        return load_environment("multi-gpu-fsdp").model_copy(update={
            "launcher": "torchrun", "num_processes": 2, "per_device_batch_size": 2, "gradient_accumulation_steps": 1,
            "dtype": "float32", "attn_implementation": "sdpa", "packed_attention": [], "gradient_checkpointing": False})
    return _two_processes(deepspeed_config={"ddp": None, "zero2": "deepspeed/zero2.json", "zero3": "deepspeed/zero3.json",
                                            "zero3-offload": "deepspeed/zero3-offload.json"}[kind])


# (profile kind, method, expected per-rank share of (parameters, optimizer states) against one process).
# DDP (LoRA) is checked the same way by the kill-and-resume test below, through the sft stage.
CASES = [
    pytest.param("zero2", "full", (1.0, 0.5), id="zero2-full"),
    pytest.param("zero3", "full", (0.5, 0.5), id="zero3-full"),
    pytest.param("zero3", "lora", (0.5, 0.5), id="zero3-lora"),
    pytest.param("fsdp", "full", (0.5, 0.5), id="fsdp2-full", marks=TWO_GPUS),
    pytest.param("fsdp", "lora", (0.5, 0.5), id="fsdp2-lora", marks=TWO_GPUS),
]


@pytest.mark.parametrize("kind,method,share", CASES)
def test_two_processes_match_one_process_at_twice_the_batch(assets, one_process, kind, method, share):
    if kind.startswith("zero"):
        pytest.importorskip("deepspeed")
    root = assets["root"] / f"two-{kind}-{method}"
    result = _train(assets, root, method, _profile(kind))
    reference = one_process[method]
    assert result["world_size"] == 2 and reference["world_size"] == 1
    assert result["global_step"] == reference["global_step"] == STEPS

    losses, expected = [p["loss"] for p in result["loss_history"]], [p["loss"] for p in reference["loss_history"]]
    assert len(losses) == len(expected) == STEPS
    worst = max(abs(a - b) for a, b in zip(losses, expected))
    assert worst <= LOSS_TOLERANCE, f"{kind} {method}: loss curves differ by {worst:.2e}: {losses} vs {expected}"
    assert expected[-1] < expected[0]  # the curve is a real one: training moved the loss

    # The published weights (gathered from the shards under ZeRO-3/FSDP) are the one-process run's.
    got, want = _weights(root / "out"), _weights(assets["root"] / f"one-{method}" / "out")
    assert got.keys() == want.keys()
    weight_gap = max(float((got[k].float().cpu() - want[k]).abs().max()) for k in want)
    assert weight_gap <= LOSS_TOLERANCE, f"{kind} {method}: weights differ by {weight_gap:.2e}"

    if method == "lora":  # the adapter self-check ran (collectively, when the parameters are sharded)
        assert result["checks"]["adapter_effect"]["passed"] and result["checks"]["adapter_effect"]["max_logit_difference"] > 0

    # What each rank holds against the unsharded single process.
    (unsharded,) = reference["per_rank_state"]
    ranks = result["per_rank_state"]
    assert [r["rank"] for r in ranks] == [0, 1]
    for rank in ranks:
        params = rank["parameter_bytes"] / unsharded["parameter_bytes"]
        optim = rank["optimizer_state_bytes"] / unsharded["optimizer_state_bytes"]
        print(f"{kind}-{method} rank {rank['rank']}: parameters x{params:.4f}, optimizer states x{optim:.4f}, "
              f"loss gap {worst:.1e}, weight gap {weight_gap:.1e}")
        # ZeRO pads each flat partition to the world size: a few elements over the exact half.
        assert params == pytest.approx(share[0], abs=0.01), f"{kind}: rank {rank['rank']} holds {params:.3f} of the parameters"
        assert optim == pytest.approx(share[1], abs=0.01), f"{kind}: rank {rank['rank']} holds {optim:.3f} of the optimizer states"


@pytest.fixture
def default_port_taken():
    """Port 29500 (accelerate's and DeepSpeed's default rendezvous port) held, as by another job on this machine."""
    import socket

    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("127.0.0.1", 29500))
        except OSError:
            pass  # already held by something else: the condition this test wants
        sock.listen()
        yield


@pytest.mark.parametrize("launcher", ["accelerate", "deepspeed"])
def test_accelerate_and_deepspeed_launchers_start_two_processes_beside_another_job(assets, one_process, launcher, default_port_taken):
    """The LoRA job through `accelerate launch` (DDP) and the `deepspeed` runner (ZeRO-2): both start two workers
    (accelerate's `--cpu` would start one) on a rendezvous port of their own, and the result is the one-process run's."""
    if launcher == "deepspeed":
        pytest.importorskip("deepspeed")
    root = assets["root"] / f"two-{launcher}"
    zero2 = {"deepspeed_config": "deepspeed/zero2.json"} if launcher == "deepspeed" else {}  # the runner needs a config
    env = cpu_profile(launcher=launcher, num_processes=2, per_device_batch_size=2, **zero2)
    result = _train(assets, root, "lora", env)
    reference = one_process["lora"]
    assert result["world_size"] == 2 and [r["rank"] for r in result["per_rank_state"]] == [0, 1]
    losses, expected = [p["loss"] for p in result["loss_history"]], [p["loss"] for p in reference["loss_history"]]
    assert len(losses) == len(expected) == STEPS
    assert max(abs(a - b) for a, b in zip(losses, expected)) <= LOSS_TOLERANCE, (losses, expected)


@QLORA_FSDP
def test_qlora_trains_under_fsdp2(assets, tmp_path):
    """QLoRA's 4-bit base stored in the compute dtype, sharded by FSDP2 over 2 GPUs: it trains, each rank holds
    about half of the parameters, and the adapter is published."""
    from tunepipe.tasks.core.environment import load_environment

    env = load_environment("multi-gpu-fsdp").model_copy(update={
        "launcher": "torchrun", "num_processes": 2, "per_device_batch_size": 2, "gradient_accumulation_steps": 1})
    job = {"config": SFTConfig.model_validate({"model": str(assets["model"]), "method": {"name": "qlora", "r": 4},
                                               "max_length": 64, "training": TRAINING}).model_dump(mode="json"),
           "env": env.model_dump(mode="json"), "model_path": str(assets["model"]), "data_dir": assets["data"].path,
           "tasks": None, "output_dir": str(tmp_path), "save_to": "out", "checkpoint_dir": str(tmp_path / "ckpt")}
    result = run_training(SFT_ENTRY, job, env, logging.getLogger("tunepipe.test-multiprocess"), tmp_path / "launch")
    losses = [p["loss"] for p in result["loss_history"]]
    assert result["world_size"] == 2 and len(losses) == STEPS and losses[-1] < losses[0]
    first, second = result["per_rank_state"]
    assert first["parameter_bytes"] == pytest.approx(second["parameter_bytes"], rel=0.05)
    assert (tmp_path / "out" / "adapter_model.safetensors").exists()


def test_killed_rank_fails_the_stage_and_the_rerun_resumes(assets, one_process, tmp_path, monkeypatch):
    from tunepipe.tasks.sft import stage as sft_stage
    from tests.helpers.multiprocess import rank_alive, worker_pid

    store_root = tmp_path / "artifacts"
    store, env = ArtifactStore(store_root), _two_processes()
    config = _sft_config(assets, "lora", heldout={"max_examples_per_task": 0})
    # Slowed steps (0.5 s each) so the kill lands between the first checkpoint and the end.
    monkeypatch.setattr(sft_stage, "ENTRYPOINT", "tests.helpers.multiprocess:slow_sft_job")
    killed: dict = {}

    def kill_rank_1_after_first_checkpoint():
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            if complete_checkpoints(store_root, "sft", "all"):
                job_file = next(store_root.glob("sft/.staging/*/.checkpoints/all.launch/job.json"))
                if (pid := worker_pid(job_file, rank=1)) is not None:
                    killed["steps_at_kill"] = complete_checkpoints(store_root, "sft", "all")
                    os.kill(pid, signal.SIGKILL)
                    killed["pid"] = pid
                    return
            time.sleep(0.05)

    killer = threading.Thread(target=kill_rank_1_after_first_checkpoint)
    killer.start()
    with pytest.raises(StageFailed) as info:
        run_stage(sft_stage.SFTStage(), config, {"data": assets["data"]}, store, env)
    killer.join()
    assert "pid" in killed and not rank_alive(killed["pid"])
    message = str(info.value)
    assert f"Rank 1 failed first (exit code -9: Signal 9 (SIGKILL) received by PID {killed['pid']})" in message, message
    left = complete_checkpoints(store_root, "sft", "all")
    assert left and max(left) < STEPS, f"checkpoints after the kill: {left}"

    monkeypatch.undo()
    ref = run_stage(sft_stage.SFTStage(), config, {"data": assets["data"]}, store, env)
    metrics = json.loads((Path(ref.path) / "manifest.json").read_text())["metrics"]
    assert metrics["resumed_from"] == {"all": max(left)} and metrics["world_size"] == {"all": 2}
    assert metrics["global_step"] == {"all": STEPS}
    # DDP over two processes, killed and resumed, ends where one process at twice the batch does: the same curve
    # (earlier steps come from the checkpoint's state) and the same adapter weights; each rank held everything.
    losses = [p["loss"] for p in metrics["loss_history"]["all"]]
    expected = [p["loss"] for p in one_process["lora"]["loss_history"]]
    assert max(abs(a - b) for a, b in zip(losses, expected, strict=True)) <= LOSS_TOLERANCE, (losses, expected)
    got, want = _weights(Path(ref.path) / "adapter"), _weights(assets["root"] / "one-lora" / "out")
    assert got.keys() == want.keys()
    assert max(float((got[k] - want[k]).abs().max()) for k in want) <= LOSS_TOLERANCE
    (unsharded,) = one_process["lora"]["per_rank_state"]
    for rank in metrics["per_rank_state"]["all"]:
        assert rank["parameter_bytes"] == unsharded["parameter_bytes"]
        assert rank["optimizer_state_bytes"] == unsharded["optimizer_state_bytes"]


# --------------------------------------------------------------------------------------------
# Every training stage launches the same way: the cheapest config of each under torchrun x 2 (DDP).

@pytest.fixture(scope="module")
def stage_assets(tmp_path_factory):
    """An SFT artifact (in process) and preference pairs designed against it, as the align tests use."""
    from tests.helpers.alignment import build_assets, data_with_pairs, pairs_against_sft

    built = build_assets(tmp_path_factory.mktemp("stages"))
    built["pairs_data"] = data_with_pairs(built, "data-pairs", pairs_against_sft(built))
    return built


def _run_two_processes(stage_assets, stage: str):
    """(artifact ref, manifest metrics) of `stage` trained 3 steps by two processes."""
    from tunepipe.schemas.align import AlignConfig
    from tunepipe.schemas.pretrain import PretrainConfig
    from tunepipe.tasks.align.stage import AlignStage
    from tunepipe.tasks.pretrain.stage import PretrainStage

    training = {"max_steps": 3, "learning_rate": 1e-2, "warmup_ratio": 0.0}
    model, store, env = str(stage_assets["model"]), stage_assets["store"], _two_processes()
    lora = {"name": "lora", "r": 4}
    if stage == "pretrain":
        config = PretrainConfig.model_validate({"model": model, "method": lora, "max_length": 24, "training": training})
        ref = run_stage(PretrainStage(), config, {"data": stage_assets["data"]}, store, env)
    elif stage == "reward":
        ref = _reward(stage_assets)
    else:
        method = {"dpo": {"name": "dpo", "beta": 0.5},
                  "ppo": {"name": "ppo", "response_length": 8, "num_ppo_epochs": 1}}[stage]
        inputs = {"data": stage_assets["pairs_data"], "sft": stage_assets["sft"]}
        if stage == "ppo":  # PPO's extra models: the reward model (trained by two processes too), value and reference
            inputs["reward"] = _reward(stage_assets)
        config = AlignConfig.model_validate({"method": method, "max_length": 64, "training": training,
                                             "heldout": {"max_examples_per_task": 2, "max_new_tokens": 4}})
        ref = run_stage(AlignStage(), config, inputs, store, env)
    return ref, json.loads((Path(ref.path) / "manifest.json").read_text())["metrics"]


def _reward(stage_assets):
    from tunepipe.schemas.reward import RewardConfig
    from tunepipe.tasks.reward.stage import RewardStage

    config = RewardConfig.model_validate({"model": str(stage_assets["model"]), "method": {"name": "lora", "r": 4},
                                          "max_length": 64,
                                          "training": {"max_steps": 3, "learning_rate": 1e-2, "warmup_ratio": 0.0}})
    # Cached by key after the first call: the ppo case reuses the reward case's artifact.
    return run_stage(RewardStage(), config, {"data": stage_assets["pairs_data"]}, stage_assets["store"], _two_processes())


@pytest.mark.parametrize("stage", ["pretrain", "reward", "dpo", "ppo"])
def test_every_training_stage_launches_two_processes(stage_assets, stage):
    ref, metrics = _run_two_processes(stage_assets, stage)
    per_run = isinstance(metrics["global_step"], dict)  # align: one entry per adapter run
    steps = metrics["global_step"]["all"] if per_run else metrics["global_step"]
    world = metrics["world_size"]["all"] if per_run else metrics["world_size"]
    assert world == 2 and steps == 3
    if stage == "ppo":  # PPO logs its objectives per update, not a `loss`
        history = [{"loss": p["value"]} for p in metrics["step_metrics"]["all"]["policy_loss"]]
    else:
        history = metrics["loss_history"]["all"] if per_run else metrics["loss_history"]
    assert len(history) == 3 and all(p["loss"] == p["loss"] for p in history)  # logged each step, and not NaN
    published = {"pretrain": "model.safetensors", "reward": "adapter/adapter_model.safetensors",
                 "dpo": "adapter/adapter_model.safetensors", "ppo": "adapter/adapter_model.safetensors"}[stage]
    assert (Path(ref.path) / published).exists()
