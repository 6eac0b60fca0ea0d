"""Chunking, bounded work in flight and ordered reassembly, on a pool.

The pool is loky's processes (LokyTarget), for functions that mostly wait threads of
this process (ThreadTarget), or a dask cluster (backends/dask.py: DaskTarget); the loop
below is the same for all three.

    caller thread                                         workers
    -------------                                         -------
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

import collections
import concurrent.futures as cf
import itertools
import logging
import math
import re
import signal
import threading
import time
import warnings
from typing import TYPE_CHECKING, Any, Callable, Iterator, Optional, Union

from . import calibration
from .backends import loky as loky_backend
from .errors import (
    AdaptiveExecError,
    ClusterError,
    ItemTimeoutError,
    ResultPicklingError,
    UnpicklableWarning,
    WorkerCrashedError,
    attach_origin,
)
from .worker import (
    FALLBACK,
    NEED_FUNCTION,
    ChunkResult,
    FunctionRef,
    decode,
    dumps,
    run_chunk,
    run_here,
    run_items,
)

if TYPE_CHECKING:
    from .backends.dask import DaskTarget

logger = logging.getLogger("adaptive_exec")

# Chunks in flight per worker: one running and one queued, so a worker never waits for
# the parent to notice it finished before it gets its next chunk.
IN_FLIGHT_PER_WORKER = 2
# Chunk sizing during a run (guided self-scheduling): a chunk is at most the items left
# divided by GUIDED_SPLIT x workers, so chunks shrink towards the end and the workers
# finish together, even when the costliest items come last (joblib issue 1220); and at
# least long enough that the per-task overhead stays under OVERHEAD_SHARE of it.
GUIDED_SPLIT = 2
OVERHEAD_SHARE = 0.05
EWMA = 0.3  # weight of the newest chunk in the observed per-item time
# The monitor re-reads the machine this often during a run (a load change is followed
# within about twice this), and the loop wakes this often to apply what it decided.
MONITOR_INTERVAL_S = 0.3
WAKE_S = 0.25
# Ordered results waiting for an earlier, slower chunk: at most this many chunks per
# worker are held before no new chunk is sent (a judgement: the memory a slow consumer
# or one slow chunk can pin stays bounded, and skewed work keeps ~4 chunks of slack).
BUFFERED_PER_WORKER = 4


class _Throttle:
    """How many workers the run may keep busy now: the monitor thread sets it from the
    machine's load and memory, the dispatch loop reads it."""

    def __init__(self, n_workers: int):
        self.lock = threading.Lock()  # guards target
        self.target = n_workers
        self.stop = threading.Event()

    def get(self) -> int:
        with self.lock:
            return self.target

    def set(self, value: int) -> None:
        with self.lock:
            self.target = value


def _monitor(throttle: _Throttle, decide: Callable[[int], int]) -> None:
    while not throttle.stop.wait(MONITOR_INTERVAL_S):
        try:
            current = throttle.get()
            new = decide(current)
        except Exception as exc:  # a failed reading keeps the current target
            logger.debug("load monitor: %r", exc)
            continue
        if new != current:
            logger.debug("load monitor: %d -> %d busy workers", current, new)
            throttle.set(new)


class _PoolGone(Exception):
    """The executor a chunk was sent to takes no more work: another thread replaced it
    (a larger pool) or ended it (its time-out, Ctrl-C). Not the chunk's fault."""


class LokyTarget:
    """Chunks go to the process pool, pickled by us (see worker.py)."""

    kind = "loky"

    def __init__(self, ref: FunctionRef, star: bool):
        self.ref = ref
        self.lean = ref.lean_copy()
        self.star = star
        self.full_left = 0  # chunks still to send with the whole function

    def open(self, n_workers: int) -> tuple[Any, Optional[calibration.StartupProbe]]:
        executor, cold, _ = loky_backend.get_executor(n_workers)
        # One whole ref per worker, about: the others carry its key alone, and a worker
        # that lacks it asks (NEED_FUNCTION) and gets the chunk again, whole.
        self.full_left = n_workers
        return executor, loky_backend.current_probe(executor) if cold else None

    def capacity(self) -> int:
        return loky_backend.pool_size()

    def submit(self, executor: Any, chunk: list[Any], start: int, full: bool = False
               ) -> cf.Future:
        payload = dumps(chunk)  # raises when an item cannot be pickled
        if self.full_left > 0:
            self.full_left -= 1
            full = True
        try:
            return executor.submit(run_chunk, self.ref if full else self.lean, start,
                                   payload, self.star)
        except Exception as exc:
            if loky_backend.is_gone(executor):
                raise _PoolGone() from exc
            raise

    def cancel(self, fut: cf.Future, executor: Any) -> None:
        # A pool being ended fails its queued futures itself; one cancelled by us
        # meanwhile made loky's manager thread print InvalidStateError (it sets an
        # exception on every queued future, cancelled or not).
        if not loky_backend.is_gone(executor):
            fut.cancel()

    def recover(self, executor: Any, failed: Any, n_workers: int) -> tuple[Any, bool]:
        """After chunks died with the pool ``failed``: (the pool to use now, whether it
        was ended on purpose, by us or another thread, rather than by a crash)."""
        deliberate = loky_backend.ended_on_purpose(failed)
        loky_backend.mark_broken(failed)
        if loky_backend.is_gone(executor):
            executor, _ = self.open(n_workers)
        return executor, deliberate

    def decode(self, res: ChunkResult) -> tuple[list[Any], Optional[BaseException]]:
        return decode(res)

    def close(self, executor: Any, clean: bool, interrupted: bool = False) -> None:
        if interrupted:
            # Ctrl-C: end the workers too, so that nothing runs on and nothing is left.
            loky_backend.mark_broken(executor, on_purpose=True)
        elif clean:
            loky_backend.mark_warm(executor)


class ThreadTarget:
    """Chunks go to threads of this process: for functions that mostly wait."""

    kind = "threads"

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

    def recover(self, executor: Any, failed: Any, n_workers: int) -> tuple[Any, bool]:
        return executor, False

    def cancel(self, fut: cf.Future, executor: Any) -> None:
        fut.cancel()

    def decode(self, res: ChunkResult) -> tuple[list[Any], Optional[BaseException]]:
        return res.results, res.error

    def close(self, executor: Any, clean: bool, interrupted: bool = False) -> None:
        # Threads cannot be stopped: after an error the running ones finish first; after
        # Ctrl-C they finish in the background and control returns at once.
        executor.shutdown(wait=not interrupted, cancel_futures=True)


class _Pending:
    """A chunk in flight. Its items are kept until it returns: a chunk whose worker dies
    is sent again (retries); ``crashes`` counts the pools it was in when one broke."""

    __slots__ = ("start", "items", "submitted", "crashes", "executor")

    def __init__(self, start: int, items: list[Any], submitted: float, crashes: int = 0):
        self.start = start
        self.items = items
        self.submitted = submitted
        self.crashes = crashes
        self.executor: Any = None  # the pool it was sent to

    @property
    def n(self) -> int:
        return len(self.items)


class ParallelRun:
    """One parallel map: iterate it for lists of results (in order unless ``ordered=False``)."""

    def __init__(
        self,
        func: Callable[..., Any],
        target: Union[LokyTarget, ThreadTarget, DaskTarget],
        source: Iterator[Any],
        first_index: int,
        n_workers: int,
        chunksize: int,
        *,
        star: bool,
        ordered: bool,
        strict: bool,
        n_left: Optional[int] = None,
        fixed_chunksize: bool = False,
        max_chunk_items: Optional[int] = None,
        task_overhead_s: float = 0.0,
        monitor: Optional[Callable[[int], int]] = None,
        timeout: Optional[float] = None,
    ):
        self.func = func
        self.target = target
        self.source = source
        self.first_index = first_index
        self.n_workers = n_workers
        self.chunksize = max(1, chunksize)  # the plan's: an upper bound when not fixed
        self.n_left = n_left  # items still to read from source, when known
        self.fixed_chunksize = fixed_chunksize
        # imap: a chunk's results are at most about this many items (their bytes
        # bounded), so a slow consumer pins a bounded amount of memory.
        self.max_chunk_items = max_chunk_items
        self.task_overhead_s = task_overhead_s
        self.per_item_s: Optional[float] = None  # observed in workers, smoothed
        # decide(current busy workers) -> the number to keep busy now (load, memory).
        self.monitor = monitor
        self.throttle = _Throttle(n_workers)
        self.star = star
        self.ordered = ordered
        self.strict = strict
        # Per item, in seconds: items then go one per task, one task per worker, and an
        # item past it ends the map (see _check_deadlines).
        self.timeout = timeout
        if timeout is not None:
            self.chunksize, self.fixed_chunksize = 1, True
        # Observations, read by the caller after the run:
        self.timeline: list[tuple[float, int]] = []
        self.worker_compute_s = 0.0
        self.worker_items = 0
        self.startup_s: Optional[float] = None
        self._t0 = 0.0
        self._warm = threading.Event()
        self._warned = False
        # Set once something could not cross to or from a worker (a result, the function
        # in a worker): the rest of the map runs here, in the caller.
        self.caller_only = False

    # --- the caller's own share -------------------------------------------------

    def _run_here(self, items: list[Any], start: int) -> tuple[list[Any], Optional[BaseException]]:
        return run_here(self.func, items, start, self.star)

    def _unpicklable(self, what: str, cause: Optional[BaseException] = None,
                     error: type[TypeError] = TypeError) -> None:
        """Something cannot cross between the caller and a worker: raise with strict=True,
        else warn once (the caller runs what is missing)."""
        if self.strict:
            msg = (f"{what}; pass strict=False to run such items in the caller instead "
                   "(strict=True)")
            raise error(msg) from cause
        if not self._warned:
            self._warned = True
            warnings.warn(
                f"adaptive_exec: {what}; running them in the caller",
                UnpicklableWarning,
                stacklevel=4,
            )

    # --- the loop ----------------------------------------------------------------

    def _record(self, active: int) -> None:
        active = min(active, self.n_workers, self.throttle.get())
        if not self.timeline or self.timeline[-1][1] != active:
            self.timeline.append((round(time.perf_counter() - self._t0, 4), active))

    def _next_chunksize(self) -> int:
        if self.fixed_chunksize:
            return self.chunksize
        c = self.chunksize
        if self.max_chunk_items is not None:
            c = min(c, self.max_chunk_items)
        if self.n_left is not None:
            c = min(c, math.ceil(self.n_left / (GUIDED_SPLIT * self.n_workers)))
        if self.per_item_s and self.task_overhead_s:
            floor = math.ceil(self.task_overhead_s / (OVERHEAD_SHARE * self.per_item_s))
            c = max(c, min(floor, self.chunksize))
        return max(1, c)

    def _observe(self, res: ChunkResult) -> None:
        if res.n_done:
            t = res.compute_s / res.n_done
            self.per_item_s = t if self.per_item_s is None else (
                EWMA * t + (1 - EWMA) * self.per_item_s)

    def __iter__(self) -> Iterator[list[Any]]:
        return self._run()

    def _run(self) -> Iterator[list[Any]]:
        executor, probe = self.target.open(self.n_workers)
        capacity = self.target.capacity()  # what can run at once there
        self._t0 = time.perf_counter()
        clean = interrupted = False
        if probe is not None:
            # Its pings are queued ahead of our chunks (maybe by a pool started ahead of
            # this map): the first answer means a worker is up.
            self._warm = probe.first
        else:
            self._warm.set()
        warm_at: Optional[float] = None if probe is not None else self._t0

        if self.monitor is not None:
            threading.Thread(target=_monitor, args=(self.throttle, self.monitor),
                             name="adaptive_exec-monitor", daemon=True).start()

        pending: dict[cf.Future, _Pending] = {}
        # Chunks whose pool broke under them, to send again one at a time (so that the
        # one that kills its worker is found alone) before any new chunk.
        retry: collections.deque[_Pending] = collections.deque()
        buffer: dict[int, tuple[list[Any], int, Optional[BaseException]]] = {}
        next_out = self.first_index
        read_pos = self.first_index
        exhausted = False
        error_at: Optional[int] = None

        def limit() -> int:
            if retry or any(info.crashes for info in pending.values()):
                return 1
            if self.ordered and pending and len(buffer) >= BUFFERED_PER_WORKER * self.n_workers:
                return 0  # results wait for an earlier chunk: send nothing new meanwhile
            target = self.throttle.get()
            if self.timeout is not None:
                return target  # no queue: an item's clock starts when it is sent
            # With every worker allowed, one chunk queued per worker keeps them fed;
            # with fewer, exactly that many chunks, so only that many workers are busy.
            # A pool larger than the run's workers (max_workers=1 on a warm pool of 2)
            # would start queued chunks at once: no queue then either.
            if target >= self.n_workers and capacity <= self.n_workers:
                return target * IN_FLIGHT_PER_WORKER
            return target

        def run_locally(info: _Pending) -> None:
            nonlocal error_at
            out, err = self._run_here(info.items, info.start)
            buffer[info.start] = (out, info.n, err)
            if err is not None and (error_at is None or info.start + len(out) < error_at):
                error_at = info.start + len(out)

        def send(info: _Pending, full: bool = False) -> None:
            nonlocal executor
            if self.caller_only:
                run_locally(info)
                return
            for _ in range(3):
                try:
                    fut = self.target.submit(executor, info.items, info.start, full)
                    break
                except _PoolGone:
                    # Another thread's map replaced or ended the pool: use the current one.
                    executor, _ = self.target.open(self.n_workers)
                except AdaptiveExecError:
                    raise  # ours (a cluster that went away...): not a pickling failure
                except Exception as exc:
                    self._unpicklable(f"items from index {info.start} cannot be pickled to "
                                      f"reach a worker ({exc})", exc)
                    run_locally(info)
                    return
            else:
                msg = "the process pool kept being replaced by other threads' maps"
                raise WorkerCrashedError(msg, index=info.start)
            info.submitted = time.perf_counter()
            info.executor = executor
            pending[fut] = info

        def fall_back(info: _Pending, res: ChunkResult) -> tuple[list[Any], Optional[
                BaseException], Optional[int]]:
            """A chunk that could not fully cross: the items a worker could not run, or
            whose results could not come back, run here; so does the rest of the map."""
            reason = res.reason or "something cannot cross between the caller and a worker"
            self._unpicklable(reason, None, ResultPicklingError if res.holes else TypeError)
            self.caller_only = True
            if res.holes is None:  # nothing ran there
                out, err = self._run_here(info.items, info.start)
                return out, err, None
            results, err = self.target.decode(res)
            err_index = res.error_index
            for hole in res.holes:
                out, hole_err = self._run_here([info.items[hole]], info.start + hole)
                if hole_err is not None:  # before the worker's own error, if any
                    return results[:hole], hole_err, None
                results[hole] = out[0]
            return results, err, err_index

        def submit_more() -> None:
            nonlocal read_pos, exhausted
            while len(pending) < limit():
                if retry:
                    # Even after an error: a chunk retried here comes before it (later
                    # ones were dropped), and its results are yielded first. Holding it
                    # back left the loop waiting on nothing, for ever.
                    send(retry.popleft())
                    continue
                if exhausted or error_at is not None:
                    return
                chunk = list(itertools.islice(self.source, self._next_chunksize()))
                if not chunk:
                    exhausted = True
                    return
                start, read_pos = read_pos, read_pos + len(chunk)
                if self.n_left is not None:
                    self.n_left -= len(chunk)
                send(_Pending(start, chunk, 0.0))

        def crashed(info: _Pending, exc: BaseException) -> None:
            """The pool broke while ``info`` was in it: rebuild, and retry or name."""
            nonlocal executor, error_at
            executor, deliberate = self.target.recover(executor, info.executor, self.n_workers)
            if deliberate:  # ended by a time-out, Ctrl-C or growth, maybe another thread's
                retry.append(info)
                return
            info.crashes += 1
            # dask: the task was lost with the workers that held it or its function.
            lost = isinstance(exc, ClusterError)
            code = None if lost else _exit_code(exc)
            if info.n == 1 and info.crashes >= 2:
                msg = (f"item {info.start} was lost twice with the dask workers running it "
                       f"({exc})" if lost else
                       f"item {info.start} killed its worker process twice "
                       f"({_describe_exit(code)})")
                err = WorkerCrashedError(msg, index=info.start, exitcode=code)
                err.__cause__ = exc
                # Raised in its turn, after the results and errors of the items before it.
                buffer[info.start] = ([], 1, attach_origin(err, info.start, None))
                if error_at is None or info.start < error_at:
                    error_at = info.start
                return
            if info.crashes >= 2:
                # The chunk broke a pool alone: narrow it down to the item, each alone.
                for offset, item in enumerate(info.items):
                    retry.append(_Pending(info.start + offset, [item], 0.0, crashes=1))
            else:
                retry.append(info)
            logger.debug("a worker died (%s); items %d..%d will run again",
                         exc if lost else _describe_exit(code), info.start,
                         info.start + info.n - 1)

        def collect(fut: cf.Future) -> None:
            nonlocal error_at, warm_at
            info = pending.pop(fut)
            try:
                res: ChunkResult = fut.result()
            except cf.CancelledError:
                return
            except WorkerCrashedError as exc:
                # A target that gave up on the chunk itself (dask: KilledWorker, after the
                # scheduler's own retries). Raised in its turn, after the items before it.
                buffer[info.start] = ([], info.n, attach_origin(exc, info.start, None))
                if error_at is None or info.start < error_at:
                    error_at = info.start
                return
            except Exception as exc:
                if (self.target.kind == "loky" and _is_worker_death(exc)) or isinstance(
                        exc, ClusterError):
                    crashed(info, exc)
                    return
                raise
            status = getattr(res, "status", None)
            if status == NEED_FUNCTION:  # a worker new to this function: send it whole
                send(info, full=True)
                return
            self.worker_compute_s += res.compute_s
            self.worker_items += res.n_done
            self._observe(res)
            err_index = res.error_index
            if status == FALLBACK:
                results, err, err_index = fall_back(info, res)
            else:
                try:
                    results, err = self.target.decode(res)
                except Exception as exc:  # results this process cannot unpickle
                    self._unpicklable(f"the results of items from index {info.start} cannot "
                                      f"be unpickled in the caller ({exc})", exc)
                    self.caller_only = True
                    results, err = self._run_here(info.items, info.start)
                    err_index = None
            if err is not None and err_index is not None:
                # From another process (loky, dask), the worker's traceback is text to
                # chain; a thread's exception still carries its own.
                remote_tb = res.error_tb if self.target.kind != "threads" else None
                attach_origin(err, err_index, remote_tb)
            if err is not None:
                at = getattr(err, "item_index", info.start + len(results))
                if error_at is None or at < error_at:
                    error_at = at
            buffer[info.start] = (results, info.n, err)

        def check_deadlines() -> None:
            """With a timeout: an item running past it ends the map, and its pool."""
            nonlocal warm_at
            if self.timeout is None:
                return
            now = time.perf_counter()
            if warm_at is None:
                if not self._warm.is_set():
                    return  # start-up does not count against any item
                warm_at = now
            for fut, info in pending.items():
                began = max(info.submitted, warm_at)
                if not fut.done() and now - began > self.timeout:
                    loky_backend.mark_broken(executor, on_purpose=True)  # its worker goes
                    msg = (f"item {info.start} ran past the timeout of {self.timeout:g} s; "
                           "its worker was ended")
                    raise attach_origin(ItemTimeoutError(msg), info.start, None)

        def next_wake() -> float:
            if self.timeout is None or warm_at is None or not pending:
                return WAKE_S
            first = min(max(info.submitted, warm_at) for info in pending.values())
            return max(0.005, min(WAKE_S, first + self.timeout - time.perf_counter()))

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
            submit_more()
            self._record(len(pending))
            if not self._warm.is_set() and self.timeout is None:
                # Cold pool: keep the caller busy with items until a worker answers.
                # (Not with a timeout: an item running here could not be stopped.)
                local: list[Any] = []
                local_start = read_pos
                local_err: Optional[BaseException] = None
                while not self._warm.is_set():
                    item = next(self.source, _END)
                    if item is _END:
                        exhausted = True
                        break
                    read_pos += 1
                    if self.n_left is not None:
                        self.n_left -= 1
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
                            self.target.cancel(fut, info.executor)
                            del pending[fut]
                    retry = collections.deque(i for i in retry if i.start < error_at)
                if not pending and not retry:
                    if exhausted or error_at is not None:
                        yield from ready()
                        break
                    continue
                done, _ = cf.wait(list(pending), timeout=next_wake(),
                                  return_when=cf.FIRST_COMPLETED)
                for fut in sorted(done, key=lambda f: pending[f].start):
                    collect(fut)
                check_deadlines()
            self._record(0)
            clean = True
            if probe is not None and probe.startup_s is not None:
                self.startup_s = probe.startup_s
                calibration.record_startup(probe.startup_s, loky_backend.pool_size())
            if self.target.kind == "loky" and not calibration.overheads_measured():
                # Once per process, while the pool and this thread are both idle.
                calibration.record_overheads(
                    *calibration.measure_overheads(executor, loky_backend.pool_size())
                )
        except KeyboardInterrupt as exc:
            # Ctrl-C (not an item's own KeyboardInterrupt, which carries its index):
            # the workers are ended with the map.
            interrupted = getattr(exc, "item_index", None) is None
            raise
        except GeneratorExit:
            # Closed early with chunks still running (imap left by Ctrl-C in the
            # consumer's own code, or by a break): nothing is to run on unwatched, so
            # their workers are ended, as joblib does when its generator is dropped.
            interrupted = bool(pending)
            raise
        finally:
            self.throttle.stop.set()
            self.target.close(executor, clean, interrupted)
            for fut, info in pending.items():
                self.target.cancel(fut, info.executor)


def _exit_code(exc: BaseException) -> Optional[int]:
    """The dead worker's exit code from loky's message ("{EXIT(13)}", "{SIGKILL(-9)}")."""
    match = re.search(r"\((-?\d+)\)", str(exc))
    return int(match.group(1)) if match else None


def _describe_exit(code: Optional[int]) -> str:
    if code is None:
        return "exit code unknown"
    if code < 0:
        try:
            return f"signal {signal.Signals(-code).name}"
        except ValueError:
            return f"signal {-code}"
    return f"exit code {code}"


def _is_worker_death(exc: BaseException) -> bool:
    name = type(exc).__name__
    return name in ("TerminatedWorkerError", "BrokenProcessPool", "ShutdownExecutorError")


_END = object()
