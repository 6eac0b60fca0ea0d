"""This machine's overhead constants, measured on a real pool.

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
import time
from dataclasses import asdict, dataclass, replace
from typing import Any, Optional

_BYTES_PROBE = 2 << 20  # 2 MiB: large enough that per-task overhead is noise next to it
_N_NOOPS = 16


@dataclass(frozen=True)
class Calibration:
    worker_startup_s: float  # cold pool: creation to every worker having answered
    task_overhead_s: float  # one task's round trip on a warm pool, beyond its work
    byte_cost_s: float  # seconds per byte pickled, sent and unpickled between processes
    n_workers: int  # the pool size the start-up was measured with
    source: str  # "defaults (2-core development machine)" or "measured in this process"

    @property
    def measured(self) -> bool:
        """The start-up was measured on this machine (the other constants may not be)."""
        return self.source.startswith("measured")

    def startup_for(self, n_workers: int) -> float:
        # Workers start in parallel, but each costs a fork+exec and imports; on the
        # 16-core machine of DESIGN.md 16 workers took ~2.5x as long as 2 did.
        extra = max(0, n_workers - self.n_workers) / max(1, self.n_workers)
        return self.worker_startup_s * (1.0 + 0.1 * extra)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


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
    # The parent's lock may have been held by a thread that did not come along: it
    # would never be released here. What it guards (this machine's constants) holds
    # for the child too, so _current is kept.
    global _lock
    _lock = threading.Lock()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


def current() -> Calibration:
    with _lock:
        return _current if _current is not None else DEFAULTS


def set_current(calib: Optional[Calibration]) -> None:
    global _current
    with _lock:
        _current = calib


# --- the tasks run in workers (module-level so they pickle by reference) ---


def _ping(delay: float) -> int:
    # A short sleep keeps one worker from answering every ping, so that all workers
    # must be up before every ping is answered.
    time.sleep(delay)
    return os.getpid()


def _noop(x: int) -> int:
    return x


def _bytes_of(n: int) -> bytes:
    return bytes(n)


def measure_overheads(executor: Any, n_workers: int) -> tuple[float, float]:
    """(per-task overhead, per-byte cost) on a warm, idle pool.

    Run when the caller is idle too: a caller busy in Python holds the GIL that loky's
    feeder thread needs, which would inflate every round trip measured here.
    """
    t0 = time.perf_counter()
    futures = [executor.submit(_noop, i) for i in range(_N_NOOPS)]
    for f in futures:
        f.result()
    # The no-ops ran n_workers at a time: per task, each worker paid elapsed/_N_NOOPS*W.
    overhead = (time.perf_counter() - t0) * n_workers / _N_NOOPS
    t0 = time.perf_counter()
    executor.submit(_bytes_of, _BYTES_PROBE).result()
    byte_cost = max(0.0, time.perf_counter() - t0 - overhead) / _BYTES_PROBE
    return overhead, max(byte_cost, 1e-11)


class StartupProbe:
    """Pings submitted to a cold pool ahead of real work: when every ping has answered,
    the pool is up, and the time it took is the start-up cost. Callbacks run on loky's
    thread; ``first`` lets the caller stop working through items as soon as any worker
    is ready."""

    def __init__(self, executor: Any, n_workers: int, created_at: float):
        self.created_at = created_at
        self.first = threading.Event()
        self._lock = threading.Lock()  # guards _left and startup_s
        self._left = n_workers
        self.startup_s: Optional[float] = None
        for _ in range(n_workers):
            executor.submit(_ping, 0.005).add_done_callback(self._done)

    def _done(self, fut: Any) -> None:
        now = time.perf_counter()
        self.first.set()
        if fut.cancelled() or fut.exception() is not None:
            return
        with self._lock:
            self._left -= 1
            if self._left == 0:
                self.startup_s = now - self.created_at


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


def calibrate(n_workers: Optional[int] = None) -> Calibration:
    """Start a fresh pool, measure it, keep the result for this process, and return it."""
    from .backends import loky as loky_backend
    from .system import usable_cpus

    w = n_workers or usable_cpus()
    executor, created_at = loky_backend.fresh_executor(w)
    probe = loky_backend.current_probe(executor) or StartupProbe(executor, w, created_at)
    executor.submit(_noop, 0).result()
    deadline = time.perf_counter() + 60
    while probe.startup_s is None and time.perf_counter() < deadline:
        time.sleep(0.001)
    if probe.startup_s is not None:
        record_startup(probe.startup_s, w)
    loky_backend.mark_warm(executor)
    record_overheads(*measure_overheads(executor, w))
    return current()
