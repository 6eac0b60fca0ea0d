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
from typing import Any, Optional

BACKENDS = ("auto", "loky", "serial", "dask")


# --- formatting for people --------------------------------------------------------------

def fmt_s(seconds: float) -> str:
    if seconds >= 1:
        return f"{seconds:.2f} s"
    if seconds >= 1e-3:
        return f"{seconds * 1e3:.1f} ms"
    return f"{seconds * 1e6:.1f} µs"


def fmt_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} GB"


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

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


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
        return self.source.startswith("measured")

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

    def explain(self) -> str:
        f = self.features
        lines = [
            f"mode:        {self.mode}",
            f"workers:     {self.n_workers}",
            f"chunksize:   {self.chunksize}",
            f"serial:      {fmt_s(self.estimated_serial_s)} (estimated)",
            f"parallel:    {fmt_s(self.estimated_parallel_s)} (estimated)",
            f"speedup:     {self.estimated_speedup:.2f}x (estimated)",
            f"from cache:  {self.from_cache}",
            f"reason:      {self.reason}",
        ]
        if f:
            lines.append("features:")
            width = max(len(k) for k in f)
            for key in sorted(f):
                lines.append(f"  {key.ljust(width)}  {f[key]}")
        return "\n".join(lines)


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
