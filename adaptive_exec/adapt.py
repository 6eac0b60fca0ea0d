"""Decisions taken while a map runs: values in, a decision out, no map object.

- ``forced_serial``: must this map run in the caller (a nested map, the user's switch)?
- ``pool_cpus``: how many workers could a pool have for it now?
- ``dask_client``: does it go to a dask cluster?
- ``SamplingWatch``: start the pool while the first items are still being sampled.
- ``maybe_prestart`` / ``worth_a_pool``: start the pool ahead of a serial run that grew.
- ``monitor``: how many workers to keep busy, re-read from the machine during a run.
"""

from __future__ import annotations

import threading
import time
from typing import Any, Callable, Optional

from . import calibration, planner, system
from .backends import dask as dask_backend
from .backends import loky as loky_backend
from .planner import OWN_THREADS_MIN, WAITING_MAX_CPU, make_plan
from .records import Features, Options, Plan

# Start the pool ahead of a plan when the work left is at least this many start-ups:
# the caller keeps working meanwhile, so a free core makes it nearly free. Not for a
# function that keeps more than one CPU busy itself (BLAS): its workers would compete
# with it (measured: the numpy workload's serial run 1.56x slower with a pool booting).
PRESTART_FACTOR = 1.5
# What starting a pool costs the caller's process: importing loky and spawning the
# workers, ~70 ms of its CPU and GIL (measured: fat_return's serial run 0.38 -> 0.49 s).
PRESTART_COST_S = 0.07
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
    return None


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


def maybe_prestart(options: Options, work_left_s: float) -> None:
    """Start the pool ahead when the work left clearly dwarfs its start-up."""
    cpus = pool_cpus(options)
    if cpus and work_left_s >= PRESTART_FACTOR * calibration.get().startup_for(cpus):
        loky_backend.prestart(cpus)


def worth_a_pool(options: Options, features: Features, n_items: int, done: int) -> bool:
    """Would starting a pool now pay: a warm one beats the loop on the items left, and
    what it saves after its start-up outweighs what starting it costs here?"""
    snap = system.snapshot(options.max_workers, with_memory=False)
    calib = calibration.get()
    plan = make_plan(features, n_items, done, snap, calib, warm=True, from_cache=False)
    if plan.mode == "serial" or plan.estimated_speedup <= 1:
        return False
    left_after_startup = (n_items - done) * features.mean_s - calib.startup_for(
        snap.usable_cpus)
    saved = left_after_startup * (1 - 1 / plan.estimated_speedup)
    return saved >= 2 * PRESTART_COST_S


def monitor(options: Options, plan: Plan) -> Callable[[int], int]:
    """decide(busy workers now) -> how many to keep busy, re-read from the machine."""
    probe = system.LoadProbe(loky_backend.worker_pids)
    per_worker = (plan.features.get("worker_memory") or planner.WORKER_BASE_MEMORY) + (
        plan.features.get("peak_memory") or 0)

    def decide(current: int) -> int:
        others, room = system.live_readings(probe, options.max_memory)
        free = system.usable_cpus(options.max_workers) - system.busy_cpus(others)
        target = max(1, min(plan.n_workers, free))
        if room is not None and room < planner.MEMORY_RESERVE:
            # Memory is running out: shed a worker's work each reading, before the
            # machine swaps or the OOM killer picks a process.
            target = min(target, max(1, current - 1))
        elif room is not None and room < planner.MEMORY_RESERVE + per_worker:
            target = min(target, current)  # no room for one more
        return target

    return decide


class SamplingWatch:
    """While the first items are sampled, start the pool as soon as they alone show
    that one will be worth it: a 300 ms function then finds its workers up when its
    first call returns, instead of starting them only then."""

    def __init__(self, options: Options, n_known: Optional[int]):
        self.options = options
        self.n_known = n_known
        self.progress = [0]
        self.t0 = time.perf_counter()
        self.cpu_s = 0.0  # this thread's own CPU: not the sampled function's
        self.done = threading.Event()
        self.thread = threading.Thread(target=self._run, name="adaptive_exec-prestart",
                                       daemon=True)
        self.thread.start()

    @classmethod
    def start(cls, options: Options, n_known: Optional[int]) -> Optional[SamplingWatch]:
        """A watch, or None when no pool could be started ahead for this map."""
        cpus = pool_cpus(options)
        if not cpus or loky_backend.is_warm(cpus) or (n_known is not None and n_known < 2):
            return None
        return cls(options, n_known)

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
        left = (self.n_known - finished) if self.n_known is not None else STREAM_ITEMS
        if per_item * left >= PRESTART_FACTOR * calibration.get().startup_for(2):
            maybe_prestart(self.options, per_item * left)
            # Starting the pool cost this thread CPU that is not the function's.
            self.cpu_s = time.thread_time()
            return True
        return False

    def stop(self) -> None:
        self.done.set()
