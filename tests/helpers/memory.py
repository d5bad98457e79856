"""Peak Python allocations of one call, for the data engines' memory-per-record tests."""

from __future__ import annotations

import tracemalloc
from typing import Callable


def traced_peak(call: Callable[[], object]) -> int:
    """Peak bytes traced by tracemalloc (numpy's buffers included) while `call` runs."""
    tracemalloc.start()
    try:
        call()
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
