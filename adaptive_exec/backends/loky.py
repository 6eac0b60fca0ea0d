"""The loky process pool, kept warm between maps.

Start method: measured on the 2-core development machine (cold start to the first
result, CPython 3.11, loky 3.7): "loky" (fork+exec) 0.15-0.19 s, "spawn" 0.13-0.17 s,
"forkserver" 0.14 s, "loky_init_main" 0.17-0.19 s; "fork" is refused by loky's reusable
executor. All are within noise of each other; forkserver and loky_init_main re-import
the user's ``__main__`` in the workers, which breaks a script without an
``if __name__ == "__main__"`` guard, so we keep loky's default: it never runs the user's
script again, and cloudpickle sends functions defined there by value.

One pool per process, shared by every thread: loky's ``get_reusable_executor`` keeps
one executor per thread, and a pool started ahead from a helper thread (see
``prestart``) then came back as a second pool, four workers on two cores (measured:
the heavy workload went from 1.2 s to 2.1 s). So we hold a ``loky.ProcessPoolExecutor``
ourselves and reuse it between maps. It is rebuilt only when broken or too small, and
never shrunk during a process: a plan that wants fewer workers keeps fewer chunks in
flight instead (see dispatch).
"""

from __future__ import annotations

import atexit
import threading
import time
from typing import Any, Optional

from ..system import ENV_IN_WORKER

# Workers idle this long exit; a map a few minutes later then pays start-up again.
IDLE_TIMEOUT_S = 300


class _PoolState:
    """The executor we last used and whether its workers are known to be up."""

    def __init__(self) -> None:
        self.lock = threading.Lock()  # guards every field below
        self.executor: Any = None
        self.size = 0
        self.warm = False
        self.last_used = 0.0
        self.probe: Any = None  # the StartupProbe of a pool started ahead of its map
        # When a start ahead began (perf_counter): importing loky and spawning take a
        # while on a thread that shares the GIL with the caller, and the planner counts
        # the start-up from here, not from when the probe exists.
        self.starting_at: Optional[float] = None


_state = _PoolState()


def _worker_env(n_workers: int) -> dict[str, str]:
    env = {ENV_IN_WORKER: "1"}
    # One BLAS/OpenMP thread per worker: W workers x all-cores BLAS pools would
    # oversubscribe the machine (issue 6 revisits this for numpy workloads).
    for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        env[var] = "1"
    return env


def _is_broken(executor: Any) -> bool:
    flags = getattr(executor, "_flags", None)  # loky's own state; absent: assume fine
    return bool(flags is not None and (getattr(flags, "broken", None)
                                       or getattr(flags, "shutdown", False)))


def _get(n_workers: int) -> tuple[Any, bool, float]:
    """(executor, cold, created_or_reused_at) with at least ``n_workers`` workers.

    A cold pool gets its start-up probe (pings queued ahead of any work) here, under
    the same lock, so that a pool started ahead by one thread and used by another is
    probed once.
    """
    import loky

    from ..calibration import StartupProbe

    with _state.lock:
        now = time.perf_counter()
        old = _state.executor
        broken = old is not None and _is_broken(old)
        if old is None or broken or _state.size < n_workers:
            if old is not None and not broken:
                old.shutdown(wait=False)  # a larger pool is wanted; the old one drains
            size = max(n_workers, 0 if broken else _state.size)
            _state.executor = loky.ProcessPoolExecutor(
                max_workers=size, timeout=IDLE_TIMEOUT_S, env=_worker_env(size)
            )
            _state.size = size
            _state.warm = False
            _state.probe = None
            _register_exit()
        cold = not _state.warm or now - _state.last_used > IDLE_TIMEOUT_S * 0.9
        if cold:
            _state.warm = False
            if _state.probe is None:
                _state.probe = StartupProbe(_state.executor, _state.size, now)
        _state.last_used = now
        return _state.executor, cold, now


_exit_registered = False


def _register_exit() -> None:
    # Caller holds _state.lock. Workers also exit when this process dies; this just
    # ends them promptly and quietly at a normal interpreter exit.
    global _exit_registered
    if not _exit_registered:
        _exit_registered = True
        atexit.register(shutdown)


def get_executor(n_workers: int) -> tuple[Any, bool, float]:
    return _get(n_workers)


def fresh_executor(n_workers: int) -> tuple[Any, float]:
    """A newly started pool (for calibration): the old one's workers are ended."""
    shutdown()
    executor, _, created = _get(n_workers)
    return executor, created


def prestart(n_workers: int) -> None:
    """Start the pool's workers now, ahead of a map that will probably want them: the
    caller keeps working meanwhile, so on a machine with a free core this is nearly free.
    The map that uses the pool then finds its probe (``current_probe``)."""
    with _state.lock:
        if _state.starting_at is None:
            _state.starting_at = time.perf_counter()
    try:
        _get(n_workers)
    finally:
        with _state.lock:
            _state.starting_at = None


def current_probe(executor: Any) -> Any:
    """The start-up probe of ``executor`` while it is cold, else None."""
    with _state.lock:
        if executor is _state.executor and not _state.warm:
            return _state.probe
        return None


def startup_left(full_startup_s: float, n_workers: int) -> float:
    """Seconds until a pool of ``n_workers`` can take work: 0 when warm, the rest of the
    start-up when one was started ahead, else all of it."""
    if is_warm(n_workers):
        return 0.0
    with _state.lock:
        probe = _state.probe
        if probe is not None and _state.size >= n_workers:
            if probe.first.is_set():
                return 0.0
            return max(0.0, full_startup_s - (time.perf_counter() - probe.created_at))
        if _state.starting_at is not None:
            return max(0.0, full_startup_s - (time.perf_counter() - _state.starting_at))
    return full_startup_s


def is_warm(n_workers: int) -> bool:
    with _state.lock:
        return (
            _state.executor is not None
            and _state.warm
            and _state.size >= n_workers
            and time.perf_counter() - _state.last_used < IDLE_TIMEOUT_S * 0.9
        )


def mark_warm(executor: Any) -> None:
    with _state.lock:
        if executor is _state.executor:
            _state.warm = True
            _state.probe = None
            _state.last_used = time.perf_counter()


def mark_broken(executor: Any) -> bool:
    """End a pool that lost a worker (or must lose one: a time-out, Ctrl-C) and forget it:
    the next request builds a new one. False when it was already forgotten."""
    with _state.lock:
        if executor is not _state.executor:
            return False
        _state.executor = None
        _state.warm = False
        _state.size = 0
        _state.probe = None
    executor.shutdown(wait=False, kill_workers=True)
    return True


def shutdown() -> None:
    """End the pool's workers now (tests, and interpreter exit through loky itself)."""
    with _state.lock:
        executor = _state.executor
        _state.executor = None
        _state.warm = False
        _state.size = 0
        _state.probe = None
    if executor is not None:
        executor.shutdown(wait=True, kill_workers=True)


def worker_pids() -> list[int]:
    """Process ids of the pool's workers (their CPU is ours, not load)."""
    with _state.lock:
        executor = _state.executor
    processes = getattr(executor, "_processes", None) or {}
    return list(processes)


def worker_rss() -> Optional[int]:
    """Mean resident bytes of the pool's workers now, or None without a pool."""
    from ..system import process_rss

    sizes = [s for s in (process_rss(pid) for pid in worker_pids()) if s]
    return int(sum(sizes) / len(sizes)) if sizes else None


def pool_size() -> int:
    with _state.lock:
        return _state.size
