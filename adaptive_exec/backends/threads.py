"""Threads of this process: for functions that mostly wait (I/O, sleeps, locks)."""

from __future__ import annotations

import concurrent.futures as cf
import contextvars
import queue
import sys
import threading
from typing import Any, Callable, Optional

from ..worker import ChunkResult, run_items


class ThreadTarget:
    """Chunks go to threads of this process: nothing is pickled, nothing can die."""

    remote = False

    def __init__(self, func: Callable[..., Any], star: bool,
                 context: Optional[contextvars.Context] = None):
        self.func = func
        self.star = star
        self.n_workers = 0
        # The context chunks run in a copy of: the submitting thread's when None. Items
        # sent ahead by the sampling watch's thread (adapt.SamplingWatch) run in the
        # caller's, captured at the map's start; the map then sets it back to None.
        self.context = context
        self._executor: Optional[DaemonThreads] = None

    def open(self, n_workers: int) -> tuple[Any, None]:
        # The threads items were sent ahead to serve the rest of the map too: their
        # chunks in flight are the run's, and end with its close.
        self.n_workers = n_workers
        if self._executor is None or self._executor.is_shut():
            self._executor = DaemonThreads(n_workers)
        else:
            self._executor.resize(n_workers)
        return self._executor, None

    def capacity(self) -> int:
        return self.n_workers

    def submit(self, executor: Any, chunk: list[Any], start: int, full: bool = False
               ) -> cf.Future:
        # In a copy of the caller's context, as the loop runs: a decimal context set
        # there (decimal.localcontext, getcontext().prec) and the caller's ContextVars
        # hold in the threads too (a threading.local cannot: README, "Equal to the loop").
        # The copy shares the values: the decimal context, which the function may change
        # (getcontext().prec = ...), is copied itself, one per chunk, or threads changing
        # it raced (283 of 300 results wrong).
        ctx = contextvars.copy_context() if self.context is None else self.context.copy()
        decimal = sys.modules.get("decimal")
        if decimal is not None:
            ctx.run(_own_decimal_context, decimal)
        return executor.submit(ctx.run, run_items, self.func, start, chunk, self.star)

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
        # Threads cannot be stopped. After an item's error or Ctrl-C, control returns at
        # once and the items still running finish in the background (an error waited for
        # unrelated later items, which the loop never runs: 10.6 s for one raised at
        # 1.6 s); nothing queued behind them runs.
        executor.shutdown(wait=clean, cancel_futures=True)


def _own_decimal_context(decimal: Any) -> None:
    # Inside the chunk's context: a copy of the decimal context found there.
    decimal.setcontext(decimal.getcontext().copy())


_STOP = object()


class DaemonThreads:
    """A thread pool whose threads never hold up the interpreter's exit: after Ctrl-C
    the program exits as the loop's would, where concurrent.futures' pool joins its
    threads at exit, each running its item to the end (an item blocked on a socket with
    no timeout held the exit for good). Threads start as work comes, up to
    ``n_threads``, as concurrent.futures' do. The subset of its interface the run uses:
    submit and shutdown."""

    def __init__(self, n_threads: int):
        self._work: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._n = max(1, n_threads)
        self._lock = threading.Lock()  # guards the fields below
        self._shut = False
        self._idle = 0  # threads waiting for work
        self._queued = 0  # work no thread has taken yet
        self._threads: list[threading.Thread] = []

    def submit(self, fn: Callable[..., Any], *args: Any) -> cf.Future:
        fut: cf.Future = cf.Future()
        with self._lock:
            if self._shut:
                raise RuntimeError("cannot schedule new work after shutdown")
            self._work.put((fut, fn, args))
            self._queued += 1
            if self._queued > self._idle and len(self._threads) < self._n:
                t = threading.Thread(target=self._serve, daemon=True,
                                     name=f"adaptive_exec_{len(self._threads)}")
                try:
                    t.start()
                except RuntimeError:  # "can't start new thread": a limit of the system
                    if not self._threads:
                        raise  # nothing would ever run the work (cancelled at shutdown)
                    return fut  # the threads there are serve it
                self._threads.append(t)
                self._idle += 1  # waiting for work from now on
        return fut

    def resize(self, n_threads: int) -> None:
        """At most ``n_threads`` from now on (threads beyond it end as they idle out
        only at shutdown: a thread cannot be stopped)."""
        with self._lock:
            self._n = max(1, n_threads)

    def threads(self) -> list[threading.Thread]:
        """The threads started so far."""
        with self._lock:
            return list(self._threads)

    def is_shut(self) -> bool:
        with self._lock:
            return self._shut

    def shutdown(self, wait: bool = True, cancel_futures: bool = False) -> None:
        with self._lock:
            self._shut = True
            threads = list(self._threads)
        if cancel_futures:
            while True:
                try:
                    job = self._work.get_nowait()
                except queue.Empty:
                    break
                if job is not _STOP:
                    job[0].cancel()
        for _ in threads:
            self._work.put(_STOP)
        if wait:
            for t in threads:
                t.join()

    def _serve(self) -> None:
        while True:
            job = self._work.get()
            with self._lock:
                self._idle -= 1
                if job is not _STOP:
                    self._queued -= 1
            if job is _STOP:
                return
            fut, fn, args = job
            job = None
            if fut.set_running_or_notify_cancel():
                try:
                    fut.set_result(fn(*args))
                except BaseException as exc:  # noqa: BLE001 - handed to the future's owner
                    fut.set_exception(exc)
            fut = fn = args = None  # a result the caller dropped is not kept alive here
            with self._lock:
                self._idle += 1
