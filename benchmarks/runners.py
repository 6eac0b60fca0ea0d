"""Runners: the ways of computing ``[task(x) for x in items]`` that the suite compares.

A runner is run by ``_child`` in a fresh process.  ``prepare`` does what a user's script
does before the work (imports) and returns ``go``, the part that is timed: from before the
pool is created to after the results are complete, including the teardown of a pool the
runner created itself, as a ``with`` block would.  A reusable executor (loky, joblib,
adaptive_exec) is left alive, as a script leaves it; its shutdown at exit is not timed.

The oracle is the best of every runner here that is not adaptive_exec, together with a
grid of fixed (pool kind, workers, chunk size) configurations: the best a user could get by
hand-tuning one of them per workload and machine.  Fork pools are in the grid because they
start faster than loky on Linux, so a loky-only grid would not be a lower bound.  Under
load (the ``NAME@loaded`` scenarios) the grid is ``loaded_grid``: every worker count that
may be the best one when a CPU is taken.
"""

from __future__ import annotations

import importlib.util
import math
import time
from dataclasses import asdict, dataclass
from typing import Any, Callable, Dict, Iterable, List, Optional, Tuple

# loky with one chunk size for every workload, a value a user would pick once: the
# design notes measured ~2.5 µs per task at 100 against ~0.15 ms at 1 on 2 cores.
LOKY_FIXED_CHUNKSIZE = 100

# The thread-pool sizes in the grid: enough to overlap the io_bound sleeps well.
GRID_THREADS = (32,)


@dataclass(frozen=True)
class RunnerSpec:
    name: str  # unique within a workload; "fork/w2/c16" for grid entries
    runner: str  # the key in _PREPARE
    workers: Optional[int] = None
    chunksize: Optional[int] = None
    ours: bool = False  # adaptive_exec itself
    in_oracle: bool = True  # a candidate for the oracle (everything that is not ours)
    grid: bool = False
    description: str = ""

    def to_json(self) -> Dict[str, Any]:
        return asdict(self)


NAMED: List[RunnerSpec] = [
    RunnerSpec("serial", "serial", description="[task(x) for x in items]"),
    RunnerSpec("adaptive_cold", "adaptive", ours=True, in_oracle=False,
               description="parallelize(task).map(items), empty cache dir"),
    RunnerSpec("adaptive_warm", "adaptive", ours=True, in_oracle=False,
               description="the same, cache dir warmed by an earlier process"),
    RunnerSpec("joblib", "joblib", description="Parallel(n_jobs=-1), auto batching"),
    RunnerSpec("mp_pool", "mp_pool", description="multiprocessing.Pool().map, default chunks"),
    RunnerSpec("process_pool", "process_pool",
               description="ProcessPoolExecutor().map, default chunksize 1"),
    RunnerSpec("loky", "loky", chunksize=LOKY_FIXED_CHUNKSIZE,
               description=f"get_reusable_executor().map, chunksize {LOKY_FIXED_CHUNKSIZE}"),
    RunnerSpec("threads", "threads", description="ThreadPoolExecutor().map"),
]

NAMED_BY_NAME: Dict[str, RunnerSpec] = {spec.name: spec for spec in NAMED}

# The runners measured on every repeat even when clearly slow: the ones the goals and
# ratios are about.  Others stop repeating once they cannot be the oracle (harness).
ALWAYS_REPEAT = frozenset({"serial", "adaptive_cold", "adaptive_warm", "joblib"})


# --------------------------------------------------------------------------- not installed

# What a runner or a workload imports that adaptive_exec does not install itself (the
# `bench` extra has them all: pip install -e ".[bench]"): top-level module names.
RUNNER_NEEDS: Dict[str, Tuple[str, ...]] = {"joblib": ("joblib",)}
WORKLOAD_NEEDS: Dict[str, Tuple[str, ...]] = {"numpy": ("numpy",)}
# Where the module's name is not what to pip install.
PIP_NAMES: Dict[str, str] = {"distributed": "dask[distributed]", "dask": "dask[distributed]"}

# The status of a measurement that needs a package that is not installed: not a failure,
# not a time. Reports show it as "n/a (pip install PACKAGE)".
NOT_INSTALLED = "n/a"


def pip_name(module: str) -> str:
    top = module.partition(".")[0]
    return PIP_NAMES.get(top, top)


def pip_command(packages: Iterable[str]) -> str:
    """'pip install joblib numpy'; a name with extras is quoted for the shell."""
    names = [f'"{p}"' if "[" in p else p for p in packages]
    return "pip install " + " ".join(names) if names else "pip install"


def needed_modules(runner: str, workload: Optional[str]) -> List[str]:
    """The optional modules that a runner on a workload imports."""
    return [*RUNNER_NEEDS.get(runner, ()), *WORKLOAD_NEEDS.get(workload or "", ())]


def not_installed(modules: Iterable[str]) -> List[str]:
    """What to pip install for each of ``modules`` that cannot be found (the module is
    looked up, not imported: a broken installation is found when it is imported, and
    stays a failure)."""
    missing: List[str] = []
    for module in modules:
        top = module.partition(".")[0]
        try:
            found = importlib.util.find_spec(top) is not None
        except (ImportError, ValueError):  # ValueError: in sys.modules without a spec
            found = True  # importable as far as we can tell: its import decides
        if not found and pip_name(top) not in missing:
            missing.append(pip_name(top))
    return missing


def missing_from_error(exc: BaseException, modules: Iterable[str]) -> List[str]:
    """[what to pip install] when ``exc`` says that one of ``modules`` itself is absent
    (``ModuleNotFoundError`` naming it); [] for any other error, e.g. a module that is
    installed but fails to import, or a dependency of it that is missing: a failure."""
    if not isinstance(exc, ModuleNotFoundError) or not exc.name:
        return []
    top = exc.name.partition(".")[0]
    return [pip_name(top)] if top in {m.partition(".")[0] for m in modules} else []


def not_installed_outcome(missing: List[str]) -> Dict[str, Any]:
    return {"status": NOT_INSTALLED, "seconds": None, "missing": list(missing),
            "message": f"not installed: {pip_command(missing)}"}


# --------------------------------------------------------------------------- the grid


def _worker_counts(ncpu: int, quick: bool) -> List[int]:
    if quick:
        return [ncpu]
    counts = {1, ncpu}
    power = 2
    while power < ncpu:  # powers of two: a 16-core machine gets 1, 2, 4, 8, 16
        counts.add(power)
        power *= 2
    return sorted(counts)


def _chunk_sizes(n_items: int, workers: int, quick: bool, kind: str) -> List[int]:
    def per_task(tasks_per_worker: int) -> int:
        return max(1, math.ceil(n_items / (tasks_per_worker * workers)))

    if workers == 1:
        return [per_task(4)]  # one worker: chunking only trades IPC against nothing
    if quick:
        # multiprocessing.Pool's default is per_task(4), which the mp_pool runner covers.
        return sorted({1, per_task(16)}) if kind == "fork" else [per_task(4)]
    return sorted({1, per_task(16), per_task(4), per_task(1)})


def grid(n_items: int, ncpu: int, quick: bool) -> List[RunnerSpec]:
    """The fixed configurations of the oracle; fewer in --quick."""
    specs: List[RunnerSpec] = []
    for kind in ("fork", "loky"):
        for workers in _worker_counts(ncpu, quick):
            for chunksize in _chunk_sizes(n_items, workers, quick, kind):
                specs.append(_grid_spec(kind, workers, chunksize))
    for workers in GRID_THREADS:
        per_task = max(1, math.ceil(n_items / (4 * workers)))
        for chunksize in [1] if quick else sorted({1, per_task}):
            specs.append(_grid_spec("threadpool", workers, chunksize))
    return specs


def _loaded_worker_counts(ncpu: int) -> List[int]:
    # Under load the best count is no longer the CPU count: every count up to 4, then
    # the powers of two, and one fewer than the CPUs (the busy process takes one).
    counts = set(range(1, min(ncpu, 4) + 1)) | set(_worker_counts(ncpu, False))
    counts.add(max(1, ncpu - 1))
    return sorted(counts)


def loaded_grid(n_items: int, ncpu: int, quick: bool) -> List[RunnerSpec]:
    """The fixed configurations measured under load: every worker count that may be the
    best one there (on 2 CPUs: 1 and 2), fork pools and loky, with chunks small enough
    to balance workers that run at different speeds.  No thread pool: the ``threads``
    runner stands for it."""
    specs: List[RunnerSpec] = []
    for kind in ("fork", "loky"):
        for workers in _loaded_worker_counts(ncpu):
            for chunksize in _loaded_chunk_sizes(n_items, workers, quick):
                specs.append(_grid_spec(kind, workers, chunksize))
    return specs


def _loaded_chunk_sizes(n_items: int, workers: int, quick: bool) -> List[int]:
    def per_task(tasks_per_worker: int) -> int:
        return max(1, math.ceil(n_items / (tasks_per_worker * workers)))

    if workers == 1:
        return [per_task(4)]
    return [per_task(16)] if quick else sorted({1, per_task(16), per_task(4)})


def _grid_spec(kind: str, workers: int, chunksize: int) -> RunnerSpec:
    return RunnerSpec(f"{kind}/w{workers}/c{chunksize}", kind, workers, chunksize, grid=True,
                      description=f"{kind} pool, {workers} workers, chunksize {chunksize}")


# --------------------------------------------------------------------------- in the child

Go = Callable[[], Any]
Details = Callable[[], Dict[str, Any]]


def _no_details() -> Dict[str, Any]:
    return {}


def _serial(task: Callable, items: List[Any], spec: Dict[str, Any]) -> Tuple[Go, Details]:
    return (lambda: [task(x) for x in items]), _no_details


def _adaptive(task: Callable, items: List[Any], spec: Dict[str, Any]) -> Tuple[Go, Details]:
    from adaptive_exec import parallelize

    made: Dict[str, Any] = {}

    def go() -> Any:
        # The same as adaptive_map(task, items) by the contract; through parallelize so
        # that the run's report (plan, estimates, sampling) can be read afterwards.
        made["pf"] = pf = parallelize(task)
        return pf.map(items)

    def details() -> Dict[str, Any]:
        out = _report_details(made["pf"].last_report)
        # After the clock: the same call's plan again, now a cache hit in a process that
        # has paid its first-use costs (fingerprint, opening the cache): lookup and
        # planning alone, to set beside the first map's sampling_s.
        t0 = time.perf_counter()
        try:
            made["pf"].plan(items)
        except Exception as exc:  # noqa: BLE001 - a figure missing, not a failed run
            out["plan_again_error"] = f"{type(exc).__name__}: {exc}"
        else:
            out["plan_again_s"] = time.perf_counter() - t0
        return out

    return go, details


def _report_details(report: Any) -> Dict[str, Any]:
    if report is None:
        return {"report": None}
    plan = getattr(report, "plan", None)
    # sampling_s is the time from the call to the plan: on a cache hit, the lookup and
    # the planning alone.
    details: Dict[str, Any] = {
        name: _jsonable(getattr(report, name, None))
        for name in ("wall_s", "n_items", "n_sampled", "from_cache", "sampling_s",
                     "planning_overhead_s", "start_path", "bytes_sent")
    }
    details["plan"] = {
        name: _jsonable(getattr(plan, name, None))
        for name in ("mode", "n_workers", "chunksize", "estimated_serial_s",
                     "estimated_parallel_s", "estimated_speedup", "reason", "from_cache")
    }
    return details


def _jsonable(value: Any) -> Any:
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return repr(value)


def _reaction(task: Callable, items: List[Any], spec: Dict[str, Any]) -> Tuple[Go, Details]:
    from benchmarks import reaction

    return reaction.prepare(task, items, spec)


def _joblib(task: Callable, items: List[Any], spec: Dict[str, Any]) -> Tuple[Go, Details]:
    from joblib import Parallel, delayed

    return (lambda: Parallel(n_jobs=-1)(delayed(task)(x) for x in items)), _no_details


def _mp_pool(task: Callable, items: List[Any], spec: Dict[str, Any]) -> Tuple[Go, Details]:
    import multiprocessing

    def go() -> Any:
        with multiprocessing.Pool() as pool:
            return pool.map(task, items)

    return go, _no_details


def _process_pool(task: Callable, items: List[Any], spec: Dict[str, Any]) -> Tuple[Go, Details]:
    from concurrent.futures import ProcessPoolExecutor

    def go() -> Any:
        with ProcessPoolExecutor() as executor:
            return list(executor.map(task, items))

    return go, _no_details


def _loky(task: Callable, items: List[Any], spec: Dict[str, Any]) -> Tuple[Go, Details]:
    from loky import get_reusable_executor

    workers, chunksize = spec.get("workers"), spec["chunksize"]

    def go() -> Any:
        executor = get_reusable_executor(max_workers=workers)
        return list(executor.map(task, items, chunksize=chunksize))

    return go, _no_details


def _threads(task: Callable, items: List[Any], spec: Dict[str, Any]) -> Tuple[Go, Details]:
    from concurrent.futures import ThreadPoolExecutor

    def go() -> Any:
        with ThreadPoolExecutor() as executor:
            return list(executor.map(task, items))

    return go, _no_details


def _fork(task: Callable, items: List[Any], spec: Dict[str, Any]) -> Tuple[Go, Details]:
    import multiprocessing

    context = multiprocessing.get_context("fork")

    def go() -> Any:
        with context.Pool(spec["workers"]) as pool:
            return pool.map(task, items, chunksize=spec["chunksize"])

    return go, _no_details


def _threadpool(task: Callable, items: List[Any], spec: Dict[str, Any]) -> Tuple[Go, Details]:
    # multiprocessing's ThreadPool, not ThreadPoolExecutor: its map honours chunksize.
    from multiprocessing.pool import ThreadPool

    def go() -> Any:
        with ThreadPool(spec["workers"]) as pool:
            return pool.map(task, items, chunksize=spec["chunksize"])

    return go, _no_details


_PREPARE = {
    "serial": _serial,
    "adaptive": _adaptive,
    "reaction": _reaction,
    "joblib": _joblib,
    "mp_pool": _mp_pool,
    "process_pool": _process_pool,
    "loky": _loky,
    "threads": _threads,
    "fork": _fork,
    "threadpool": _threadpool,
}


def prepare(task: Callable, items: List[Any], spec: Dict[str, Any]) -> Tuple[Go, Details]:
    """Imports and set-up that a script does before its map; returns (timed part, details)."""
    return _PREPARE[spec["runner"]](task, items, spec)
