"""The demo's workloads: module-level, deterministic, cheap to check."""

from __future__ import annotations

import math
import time
from typing import Any, Callable


def _spin(seconds: float) -> None:
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        pass


def tiny(x: int) -> int:
    """About a microsecond of arithmetic."""
    return (x * 2654435761) % 4294967296


def heavy(x: int) -> float:
    """About 20 ms of CPU."""
    _spin(0.02)
    return math.sqrt(x)


def skewed(x: int) -> int:
    """Uneven work that grows along the list: 0.5 ms at the start, ~40 ms at the end of
    400 items (a cost that doubles every 57 items), so the first calls understate it."""
    _spin(0.0005 * 2 ** (x / 57))
    return x * x


DEMOS: list[tuple[str, Callable[[Any], Any], Callable[[float], list[int]], str]] = [
    ("tiny", tiny, lambda s: list(range(int(300_000 * s))),
     "~1 µs of arithmetic x {n:,} items"),
    ("heavy", heavy, lambda s: list(range(max(2, int(100 * s)))),
     "~20 ms of CPU x {n:,} items"),
    ("skewed", skewed, lambda s: list(range(max(2, int(400 * s)))),
     "0.5 ms per item at the start, 40 ms at the end of 400, x {n:,} items"),
]
