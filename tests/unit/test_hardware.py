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


# The profile fields that carry hardware decisions, read only by tasks/training/hardware.py everywhere in tasks/
# and flows/: what trains, evaluates, exports, deploys and serves, the lm library, the CLI.
DECIDING_FIELDS = {"device", "dtype", "attn_implementation", "packed_attention", "fsdp", "deepspeed_config"}
DECIDING_CODE = ["tasks", "flows"]
# Functions that read the profile as written, deciding nothing: a stage's env_payload (training_env_payload for
# the training stages) lists the fields that enter its key; deepspeed_config_path resolves the profile's file
# name; `tunepipe envs` prints each bundled profile.
KEY_PAYLOADS = {"env_payload", "training_env_payload", "deepspeed_config_path", "cmd_envs"}


def _is_profile(node: ast.AST) -> bool:
    """`env`, `profile` or `<something>.env` (ctx.env, job.env)."""
    return (isinstance(node, ast.Name) and node.id in ("env", "profile")) or (isinstance(node, ast.Attribute) and node.attr == "env")


def direct_reads(path: Path, source: str) -> list[str]:
    """`path:line env.<field>` for every read of a deciding profile field outside a key payload."""
    tree = ast.parse(source)
    exempt = {n.lineno for f in ast.walk(tree) if isinstance(f, ast.FunctionDef) and f.name in KEY_PAYLOADS
              for n in ast.walk(f) if hasattr(n, "lineno")}
    return [f"{path.relative_to(ROOT)}:{node.lineno} env.{node.attr}" for node in ast.walk(tree)
            if isinstance(node, ast.Attribute) and node.attr in DECIDING_FIELDS and _is_profile(node.value) and node.lineno not in exempt]


def deciding_files() -> list[Path]:
    paths = []
    for folder in DECIDING_CODE:
        paths += sorted((ROOT / folder).rglob("*.py")) if (ROOT / folder).is_dir() else [ROOT / folder]
    return [p for p in paths if p.name != "hardware.py"]


def test_tasks_and_flows_ask_the_hardware_module():
    files = deciding_files()
    assert {ROOT / "tasks/export/stage.py", ROOT / "tasks/serving/embedded.py", ROOT / "flows/cli/serve.py"} <= set(files)
    readers = [read for path in files for read in direct_reads(path, path.read_text())]
    assert readers == [], readers


@pytest.mark.parametrize(("rel", "planted"), [
    ("tasks/export/stage.py", "\n\ndef _planted(env):\n    return load_model('m', dtype=env.dtype)\n"),
    ("tasks/serving/embedded.py", "\n\ndef _planted(profile):\n    return profile.device != 'cuda'\n"),
    ("tasks/serving/settings.py", "\n\ndef _planted(ctx):\n    return ctx.env.attn_implementation\n"),
])
def test_a_planted_direct_read_is_named(rel, planted):
    path = ROOT / rel
    source = path.read_text().rstrip("\n") + "\n" + planted
    field = planted.split(".")[-1].split(" ")[0].split(")")[0].strip()
    line = len(source.splitlines())
    assert direct_reads(path, source) == [f"{rel}:{line} env.{field}"]


def test_export_loads_and_quantizes_where_the_profile_says():
    cpu, gpu = hardware(load_environment("cpu")), hardware(load_environment("single-gpu-24gb"))
    assert cpu.placement() == {"dtype": cpu.dtype, "device_map": {"": "cpu"}}
    assert gpu.placement() == {"dtype": "bfloat16", "device_map": {"": "cuda"}}
    assert (cpu.runs_gpu_only_quantizers(), gpu.runs_gpu_only_quantizers()) == (False, True)
