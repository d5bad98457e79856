"""Name → stage. Imports are lazy: stage modules pull in heavy libraries (torch, GX)."""

from __future__ import annotations

import importlib
from functools import cache

from tasks.stage import Stage

_STAGES: dict[str, tuple[str, str]] = {
    "data": ("tasks.data", "DataStage"),
    "base_model": ("tasks.base_model", "BaseModelStage"),
    "pretrain": ("tasks.pretrain", "PretrainStage"),
    "sft": ("tasks.sft", "SFTStage"),
    "reward": ("tasks.reward", "RewardStage"),
    "align": ("tasks.align", "AlignStage"),
    "evaluate": ("tasks.evaluate", "EvaluateStage"),
    "export": ("tasks.export", "ExportStage"),
    "deploy": ("tasks.deploy", "DeployStage"),
}


def register_stage(name: str, module: str, cls: str) -> None:
    """Add a stage by import path (plugins, tests); the name must be new."""
    if name in _STAGES and _STAGES[name] != (module, cls):
        raise ValueError(f"stage {name!r} is already registered as {_STAGES[name]}")
    _STAGES[name] = (module, cls)


@cache
def get_stage(name: str) -> Stage:
    try:
        module, cls = _STAGES[name]
    except KeyError:
        raise KeyError(f"unknown stage {name!r}; stages: {', '.join(_STAGES)}") from None
    return getattr(importlib.import_module(module), cls)()
