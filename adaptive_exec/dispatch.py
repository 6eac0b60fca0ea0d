"""Chunking, bounded work in flight and ordered reassembly, over any backend.

The target is a backend of backends/ (loky's processes, threads of this process, a dask
cluster), seen only through the protocol of backends/base.py; the loop is the same for
all, and it imports none of them.

    caller thread (ParallelRun.run)                              workers
    -------------------------------                              -------
    source --islice(c)--> Pending --_send--> target.submit ------> run_chunk
       |                  (at most _limit() in flight)                  |
       |  while the pool is cold (_share_while_cold):                   |
       +--> the caller runs items itself                                |
    buffer {start: (results, n, error)} <--_collect-- future.result() <-+
       |     (a dead worker: _crashed -> retry; something that cannot
       |      cross: _CannotCross -> the caller runs it)
       +--_ready--> yielded in index order (imap/map), or as they come
                    (imap_unordered); an item's exception is raised in its turn,
                    after the results before it.

One thread, the caller's, does all the bookkeeping: no lock is needed for it. The
backend's own thread runs the done-callbacks, which only set the start-up probe's
``first`` (an Event): on a cold pool one ping per worker is queued ahead of the real
chunks, and the first answer ends the caller's share of the work. A monitor thread sets
the number of workers to keep busy (``_Throttle``) from the machine's load and memory.
"""

from __future__ import annotations

import collections
import concurrent.futures as cf
import itertools
import logging
import math
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Optional

from . import system
from .backends.base import NOT_BEGUN, PoolGone, StartupWatch, Target
from .errors import (
    ITEM_ATTR,
    AdaptiveExecError,
    ClusterError,
    InitializerError,
    ItemTimeoutError,
    ResultPicklingError,
    UnpicklableWarning,
    WorkerCrashedError,
    attach_origin,
    from_a_signal_handler,
    item_of,
    set_on,
    unenforced,
    warn_user,
)
from .planner import MAX_CHUNK_S
from .sampling import SETUP_MIN_S, SETUP_RATIO
from .worker import FALLBACK, NEED_FUNCTION, ChunkResult, dumps, run_here

logger = logging.getLogger("adaptive_exec")

# Chunks in flight per worker: one running and one queued, so a worker never waits for
# the parent to notice it finished before it gets its next chunk.
IN_FLIGHT_PER_WORKER = 2
# While the pool is cold, the caller runs items of at most this many start-ups each
# (RunSpec.startup_s): a longer one ends after the workers are up, and holds them back.
SHARE_MAX = 1.0
# Chunk sizing during a run (guided self-scheduling): a chunk is at most the items left
# divided by GUIDED_SPLIT x workers, so chunks shrink towards the end and the workers
# finish together, even when the costliest items come last (joblib issue 1220); and at
# least long enough that the per-task overhead stays under OVERHEAD_SHARE of it.
GUIDED_SPLIT = 2
OVERHEAD_SHARE = 0.05
# Weight of the newest chunk in the observed per-item time: a judgement between
# following a trend within a few chunks and not chasing one noisy chunk (joblib's
# auto-batching uses 0.2 for the newest batch; chunks here are fewer and longer).
EWMA = 0.3
# The monitor re-reads the machine this often during a run (a load change is followed
# within about twice this: measured 0.20-0.21 s, benchmarks/reaction.py), and the loop
# wakes this often to apply what it decided.
MONITOR_INTERVAL_S = 0.3
WAKE_S = 0.25
# A timed item whose start its worker never noted (it could not open the caller's clock)
# counts from when it was sent once this much longer than the timeout has passed: the
# most a function's transfer is given before it counts (a judgement: ~10x the worst
# 500 MB transfer measured here).
UNNOTED_START_S = 30.0
# Ordered results waiting for an earlier, slower chunk: at most this many chunks per
# worker are held before no new chunk is sent (a judgement: the memory a slow consumer
# or one slow chunk can pin stays bounded, and skewed work keeps ~4 chunks of slack).
BUFFERED_PER_WORKER = 4
# A chunk that ran in a live worker when its pool broke, or in none while each dead one
# ran another chunk, is sent again without counting a crash, however often (another
# thread's map may break pool after pool under a long item: 20 such breaks named one).
# A chunk no worker had begun, beside a death no chunk explains (a worker that died
# taking it up?), is spared this many times at most: a bound, not a measurement.
SPARED_MAX = 20
# Items costing this many times more or less in the workers than planned are "far off":
# chunks are resized to keep their planned duration (_Chunks._sized). A judgement: within
# 2x the plan's chunks stay as good as any (their cost is flat near the optimum).
RESIZE_AT = 2.0

_END = object()


# Chunks whose per-item time is kept for the spread of item costs (observed_cv).
SPREAD_CHUNKS = 64


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


# What the monitor calls: busy workers now -> how many to keep busy, and why (the log
# line's opening, e.g. "load: 1 of 2 cores busy with other processes").
Decide = Callable[[int], tuple[int, str]]


def _monitor(throttle: _Throttle, decide: Decide,
             on_change: Optional[Callable[[int], None]] = None) -> None:
    """Until the run ends: re-read the machine, set the workers to keep busy; when that
    number changes (not at every reading), one INFO line says so, and why, and
    ``on_change`` (the progress bar) is told."""
    while not throttle.stop.wait(MONITOR_INTERVAL_S):
        try:
            current = throttle.get()
            new, why = decide(current)
        except Exception as exc:  # a failed reading keeps the current target
            logger.debug("load monitor: %r", exc)
            continue
        if new == current:
            continue
        throttle.set(new)
        logger.info("%s: %d worker%s now (was %d)", why or "load monitor", new,
                    "" if new == 1 else "s", current)
        if on_change is not None:
            try:
                on_change(new)
            except Exception as exc:  # the bar must not stop the monitor
                logger.debug("load monitor: %r", exc)


class Pending:
    """A chunk in flight. Its items are kept until it returns: a chunk whose worker dies
    is sent again (retries); ``crashes`` counts the pools it was in when one broke."""

    __slots__ = ("start", "items", "submitted", "crashes", "spared", "executor")

    def __init__(self, start: int, items: list[Any], crashes: int = 0):
        self.start = start
        self.items = items
        self.submitted = 0.0
        self.crashes = crashes
        self.spared = 0  # breaks it was in, running in a worker that did not die
        self.executor: Any = None  # the pool it was sent to

    @property
    def n(self) -> int:
        return len(self.items)


@dataclass(frozen=True)
class RunSpec:
    """How one parallel run goes: what the plan and the options say."""

    n_workers: int
    chunksize: int  # the plan's: an upper bound unless ``fixed_chunksize``
    star: bool = False  # func(*item) rather than func(item)
    ordered: bool = True  # results in input order (map, imap) or as they come
    strict: bool = False  # raise rather than run in the caller what cannot be pickled
    fixed_chunksize: bool = False  # the user's chunksize=
    # imap: a chunk's results are at most about this many items (their bytes bounded),
    # so a slow consumer pins a bounded amount of memory.
    max_chunk_items: Optional[int] = None
    task_overhead_s: float = 0.0  # a task's cost beyond its work (calibration)
    item_s: float = 0.0  # an item's cost as planned (the caller's measure of it)
    # Per item, in seconds: items then go one per task, one task per worker, and an
    # item past it ends the map (see ParallelRun._check_deadlines).
    timeout: Optional[float] = None
    # The last items, which the caller runs itself once the rest are handed out
    # (planner.caller_items: the odd long item of a last round, beside the workers).
    caller_items: int = 0
    # The caller runs items while the pool is cold (_share_while_cold); not where its
    # first would pay the function's one-time set-up.
    helps_cold: bool = True
    # Seconds a cold pool takes to answer, as calibrated (None: not known). The caller
    # runs no item while it is cold that would hold it past that by much (SHARE_MAX).
    startup_s: Optional[float] = None
    # Called before the caller runs an item itself (a fall-back, the interpreter's
    # end): the map's initializer, where the caller has not run it (a timeout).
    before_here: Optional[Callable[[], None]] = None


class _Chunks:
    """Chunk sizes during a run: the plan's size, resized when the workers show items
    costing far from what was planned (the chunk's planned duration is kept), shrinking
    towards the end (guided self-scheduling), never so small that per-task overhead
    dominates."""

    def __init__(self, spec: RunSpec, n_left: Optional[int]):
        self.fixed = spec.fixed_chunksize or spec.timeout is not None
        self.size = 1 if spec.timeout is not None else max(1, spec.chunksize)
        self.cap = spec.max_chunk_items if not self.fixed else None
        if self.cap is not None:
            self.size = min(self.size, self.cap)
        self.n_workers = spec.n_workers
        self.task_overhead_s = spec.task_overhead_s
        self.item_s = spec.item_s  # what the plan expected an item to cost
        self.n_left = n_left  # items still to read from the source, when known
        self.per_item_s: Optional[float] = None  # observed in workers, smoothed
        self.resized: Optional[int] = None  # the size the workers' times led to, if any

    def _sized(self) -> int:
        """The plan's size; once the workers' items cost RESIZE_AT times more or less than
        planned, the size that gives a chunk its planned duration (at most MAX_CHUNK_S):
        a plan made on a wrong time (a set-up taken for the mean, a busy moment) does not
        keep chunks of 1 for 10 ms items, nor 200 items for 20 ms ones."""
        if not self.per_item_s or not self.item_s:
            return self.size
        if 1 / RESIZE_AT < self.item_s / self.per_item_s < RESIZE_AT:
            return self.size
        target_s = min(self.size * self.item_s, MAX_CHUNK_S)
        c = max(1, int(target_s / self.per_item_s))
        if self.cap is not None:
            c = min(c, self.cap)
        if c != self.size:
            self.resized = c
        return c

    def next(self) -> int:
        if self.fixed:
            return self.size
        sized = c = self._sized()
        if self.n_left is not None:
            c = min(c, math.ceil(self.n_left / (GUIDED_SPLIT * self.n_workers)))
        if self.per_item_s and self.task_overhead_s:
            floor = math.ceil(self.task_overhead_s / (OVERHEAD_SHARE * self.per_item_s))
            c = max(c, min(floor, sized))
        return max(1, c)

    def taken(self, n: int) -> None:
        if self.n_left is not None:
            self.n_left -= n

    def observe(self, compute_s: float, n_done: int) -> None:
        if n_done:
            t = compute_s / n_done
            self.per_item_s = t if self.per_item_s is None else (
                EWMA * t + (1 - EWMA) * self.per_item_s)


def _run_here(func: Callable[..., Any], items: list[Any], start: int, spec: RunSpec
              ) -> tuple[list[Any], Optional[BaseException]]:
    """``worker.run_here``, the map's initializer run here first where it must be (its
    failure is the error at ``start``, in its turn after the items before it)."""
    if spec.before_here is not None:
        try:
            spec.before_here()
        except InitializerError as exc:
            return [], exc
    return run_here(func, items, start, spec.star)


class _CannotCross:
    """What could not cross between the caller and a worker (an item that does not
    pickle, a result that does not come back, a function a worker cannot rebuild): run
    here instead, with one UnpicklableWarning; raised instead with ``strict``."""

    def __init__(self, func: Callable[..., Any], spec: RunSpec):
        self.func = func
        self.spec = spec
        self.star = spec.star
        self.strict = spec.strict
        self.warned = False
        self.reason: Optional[str] = None  # the first thing that could not cross
        # Set once something could not cross back, or the function could not be rebuilt
        # in a worker: the rest of the map runs here, in the caller.
        self.caller_only = False

    def warn(self, what: str, cause: Optional[BaseException] = None,
             error: type[TypeError] = TypeError, index: Optional[int] = None) -> None:
        if self.strict:
            msg = (f"{what}; pass strict=False to run such items in the caller instead "
                   "(strict=True)")
            err = error(msg)
            if index is not None:
                set_on(err, "item_index", index)
                set_on(err, ITEM_ATTR, index)
            raise err from cause
        self.reason = self.reason or what
        if not self.warned:
            self.warned = True
            warn_user(f"adaptive_exec: {what}; running them in the caller"
                      f"{unenforced(self.spec.timeout)}", UnpicklableWarning)

    def fall_back(self, info: Pending, res: ChunkResult, target: Target
                  ) -> tuple[list[Any], Optional[BaseException], Optional[int]]:
        """A chunk that could not fully cross: the items a worker could not run, or
        whose results could not come back, run here; so does the rest of the map."""
        reason = res.reason or "something cannot cross between the caller and a worker"
        self.warn(reason, None, ResultPicklingError if res.holes else TypeError)
        self.caller_only = True
        if res.holes is None:  # nothing ran there
            out, err = _run_here(self.func, info.items, info.start, self.spec)
            return out, err, None
        results, err = target.decode(res)
        for hole in res.holes:
            out, hole_err = _run_here(self.func, [info.items[hole]], info.start + hole,
                                      self.spec)
            if hole_err is not None:  # before the worker's own error, if any
                return results[:hole], hole_err, None
            results[hole] = out[0]
        return results, err, res.error_index


def _first_unpicklable(items: list[Any]) -> Optional[int]:
    """The offset of the first item that does not pickle: the item to name, not the
    chunk (it named index 24 for item 25); None when each does."""
    for offset, item in enumerate(items):
        try:
            dumps(item)
        except Exception:
            return offset
    return None


def observed_cv(chunk_item_s: list[tuple[int, float]]) -> Optional[float]:
    """The items' coefficient of variation from chunks' per-item times: a chunk of c
    items averages c of them, its spread shrinks by sqrt(c), so it is scaled back up.
    None under 2 chunks."""
    if len(chunk_item_s) < 2:
        return None
    times = [t for _, t in chunk_item_s]
    mean = math.fsum(times) / len(times)
    if mean <= 0:
        return None
    var = math.fsum((t - mean) ** 2 for t in times) / (len(times) - 1)
    size = math.fsum(n for n, _ in chunk_item_s) / len(chunk_item_s)
    return math.sqrt(var) / mean * math.sqrt(size)


class ParallelRun:
    """One parallel map: iterate it for lists of results (in order unless not
    ``spec.ordered``). ``monitor(busy workers now)`` says how many to keep busy (and
    why); ``on_workers`` is told when that number changes."""

    def __init__(
        self,
        func: Callable[..., Any],
        target: Target,
        source: Iterator[Any],
        first_index: int,
        spec: RunSpec,
        n_left: Optional[int] = None,
        monitor: Optional[Decide] = None,
        on_workers: Optional[Callable[[int], None]] = None,
        in_flight: Optional[dict[cf.Future, Pending]] = None,
        unsent: tuple[Pending, ...] = (),
    ):
        """``in_flight``, ``unsent``: items from ``first_index`` on that were sent to the
        pool before this run (ahead.py), and ones taken for it that could not be sent:
        ``source`` goes on after them."""
        self.func = func
        self.target = target
        self.source = source
        self.spec = spec
        self.n_workers = spec.n_workers
        self.timeout = spec.timeout
        self.chunks = _Chunks(spec, n_left)
        self.monitor = monitor
        self.on_workers = on_workers  # told the monitor's new number of busy workers
        self.throttle = _Throttle(spec.n_workers)
        # Observations, read by the caller after the run:
        self.timeline: list[tuple[float, int]] = []
        self.worker_compute_s = 0.0  # the items' compute, one-time set-ups left out
        self.worker_queued_s = 0.0  # and what their threads waited for a CPU beside it
        self.worker_items = 0
        # Per-item times of the first chunks (their compute over their items), for the
        # spread of item costs when sampling could not tell it (one sampled call).
        self.chunk_item_s: list[tuple[int, float]] = []
        self.setups: list[float] = []  # one-time set-ups seen in workers' first calls
        # The loop's state (the caller's thread alone touches it):
        self.executor: Any = None
        self.capacity = 0  # chunks that can run at once on the executor
        self.probe: Optional[StartupWatch] = None
        self.warm = threading.Event()
        self.warm_at: Optional[float] = None  # when a worker first answered
        self.pending: dict[cf.Future, Pending] = dict(in_flight or {})
        # Chunks whose pool broke under them, to send again one at a time (so that the
        # one that kills its worker is found alone) before any new chunk.
        self.retry: collections.deque[Pending] = collections.deque(unsent)
        self.buffer: dict[int, tuple[list[Any], int, Optional[BaseException]]] = {}
        self.next_out = first_index
        self.read_pos = first_index + sum(i.n for i in (*self.pending.values(), *unsent))
        self.exhausted = False
        # Where the items the caller keeps for itself begin (spec.caller_items): the
        # input's end less them, when the input's length is known. The end is after the
        # items in flight: counted from first_index, items sent ahead while sampling
        # moved it that many items too soon, and the caller ran them all (7 of 16).
        self.held_from = (self.read_pos + n_left - spec.caller_items
                          if spec.caller_items and n_left is not None and spec.timeout is None
                          else None)
        self.error_at: Optional[int] = None  # the first failing item seen so far
        self.cross = _CannotCross(func, spec)
        self.local_items = 0  # items run here instead: they could not cross
        self.interrupted = False  # Ctrl-C or a time-out: the executor's workers are ended
        self._t0 = 0.0

    def __iter__(self) -> Iterator[list[Any]]:
        return self.run()

    # --- the loop, top to bottom ------------------------------------------------------

    def run(self) -> Iterator[list[Any]]:
        self._open()
        clean = False
        try:
            if (self.probe is not None and not self.probe.sent.is_set()
                    and self.held_from is None):
                # Its workers are still being spawned (by another thread: a template's
                # wait for the template's start): a chunk submitted now would wait
                # with them; the caller runs items meanwhile.
                self._share_while_cold(self.probe.sent)
            self._submit_more()
            self._record(len(self.pending))
            self._share_while_cold()
            while True:
                self._submit_more()
                self._record(len(self.pending))
                yield from self._ready()
                if self.error_at is not None:
                    self._drop_work_after_error()
                if not self.pending and not self.retry:
                    if self.exhausted or self.error_at is not None:
                        yield from self._ready()
                        break
                    continue
                done, _ = cf.wait(list(self.pending), timeout=self._next_wake(),
                                  return_when=cf.FIRST_COMPLETED)
                for fut in sorted(done, key=lambda f: self.pending[f].start):
                    self._collect(fut)
                if not done:
                    self.target.check(self.executor)
                self._check_deadlines()
            self._record(0)
            clean = True
            if self.executor is not None:
                self.target.finish(self.executor, self.probe)
        except KeyboardInterrupt as exc:
            # Ctrl-C (not an item's own KeyboardInterrupt, which carries its index):
            # the workers are ended with the map.
            self.interrupted = self.interrupted or item_of(exc) is None
            raise
        except GeneratorExit:
            # Closed early with chunks still running (imap left by Ctrl-C in the
            # consumer's own code, or by a break): nothing is to run on unwatched, so
            # their workers are ended, as joblib does when its generator is dropped.
            self.interrupted = self.interrupted or bool(self.pending)
            raise
        finally:
            self.throttle.stop.set()
            if self.executor is not None:
                self.target.close(self.executor, clean, self.interrupted)
            for fut, info in self.pending.items():
                self.target.cancel(fut, info.executor)

    def drain(self) -> None:
        """Send nothing more: the chunks in flight finish and their results come, then
        the run ends; the rest of the input stays unread, for the caller to run."""
        self.exhausted = True

    def _open(self) -> None:
        try:
            self.executor, self.probe = self.target.open(self.n_workers)
        except PoolGone:
            if not system.shutting_down():
                raise
            # The main thread returned before this map's pool could start (a non-daemon
            # thread's map): no pool can start now; every item runs here (_send).
            self.executor, self.probe = None, None
            self.cross.caller_only = True
            self.cross.reason = self.cross.reason or (
                "the interpreter began shutting down before the pool could start")
        except OSError as exc:
            if from_a_signal_handler(exc):
                raise
            # The pool's queues, semaphores, pipes or processes could not be made (the
            # process is at its limit of open files or of processes, RLIMIT_NOFILE /
            # RLIMIT_NPROC): the loop needs none of them, so its items run here, as a
            # pool that refuses a chunk's items does (_send). It raised EMFILE.
            self.executor, self.probe = None, None
            self.cross.warn(f"the pool could not start ({exc})", exc)
            self.cross.caller_only = True
        self.capacity = self.target.capacity()
        self._t0 = time.perf_counter()
        if self.probe is not None:
            # Its pings are queued ahead of our chunks (maybe by a pool started ahead of
            # this map): the first answer means a worker is up.
            self.warm = self.probe.first
        else:
            self.warm.set()
            self.warm_at = self._t0
        if self.monitor is not None:
            threading.Thread(target=_monitor,
                             args=(self.throttle, self.monitor, self.on_workers),
                             name="adaptive_exec-monitor", daemon=True).start()

    def _share_while_cold(self, until: Optional[threading.Event] = None) -> None:
        """Cold pool: keep the caller busy with items until a worker answers (or
        ``until`` is set). (Not with a timeout: an item running here could not be
        stopped.)"""
        if (self.warm.is_set() or self.timeout is not None or self.error_at is not None
                or not self.spec.helps_cold or self._too_long_to_share()):
            return
        local: list[Any] = []
        local_start = self.read_pos
        err: Optional[BaseException] = None
        while not self.warm.is_set() and not (until is not None and until.is_set()):
            item = next(self.source, _END)
            if item is _END:
                self.exhausted = True
                break
            self.read_pos += 1
            self.chunks.taken(1)
            out, err = _run_here(self.func, [item], self.read_pos - 1, self.spec)
            local.extend(out)
            if err is not None:
                self.error_at = self.read_pos - 1
                break
        if local or err is not None:
            self.buffer[local_start] = (local, self.read_pos - local_start, err)

    def _too_long_to_share(self) -> bool:
        """Would an item run here hold the caller well past the pool's start-up? The
        workers then wait for it: their chunks go out through threads of this process,
        which a call holding the GIL keeps from running (memory_heavy: a 0.14 s call
        zero-filling 200 MB in C, run here while the pool started, kept both workers,
        up after ~25 ms, idle until it returned)."""
        startup = self.spec.startup_s
        return startup is not None and self.spec.item_s > SHARE_MAX * startup

    def _run_held(self) -> None:
        """The items the caller keeps for itself (spec.caller_items), run here while the
        workers run theirs, once every other item is handed out: the input's last ones.
        The input ends with them."""
        start = self.read_pos
        out, err = _run_here(self.func, list(self.source), start, self.spec)
        n = len(out) + (err is not None)
        self.read_pos += n
        self.chunks.taken(n)
        self.exhausted = True
        if err is not None:
            self.error_at = start + len(out)
        if n:
            self.buffer[start] = (out, n, err)

    # --- sending ------------------------------------------------------------------------

    def _limit(self) -> int:
        if self.retry or any(info.crashes for info in self.pending.values()):
            return 1
        if (self.spec.ordered and self.pending
                and len(self.buffer) >= BUFFERED_PER_WORKER * self.n_workers):
            return 0  # results wait for an earlier chunk: send nothing new meanwhile
        target = self.throttle.get()
        if self.timeout is not None:
            return target  # no queue: an item's clock starts when it is sent
        # With every worker allowed, one chunk queued per worker keeps them fed; with
        # fewer, exactly that many chunks, so only that many workers are busy. A pool
        # larger than the run's workers (max_workers=1 on a warm pool of 2) would start
        # queued chunks at once: no queue then either.
        if target >= self.n_workers and self.capacity <= self.n_workers:
            return target * IN_FLIGHT_PER_WORKER
        return target

    def _submit_more(self) -> None:
        while len(self.pending) < self._limit():
            if self.retry:
                # Even after an error: a chunk retried here comes before it (later ones
                # were dropped), and its results are yielded first. Holding it back
                # left the loop waiting on nothing, for ever.
                self._send(self.retry.popleft())
                continue
            if self.exhausted or self.error_at is not None:
                return
            size = self.chunks.next()
            if self.held_from is not None:
                size = min(size, self.held_from - self.read_pos)
                if size <= 0:
                    self._run_held()  # every other item is handed out
                    return
            chunk = list(itertools.islice(self.source, size))
            if not chunk:
                self.exhausted = True
                return
            start, self.read_pos = self.read_pos, self.read_pos + len(chunk)
            self.chunks.taken(len(chunk))
            self._send(Pending(start, chunk))

    def _send(self, info: Pending, full: bool = False) -> None:
        if self.cross.caller_only:
            self._run_locally(info)
            return
        for _ in range(3):
            try:
                fut = self.target.submit(self.executor, info.items, info.start, full)
                break
            except PoolGone:
                if not system.shutting_down():
                    try:
                        # Another thread's map replaced or ended the pool: use the
                        # current one.
                        self.executor, _ = self.target.open(self.n_workers)
                        continue
                    except PoolGone:
                        pass  # the interpreter began to end meanwhile
                self._run_rest_here(info)
                return
            except AdaptiveExecError:
                raise  # ours (a cluster that went away...): not a pickling failure
            except Exception as exc:
                if from_a_signal_handler(exc):
                    raise  # the caller's own (a SIGALRM handler's): not a refused start
                if system.shutting_down():
                    self._run_rest_here(info)
                    return
                offset = _first_unpicklable(info.items)
                if offset is None:  # each item pickles: the pool failed (a start refused)
                    self.cross.warn(f"the pool could not take items {info.start}-"
                                    f"{info.start + len(info.items) - 1} ({exc})", exc)
                else:
                    at = info.start + offset
                    self.cross.warn(f"item {at} cannot be pickled to reach a worker ({exc})",
                                    exc, index=at)
                self._run_locally(info)
                return
        else:
            if self.timeout is not None:  # its items cannot be stopped here
                msg = "the process pool kept being replaced by other threads' maps"
                raise WorkerCrashedError(msg, index=info.start)
            # Other threads' maps ended or replaced the pool each time it was taken (a
            # thread closing imaps early in a loop ends the workers each time): this
            # chunk runs here, as the loop runs it, and the next tries the pool again.
            # Raised, it broke a map the loop completes (a CI run beside its suites).
            self._run_locally(info)
            return
        info.submitted = time.perf_counter()
        info.executor = self.executor
        self.pending[fut] = info

    def _run_rest_here(self, info: Pending) -> None:
        """The main thread returned during the map (a thread that outlived it): the pool
        takes no more work ("cannot schedule new futures after interpreter shutdown")
        and none can start. Not a pickling failure: the rest runs here, no warning."""
        self.cross.caller_only = True
        self.cross.reason = self.cross.reason or (
            "the interpreter began shutting down during the map")
        self._run_locally(info)

    def _run_locally(self, info: Pending) -> None:
        self.local_items += len(info.items)
        out, err = _run_here(self.func, info.items, info.start, self.spec)
        self._keep(info, out, err)

    def _keep(self, info: Pending, results: list[Any], err: Optional[BaseException]) -> None:
        """A chunk's outcome, waiting for its turn."""
        if err is not None:
            at = item_of(err)
            if at is None:
                at = info.start + len(results)
            if self.error_at is None or at < self.error_at:
                self.error_at = at
        self.buffer[info.start] = (results, info.n, err)

    # --- receiving ----------------------------------------------------------------------

    def _collect(self, fut: cf.Future) -> None:
        info = self.pending.pop(fut)
        try:
            res: ChunkResult = fut.result()
        except cf.CancelledError:
            return
        except WorkerCrashedError as exc:
            # A target that gave up on the chunk itself (dask: KilledWorker, after the
            # scheduler's own retries). Raised in its turn, after the items before it.
            self._keep(info, [], attach_origin(exc, info.start, None))
            return
        except Exception as exc:
            if self.target.is_death(exc) or isinstance(exc, ClusterError):
                self._crashed(info, exc)
                return
            raise
        if res.status == NEED_FUNCTION:  # a worker new to this function: send it whole
            self._send(info, full=True)
            return
        compute_s = res.compute_s - self._setup_in(res)
        self.worker_compute_s += compute_s
        self.worker_queued_s += res.queued_s
        self.worker_items += res.n_done
        self.chunks.observe(compute_s, res.n_done)
        if res.n_done and len(self.chunk_item_s) < SPREAD_CHUNKS:
            self.chunk_item_s.append((res.n_done, compute_s / res.n_done))
        err_index = res.error_index
        if res.status == FALLBACK:
            self.local_items += info.n if res.holes is None else len(res.holes)
            results, err, err_index = self.cross.fall_back(info, res, self.target)
        else:
            try:
                results, err = self.target.decode(res)
            except Exception as exc:  # results this process cannot unpickle
                if from_a_signal_handler(exc):
                    raise
                self.cross.warn(f"the results of items from index {info.start} cannot "
                                  f"be unpickled in the caller ({exc})", exc)
                self.cross.caller_only = True
                self.local_items += len(info.items)
                results, err = _run_here(self.func, info.items, info.start, self.spec)
                err_index = None
        if err is not None and err_index is not None:
            # From another process (loky, dask), the worker's traceback is text to
            # chain; a thread's exception still carries its own.
            attach_origin(err, err_index, res.error_tb if self.target.remote else None)
        self._keep(info, results, err)

    def _setup_in(self, res: ChunkResult) -> float:
        """The one-time set-up in a worker's first call of the function, when it stands
        out from the per-item time (as sampling.SETUP_RATIO tells it in the caller):
        noted (``setups``) and not counted as the items' work, which chunk sizes and
        the remembered per-item time follow."""
        first = res.first_call_s
        typical = self.chunks.per_item_s or self.spec.item_s
        if first is None or not typical:
            return 0.0
        if res.n_done > 1:  # the chunk's other calls say what an item costs here
            typical = max(0.0, res.compute_s - first) / (res.n_done - 1)
        excess = first - typical
        if first > SETUP_RATIO * typical and excess >= SETUP_MIN_S:
            self.setups.append(excess)
            return excess
        return 0.0

    def _crashed(self, info: Pending, exc: BaseException) -> None:
        """The pool broke while ``info`` was in it: rebuild, and retry or name."""
        # Asked first: ending the broken pool from here kills its live workers too.
        where = getattr(self.target, "ran_where_it_broke", None)
        verdict = where(info.start, info.executor, exc) if where is not None else None
        self.executor, deliberate = self.target.recover(self.executor, info.executor,
                                                        self.n_workers)
        if deliberate:  # ended by a time-out, Ctrl-C or growth, maybe another thread's
            self.retry.append(info)
            return
        if verdict is False or (verdict == NOT_BEGUN and info.spared < SPARED_MAX):
            # It ran in a worker loky killed only as it ended the pool: another chunk's
            # worker died first (another thread's map's, maybe). Counted, it was named
            # the culprit once that chunk had broken two pools under it.
            info.spared += 1
            self.retry.append(info)
            return
        info.crashes += 1
        # dask: the task was lost with the workers that held it or its function.
        lost = isinstance(exc, ClusterError)
        code, how = (None, str(exc)) if lost else self.target.describe_death(exc)
        if info.n == 1 and info.crashes >= 2:
            msg = (f"item {info.start} was lost twice with the dask workers running it "
                   f"({exc})" if lost else
                   f"item {info.start} killed its worker process twice ({how})")
            err = WorkerCrashedError(msg, index=info.start, exitcode=code)
            err.__cause__ = exc
            # Raised in its turn, after the results and errors of the items before it.
            self._keep(info, [], attach_origin(err, info.start, None))
            return
        if info.crashes >= 2:
            # The chunk broke a pool alone: narrow it down to the item, each alone.
            for offset, item in enumerate(info.items):
                self.retry.append(Pending(info.start + offset, [item], crashes=1))
        else:
            self.retry.append(info)
        logger.debug("a worker died (%s); items %d..%d will run again", how, info.start,
                     info.start + info.n - 1)

    def _check_deadlines(self) -> None:
        """With a timeout: an item running past it ends the map, and its pool."""
        if self.timeout is None:
            return
        now = time.perf_counter()
        if self.warm_at is None:
            if not self.warm.is_set():
                return  # start-up does not count against any item
            self.warm_at = now
        for fut, info in self.pending.items():
            initializing = self._initializing(info)
            if initializing is not None:
                # The initializer's time is not an item's (it may load a model for
                # longer than an item may take): it gets the set-up's allowance.
                limit = self.timeout + UNNOTED_START_S
                if not fut.done() and now - initializing > limit:
                    self.interrupted = True
                    msg = (f"the map's initializer did not return within {limit:g} s in "
                           f"a worker (timeout={self.timeout:g} s per item, plus "
                           f"{UNNOTED_START_S:g} s for a worker's set-up); no item ran "
                           "there, and its worker was ended")
                    raise attach_origin(InitializerError(msg), info.start, None)
                continue
            began = self._began(info)
            if began is not None and not fut.done() and now - began > self.timeout:
                self.interrupted = True  # its worker is ended with the pool
                msg = (f"item {info.start} ran past the timeout of {self.timeout:g} s; "
                       "its worker was ended")
                raise attach_origin(ItemTimeoutError(msg), info.start, None)

    def _initializing(self, info: Pending) -> Optional[float]:
        """When the worker that took a timed chunk began the map's initializer, which
        has not returned (perf_counter seconds); None otherwise."""
        initializer_started = getattr(self.target, "initializer_started", None)
        at = initializer_started(info.start) if initializer_started is not None else None
        return None if at is None else at + (time.perf_counter() - time.monotonic())

    def _began(self, info: Pending) -> Optional[float]:
        """When a timed chunk's item began (perf_counter seconds), or None while it has
        not: noted by its worker where the target can (worker.ItemClock), so that the
        time its function takes to arrive is not the item's; else when it was sent (or
        the pool came up, whichever is later)."""
        assert self.warm_at is not None
        sent = max(info.submitted, self.warm_at)
        item_started = getattr(self.target, "item_started", None)
        if item_started is None or getattr(self.target, "clock", None) is None:
            return sent
        at = item_started(info.start)
        if at is not None:
            return at + (time.perf_counter() - time.monotonic())
        if self._initializing(info) is not None:
            return None  # its items have not begun: the initializer runs (its own limit)
        if time.perf_counter() - sent > self.timeout + UNNOTED_START_S:  # type: ignore[operator]
            return sent  # never noted (its worker could not write it): count from sending
        return None

    def _next_wake(self) -> float:
        if self.timeout is None or self.warm_at is None or not self.pending:
            return WAKE_S
        began = [b for b in map(self._began, self.pending.values()) if b is not None]
        if not began:
            return WAKE_S
        return max(0.005, min(WAKE_S, min(began) + self.timeout - time.perf_counter()))

    # --- giving back ----------------------------------------------------------------------

    def _ready(self) -> Iterator[list[Any]]:
        if self.spec.ordered:
            while self.next_out in self.buffer:
                results, n, err = self.buffer.pop(self.next_out)
                if results:
                    yield results
                if err is not None:
                    raise err
                self.next_out += n
        else:
            for start in sorted(self.buffer):
                if self.error_at is not None and start > self.error_at:
                    # After the failing item: the loop never runs it. (Those that
                    # finished before the failure was known have come out already: in
                    # completion order that cannot be helped.)
                    del self.buffer[start]
                    continue
                results, n, err = self.buffer[start]
                if err is not None and self._to_come_before(start):
                    # The failing chunk's results before its error now; the error once
                    # every chunk before it has come out: it was raised at once, and
                    # results before it that were still running were lost (35 of 37).
                    if results:
                        self.buffer[start] = ([], n, err)
                        yield results
                    continue
                del self.buffer[start]
                if results:
                    yield results
                if err is not None:
                    raise err

    def _to_come_before(self, start: int) -> bool:
        """Is a chunk that starts before ``start`` still running or to be run again?"""
        return (any(info.start < start for info in self.pending.values())
                or any(info.start < start for info in self.retry))

    def _drop_work_after_error(self) -> None:
        """Work after the failing item is not needed: cancel what has not started; what
        runs finishes in its worker, unwatched."""
        assert self.error_at is not None
        for fut, info in list(self.pending.items()):
            if info.start > self.error_at:
                self.target.cancel(fut, info.executor)
                del self.pending[fut]
        self.retry = collections.deque(i for i in self.retry if i.start < self.error_at)

    # --- small things -----------------------------------------------------------------------

    def _record(self, active: int) -> None:
        active = min(active, self.n_workers, self.throttle.get())
        if not self.timeline or self.timeline[-1][1] != active:
            self.timeline.append((round(time.perf_counter() - self._t0, 4), active))
