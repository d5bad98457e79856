"""Stage name → Stage object, from the graph declared in `schemas/graph.py`.

Imports are lazy: stage modules pull in heavy libraries (torch, GX). Every pipeline stage lives
at `tunepipe.tasks.<name>.stage`; plugins and tests add stages from elsewhere with
`register_stage`.
"""

from __future__ import annotations

import importlib
from functools import cache

from tunepipe.schemas.graph import STAGE_GRAPH
from tunepipe.tasks.core.stage import Stage

_EXTRA_STAGES: dict[str, tuple[str, str]] = {}


def stage_location(name: str) -> tuple[str, str]:
    """(module, class) of a stage."""
    if name in STAGE_GRAPH:
        return f"tunepipe.tasks.{name}.stage", STAGE_GRAPH[name].stage_class
    try:
        return _EXTRA_STAGES[name]
    except KeyError:
        raise KeyError(f"unknown stage {name!r}; stages: {', '.join([*STAGE_GRAPH, *_EXTRA_STAGES])}") from None


def register_stage(name: str, module: str, cls: str) -> None:
    """Add a stage by import path (plugins, tests); the name must be new."""
    if name in STAGE_GRAPH or (name in _EXTRA_STAGES and _EXTRA_STAGES[name] != (module, cls)):
        raise ValueError(f"stage {name!r} is already registered as {stage_location(name)}")
    _EXTRA_STAGES[name] = (module, cls)


@cache
def get_stage(name: str) -> Stage:
    module, cls = stage_location(name)
    return getattr(importlib.import_module(module), cls)()
