"""What a multi-process training job needs beyond the Trainer.

Sharded parameters (DeepSpeed ZeRO-3, FSDP) live in pieces on every rank: saving the result gathers
them and every forward pass after training gathers them too, so those steps are collective (every
rank takes part, rank 0 writes). And each rank's share of the training state is reported, so a run
shows whether it really sharded: under ZeRO-3 or FSDP full-shard a rank holds about 1/world of the
parameters and optimizer states, under DDP all of them. Whether a profile shards is
`tasks/training/hardware.py`'s decision (`Hardware.parameters_sharded`).
"""

from __future__ import annotations

import os
from typing import Any



def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def _local_numel(tensor: Any) -> int:
    """Elements this rank holds of a parameter or optimizer state."""
    if hasattr(tensor, "ds_tensor"):  # DeepSpeed ZeRO-3: the rank's partition (the parameter itself is emptied)
        return int(tensor.ds_tensor.numel())
    if hasattr(tensor, "to_local"):  # FSDP2: a DTensor; its local shard
        return int(tensor.to_local().numel())
    return int(tensor.numel())


def _innermost_optimizer(optimizer: Any) -> Any:
    """The torch optimizer under accelerate's and DeepSpeed's wrappers (it holds the state tensors)."""
    seen = set()
    while hasattr(optimizer, "optimizer") and id(optimizer) not in seen:
        seen.add(id(optimizer))
        optimizer = optimizer.optimizer
    return optimizer


def rank_state(trainer: Any) -> dict[str, int]:
    """Bytes of parameters and optimizer state this rank holds after training."""
    import torch

    params = trainable = 0
    for param in trainer.model.parameters():
        size = _local_numel(param) * param.element_size()
        params += size
        if param.requires_grad:
            trainable += size
    optimizer_bytes = 0
    inner = _innermost_optimizer(trainer.optimizer) if trainer.optimizer is not None else None
    for state in getattr(inner, "state", {}).values():
        for value in state.values():
            if isinstance(value, torch.Tensor) and value.dim() > 0:  # not the scalar step counters
                optimizer_bytes += _local_numel(value) * value.element_size()
    return {
        "rank": int(os.environ.get("RANK", "0")),
        "parameter_bytes": params,
        "trainable_parameter_bytes": trainable,
        "optimizer_state_bytes": optimizer_bytes,
    }


def per_rank_state(trainer: Any) -> list[dict[str, int]]:
    """`rank_state` of every rank, in rank order (a collective: every rank calls it)."""
    import torch.distributed as dist

    mine = rank_state(trainer)
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return [mine]
    gathered: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, mine)
    return sorted(gathered, key=lambda entry: entry["rank"])
