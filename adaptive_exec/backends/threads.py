"""Threads of this process: for functions that mostly wait (I/O, sleeps, locks)."""

from __future__ import annotations

import concurrent.futures as cf
from typing import Any, Callable, Optional

from ..worker import ChunkResult, run_items


class ThreadTarget:
    """Chunks go to threads of this process: nothing is pickled, nothing can die."""

    remote = False

    def __init__(self, func: Callable[..., Any], star: bool):
        self.func = func
        self.star = star
        self.n_workers = 0

    def open(self, n_workers: int) -> tuple[Any, None]:
        self.n_workers = n_workers
        return cf.ThreadPoolExecutor(n_workers, thread_name_prefix="adaptive_exec"), None

    def capacity(self) -> int:
        return self.n_workers

    def submit(self, executor: Any, chunk: list[Any], start: int, full: bool = False
               ) -> cf.Future:
        return executor.submit(run_items, self.func, start, chunk, self.star)

    def decode(self, res: ChunkResult) -> tuple[list[Any], Optional[BaseException]]:
        return res.results, res.error

    def is_death(self, exc: BaseException) -> bool:
        return False

    def describe_death(self, exc: BaseException) -> tuple[Optional[int], str]:
        return None, str(exc)

    def recover(self, executor: Any, failed: Any, n_workers: int) -> tuple[Any, bool]:
        return executor, False

    def cancel(self, fut: cf.Future, executor: Any) -> None:
        fut.cancel()

    def finish(self, executor: Any, probe: Any) -> None:
        pass

    def check(self, executor: Any) -> None:
        pass  # threads do not die unseen

    def close(self, executor: Any, clean: bool, interrupted: bool = False) -> None:
        # Threads cannot be stopped: after an error the running ones finish first; after
        # Ctrl-C they finish in the background and control returns at once.
        executor.shutdown(wait=not interrupted, cancel_futures=True)
