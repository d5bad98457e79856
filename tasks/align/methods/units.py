"""Every align method's unit, by `align.method.name`.

A new method is its module here (its config class, a subclass of `AlignMethodConfig`, and its
unit: trainer and step metrics) plus one `register` line below; the schema then accepts it by
name and `tasks/align/train.py` runs it like any other.
"""

from __future__ import annotations

from typing import Any

from tunepipe.schemas.align import register_align_method
from tunepipe.tasks.align.methods import dpo, grpo, kto, orpo, ppo, rloo
from tunepipe.tasks.align.methods.base import AlignMethodUnit, AlignRun

UNITS: dict[str, AlignMethodUnit] = {}


def register(unit: AlignMethodUnit) -> AlignMethodUnit:
    """Make `unit` the trainer of its method's name, and let `align.method` accept that name."""
    register_align_method(unit.config_cls)
    UNITS[unit.name] = unit
    return unit


def unit_for(method: Any) -> AlignMethodUnit:
    """The unit of `align.method`."""
    return UNITS[method.name]


register(dpo.UNIT)
register(kto.UNIT)
register(orpo.UNIT)
register(ppo.UNIT)
register(grpo.UNIT)
register(rloo.UNIT)

__all__ = ["AlignMethodUnit", "AlignRun", "UNITS", "register", "unit_for"]
