"""Remembered features, per function fingerprint (and per machine).

The interface the rest of the library uses; the store behind it is in-process for now
(the persistent SQLite store of issue 4 replaces ``_Memory``, keeping these functions).
The cache is advisory: nothing here may fail a map. Every function swallows its own
errors and answers "nothing cached".
"""

from __future__ import annotations

import dataclasses
import statistics
import threading
import time
from dataclasses import dataclass
from typing import Optional

from .calibration import Calibration
from .sampling import Features

# An observed per-item time this far from the remembered one replaces it.
REFRESH_RATIO = 2.0
# Past runs kept per function, and used to correct the planner.
HISTORY = 20
HISTORY_USED = 5


@dataclass(frozen=True)
class RunRecord:
    """One map, as planned and as it went."""

    n_items: int
    mode: str
    n_workers: int
    chunksize: int
    estimated_s: float  # the plan's estimate for the mode it chose
    actual_s: float
    at: float = 0.0  # time.time() of the run


@dataclass(frozen=True)
class Entry:
    features: Features
    module: str
    qualname: str
    runs: tuple[RunRecord, ...] = ()
    hits: int = 0

    def parallel_correction(self) -> float:
        """How much parallel runs of this function took over their estimate (median of
        the last few; 1.0 without history). Never below 1: a lucky run must not make
        the next plan bolder than the model."""
        ratios = [r.actual_s / r.estimated_s for r in self.runs[-HISTORY_USED:]
                  if r.mode == "parallel" and r.estimated_s > 0 and r.actual_s > 0]
        if not ratios:
            return 1.0
        return max(1.0, statistics.median(ratios))


class _Memory:
    """The in-process store."""

    def __init__(self) -> None:
        self.lock = threading.Lock()  # guards entries and calibration
        self.entries: dict[str, Entry] = {}
        self.calibration: Optional[Calibration] = None


_store = _Memory()


def lookup(key: str) -> Optional[Entry]:
    with _store.lock:
        entry = _store.entries.get(key)
        if entry is not None:
            entry = dataclasses.replace(entry, hits=entry.hits + 1)
            _store.entries[key] = entry
        return entry


def observe(
    key: str,
    *,
    module: str,
    qualname: str,
    sampled: Optional[Features],
    observed_item_s: Optional[float],
    run: Optional[RunRecord],
) -> None:
    """After a run (or a plan): keep what sampling measured, correct the per-item time
    when the run saw something else (beyond REFRESH_RATIO), and add the run's record."""
    with _store.lock:
        old = _store.entries.get(key)
        features = sampled if sampled is not None else (old.features if old else None)
        if features is None:
            return
        if observed_item_s is not None and observed_item_s > 0 and features.mean_s > 0:
            ratio = observed_item_s / features.mean_s
            if ratio > REFRESH_RATIO or ratio < 1 / REFRESH_RATIO:
                features = dataclasses.replace(features, mean_s=observed_item_s)
        runs = old.runs if old else ()
        if run is not None:
            runs = (*runs, dataclasses.replace(run, at=time.time()))[-HISTORY:]
        _store.entries[key] = Entry(features, module, qualname, runs, old.hits if old else 0)


def load_calibration() -> Optional[Calibration]:
    with _store.lock:
        return _store.calibration


def store_calibration(calib: Calibration) -> None:
    with _store.lock:
        _store.calibration = calib


def clear() -> None:
    with _store.lock:
        _store.entries.clear()
        _store.calibration = None
