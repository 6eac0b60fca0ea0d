"""Chunking, bounded work in flight and ordered reassembly, on the loky pool.

    caller thread                                         loky workers
    -------------                                         ------------
    source iterator --islice(c)--> chunk --pickle--> submit ---------> run_chunk
          |                                   (at most `limit` in flight)   |
          |  while the pool is cold:                                       |
          +--> the caller runs items itself                                |
               (its results join the buffer)                               |
    buffer {start: (results, error)} <--unpickle-- future.result() <-------+
          |
          +--> yielded in index order (imap/map), or as they come (imap_unordered);
               an item's exception is raised when its turn comes, after the
               results before it.

One thread, the caller's, does all the bookkeeping: no lock is needed for it. loky's
own thread runs the done-callbacks, which only set ``_warm`` (an Event): on a cold pool
one ping per worker is queued ahead of the real chunks (calibration.StartupProbe), and
the first answer ends the caller's share of the work.
"""

from __future__ import annotations

import concurrent.futures as cf
import itertools
import logging
import pickle
import threading
import time
import warnings
from typing import Any, Callable, Iterator, Optional

from . import calibration
from .backends import loky as loky_backend
from .errors import (
    RemoteError,
    UnpicklableWarning,
    WorkerCrashedError,
    attach_origin,
)
from .worker import ChunkResult, FunctionRef, dumps, run_chunk

logger = logging.getLogger("adaptive_exec")

# Chunks in flight per worker: one running and one queued, so a worker never waits for
# the parent to notice it finished before it gets its next chunk.
IN_FLIGHT_PER_WORKER = 2


class _Pending:
    __slots__ = ("start", "n", "submitted")

    def __init__(self, start: int, n: int, submitted: float):
        self.start = start
        self.n = n
        self.submitted = submitted


class ParallelRun:
    """One parallel map: iterate it for lists of results (in order unless ``ordered=False``)."""

    def __init__(
        self,
        func: Callable[..., Any],
        ref: FunctionRef,
        source: Iterator[Any],
        first_index: int,
        n_workers: int,
        chunksize: int,
        *,
        star: bool,
        ordered: bool,
        strict: bool,
    ):
        self.func = func
        self.ref = ref
        self.source = source
        self.first_index = first_index
        self.n_workers = n_workers
        self.chunksize = max(1, chunksize)
        self.star = star
        self.ordered = ordered
        self.strict = strict
        # Observations, read by the caller after the run:
        self.timeline: list[tuple[float, int]] = []
        self.worker_compute_s = 0.0
        self.worker_items = 0
        self.caller_items = 0
        self.caller_compute_s = 0.0
        self.first_result_s: Optional[float] = None
        self.startup_s: Optional[float] = None
        self._t0 = 0.0
        self._warm = threading.Event()
        self._warned = False

    # --- the caller's own share -------------------------------------------------

    def _run_here(self, items: list[Any], start: int) -> tuple[list[Any], Optional[BaseException]]:
        out: list[Any] = []
        t0 = time.perf_counter()
        func, star = self.func, self.star
        try:
            for item in items:
                out.append(func(*item) if star else func(item))
        except Exception as exc:
            return out, attach_origin(exc, start + len(out), None)
        finally:
            self.caller_compute_s += time.perf_counter() - t0
            self.caller_items += len(out)
        return out, None

    def _unpicklable(self, exc: BaseException, start: int) -> None:
        if self.strict:
            msg = (
                f"item {start} (or one near it) cannot be pickled to reach a worker: {exc}; "
                "pass strict=False to run such items in the caller instead"
            )
            raise TypeError(msg) from exc
        if not self._warned:
            self._warned = True
            warnings.warn(
                f"adaptive_exec: items from index {start} cannot be pickled ({exc}); "
                "running them in the caller",
                UnpicklableWarning,
                stacklevel=4,
            )

    # --- the loop ----------------------------------------------------------------

    def _record(self, active: int) -> None:
        active = min(active, self.n_workers)
        if not self.timeline or self.timeline[-1][1] != active:
            self.timeline.append((round(time.perf_counter() - self._t0, 4), active))

    def __iter__(self) -> Iterator[list[Any]]:
        return self._run()

    def _run(self) -> Iterator[list[Any]]:
        executor, cold, created_at = loky_backend.get_executor(self.n_workers)
        self._t0 = time.perf_counter()
        probe: Optional[calibration.StartupProbe] = None
        probe = loky_backend.current_probe(executor) if cold else None
        if probe is not None:
            # Its pings are queued ahead of our chunks (maybe by a pool started ahead of
            # this map): the first answer means a worker is up.
            self._warm = probe.first
        else:
            self._warm.set()

        limit = self.n_workers * IN_FLIGHT_PER_WORKER
        pending: dict[cf.Future, _Pending] = {}
        buffer: dict[int, tuple[list[Any], int, Optional[BaseException]]] = {}
        next_out = self.first_index
        read_pos = self.first_index
        exhausted = False
        error_at: Optional[int] = None

        def submit_more() -> None:
            nonlocal read_pos, exhausted, error_at
            while not exhausted and error_at is None and len(pending) < limit:
                chunk = list(itertools.islice(self.source, self.chunksize))
                if not chunk:
                    exhausted = True
                    return
                start, read_pos = read_pos, read_pos + len(chunk)
                try:
                    payload = dumps(chunk)
                except Exception as exc:
                    self._unpicklable(exc, start)
                    out, err = self._run_here(chunk, start)
                    buffer[start] = (out, len(chunk), err)
                    if err is not None:
                        error_at = start + len(out)
                    continue
                fut = executor.submit(run_chunk, self.ref, start, payload, self.star)
                pending[fut] = _Pending(start, len(chunk), time.perf_counter())

        def collect(fut: cf.Future) -> None:
            nonlocal error_at
            info = pending.pop(fut)
            try:
                res: ChunkResult = fut.result()
            except cf.CancelledError:
                return
            except Exception as exc:
                if _is_worker_death(exc):
                    loky_backend.mark_broken(executor)
                    msg = (
                        f"a worker process died while running items {info.start}.."
                        f"{info.start + info.n - 1} ({exc})"
                    )
                    raise WorkerCrashedError(msg, index=info.start) from exc
                raise
            if self.first_result_s is None:
                self.first_result_s = time.perf_counter() - self._t0
                loky_backend.mark_warm(executor)
            self.worker_compute_s += res.compute_s
            self.worker_items += res.n_done
            results = pickle.loads(res.results)
            err: Optional[BaseException] = None
            if res.error_index is not None:
                if res.error is not None:
                    err = pickle.loads(res.error)
                else:
                    err = RemoteError(f"{res.error_repr} (the exception could not be pickled)")
                attach_origin(err, res.error_index, res.error_tb)
                if error_at is None or res.error_index < error_at:
                    error_at = res.error_index
            buffer[info.start] = (results, info.n, err)

        def ready() -> Iterator[list[Any]]:
            nonlocal next_out
            if self.ordered:
                while next_out in buffer:
                    results, n, err = buffer.pop(next_out)
                    if results:
                        yield results
                    if err is not None:
                        raise err
                    next_out += n
            else:
                for start in sorted(buffer):
                    results, n, err = buffer.pop(start)
                    if results:
                        yield results
                    if err is not None:
                        raise err

        try:
            # Cold pool: keep the caller busy with items until a worker answers.
            submit_more()
            self._record(len(pending))
            if not self._warm.is_set():
                local: list[Any] = []
                local_start = read_pos
                local_err: Optional[BaseException] = None
                while not self._warm.is_set():
                    item = next(self.source, _END)
                    if item is _END:
                        exhausted = True
                        break
                    read_pos += 1
                    out, local_err = self._run_here([item], read_pos - 1)
                    local.extend(out)
                    if local_err is not None:
                        error_at = read_pos - 1
                        break
                if local or local_err is not None:
                    buffer[local_start] = (local, read_pos - local_start, local_err)

            while True:
                submit_more()
                self._record(len(pending))
                yield from ready()
                if error_at is not None:
                    # Work after the failing item is not needed: cancel what has not
                    # started; what runs finishes in its worker, unwatched.
                    for fut, info in list(pending.items()):
                        if info.start > error_at:
                            fut.cancel()
                            del pending[fut]
                if not pending:
                    if exhausted or error_at is not None:
                        yield from ready()
                        break
                    continue
                done, _ = cf.wait(list(pending), return_when=cf.FIRST_COMPLETED)
                for fut in sorted(done, key=lambda f: pending[f].start):
                    collect(fut)
            self._record(0)
            if probe is not None and probe.startup_s is not None:
                self.startup_s = probe.startup_s
                calibration.record_startup(probe.startup_s, loky_backend.pool_size())
            loky_backend.mark_warm(executor)
            if not calibration.overheads_measured():
                # Once per process, while the pool and this thread are both idle.
                calibration.record_overheads(
                    *calibration.measure_overheads(executor, loky_backend.pool_size())
                )
        finally:
            for fut in pending:
                fut.cancel()


def _is_worker_death(exc: BaseException) -> bool:
    name = type(exc).__name__
    return name in ("TerminatedWorkerError", "BrokenProcessPool", "ShutdownExecutorError")


_END = object()
