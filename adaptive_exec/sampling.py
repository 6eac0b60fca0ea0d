"""Timed first calls, run in the caller, whose results are kept.

Each sampled item runs exactly once and its result is part of the answer: there is no
dry run, so side effects are not repeated (the seed ran the function 2N+1 times). The
sample stops when it has enough signal: a time budget (so a 2 s function is sampled on
one item) or an item budget (so a 1 µs function costs microseconds).
"""

from __future__ import annotations

import math
import pickle
import sys
import time
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Optional

from .errors import from_a_signal_handler
from .records import Features
from .system import ThreadWaits
from .worker import call_each, cloudpickle_dumps, runqueue_wait_s

# 20 ms of sampling: below the noise of a scheduler tick on a busy machine a single
# timing is unreliable, above it a workload of a few hundred ms pays more than 5%.
TIME_BUDGET_S = 0.02
ITEM_BUDGET = 256
# Sizes and memory are measured on the first few items only: pickling a 200 KB result
# costs about as much as the work of a small function.
N_SIZED = 3

if sys.platform == "darwin":  # ru_maxrss is in bytes on macOS, kilobytes elsewhere
    _MAXRSS_UNIT = 1
else:
    _MAXRSS_UNIT = 1024


def _maxrss() -> Optional[int]:
    try:
        import resource
    except ImportError:  # Windows
        return None
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * _MAXRSS_UNIT


class _PeakMemory:
    """Bytes one call raised the process's resident memory by, at its peak.

    On Linux, writing "5" to /proc/self/clear_refs resets the peak (VmHWM) to the
    current RSS, so peak-after minus RSS-before is exact for each call, whatever the
    process did before (a few file operations, ~20 µs). Elsewhere ru_maxrss is the
    fallback: it only sees calls that push the process past its lifetime peak.
    """

    def __init__(self) -> None:
        self.exact = self._reset()

    @staticmethod
    def _reset() -> bool:
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
            return True
        except OSError:
            return False

    @staticmethod
    def _status_kb(field: bytes) -> Optional[int]:
        try:
            with open("/proc/self/status", "rb") as f:
                for line in f:
                    if line.startswith(field):
                        return int(line.split()[1]) * 1024
        except (OSError, ValueError, IndexError):
            pass
        return None

    def before(self) -> Optional[int]:
        if self.exact and self._reset():
            return self._status_kb(b"VmRSS:")
        return _maxrss()

    def after(self, before: Optional[int]) -> Optional[int]:
        if before is None:
            return None
        now = self._status_kb(b"VmHWM:") if self.exact else _maxrss()
        return None if now is None else max(0, now - before)


@dataclass
class Sample:
    results: list[Any]
    features: Optional[Features]  # None when the iterator was empty
    exhausted: bool  # the iterator ended during sampling
    wall_s: float  # time spent sampling, the sampled calls included
    calls_s: float  # time spent inside the sampled calls
    error: Optional[BaseException] = None  # raised by the item after ``results``
    # perf_counter() when the first call ended: its one-time set-up was paid here then.
    first_done_at: Optional[float] = None


def _pickled_size(obj: Any) -> Optional[int]:
    """Its size as it would travel: by the standard pickler, or where that refuses it
    (a lambda, a memoryview), by cloudpickle, as worker.dumps sends it; None where
    neither can (a lock, an open file)."""
    try:
        return len(pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL))
    except Exception as exc:
        if from_a_signal_handler(exc):
            raise  # the caller's own (a SIGALRM handler's time-out), as in the loop
    try:
        return len(cloudpickle_dumps(obj))
    except Exception as exc:
        if from_a_signal_handler(exc):
            raise
        return None


def sample(
    func: Callable[..., Any],
    items: Iterator[Any],
    *,
    star: bool,
    complexity: int,
    time_budget_s: float = TIME_BUDGET_S,
    item_budget: int = ITEM_BUDGET,
    on_item: Optional[Callable[[int], float]] = None,
    ours_cpu: Optional[Callable[[], float]] = None,
    keep_going: Optional[Callable[[int], bool]] = None,
    waits: Optional[ThreadWaits] = None,
    crowded: Optional[Callable[[], bool]] = None,
    sizes_to: Optional[list[int]] = None,
) -> Sample:
    """Run ``func`` on the first items of ``items`` (consumed) until the budget is spent.

    An exception from ``func`` ends the sample; it is returned (index attached) with
    the results before it, which the caller yields first, as the plain loop would.
    ``on_item(calls completed)``, when given, is called after each call, outside its
    timing, and returns the CPU seconds it spent (then neither that nor its time is the
    function's);
    ``ours_cpu()`` is CPU that other threads of ours spent meanwhile (not the function's);
    ``keep_going(calls completed)``, when given, says the sample must go on past its
    budgets (items were kept for it, or are about to be: ahead.SharedSource);
    ``waits``, looked at by another thread meanwhile, says what the calls waited on;
    ``crowded()`` says whether items of this map run in our workers beside the calls
    (sent ahead): a call's time waiting for a CPU they hold is then not its cost;
    ``sizes_to`` gets each sized call's pickled input plus result bytes, as measured.
    """
    watch = _Watch(time_budget_s, item_budget, on_item, keep_going, crowded)
    watch.sizes_to = sizes_to
    watch.waits = waits
    results: list[Any] = []
    cpu_start = time.thread_time()
    process_start = time.process_time()
    queued_start = runqueue_wait_s()
    error = call_each(func, items, star, 0, results, in_caller=True, measure=watch)
    wall = time.perf_counter() - watch.start - watch.hook_wall
    cpu_used = time.thread_time() - cpu_start - watch.hook_cpu
    queued = runqueue_wait_s() - queued_start
    others = (time.process_time() - process_start - cpu_used - watch.hook_cpu
              - (ours_cpu() if ours_cpu else 0.0))
    durations = watch.durations
    if not durations:
        return Sample(results, None, True, wall, 0.0, error)
    first = None
    if watch.first is not None:
        t1, cpu1, queued1, mark = watch.first
        cpu_first = cpu1 - cpu_start
        first = (cpu_first, max(t1 - watch.start - (queued1 - queued_start), cpu_first), mark)
    return Sample(
        results=results,
        features=features_from(
            durations, watch.in_sizes, watch.out_sizes, watch.peak, complexity, cpu_used,
            max(wall - queued, cpu_used), watch.picklable, max(0.0, others),
            waits=waits, first_call=first,
        ),
        exhausted=not watch.stopped,
        wall_s=wall,
        calls_s=math.fsum(durations),
        error=error,
        first_done_at=watch.first_end,
    )


class _Watch:
    """Each sampled call's time, and for the first ones its memory and pickled sizes;
    says when the budget is spent (worker.Measure)."""

    def __init__(self, time_budget_s: float, item_budget: int,
                 on_item: Optional[Callable[[int], float]],
                 keep_going: Optional[Callable[[int], bool]] = None,
                 crowded: Optional[Callable[[], bool]] = None) -> None:
        self.time_budget_s = time_budget_s
        self.crowded = crowded
        self.sizes_to: Optional[list[int]] = None
        self._queued0: Optional[float] = None
        self.item_budget = item_budget
        self.on_item = on_item
        self.keep_going = keep_going
        self.hook_cpu = 0.0  # CPU seconds and wall seconds that on_item spent
        self.hook_wall = 0.0
        self.memory = _PeakMemory()
        self.durations: list[float] = []
        self.in_sizes: list[int] = []
        self.out_sizes: list[int] = []
        self.peak = 0
        self.picklable = True
        self.stopped = False  # the budget ended the sample, not the items
        self.setup_first = False  # the first call stood out from the second: a set-up
        self.first_end: Optional[float] = None  # perf_counter() when the first call ended
        self.waits: Optional[ThreadWaits] = None  # looked at by another thread (sample)
        # At the first call's end: (perf_counter, thread CPU, run-queue wait, the waits'
        # mark), so that what the next calls alone showed can be told should the first
        # have paid a one-time cost (features_from).
        self.first: Optional[tuple[float, float, float, Any]] = None
        self._rss: Optional[int] = None
        self._t0 = 0.0
        self.start = time.perf_counter()

    def before(self, item: Any) -> None:
        first = len(self.durations) < N_SIZED
        if first:
            self._rss = self.memory.before()
        # Read for the first call (the long call items are sent ahead of, mostly) and
        # once they run: ~11 us a read, nothing beside the calls that crowd it.
        self._queued0 = (runqueue_wait_s() if self.crowded is not None
                         and (not self.durations or self.crowded()) else None)
        self._t0 = time.perf_counter()  # last: only the call is timed

    def after(self, item: Any, result: Any) -> bool:
        t1 = time.perf_counter()  # first
        took = t1 - self._t0
        if self._queued0 is not None and self.crowded is not None and self.crowded():
            # Our workers ran items beside this call: its time runnable but waiting for
            # a CPU they held is theirs (measured: a 0.3 s call took 0.54 s beside two
            # workers on 2 cores, and the cache remembered 0.48 s an item).
            took = max(0.0, took - (runqueue_wait_s() - self._queued0))
        self.durations.append(took)
        n = len(self.durations)
        # Sized before on_item: a pool it would start early is no use for results
        # that cost more to move than to compute (adapt.SamplingWatch reads sizes_to).
        if n <= N_SIZED:
            grown = self.memory.after(self._rss)
            if grown is not None:
                self.peak = max(self.peak, grown)
            in_size, out_size = _pickled_size(item), _pickled_size(result)
            if in_size is None or out_size is None:
                self.picklable = False
            else:
                self.in_sizes.append(in_size)
                self.out_sizes.append(out_size)
                if self.sizes_to is not None:
                    self.sizes_to.append(in_size + out_size)
        hooks_before = self.hook_wall
        if self.on_item is not None:
            spent = self.on_item(n)
            if spent:
                # It did something (forked the pool's workers): neither its CPU nor its
                # time is the function's. (The clock is read only then.)
                self.hook_cpu += spent
                self.hook_wall += time.perf_counter() - t1
        if n == 1:
            self.first_end = t1
            self.first = (t1, time.thread_time() - self.hook_cpu, runqueue_wait_s(),
                          self.waits.mark() if self.waits is not None else None)
        elif n == 2:
            d0, d1 = self.durations
            self.setup_first = d0 > SETUP_RATIO * d1 and d0 - d1 >= SETUP_MIN_S
        # The budget is the calls' time: a fork made between two calls (on_item) is not
        # sampling, and counting it ended the sample of 0.2 ms items at 8 calls. Nor is
        # a first call that paid a one-time set-up: the per-item cost is the next calls'
        # (first_call_setup: sampled on one call after a 0.3 s set-up, 0.8 ms an item
        # for 1.8, then planned serial).
        spent = t1 - self.start - hooks_before - (self.durations[0] if self.setup_first else 0)
        if n >= self.item_budget or spent >= self.time_budget_s:
            self.stopped = self.keep_going is None or not self.keep_going(n)
        return self.stopped


# A first call this many times slower than the median of the next ones, and by at least
# SETUP_MIN_S, paid a one-time set-up (an import, a lazily built table, a connection):
# its excess is not the per-item cost (issue 14: planned from such a call, 1.8 s of work
# was estimated at 171 s, in chunks of 1). Judgements: a cold first call of a tiny
# function is often 2-3x the next ones, and under a millisecond nothing is planned on it.
SETUP_RATIO = 3.0
SETUP_MIN_S = 0.001


def _split_setup(durations: list[float]) -> tuple[list[float], Optional[float]]:
    """(the per-item durations, the first call's one-time excess or None)."""
    if len(durations) < 2:
        return durations, None
    rest = sorted(durations[1:])
    median = rest[len(rest) // 2] if len(rest) % 2 else (
        rest[len(rest) // 2 - 1] + rest[len(rest) // 2]) / 2
    excess = durations[0] - median
    if durations[0] > SETUP_RATIO * median and excess >= SETUP_MIN_S:
        return durations[1:], excess
    return durations, None


def features_from(
    durations: list[float],
    in_sizes: list[int],
    out_sizes: list[int],
    peak: int,
    complexity: int,
    cpu_s: float,
    wall_s: float,
    picklable: bool,
    others_cpu_s: float = 0.0,
    split_setup: bool = True,
    waits: Optional[ThreadWaits] = None,
    first_call: Optional[tuple[float, float, Any]] = None,
) -> Features:
    """``first_call``: (CPU seconds, wall seconds, the waits' mark) at the first call's
    end: where that call paid a one-time cost, the CPU share and what the calls waited
    on are the next calls' (a first call that read a library from the disk is no sign
    that the function waits)."""
    durations, setup = _split_setup(durations) if split_setup else (durations, None)
    wait_share = waits.share() if waits is not None else None
    waits_on = waits.mostly() if waits is not None else None
    # Other threads' CPU (BLAS's) is the whole sample's: over its whole time. (Over the
    # later calls' alone, a watch's and a pool's start read as 2 CPUs of the function's
    # own threads, and a remembered map went serial.)
    threads_cpu = others_cpu_s / wall_s if wall_s > 0 else None
    if setup is not None and first_call is not None:
        cpu_first, wall_first, mark = first_call
        cpu_s, wall_s = max(0.0, cpu_s - cpu_first), max(0.0, wall_s - wall_first)
        if waits is not None and waits.share(mark) is not None:
            # Where the later calls were looked at enough to tell (a call or two of a
            # millisecond are not: their CPU share beside busy workers read 35%, and
            # with no looks of their own that alone planned threads).
            wait_share, waits_on = waits.share(mark), waits.mostly(mark)
    if wait_share is None:
        # Looked at too few times to tell (a watch starved on a crowded machine): what
        # those looks saw is no finding either. Features said "waits on sockets" with
        # no share beside it, which reports and the plan then read differently.
        waits_on = None
    n = len(durations)
    mean = math.fsum(durations) / n
    cv: Optional[float] = None
    if n >= 2 and mean > 0:
        var = math.fsum((d - mean) ** 2 for d in durations) / (n - 1)
        cv = math.sqrt(var) / mean
    return Features(
        mean_s=mean,
        coefficient_of_variation=cv,
        pickle_size=int(sum(out_sizes) / len(out_sizes)) if out_sizes else None,
        input_pickle_size=int(sum(in_sizes) / len(in_sizes)) if in_sizes else None,
        peak_memory=peak,
        function_complexity=complexity,
        n_samples=n + (setup is not None),
        cpu_fraction=min(1.0, cpu_s / wall_s) if wall_s > 0 else None,
        picklable=picklable,
        threads_cpu=threads_cpu,
        setup_s=setup,
        wait_share=wait_share,
        waits_on=waits_on,
    )
