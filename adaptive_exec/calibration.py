"""This machine's overhead constants: their one owner (the loky backend measures them).

The planner's cost model needs three constants: how long a cold pool takes to answer,
what one task costs on a warm pool beyond its work, and what a byte costs to move
between processes. The start-up is measured every time a pool starts, by pings queued
ahead of the real work (free: the caller works through items meanwhile). The other two
are measured once per process, at the end of its first parallel map, when the pool and
the caller are idle (about 5 ms), and by ``python -m adaptive_exec calibrate``.

Until then the planner uses ``DEFAULTS``: values measured on the 2-core Linux machine
this project is developed on (loky 3.7, CPython 3.11), labelled as such in every plan.

The start-up depends on how the workers would be started (backends/starts.py): forked
by the caller, forked by the template, or by loky's fork+exec. Each path's start-up is
kept on its own (in the cache, as a row of its own), and ``get()`` answers with the one
of the path a pool started now would take: a threaded caller whose template is not up
yet pays the template's own start too.
"""

from __future__ import annotations

import os
import threading
from dataclasses import replace
from typing import Optional

from .backends import starts
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

# Start-up to every worker's first answer, 2 workers, per start path, measured on the
# development machine (python -m benchmarks.startup, medians): fork ~20 ms, template
# ~30 ms once it is up, loky's fork+exec 0.11-0.16 s (0.15-0.25 s under a first map).
STARTUP_DEFAULTS = {starts.FORK: 0.03, starts.TEMPLATE: 0.05,
                    starts.EXEC: DEFAULTS.worker_startup_s}
# The template's own start (an interpreter that imports loky and us), paid once by the
# first pool of a threaded caller: about what a fork+exec worker costs.
TEMPLATE_OWN_START_S = 0.12

_lock = threading.Lock()  # guards _current and _startups
_current: Optional[Calibration] = None
# Start-ups measured (in this process, or earlier and read from the cache), per path:
# (seconds, pool size). The exec path's lives in _current, as it always has.
_startups: dict[str, tuple[float, int]] = {}


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
    """The constants as measured (loky's own start-up: ``get`` picks a path's)."""
    with _lock:
        return _current if _current is not None else DEFAULTS


def set_current(calib: Optional[Calibration]) -> None:
    global _current
    with _lock:
        _current = calib


# A start-up measured during a map follows the earlier one by this share of the
# difference: a slow start (a busy moment: 465 ms once, where calibrate measures
# 101-136 ms) raises it a quarter of the way, a cheaper one (a quieter machine, a warm
# template) lowers it half the way. A choice: a few starts converge, one does not rule.
RISE_SHARE = 0.25
FALL_SHARE = 0.5


def _follow(previous: Optional[tuple[float, int]], startup_s: float, n_workers: int
            ) -> float:
    """``startup_s`` for ``n_workers``, smoothed against ``previous`` (seconds, pool
    size) measured before, taken as it is when there is none."""
    if previous is None:
        return startup_s
    before = Calibration(previous[0], 0.0, 0.0, previous[1], "").startup_for(n_workers)
    share = RISE_SHARE if startup_s > before else FALL_SHARE
    return before + share * (startup_s - before)


def record_startup(startup_s: float, n_workers: int, path: str = starts.EXEC,
                   smooth: bool = True) -> None:
    """Keep a start-up measured on ``path``; the other constants stay as they were.
    ``smooth``: a start seen during a map follows the ones measured before
    (``_follow``); calibrate's own measurement replaces them."""
    global _current
    with _lock:
        base = _current or DEFAULTS
        if smooth:
            if path == starts.EXEC:
                previous = ((base.worker_startup_s, base.n_workers) if base.measured
                            else None)
            else:
                previous = _startups.get(path)
            startup_s = _follow(previous, startup_s, n_workers)
        if path == starts.EXEC:
            base = replace(base, worker_startup_s=startup_s, n_workers=n_workers)
        else:
            _startups[path] = (startup_s, n_workers)
        # ``source`` speaks of the record's own start-up, loky's (exec): another path's
        # start-up is kept beside it, and does not make that one measured.
        _current = replace(base, source=_source(path == starts.EXEC or base.measured,
                                                base.source.endswith("overheads measured")))


def _for_path(calib: Calibration, path: str) -> Calibration:
    """``calib`` with the start-up of ``path`` (caller holds _lock)."""
    source = calib.source
    if path == starts.EXEC:
        startup, n = calib.worker_startup_s, calib.n_workers
    else:
        startup, n = _startups.get(path, (STARTUP_DEFAULTS[path], 2))
        # What ``source`` says of the start-up is said of this path's.
        overheads = source.endswith("overheads measured")
        if path in _startups and overheads:
            where = ("measured earlier on this machine (cache)"
                     if source.startswith("measured earlier") else "measured in this process")
            source = f"{where}: start-up and overheads measured"
        elif path not in _startups:
            source = _source(False, overheads)
    if path == starts.TEMPLATE and starts.template_pid() is None:
        startup += TEMPLATE_OWN_START_S
    return replace(calib, worker_startup_s=startup, n_workers=n, start_path=path,
                   source=source)


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
    if overheads:
        return "defaults for start-up, overheads measured"
    return DEFAULTS.source




# --- kept between processes (the cache holds the rows) -----------------------------------

class _Stored:
    """What was read from and written to the cache: read once per process, before the
    first decision that uses the constants; written when this process measured more."""

    def __init__(self) -> None:
        self.lock = threading.Lock()  # guards loaded and saved
        self.loaded = False
        self.saved: Optional[Calibration] = None
        self.saved_paths: dict[str, tuple[float, int]] = {}


_stored = _Stored()


def get(path: Optional[str] = None) -> Calibration:
    """This machine's constants: measured in this process, else measured earlier on this
    machine (read from the cache on first use), else the defaults; with the start-up of
    ``path`` (default: the path a pool started now, from this thread, would take)."""
    with _stored.lock:
        if not _stored.loaded:
            _stored.loaded = True
            from . import cache

            paths = {_path_key(other): other for other in (starts.FORK, starts.TEMPLATE)}
            rows = cache.load_calibrations([cache.machine_id(), *paths])
            stored = rows.get(cache.machine_id())
            if stored is not None and not current().measured:
                # Said as it was stored: loky's start-up may be the default there, when
                # only another path's was measured.
                what = ("start-up and overheads measured" if stored.measured
                        else "defaults for start-up, overheads measured")
                set_current(replace(stored, source="measured earlier on this machine "
                                                   f"(cache): {what}"))
                _stored.saved = current()
            for key, other in paths.items():
                row = rows.get(key)
                if row is not None:
                    with _lock:
                        _startups.setdefault(other, (row.worker_startup_s, row.n_workers))
                    _stored.saved_paths[other] = (row.worker_startup_s, row.n_workers)
    with _lock:
        return _for_path(_current or DEFAULTS, path or starts.choose())


def _path_key(path: str) -> str:
    """The cache row that holds ``path``'s start-up on this machine."""
    from .cache import machine_id

    return f"{machine_id()} start={path}"


def save() -> None:
    """Keep a complete measurement for other processes, once; and each path's start-up."""
    now = current()
    with _lock:
        paths = dict(_startups)
    with _stored.lock:
        todo = {p: v for p, v in paths.items() if _stored.saved_paths.get(p) != v}
        _stored.saved_paths.update(todo)
        main = overheads_measured() and now != _stored.saved
        if main:
            _stored.saved = now
    from . import cache

    if main:
        cache.store_calibration(now)
    for path, (startup, n) in todo.items():
        cache.store_calibration(replace(now, worker_startup_s=startup, n_workers=n),
                                _path_key(path))
