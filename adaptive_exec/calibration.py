"""This machine's overhead constants: their one owner (the loky backend measures them).

The planner's cost model needs three constants: how long a cold pool takes to answer,
what one task costs on a warm pool beyond its work, and what a byte costs to move
between processes. The start-up is measured every time a pool starts, by pings queued
ahead of the real work (free: the caller works through items meanwhile). The other two
are measured once per process, at the end of its first parallel map, when the pool and
the caller are idle (about 5 ms), and by ``python -m adaptive_exec calibrate``.

Until then the planner uses ``DEFAULTS``: values measured on the 2-core Linux machine
this project is developed on (loky 3.7, CPython 3.11), labelled as such in every plan.
"""

from __future__ import annotations

import os
import threading
from dataclasses import replace
from typing import Optional

from .records import Calibration

# Measured on the development machine (2 cores, python -m adaptive_exec calibrate and
# first maps): start-up 0.15-0.25 s, 0.2-0.4 ms per task, 2.5-3.2 ns per byte.
DEFAULTS = Calibration(
    worker_startup_s=0.20,
    task_overhead_s=3.0e-4,
    byte_cost_s=3.0e-9,
    n_workers=2,
    source="defaults (2-core development machine)",
)

_lock = threading.Lock()  # guards _current
_current: Optional[Calibration] = None


def _after_fork_in_child() -> None:
    # The parent's locks may have been held by a thread that did not come along: they
    # would never be released here. What they guard (this machine's constants) holds
    # for the child too, so the values are kept.
    global _lock
    _lock = threading.Lock()
    _stored.lock = threading.Lock()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


def current() -> Calibration:
    with _lock:
        return _current if _current is not None else DEFAULTS


def set_current(calib: Optional[Calibration]) -> None:
    global _current
    with _lock:
        _current = calib


def record_startup(startup_s: float, n_workers: int) -> None:
    """Keep a measured start-up; the other constants stay as they were."""
    global _current
    with _lock:
        base = _current or DEFAULTS
        _current = replace(base, worker_startup_s=startup_s, n_workers=n_workers,
                           source=_source(True, base.source.endswith("overheads measured")))


def record_overheads(overhead_s: float, byte_cost_s: float) -> None:
    global _current
    with _lock:
        base = _current or DEFAULTS
        _current = replace(base, task_overhead_s=overhead_s, byte_cost_s=byte_cost_s,
                           source=_source(base.measured, True))


def overheads_measured() -> bool:
    with _lock:
        return _current is not None and _current.source.endswith("overheads measured")


def _source(startup: bool, overheads: bool) -> str:
    if startup and overheads:
        return "measured in this process: start-up and overheads measured"
    if startup:
        return "measured in this process: start-up only, overheads from defaults"
    return "defaults for start-up, overheads measured"




# --- kept between processes (the cache holds the rows) -----------------------------------

class _Stored:
    """What was read from and written to the cache: read once per process, before the
    first decision that uses the constants; written when this process measured more."""

    def __init__(self) -> None:
        self.lock = threading.Lock()  # guards loaded and saved
        self.loaded = False
        self.saved: Optional[Calibration] = None


_stored = _Stored()


def get() -> Calibration:
    """This machine's constants: measured in this process, else measured earlier on this
    machine (read from the cache on first use), else the defaults."""
    with _stored.lock:
        if not _stored.loaded:
            _stored.loaded = True
            from . import cache

            stored = cache.load_calibration()
            if stored is not None and not current().measured:
                set_current(replace(stored, source="measured earlier on this machine "
                                                   "(cache): start-up and overheads measured"))
                _stored.saved = current()
    return current()


def save() -> None:
    """Keep a complete measurement for other processes, once."""
    now = current()
    with _stored.lock:
        if not overheads_measured() or now == _stored.saved:
            return
        _stored.saved = now
    from . import cache

    cache.store_calibration(now)
