"""Features + system + calibration -> Plan: a cost model, not a rule of thumb.

For N items of mean cost t, W workers and chunks of c items (DESIGN.md section 4):

    serial   = N * t
    parallel = start-up (cold pool only, partly hidden by the caller working meanwhile)
             + makespan of ceil(N/c) chunks of (c*t + task overhead + c*bytes*byte cost)
               on W workers, with a tail that grows with the chunk time and the CV
             + never less than the parent's own share: every result is unpickled here

The plan with the smallest estimate wins; parallel must beat serial clearly
(MIN_SPEEDUP) or the map stays serial, since a wrong "parallel" costs far more than a
wrong "serial".

On a dask cluster (``cluster=``) the same model holds with the cluster's worker threads
as W, its own measured constants, and no start-up: the cluster is already running.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Optional

from .records import (
    Calibration,
    Cluster,
    Features,
    Plan,
    fmt_bytes,
    fmt_pct,
    fmt_s,
    fmt_speedup,
)
from .system import SystemSnapshot, busy_cpus

MIN_SPEEDUP = 1.2  # below this the estimate's own error can turn a gain into a loss
# A function with threads of its own (BLAS) whose time in a worker no pool has measured
# yet is given the pool once where, by its CPU seconds, the pool is about as fast as the
# loop and the loop would take a while: those CPU seconds are the most one thread can
# cost (BLAS threads that spin while they wait count there too: numpy's products took
# 1.4x their caller's time in a worker, not 2.3x), so the trial costs at most about the
# pool's start-up, and what it measures plans every later map (Features.worker_ratio).
# Judgements: within 5% of the loop, a loop of a second or more.
POOL_TRIAL_SPEEDUP = 0.95
POOL_TRIAL_MIN_S = 1.0
# And by at least this much: a judgement, below the noise of one scheduler tick on a
# busy machine (10 ms), a "faster" pool is a coin toss that costs a start-up.
MIN_SAVING_S = 0.01
# A chunk longer than this delays errors, cancellation and streamed results, and what
# the load monitor does (it acts between chunks). Was 0.5 s; the model now also prices
# the caller's CPU per chunk, which favours long chunks, and within 1% a 0.5 s chunk
# could win on 20 ms items where 0.1 s ones do as well (4 per worker of 0.5 s vs 10 of 0.1 s).
MAX_CHUNK_S = 0.1
# What a loky worker holds before it runs anything, until the pool's own workers can be
# measured (SystemSnapshot.worker_memory; ~25-30 MB RSS measured here).
WORKER_BASE_MEMORY = 40 << 20


def worker_footprint(features: Features, system: SystemSnapshot) -> int:
    """Bytes one more worker needs: its own resident memory (measured on the pool's
    workers when they exist) plus the peak memory of one call, from sampling."""
    base = system.worker_memory if system.worker_memory else WORKER_BASE_MEMORY
    return base + (features.peak_memory or 0)
# Memory left to the rest of the machine when sizing workers by memory: a judgement,
# about what a desktop session or a CI runner needs not to swap.
MEMORY_RESERVE = 256 << 20
# Fraction of the start-up the caller spends working through items: it shares the
# cores with booting workers, so it is not a full worker during that time.
STARTUP_OVERLAP = 0.5
# Items at least this long may be run by the caller beside the workers (caller_items):
# a chunk's round trip is then noise, and the caller, busy with its item, hands out
# nothing meanwhile. A judgement.
CALLER_ITEM_MIN_S = 0.05
# A function whose other threads use more than this many CPU seconds per wall second
# runs threads of its own (BLAS): our workers run it with one thread each (see
# backends/loky.py), so each item takes about 1 + that many times longer there.
OWN_THREADS_MIN = 0.3
# Below this CPU share the function mostly waits: threads overlap the waiting, if at
# least WAITING_MIN_SHARE of the looks at the calls (system.ThreadWaits), where someone
# could look, found them waiting on something threads overlap, not the GIL or a CPU. A
# low bar: a sampled call of 2 ms sleep was looked at 3-9 times, and the looks that land
# on our bookkeeping between calls find it computing (1 of 3 waiting, seen).
WAITING_MAX_CPU = 0.5
WAITING_MIN_SHARE = 0.25
# Threads for a waiting function: beyond ~64 the GIL hand-offs of a thread pool cost
# more than the overlapped waiting gains (a judgement; concurrent.futures caps its
# default at 32 for the same reason).
MAX_THREADS = 64
# The coefficient of variation is capped here in the tail estimate: a sample of a few
# items with one outlier reads as CV 5-10, which would keep chunks at one item for
# work that is merely uneven (a judgement).
CV_CAP = 4.0
# A candidate plan must beat the best so far by 1% to replace it: within the model's own
# noise, fewer workers (tried first) leave the machine freer.
BETTER_BY = 0.99
# Per task on a thread pool (submit, future, wake-up), measured ~30-60 µs here.
THREAD_TASK_OVERHEAD_S = 5e-5


@dataclass(frozen=True)
class _Estimate:
    total_s: float
    n_workers: int
    chunksize: int
    startup_s: float
    parent_s: float


def caller_items(n: int, w: int, c: int, t: float) -> int:
    """How many of ``n`` items of ``t`` seconds the caller runs itself, beside ``w``
    workers taking chunks of ``c``: the one item a last round would leave to one worker
    alone while the others idle. The caller runs it beside the workers' last rounds, the
    processes then sharing the cores: three items on two workers take 1.5 items' time,
    not 2 (a warm plan of few_heavy took 0.65-0.67 s, where the cold run, whose caller
    runs its first item, took 0.61). One item at most: the caller runs what it keeps one
    after the other, so two or more would outlast the round they were taken from (it
    took every odd item: 7 items on 4 workers kept 3, three items' time for the caller
    where two rounds take two). Only for items of CALLER_ITEM_MIN_S or more: while its
    item runs, the caller hands out nothing."""
    if c != 1 or w < 2 or n <= w or t < CALLER_ITEM_MIN_S:
        return 0
    return 1 if n % w == 1 else 0


def _estimate(
    n: int, t: float, cv: float, bytes_per_item: float, w: int, c: int,
    calib: Calibration, warm: bool, startup_left: Optional[float] = None,
    shares_cores: bool = False, caller_helps: bool = False,
) -> _Estimate:
    per_chunk = c * t + calib.task_overhead_s + c * bytes_per_item * calib.byte_cost_s
    n_chunks = math.ceil(n / c)
    rounds = math.ceil(n_chunks / w)
    # Workers free up at different times, so the last chunk leaves the others idle for
    # about half a chunk, more when chunk times spread (their CV shrinks like 1/sqrt(c)
    # for independent items). Costs that drift along the list (the skewed workload) are
    # what this tail guards against: it makes long chunks expensive.
    spread = cv / math.sqrt(c)
    if caller_helps and caller_items(n, w, c, t):
        # The caller runs the last round's odd items beside the workers: the cores
        # share all of them at once.
        makespan = n * per_chunk / w * (1 + 0.5 * spread)
    elif n_chunks <= w:
        # One round, every chunk at once: the slowest of them, not a tail.
        makespan = per_chunk * (1 + 0.5 * spread)
    else:
        # Chunks that fill every round evenly leave no worker idle at the end, but for
        # their spread, which piles up over a worker's rounds (a random walk) until
        # workers taking the next chunk when free even it out (at most the old tail,
        # half a chunk plus the spread); a last round that is not full idles the others
        # for about half a chunk.
        uneven = 0.0 if n_chunks % w == 0 else 0.5
        tail = uneven + min(spread * math.sqrt(rounds), 0.5 + spread)
        fluid = n_chunks * per_chunk / w + per_chunk * tail
        makespan = max(rounds * per_chunk, fluid)
    # The parent pickles every input and unpickles every result, one at a time.
    parent = n * bytes_per_item * calib.byte_cost_s + n_chunks * calib.task_overhead_s / 2
    if shares_cores:
        # As many workers as cores: the caller's CPU for the map (its threads and loky's:
        # each chunk's round trip, every byte) is taken from the workers'. Measured: 0.2 ms
        # items on 2 workers in chunks of 64 cost the caller 46-81 ms of CPU, about 1.5x
        # the task overhead per chunk, and ran 1.12x slower than 8 chunks of 625.
        makespan += (n_chunks * calib.task_overhead_s
                     + n * bytes_per_item * calib.byte_cost_s) / w
    startup = 0.0 if warm else calib.startup_for(w) if startup_left is None else startup_left
    hidden = min(startup * STARTUP_OVERLAP, n * t)  # work the caller does meanwhile
    total = startup + max(makespan - hidden / w, parent)
    return _Estimate(total, w, c, startup, parent)


def _threads_plan(n: int, t: float, cpu: float, cpus: int, chunksize: Optional[int],
                  max_workers: Optional[int] = None) -> _Estimate:
    """A thread pool for a function that mostly waits: as many threads as keep the
    CPU share of all of them within the usable CPUs (the GIL serialises that share),
    never more than the user's ``max_workers`` (someone throttling requests)."""
    threads = int(min(MAX_THREADS, n, max(2, cpus / max(cpu, 1e-3))))
    if max_workers is not None:
        threads = min(threads, max_workers)
    threads = max(1, threads)
    c = chunksize or 1
    n_chunks = math.ceil(n / c)
    per_chunk = c * t + THREAD_TASK_OVERHEAD_S
    waiting = math.ceil(n_chunks / threads) * per_chunk
    computing = n * t * cpu  # the CPU part runs one thread at a time
    return _Estimate(max(waiting, computing) + n_chunks * THREAD_TASK_OVERHEAD_S / 2,
                     threads, c, 0.0, 0.0)


def _chunk_candidates(n: int, w: int, t: float) -> list[int]:
    """Powers of two, and the sizes that give every worker the same number of chunks
    (1, 2, 3, 4, 6, 8... each: what multiprocessing's map does with 4), up to the
    largest chunk allowed."""
    upper = max(1, math.ceil(n / w))
    if t > 0:
        upper = min(upper, max(1, int(MAX_CHUNK_S / t)))
    out = set()
    c = 1
    while c < upper:
        out.add(c)
        c *= 2
    out.add(upper)
    for per_worker in (1, 2, 3, 4, 6, 8, 12, 16, 24, 32):
        even = math.ceil(n / (w * per_worker))
        if 1 <= even <= upper:
            out.add(even)
    return sorted(out)


def _worker_candidates(lo: int, hi: int, cluster: bool) -> list[int]:
    if not cluster:
        return list(range(lo, hi + 1))
    # A cluster may have hundreds of threads: powers of two and all of them suffice.
    out = []
    w = lo
    while w < hi:
        out.append(w)
        w *= 2
    out.append(hi)
    return out


def blocked_by_pickling(features: Features, plan: Plan, forced_parallel: bool) -> bool:
    """Whether ``plan`` is serial only because the sampled items or results cannot be
    pickled (a pool was asked for, or would have won): the user is told so."""
    return (not features.picklable and plan.mode == "serial"
            and (forced_parallel or plan.estimated_speedup >= MIN_SPEEDUP))


def memory_cap(features: Features, system: SystemSnapshot) -> Optional[int]:
    """Workers the available memory allows, or None when memory was not read."""
    if system.available_memory is None:
        return None
    per_worker = worker_footprint(features, system)
    return max(1, int((system.available_memory - MEMORY_RESERVE) // per_worker))


@dataclass(frozen=True, eq=False)
class _Job:
    """The items left to plan for, as every step of ``make_plan`` reads them; the plans
    it returns share one features dict, ``info``."""

    remaining: int  # items not yet run
    t: float  # mean seconds per item, in the caller
    cv: float  # capped at CV_CAP
    bytes_per_item: float  # pickled input + pickled result
    own_threads: float  # CPUs one call keeps busy with threads of its own (1: none)
    elapsed_s: float
    from_cache: bool
    info: dict[str, Any]
    # The function's one-time set-up (Features.setup_s) still to be paid by the caller
    # (a process that has not run it yet) and by the pool's workers (each once, at the
    # same time: once in wall time).
    setup_here_s: float = 0.0
    setup_pool_s: float = 0.0
    worker_ratio: Optional[float] = None  # Features.worker_ratio: a pool's, measured

    @property
    def t_worker(self) -> float:
        """Seconds per item in a pool worker: the caller's, but for a function that runs
        threads of its own, which a worker limits to one: then what a past pool run
        measured (Features.worker_ratio), or until there is one, own_threads times the
        caller's time (as pool_item_s)."""
        return self.t * _worker_factor(self.own_threads, self.worker_ratio)

    @property
    def serial_rest(self) -> float:
        return self.remaining * self.t

    @property
    def est_serial(self) -> float:
        return self.elapsed_s + self.setup_here_s + self.serial_rest

    @property
    def work(self) -> str:
        """How much work is left, the opening of every reason."""
        if not self.info.get("n_samples") and not self.from_cache:
            return f"{self.remaining:,} items, not measured (no call ran here)"
        return (f"{self.remaining:,} items x {fmt_s(self.t)} = {fmt_s(self.serial_rest)} "
                "of work")

    def serial(self, reason: str, est_parallel: float = math.inf) -> Plan:
        """The serial plan; ``est_parallel`` is the best pool's estimate, when one was made."""
        est_serial = self.est_serial
        speedup = est_serial / est_parallel if est_parallel not in (0, math.inf) else 0.0
        return Plan("serial", 1, max(1, self.remaining), est_serial,
                    est_parallel if est_parallel != math.inf else est_serial,
                    speedup, reason, self.from_cache, self.info)

    def plan(self, mode: str, best: _Estimate, est: float, speedup: float, reason: str
             ) -> Plan:
        """A plan that runs in ``mode`` as ``best`` says, estimated at ``est`` in all."""
        return Plan(mode, best.n_workers, best.chunksize, self.est_serial, est, speedup,
                    reason, self.from_cache, self.info)


def _estimated(job: _Job, est: float, speedup: float) -> str:
    """The estimate in a reason: the same numbers, formatted the same way, as the plan's
    ``estimated_parallel_s``, ``estimated_serial_s`` and ``estimated_speedup`` in
    explain() and str(RunReport): the whole map's, the time already spent sampling
    included."""
    if not job.info.get("n_samples") and not job.from_cache:
        return "not estimated"  # no call measured: its numbers would be the time so far
    return (f"estimated at {fmt_s(est)} in all, against {fmt_s(job.est_serial)} for the "
            f"loop ({fmt_speedup(speedup)})")


def _unit(cluster: Optional[Cluster]) -> str:
    """What the reasons call the workers."""
    return "cluster threads" if cluster is not None else "workers"


def _describe(
    features: Features, n_items: int, system: SystemSnapshot, calib: Calibration,
    warm: bool, parallel_correction: float, cluster: Optional[Cluster],
) -> dict[str, Any]:
    """The features dict of the plan: what was measured and the constants it was planned
    with (the load and worker memory are added once they are read)."""
    info = {
        **features.to_dict(),
        "n_items": n_items,
        "usable_cpus": system.usable_cpus,
        "available_memory": system.available_memory,
        "calibration": calib.source,
        "worker_startup_s": round(calib.worker_startup_s, 4),
        "task_overhead_s": calib.task_overhead_s,
        "byte_cost_s": calib.byte_cost_s,
        "pool_warm": warm,
        "parallel_correction": round(parallel_correction, 3),
    }
    if cluster is not None:
        info.update(cluster=cluster.address, cluster_threads=cluster.n_threads)
    return info


def _own_threads(features: Features, usable_cpus: int) -> float:
    """The CPUs one call keeps busy with threads of its own (1: none), by its CPU
    seconds."""
    others = features.threads_cpu or 0.0
    return min(1.0 + others, usable_cpus) if others > OWN_THREADS_MIN else 1.0


def pool_item_s(features: Features, usable_cpus: int) -> float:
    """Seconds per item in one of our pool's workers, as the plan takes it (_Job.t_worker)."""
    return features.mean_s * _worker_factor(_own_threads(features, usable_cpus),
                                            features.worker_ratio)


def _worker_factor(own_threads: float, worker_ratio: Optional[float]) -> float:
    """How much longer an item takes in a worker than in the caller: 1 for a function
    without threads of its own; for one with, what a pool measured, at most what its
    CPU seconds say (the most one thread can cost: a ratio above it was measured on a
    busy machine, whose load the plan counts apart), and those until a pool measured."""
    if own_threads == 1.0:
        return 1.0
    return min(worker_ratio, own_threads) if worker_ratio else own_threads


def _job(
    features: Features, n_items: int, n_done: int, system: SystemSnapshot,
    elapsed_s: float, from_cache: bool, info: dict[str, Any],
    setup_here: bool = False, setup_pool: float = 1.0,
) -> _Job:
    """The remaining items and what the model takes from the features about them."""
    own_threads = _own_threads(features, system.usable_cpus)
    cv = features.coefficient_of_variation if features.coefficient_of_variation is not None else 0.5
    bytes_per_item = float((features.pickle_size or 0) + (features.input_pickle_size or 0))
    setup = features.setup_s or 0.0
    return _Job(max(0, n_items - n_done), features.mean_s, min(cv, CV_CAP), bytes_per_item,
                own_threads, elapsed_s, from_cache, info,
                setup if setup_here else 0.0, setup * max(0.0, min(1.0, setup_pool)),
                features.worker_ratio)


def _worker_cap(features: Features, system: SystemSnapshot, cluster: Optional[Cluster]
                ) -> tuple[int, Optional[str]]:
    """The most workers the map may use, and when that is fewer than 2, why a pool
    cannot beat the loop (None otherwise)."""
    if cluster is not None:
        # The cluster's scheduler owns its machines' load and memory: all its threads.
        w_max = max(1, cluster.n_threads)
        if w_max >= 2:
            return w_max, None
        return w_max, (f"the dask cluster has {cluster.n_threads} worker thread(s), so it "
                       "cannot beat the loop")
    # CPUs other processes keep busy are not ours to use (a lightly loaded one still is).
    busy = busy_cpus(system.others_load)
    w_max = max(1, system.usable_cpus - busy)
    mem_cap = memory_cap(features, system)
    if mem_cap is not None:
        w_max = min(w_max, mem_cap)
    if w_max >= 2:
        return w_max, None
    if system.usable_cpus < 2:
        why = "only one CPU is usable"
    elif mem_cap is not None and mem_cap < 2:
        per_worker = fmt_bytes(worker_footprint(features, system))
        why = (f"the memory a map may use ({fmt_bytes(system.available_memory or 0)}) "
               f"fits one worker of {per_worker}")
    else:
        # The load counts runnable threads, which may outnumber the CPUs (as a load
        # average does): "5 of 2 CPUs are busy" said otherwise.
        why = (f"{min(busy, system.usable_cpus)} of {system.usable_cpus} CPUs are busy "
               f"with other processes (their load: {system.others_load:.1f})")
    return w_max, f"{why}, so a pool cannot beat the loop"


def _waiting_on(features: Features) -> str:
    if features.wait_share is None or features.waits_on is None:
        return ""
    return f" (on {features.waits_on}: {fmt_pct(features.wait_share)} of the looks at it waiting)"


def _threads_option(job: _Job, features: Features, cpus: int, chunksize: Optional[int],
                    max_workers: Optional[int] = None) -> Optional[Plan]:
    """The thread-pool plan when the function mostly waits and threads beat the loop
    clearly; None otherwise."""
    cpu = features.cpu_fraction
    waited = features.wait_share
    if (features.threads_cpu or 0.0) > OWN_THREADS_MIN:
        return None
    if cpu is None or cpu >= WAITING_MAX_CPU:
        return None
    if waited is not None and waited < WAITING_MIN_SHARE:
        # Seen waiting on nothing threads overlap: a call kept off the GIL by another
        # thread, or off a CPU by a busy machine, has a low CPU share too.
        return None
    threads = _threads_plan(job.remaining, job.t, cpu, cpus, chunksize, max_workers)
    if threads.n_workers < 2:
        return None  # one thread overlaps nothing
    t_speedup = job.serial_rest / threads.total_s if threads.total_s > 0 else 0.0
    if t_speedup < MIN_SPEEDUP or job.serial_rest - threads.total_s < MIN_SAVING_S:
        return None
    est = job.elapsed_s + threads.total_s
    speedup = job.est_serial / est
    reason = (
        f"{job.work}, of which only {fmt_pct(cpu)} is CPU: the function mostly waits"
        f"{_waiting_on(features)}, so {threads.n_workers} threads overlap the waiting; "
        f"{_estimated(job, est, speedup)}"
    )
    return job.plan("threads", threads, est, speedup, reason)


def _best_pool(
    job: _Job, w_max: int, calib: Calibration, *, warm: bool, startup_left: Optional[float],
    chunksize: Optional[int], correction: float, cluster: bool, caller_helps: bool = False,
) -> _Estimate:
    """The fastest pool by the model over the candidate workers x chunk sizes (the user's
    chunk size only, when given), scaled by the history's ``correction``."""
    t_worker = job.t_worker  # one BLAS thread in a worker
    best: Optional[_Estimate] = None
    for w in _worker_candidates(min(2, w_max), w_max, cluster):
        for c in [chunksize] if chunksize else _chunk_candidates(job.remaining, w, t_worker):
            e = _estimate(job.remaining, t_worker, job.cv, job.bytes_per_item, w, c, calib,
                          warm, startup_left, shares_cores=not cluster and w >= w_max,
                          caller_helps=caller_helps and not cluster)
            # Prefer fewer workers when they are as fast: they leave the machine freer.
            if best is None or e.total_s < best.total_s * BETTER_BY:
                best = e
    assert best is not None
    if job.setup_pool_s:
        # Each worker's first call pays the set-up, all at once: one set-up in wall time.
        best = dataclasses.replace(best, total_s=best.total_s + job.setup_pool_s)
    if correction != 1.0:
        best = dataclasses.replace(best, total_s=best.total_s * correction)
    return best


def _why_not_parallel(job: _Job, best: _Estimate, est: float, speedup: float,
                      calib: Calibration, cluster: Optional[Cluster]) -> str:
    """The reason for staying serial when the best pool is not worth it: what limits it."""
    limits = []
    if best.startup_s > 0:
        limits.append(f"start-up {fmt_s(best.startup_s)}")
    if best.parent_s > job.serial_rest / best.n_workers and job.bytes_per_item > 0:
        limits.append(
            f"{fmt_bytes(job.bytes_per_item * job.remaining)} to move through the parent "
            f"({fmt_s(best.parent_s)})"
        )
    if job.own_threads > 1.0:
        measured = (f": an item takes {fmt_s(job.t_worker)} there, as a pool measured it"
                    if job.worker_ratio else "")
        limits.append(
            f"the function already keeps {job.own_threads:.1f} CPUs busy with threads of "
            f"its own, which a worker limits to one{measured}"
        )
    if job.setup_pool_s:
        limits.append(f"a one-time set-up of {fmt_s(job.setup_pool_s)} that each worker "
                      "would pay again")
    if not limits:
        limits.append(f"{fmt_s(calib.task_overhead_s)} overhead per task")
    where = "the cluster" if cluster is not None else "the best pool"
    if speedup >= MIN_SPEEDUP:  # the pool is faster, by too little time to matter
        verdict = (f"a speedup of {fmt_speedup(speedup)} but a saving of only "
                   f"{fmt_s(job.est_serial - est)}, below the {fmt_s(MIN_SAVING_S)} worth "
                   "the risk")
    else:
        verdict = (f"a speedup of {fmt_speedup(speedup)}, below the "
                   f"{fmt_speedup(MIN_SPEEDUP)} worth the risk")
    return (
        f"{job.work}; {where} ({best.n_workers} {_unit(cluster)}) is estimated at "
        f"{fmt_s(est)} in all, against {fmt_s(job.est_serial)} for the loop "
        f"({', '.join(limits)}): {verdict}"
    )


def _parallel_reason(job: _Job, best: _Estimate, est: float, speedup: float,
                     correction: float, forced_parallel: Optional[str],
                     cluster: Optional[Cluster], warm: bool = False,
                     started_ahead: bool = False, mine: int = 0) -> str:
    """The reason for running ``best``: the user's request, or the estimate and what it
    includes (start-up, the history's correction)."""
    unit = _unit(cluster)
    beside = f", {mine} of the items run in the caller beside them" if mine else ""
    if forced_parallel:
        return (
            f"{forced_parallel}; {job.work}, {best.n_workers} {unit} with chunks of "
            f"{best.chunksize} {_estimated(job, est, speedup)}{beside}"
        )
    # What the start-up term is, as the features say it (pool_warm, startup_left_s).
    if best.startup_s:
        startup = (f", {fmt_s(best.startup_s)} of pool start-up "
                   f"{'left (started ahead of this map)' if started_ahead else 'included'}")
    elif cluster is not None:
        startup = ", the cluster is already running"
    elif warm:
        startup = ", the pool is already warm"
    else:
        startup = ", the pool started ahead of this map is up"
    if job.setup_pool_s:
        startup += (f", {fmt_s(job.setup_pool_s)} of one-time set-up in each worker "
                    "(the first call's, not counted per item)")
    if job.own_threads > 1.0 and job.worker_ratio:
        startup += (f", {fmt_s(job.t_worker)} an item in a worker with one BLAS thread "
                    "(as a pool measured it)")
    if correction >= 1.05:
        startup += f", x{correction:.2f} for past parallel runs that took longer"
    startup += beside
    return (
        f"{job.work}; {best.n_workers} {unit} with chunks of {best.chunksize}: "
        f"{_estimated(job, est, speedup)}{startup}"
    )


def make_plan(
    features: Features,
    n_items: int,
    n_done: int,
    system: SystemSnapshot,
    calib: Calibration,
    *,
    warm: bool,
    from_cache: bool,
    elapsed_s: float = 0.0,
    forced_serial: Optional[str] = None,
    forced_parallel: Optional[str] = None,
    chunksize: Optional[int] = None,
    parallel_correction: float = 1.0,
    threads_lost: bool = False,
    main_thread_only: bool = False,
    startup_left: Optional[float] = None,
    cluster: Optional[Cluster] = None,
    setup_here: bool = False,
    setup_pool: float = 1.0,
    caller_helps: bool = True,
    may_learn: bool = True,
) -> Plan:
    """Plan the remaining ``n_items - n_done`` items; ``elapsed_s`` was already spent.

    ``startup_left`` is what remains of the start-up of a pool started ahead (None: a
    cold pool costs ``calib.startup_for(w)``). ``parallel_correction`` (>= 1, from the
    cache's run history) scales the pool's
    estimate: a function whose parallel runs kept taking longer than estimated gets a
    more cautious plan.

    ``cluster``: plan for that dask cluster (mode "distributed") instead of this
    machine's pool: ``system`` (this machine's CPUs, load and memory) is then not used.

    ``setup_here``: whether the caller (a process that has not run the function yet)
    still pays its one-time set-up, ``features.setup_s``; ``setup_pool``: the share of it
    the pool's workers still pay (1: all, workers new to it; 0: none, a map of it ran
    there; between: workers already running items sent ahead).

    ``caller_helps``: whether the caller may run a few long items beside the pool
    (``caller_items``); not where each item must be stoppable (a timeout).

    ``may_learn``: whether what this run measures can be remembered (the cache is on and
    writable here); a trial of the pool (POOL_TRIAL_SPEEDUP) only where it can.
    """
    if cluster is not None:
        warm, startup_left = True, 0.0  # the cluster is already running
    info = _describe(features, n_items, system, calib, warm, parallel_correction, cluster)
    if threads_lost:
        info["threads_lost"] = True  # a past run's threads did not beat the loop
    if main_thread_only:
        info["main_thread_only"] = True  # it sets signal handlers: no threads
    if startup_left is not None and cluster is None and not warm:
        info["startup_left_s"] = round(startup_left, 4)  # a pool started ahead
    job = _job(features, n_items, n_done, system, elapsed_s, from_cache, info,
               setup_here, setup_pool)
    if forced_serial:
        return job.serial(forced_serial)
    if job.remaining == 0:
        return job.serial("every item was already run while sampling")

    w_max, too_few = _worker_cap(features, system, cluster)
    if cluster is None:
        info.update(others_load=round(system.others_load, 2),
                    worker_memory=system.worker_memory)
    if too_few is not None and not forced_parallel:
        return job.serial(f"{job.work}; {too_few}")
    info["worker_memory"] = system.worker_memory  # a cluster's plan records it from here

    # A function that mostly waits gets threads here; on a cluster its threads overlap
    # the waiting as well, and the user asked for the cluster.
    if not forced_parallel and cluster is None and not threads_lost and not main_thread_only:
        threads = _threads_option(job, features, system.usable_cpus, chunksize,
                                  system.max_workers)
        if threads is not None:
            return threads

    # Not a function that runs threads of its own: beside its workers it would take
    # more than a core.
    helps = caller_helps and cluster is None and job.own_threads == 1.0
    best = _best_pool(job, w_max, calib, warm=warm, startup_left=startup_left,
                      chunksize=chunksize, correction=parallel_correction,
                      cluster=cluster is not None, caller_helps=helps)
    est_parallel = elapsed_s + best.total_s
    speedup = job.est_serial / est_parallel if est_parallel > 0 else 0.0
    if not features.picklable and (forced_parallel or speedup >= MIN_SPEEDUP):
        return job.serial(
            f"{job.work}; a pool would be faster ({fmt_speedup(speedup)} estimated) but the "
            "sampled items or results cannot be pickled, so they cannot reach a worker",
            est_parallel,
        )
    # (Only on features measured in this run, not remembered: the run tells the ratio
    # against the caller's time of the same items. Against a remembered time, of other
    # inputs maybe, it may tell nothing, and every later map was a trial.)
    trial = (may_learn and not from_cache and not forced_parallel and cluster is None
             and job.own_threads > 1.0 and not job.worker_ratio and features.picklable
             and best.n_workers >= 2 and speedup >= POOL_TRIAL_SPEEDUP
             and job.serial_rest >= POOL_TRIAL_MIN_S)
    if not forced_parallel and not trial and (speedup < MIN_SPEEDUP
                                              or job.est_serial - est_parallel < MIN_SAVING_S):
        return job.serial(_why_not_parallel(job, best, est_parallel, speedup, calib, cluster),
                          est_parallel)
    mode = "distributed" if cluster is not None else "parallel"
    mine = caller_items(job.remaining, best.n_workers, best.chunksize, job.t) if helps else 0
    if mine:
        info["caller_items"] = mine  # what the run gives the caller (dispatch.RunSpec)
    reason = _parallel_reason(job, best, est_parallel, speedup, parallel_correction,
                              forced_parallel, cluster, warm,
                              startup_left is not None and not warm, mine)
    if trial and speedup < MIN_SPEEDUP:
        reason += (f"; a trial: the function keeps {job.own_threads:.1f} CPUs busy with "
                   "threads of its own, and by their CPU seconds, the most one thread in a "
                   "worker can cost, the pool is about as fast as the loop; this run "
                   "measures what an item takes in a worker, for the next plans")
    return job.plan(mode, best, est_parallel, speedup, reason)



# --- the history correction (from cache.py: the cache keeps runs, the planner reads them) --

# Past runs of a function that correct its next plan: the last few, so that a change
# (another machine load, other inputs) is followed within a few maps while one odd run
# moves the median little. A choice, not a measurement.
HISTORY_USED = 5
# One run's actual/estimated is bounded to this: a run 20x off (a suspended laptop, a
# swap storm) is one vote for "much slower", not a new scale. A choice.
RATIO_BOUNDS = (0.25, 4.0)
# The weight of the model's own estimate (a ratio of 1), in runs: one slow run moves the
# plan half way, three that agree three quarters of the way. A choice.
PRIOR_RUNS = 1.0
# What a correction keeps of its excess over 1 after each run in another mode since the
# last run it came from (to the power 1/n for n runs agreeing): the pool is re-tried
# after one serial run when one run said it was slow, after more when more agreed.
SERIAL_DECAY = 0.5
# A threads run is a trial: if, once THREADS_TRIAL_S of it has run, its items come at
# less than THREADS_MIN_GAIN times the loop's rate, the rest runs in the caller and the
# run is remembered (mode THREADS_TRIAL) so the next maps of the function get no threads
# while it is among the last HISTORY_USED runs. A choice: 0.2 s is tens of chunks for the
# functions that get threads, and a thread pool that is not 10% faster is not worth it.
THREADS_TRIAL_S = 0.2
THREADS_MIN_GAIN = 1.1
THREADS_TRIAL = "threads-lost"


def threads_lost(runs: tuple[Any, ...]) -> bool:
    """Whether one of the last HISTORY_USED ``runs`` found threads slower than the loop."""
    return any(r.mode == THREADS_TRIAL for r in runs[-HISTORY_USED:])


def parallel_correction(runs: tuple[Any, ...], mode: str = "parallel") -> float:
    """How much longer than estimated the next run in ``mode`` ("parallel": the local
    pool, "distributed": a dask cluster) is expected to take, from ``runs``
    (``cache.RunRecord``s, oldest first); 1.0 without any. ``make_plan``'s
    ``parallel_correction``.

    It follows the evidence, with bounds:
    - the median of actual/estimated over the last HISTORY_USED runs in ``mode``, each
      ratio bounded to RATIO_BOUNDS (one wild run is one vote, not a new scale);
    - shrunk towards 1 as n / (n + PRIOR_RUNS) for n such runs: one slow run (noise, a
      busy moment) moves the plan part of the way, runs that agree most of the way;
    - forgotten as the runs in other modes since the last one in ``mode`` pile up, by
      SERIAL_DECAY ** (1 / n) each: a function the correction moved to serial is given
      the pool again, after one serial run when one run said so, later as more agreed;
    - never below 1: a lucky run must not make the next plan bolder than the model.
    """
    low, high = RATIO_BOUNDS
    recent = [r for r in runs if r.mode == mode and r.estimated_s > 0 and r.actual_s > 0]
    recent = recent[-HISTORY_USED:]
    if not recent:
        return 1.0
    ratios = sorted(min(high, max(low, r.actual_s / r.estimated_s)) for r in recent)
    n = len(ratios)
    median = ratios[n // 2] if n % 2 else (ratios[n // 2 - 1] + ratios[n // 2]) / 2
    excess = max(0.0, median - 1.0) * n / (n + PRIOR_RUNS)
    # Runs since the last one in ``mode`` (not a threads trial: threads say nothing of
    # the pool, and their loss is remembered apart).
    last = max(i for i, r in enumerate(runs) if r is recent[-1])
    since = sum(1 for r in runs[last + 1:] if r.mode not in (mode, THREADS_TRIAL))
    return 1.0 + excess * SERIAL_DECAY ** (since / n)
