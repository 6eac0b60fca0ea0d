"""The public entry points: ``parallelize`` and ``adaptive_map``.

One map, end to end: fingerprint -> remembered features, or sample the first items
here -> plan -> run serially here, on the pool or on a dask cluster -> remember what was
observed.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import logging
import math
import os
import threading
import time
import types
import warnings
import weakref
from dataclasses import dataclass, field
from typing import (
    Any,
    Callable,
    Generator,
    Iterable,
    Iterator,
    Optional,
    TypeVar,
    Union,
    overload,
)

from . import cache, calibration, planner, system
from .backends import dask as dask_backend
from .backends import loky as loky_backend
from .backends import serial as serial_backend
from .backends.dask import DaskTarget
from .dispatch import LokyTarget, ParallelRun, ThreadTarget
from .errors import UnpicklableWarning
from .fingerprint import describe, fingerprint, function_complexity
from .planner import OWN_THREADS_MIN, WAITING_MAX_CPU, Cluster, Plan, fmt_s, make_plan
from .sampling import Features, features_from, sample
from .worker import function_ref

logger = logging.getLogger("adaptive_exec")

BACKENDS = ("auto", "loky", "serial", "dask")
ENV_PROGRESS = "ADAPTIVE_EXEC_PROGRESS"
# Unknown length (a generator): read ahead this much work before planning, so that a
# short stream is seen to be short. Bounded in items and bytes: never materialised.
READ_AHEAD_WORK_S = 1.0
READ_AHEAD_ITEMS = 10_000
READ_AHEAD_BYTES = 64 << 20
# A serial run is re-planned between chunks; their duration starts here and doubles.
SERIAL_FIRST_CHUNK_S = 0.02
SERIAL_MAX_CHUNK_S = 0.5
# Serial chunks whose per-item time grows by GROWTH_MIN or more are projected one more
# step ahead (at most GROWTH_CAP times the last), so the re-plan does not price the
# rest of an ascending workload at its cheaper past.
GROWTH_MIN = 1.5
GROWTH_CAP = 4.0
# Start the pool ahead of a plan when the work left is at least this many start-ups:
# the caller keeps working meanwhile, so a free core makes it nearly free. Not for a
# function that keeps more than one CPU busy itself (BLAS): its workers would compete
# with it (measured: the numpy workload's serial run 1.56x slower with a pool booting).
PRESTART_FACTOR = 1.5
# What starting a pool costs the caller's process: importing loky and spawning the
# workers, ~70 ms of its CPU and GIL (measured: fat_return's serial run 0.38 -> 0.49 s).
PRESTART_COST_S = 0.07

F = TypeVar("F", bound=Callable[..., Any])


@dataclass(frozen=True)
class RunReport:
    plan: Plan
    wall_s: float
    n_items: int
    n_sampled: int
    from_cache: bool
    workers_timeline: list[tuple[float, int]] = field(default_factory=list)
    sampling_s: float = 0.0  # wall time from the call to the plan, sampled calls included
    planning_overhead_s: float = 0.0  # that time minus the sampled calls' own time
    observed_item_s: Optional[float] = None  # mean seconds per item seen during the run


def _check_options(
    max_workers: Optional[int], backend: str, timeout: Optional[float],
    chunksize: Optional[int] = None, max_memory: Union[int, str, None] = None,
    client: Any = None,
) -> None:
    if max_memory is not None:
        system.parse_bytes(max_memory, "max_memory")
    if chunksize is not None and (
        isinstance(chunksize, bool) or not isinstance(chunksize, int) or chunksize < 1
    ):
        msg = f"chunksize must be a positive int or None (chosen for you), got {chunksize!r}"
        raise ValueError(msg)
    if max_workers is not None:
        if isinstance(max_workers, bool) or not isinstance(max_workers, int):
            msg = f"max_workers must be a positive int or None, got {max_workers!r}"
            raise TypeError(msg)
        if max_workers < 1:
            msg = f"max_workers must be a positive int or None, got {max_workers!r}"
            raise ValueError(msg)
    if backend not in BACKENDS:
        msg = f"backend must be one of {', '.join(map(repr, BACKENDS))}, got {backend!r}"
        raise ValueError(msg)
    if timeout is not None:
        if (isinstance(timeout, bool) or not isinstance(timeout, (int, float))
                or not math.isfinite(timeout) or timeout <= 0):
            msg = (f"timeout must be a positive, finite number of seconds per item, or None "
                   f"for no limit, got {timeout!r}")
            raise ValueError(msg)
        if backend == "serial":
            msg = ("timeout= needs worker processes (an item running in the caller cannot "
                   "be stopped safely); it cannot be combined with backend='serial'")
            raise ValueError(msg)
    if client is not None:
        if backend not in ("auto", "dask"):
            msg = f"client= runs the map on a dask cluster; it cannot be combined with " \
                  f"backend={backend!r} (use backend='dask' or 'auto')"
            raise ValueError(msg)
        dask_backend.check_client(client)
    if backend == "dask" or client is not None:
        if timeout is not None:
            msg = ("timeout= needs worker processes of our own, which it ends when an item "
                   "runs too long; a dask cluster's workers are not ours to end, so it "
                   "cannot be combined with backend='dask' or client=")
            raise ValueError(msg)
        if not dask_backend.installed():
            dask_backend.require()  # raises, naming the extra


class _CallStats:
    """Durations of plain calls, kept as samples for the next map (bounded)."""

    MAX = 64

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.durations: list[float] = []

    def add(self, seconds: float) -> None:
        with self.lock:
            if len(self.durations) < self.MAX:
                self.durations.append(seconds)

    def take(self) -> list[float]:
        with self.lock:
            out, self.durations = self.durations, []
            return out


class _MapState:
    """What one map decided and measured: its own, never shared with another map of the
    same function running in another thread."""

    __slots__ = ("plan", "load")

    def __init__(self) -> None:
        self.plan: Optional[Plan] = None
        self.load: Optional[system.LoadProbe] = None


class _Reports(threading.local):
    """``last_report`` per thread: the one of this thread's last map."""

    report: Optional[RunReport] = None


class _Shared:
    """What outlives one map of a function: the samples of its plain calls and its
    reports. A decorated method's bound copies of one instance share one (see __get__)."""

    def __init__(self) -> None:
        self.calls = _CallStats()
        # The report of this thread's last map; the last of any thread's for a thread
        # that has run none (several threads may map one function at once).
        self.reports = _Reports()
        self.latest_report: Optional[RunReport] = None


class ParallelFunction:
    """A function with ``map``, ``imap``, ``imap_unordered``, ``starmap`` and ``plan``.

    Calling it plainly runs it here, unchanged; the call is timed as a sample.
    """

    def __init__(
        self,
        func: Callable[..., Any],
        *,
        max_workers: Optional[int] = None,
        cache: bool = True,
        progress: bool = False,
        backend: str = "auto",
        timeout: Optional[float] = None,
        strict: bool = False,
        chunksize: Optional[int] = None,
        max_memory: Union[int, str, None] = None,
        client: Any = None,
        _shared: Optional[_Shared] = None,
    ):
        if not callable(func):
            msg = (
                "parallelize needs a callable (a function, lambda or callable object), "
                f"got {func!r}"
            )
            raise TypeError(msg)
        _check_options(max_workers, backend, timeout, chunksize, max_memory, client)
        functools.update_wrapper(self, func)
        self.__adaptive_exec_wrapped__ = func
        self._func = func
        self._options: dict[str, Any] = dict(
            max_workers=max_workers, cache=cache, progress=progress,
            backend=backend, timeout=timeout, strict=strict, chunksize=chunksize,
            max_memory=max_memory, client=client,
        )
        self._shared = _shared if _shared is not None else _Shared()
        self._calls = self._shared.calls
        self._key: Optional[str] = None
        # Used as a method: what each instance's bound copies share, while it lives.
        self._per_instance: dict[int, tuple[Any, _Shared]] = {}
        self._per_instance_lock = threading.Lock()  # guards _per_instance

    @property
    def last_report(self) -> Optional[RunReport]:
        """The RunReport of this thread's last map (of any thread's, if this thread ran
        none), or None before the first."""
        mine = self._shared.reports.report
        return mine if mine is not None else self._shared.latest_report

    # --- plain calls, and use as a method -----------------------------------------

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        t0 = time.perf_counter()
        result = self._func(*args, **kwargs)
        self._calls.add(time.perf_counter() - t0)
        return result

    def __get__(self, obj: Any, objtype: Any = None) -> Any:
        if obj is None:
            return self
        # A bound copy per read, sharing per instance its last_report and the samples
        # of its plain calls (kept while the instance lives, without keeping it alive).
        key = id(obj)
        with self._per_instance_lock:
            entry = self._per_instance.get(key)
            shared = entry[1] if entry is not None and entry[0]() is obj else None
        if shared is None:
            shared = _Shared()
            try:
                ref = weakref.ref(obj, functools.partial(self._forget, key))
            except TypeError:  # no weak references (__slots__): nothing is kept
                ref = None
            if ref is not None:
                with self._per_instance_lock:
                    self._per_instance[key] = (ref, shared)
        return ParallelFunction(types.MethodType(self._func, obj), _shared=shared,
                                **self._options)

    def _forget(self, key: int, ref: Any) -> None:
        with self._per_instance_lock:
            entry = self._per_instance.get(key)
            if entry is not None and entry[0] is ref:
                del self._per_instance[key]

    def __repr__(self) -> str:
        return f"<parallelized {getattr(self._func, '__qualname__', self._func)!r}>"

    def __getstate__(self) -> dict[str, Any]:
        # A dask client does not travel (it is a connection): the copy finds its own.
        return {"func": self._func, "options": {**self._options, "client": None}}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["func"], **state["options"])  # type: ignore[misc]

    # --- the maps -----------------------------------------------------------------

    def map(self, items: Iterable[Any]) -> list[Any]:
        """``[func(x) for x in items]``, as fast as this machine allows."""
        return _collect(self._run(items, star=False, ordered=True, name="map"))

    def starmap(self, arg_tuples: Iterable[Iterable[Any]]) -> list[Any]:
        """``[func(*args) for args in arg_tuples]``."""
        return _collect(self._run(arg_tuples, star=True, ordered=True, name="starmap"))

    def imap(self, items: Iterable[Any]) -> Iterator[Any]:
        """Results in order, lazily, with bounded read-ahead."""
        return _flatten(self._run(items, star=False, ordered=True, name="imap"))

    def imap_unordered(self, items: Iterable[Any]) -> Iterator[Any]:
        """Results as they complete."""
        return _flatten(self._run(items, star=False, ordered=False, name="imap_unordered"))

    def plan(self, items: Iterable[Any]) -> Plan:
        """The decision a ``map`` over ``items`` would take, without running the whole
        workload: the first items are run to measure them (their results are dropped,
        and the measurement is remembered, so the next map does not sample again)."""
        if iter(items) is items:  # type: ignore[comparison-overlap]
            msg = (
                "plan() needs a collection it can read without using it up (a list, tuple "
                "or range); a one-shot iterator would lose the items it samples"
            )
            raise TypeError(msg)
        state = _MapState()
        gen = self._run(items, star=False, ordered=True, name="plan", plan_only=True,
                        state=state)
        for _ in gen:
            pass
        assert state.plan is not None
        return state.plan

    # --- one run ------------------------------------------------------------------

    def _fingerprint(self) -> str:
        if self._key is None:
            self._key = fingerprint(self._func)
        return self._key

    def _run(
        self,
        items: Iterable[Any],
        *,
        star: bool,
        ordered: bool,
        name: str,
        plan_only: bool = False,
        state: Optional[_MapState] = None,
    ) -> Iterator[list[Any]]:
        # Options read from the environment are checked before any item runs.
        system.env_max_memory()
        try:
            it = iter(items)
        except TypeError:
            msg = (
                f"{name}() needs an iterable of items (a list, range, generator...), "
                f"got {type(items).__name__}"
            )
            raise TypeError(msg) from None
        n_known = _known_length(items)
        gen = self._execute(_guard(it), n_known, star=star, ordered=ordered,
                            plan_only=plan_only, partial=name.startswith("imap"),
                            state=state if state is not None else _MapState())
        if self._progress_on() and not plan_only:
            gen = _with_progress(gen, n_known, name)
        return gen

    def _progress_on(self) -> bool:
        return bool(self._options["progress"]) or os.environ.get(ENV_PROGRESS, "") not in ("", "0")

    def _execute(
        self,
        it: Iterator[Any],
        n_known: Optional[int],
        *,
        star: bool,
        ordered: bool,
        plan_only: bool,
        partial: bool,
        state: _MapState,
    ) -> Iterator[list[Any]]:
        try:
            yield from self._execute_items(it, n_known, star=star, ordered=ordered,
                                           plan_only=plan_only, partial=partial, state=state)
        except KeyboardInterrupt as exc:
            # Ctrl-C while sampling, planning or starting the pool ahead: end any pool
            # this map started (a start ahead still under way leaves none behind).
            if getattr(exc, "item_index", None) is None:
                loky_backend.shutdown()
            raise
        # The input iterator's own exception, after every result before it (as the loop).
        if isinstance(it, _GuardedIterator) and it.error is not None:
            raise it.error

    def _execute_items(
        self,
        it: Iterator[Any],
        n_known: Optional[int],
        *,
        star: bool,
        ordered: bool,
        plan_only: bool,
        partial: bool,
        state: _MapState,
    ) -> Iterator[list[Any]]:
        t_start = time.perf_counter()
        func = self._func
        opts = self._options
        key = self._fingerprint()
        use_cache = bool(opts["cache"])

        forced = self._forced_serial()
        # The dask client, when this map may go to a cluster. Known before sampling: no
        # local pool is started ahead, nor local load measured, for a map going there.
        client = self._dask_client() if forced is None else None

        # Other processes' CPU load is measured over the time from here to the plan.
        state.load = (system.LoadProbe(loky_backend.worker_pids)
                      if forced is None and client is None and self._pool_allowed() else None)
        entry = cache.lookup(key) if use_cache and forced is None else None
        cached = entry.features if entry is not None else None
        # Past runs on the same kind of workers correct the estimate: a cluster's runs
        # say nothing about the local pool's, nor the reverse.
        correction = (entry.parallel_correction("parallel" if client is None else "distributed")
                      if entry is not None else 1.0)
        n_sampled = 0
        sampled_calls_s = 0.0
        head: list[Any] = []
        features: Optional[Features]
        exhausted = False
        timeout = opts["timeout"] if forced is None else None
        if forced is not None or (timeout is not None and cached is None):
            # Nothing sampled here: a forced-serial map needs no measurement, and with a
            # timeout every item, the first ones too, must run where it can be stopped.
            features = Features(0.0, None, None, None, None, function_complexity(func), 0, None)
        elif cached is not None:
            features = cached  # a hit: no sampling
        else:
            watch = self._watch_sampling(n_known) if client is None else None
            try:
                s = sample(func, it, star=star, complexity=function_complexity(func),
                           progress=watch.progress if watch else None,
                           ours_cpu=watch.cpu_spent if watch else None)
            finally:
                if watch is not None:
                    watch.stop()
            if s.error is not None:
                if s.results:
                    yield s.results
                raise s.error
            head, n_sampled, exhausted = s.results, len(s.results), s.exhausted
            sampled_calls_s = s.calls_s
            features = _merge_plain_calls(s.features, self._calls.take())
        if features is None:  # no items at all
            state.plan = _empty_plan()
            self._finish(state.plan, t_start, 0, 0, False, [], 0.0, 0.0, None)
            return

        if head and not plan_only:
            yield head  # before any read-ahead: a stream's first results come early
        # The number of items: known, or found by reading a bounded stretch ahead.
        buffered: list[Any] = []
        n_exact = True  # n_items is the count, not a lower bound
        if exhausted:
            n_items = n_sampled
        elif n_known is not None:
            n_items = n_known
        else:
            buffered, ended = _read_ahead(it, features)
            n_items = n_sampled + len(buffered)
            n_exact = ended
            if not ended:
                n_items = max(n_items, n_sampled + READ_AHEAD_ITEMS)  # a lower bound
        source: Iterator[Any] = itertools.chain(buffered, it) if buffered else it

        plan = self._make_plan(features, n_items, n_sampled, t_start, cached is not None, forced,
                               correction, client, state)
        if plan.features.get("blocked_by_pickling"):
            self._unpicklable("the sampled items or results cannot be pickled")
        state.plan = plan
        sampling_s = time.perf_counter() - t_start
        if logger.isEnabledFor(logging.INFO):
            logger.info(
                "plan for %s: mode=%s workers=%d chunksize=%d from_cache=%s: %s",
                describe(func)[1], plan.mode, plan.n_workers, plan.chunksize,
                plan.from_cache, plan.reason,
            )
        module, qualname = describe(func)
        if plan_only:
            if use_cache and n_sampled:
                cache.observe(key, module=module, qualname=qualname, sampled=features,
                              observed_item_s=None, run=None)
            return

        n_done = n_sampled
        timeline: list[tuple[float, int]] = []
        observed: Optional[float] = None
        if plan.mode == "serial":
            plan, timeline, observed, count = yield from self._serial(
                source, n_sampled, n_items, features, plan, star=star, ordered=ordered,
                key=key, from_cache=cached is not None, replan=forced is None,
                partial=partial, correction=correction, t_start=t_start, n_exact=n_exact,
                client=client, state=state,
            )
            n_done += count
        else:
            timeline, observed, count = yield from self._parallel(
                source, n_sampled, plan, star=star, ordered=ordered,
                n_left=n_items - n_sampled if n_exact else None, client=client,
                max_chunk_items=_imap_chunk_cap(features) if partial else None,
            )
            n_done += count
        wall = time.perf_counter() - t_start
        if use_cache and forced is None:
            estimate = (plan.estimated_serial_s if plan.mode == "serial"
                        else plan.estimated_parallel_s)
            # A run whose items cost far from what was planned says nothing about how
            # well the pool delivers (the refreshed per-item time corrects that): it is
            # not kept for the parallel correction, which would count the error twice.
            planned = max(features.mean_s, 1e-12)
            telling = observed is None or 0.5 <= observed / planned <= 2.0
            cache.observe(
                key, module=module, qualname=qualname,
                sampled=features if cached is None else None, observed_item_s=observed,
                run=cache.RunRecord(n_done, plan.mode, plan.n_workers, plan.chunksize,
                                    estimate, wall) if telling else None,
            )
            _save_calibration()
        self._finish(plan, t_start, n_done, n_sampled, cached is not None, timeline,
                     sampling_s, sampling_s - sampled_calls_s, observed)

    def _dask_client(self) -> Any:
        """The client of the dask cluster this map runs on, or None for this machine:
        backend='dask' or client= must find one (or raise, saying how to give one);
        'auto' takes the active client if there is one (timeout= stays local: it needs
        processes of our own)."""
        opts = self._options
        if opts["backend"] == "dask" or opts["client"] is not None:
            return dask_backend.resolve(opts["client"])
        if opts["backend"] == "auto" and opts["timeout"] is None:
            return dask_backend.current_client()
        return None

    def _monitor(self, plan: Plan) -> Callable[[int], int]:
        """decide(busy workers now) -> how many to keep busy, re-read from the machine."""
        probe = system.LoadProbe(loky_backend.worker_pids)
        max_workers, max_memory = self._options["max_workers"], self._max_memory()
        per_worker = (plan.features.get("worker_memory") or planner.WORKER_BASE_MEMORY) + (
            plan.features.get("peak_memory") or 0)

        def decide(current: int) -> int:
            others = system.faked("others")
            if others is None:
                others = probe.others(min_window_s=0.0) or 0.0
            free = system.usable_cpus(max_workers) - system.busy_cpus(others)
            target = max(1, min(plan.n_workers, free))
            room = system.faked("room")
            if room is None:
                room = system.memory_room(max_memory)
            if room is not None and room < planner.MEMORY_RESERVE:
                # Memory is running out: shed a worker's work each reading, before the
                # machine swaps or the OOM killer picks a process.
                target = min(target, max(1, current - 1))
            elif room is not None and room < planner.MEMORY_RESERVE + per_worker:
                target = min(target, current)  # no room for one more
            return target

        return decide

    def _worth_a_pool(self, features: Features, n_items: int, done: int) -> bool:
        """Would starting a pool now pay: a warm one beats the loop on the items left,
        and what it saves after its start-up outweighs what starting it costs here?"""
        snap = system.snapshot(self._options["max_workers"], with_memory=False)
        calib = _load_calibration()
        plan = make_plan(features, n_items, done, snap, calib, warm=True, from_cache=False)
        if plan.mode == "serial" or plan.estimated_speedup <= 1:
            return False
        left_after_startup = (n_items - done) * features.mean_s - calib.startup_for(
            snap.usable_cpus)
        saved = left_after_startup * (1 - 1 / plan.estimated_speedup)
        return saved >= 2 * PRESTART_COST_S

    def _max_memory(self) -> Optional[int]:
        value = self._options["max_memory"]
        return None if value is None else system.parse_bytes(value, "max_memory")

    def _forced_serial(self) -> Optional[str]:
        """Why this map must run in the caller, or None when it may use a pool."""
        if system.disabled():
            return f"{system.ENV_DISABLE}=1 is set"
        if system.in_worker():
            return "already inside an adaptive_exec worker: nested maps run serially"
        if dask_backend.in_task():
            return "already inside a dask task: nested maps run serially"
        if self._options["backend"] == "serial":
            return "backend='serial' was requested"
        return None

    def _pool_allowed(self) -> int:
        """Workers a pool could have for this function now; 0 when no pool may be used."""
        if self._forced_serial() is not None:
            return 0
        cpus = system.usable_cpus(self._options["max_workers"])
        return cpus if cpus >= 2 or self._options["backend"] == "loky" else 0

    def _maybe_prestart(self, work_left_s: float) -> None:
        """Start the pool ahead when the work left clearly dwarfs its start-up."""
        cpus = self._pool_allowed()
        if cpus and work_left_s >= PRESTART_FACTOR * calibration.current().startup_for(cpus):
            loky_backend.prestart(cpus)

    def _watch_sampling(self, n_known: Optional[int]) -> Optional[_SamplingWatch]:
        cpus = self._pool_allowed()
        if not cpus or loky_backend.is_warm(cpus) or (n_known is not None and n_known < 2):
            return None
        return _SamplingWatch(self, n_known)

    def _unpicklable(self, what: str, cause: Optional[BaseException] = None) -> None:
        if self._options["strict"]:
            msg = f"{what}, so they cannot be sent to worker processes (strict=True)"
            raise TypeError(msg) from cause
        warnings.warn(
            f"adaptive_exec: {what}; running serially in the caller instead",
            UnpicklableWarning,
            stacklevel=5,
        )

    def _parallel(
        self, source: Iterator[Any], first: int, plan: Plan, *, star: bool, ordered: bool,
        n_left: Optional[int] = None, client: Any = None, max_chunk_items: Optional[int] = None,
    ) -> Generator[list[Any], None, tuple[list[tuple[float, int]], Optional[float], int]]:
        target: Union[LokyTarget, ThreadTarget, DaskTarget, None]
        task_overhead_s = calibration.current().task_overhead_s
        if plan.mode == "threads":
            target = ThreadTarget(self._func, star)
        else:
            try:
                ref = function_ref(self._func)
                if plan.mode == "distributed":
                    target = DaskTarget(client, ref, star)
                    task_overhead_s = plan.features.get("task_overhead_s", task_overhead_s)
                else:
                    target = LokyTarget(ref, star)
            except Exception as exc:
                self._unpicklable(f"the function cannot be pickled ({exc})", exc)
                target = None
        if target is None:
            count = 0
            while True:
                batch, err = serial_backend.run_chunk(self._func, source, 4096, first + count,
                                                      star=star, partial=True)
                got = len(batch)  # imap empties a batch as it yields it (_flatten)
                count += got
                if batch:
                    yield batch
                if err is not None:
                    raise err
                if got < 4096:
                    return [], None, count
        run = ParallelRun(
            self._func, target, source, first, plan.n_workers,
            plan.chunksize, star=star, ordered=ordered, strict=bool(self._options["strict"]),
            n_left=n_left, fixed_chunksize=self._options["chunksize"] is not None,
            max_chunk_items=max_chunk_items, task_overhead_s=task_overhead_s,
            monitor=self._monitor(plan) if plan.mode == "parallel" else None,
            timeout=self._options["timeout"] if plan.mode == "parallel" else None,
        )
        count = 0
        for batch in run:
            count += len(batch)
            yield batch
        observed = run.worker_compute_s / run.worker_items if run.worker_items else None
        return run.timeline, observed, count

    def _serial(
        self, source: Iterator[Any], first: int, n_items: int, features: Features, plan: Plan,
        *, star: bool, ordered: bool, key: str, from_cache: bool, replan: bool, partial: bool,
        correction: float, t_start: float, n_exact: bool, client: Any = None,
        state: _MapState,
    ) -> Generator[
        list[Any], None, tuple[Plan, list[tuple[float, int]], Optional[float], int]
    ]:
        """The loop, in chunks of growing duration; between chunks, re-plan from the
        chunk's own per-item time, and move the rest to the pool when that now wins."""
        func = self._func
        done = first
        chunk_s = SERIAL_FIRST_CHUNK_S
        # The first chunk is sized on a cautious per-item time: an uneven sample (its
        # last items far slower than the rest) must not commit a long chunk to the loop.
        per_item = max(features.mean_s * (1 + (features.coefficient_of_variation or 0)), 1e-8)
        previous = per_item
        total_s = 0.0
        # imap: a batch's results are held until the consumer takes them; bounded.
        cap = _imap_chunk_cap(features) if partial else None
        while True:
            n = max(1, int(chunk_s / per_item)) if replan else max(1, n_items - done)
            if cap is not None:
                n = min(n, cap)
            t0 = time.perf_counter()
            batch, err = serial_backend.run_chunk(func, source, n, done, star=star,
                                                  partial=partial)
            elapsed = time.perf_counter() - t0
            got = len(batch)  # imap empties a batch as it yields it (_flatten)
            if batch:
                total_s += elapsed
                done += got
                previous, per_item = per_item, max(elapsed / got, 1e-8)
                yield batch
            if err is not None:
                raise err
            observed = total_s / (done - first) if done > first else None
            if got < n:  # the items ran out
                return plan, [], observed, done - first
            if not replan:
                continue
            chunk_s = min(chunk_s * 2, SERIAL_MAX_CHUNK_S)
            # Items getting steadily slower (the costly ones last, joblib issue 1220):
            # expect one more step of that growth rather than the last chunk's cost.
            growth = per_item / previous
            ahead = per_item * min(growth, GROWTH_CAP) if growth >= GROWTH_MIN else per_item
            # Growing costs are uneven costs: the planner then keeps chunks small, so that
            # the last (costliest) chunk does not run alone at the end.
            spread = max(features.coefficient_of_variation or 0.0, growth - 1.0)
            recent = dataclasses.replace(features, mean_s=ahead, coefficient_of_variation=spread)
            if client is None and (features.threads_cpu or 0.0) <= OWN_THREADS_MIN and \
                    self._worth_a_pool(recent, max(n_items, done + 1), done):
                # Starting a pool costs this process ~70 ms (importing loky, spawning):
                # only when a warm one would win.
                self._maybe_prestart(max(0, n_items - done) * ahead)
            # t_start: the estimate covers the whole map, as the run record's actual does.
            new = self._make_plan(recent, max(n_items, done + 1), done, t_start,
                                  from_cache, None, correction, client, state)
            if new.mode == "serial":
                continue
            reason = (
                f"switched to {new.mode} after {done:,} items ran serially, at "
                f"{fmt_s(per_item)} per item (expecting {fmt_s(ahead)} ahead) against "
                f"{fmt_s(features.mean_s)} sampled: {new.reason}"
            )
            new = dataclasses.replace(new, reason=reason)
            state.plan = new
            logger.info("re-plan for %s: %s", describe(func)[1], reason)
            timeline, observed_par, count = yield from self._parallel(
                source, done, new, star=star, ordered=ordered,
                n_left=n_items - done if n_exact else None, client=client,
                max_chunk_items=cap,
            )
            n_all = done - first + count
            if observed_par is not None and observed is not None:
                observed = (observed * (done - first) + observed_par * count) / n_all
            return new, timeline, observed, n_all

    def _make_plan(
        self,
        features: Features,
        n_items: int,
        n_sampled: int,
        t_start: float,
        from_cache: bool,
        forced: Optional[str],
        correction: float = 1.0,
        client: Any = None,
        state: Optional[_MapState] = None,
    ) -> Plan:
        max_workers = self._options["max_workers"]
        if client is not None and forced is None:
            return self._cluster_plan(features, n_items, n_sampled, t_start, from_cache,
                                      correction, client)
        max_memory = self._max_memory()
        calib = _load_calibration()
        elapsed = time.perf_counter() - t_start
        snap = system.snapshot(max_workers, with_memory=False)
        warm = loky_backend.is_warm(snap.usable_cpus)
        startup_left = loky_backend.startup_left(calib.startup_for(snap.usable_cpus),
                                                 snap.usable_cpus)
        forced_parallel = (
            "backend='loky' was requested" if self._options["backend"] == "loky" else None
        )
        chunksize = self._options["chunksize"]
        if self._options["timeout"] is not None and forced is None:
            forced_parallel = (f"timeout={self._options['timeout']:g} s is set: every item runs "
                               "in a worker, one at a time, where it can be stopped")
            chunksize = 1
        kwargs: dict[str, Any] = dict(
            warm=warm, from_cache=from_cache, elapsed_s=elapsed, forced_serial=forced,
            forced_parallel=forced_parallel, chunksize=chunksize,
            parallel_correction=correction, startup_left=startup_left,
        )
        plan = make_plan(features, n_items, n_sampled, snap, calib, **kwargs)
        if plan.mode == "parallel":
            # Only a parallel plan needs the machine's load and memory (and is capped by
            # them). The load is read over the time since the map began, when that is
            # long enough to tell; else the run's monitor corrects it within ~0.3 s.
            load = state.load if state is not None else None
            others = load.others() if load is not None else None
            snap = system.snapshot(max_workers, with_memory=True, max_memory=max_memory,
                                   others_load=others, worker_memory=loky_backend.worker_rss())
            plan = make_plan(features, n_items, n_sampled, snap, calib, **kwargs)
        return plan

    def _cluster_plan(
        self,
        features: Features,
        n_items: int,
        n_sampled: int,
        t_start: float,
        from_cache: bool,
        correction: float,
        client: Any,
    ) -> Plan:
        """The plan on a dask cluster: its threads (max_workers caps them), its constants
        (measured on first use), no start-up."""
        threads = dask_backend.n_threads(client)
        calib = dask_backend.calibration_for(client, threads)
        max_workers = self._options["max_workers"]
        usable = min(threads, max_workers) if max_workers else threads
        forced_parallel = None
        if self._options["client"] is not None:
            forced_parallel = "client= was given"
        elif self._options["backend"] == "dask":
            forced_parallel = "backend='dask' was requested"
        return make_plan(
            features, n_items, n_sampled, system.snapshot(max_workers, with_memory=False),
            calib, warm=True, from_cache=from_cache,
            elapsed_s=time.perf_counter() - t_start, forced_parallel=forced_parallel,
            chunksize=self._options["chunksize"], parallel_correction=correction,
            cluster=Cluster(dask_backend.address(client), usable),
        )

    def _finish(
        self,
        plan: Plan,
        t_start: float,
        n_items: int,
        n_sampled: int,
        from_cache: bool,
        timeline: list[tuple[float, int]],
        sampling_s: float,
        overhead_s: float,
        observed: Optional[float],
    ) -> None:
        report = RunReport(
            plan=plan,
            wall_s=time.perf_counter() - t_start,
            n_items=n_items,
            n_sampled=n_sampled,
            from_cache=from_cache,
            workers_timeline=timeline,
            sampling_s=sampling_s,
            planning_overhead_s=max(0.0, overhead_s),
            observed_item_s=observed,
        )
        self._shared.reports.report = report
        self._shared.latest_report = report


class _SamplingWatch:
    """While the first items are sampled, start the pool as soon as they alone show
    that one will be worth it: a 300 ms function then finds its workers up when its
    first call returns, instead of starting them only then."""

    def __init__(self, owner: ParallelFunction, n_known: Optional[int]):
        self.owner = owner
        self.n_known = n_known
        self.progress = [0]
        self.t0 = time.perf_counter()
        self.cpu_s = 0.0  # this thread's own CPU: not the sampled function's
        self.done = threading.Event()
        self.thread = threading.Thread(target=self._run, name="adaptive_exec-prestart",
                                       daemon=True)
        self.thread.start()

    def _run(self) -> None:
        delay = 0.005
        cpu0 = time.process_time()
        try:
            while not self.done.wait(delay):
                elapsed = time.perf_counter() - self.t0
                share = (time.process_time() - cpu0) / elapsed
                if share < WAITING_MAX_CPU or share > 1 + OWN_THREADS_MIN:
                    # It waits (threads will serve it) or runs threads of its own
                    # (BLAS): no process pool for it. Look again later.
                    delay = min(delay * 2, 0.05)
                    continue
                if self._check(elapsed):
                    return
                delay = min(delay * 2, 0.05)
        finally:
            self.cpu_s = time.thread_time()

    def cpu_spent(self) -> float:
        """This thread's CPU so far, read live where the platform allows: a pool start
        still importing loky when sampling ends must not count as the function's CPU
        (it made heavy_task look like a BLAS function under load)."""
        ident = self.thread.ident
        if ident is not None and self.thread.is_alive() and hasattr(time, "pthread_getcpuclockid"):
            try:
                return time.clock_gettime(time.pthread_getcpuclockid(ident))
            except (OSError, ValueError):  # it ended meanwhile: its final reading below
                pass
        return self.cpu_s

    def _check(self, elapsed: float) -> bool:
        finished = self.progress[0]
        per_item = elapsed / (finished + 1)  # a lower bound: one call is still running
        left = (self.n_known - finished) if self.n_known is not None else READ_AHEAD_ITEMS
        if per_item * left >= PRESTART_FACTOR * calibration.current().startup_for(2):
            self.owner._maybe_prestart(per_item * left)
            # Starting the pool cost this thread CPU that is not the function's.
            self.cpu_s = time.thread_time()
            return True
        return False

    def stop(self) -> None:
        self.done.set()


class _CalibrationSync:
    """This machine's constants: read from the cache once per process, written back
    when this process measured something new."""

    def __init__(self) -> None:
        self.lock = threading.Lock()  # guards loaded and saved
        self.loaded = False
        self.saved: Optional[calibration.Calibration] = None


_calib_sync = _CalibrationSync()


def _after_fork_in_child() -> None:
    # The lock may have been held by a parent's thread that did not come along.
    _calib_sync.lock = threading.Lock()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


def _load_calibration() -> calibration.Calibration:
    with _calib_sync.lock:
        if not _calib_sync.loaded:
            _calib_sync.loaded = True
            stored = cache.load_calibration()
            if stored is not None and not calibration.current().measured:
                calibration.set_current(dataclasses.replace(
                    stored, source="measured earlier on this machine (cache): "
                    "start-up and overheads measured"))
                _calib_sync.saved = calibration.current()
    return calibration.current()


def _save_calibration() -> None:
    current = calibration.current()
    with _calib_sync.lock:
        # Only a complete measurement is worth keeping for other processes.
        if not calibration.overheads_measured() or current == _calib_sync.saved:
            return
        _calib_sync.saved = current
    cache.store_calibration(current)


def _flatten(batches: Iterator[list[Any]]) -> Generator[Any, None, None]:
    """The results one by one; closing it (or dropping it) stops the map's work.

    Each result is taken out of its batch as it is yielded: once the consumer drops it,
    nothing of ours keeps it alive (as CPython's Executor.map since bpo-14406)."""
    try:
        for batch in batches:
            batch.reverse()  # every batch is a fresh list of ours (see _collect)
            pop = batch.pop
            while batch:
                yield pop()
    finally:
        close = getattr(batches, "close", None)
        if close is not None:
            close()


def _collect(batches: Iterator[list[Any]]) -> list[Any]:
    # Every batch is a fresh list nobody else holds: the first becomes the answer
    # rather than a copy (a 300k-item serial map is mostly one or two batches).
    out: Optional[list[Any]] = None
    try:
        for batch in batches:
            if out is None:
                out = batch
            else:
                out.extend(batch)
    except KeyboardInterrupt as exc:
        # Ctrl-C between two batches lands here, not in the dispatcher: end the pool's
        # workers all the same, so that nothing runs on and no process is left behind.
        # (An item's own KeyboardInterrupt carries its index: the pool is fine.)
        if getattr(exc, "item_index", None) is None:
            loky_backend.shutdown()
        raise
    return out if out is not None else []


def _known_length(items: Iterable[Any]) -> Optional[int]:
    """len(items), or None (it streams, as a generator would) when there is none or it
    fails: range(10**20) overflows, a custom __len__ may raise."""
    if hasattr(items, "__len__"):
        try:
            return len(items)  # type: ignore[arg-type]
        except Exception:
            return None
    return None


# imap holds a batch's results until the consumer takes them: a batch is capped at about
# this many bytes of (pickled) results, as sampled. A judgement: 1 MB of results per
# chunk, with at most (IN_FLIGHT + BUFFERED) chunks per worker held (dispatch.py).
IMAP_CHUNK_BYTES = 1 << 20


def _imap_chunk_cap(features: Features) -> int:
    return max(16, IMAP_CHUNK_BYTES // max(features.pickle_size or 64, 64))


class _GuardedIterator:
    """The input iterator, with its own exception held back: the map runs every item
    read before it, yields their results, and raises it after them, as the loop would.
    (A KeyboardInterrupt is Ctrl-C: it leaves at once.)"""

    __slots__ = ("_it", "error", "count")

    def __init__(self, it: Iterator[Any]):
        self._it = it
        self.error: Optional[BaseException] = None
        self.count = 0

    def __iter__(self) -> _GuardedIterator:
        return self

    def __next__(self) -> Any:
        try:
            item = next(self._it)
        except StopIteration:
            raise
        except KeyboardInterrupt:
            raise
        except BaseException as exc:
            self.error = exc
            self._it = iter(())
            raise StopIteration from None
        self.count += 1
        return item


# Iterators over builtin sequences cannot raise: they go unguarded (and keep the serial
# loop's fast path, backends/serial.py).
_SAFE_ITERATORS: tuple[type, ...] = (type(iter([])), type(iter(())), type(iter(range(0))),
                   type(iter(range(1 << 70))))


def _guard(it: Iterator[Any]) -> Iterator[Any]:
    return it if isinstance(it, _SAFE_ITERATORS) else _GuardedIterator(it)


def _read_ahead(it: Iterator[Any], features: Features) -> tuple[list[Any], bool]:
    """Items read from ``it`` until enough work is seen; (items, the iterator ended)."""
    per_item = max(features.mean_s, 1e-9)
    want = min(READ_AHEAD_ITEMS, math.ceil(READ_AHEAD_WORK_S / per_item))
    size = (features.input_pickle_size or 64) + 64
    want = max(1, min(want, READ_AHEAD_BYTES // size))
    buffered = list(itertools.islice(it, want))
    return buffered, len(buffered) < want


def _merge_plain_calls(features: Optional[Features], plain: list[float]) -> Optional[Features]:
    """Fold the durations of earlier plain calls into the sampled features."""
    if features is None or not plain:
        return features
    n = features.n_samples
    durations = [features.mean_s] * n + plain  # the sample's spread is kept through its CV
    merged = features_from(durations, [], [], features.peak_memory or 0,
                           features.function_complexity, 0.0, 0.0, features.picklable)
    cvs = [c for c in (features.coefficient_of_variation, merged.coefficient_of_variation)
           if c is not None]
    return dataclasses.replace(
        features,
        mean_s=merged.mean_s,
        coefficient_of_variation=max(cvs) if cvs else None,
        n_samples=n + len(plain),
    )


def _empty_plan() -> Plan:
    return Plan("serial", 1, 1, 0.0, 0.0, 0.0, "there are no items", False, {})


def _with_progress(
    gen: Iterator[list[Any]], total: Optional[int], name: str
) -> Iterator[list[Any]]:
    from tqdm.auto import tqdm

    with tqdm(total=total, desc=name, unit="item") as bar:
        for batch in gen:
            bar.update(len(batch))
            yield batch


@overload
def parallelize(func: F) -> ParallelFunction: ...
@overload
def parallelize(
    func: None = None, *, max_workers: Optional[int] = None, cache: bool = True,
    progress: bool = False, backend: str = "auto", timeout: Optional[float] = None,
    strict: bool = False, chunksize: Optional[int] = None,
    max_memory: Union[int, str, None] = None, client: Any = None,
) -> Callable[[F], ParallelFunction]: ...


def parallelize(
    func: Optional[Callable[..., Any]] = None,
    *,
    max_workers: Optional[int] = None,
    cache: bool = True,
    progress: bool = False,
    backend: str = "auto",
    timeout: Optional[float] = None,
    strict: bool = False,
    chunksize: Optional[int] = None,
    max_memory: Union[int, str, None] = None,
    client: Any = None,
) -> Union[ParallelFunction, Callable[[Callable[..., Any]], ParallelFunction]]:
    """Decorate a function with ``map``/``imap``/``starmap``/``plan``; bare or with options.

    max_workers: a ceiling on worker processes (None: what the machine allows).
    cache: remember what was measured about the function, to plan the next map at once.
    progress: show a tqdm progress bar (also ADAPTIVE_EXEC_PROGRESS=1).
    backend: "auto" decides (on the dask cluster of the active client, if there is one);
        "loky" always uses the process pool; "serial" never does; "dask" runs on a dask
        cluster: ``client``, else the current client, else $ADAPTIVE_EXEC_DASK_ADDRESS.
    strict: raise instead of warning and running serially when pickling fails.
    chunksize: items per task sent to a worker (None: chosen from measurements).
    max_memory: a ceiling on the memory the map's processes may hold, in bytes or as
        "2GB" (also ADAPTIVE_EXEC_MAX_MEMORY); workers are capped to fit under it.
    client: a dask.distributed Client: run on its cluster (needs the ``dask`` extra).
    """
    options = dict(max_workers=max_workers, cache=cache, progress=progress,
                   backend=backend, timeout=timeout, strict=strict, chunksize=chunksize,
                   max_memory=max_memory, client=client)
    if func is None:
        _check_options(max_workers, backend, timeout, chunksize, max_memory, client)
        return lambda f: ParallelFunction(f, **options)  # type: ignore[arg-type]
    return ParallelFunction(func, **options)  # type: ignore[arg-type]


def adaptive_map(func: Callable[..., Any], items: Iterable[Any], /, **options: Any) -> list[Any]:
    """``[func(x) for x in items]`` for any callable (lambdas and closures too), in parallel
    when that is faster. Options as for ``parallelize``."""
    if isinstance(func, ParallelFunction):
        pf = func if not options else ParallelFunction(func._func, **{**func._options, **options})
    else:
        pf = ParallelFunction(func, **options)
    return pf.map(items)
