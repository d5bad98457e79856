"""One module turns a profile into hardware decisions; the bundled profiles decide what they say."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from tunepipe.tasks.core.environment import load_environment
from tunepipe.tasks.training.hardware import hardware

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("profile,backend,sharded,offloaded,precision", [
    ("cpu", "single", False, False, {"bf16": False, "fp16": False, "use_cpu": True}),
    ("single-gpu-24gb", "single", False, False, {"bf16": True, "fp16": False, "use_cpu": False}),
    ("multi-gpu-deepspeed", "deepspeed", False, False, {"bf16": True, "fp16": False, "use_cpu": False}),
    ("multi-gpu-deepspeed-zero3", "deepspeed", True, True, {"bf16": True, "fp16": False, "use_cpu": False}),
    ("multi-gpu-deepspeed-zero3-no-offload", "deepspeed", True, False, {"bf16": True, "fp16": False, "use_cpu": False}),
    ("multi-gpu-fsdp", "fsdp", True, False, {"bf16": True, "fp16": False, "use_cpu": False}),
])
def test_bundled_profiles_decide_backend_sharding_offload_and_precision(profile, backend, sharded, offloaded, precision):
    hw = hardware(load_environment(profile))
    assert (hw.backend, hw.parameters_sharded(), hw.optimizer_offloaded(), hw.precision_flags()) == (backend, sharded, offloaded, precision)
    assert hw.device_map() == {"": hw.device} and hw.on_gpu == (hw.device == "cuda")


def test_several_plain_processes_are_ddp_and_fsdp_owns_checkpointing():
    cpu = load_environment("cpu")
    assert hardware(cpu.model_copy(update={"launcher": "torchrun", "num_processes": 2})).backend == "ddp"
    assert hardware(cpu.model_copy(update={"launcher": "torchrun", "num_processes": 1})).backend == "single"
    fsdp = load_environment("multi-gpu-fsdp")
    assert fsdp.gradient_checkpointing and not hardware(fsdp).trainer_checkpointing()
    assert hardware(fsdp).fsdp_arguments()["fsdp_config"]["activation_checkpointing"] is True
    assert hardware(fsdp).quant_storage_is_compute_dtype() and not hardware(cpu).quant_storage_is_compute_dtype()
    assert hardware(fsdp.model_copy(update={"fsdp": fsdp.fsdp.model_copy(update={"cpu_offload": True})})).optimizer_offloaded()


def test_packed_attention_plans_the_first_preference_and_padded_rows_keep_the_base_kernel():
    env = load_environment("cpu").model_copy(update={"attn_implementation": "sdpa", "packed_attention": ["flash_attention_2", "flex_attention"]})
    assert hardware(env).planned_attention(padding_free=True) == "flash_attention_2"
    assert hardware(env).planned_attention(padding_free=False) == "sdpa"
    assert hardware(env).attention(padding_free=False) == "sdpa"


# The profile fields that carry hardware decisions, read only by tasks/training/hardware.py in the code that
# trains and evaluates (export and serving still read some themselves: see the module docstring).
DECIDING_FIELDS = {"device", "dtype", "attn_implementation", "packed_attention", "fsdp", "deepspeed_config"}
TRAINING_CODE = ["tasks/training", "tasks/sft", "tasks/reward", "tasks/pretrain", "tasks/align", "tasks/evaluate/backends.py"]


def _is_profile(node: ast.AST) -> bool:
    """`env` or `<something>.env` (ctx.env, job.env)."""
    return (isinstance(node, ast.Name) and node.id == "env") or (isinstance(node, ast.Attribute) and node.attr == "env")


def test_training_code_asks_the_hardware_module():
    readers = []
    for folder in TRAINING_CODE:
        for path in sorted((ROOT / folder).rglob("*.py")) if (ROOT / folder).is_dir() else [ROOT / folder]:
            if path.name == "hardware.py":
                continue
            # stage_base.training_env_payload lists the profile fields that enter a training key: not a decision
            exempt = {n.lineno for f in ast.walk(ast.parse(path.read_text())) if isinstance(f, ast.FunctionDef)
                      and f.name == "training_env_payload" for n in ast.walk(f) if hasattr(n, "lineno")}
            for node in ast.walk(ast.parse(path.read_text())):
                if (isinstance(node, ast.Attribute) and node.attr in DECIDING_FIELDS and _is_profile(node.value)
                        and node.lineno not in exempt):
                    readers.append(f"{path.relative_to(ROOT)}:{node.lineno} env.{node.attr}")
    assert readers == [], readers
