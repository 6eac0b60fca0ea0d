"""Decisions taken while a map runs: values in, a decision out, no map object.

- ``forced_serial``: must this map run in the caller (a nested map, the user's switch)?
- ``reentered``: or was it started from a signal handler that interrupted another map?
- ``pool_cpus``: how many workers could a pool have for it now?
- ``dask_client``: does it go to a dask cluster?
- ``SamplingWatch``: start the pool while the first items are still being sampled.
- ``maybe_prestart`` / ``worth_a_pool``: start the pool ahead of a serial run that grew.
- ``monitor``: how many workers to keep busy, re-read from the machine during a run.
"""

from __future__ import annotations

import contextvars
import dataclasses
import functools
import logging
import os
import random
import sys
import threading
import time
import types
from typing import Any, Callable, Optional

from . import ahead, cache, calibration, planner, system, worker
from .backends import dask as dask_backend
from .backends import loky as loky_backend
from .backends import starts
from .backends.threads import ThreadTarget
from .fingerprint import describe
from .planner import OWN_THREADS_MIN, WAITING_MAX_CPU, WAITING_MIN_SHARE, make_plan
from .records import Calibration, Cluster, Features, Options, Plan, fmt_bytes, fmt_s

logger = logging.getLogger("adaptive_exec")

# Start the pool ahead of a plan when the work left is at least this many start-ups:
# the caller keeps working meanwhile, so a free core makes it nearly free. Not for a
# function that keeps more than one CPU busy itself (BLAS): its workers would compete
# with it (measured: the numpy workload's serial run 1.56x slower with a pool booting).
PRESTART_FACTOR = 1.5
# What starting a pool costs the caller's process: spawning the workers and their
# threads here, CPU and GIL (measured when it imported loky too, ~70 ms: fat_return's
# serial run 0.38 -> 0.49 s).
PRESTART_COST_S = 0.07
# Serial chunks whose per-item time grows by GROWTH_MIN or more are projected one more
# step ahead (at most GROWTH_CAP times the last), so the re-plan does not price the
# rest of an ascending workload at its cheaper past (the skewed benchmark workload).
GROWTH_MIN = 1.5
GROWTH_CAP = 4.0
# A sampled call that has run this long while items wait behind it: the watch sends the
# next items to the pool meanwhile (ahead.py). Twice a forked pool's start-up or more,
# and about what a template's costs: a call this long is worth a worker's start to run
# beside (a judgement; a 20 ms function never waits for it).
SEND_AHEAD_AFTER_S = 0.1
# A sampled call that has waited this long (sleeping, on a socket or pipe, a child
# process, a lock: not the disk, a first call's way of reading what it keeps), with items
# behind it: they go to threads of this process meanwhile (ahead.py), as the plan would
# run them. Without it two 0.5 s waits took 1.06 s cold, where threads take 0.5 s. Looked
# at on each look at the caller (~1 ms apart at first): at 20 ms, and only at the watch's
# doubling decision times, 200 waits of 10 ms ran their first two calls here one after
# the other (0.09-0.12 s cold, 0.08 since; 0.065-0.075 warm). A call of 2 ms never gets
# here, however many wait (below).
# Counted over the sample instead (10 ms), 200 waits of 10 ms went from 0.09-0.10 s to
# 0.085-0.10, and calls of 2 ms that wait on a lock they share went to threads, whose
# items then held up the caller's sampled calls on that lock: the loop's time looked
# 35% longer, and the threads' trial no longer saw that they lose. Not kept.
THREADS_AHEAD_AFTER_S = 0.006
# Looks at the caller twice as often (WAITS_LOOK_S / 2) this long into the map: enough
# looks to tell a first call that waits (MIN_LOOKS) by THREADS_AHEAD_AFTER_S or soon after.
THREADS_AHEAD_LOOKS_FOR_S = 0.03
# The same where the template was forked at the map's start (starts.fork_template_early):
# it forks a worker in ~25-30 ms, so a call of 40 ms is worth one beside it.
SEND_AHEAD_FORKED_S = 0.04
# Maps of at most this many items per worker fork the template at their start. It costs
# a map whose items are tiny ~2 ms on its first run (8 items of 1 us: 3.5-3.9 ms, 9: 1.5-
# 1.8); 8 per worker took memory_heavy cold from 0.588 s to 0.57 s, at that cost to
# every first map of 9-16 tiny items (README, "No sample-then-decide stall").
FORKED_TEMPLATE_ITEMS = 4
# A sampled call that has run this long, where the template was forked at the map's
# start and a pool was found worth it: the watch starts the pool from the template now
# (~35 ms to its first worker), so that it is up when the call reaches
# SEND_AHEAD_FORKED_S; a call that ends sooner has the caller fork it (``fork_for``).
PRESTART_FORKED_S = 0.02
# How often the watch that follows a fork by the caller looks at the call's length.
SEND_AHEAD_LOOK_S = 0.005
# A sampled call that has run this long, with items behind it and a pool worth it,
# has the template started (_template_early): half SEND_AHEAD_AFTER_S, a judgement.
TEMPLATE_AFTER_S = 0.05
# How often the watch looks at what the caller's call waits on (system.ThreadWaits): a
# look costs ~20 µs, and one that must take the GIL from a computing call waits for it.
WAITS_LOOK_S = 0.002
# The watch's own generator: the module's shared one is the user's (random.seed(0)
# before a map, then random.random() in its items: the watch's draws between them
# shifted every result, also of a map that ran serially in the caller).
_JITTER = random.Random()
# The caller's own first look at its sampled calls (SamplingWatch._quick_look), then at
# doubling times: sooner than the watch's thread can look (its wakes wait on the GIL).
QUICK_LOOK_S = 0.002
# Unknown length while sampling: assume this many items are left (the read-ahead's cap,
# run.READ_AHEAD_ITEMS), the most a stream is read ahead before planning.
STREAM_ITEMS = 10_000


def forced_serial(options: Options) -> Optional[str]:
    """Why this map must run in the caller, or None when it may use a pool."""
    if system.disabled():
        return f"{system.ENV_DISABLE}=1 is set"
    if system.in_worker():
        return "already inside an adaptive_exec worker: nested maps run serially"
    if dask_backend.in_task():
        return "already inside a dask task: nested maps run serially"
    if options.backend == "serial":
        return "backend='serial' was requested"
    if system.shutting_down():
        return ("the interpreter is shutting down (the main thread has returned): no "
                "pool can start now")
    if _daemonic():
        return ("inside a daemonic process (a multiprocessing.Pool worker), which may "
                "not start processes of its own")
    return None


def feeds_own_input(func: Callable[..., Any], items: Any) -> Optional[str]:
    """Why a map of ``func`` over the list ``items`` must run in the caller: the
    function reaches that very list (through a global it or a function it calls reads,
    a captured variable, a default, a partial's argument, its object's attribute) and
    its code may grow a list (``append``, ``extend``, ``insert``, ``+=``), as a crawler
    grows its queue; the loop walks on over what it adds. In a worker it appended to a
    copy: 48 results of the loop's 334, silently (found by a hunting helper). None for
    any other input or function: one that only reads the list it is mapped over
    (``x / max(xs)``) keeps the pool."""
    if not isinstance(items, list):
        return None
    found: list[types.CodeType] = []
    try:
        reached = _reaches(func, items, _REACH_DEPTH, set(), found)
        grows = reached and any(_may_grow(code) for code in found)
    except Exception:  # noqa: BLE001 - an object that resists looking: not found
        grows = False
    if not grows:
        return None
    return ("the function reaches the list it is mapped over and may append to it, as "
            "a crawler does: the loop walks on over what it adds, which a worker's copy "
            "of the list would keep")


_REACH_DEPTH = 4  # the function, a helper it calls, an object, its attribute
# Objects looked into at most: every map over a list pays the walk, and a method of an
# object whose attributes are objects with attributes of their own (a tree of 40 of 40
# of 40: 64,000 objects) made it 16 ms a map, 3 ms at 500; cut at 64 (~0.4 ms), a
# crawler further in is not seen.
_REACH_MAX_OBJECTS = 64
_GROWING_NAMES = frozenset({"append", "extend", "insert", "__iadd__"})


def _may_grow(code: types.CodeType) -> bool:
    """Could ``code`` grow a list: a call of a growing method, or an in-place operator
    (``queue += found``, ``queue *= 2``)?"""
    if _GROWING_NAMES.intersection(code.co_names):
        return True
    import dis

    return any(ins.opname.startswith("INPLACE_")
               or (ins.opname == "BINARY_OP" and ins.argrepr.endswith("="))
               for ins in dis.get_instructions(code))


def _reaches(obj: Any, target: list[Any], depth: int, seen: set[int],
             codes_seen: list[types.CodeType]) -> bool:
    """Does ``obj`` reach the list ``target`` within ``depth`` steps? The code objects
    of the functions looked into are added to ``codes_seen``."""
    if obj is target:
        return True
    if depth <= 0 or id(obj) in seen or len(seen) >= _REACH_MAX_OBJECTS:
        return False
    seen.add(id(obj))
    if isinstance(obj, functools.partial):
        parts: list[Any] = [obj.func, *obj.args, *obj.keywords.values()]
    elif isinstance(obj, types.MethodType):
        parts = [obj.__func__, obj.__self__]
    elif isinstance(obj, types.FunctionType):
        codes, names = [obj.__code__], set[str]()
        while codes:
            code = codes.pop()
            codes_seen.append(code)
            names.update(code.co_names)
            codes.extend(c for c in code.co_consts if isinstance(c, types.CodeType))
        glob = obj.__globals__
        parts = [glob[n] for n in names if n in glob]
        # A module's attribute it reads by name (``state.TODO.append(url)``).
        # (Over the modules found so far only: extended while read, a module's attribute
        # that is a module, os.path's os, made the walk endless.)
        modules = [part for part in parts if isinstance(part, types.ModuleType)]
        parts.extend(vars(mod)[n] for mod in modules for n in names if n in vars(mod))
        for cell in obj.__closure__ or ():
            try:
                parts.append(cell.cell_contents)
            except ValueError:  # an empty cell
                pass
        parts.extend(obj.__defaults__ or ())
        parts.extend((obj.__kwdefaults__ or {}).values())
        wrapped = getattr(obj, "__wrapped__", None)
        if wrapped is not None:
            parts.append(wrapped)
    elif isinstance(obj, (type, types.ModuleType, types.BuiltinFunctionType)):
        return False
    elif isinstance(obj, (list, tuple, set, frozenset, dict)):
        return False  # another collection: what it holds is not scanned (its size)
    else:
        attrs = getattr(obj, "__dict__", None)
        parts = list(attrs.values()) if isinstance(attrs, dict) else []
        call = next((vars(k)["__call__"] for k in type(obj).__mro__
                     if "__call__" in vars(k)), None)
        if isinstance(call, types.FunctionType):
            parts.append(call)
    # Every part is looked into (not any(), which stops at the first that reaches):
    # the code that grows the list may be a helper's, found after the list itself.
    reached = False
    for part in parts:
        reached = _reaches(part, target, depth - 1, seen, codes_seen) or reached
        if len(seen) >= _REACH_MAX_OBJECTS:
            break
    return reached


# Our modules' frames: those whose file is in this package.
_OURS = os.path.dirname(__file__) + os.sep
# The code of our frames that call the user's code: filled on first use (their modules
# import this one).
_USER_CALLS: frozenset[types.CodeType] = frozenset()


def _user_calls() -> frozenset[types.CodeType]:
    """The frames of ours from which a map may legitimately start: they call the
    function (a sampled or serial run, a plain call, a thread's chunk), read the items,
    or run the initializer, and hold no lock of ours meanwhile."""
    global _USER_CALLS
    if not _USER_CALLS:
        from . import api, run
        from .backends import serial

        codes = {worker.call_each.__code__, worker.initialize_here.__code__,
                 run.GuardedIterator.__next__.__code__,
                 api.ParallelFunction.__call__.__code__, serial.run_chunk.__code__}
        # Before 3.12 its comprehensions, which call the function, are code of their own.
        codes.update(c for c in serial.run_chunk.__code__.co_consts
                     if isinstance(c, types.CodeType))
        _USER_CALLS = frozenset(codes)
    return _USER_CALLS


def reentered() -> Optional[str]:
    """Why this map, started while this thread is inside another map's own code (a
    signal handler, a ``__del__``, a GC or weakref callback run there) rather than in
    the user's code that map calls, must run in the caller; None otherwise. Such a map
    must not touch the pool: the interrupted code may hold its locks (loky's submit holds
    the executor's shutdown_lock, our wait the futures' conditions) and cannot go on
    until the handler returns: it hung. Called once per map (run.MapRun.prepare), from
    the map's own frames: ~1 µs, and ~0.15 µs per frame of the caller's stack.

    Read from the stack, not from a thread-local flag set while our code runs: a flag
    must be cleared at every place our code calls the user's (the function, the items,
    the initializer) and at every place it suspends (imap's yields), and set again and
    restored on every exit; one missed, and it lies, a hang where it says "not inside".
    The stack holds only what runs now (a suspended imap is not on it, another thread has
    its own); a place missing from _user_calls only makes a legitimate nested map run in
    the caller, which is always right. Only our frames decide: loky's, concurrent.futures'
    and threading's are also the user's (their own threads and pools call their
    functions from there)."""
    # Gathered by every map, not first by one in a signal handler: it imports.
    user_calls = _user_calls()
    frame: Optional[types.FrameType] = sys._getframe(1)
    # This map's own frames, from here down to its caller's.
    while frame is not None and frame.f_code.co_filename.startswith(_OURS):
        frame = frame.f_back
    # The caller's, and any library's, down to the innermost frame of an enclosing map.
    while frame is not None and not frame.f_code.co_filename.startswith(_OURS):
        frame = frame.f_back
    if frame is None or frame.f_code in user_calls:
        return None
    return ("a map started while this thread was inside another map's machinery (a "
            "signal handler, a __del__): it runs in the caller")


def _daemonic() -> bool:
    """Is this a daemonic multiprocessing process? Its pool's start raised
    AssertionError ("daemonic processes are not allowed to have children"), blamed on
    an item, where the loop ran."""
    import multiprocessing

    return bool(multiprocessing.current_process().daemon)


def pool_cpus(options: Options) -> int:
    """Workers a pool could have for this function now; 0 when no pool may be used."""
    if forced_serial(options) is not None:
        return 0
    cpus = system.usable_cpus(options.max_workers)
    return cpus if cpus >= 2 or options.backend == "loky" else 0


def dask_client(options: Options) -> Any:
    """The client of the dask cluster this map runs on, or None for this machine:
    backend='dask' or client= must find one (or raise, saying how to give one); 'auto'
    takes the active client if there is one (timeout= stays local: it needs processes
    of our own)."""
    if options.backend == "dask" or options.client is not None:
        return dask_backend.resolve(options.client)
    if options.backend == "auto" and options.timeout is None:
        return dask_backend.current_client()
    return None


def pool_calibration() -> Calibration:
    """This machine's constants, with the start-up of the pool this map would use (its
    start path's: a fork's ~20 ms, loky's own ~0.15 s)."""
    return calibration.get(loky_backend.start_path())


def maybe_prestart(options: Options, work_left_s: float, epoch: Optional[int] = None) -> Any:
    """Start the pool ahead when the work left clearly dwarfs its start-up (``epoch``:
    unless the pool was shut down since, by Ctrl-C); the executor, if it did."""
    cpus = pool_cpus(options)
    if cpus and work_left_s >= PRESTART_FACTOR * pool_calibration().startup_for(cpus):
        return loky_backend.prestart(cpus, epoch)
    return None


def worth_a_pool(options: Options, features: Features, n_items: int, done: int) -> bool:
    """Would starting a pool now pay: a warm one beats the loop on the items left, and
    what it saves after its start-up outweighs what starting it costs here?"""
    snap = system.snapshot(options.max_workers, with_memory=False)
    calib = pool_calibration()
    plan = make_plan(features, n_items, done, snap, calib, warm=True, from_cache=False)
    if plan.mode == "serial" or plan.estimated_speedup <= 1:
        return False
    left_after_startup = (n_items - done) * features.mean_s - calib.startup_for(
        snap.usable_cpus)
    saved = left_after_startup * (1 - 1 / plan.estimated_speedup)
    return saved >= 2 * PRESTART_COST_S


def monitor(options: Options, plan: Plan, features: Features
            ) -> Callable[[int], tuple[int, str]]:
    """decide(busy workers now) -> (how many to keep busy, why), re-read from the
    machine; the why ("load: 1 of 2 cores busy with other processes", "memory: 200.0 MB
    free, below the reserve") opens the line logged when the number changes."""
    probe = system.LoadProbe(loky_backend.our_pids)
    per_worker = (loky_backend.worker_rss() or planner.WORKER_BASE_MEMORY) + (
        features.peak_memory or 0)

    def decide(current: int) -> tuple[int, str]:
        others, room = system.live_readings(probe, options.max_memory)
        usable = system.usable_cpus(options.max_workers)
        busy = min(system.busy_cpus(others), usable)
        target = max(1, min(plan.n_workers, usable - busy))
        why = f"load: {busy} of {usable} cores busy with other processes"
        if room is not None and room < planner.MEMORY_RESERVE:
            # Memory is running out: shed a worker's work each reading, before the
            # machine swaps or the OOM killer picks a process.
            target = min(target, max(1, current - 1))
            why = f"memory: {fmt_bytes(room)} free, below the reserve"
        elif room is not None and room < planner.MEMORY_RESERVE + per_worker:
            if target > current:
                why = f"memory: {fmt_bytes(room)} free, no room for one more worker"
            target = min(target, current)  # no room for one more
        return target, why

    return decide


class SamplingWatch:
    """While the first items are sampled, start the pool as soon as they alone show
    that one will be worth it: a 300 ms function then finds its workers up when its
    first call returns, instead of starting them only then.

    The watch is a thread, so that it can decide while a long first call runs. Where
    the caller runs no other thread, the workers are forked, and a fork must come from
    the only thread: the watch then only decides, ends, and the caller forks them
    between two calls (``on_item``); a thread then watches again, to send the items
    behind a call that runs long to them (``_send_when_long``). Otherwise the watch
    starts them itself, on a path that is safe from any thread (backends/starts.py).
    """

    def __init__(self, options: Options, n_known: Optional[int],
                 source: Optional[ahead.SharedSource] = None,
                 func: Optional[Callable[..., Any]] = None, star: bool = False,
                 forked_template: bool = False, bounded: bool = False):
        self.options = options
        self.bounded = bounded  # imap: items sent ahead are bounded (ahead.SentAhead)
        self.n_known = n_known
        # The input, when the watch may send items to the pool while a long call runs
        # here (a list, tuple or range of known length; see ahead.py).
        self.source = source
        self.func = func
        self.star = star
        self.finished = 0  # calls completed, written by the caller's thread
        self.t0 = time.perf_counter()
        self.call_began = self.t0  # when the caller's current call began
        # The caller's thread, and its CPU seconds when its call began (_send_to_threads).
        self.caller = threading.current_thread()
        self.call_cpu0 = time.thread_time()
        self.cpu0 = time.process_time()
        self.next_look = self.t0 + QUICK_LOOK_S  # the caller's next _quick_look
        # What the caller's calls wait on, looked at every WAITS_LOOK_S by this watch.
        self.waits = system.ThreadWaits(threading.get_native_id(), threading.get_ident())
        # CPU the pool's own threads here had spent when the watch began (cpu_spent).
        self._pool_threads0 = {t.ident: _thread_cpu(t) for t in loky_backend.pool_threads()}
        self.decided = False  # a pool was found worth starting (by either thread)
        self.cpu_s = 0.0  # this thread's own CPU: not the sampled function's
        self.cpu_before = 0.0  # the CPU of the watch's thread that ended for a fork
        # A Ctrl-C that ends the map shuts the pool down: a start ahead this watch
        # decides after that must not happen (the map is gone).
        self.epoch = loky_backend.current_epoch()
        # Work left (seconds) when the watch decided on a start that the caller's
        # thread must make itself (a fork); None until then, or once made.
        self.fork_for: Optional[float] = None
        self.started: Any = None  # the executor this watch started ahead, if any
        self.ahead: Optional[ahead.SentAhead] = None  # items it sent to that pool
        self.sending = False  # it sends items ahead: the map waits for it to hand them over
        self.switching = False  # it holds the GIL's switch interval low (system.fast_switching)
        self.template_asked = False  # it had the template started early (_template_early)
        self.no_threads = False  # the function must not run on threads (_send_to_threads)
        self.code_read = False  # no_threads was read from its code
        # The watch's first look in the caller's current call: (when, the caller's CPU).
        self.first_look: Optional[tuple[float, float]] = None
        # What items sent ahead may take (_ahead_width): the caller's memory now, to see
        # how much its long call has grown it; other processes' load, read from the
        # watch's first decision on (not the map's probe: its plan-time window).
        self.rss0 = system.process_rss(os.getpid()) if source is not None else None
        self.probe: Optional[system.LoadProbe] = None
        # Set when the map is left before using that pool. With ``started``, under
        # ``_lock``: a map left while this thread is still starting the pool (a start
        # takes ~0.3 s on loky's path) must not leave that pool running once started.
        self.abandoned = False
        self.forked_template = forked_template  # forked for this map (start)
        self.forked_here = False  # the caller forked the pool between two calls (_fork_now)
        # Pickled input + result bytes of the sampled calls, as sampling measures them.
        self.sizes: list[int] = []
        # The interpreter settings items run under, read here, on the caller's thread.
        self.settings = worker.caller_settings()
        # Its context too (a copy costs nothing): its variables are read from it only
        # if items are sent ahead (worker.context_blob).
        self.context = contextvars.copy_context()
        self._lock = threading.Lock()
        self.done = threading.Event()
        self.thread = threading.Thread(target=self._run, name="adaptive_exec-prestart",
                                       daemon=True)
        self.thread.start()

    @classmethod
    def start(cls, options: Options, n_known: Optional[int],
              source: Optional[ahead.SharedSource] = None,
              func: Optional[Callable[..., Any]] = None, star: bool = False,
              bounded: bool = False) -> Optional[SamplingWatch]:
        """A watch, or None when no pool could be started ahead for this map."""
        cpus = pool_cpus(options)
        if not cpus or (n_known is not None and n_known < 2):
            return None
        warm = loky_backend.is_warm(cpus)
        if warm and source is None:
            return None  # no pool to start, no item to send ahead
        # Before the watch's thread exists: a fork is safe only from the only thread.
        # Only for few items: there a long first call holding the pool back costs much
        # of the map, and a short map pays little for it; after a fork each page the
        # caller writes is copied once (measured: 300k items of 1 µs sampled at 1.6-1.8
        # µs, not 1.0-1.6, and ran 1.2x longer).
        forked = (source is not None and not warm and n_known is not None
                  and n_known <= FORKED_TEMPLATE_ITEMS * cpus and starts.fork_template_early())
        # Given to the watch before its thread starts, which reads it (_long_call).
        return cls(options, n_known, source, func, star, forked_template=forked,
                   bounded=bounded)

    def _run(self) -> None:
        delay = 0.005
        due = self.t0 + delay
        cpu0 = time.process_time()
        # Every wake of this thread, and each file it reads to look at the caller, waits
        # for the caller's call to yield the GIL: at the default 5 ms switch interval its
        # first decision came ~30-45 ms into a long call (two_heavy), at 0.5 ms ~5 ms.
        system.fast_switching(True)
        self.switching = True
        try:
            while not self.done.wait(self._look_every() * _JITTER.uniform(0.5, 1.5)):
                # At irregular times: looks every 2 ms at calls that sleep 2 ms each fell
                # in step with them (beside a busy core the caller, just woken, waited for
                # the core this thread was looking from: 0 looks of 3 found it asleep).
                self.waits.look()
                now = time.perf_counter()
                if self.first_look is None or self.first_look[0] < self.call_began:
                    self.first_look = (now, _thread_cpu(self.caller))
                if (not self.no_threads and now - self.call_began >= THREADS_AHEAD_AFTER_S
                        and self._send_to_threads(
                            (time.process_time() - cpu0) / (now - self.t0))):
                    # At each look, not at the doubling times below: those fell at 5, 15
                    # and 35 ms, after the first two calls of 10 ms had ended each.
                    return
                if now < due:
                    continue
                delay = min(delay * 2, 0.05)
                due = time.perf_counter() + delay
                elapsed = time.perf_counter() - self.t0
                share = (time.process_time() - cpu0) / elapsed
                waits = self._waits(share)
                if waits or share > 1 + OWN_THREADS_MIN:
                    # It waits (threads will serve it) or runs threads of its own
                    # (BLAS): no process pool for it. Look again later.
                    continue
                if self._may_send_ahead():
                    self._template_early()
                if not self.decided:
                    if self.probe is None and self.source is not None:
                        self.probe = system.LoadProbe(loky_backend.our_pids)
                    if self._check(elapsed) and not self._may_send_ahead():
                        return
                if self.decided:
                    delay = min(delay, 0.01)  # a long call is seen within 10 ms
                    due = min(due, time.perf_counter() + delay)
                    self._start_from_forked_template()
                if self.decided and self._long_call() and self._send_ahead():
                    return
        except Exception as exc:  # a start ahead is a bonus: the map runs without it
            logger.debug("start ahead: %r", exc)
        finally:
            if self.switching:
                system.fast_switching(False)
            self.cpu_s = time.thread_time()

    def _look_every(self) -> float:
        """Seconds between two looks at the caller: half WAITS_LOOK_S in the map's
        first THREADS_AHEAD_LOOKS_FOR_S, where a first call that waits is worth
        overlapping as soon as the looks (system.ThreadWaits.MIN_LOOKS) tell it."""
        if time.perf_counter() - self.t0 < THREADS_AHEAD_LOOKS_FOR_S:
            return WAITS_LOOK_S / 2
        return WAITS_LOOK_S

    def _waits(self, cpu_share: float) -> bool:
        """Does the function mostly wait (threads will serve it, not a pool)? As the
        planner judges it: a low CPU share, and looks at the caller (where there were
        enough) that found it waiting on something threads overlap."""
        waited = self.waits.share()
        return cpu_share < WAITING_MAX_CPU and (waited is None or waited >= WAITING_MIN_SHARE)

    def cpu_spent(self) -> float:
        """This thread's CPU so far, read live where the platform allows: a pool start
        still under way when sampling ends must not count as the function's CPU
        (it made heavy_task look like a BLAS function under load). With it, what the
        pool's own threads in this process (loky's manager and queue feeder) spent since
        the watch began: a pool forked while sampling goes on (_quick_look) feeds its
        workers from them, 0.09-0.22 CPUs over a 0.3 ms function's sample, and once over
        0.3 the function was judged to run threads of its own (a CI run planned it serial)."""
        pool = sum(_thread_cpu(t) - self._pool_threads0.get(t.ident, 0.0)
                   for t in loky_backend.pool_threads())
        sent = self.ahead
        if sent is not None and sent.on_threads:
            # Threads items went ahead to (_send_to_threads), started during the sample:
            # their CPU read as the function's own threads (threads_cpu 0.3+, a BLAS
            # function's), and the rest of 200 waits of 10 ms went to a process pool.
            pool += sum(_thread_cpu(t) for t in sent.executor.threads())
        if self.thread.is_alive():
            own = _thread_cpu(self.thread)
            if own:
                return self.cpu_before + own + pool
        return self.cpu_before + self.cpu_s + pool

    def _left(self) -> int:
        """Items not finished by the caller (its current call's included)."""
        return (self.n_known - self.finished) if self.n_known is not None else STREAM_ITEMS

    def _check(self, elapsed: float) -> bool:
        """Is a pool worth starting now? If so it is started (here, or by the caller's
        thread at its next call's end: ``fork_for``)."""
        if self.decided:
            return True  # the caller decided first (_quick_look)
        finished = self.finished
        per_item = elapsed / (finished + 1)  # a lower bound: one call is still running
        left = self._left()
        alone = starts.forks_once_alone()
        startup = calibration.get(starts.FORK if alone else None).startup_for(2)
        if per_item * left >= PRESTART_FACTOR * startup and not self._too_fat(per_item):
            if alone:
                # The caller forks at its next call's end.
                with self._lock:
                    if not self.decided:
                        self.decided = True
                        self.fork_for = per_item * left
                return True
            self.decided = True
            self._keep(maybe_prestart(self.options, per_item * left, self.epoch))
            # Starting the pool cost this thread CPU that is not the function's.
            self.cpu_s = time.thread_time()
            return True
        return False

    def _too_fat(self, per_item: float) -> bool:
        """Do the sampled items' inputs and results cost more to move through the caller
        than a pool could save (the planner's test: the caller's share alone over the
        loop's time / MIN_SPEEDUP)? Then the plan will stay serial and a pool started now
        is waste (fat_return, 200 KB results of 0.24 ms calls: a pool forked while
        sampling, loky imported for it, cost the serial map ~13%)."""
        if not self.sizes or per_item <= 0:
            return False
        moved = sum(self.sizes) / len(self.sizes) * calibration.get().byte_cost_s
        return moved * planner.MIN_SPEEDUP >= per_item

    def _may_send_ahead(self) -> bool:
        """Could items still be sent ahead, should the caller's call run long?"""
        return self.source is not None and self._left() >= 2

    def _template_early(self) -> None:
        """A call that has run TEMPLATE_AFTER_S with items behind it may soon have them
        sent ahead, on a pool from the template (ahead.py): the template starts now, on
        another core, so that the pool is up ~0.1 s sooner (a fork from it takes ~30 ms,
        the template's own start ~0.15 s). Once per process; it serves later pools too."""
        if (not self.template_asked and self.started is None
                and time.perf_counter() - self.call_began >= TEMPLATE_AFTER_S
                and not loky_backend.is_warm(pool_cpus(self.options))):
            self.template_asked = True
            starts.start_template_ahead()

    def _start_from_forked_template(self) -> None:
        """The template was forked at the map's start and the current call has run
        PRESTART_FORKED_S: start the pool from it now, from this thread, instead of
        having the caller fork it when its call ends (measured, two items of 500 ms:
        the second reached a worker 88-106 ms into the first call, the pool started
        only once the call ran SEND_AHEAD_FORKED_S)."""
        if (not self.forked_template or self.started is not None
                or time.perf_counter() - self.call_began < PRESTART_FORKED_S):
            return
        with self._lock:
            if self.fork_for is None or self.abandoned or self.done.is_set():
                return
            self.fork_for = None
        # Found worth it already (_check, priced at a fork's start-up, what a forked
        # template's costs): started without maybe_prestart's second look.
        self._keep(loky_backend.prestart(pool_cpus(self.options), self.epoch))

    def _long_call(self) -> bool:
        quick = self.forked_template or self.forked_here  # workers up in ~25-30 ms
        after = SEND_AHEAD_FORKED_S if quick else SEND_AHEAD_AFTER_S
        return time.perf_counter() - self.call_began >= after

    def _send_ahead(self) -> bool:
        """The caller's call runs long: the items behind it go to the pool meanwhile, one
        per worker, topped up as they finish, until sampling ends (ahead.py). Where the
        caller would have forked the pool at its call's end, this thread starts it now,
        from the template (a fork from here would not be safe). False while a pool
        started from here is not worth it yet (the call has not run long enough)."""
        assert self.source is not None
        cpus = pool_cpus(self.options)
        work = (time.perf_counter() - self.t0) / (self.finished + 1) * self._left()
        if not cpus:
            return True
        if self.started is None and not loky_backend.is_warm(cpus) and (
                work < PRESTART_FACTOR * pool_calibration().startup_for(cpus)):
            return False
        if self.started is None and self._caller_forks_sooner():
            return False
        with self._lock:
            if self.abandoned or self.done.is_set():
                return True
            self.fork_for = None
            self.sending = True
        if self.started is None:
            self._keep(maybe_prestart(self.options, work, self.epoch))
        executor = self.started
        if executor is None or self.func is None:
            return True
        try:
            ref = worker.with_initializer(self.func, self.options.initializer,
                                          self.options.initargs)
        except Exception:  # cannot be pickled: the map finds out and says so itself
            return True
        # The caller's settings, read on its thread (a decimal context is per thread:
        # this one's is the default).
        ref = worker.with_context(dataclasses.replace(ref, settings=self.settings),
                                  worker.context_blob(self.context))
        if ref.blob is not None and len(ref.blob) >= worker.BLOB_FILE_MIN_BYTES:
            return True  # a large function: the map's plan decides if it is worth shipping
        target = loky_backend.LokyTarget(ref, self.star)
        executor, _ = target.open(cpus)
        width = self._ahead_width(cpus)
        if width < 2:
            return True  # load or memory leave room for one worker: the plan decides
        # Made before the hand-over: the map then finds every item the watch read from
        # the input here, or in the source's leftover (ahead.SharedSource.close).
        sent = ahead.SentAhead(self.source, target, executor, width, self.bounded)
        self.ahead = sent
        # The caller keeps one more item when there are more than the workers take: its
        # sample then shows a second call (a one-time cost is told from the next ones').
        reserve = 1 if self._left() - 1 > cpus else 0
        if not self.source.hand_over(reserve):
            return True
        while sent.feed() and not self.done.wait(0.005):
            pass
        return True

    def _send_to_threads(self, cpu_share: float) -> bool:
        """The caller's call has waited THREADS_AHEAD_AFTER_S on something threads
        overlap: the items behind it go to threads of this process meanwhile, as many as
        the plan would give them (planner._threads_plan), topped up as they finish,
        until sampling ends; the map's run takes them over (run._after_ahead). True once
        sent (the watch's work is done); False while not (yet) to be."""
        opts, func = self.options, self.func  # (stop() lets go of the function)
        if (self.no_threads or self.source is None or func is None
                or self._left() < 2 or opts.backend != "auto" or opts.timeout is not None
                or self.decided or self.started is not None or self.sending
                or time.perf_counter() - self.call_began < THREADS_AHEAD_AFTER_S):
            return False
        waited = self.waits.share()
        if waited is None or waited < WAITING_MIN_SHARE or self.waits.mostly() == system.DISK:
            return False
        # The current call's own CPU share where it can be read (the process's, since
        # the map began, counts this watch's start and the caller's bookkeeping: 0.2 for
        # a call that sleeps, which gave 10 threads where the plan then gave 64).
        # Counted from the watch's first look in the call where there was one: the
        # caller's own bookkeeping as the call began (~0.6 ms of its first call) read
        # as 0.09 of a 10 ms sleep, 22 threads where the plan then gave 64.
        spent = _thread_cpu(self.caller)
        began, cpu_began = self.call_began, self.call_cpu0
        first = self.first_look
        if first is not None and first[0] >= began and time.perf_counter() - first[0] > 0.002:
            began, cpu_began = first
        elapsed = time.perf_counter() - began
        if spent and elapsed > 0:
            cpu_share = max(0.0, spent - cpu_began) / elapsed
        if cpu_share >= WAITING_MAX_CPU:
            return False  # it computes as much as it waits: the plan decides
        # Last, and once (this runs at each look at a call that waits): its code read.
        if not self.code_read:
            self.code_read = True
            try:
                # It sets signal handlers or swaps process-wide state: never on threads.
                self.no_threads = worker.needs_main_thread(func)
            except Exception:  # code we cannot read: left to the plan
                self.no_threads = True
        if self.no_threads:
            return False
        cpus = system.usable_cpus(opts.max_workers)
        width = int(min(planner.MAX_THREADS, self._left() - 1,
                        max(2.0, cpus / max(cpu_share, 1e-3))))
        ceiling = system.worker_ceiling(opts.max_workers)
        if ceiling is not None:
            # max_workers=8, someone throttling requests: at most 8 at once, the
            # caller's own call one of them (9 ran at once).
            width = min(width, ceiling - 1)
        if width < 1:
            return False
        with self._lock:
            if self.abandoned or self.done.is_set() or self.decided:
                return True
            self.sending = True
        target = ThreadTarget(func, self.star, context=self.context)
        executor, _ = target.open(width)
        sent = ahead.SentAhead(self.source, target, executor, width, self.bounded)
        self.ahead = sent
        reserve = 1 if self._left() - 1 > width else 0  # a second call for the sample
        if not self.source.hand_over(reserve):
            return True  # sampling ended first: nothing was sent (no thread started)
        while sent.feed() and not self.done.wait(0.005):
            pass
        return True

    def _caller_forks_sooner(self) -> bool:
        """Will the caller fork the pool at its call's end (``fork_for``), while a pool
        from here would wait for a template still importing? Then the watch leaves it
        to the caller until the template serves: a call that ends first has its workers
        forked then, sooner than the template's (the watch used to wait for the
        template, and the caller, its fork taken over, waited too). Such workers are
        also a copy of the caller after its first call, with what that call set up (an
        index, a model, a connection built on first use), where a spawned template's
        build it again, each. Measured, first_call_setup (a 0.16-0.18 s first call,
        then 1.8 ms items; the template, asked for at 50 ms, serves 70-100 ms later):
        0.66-0.75 s when the watch waited for the template, 0.50-0.53 s in 4 runs of 5
        since (a fork pool, started before any call: 0.50 s); in the fifth the template
        served before the call ended, and its workers built the index again (0.75 s)."""
        with self._lock:
            caller_forks = self.fork_for is not None
        # Only while the caller can still fork (it may have started a thread since the
        # watch decided: then it would wait for the template itself, on its own thread),
        # and a template is on its way: one never started, or dead before it served,
        # would never be waited out (no item was sent ahead of a long call).
        return (caller_forks and not self.forked_template and starts.forks_once_alone()
                and starts.template().is_coming())

    def _ahead_width(self, cpus: int) -> int:
        """Workers items may go ahead to, as the plan would size a pool now: the pool's,
        less the CPUs other processes keep busy, and no more than the memory room (and
        max_memory) holds for calls as large as the current one has grown so far."""
        others = self.probe.others() if self.probe is not None else None
        snap = system.snapshot(self.options.max_workers, with_memory=True,
                               max_memory=self.options.max_memory, others_load=others,
                               worker_memory=loky_backend.worker_rss())
        width = min(cpus, snap.usable_cpus - system.busy_cpus(snap.others_load))
        now = system.process_rss(os.getpid())
        grown = max(0, now - self.rss0) if now is not None and self.rss0 is not None else 0
        cap = planner.memory_cap(Features(0.0, None, None, None, grown, 0, 0, None), snap)
        return min(width, cap) if cap is not None else width

    def wants_second(self, finished: int) -> bool:
        """Should the caller's sample go on to a second call? One call alone cannot tell
        a one-time cost from the per-item cost. Yes while this watch is sending items
        ahead of a long first call and is about to keep one for it (its hand-over may
        come just after the first call ends); and after a first call that mostly waited
        on the disk, a first call's way of paying for what it reads once: a library's
        pages, files then in the page cache (the numpy workload's first call, 0.47 s
        waiting on the disk, planned 30 threads for 200 items of BLAS that take 12 ms
        each in the loop: 1.3-1.5x slower than it, and the cache kept the plan)."""
        if self.sending and finished < 2 and self._left() - 1 > pool_cpus(self.options):
            return True
        waited = self.waits.share()
        return (finished == 1 and self._left() > 0 and waited is not None
                and waited >= WAITING_MIN_SHARE and self.waits.mostly() == system.DISK)

    def on_item(self, finished: int) -> float:
        """After each sampled call, on the caller's thread: count it, and make the start
        the watch decided on but could not make (a fork, once the watch has ended).
        Returns the CPU seconds that start took here (not the function's)."""
        self.finished = finished
        self.call_cpu0 = time.thread_time()
        self.call_began = now = time.perf_counter()
        if not self.decided and now >= self.next_look:
            self._quick_look(now)
        if self.fork_for is None:
            return 0.0
        cpu0 = time.thread_time()
        self._fork_now(watch_on=True)
        return time.thread_time() - cpu0

    def _quick_look(self, now: float) -> None:
        """On the caller's thread, between two sampled calls: is a forked pool worth
        starting now? The watch's thread asks the same, but later: each of its wakes
        waits for the caller's call to yield the GIL (measured, 0.2 ms items, when it
        still imported loky too: the watch decided at 11 ms and was ready at 37 ms,
        after sampling had ended, so the pool was forked after the plan; looked at
        here, it is forked at ~2 ms, and runs while sampling goes on).
        Only where the caller forks (one thread once the watch ends): otherwise the
        watch's thread starts the pool itself, from the template."""
        elapsed = now - self.t0
        self.next_look = now + elapsed  # looks at 2, 4, 8 ms...: a few in all
        share = (time.process_time() - self.cpu0) / elapsed
        if self._waits(share) or share > 1 + OWN_THREADS_MIN:
            return  # it waits, or runs threads of its own: as the watch (_run)
        if not (starts.fork_works() and starts.forced() in (None, starts.FORK)
                and starts.threads_now() == (2 if self.thread.is_alive() else 1)):
            return
        work = elapsed / self.finished * self._left()
        if (work < PRESTART_FACTOR * calibration.get(starts.FORK).startup_for(2)
                or self._too_fat(elapsed / self.finished)):
            return
        with self._lock:
            if not self.decided and not self.sending:
                self.decided = True
                self.fork_for = work

    def _fork_now(self, watch_on: bool = False) -> None:
        """The caller forks the pool the watch decided on, once the watch has ended (a
        fork must come from the only thread). ``watch_on`` (between two sampled calls,
        not at sampling's end): a new watch thread then sends the items behind a call
        that runs long to that pool meanwhile (_send_when_long)."""
        with self._lock:
            work_left, self.fork_for = self.fork_for, None
            if work_left is not None:
                # The watch ends: the caller forks alone. Set under the lock, or a watch
                # between the two (_send_ahead) took the start over too.
                self.done.set()
        if work_left is None:
            return  # the watch took it over: it starts the pool itself (_send_ahead)
        self.thread.join()
        starts.wait_gone(self.thread)
        self._keep(maybe_prestart(self.options, work_left, self.epoch))
        if (watch_on and self.started is not None and self.source is not None
                and self._left() >= 2 and not self.abandoned):
            self.forked_here = True
            self.cpu_before, self.cpu_s = self.cpu_s, 0.0
            self.done.clear()  # the ended thread's: the new one's stop() sets it again
            self.thread = threading.Thread(target=self._send_when_long,
                                           name="adaptive_exec-ahead", daemon=True)
            self.thread.start()

    def _send_when_long(self) -> None:
        """The watch after the caller forked the pool: a sampled call that runs long
        (SEND_AHEAD_FORKED_S) has the items behind it sent to that pool meanwhile, as
        from a template's pool (_run). Without it the pool forked early waited idle for
        the long call to return (three calls of 2 ms, then one of 0.6 s: the items behind
        it reached the workers ~0.6 s after the fork, now ~70 ms into the call). Real
        item costs are that uneven: parse_stdlib's 6th file takes 19 times the mean,
        sqlite_groupby's 8th 9.5 times. A call that holds the GIL in C code (ast.parse
        of a large file) lets this thread look only once it is back in Python."""
        try:
            while not self.done.wait(SEND_AHEAD_LOOK_S):
                if self._long_call() and self._send_ahead():
                    return
        except Exception as exc:  # a send ahead is a bonus: the map runs without it
            logger.debug("send ahead: %r", exc)
        finally:
            self.cpu_s = time.thread_time()

    def _keep(self, started: Any) -> None:
        # The pool a start ahead made; ended at once when the map was left meanwhile.
        with self._lock:
            self.started = started
            abandoned = self.abandoned
        if abandoned and started is not None:
            loky_backend.end_unused(started)

    def abandon(self) -> None:
        """The map was left before it used the pool this watch started: end that pool
        (a start ahead for nobody is not to run on), now or, when this watch's thread is
        still starting it, as soon as it is started."""
        self.stop()
        with self._lock:
            self.abandoned = True
            started = self.started
        if self.ahead is not None:
            self.ahead.cancel()
        if started is not None:
            loky_backend.end_unused(started)

    def stop(self) -> None:
        """Sampling ended: the watch ends, and a start it decided on is made now; items
        it was sending ahead are handed over (``ahead``) once it has ended."""
        self.done.set()
        # A watch still busy a moment after its map (see below) must not keep the
        # function alive: a bound method's instance was then not collected when the
        # map returned (seen under load on loky's exec path).
        self.func = None
        if self.source is not None:
            self.source.close()
        if self.fork_for is not None:
            self._fork_now()
        elif self.sending:
            self.thread.join()
        elif self.thread.is_alive():
            # Still busy a moment (starting a pool): not waited for here, where a small map
            # would pay for it; a pool started next waits for it (starts.settle).
            starts.note_helper(self.thread)
        if self.forked_template:
            # Forked for items sent ahead of a long call: none were, and the caller now
            # forks any pool itself. (One that did start workers ends with their pool.)
            starts.template().retire_forked(unused_only=True)


def _thread_cpu(thread: threading.Thread) -> float:
    """CPU seconds ``thread`` has used; 0.0 where that cannot be read (it ended, or the
    platform cannot tell another thread's CPU)."""
    if thread.ident is None or not hasattr(time, "pthread_getcpuclockid"):
        return 0.0
    try:
        return time.clock_gettime(time.pthread_getcpuclockid(thread.ident))
    except (OSError, ValueError):
        return 0.0


# Functions (fingerprints) this process has run in the caller, and when first: their
# one-time set-up (Features.setup_s) is paid here already, and in workers forked from
# here since. Grows by one key per function mapped.
_ran_here: dict[str, float] = {}


def note_ran_here(key: str, at: Optional[float] = None) -> None:
    """``key`` ran here, its first call ending at ``at`` (perf_counter; default now)."""
    _ran_here.setdefault(key, time.perf_counter() if at is None else at)


def ran_here(key: str) -> bool:
    """This process has run the function (its one-time set-up is paid here)."""
    return key in _ran_here


def workers_inherit_setup(key: str) -> bool:
    """Do the pool's workers (the current pool's, or one started now) inherit the
    function's one-time set-up from this process, forked after it ran here? Then they do
    not pay it (measured, first_call_setup: a 0.3 s index built here, workers forked
    after it showed 2 ms in their first call), and what their first calls show says
    nothing of what a fresh process pays."""
    ran = _ran_here.get(key)
    return ran is not None and loky_backend.copies_this_process_since(ran)


def _pool_key(key: str) -> str:
    """What the pool notes (loky_backend.note_given) once a map of ``key`` ran on it."""
    return "map:" + key


def note_ran_on_pool(executor: Any, key: str) -> None:
    loky_backend.note_given(executor, _pool_key(key))


class MapPlanner:
    """The plans of one map: its options, where it may run, what the cache remembered
    and the load measured since it began; ``plan`` first, ``after_serial_chunk`` while
    its serial loop runs."""

    def __init__(self, options: Options, func: Callable[..., Any], t_start: float,
                 forced: Optional[str], client: Any, entry: Optional[cache.Entry],
                 load: Optional[system.LoadProbe], key: str = ""):
        self.options = options
        self.func = func
        self.key = key  # the function's fingerprint
        self.t_start = t_start
        self.forced = forced
        self.client = client
        self.entry = entry
        self.load = load
        self.started_ahead: Any = None  # a pool the serial loop started ahead, if any
        self.sent_at: Optional[float] = None  # when sampling first sent items ahead
        self._needs_main: Optional[bool] = None

    # --- planning -----------------------------------------------------------------------

    def _main_thread_only(self, features: Features) -> bool:
        """Does the function set signal handlers (worker.needs_main_thread)? Read once,
        and only for a function that waits: no other is given threads."""
        if features.cpu_fraction is not None and features.cpu_fraction >= WAITING_MAX_CPU:
            return False
        if self._needs_main is None:
            try:
                self._needs_main = worker.needs_main_thread(self.func)
            except Exception:  # code we cannot read: as before
                self._needs_main = False
        return self._needs_main

    def _may_learn(self, features: Features) -> bool:
        """Would this map's measurements be remembered? Asked of the cache only for a
        function with threads of its own, the one a plan may try the pool for
        (planner.POOL_TRIAL_SPEEDUP): a read-only cache had every such map try it."""
        if (features.threads_cpu or 0.0) <= planner.OWN_THREADS_MIN:
            return True
        return bool(self.options.cache) and self.forced is None and cache.writes()

    def _correction(self) -> float:
        # Past runs on the same kind of workers correct the estimate: a cluster's runs
        # say nothing about the local pool's, nor the reverse.
        if self.entry is None:
            return 1.0
        mode = "parallel" if self.client is None else "distributed"
        return planner.parallel_correction(self.entry.runs, mode)

    def plan(self, features: Features, n_items: int, n_done: int) -> Plan:
        opts = self.options
        if self.client is not None and self.forced is None:
            return self._cluster_plan(features, n_items, n_done)
        calib = pool_calibration()
        snap = system.snapshot(opts.max_workers, with_memory=False)
        forced_parallel = self.forced_parallel()
        chunksize = 1 if opts.timeout is not None and self.forced is None else opts.chunksize
        kwargs: dict[str, Any] = dict(
            warm=loky_backend.is_warm(snap.usable_cpus), from_cache=self.entry is not None,
            elapsed_s=time.perf_counter() - self.t_start, forced_serial=self.forced,
            forced_parallel=forced_parallel, chunksize=chunksize,
            parallel_correction=self._correction(),
            threads_lost=self.entry is not None and planner.threads_lost(self.entry.runs),
            main_thread_only=self._main_thread_only(features),
            startup_left=loky_backend.startup_left(calib.startup_for(snap.usable_cpus),
                                                   snap.usable_cpus),
            # Who still pays the function's one-time set-up: this process, unless it ran
            # the function already; the pool's workers, unless a map of it ran there.
            setup_here=not ran_here(self.key),
            setup_pool=self._setup_share(features),
            # An item in the caller cannot be stopped at its timeout.
            caller_helps=opts.timeout is None,
            may_learn=self._may_learn(features),
        )
        plan = planner.make_plan(features, n_items, n_done, snap, calib, **kwargs)
        if plan.mode == "parallel":
            # Only a parallel plan needs the machine's load and memory (and is capped by
            # them). The load is read over the time since the map began, when that is
            # long enough to tell; else the run's monitor corrects it within ~0.3 s.
            if self.load is None and self.client is None and self.forced is None:
                # A cache hit: no sampling window to measure the load over; what runs
                # now is read instead (LoadProbe.others reads its instants).
                self.load = system.LoadProbe(loky_backend.our_pids)
            others = self.load.others() if self.load is not None else None
            snap = system.snapshot(opts.max_workers, with_memory=True,
                                   max_memory=opts.max_memory, others_load=others,
                                   worker_memory=loky_backend.worker_rss())
            plan = planner.make_plan(features, n_items, n_done, snap, calib, **kwargs)
        return plan

    def _setup_share(self, features: Features) -> float:
        """The share of the function's one-time set-up the pool's workers still pay:
        none after a map of it ran there; less when items sent ahead (``sent_at``) have
        been running in them meanwhile."""
        if (loky_backend.given_before(loky_backend.current_executor(), _pool_key(self.key))
                or workers_inherit_setup(self.key)):
            return 0.0
        if self.sent_at is None or not features.setup_s:
            return 1.0
        return max(0.0, 1.0 - (time.perf_counter() - self.sent_at) / features.setup_s)

    def forced_parallel(self) -> Optional[str]:
        """Why the pool must be used whatever the estimate, or None."""
        opts = self.options
        if opts.timeout is not None and self.forced is None:
            return (f"timeout={opts.timeout:g} s is set: every item runs in a worker, one "
                    "at a time, where it can be stopped")
        if self.client is not None:
            if opts.client is not None:
                return "client= was given"
            if opts.backend == "dask":
                return "backend='dask' was requested"
            return None
        return "backend='loky' was requested" if opts.backend == "loky" else None

    def _cluster_plan(self, features: Features, n_items: int, n_done: int) -> Plan:
        """The plan on a dask cluster: its threads (max_workers caps them), its constants
        (measured on first use), no start-up."""
        opts = self.options
        threads = dask_backend.n_threads(self.client)
        calib = dask_backend.calibration_for(self.client, threads)
        # The option and $ADAPTIVE_EXEC_MAX_WORKERS alike (the env ceiling was ignored).
        ceiling = system.worker_ceiling(opts.max_workers)
        usable = min(threads, ceiling) if ceiling else threads
        forced_parallel = self.forced_parallel()
        return planner.make_plan(
            features, n_items, n_done, system.snapshot(opts.max_workers, with_memory=False),
            calib, warm=True, from_cache=self.entry is not None,
            elapsed_s=time.perf_counter() - self.t_start, forced_parallel=forced_parallel,
            chunksize=opts.chunksize, parallel_correction=self._correction(),
            cluster=Cluster(dask_backend.address(self.client), usable),
        )

    def after_serial_chunk(self, features: Features, per_item: float, previous: float,
                           n_items: int, n_done: int) -> Optional[Plan]:
        """Between serial chunks: the plan for the rest, when it is no longer serial."""
        # Items getting steadily slower (the costly ones last, joblib issue 1220):
        # expect one more step of that growth rather than the last chunk's cost.
        growth = per_item / previous
        ahead = per_item * min(growth, GROWTH_CAP) if growth >= GROWTH_MIN else per_item
        # Growing costs are uneven costs: the planner then keeps chunks small, so that
        # the last (costliest) chunk does not run alone at the end.
        spread = max(features.coefficient_of_variation or 0.0, growth - 1.0)
        recent = dataclasses.replace(features, mean_s=ahead, coefficient_of_variation=spread)
        n_items_all = max(n_items, n_done + 1)
        if self.client is None and (features.threads_cpu or 0.0) <= planner.OWN_THREADS_MIN \
                and worth_a_pool(self.options, recent, n_items_all, n_done):
            # Starting a pool costs this process CPU and GIL (spawning, feeding):
            # only when a warm one would win.
            started = maybe_prestart(self.options, max(0, n_items - n_done) * ahead)
            self.started_ahead = started or self.started_ahead
        # t_start: the estimate covers the whole map, as the run record's actual does.
        new = self.plan(recent, n_items_all, n_done)
        if new.mode == "serial":
            return None
        reason = (
            f"switched to {new.mode} after {n_done:,} items ran serially, at "
            f"{fmt_s(per_item)} per item (expecting {fmt_s(ahead)} ahead) against "
            f"{fmt_s(features.mean_s)} sampled: {new.reason}"
        )
        new = dataclasses.replace(new, reason=reason)
        logger.info("re-plan for %s: %s", describe(self.func)[1], reason)
        return new

