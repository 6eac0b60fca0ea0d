"""One map, as one object, read top to bottom:

    measure   remembered features (cache), or the first items run here, timed
    plan      features + this machine (CPUs, load, memory) + its constants -> Plan
    execute   the loop here, re-planned between chunks (it may move to the pool), or the
              pool / threads / a dask cluster through dispatch.ParallelRun
    record    what the run showed goes to the cache; the RunReport to its function

Iterating a ``MapRun`` yields lists of results (batches); api.py flattens or collects
them. Everything one map decides lives on its MapRun, so that several threads may map
one function at once.
"""

from __future__ import annotations

import array
import collections
import contextlib
import dataclasses
import hashlib
import itertools
import logging
import math
import operator
import pickle
import sys
import time
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Optional

from . import adapt, cache, calibration, planner, system, worker
from .ahead import SentAhead, SharedSource
from .backends import dask as dask_backend
from .backends import loky as loky_backend
from .backends import serial as serial_backend
from .backends import starts
from .backends.threads import ThreadTarget
from .dispatch import ParallelRun, Pending, RunSpec, observed_cv
from .errors import UnpicklableWarning, from_a_signal_handler, item_of, unenforced, warn_user
from .fingerprint import describe, function_complexity
from .records import (
    Calibration,
    Features,
    Options,
    Plan,
    RunReport,
    empty_plan,
    fmt_bytes,
    fmt_count,
    fmt_s,
    fmt_speedup,
)
from .sampling import features_from, sample
from .worker import BLOB_FILE_MIN_BYTES, FunctionRef, function_ref

logger = logging.getLogger("adaptive_exec")

# Unknown length (a generator): read ahead this much work before planning, so that a
# short stream is seen to be short. Bounded in items and bytes: never materialised.
READ_AHEAD_WORK_S = 1.0
READ_AHEAD_ITEMS = adapt.STREAM_ITEMS
READ_AHEAD_BYTES = 64 << 20
READ_AHEAD_WAIT_S = 0.05  # of reading the input itself: a judgement
# A serial run is re-planned between chunks; their duration starts here and doubles:
# a judgement, short enough that a workload which grows heavy moves to the pool early,
# long enough that re-planning (~0.1 ms) stays under 1% of the loop's time.
SERIAL_FIRST_CHUNK_S = 0.02
# A map of a remembered function that took less has its observation written later
# (cache.observe(defer=True)): the write was 3-4% of a 12 ms map. A judgement.
DEFER_UNDER_S = 0.05
SERIAL_MAX_CHUNK_S = 0.5
# A chunk of the loop that runs this many times its planned duration ends early
# (serial.Deadline), and the rest is re-planned from what it saw. Only for items of
# DEADLINE_MIN_ITEM_S or more: the clock read after each call (~0.2 us) is then under
# 1% of it, and tinier items keep the bare comprehension. Judgements.
DEADLINE_FACTOR = 4.0
DEADLINE_MIN_ITEM_S = 2e-5
# A run whose items cost more than this factor off what was planned says nothing about
# how well the pool delivers (the refreshed per-item time corrects that): it is not kept
# for the parallel correction, which would count the error twice (measured: skewed went
# serial for good when such runs were kept).
TELLING_RATIO = 2.0
# imap holds a batch's results until the consumer takes them: a batch is capped at about
# this many bytes of (pickled) results, as sampled. A judgement: 1 MB of results per
# chunk, with at most (IN_FLIGHT + BUFFERED) chunks per worker held (dispatch.py).
IMAP_CHUNK_BYTES = 1 << 20
# The fallback loop's chunk when the function cannot be pickled: big enough that the
# chunking costs nothing, small enough that imap's first results come early.
FALLBACK_CHUNK = 4096


@dataclass(frozen=True)
class MapKind:
    """Which map: ``func(*item)`` or ``func(item)``, results in order or as they come,
    results before an error given (imap) or not (map), or only the plan."""

    star: bool = False
    ordered: bool = True
    partial: bool = False
    plan_only: bool = False


class MapRun:
    """One map of ``func`` over ``it``: iterate it for batches of results."""

    def __init__(
        self,
        func: Callable[..., Any],
        options: Options,
        key: str,
        it: Iterator[Any],
        n_known: Optional[int],
        kind: MapKind,
        plain_calls: Callable[[], list[float]],
        on_report: Callable[[RunReport], None],
        items: Any = None,
    ):
        self.func = func
        self.items = items  # the input itself, for the list a crawler appends to
        self.options = options
        self.key = key  # the function's fingerprint: its cache entry
        self.it = it
        self.n_known = n_known
        self.star = kind.star
        self.ordered = kind.ordered
        self.partial = kind.partial  # imap: results before an error are yielded
        self.plan_only = kind.plan_only
        self.plain_calls = plain_calls  # takes the durations of plain calls since the last
        self.on_report = on_report
        self.t_start = time.perf_counter()
        # What the steps find out, in order:
        self.forced: Optional[str] = None  # why it must run in the caller
        self.client: Any = None  # the dask cluster it goes to
        self.load: Optional[system.LoadProbe] = None
        self.entry: Optional[cache.Entry] = None
        self.features: Optional[Features] = None
        self.n_sampled = 0
        self.ahead: Optional[SentAhead] = None  # items sent to the pool while sampling
        self.sampled_calls_s = 0.0
        self.exhausted = False  # every item was sampled
        self.n_items = 0
        self.n_exact = True  # n_items is the count, not a lower bound
        self.source: Iterator[Any] = it
        self.planner: adapt.MapPlanner
        self.plan: Optional[Plan] = None
        self.planned_s = 0.0  # from the call to the plan
        self.n_done = 0
        self.timeline: list[tuple[float, int]] = []
        self.observed_s: Optional[float] = None  # seconds per item seen while running
        # ...of which in the caller (its loop) and in a process pool's workers, apart:
        # they differ for a function that runs threads of its own (record()).
        self.observed_here_s: Optional[float] = None
        self.observed_pool_s: Optional[float] = None
        self.observed_cv: Optional[float] = None  # their spread, seen in the workers
        self.stay_serial = False  # the pool was ruled out during the run: no re-plan
        self.bytes_sent = 0  # pickled bytes handed to worker processes
        self.start_path: Optional[str] = None  # how the process pool's workers started
        self.ran: Optional[str] = None  # what ran, where it differs from the plan
        # Where the loop handed the rest to a pool (_serial's re-plan), when it did.
        self.moved_at: Optional[int] = None
        self.setups: list[float] = []  # one-time set-ups seen in workers' first calls
        # Items a pool or threads could not take, run in the caller instead (results or
        # items that cannot cross, a pool that could not start): their time is the loop's.
        self.n_fell_back = 0
        self.adjusted: Optional[str] = None  # how the run corrected a far-off plan
        # A threads run that lost its trial: (items, seconds) it ran on threads.
        self.threads_trial: Optional[tuple[int, float]] = None
        # Told what runs the items: the plan once known, again when it changes, and the
        # busy workers when the load monitor changes them (the progress bar, progress.py).
        self.on_plan: Optional[Callable[[Plan, Optional[int]], None]] = None

    def __iter__(self) -> Iterator[list[Any]]:
        try:
            yield from self._steps()
        except KeyboardInterrupt as exc:
            # Ctrl-C while sampling, planning or starting the pool ahead: end any pool
            # this map started (a start ahead still under way leaves none behind).
            if item_of(exc) is None:
                loky_backend.shutdown()
            raise
        except GeneratorExit:
            # Left by the consumer (a break, Ctrl-C in its own code) before any map used
            # the pool this one started (ahead, from the serial loop, or cold for its run):
            # it is not kept running. A warm pool stays, for the next map.
            started = getattr(getattr(self, "planner", None), "started_ahead", None)
            loky_backend.end_unused(started or loky_backend.current_executor())
            raise
        # The input iterator's own exception, after every result before it (as the loop).
        if isinstance(self.it, GuardedIterator) and self.it.error is not None:
            if not self.plan_only:
                self._report_ended(self.it.error, by_input=True)
            raise self.it.error

    def _steps(self) -> Iterator[list[Any]]:
        self.prepare()
        try:
            yield from self.measure()
            if self.features is None:  # no items at all
                self.plan = empty_plan()
                self.report()
                return
            self.count_items()
            self.decide()
            if self.plan_only:
                self.remember_sample()
                return
            yield from self.execute()
        except BaseException as exc:
            # A map that ends early has its report too (last_report described the map
            # before it): what it planned, and how far it got.
            if not self.plan_only:
                self._report_ended(exc)
            raise
        self.record()
        self.report()

    def _report_ended(self, exc: BaseException, by_input: bool = False) -> None:
        try:
            cause = exc.__cause__
            if (isinstance(exc, RuntimeError) and isinstance(cause, StopIteration)
                    and item_of(cause) is not None):
                exc = cause  # an item's StopIteration, through a generator (PEP 479)
            index = item_of(exc)
            if by_input:
                how = f"ended by its input iterator's {type(exc).__name__}"
            elif index is not None:  # an item's own exception, a GeneratorExit too
                how = f"ended by item {index:,}, which raised {type(exc).__name__}"
            elif isinstance(exc, GeneratorExit):
                how = "left by its consumer"
            elif isinstance(exc, KeyboardInterrupt):
                how = "interrupted (Ctrl-C)"
            else:
                how = f"ended by {type(exc).__name__}"
            ended = f"{how}; {fmt_count(self.n_done, 'result', 'results')} made"
            if self.plan is None:  # before a plan: while its first items ran here
                plan = empty_plan()
                sent = self.ahead
                if sent is not None:
                    # What ran beside them: an imap left at its first result said
                    # "serial", where 198 items had run on 64 threads.
                    where = "threads" if sent.on_threads else "the pool"
                    ended += (f"; {_span(self.n_sampled, self._n_ahead())} had gone to "
                              f"{where} while the first calls ran here")
                    plan = dataclasses.replace(
                        plan, mode="threads" if sent.on_threads else "parallel",
                        n_workers=sent.n_workers)
                self.plan = dataclasses.replace(plan, reason=ended)
            self.ran = "; ".join(part for part in (ended, self.ran) if part)
            self.report()
        except Exception:  # noqa: BLE001 - the map's own exception is what is raised
            logger.debug("no report for a map that ended early", exc_info=True)

    # --- the steps ----------------------------------------------------------------------

    def prepare(self) -> None:
        """Where this map may run, and what is remembered of the function."""
        self.forced = (adapt.forced_serial(self.options) or adapt.reentered()
                       or adapt.feeds_own_input(self.func, self.items))
        # The dask client, when this map may go to a cluster. Known before sampling: no
        # local pool is started ahead, nor local load measured, for a map going there.
        self.client = adapt.dask_client(self.options) if self.forced is None else None
        if self.options.cache and self.forced is None:
            self.entry = cache.lookup(self.key)
        if self.forced is None and self.client is None and adapt.pool_cpus(self.options):
            if self.entry is None:
                # Other processes' CPU load is measured over the sampling, from here to
                # the plan. (A cache hit has no such window: its plan reads the load
                # itself, and only if it may use a pool. Read here, it cost every map
                # ~0.2 ms, 1.4% of a 15 ms serial one.)
                self.load = system.LoadProbe(loky_backend.our_pids)
            if ((self.n_known is None or self.n_known >= 2)
                    and loky_backend.start_path() == starts.TEMPLATE):
                starts.start_template_ahead()  # a threaded caller's workers come from it
        if self.forced is not None and self.options.timeout is not None:
            # Said, not silently dropped: nothing here can stop an item in the caller.
            warn_user(f"adaptive_exec: timeout={self.options.timeout:g} s is not enforced: "
                      f"{self.forced}, so every item runs in the caller, with no time "
                      f"limit", RuntimeWarning)
        if self.options.initializer is not None and (self.options.timeout is None
                                                     or self.forced is not None):
            # Before any item runs here (sampled, serial, or while workers start); with
            # a timeout every item runs in a worker, none here, unless the map is forced
            # into the caller (then all of them do).
            worker.initialize_here(self.options.initializer, self.options.initargs,
                                   self._init_key())
        if self.forced is None:
            # This machine's constants, read here, before the first decision that uses
            # them, and on the caller's connection to the cache: the sampling watch
            # decides on them from its own thread, which would open a second connection
            # while the first item runs.
            calibration.get()
        self.planner = adapt.MapPlanner(self.options, self.func, self.t_start, self.forced,
                                        self.client, self.entry, self.load, self.key)

    def _here_initializer(self) -> Optional[Callable[[], None]]:
        """Runs the map's initializer in the caller (once per initargs: see
        worker.initialize_here), for a timed map, whose caller normally runs no item
        and so did not run it (prepare); None for any other map. Its key is made once
        (it pickles the initargs: per item, 47 MB of them took 17 s over 200 items)."""
        opts = self.options
        if opts.initializer is None or opts.timeout is None or self.forced is not None:
            return None
        key = self._init_key()
        return lambda: worker.initialize_here(opts.initializer, opts.initargs, key)

    def measure(self) -> Iterator[list[Any]]:
        """The function's features: remembered, or measured on the first items (whose
        results are kept and yielded first)."""
        cached = self.entry.features if self.entry is not None else None
        if self.forced is not None or (self.options.timeout is not None and cached is None):
            # Nothing sampled here: a forced-serial map needs no measurement, and with a
            # timeout every item, the first ones too, must run where it can be stopped.
            self.features = Features(0.0, None, None, None, None,
                                     function_complexity(self.func), 0, None)
            return
        if cached is not None:
            self.features = cached  # a hit: no sampling
            return
        # Items of a list, tuple or range may go to the pool while a long first call
        # runs here (ahead.py); a generator is advanced by this thread alone.
        source = (SharedSource(self.it) if self.n_known is not None and self.client is None
                  and not self.plan_only and isinstance(self.it, _SAFE_ITERATORS) else None)
        watch = adapt.SamplingWatch.start(self.options, self.n_known, source, self.func,
                                          self.star, bounded=self.partial
                                          ) if self.client is None else None
        try:
            s = sample(self.func, source if source is not None else self.it, star=self.star,
                       complexity=function_complexity(self.func),
                       on_item=watch.on_item if watch else None,
                       ours_cpu=watch.cpu_spent if watch else None,
                       keep_going=(lambda n: (source is not None and source.wants_more())
                                   or watch.wants_second(n))
                       if watch is not None else None,
                       waits=watch.waits if watch is not None else None,
                       crowded=(lambda: watch.ahead is not None) if watch is not None else None,
                       sizes_to=watch.sizes if watch is not None else None)
        except BaseException:
            if watch is not None:
                watch.abandon()  # Ctrl-C: nothing sent ahead runs on
            raise
        finally:
            if watch is not None:
                watch.stop()
        sent = watch.ahead if watch is not None else None
        if source is not None:
            self.it = source.rest()
            if source.leftover:
                # Read for the caller after its loop had ended: run in their turn, before
                # the items sent ahead (their indices come first).
                assert sent is not None, "items were handed over without a SentAhead"
                sent.unsent[:0] = [Pending(i, [item]) for i, item in source.leftover]
        try:
            if s.error is not None:
                if sent is not None and watch is not None:
                    watch.abandon()  # items after the failing one are not to run
                if s.results:
                    self.n_sampled = self.n_done = len(s.results)  # (for its report)
                    yield s.results
                raise s.error
            self.n_sampled = len(s.results)
            if self.n_sampled:
                # Its one-time set-up is paid here, and by workers forked since.
                adapt.note_ran_here(self.key, s.first_done_at)
            self.exhausted = s.exhausted and not (source is not None and source.cut)
            if sent is not None and (sent.pending or sent.unsent):
                self.ahead = sent
                self.planner.sent_at = sent.first_sent
            self.sampled_calls_s = s.calls_s
            self.features = _merge_plain_calls(s.features, self.plain_calls())
            if s.results and not self.plan_only:
                self.n_done = self.n_sampled  # (a map left here has them in its report)
                yield s.results  # before any read-ahead: a stream's first results come early
        except GeneratorExit:
            # Left by the consumer (a break, Ctrl-C in its own code) after the sample:
            # a pool started ahead for this map and never used is not kept running.
            if watch is not None:
                watch.abandon()
            raise

    def count_items(self) -> None:
        """The number of items: known, or found by reading a bounded stretch ahead."""
        assert self.features is not None
        if self.exhausted:
            self.n_items = self.n_sampled
        elif self.n_known is not None:
            self.n_items = self.n_known
        elif self.forced is not None:
            # Runs here whatever the count: the input is read as the loop reads it, one
            # item per call. Read ahead, a generator that the function's own effects
            # end (a flag it sets, a queue it fills) gave 10,000 results for the loop's 4,
            # or waited for good on a queue only the consumer of imap fills.
            self.n_items, self.n_exact = self.n_sampled, False
        else:
            buffered, ended = _read_ahead(self.it, self.features)
            self.n_items = self.n_sampled + len(buffered)
            self.n_exact = ended
            if not ended:
                self.n_items = max(self.n_items, self.n_sampled + READ_AHEAD_ITEMS)
            if buffered:
                self.source = itertools.chain(buffered, self.it)

    def decide(self) -> None:
        assert self.features is not None
        plan = self.planner.plan(self.features, self.n_items, self.n_sampled + self._n_ahead())
        if self.ahead is not None:
            where = "threads" if self.ahead.on_threads else "the pool"
            sent = (f"{_span(self.n_sampled, self._n_ahead())} went to {where} while the "
                    f"first call{'s' if self.n_sampled > 1 else ''} ran here")
            # The items in flight end about a start-up and their rounds after the first
            # was sent: the estimate (what the cache's correction learns from) covers
            # them. It did not: two_heavy's and few_heavy's cold runs were estimated at
            # one call's time (0.41 s for 0.70 s), and their warm runs then went serial.
            left = self._ahead_left_s()
            if self.n_exact and self.n_items == self.n_sampled + self._n_ahead():
                # Nothing left to plan: what ran is the pool, as sent. The loop would
                # have run the items sent ahead too (the planner's serial estimate was
                # only the time spent: "speedup 0.00x", the loop below the pool).
                est = time.perf_counter() - self.t_start + left
                serial = plan.estimated_serial_s + self._n_ahead() * self.features.mean_s
                speedup = serial / est if est > 0 else 0.0
                plan = dataclasses.replace(
                    plan, mode="threads" if self.ahead.on_threads else "parallel",
                    n_workers=self.ahead.n_workers, chunksize=1,
                    estimated_parallel_s=est, estimated_serial_s=serial,
                    estimated_speedup=speedup,
                    reason=(f"{sent} ({fmt_s(self.features.mean_s)} a call): that was all; "
                            f"estimated at {fmt_s(est)} in all, against {fmt_s(serial)} "
                            f"for the loop ({fmt_speedup(speedup)})"))
            else:
                # The reason's estimate and speedup are the plan's: the items still in
                # flight ahead are added to both, and said (they read 255.9 ms and 1.45x
                # where estimated_parallel_s was 288.2 ms, a speedup of 1.29x).
                est = plan.estimated_parallel_s + left
                speedup = plan.estimated_serial_s / est if est > 0 else 0.0
                more = (f"; with {fmt_s(left)} left of the items sent ahead: estimated "
                        f"at {fmt_s(est)} in all ({fmt_speedup(speedup)})" if left > 0 else "")
                plan = dataclasses.replace(
                    plan, reason=f"{sent}; the rest: {plan.reason}{more}",
                    estimated_parallel_s=est,
                    estimated_speedup=speedup if plan.mode != "serial" else
                    plan.estimated_speedup)
        if planner.blocked_by_pickling(self.features, plan,
                                       self.planner.forced_parallel() is not None):
            self._unpicklable("the sampled items or results cannot be pickled")
        self.plan = plan
        self.planned_s = time.perf_counter() - self.t_start
        self._announce(plan)
        if logger.isEnabledFor(logging.INFO):
            logger.info("plan for %s: mode=%s workers=%d chunksize=%d from_cache=%s: %s",
                        describe(self.func)[1], plan.mode, plan.n_workers, plan.chunksize,
                        plan.from_cache, plan.reason)

    def _n_ahead(self) -> int:
        return self.ahead.n_items if self.ahead is not None else 0

    def _ahead_left_s(self) -> float:
        """Seconds from now until the items sent ahead are done, about: from the first
        send, the pool's start-up, then their rounds over the workers they went to."""
        sent, features = self.ahead, self.features
        if sent is None or sent.first_sent is None or features is None:
            return 0.0
        rounds = math.ceil(self._n_ahead() / max(1, sent.n_workers))
        startup = 0.0 if sent.on_threads else adapt.pool_calibration().startup_for(
            sent.n_workers)
        end = sent.first_sent + startup + rounds * features.mean_s
        return max(0.0, end - time.perf_counter())

    def execute(self) -> Iterator[list[Any]]:
        assert self.plan is not None
        self.n_done = self.n_sampled
        if self.ahead is not None:
            yield from self._after_ahead(self.ahead, self.plan)
            return
        if self.plan.mode == "serial":
            yield from self._serial()
        else:
            yield from self._parallel(self.plan, self.n_sampled,
                                      self.n_items - self.n_sampled if self.n_exact else None)

    def record(self) -> None:
        """What the run showed, for the next map of this function (and other processes)."""
        assert self.plan is not None and self.features is not None
        if not self.options.cache or self.forced is not None:
            return
        if self.entry is None and self.features.n_samples == 0:
            # Nothing was measured here (a map with a timeout runs every item in a
            # worker, none sampled): the stand-in features (0 s an item) were stored as
            # the function's, and every later map planned serial on them, for good.
            return
        plan, features = self.plan, self.features
        estimate = plan.estimated_serial_s if plan.mode == "serial" else plan.estimated_parallel_s
        observed, ratio = self.observed_s, None
        if (features.threads_cpu or 0.0) > planner.OWN_THREADS_MIN:
            observed, ratio = self._own_threads_observed(features)
        telling = (observed is None
                   or 1 / TELLING_RATIO <= observed / max(features.mean_s, 1e-12)
                   <= TELLING_RATIO)
        module, qualname = describe(self.func)
        wall = time.perf_counter() - self.t_start
        run = cache.RunRecord(self.n_done, plan.mode, plan.n_workers, plan.chunksize,
                              estimate, wall)
        if self.threads_trial is not None:
            # Remembered: threads lost here (the loop's time for their items, theirs).
            done, seconds = self.threads_trial
            run = cache.RunRecord(done, planner.THREADS_TRIAL, 1, plan.chunksize,
                                  done * self.features.mean_s, seconds)
        # Items that fell back to the caller ran at the loop's pace, under a plan that
        # priced them on the pool: the wall time says nothing of the plan's estimate
        # (78 items of 80 run here were remembered as a parallel run 1.6x over its
        # estimate, and the next map of the function, whose results crossed, was planned
        # x1.30 more cautious).
        telling = telling and not (self.n_fell_back and plan.mode != "serial")
        cache.observe(
            self.key, module=module, qualname=qualname,
            sampled=self.features if self.entry is None else None,
            observed_item_s=observed,
            run=run if telling or self.threads_trial is not None else None,
            observed_setup_s=self._worker_setup(),
            observed_cv=self.observed_cv,
            observed_worker_ratio=ratio,
            # A quick map of a remembered function (one repeated in a loop): written
            # with the next write, at exit, or within a second (cache.DEFER_FLUSH_S).
            defer=self.entry is not None and wall < DEFER_UNDER_S,
        )
        calibration.save()

    def _own_threads_observed(self, features: Features
                              ) -> tuple[Optional[float], Optional[float]]:
        """For a function with threads of its own, which a worker runs on one (a BLAS
        thread): the per-item time this run saw here, and an item's time in a worker
        over the one here (Features.worker_ratio), where it can tell them. The pool's
        items no longer count as the caller's (numpy's, 1.4x slower there, made the loop
        look slower, and the pool's estimate too): a pool run that had none here says
        the caller's time through the ratio it has learnt, or until there is one, the
        CPU seconds' factor the plan used. Against a remembered time (nothing ran here),
        a ratio that no worker's thread cap explains (a worker 2x faster than here, or
        2x slower than the CPU seconds say) measured other inputs than that time's: not
        learnt, and the caller's time follows them by that factor. (A run on no pool of
        ours, a dask cluster's, counts as before.)"""
        here, pool = self.observed_here_s, self.observed_pool_s
        if pool is None:
            return (here if here is not None else self.observed_s), None
        if features.worker_ratio is not None and here is None:
            return pool / features.worker_ratio, None
        ratio = pool / max(here or features.mean_s, 1e-12)
        if (here is not None or self.entry is None  # measured here, in this run
                or 1 / TELLING_RATIO <= ratio
                <= TELLING_RATIO * (1 + (features.threads_cpu or 0.0))):
            return here, ratio
        assert self.plan is not None
        by_cpu = planner.pool_item_s(features, int(self.plan.features.get("usable_cpus") or 1))
        return pool * features.mean_s / by_cpu, None

    def remember_sample(self) -> None:
        """plan(): what was sampled is kept, so the next map does not sample again."""
        if self.options.cache and self.n_sampled and self.features is not None:
            module, qualname = describe(self.func)
            cache.observe(self.key, module=module, qualname=qualname, sampled=self.features,
                          observed_item_s=None, run=None)

    def report(self) -> None:
        assert self.plan is not None
        planned = self.planned_s
        self.on_report(RunReport(
            plan=self.plan,
            wall_s=time.perf_counter() - self.t_start,
            n_items=self.n_done,
            n_sampled=self.n_sampled,
            from_cache=self.entry is not None,
            workers_timeline=self.timeline,
            sampling_s=planned,
            planning_overhead_s=max(0.0, planned - self.sampled_calls_s),
            observed_item_s=self.observed_s,
            bytes_sent=self.bytes_sent,
            start_path=self.start_path,
            ran=self.ran,
            worker_setup_s=self._worker_setup(),
            adjusted=self.adjusted,
        ))

    def _worker_setup(self) -> Optional[float]:
        """The median one-time set-up seen in workers' first calls, if any stood out;
        None where they were forked from here after the function ran here: they had its
        set-up already, and their first calls say nothing of a fresh process's (a 0.3 s
        one was remembered as 2 ms, and the next process's workers each paid 0.3 s)."""
        if not self.setups:
            return None
        if self.start_path is not None and adapt.workers_inherit_setup(self.key):
            return None
        ordered = sorted(self.setups)
        return ordered[len(ordered) // 2]

    # --- executing ----------------------------------------------------------------------

    def _serial(self) -> Iterator[list[Any]]:
        """The loop, in chunks of growing duration; between chunks, re-plan from the
        chunk's own per-item time, and move the rest to the pool when that now wins."""
        assert self.features is not None and self.plan is not None
        here = self._here_initializer()
        if here is not None:
            here()  # (a timed map planned to run here: its function too heavy to ship)
        features, first = self.features, self.n_done
        replan = self.forced is None and not self.stay_serial
        chunk_s = SERIAL_FIRST_CHUNK_S
        # The first chunk is sized on a cautious per-item time: an uneven sample (its
        # last items far slower than the rest) must not commit a long chunk to the loop.
        per_item = max(features.mean_s * (1 + (features.coefficient_of_variation or 0)), 1e-8)
        previous = per_item
        total_s = 0.0
        # imap: a batch's results are held until the consumer takes them; bounded.
        cap = _imap_chunk_cap(features) if self.partial else None
        # Forced here, over a list: the whole rest in one chunk, the user's own loop.
        # Otherwise chunks that grow in time from one item, so that imap's first result
        # comes after one call (it came after up to 16,384); and imap over a stream
        # yields each result before it reads the next item, as the loop does: the
        # input may wait on what its consumer does with a result (a crawler's queue).
        rest_at_once = not replan and self.n_exact and not self.partial
        one_by_one = self.forced is not None and self.partial and not self.n_exact
        if not replan and features.n_samples == 0:
            per_item = math.inf  # nothing measured: one item first
        while True:
            if rest_at_once:
                n = max(1, self.n_items - self.n_done)
            else:
                n = 1 if one_by_one else max(1, int(chunk_s / per_item))
            left = self.n_items - self.n_done
            expected = features.mean_s if self.n_done == first else per_item
            # A remembered function (its per-item time the mean of whole runs, not of a
            # sample's first items, behind which rising costs could hide), whose rest is
            # at most two chunks at the cautious cost or at the expected one: one chunk,
            # and no re-plan. A pool cannot win on what would be left after it, and
            # re-planning (~0.6 ms) and joining two batches cost a 15-25 ms map of
            # 0.03-0.09 µs calls 10-15%.
            whole = (replan and self.n_exact and self.entry is not None
                     and (left <= 2 * n or left * expected <= 2 * chunk_s))
            if whole:
                n = max(1, left)
            if cap is not None and n > cap:
                n, whole = cap, False  # imap's bound: the rest is not one chunk then
            t0 = time.perf_counter()
            deadline = (serial_backend.Deadline(t0 + DEADLINE_FACTOR * n * per_item)
                        if n > 1 and ((replan and per_item >= DEADLINE_MIN_ITEM_S)
                                      # imap over a stream: a slow input must not hold
                                      # results a chunk sized on the calls' time back
                                      or (self.partial and not self.n_exact))
                        else None)
            batch, err = serial_backend.run_chunk(self.func, self.source, n, self.n_done,
                                                  star=self.star, partial=self.partial,
                                                  deadline=deadline)
            elapsed = time.perf_counter() - t0
            got = len(batch)  # imap empties a batch as it yields it (api._flatten)
            if batch:
                total_s += elapsed
                self.n_done += got
                previous, per_item = per_item, max(elapsed / got, 1e-8)
                adapt.note_ran_here(self.key)
                yield batch
            if err is not None:
                raise err
            self.observed_s = total_s / (self.n_done - first) if self.n_done > first else None
            self.observed_here_s = self.observed_s
            cut = deadline is not None and deadline.hit and err is None
            if (got < n and not cut) or (whole and got == n):  # the items ran out
                # ...unless a list grew meanwhile: the function appends to the list
                # it is mapped over (a crawler), or imap's consumer does. The loop
                # walks on; imap over such a list stopped at 1 result of 30.
                more = operator.length_hint(self.source, 0)
                if not more:
                    return
                self.n_items = self.n_done + more
            chunk_s = min(chunk_s * 2, SERIAL_MAX_CHUNK_S)
            if not replan:
                continue
            new = self.planner.after_serial_chunk(features, per_item, previous,
                                                  self.n_items, self.n_done)
            if new is not None:
                self.plan = new
                self.moved_at = self.n_done
                self._announce(new)
                n_here, observed_here = self.n_done - first, self.observed_s
                yield from self._parallel(new, self.n_done, self.n_items - self.n_done
                                          if self.n_exact else None)
                observed_there, n_there = self.observed_s, self.n_done - first - n_here
                self.observed_s = observed_here
                if observed_there is not None and observed_here is not None:
                    self.observed_s = (observed_here * n_here + observed_there * n_there) / (
                        n_here + n_there)
                return

    def _after_ahead(self, sent: SentAhead, plan: Plan) -> Iterator[list[Any]]:
        """Sampling sent items to the pool: the run takes them over, in flight. A
        parallel plan sends the rest after them; otherwise their results are collected
        first, and the rest runs as planned."""
        n_left = self.n_items - self.n_sampled - sent.n_items if self.n_exact else None
        ahead_mode = "threads" if sent.on_threads else "parallel"
        if sent.on_threads:
            # The rest is sent from this thread, in the caller's context as it is now.
            sent.target.context = None
        if plan.mode == ahead_mode and not self._changed_since_sent(sent):
            yield from self._parallel(plan, self.n_sampled, n_left, sent)
            return
        collect = dataclasses.replace(plan, mode=ahead_mode, n_workers=sent.n_workers,
                                      chunksize=1)
        where = "threads" if sent.on_threads else "the pool"
        ran = (f"{_span(self.n_sampled, sent.n_items)} ran on {where}, sent there while "
               f"the first call ran here; the rest "
               f"{'in the caller' if plan.mode == 'serial' else 'on ' + plan.runs_on()}")
        if plan.mode == "serial":
            yield from self._serial_beside(sent, collect, ran)
            if self.moved_at is not None and self.ran == ran and self.plan is not None:
                # The loop found the pool worth it part way: the report says where.
                here = self.n_sampled + sent.n_items
                loop = (f"{_span(here, self.moved_at - here)} in the caller, "
                        if self.moved_at > here else "")
                self.ran = (f"{_span(self.n_sampled, sent.n_items)} ran on {where}, sent "
                            f"there while the first call ran here; {loop}the rest on "
                            f"{self.plan.runs_on()}")
            return
        rest, self.source = self.source, iter(())
        yield from self._parallel(collect, self.n_sampled, 0, sent)
        self.source = rest
        self.ran = ran
        yield from self._parallel(plan, self.n_done, n_left)

    def _changed_since_sent(self, sent: SentAhead) -> bool:
        """Did the caller's sampled calls change what the function reads (a global
        rebound, a captured dict filled, a context variable set) since the watch pickled
        it for the items sent ahead? Then the rest must not go out with that copy: the
        items not yet sent get the function as the caller has it now, as in a map with
        no items sent ahead (a first call that set LEVEL = 7 had every later item read
        LEVEL = 0 in the workers, where the loop, and the same map with a short first
        call, read 7). The items sent ahead ran before the change: nothing runs twice.
        (Threads run the function itself, no copy: they see what it reads as it is.)"""
        if sent.on_threads:
            return False
        try:
            now = worker.with_context(worker.with_initializer(
                self.func, self.options.initializer, self.options.initargs),
                worker.context_blob())
        except Exception as exc:
            if from_a_signal_handler(exc):
                raise
            return False  # cannot be pickled now: the parallel run finds out and says so
        was = sent.target.ref
        return now.key != was.key or now.context_key != was.context_key

    def _serial_beside(self, sent: SentAhead, collect: Plan, ran: str
                       ) -> Iterator[list[Any]]:
        """A serial plan after items went ahead: the loop runs the rest here while they
        finish in the pool, and its batches wait for their results, which come first.
        It waited for them: first_call_setup's two items sent ahead paid the set-up in
        their workers, ~0.25 s, while the caller, set up already, idled."""
        first, k = self.n_done, sent.n_items
        self.n_done = first + k  # where the loop's items begin: after those in flight
        serial = self._serial()
        held: list[list[Any]] = []
        error: Optional[BaseException] = None
        finished = False
        try:
            # Not past an item sent ahead that failed: the loop would run nothing after
            # it (its error is raised below, in its turn, by collecting them).
            while sent.running() and not sent.failed():
                held.append(next(serial))
        except StopIteration:
            finished = True
        except BaseException as exc:
            # An item's error, a BaseException of its own too (SystemExit, the user's):
            # raised in its turn, after theirs. (Only Exception was held: the others went
            # out at once, and the results before them were lost.) Not Ctrl-C, which
            # carries no item's index: the map ends now.
            if isinstance(exc, KeyboardInterrupt) and item_of(exc) is None:
                raise
            error, finished = exc, True
        # The loop's own state, which collecting them would overwrite (it writes what
        # ran and the per-item time the cache learns, from two items' worth).
        done_here, ran_here, observed_here = self.n_done, self.ran, self.observed_s
        self.n_done = first
        rest, self.source = self.source, iter(())
        yield from self._parallel(collect, first, 0, sent)
        self.source, self.n_done = rest, done_here
        self.ran = ran_here or ran
        if observed_here is not None:
            self.observed_s = observed_here
        yield from held
        if error is not None:
            raise error
        if not finished:
            yield from serial

    def _parallel(self, plan: Plan, first: int, n_left: Optional[int],
                  sent: Optional[SentAhead] = None) -> Iterator[list[Any]]:
        """The items from ``first`` on the pool, threads or cluster the plan names
        (after the items ``sent`` to the pool ahead, still in flight)."""
        assert self.features is not None
        target: Any
        calib = adapt.pool_calibration()
        task_overhead_s = calib.task_overhead_s
        if sent is not None:
            target = sent.target  # the function is in the pool's workers already
        elif plan.mode == "threads":
            target = ThreadTarget(self.func, self.star)
        else:
            try:
                ref = worker.with_context(worker.with_initializer(
                    self.func, self.options.initializer, self.options.initargs),
                    worker.context_blob())
            except Exception as exc:
                if from_a_signal_handler(exc):
                    raise  # the caller's own (a SIGALRM handler's), not a pickling failure
                what = (f"the function cannot be pickled ({exc})"
                        if not _picklable_function(self.func) else
                        f"the initializer or its initargs cannot be pickled ({exc})")
                self._unpicklable(what, exc)
                self._ran_serially(plan, what)
                yield from self._fallback_loop()
                return
            if plan.mode == "distributed":
                target = dask_backend.DaskTarget(self.client, ref, self.star)
                task_overhead_s = dask_backend.calibration_for(
                    self.client, dask_backend.n_threads(self.client)).task_overhead_s
            else:
                heavy = self._too_heavy_to_ship(plan, ref, calib)
                if heavy is not None:
                    # The pool's estimate with the function's shipping counted, as the
                    # reason gives it: explain() said "parallel: 229.8 ms, speedup:
                    # 1.00x" where the reason said 1.80 s more for the pool, against the
                    # loop's 392.1 ms.
                    why, shipping = heavy
                    pool_s = plan.estimated_parallel_s + shipping
                    self.plan = dataclasses.replace(
                        plan, mode="serial", n_workers=1, chunksize=1,
                        estimated_parallel_s=pool_s,
                        estimated_speedup=(plan.estimated_serial_s / pool_s
                                           if pool_s > 0 else 0.0),
                        reason=why)
                    self._announce(self.plan)
                    self.stay_serial = True
                    yield from self._serial()
                    return
                target = loky_backend.LokyTarget(ref, self.star,
                                                 timed=self.options.timeout is not None)
        spec = RunSpec(
            plan.n_workers, plan.chunksize, star=self.star, ordered=self.ordered,
            strict=self.options.strict, fixed_chunksize=self.options.chunksize is not None,
            max_chunk_items=_imap_chunk_cap(self.features) if self.partial else None,
            task_overhead_s=task_overhead_s, item_s=self._item_s(plan),
            timeout=self.options.timeout if plan.mode == "parallel" else None,
            caller_items=plan.features.get("caller_items", 0) if plan.mode == "parallel" else 0,
            # Not while the caller has a one-time set-up to pay: its first item would
            # build it on a core the workers need (first_call_setup warm: the caller
            # built a 0.2 s table while both workers built theirs, all three ~1.5x
            # slower, for the one item it then ran).
            helps_cold=not (self.features.setup_s and not adapt.ran_here(self.key)),
            startup_s=calib.startup_for(plan.n_workers) if plan.mode == "parallel" else None,
            before_here=self._here_initializer(),
        )
        run = ParallelRun(self.func, target, self.source, first, spec, n_left,
                          adapt.monitor(self.options, plan, self.features)
                          if plan.mode == "parallel" else None,
                          on_workers=lambda busy: self._announce(plan, busy),
                          in_flight=sent.pending if sent is not None else None,
                          unsent=tuple(sent.unsent) if sent is not None else ())
        # (Not for items sent ahead to threads, collected alone: nothing is left to judge.)
        t_run, trial = time.perf_counter(), plan.mode == "threads" and n_left != 0
        done0 = 0  # items done before the trial's window
        if sent is not None and sent.on_threads and sent.first_sent is not None:
            if sent.n_workers >= plan.n_workers:
                # The threads' rate since they began: the items sent ahead count among
                # those done, so their time does too (counted from here, 70 items that
                # finished before it made threads serialised by a lock look 16x faster
                # than the loop).
                t_run = sent.first_sent
            else:
                # Fewer threads went ahead than the plan's (max_workers=2: one beside the
                # caller's call, whose own items the rate leaves out): their rate is one
                # thread's, the loop's, and every such map lost its trial, remembered.
                # Judged from here, on what finishes from now on.
                done0 = sum(info.n for fut, info in sent.pending.items() if fut.done())
        try:
            for batch in run:
                self.n_done += len(batch)
                yield batch
                # Judged once every thread has finished a chunk, after THREADS_TRIAL_S.
                if (trial and run.worker_items - done0 >= plan.n_workers * plan.chunksize
                        and time.perf_counter() - t_run >= planner.THREADS_TRIAL_S):
                    trial = False
                    if self._threads_lose(run.worker_items - done0,
                                          time.perf_counter() - t_run):
                        run.drain()
        except BaseException:
            # Also for a run ended by an item's exception, a crash or the consumer: its
            # report says what the pool did until then. Nothing of ours may replace
            # that exception, which is what the map raises.
            with contextlib.suppress(Exception):
                self._note_run(run, target, plan)
            raise
        self._note_run(run, target, plan)
        if self.threads_trial is not None:
            yield from self._serial()

    def _note_run(self, run: Any, target: Any, plan: Plan) -> None:
        self.timeline = run.timeline
        self.setups += run.setups
        resized, seen = run.chunks.resized, run.chunks.per_item_s
        if resized is not None and seen is not None:
            self.adjusted = (f"items took {fmt_s(seen)} in the workers, not the "
                             f"{fmt_s(self._item_s(plan))} planned: chunks of "
                             f"{plan.chunksize:,} became {resized:,}")
        if run.local_items:
            self.n_fell_back += run.local_items
            self.ran = (f"{run.local_items:,} of the items ran in the caller: "
                        f"{run.cross.reason}")
        self.bytes_sent += getattr(target, "bytes_sent", 0)
        if isinstance(target, loky_backend.LokyTarget) and run.worker_items:
            # (Not where every item ran in the caller: no worker served this map.)
            self.start_path = loky_backend.start_path()
            adapt.note_ran_on_pool(run.executor, self.key)
        self.observed_s = (run.worker_compute_s / run.worker_items
                           if run.worker_items else None)
        if isinstance(target, loky_backend.LokyTarget) and run.worker_items:
            # Its wall time, with what the workers' threads waited for a CPU beside each
            # other: threads a worker does not cap (the function's own pool, not BLAS)
            # contend there, and compute_s alone took them for twice as fast.
            self.observed_pool_s = (run.worker_compute_s + run.worker_queued_s) \
                / run.worker_items
        self.observed_cv = observed_cv(run.chunk_item_s)

    def _item_s(self, plan: Plan) -> float:
        """What the plan took an item to cost where it runs them: in a process pool's
        worker, a function's own threads (BLAS) are one there."""
        assert self.features is not None
        if plan.mode != "parallel":
            return self.features.mean_s
        return planner.pool_item_s(self.features, int(plan.features.get("usable_cpus") or 1))

    def _threads_lose(self, done: int, seconds: float) -> bool:
        """The threads' trial: do their items (``done`` finished in their first
        ``seconds``) come faster than the loop's, by THREADS_MIN_GAIN? Items that wait
        for each other (a lock they share, the GIL) do not. If not, the rest runs here,
        and the report says so."""
        assert self.features is not None and self.plan is not None
        loop_rate = 1 / max(self.features.mean_s, 1e-12)
        rate = done / seconds if seconds > 0 else math.inf
        if rate >= planner.THREADS_MIN_GAIN * loop_rate:
            return False
        plan = self.plan
        why = (f"threads did not beat the loop: {rate:,.0f} items/s on "
               f"{plan.runs_on()} against {loop_rate:,.0f} for the loop")
        self.threads_trial = (done, seconds)
        self.plan = dataclasses.replace(
            plan, mode="serial", n_workers=1, chunksize=max(1, plan.chunksize),
            reason=f"{plan.reason}; but {why}, so the rest ran serially in the caller")
        self.ran = (f"{plan.runs_on()} for the first {done:,} items, then serially in the "
                    f"caller: {why}")
        self.stay_serial = True
        self._announce(self.plan)
        logger.info("%s: %s; the rest runs in the caller", describe(self.func)[1], why)
        return True

    def _ran_serially(self, plan: Plan, why: str) -> None:
        """The plan said a pool; the rest runs here: the report says so, in its plan and
        in ``ran``, as the warning did."""
        self.plan = dataclasses.replace(
            plan, mode="serial", n_workers=1, chunksize=FALLBACK_CHUNK,
            reason=f"{plan.reason}; but {why}, so it ran serially in the caller")
        self.ran = f"serially in the caller, not {plan.runs_on()} as planned: {why}"
        self.stay_serial = True
        self._announce(self.plan)

    def _init_key(self) -> str:
        """The initializer's identity in this process: the same one with equal initargs
        runs once here, whichever map asks."""
        opts = self.options
        try:
            return "here:" + hashlib.sha1(pickle.dumps((opts.initializer, opts.initargs))
                                          ).hexdigest()
        except Exception as exc:  # not picklable by reference: this very object and its args
            if from_a_signal_handler(exc):
                raise
            return f"here:{id(opts.initializer)}:{id(opts.initargs)}"

    def _too_heavy_to_ship(self, plan: Plan, ref: FunctionRef, calib: Calibration
                           ) -> Optional[tuple[str, float]]:
        """Why the loop beats the pool once the function's own size is counted, and the
        seconds that shipping it costs; or None.
        A function that captures a large object (a bound method of an object holding
        500 MB) crosses to each worker once per map: its bytes are written once, read and
        rebuilt by every worker, each copy at about the measured per-byte cost. The plan
        could not count it before: the function is pickled only for a pool."""
        size = ref.size()
        if size < BLOB_FILE_MIN_BYTES or self.planner.forced_parallel() is not None:
            return None
        shipping = size * calib.byte_cost_s * 2  # written once; read and rebuilt, at once
        if plan.estimated_parallel_s + shipping < plan.estimated_serial_s:
            return None
        return (f"the function carries {fmt_bytes(size)} (what it captures): sending it to "
                f"{plan.n_workers} workers is estimated at {fmt_s(shipping)}, which with "
                f"the pool's {fmt_s(plan.estimated_parallel_s)} loses to the loop's "
                f"{fmt_s(plan.estimated_serial_s)}; running serially"), shipping

    def _announce(self, plan: Plan, busy: Optional[int] = None) -> None:
        """Tell ``on_plan`` (the bar) what runs the items now; it cannot fail the map."""
        if self.on_plan is None:
            return
        try:
            self.on_plan(plan, busy)
        except Exception as exc:
            logger.debug("progress: %r", exc)

    def _fallback_loop(self) -> Iterator[list[Any]]:
        """The function cannot be pickled: the rest runs here, in plain chunks."""
        here = self._here_initializer()
        if here is not None:
            here()
        while True:
            batch, err = serial_backend.run_chunk(self.func, self.source, FALLBACK_CHUNK,
                                                  self.n_done, star=self.star, partial=True)
            got = len(batch)  # imap empties a batch as it yields it (api._flatten)
            self.n_done += got
            if batch:
                yield batch
            if err is not None:
                raise err
            if got < FALLBACK_CHUNK:
                return

    def _unpicklable(self, what: str, cause: Optional[BaseException] = None) -> None:
        if self.options.strict:
            msg = f"{what}, so they cannot be sent to worker processes (strict=True)"
            raise TypeError(msg) from cause
        warn_user(f"adaptive_exec: {what}; running serially in the caller instead"
                  f"{unenforced(self.options.timeout)}", UnpicklableWarning)


def _picklable_function(func: Callable[..., Any]) -> bool:
    try:
        function_ref(func)
    except Exception as exc:
        if from_a_signal_handler(exc):
            raise
        return False
    return True


# --- the input --------------------------------------------------------------------------

def _span(first: int, n: int) -> str:
    """"item 3" or "items 3-7"."""
    return f"item {first:,}" if n == 1 else f"items {first:,}-{first + n - 1:,}"


class GuardedIterator:
    """The input iterator, with its own exception held back: the map runs every item
    read before it, yields their results, and raises it after them, as the loop would.
    (A KeyboardInterrupt is Ctrl-C: it leaves at once.)"""

    __slots__ = ("_it", "error")

    def __init__(self, it: Iterator[Any]):
        self._it = it
        self.error: Optional[BaseException] = None

    def __iter__(self) -> GuardedIterator:
        return self

    def __next__(self) -> Any:
        try:
            return next(self._it)
        except StopIteration:
            raise
        except KeyboardInterrupt:
            raise
        except BaseException as exc:
            self.error = exc
            self._it = iter(())
            raise StopIteration from None


# Iterators over builtin sequences cannot raise: they go unguarded (and keep the serial
# loop's fast path, backends/serial.py).
_SAFE_ITERATORS: tuple[type, ...] = (type(iter([])), type(iter(())), type(iter(range(0))),
                                     type(iter(range(1 << 70))))


def guard(it: Iterator[Any]) -> Iterator[Any]:
    return it if isinstance(it, _SAFE_ITERATORS) else GuardedIterator(it)


# Collections whose len() is the number of items iterating them yields. Any other
# __len__ is not trusted: a pandas DataFrame's counts its rows while iterating it yields
# its column names, and a map that took len() for the count returned 5 results where the
# loop gave 40.
_EXACT_LENGTH: tuple[type, ...] = (list, tuple, range, str, bytes, bytearray, dict, set,
                                   frozenset, collections.deque, array.array,
                                   type({}.keys()), type({}.values()), type({}.items()))


def known_length(items: Any) -> Optional[int]:
    """The number of items, where len() says it for sure (_EXACT_LENGTH, subclasses that
    keep its __len__ and __iter__, numpy arrays); else None, and the input streams as a
    generator's would (its end is found by reading it). None too where len() fails:
    range(10**20) overflows."""
    kind = type(items)
    base = next((b for b in _EXACT_LENGTH if isinstance(items, b)), None)
    if base is not None:
        if (getattr(kind, "__iter__", None) is not getattr(base, "__iter__", None)
                or getattr(kind, "__len__", None) is not getattr(base, "__len__", None)):
            return None
    elif not (kind.__name__ == "ndarray" and kind.__module__ == "numpy"):
        return None
    try:
        return len(items)
    except Exception:
        return None


def _read_ahead(it: Iterator[Any], features: Features) -> tuple[list[Any], bool]:
    """Items read from ``it`` until enough work is seen; (items, the iterator ended)."""
    per_item = max(features.mean_s, 1e-9)
    want = min(READ_AHEAD_ITEMS, math.ceil(READ_AHEAD_WORK_S / per_item))
    size = (features.input_pickle_size or 64) + 64
    want = max(1, min(want, READ_AHEAD_BYTES // size))
    # The sample's sizes and pace need not hold for the rest: items that grow after it
    # (1 B sampled, then 50 KB each) held 5,744 of them (0.2-0.45 GB) where the loop
    # holds one, and a slow stream (5 ms an item) yielded nothing after the sample
    # until 600 items were read (3 s; the loop's 11th result came at 0.06 s). So the
    # stretch also ends at READ_AHEAD_BYTES by the items' own sizes, and after
    # READ_AHEAD_WAIT_S of reading.
    buffered: list[Any] = []
    held = 0
    deadline = time.perf_counter() + READ_AHEAD_WAIT_S
    for item in it:
        buffered.append(item)
        if len(buffered) >= want:
            return buffered, False
        try:
            held += sys.getsizeof(item)
        except Exception:  # a __sizeof__ of the user's that fails
            held += size
        if held >= READ_AHEAD_BYTES or time.perf_counter() >= deadline:
            return buffered, False
    return buffered, True


def _imap_chunk_cap(features: Optional[Features]) -> int:
    size = features.pickle_size if features is not None else None
    return max(16, IMAP_CHUNK_BYTES // max(size or 64, 64))


def _merge_plain_calls(features: Optional[Features], plain: list[float]) -> Optional[Features]:
    """Fold the durations of earlier plain calls into the sampled features."""
    if features is None or not plain:
        return features
    n = features.n_samples
    durations = [features.mean_s] * n + plain  # the sample's spread is kept through its CV
    merged = features_from(durations, [], [], features.peak_memory or 0,
                           features.function_complexity, 0.0, 0.0, features.picklable,
                           split_setup=False)
    cvs = [c for c in (features.coefficient_of_variation, merged.coefficient_of_variation)
           if c is not None]
    return dataclasses.replace(
        features,
        mean_s=merged.mean_s,
        coefficient_of_variation=max(cvs) if cvs else None,
        n_samples=n + len(plain),
    )

