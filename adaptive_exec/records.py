"""The frozen records every room shares: what was measured, decided, run and asked for.

    Options      what the user asked for, validated once (api.py builds it)
    Features     what was measured about a function (sampling.py, the cache)
    Calibration  this machine's constants (calibration.py)
    Plan         the decision, with its reasons and estimates (planner.py)
    RunReport    what one map did (run.py)

Records hold values and explain themselves; they compute nothing the planner needs.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Optional

BACKENDS = ("auto", "loky", "serial", "dask")


# --- formatting for people --------------------------------------------------------------

def fmt_s(seconds: float) -> str:
    if seconds >= 1:
        return f"{seconds:.2f} s"
    if seconds >= 1e-3:
        return f"{seconds * 1e3:.1f} ms"
    if seconds >= 1e-6 or seconds == 0:
        return f"{seconds * 1e6:.1f} µs"
    return f"{seconds * 1e9:.1f} ns"


def fmt_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} GB"


def fmt_speedup(ratio: float) -> str:
    """A speedup (or slowdown) as a factor: the one form of the reasons and explain()."""
    return f"{ratio:.2f}x"


def fmt_pct(fraction: float) -> str:
    return f"{fraction * 100:.1f}%" if abs(fraction) < 0.1 else f"{fraction * 100:.0f}%"


def fmt_byte_cost(seconds_per_byte: float) -> str:
    """Seconds per byte moved, as time per byte and the throughput it amounts to."""
    if seconds_per_byte <= 0:
        return "none measured"
    return f"{fmt_s(seconds_per_byte)}/byte ({fmt_bytes(1 / seconds_per_byte)}/s)"


def fmt_count(n: int, one: str, many: str) -> str:
    return f"{n:,} {one if n == 1 else many}"


# --- the user's options -----------------------------------------------------------------

@dataclass(frozen=True)
class Options:
    """The options of ``parallelize``/``adaptive_map``, checked once (api.make_options)."""

    max_workers: Optional[int] = None
    cache: bool = True
    progress: bool = False
    backend: str = "auto"
    timeout: Optional[float] = None
    strict: bool = False
    chunksize: Optional[int] = None
    max_memory: Optional[int] = None  # bytes (the user may give "2GB")
    client: Any = None
    # Run once in each process before it runs items: each worker, and the caller.
    initializer: Optional[Callable[..., Any]] = None
    initargs: tuple[Any, ...] = ()

    def as_kwargs(self) -> dict[str, Any]:
        """The options as keyword arguments, to rebuild or extend them."""
        return {name: getattr(self, name) for name in self.__dataclass_fields__}


# --- what was measured ------------------------------------------------------------------

@dataclass(frozen=True)
class Features:
    """What we measured about one function (the cache stores these)."""

    mean_s: float  # seconds per item
    coefficient_of_variation: Optional[float]  # None with a single sample
    pickle_size: Optional[int]  # bytes of one pickled result (mean of the sized ones)
    input_pickle_size: Optional[int]  # bytes of one pickled input item
    peak_memory: Optional[int]  # bytes one call raised resident memory by, at its peak
    function_complexity: int  # bytecode bytes, nested code included
    n_samples: int
    # CPU seconds of the calling thread / wall seconds while sampling: near 1 for plain
    # computation, near 0 for a function that waits (I/O, sleeps).
    cpu_fraction: Optional[float]
    picklable: bool = True  # items and results pickled fine
    # CPU seconds of the process's other threads per wall second (ours excluded): near
    # k-1 for a function that runs k threads of its own (BLAS), else near 0.
    threads_cpu: Optional[float] = None
    # Seconds the first call took beyond the next ones' (an import, a lazily built table,
    # a connection): paid once per process, the caller's and each worker's, not per
    # item; None when no first call stood out (or one call was measured).
    setup_s: Optional[float] = None
    # The share of looks at the calling thread, while sampled, that found it waiting in
    # the kernel (asleep, on sockets or pipes, child processes, the disk, a lock), and
    # on what most (system.ThreadWaits); None where nobody looked (or could).
    wait_share: Optional[float] = None
    waits_on: Optional[str] = None
    # For a function that runs threads of its own (threads_cpu): an item's time in one
    # of our pool's workers over its time here (mean_s), as a pool run measured it, its
    # wall time with the other workers beside it. A worker caps BLAS at one thread, and
    # what that costs is not the CPU seconds' share (BLAS threads that spin while they
    # wait count there): numpy's matrix products took 1.4x their time here, not 2.3x;
    # threads a worker does not cap take what they take. A ratio, so that it holds when
    # other inputs change mean_s. None until a pool has run it.
    worker_ratio: Optional[float] = None

    def to_dict(self) -> dict[str, Any]:
        # Its fields are plain values: a shallow copy, not asdict's deep one (every plan
        # makes two; asdict was a fifth of a cache hit's planning).
        return dict(self.__dict__)


@dataclass(frozen=True)
class Calibration:
    worker_startup_s: float  # cold pool: creation to every worker having answered
    task_overhead_s: float  # one task's round trip on a warm pool, beyond its work
    byte_cost_s: float  # seconds per byte pickled, sent and unpickled between processes
    n_workers: int  # the pool size the start-up was measured with
    source: str  # "defaults (2-core development machine)" or "measured in this process"
    # How the workers whose start-up this is would be started (backends/starts.py).
    start_path: str = "exec"

    @property
    def measured(self) -> bool:
        """The start-up was measured on this machine (the other constants may not be)."""
        return (self.source.startswith("measured")
                and "defaults for start-up" not in self.source)

    def startup_for(self, n_workers: int) -> float:
        # Workers start in parallel, but each costs a fork+exec and imports: on the
        # 16-core machine of DESIGN.md, 16 workers took ~2.5x as long as 2 did, i.e.
        # +1.5x for 7 times the measured pool's size: +0.21x per such multiple.
        extra = max(0, n_workers - self.n_workers) / max(1, self.n_workers)
        return self.worker_startup_s * (1.0 + STARTUP_GROWTH * extra)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


STARTUP_GROWTH = 1.5 / 7


# --- what was decided -------------------------------------------------------------------

@dataclass(frozen=True)
class Cluster:
    """A running dask cluster to plan for: its worker threads are the workers."""

    address: str
    n_threads: int


@dataclass(frozen=True)
class Plan:
    mode: str  # "serial" | "parallel" | "threads" | "distributed"
    n_workers: int
    chunksize: int
    estimated_serial_s: float
    estimated_parallel_s: float
    estimated_speedup: float
    reason: str
    from_cache: bool
    features: dict[str, Any] = field(default_factory=dict)

    @property
    def estimated_s(self) -> float:
        """The estimate of the mode chosen: the loop's when serial, else the pool's."""
        return self.estimated_serial_s if self.mode == "serial" else self.estimated_parallel_s

    @property
    def measured(self) -> bool:
        """Was the function measured (sampled now, or remembered)? Not for a plan
        forced before any call (ADAPTIVE_EXEC_DISABLE, a nested map, ``timeout=``):
        its estimates are only the time spent so far, and reports say "not estimated"."""
        return self.from_cache or bool(self.features.get("n_samples"))

    def runs_on(self, busy: Optional[int] = None) -> str:
        """What runs the items: "serial", "2 processes", "8 threads", "dask"; with
        ``busy`` below the plan's workers, "1 of 2 processes"."""
        if self.mode == "serial":
            return "serial"
        if self.mode == "distributed":
            return "dask"
        one, many = ("thread", "threads") if self.mode == "threads" else ("process",
                                                                           "processes")
        if busy is not None and busy < self.n_workers:
            return f"{busy} of {fmt_count(self.n_workers, one, many)}"
        return fmt_count(self.n_workers, one, many)

    def explain(self) -> str:
        """The decision for people: every number in its unit, every feature named."""
        no_pool = (self.mode == "serial" and self.estimated_speedup == 0) or not self.measured
        lines = [
            f"mode:        {self.mode}",
            f"workers:     {_workers_line(self)}",
            f"chunksize:   {fmt_count(self.chunksize, 'item', 'items')}",
            f"serial:      {fmt_s(self.estimated_serial_s)} (estimated)" if self.measured
            else "serial:      not estimated (no call was measured)",
            "parallel:    not estimated" if no_pool else
            f"parallel:    {fmt_s(self.estimated_parallel_s)} (estimated)",
            "speedup:     -" if no_pool else
            f"speedup:     {fmt_speedup(self.estimated_speedup)} (estimated)",
            f"from cache:  {_yes_no(self.from_cache)}",
            f"reason:      {self.reason}",
        ]
        if self.features:
            lines.append("measured, and planned with (plan.features):")
            rows = [(_FEATURES.get(key, (key, _plain))[0],
                     _FEATURES.get(key, (key, _plain))[1](value), key)
                    for key, value in self.features.items()]
            width = max(len(label) for label, _, _ in rows)
            vwidth = min(max(len(text) for _, text, _ in rows), 24)  # long ones stick out
            for label, text, key in rows:
                lines.append(f"  {label.ljust(width)}  {text.ljust(vwidth)}  ({key})")
        return "\n".join(lines)


def _yes_no(value: Any) -> str:
    return "yes" if value else "no"


def _workers_line(plan: Plan) -> str:
    if plan.mode == "serial":
        return "none: the items run in the caller"
    if plan.mode == "distributed":
        return f"{fmt_count(plan.n_workers, 'thread', 'threads')} of a dask cluster"
    if plan.mode == "threads":
        return f"{fmt_count(plan.n_workers, 'thread', 'threads')} in this process"
    return f"{fmt_count(plan.n_workers, 'worker process', 'worker processes')}"


def _plain(value: Any) -> str:
    """A value no label knows: booleans as yes/no, floats rounded, the rest as is."""
    if value is None:
        return "unknown"
    if isinstance(value, bool):
        return _yes_no(value)
    if isinstance(value, float):
        return f"{value:.3g}"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)


def _optional(fmt: Callable[[Any], str], missing: str = "not measured"
              ) -> Callable[[Any], str]:
    return lambda value: missing if value is None else fmt(value)


# Each feature of a plan: its label for people, and how its value reads.
_FEATURES: dict[str, tuple[str, Callable[[Any], str]]] = {
    "mean_s": ("time per item", _optional(fmt_s)),
    "coefficient_of_variation": ("spread of item times (CV)",
                                 _optional(fmt_pct, "unknown (one sample)")),
    "pickle_size": ("result size, pickled", _optional(fmt_bytes)),
    "input_pickle_size": ("item size, pickled", _optional(fmt_bytes)),
    "peak_memory": ("memory one call takes (peak)", _optional(fmt_bytes)),
    "function_complexity": ("function's bytecode", _optional(fmt_bytes)),
    "n_samples": ("calls measured", _optional(lambda n: f"{n:,}")),
    "cpu_fraction": ("CPU share of a call", _optional(fmt_pct)),
    "picklable": ("items and results pickle", _yes_no),
    "threads_cpu": ("CPUs the function's own threads use",
                    _optional(lambda x: f"{x:.1f}")),
    "setup_s": ("one-time set-up (first call in a process)", _optional(fmt_s, "none seen")),
    "wait_share": ("seen waiting in the kernel", _optional(fmt_pct, "not looked at")),
    "waits_on": ("waiting mostly on", _optional(str, "nothing")),
    "worker_ratio": ("an item's time in a worker, over here",
                     _optional(lambda x: f"x{x:.2f}", "not run on a pool yet")),
    "n_items": ("items", _optional(lambda n: f"{n:,}")),
    "usable_cpus": ("usable CPUs", _optional(lambda n: f"{n:,}")),
    "available_memory": ("available memory", _optional(fmt_bytes)),
    "calibration": ("machine constants", _optional(str)),
    "worker_startup_s": ("pool start-up", _optional(fmt_s)),
    "task_overhead_s": ("overhead per task", _optional(fmt_s)),
    "byte_cost_s": ("cost of moving a byte", _optional(fmt_byte_cost)),
    "pool_warm": ("pool already running", _yes_no),
    "startup_left_s": ("start-up left of a pool started ahead", _optional(fmt_s)),
    "threads_lost": ("threads lost to the loop in a recent run", _yes_no),
    "parallel_correction": ("correction from past runs", _optional(lambda x: f"x{x:.2f}")),
    "cluster": ("dask cluster", _optional(str)),
    "cluster_threads": ("cluster threads", _optional(lambda n: f"{n:,}")),
    "others_load": ("load of other processes (CPUs)", _optional(lambda x: f"{x:.1f}")),
    "worker_memory": ("memory of an idle worker", _optional(fmt_bytes)),
}


def empty_plan() -> Plan:
    return Plan("serial", 1, 1, 0.0, 0.0, 0.0, "there are no items", False, {})


# --- what ran ---------------------------------------------------------------------------

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
    # Pickled bytes handed to worker processes (items, and the function once per worker
    # that needed it); 0 when none were used.
    bytes_sent: int = 0
    # How the pool's workers were started, when a process pool ran: "fork", "template" or
    # "exec" (backends/starts.py); None otherwise.
    start_path: Optional[str] = None
    # What ran where it differs from the plan ("14 of the items ran in the caller: their
    # results cannot be pickled ..."); None when the run followed its plan.
    ran: Optional[str] = None
    # The one-time set-up the pool's workers showed in their first calls (the median
    # over workers; not counted in observed_item_s); None when none stood out.
    worker_setup_s: Optional[float] = None
    # How the run corrected a plan that was far off ("items took 10.0 ms in the workers,
    # not the 2.00 s planned: chunks of 1 became 9"); None when it followed the plan.
    adjusted: Optional[str] = None

    def __str__(self) -> str:
        """One line for people: what ran, how long it took, what was estimated."""
        plan = self.plan
        if plan.mode == "serial":
            head = "serial in the caller"
        elif plan.mode == "distributed":
            # Its threads, as explain() says: up to two chunks per thread are in flight
            # (dispatch.IN_FLIGHT_PER_WORKER), so "2 tasks in flight" was half of them.
            head = (f"dask cluster, {fmt_count(plan.n_workers, 'thread', 'threads')}, "
                    f"chunks of {plan.chunksize:,}")
        elif plan.mode == "threads":
            head = (f"{fmt_count(plan.n_workers, 'thread', 'threads')}, "
                    f"chunks of {plan.chunksize:,}")
        else:
            head = (f"{plan.mode}, {fmt_count(plan.n_workers, 'process', 'processes')}, "
                    f"chunks of {plan.chunksize:,}")
        if self.n_items == 0:
            out = f"{head}, no items ({fmt_s(self.wall_s)})"
            return "; ".join(part for part in (out, self.ran) if part)
        out = (f"{head}, {fmt_count(self.n_items, 'item', 'items')} in {fmt_s(self.wall_s)}, "
               + (f"estimated {fmt_s(plan.estimated_s)}" if plan.measured
                  else "not estimated"))
        if self.from_cache:
            out += ", from cache"
        return "; ".join(part for part in (out, self.ran, self.adjusted) if part)
