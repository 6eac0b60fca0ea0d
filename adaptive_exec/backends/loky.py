"""The loky process pool, kept warm between maps.

Start method: measured on the 2-core development machine (cold start to the first
result, CPython 3.11, loky 3.7): "loky" (fork+exec) 0.15-0.19 s, "spawn" 0.13-0.17 s,
"forkserver" 0.14 s, "loky_init_main" 0.17-0.19 s; "fork" is refused by loky's reusable
executor. All are within noise of each other; forkserver and loky_init_main re-import
the user's ``__main__`` in the workers, which breaks a script without an
``if __name__ == "__main__"`` guard, so we keep loky's default: it never runs the user's
script again, and cloudpickle sends functions defined there by value.

loky keeps one reusable executor per thread; resizing it waits for pending work. We
never shrink it during a process: a plan that wants fewer workers keeps fewer chunks
in flight instead (see dispatch).
"""

from __future__ import annotations

import threading
import time
from typing import Any

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


_state = _PoolState()


def _worker_env(n_workers: int) -> dict[str, str]:
    env = {ENV_IN_WORKER: "1"}
    # One BLAS/OpenMP thread per worker: W workers x all-cores BLAS pools would
    # oversubscribe the machine (issue 6 revisits this for numpy workloads).
    for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        env[var] = "1"
    return env


def _get(n_workers: int) -> tuple[Any, bool, float]:
    """(executor, cold, created_or_reused_at) with at least ``n_workers`` workers."""
    import loky

    with _state.lock:
        size = max(n_workers, _state.size)
        now = time.perf_counter()
        executor = loky.get_reusable_executor(
            max_workers=size, timeout=IDLE_TIMEOUT_S, env=_worker_env(size)
        )
        cold = (
            executor is not _state.executor
            or not _state.warm
            or now - _state.last_used > IDLE_TIMEOUT_S * 0.9
        )
        if executor is not _state.executor:
            _state.executor = executor
            _state.size = size
        if cold:
            _state.warm = False
        _state.last_used = now
        return executor, cold, now


def get_executor(n_workers: int) -> tuple[Any, bool, float]:
    return _get(n_workers)


def fresh_executor(n_workers: int) -> tuple[Any, float]:
    """A newly started pool (for calibration): the old one's workers are ended."""
    import loky

    with _state.lock:
        if _state.executor is not None:
            _state.executor.shutdown(wait=True, kill_workers=True)
        _state.executor = None
        _state.warm = False
        _state.size = 0
    executor, _, created = _get(n_workers)
    # Submitting anything starts the workers; the clock started before that.
    del loky
    return executor, created


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
            _state.last_used = time.perf_counter()


def mark_broken(executor: Any) -> None:
    """Forget a pool that lost a worker: loky rebuilds it on the next request."""
    with _state.lock:
        if executor is _state.executor:
            _state.warm = False


def shutdown() -> None:
    """End the pool's workers now (tests, and interpreter exit through loky itself)."""
    with _state.lock:
        executor = _state.executor
        _state.executor = None
        _state.warm = False
        _state.size = 0
    if executor is not None:
        executor.shutdown(wait=True, kill_workers=True)


def pool_size() -> int:
    with _state.lock:
        return _state.size
