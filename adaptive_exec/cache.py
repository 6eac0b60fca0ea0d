"""Remembered features, per function fingerprint.

For now an in-process store: a second map of the same function in this process plans
at once, without sampling. The persistent SQLite store (issue 4) goes behind the same
two functions. The cache is advisory: nothing here may fail a map.
"""

from __future__ import annotations

import dataclasses
import threading
from typing import Optional

from .sampling import Features

# An observed per-item time this far from the remembered one replaces it.
REFRESH_RATIO = 2.0

_lock = threading.Lock()  # guards _entries
_entries: dict[str, Features] = {}


def lookup(key: str) -> Optional[Features]:
    with _lock:
        return _entries.get(key)


def record(key: str, features: Features) -> None:
    with _lock:
        _entries[key] = features


def observe(key: str, sampled: Optional[Features], observed_item_s: Optional[float]) -> None:
    """After a run: keep what sampling measured, and correct the per-item time when the
    run itself saw something else (REFRESH_RATIO)."""
    with _lock:
        entry = _entries.get(key) or sampled
        if entry is None:
            return
        if observed_item_s is not None and observed_item_s > 0 and entry.mean_s > 0:
            ratio = observed_item_s / entry.mean_s
            if ratio > REFRESH_RATIO or ratio < 1 / REFRESH_RATIO:
                entry = dataclasses.replace(entry, mean_s=observed_item_s)
        _entries[key] = entry


def clear() -> None:
    with _lock:
        _entries.clear()
