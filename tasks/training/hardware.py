"""The one place an environment profile becomes hardware decisions.

Device and precision, the attention kernel, the distributed backend (DDP, FSDP2, DeepSpeed ZeRO)
and where parameters and optimizer states live: everything that trains, plans memory, launches
workers, loads a model for a check, exports or serves one asks `hardware(env)` instead of reading
the profile's fields and deciding again. The profile says what the machine is; this module says what
that means, so a new kind of machine is a profile (and, at most, a change here), never an `if cpu:`
elsewhere. tests/unit/test_hardware.py holds all of tasks/ and flows/ to it (a stage's `env_payload`,
which lists the profile fields entering its key, reads them as written).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Any, Literal

from tunepipe.schemas.environment import EnvironmentProfile
from tunepipe.tasks.core.environment import deepspeed_config_path
from tunepipe.tasks.lm.modeling import training_attention

Backend = Literal["single", "ddp", "fsdp", "deepspeed"]


@dataclass(frozen=True)
class Hardware:
    """The hardware decisions of one profile."""

    env: EnvironmentProfile

    # ---- device and precision ------------------------------------------------------------------
    @property
    def device(self) -> str:
        """Where models compute: `cpu` or `cuda`."""
        return self.env.device

    @property
    def on_gpu(self) -> bool:
        return self.env.device == "cuda"

    @property
    def dtype(self) -> str:
        """The dtype weights load in and training computes in."""
        return self.env.dtype

    def precision_flags(self) -> dict[str, Any]:
        """Mixed-precision and device flags of `TrainingArguments`."""
        return {"bf16": self.dtype == "bfloat16", "fp16": self.dtype == "float16", "use_cpu": not self.on_gpu}

    def device_map(self) -> dict[str, str]:
        """Everything on the profile's device (a model loaded for a check, a merge, an evaluation)."""
        return {"": self.device}

    def placement(self) -> dict[str, Any]:
        """How a model is loaded whole for a check, a merge, an export or a re-evaluation: at the profile's
        dtype, every module on its device (`load_model(path, **hw.placement())`)."""
        return {"dtype": self.dtype, "device_map": self.device_map()}

    def runs_gpu_only_quantizers(self) -> bool:
        """Whether the quantizers that need a CUDA device (llm-compressor's GPTQ/AWQ calibration) can run here."""
        return self.on_gpu

    def quantized_device_map(self) -> dict[str, Any] | None:
        """Where a 4-bit base is loaded: the Trainer never moves a bitsandbytes model, so on CUDA it
        must be quantized straight onto this process's GPU (LOCAL_RANK under a launcher)."""
        if not self.on_gpu:
            return None
        return {"": int(os.environ.get("LOCAL_RANK", "0"))}

    # ---- attention -----------------------------------------------------------------------------
    def attention(self, *, padding_free: bool) -> str:
        """The kernel training loads: for padding-free packed rows the first installed of the profile's
        `packed_attention` preferences, otherwise `attn_implementation`."""
        return training_attention(self.env.attn_implementation, self.env.packed_attention, padding_free=padding_free)

    def planned_attention(self, *, padding_free: bool) -> str:
        """The kernel a plan assumes, without the installed check (a plan may be made on another machine
        than the run; flash-attn and flex_attention, the usual preferences, plan alike)."""
        if padding_free and self.env.packed_attention:
            return self.env.packed_attention[0]
        return self.env.attn_implementation

    # ---- distribution and placement -------------------------------------------------------------
    @property
    def zero_stage(self) -> int:
        """The ZeRO stage of the profile's DeepSpeed config (0 without DeepSpeed)."""
        return self.deepspeed()["stage"]

    def deepspeed(self) -> dict[str, Any]:
        """The profile's DeepSpeed ZeRO stage and what it offloads to the CPU (stage 0 without DeepSpeed)."""
        config = self._deepspeed_config()
        if config is None:
            return {"stage": 0, "offload_optimizer": False, "offload_param": False}
        zero = config.get("zero_optimization", {})
        return {
            "stage": int(zero.get("stage", 0)),
            "offload_optimizer": (zero.get("offload_optimizer") or {}).get("device", "none") not in ("none", None),
            "offload_param": (zero.get("offload_param") or {}).get("device", "none") not in ("none", None),
        }

    def sharding(self) -> dict[str, Any]:
        """What each of the profile's processes holds of the training state: the components divided by the world
        size (the others every process holds whole) and those moved to CPU memory.

        DeepSpeed ZeRO-1 divides the optimizer states, ZeRO-2 the gradients too, ZeRO-3 the weights as well
        (offload_optimizer / offload_param move them to the CPU). FSDP full shard (`reshard_after_forward`)
        divides all three; without resharding the weights stay gathered from forward to backward, so the peak
        holds them whole; `cpu_offload` moves all three to the CPU. DDP divides nothing."""
        env = self.env
        n = env.world_size  # all nodes: sharding divides over every process of the job
        if env.fsdp is not None:
            divided = (["weights"] if env.fsdp.reshard_after_forward else []) + ["gradients", "optimizer"]
            offloaded = ["weights", "gradients", "optimizer"] if env.fsdp.cpu_offload else []
            scheme = "fsdp full shard" if env.fsdp.reshard_after_forward else "fsdp shard grad/optimizer"
        else:
            ds = self.deepspeed()
            stage = ds["stage"]
            divided = [name for name, needs in (("weights", 3), ("gradients", 2), ("optimizer", 1)) if stage >= needs]
            offloaded = (["optimizer"] if ds["offload_optimizer"] else []) + (["weights"] if ds["offload_param"] and stage >= 3 else [])
            scheme = f"zero-{stage}" if stage else ("ddp" if n > 1 else "single process")
        return {"scheme": scheme, "world_size": n, "divided": divided if n > 1 else [], "offloaded": offloaded}

    @property
    def backend(self) -> Backend:
        """How several processes share the training: DeepSpeed, FSDP2, plain DDP, or one process."""
        if self.env.deepspeed_config:
            return "deepspeed"
        if self.env.fsdp is not None:
            return "fsdp"
        return "ddp" if self.env.launcher != "in_process" and self.env.num_processes > 1 else "single"

    def parameters_sharded(self) -> bool:
        """Whether each rank holds only a shard of the parameters (ZeRO-3, FSDP): saving and forward passes
        after training must then run on every rank."""
        return self.zero_stage >= 3 or self.env.fsdp is not None

    def optimizer_offloaded(self) -> bool:
        """Whether optimizer states live in CPU memory (FSDP's cpu_offload, DeepSpeed's offload_optimizer)."""
        return "optimizer" in self.sharding()["offloaded"]

    def trainer_checkpointing(self) -> bool:
        """The Trainer's own gradient checkpointing: under FSDP checkpointing is FSDP's (fsdp_config), since the
        Trainer's would add an all-gather per block."""
        return self.env.gradient_checkpointing and self.env.fsdp is None

    def fsdp_arguments(self) -> dict[str, Any]:
        """The Trainer's `fsdp` / `fsdp_config` for the profile's FSDP2 settings (none without `fsdp`)."""
        fsdp = self.env.fsdp
        if fsdp is None:
            return {}
        return {
            "fsdp": True,
            "fsdp_config": {
                "version": 2,
                "reshard_after_forward": fsdp.reshard_after_forward,
                "cpu_offload": fsdp.cpu_offload,
                "state_dict_type": fsdp.state_dict_type,
                "activation_checkpointing": self.env.gradient_checkpointing,
                # Wrap each decoder block (the model's `_no_split_modules`), accelerate's default policy.
                "auto_wrap_policy": "TRANSFORMER_BASED_WRAP",
            },
        }

    def quant_storage_is_compute_dtype(self) -> bool:
        """A 4-bit base stores its packed weights in the compute dtype under FSDP (which shards only
        floating-point tensors of one dtype), as uint8 otherwise."""
        return self.env.fsdp is not None

    def _deepspeed_config(self) -> dict[str, Any] | None:
        path = deepspeed_config_path(self.env)
        return json.loads(path.read_text()) if path is not None else None


def hardware(env: EnvironmentProfile) -> Hardware:
    """The hardware decisions of `env`."""
    return Hardware(env)
