"""The harness: which measurements, in which order, with time-outs, repeats and medians.

For each scenario: a workload (``heavy``), a workload under load (``heavy@loaded``: one
CPU kept busy by another process during every measurement, warm-up included), or the
reaction-time measurement (``reaction``, see that module):

    warm-up of adaptive_warm's cache dir (one fresh process, not timed)
    repeat N times:
        for each runner and grid configuration, in a fixed order, serial first:
            [start the busy process]
            fresh process -> _child -> JSON {status, seconds, details}
            [stop the busy process]

Rounds interleave the runners, so that a slow drift of the shared machine's load touches
every runner alike and the ratios, measured side by side, stay fair.  Each process runs in
its own session; when it ends, or runs out of time, its whole process group is killed, so
no orphaned pool worker keeps burning a core through the next measurement.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ContextManager, Dict, List, Optional, TextIO, Tuple

from benchmarks import reaction
from benchmarks import runners as runners_mod
from benchmarks import workloads as workloads_mod
from benchmarks.load import BusyCore
from benchmarks.runners import RunnerSpec

ROOT = Path(__file__).resolve().parent.parent

# A configuration whose best time is this many times the best so far cannot be the
# oracle, even on this noisy machine: it is not repeated (its ratio then rests on fewer
# runs, which the table shows).
SKIP_FACTOR = 2.5

# Seconds a child may take beyond its time limit: interpreter start, imports, building
# the items and checking the results.  The limit itself is enforced inside the child.
STARTUP_ALLOWANCE_S = 10.0

# What a time-out is: max(floor, factor x the loop's time on this workload).
TIME_LIMIT_QUICK = (3.0, 6.0)
TIME_LIMIT_FULL = (10.0, 10.0)
# The loop itself is the baseline of every ratio, so it gets far more room: on this
# shared machine, numpy's loop (OpenBLAS threads spin-waiting for a descheduled partner)
# was seen to take over 6x its quiet time while other processes held the cores.
SERIAL_TIME_LIMIT = (30.0, 20.0)

DEFAULT_REPEATS_QUICK = 2
DEFAULT_REPEATS_FULL = 3

# Scenario names: a workload's, the same with LOADED or THREADED appended, and REACTION.
LOADED = "@loaded"
# The caller runs a thread of its own during the map (a GUI's, a server's): adaptive_exec
# then starts its workers from a template process instead of forking the caller.
THREADED = "@threaded"
REACTION = "reaction"
DEFAULT_SCENARIOS = [*workloads_mod.WORKLOADS, f"heavy{LOADED}", f"heavy{THREADED}",
                     f"small{THREADED}", REACTION]
# The reaction's runs, unless --repeats says otherwise: a median of 2 is a mean.
DEFAULT_REACTION_REPEATS = 3


def all_scenarios() -> List[str]:
    return [*workloads_mod.WORKLOADS, *(f"{w}{LOADED}" for w in workloads_mod.WORKLOADS),
            *(f"{w}{THREADED}" for w in workloads_mod.WORKLOADS), REACTION]


def split_scenario(name: str) -> Tuple[str, bool]:
    """'heavy@loaded' -> ('heavy', True); 'heavy' or 'heavy@threaded' -> ('heavy', False)."""
    name = name[: -len(THREADED)] if name.endswith(THREADED) else name
    if name.endswith(LOADED):
        return name[: -len(LOADED)], True
    return name, False


@dataclass
class Options:
    quick: bool = False
    workloads: List[str] = field(default_factory=lambda: list(DEFAULT_SCENARIOS))  # scenarios
    runners: List[str] = field(default_factory=lambda: [*runners_mod.NAMED_BY_NAME, "oracle"])
    repeats: Optional[int] = None
    progress: Optional[TextIO] = None

    @property
    def n_repeats(self) -> int:
        if self.repeats is not None:
            return self.repeats
        return DEFAULT_REPEATS_QUICK if self.quick else DEFAULT_REPEATS_FULL

    @property
    def n_reaction_repeats(self) -> int:
        return self.repeats if self.repeats is not None else DEFAULT_REACTION_REPEATS


@dataclass
class Config:
    """One runner or grid configuration and its measurements on one workload."""

    spec: RunnerSpec
    runs: List[Dict[str, Any]] = field(default_factory=list)

    @property
    def status(self) -> str:
        for run in self.runs:
            if run["status"] != "ok":
                return run["status"]
        return "ok" if self.runs else "not run"

    @property
    def times(self) -> List[float]:
        return [run["seconds"] for run in self.runs if run["status"] == "ok"]

    @property
    def median(self) -> Optional[float]:
        return statistics.median(self.times) if self.status == "ok" else None


def usable_cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


# --------------------------------------------------------------------------- processes


def _child_env(cache_dir: Optional[str]) -> Dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("ADAPTIVE_EXEC_")}
    # The caller's own ADAPTIVE_EXEC_DISABLE or _MAX_WORKERS would silently change what
    # is measured; only the cache dir is set, and only for adaptive_exec's runs.
    if cache_dir is not None:
        env["ADAPTIVE_EXEC_CACHE_DIR"] = cache_dir
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    return env


def _wait_exit(proc: subprocess.Popen, deadline: float) -> bool:
    """Wait until the child exits or the deadline passes, without reaping it: while it is
    an unreaped zombie its pid, the id of its process group, cannot be reused, so killing
    the group afterwards can only hit processes this measurement started."""
    if not hasattr(os, "waitid"):  # macOS: reap, and accept a tiny pid-reuse window
        try:
            proc.wait(timeout=max(0.0, deadline - time.monotonic()))
            return True
        except subprocess.TimeoutExpired:
            return False
    while time.monotonic() < deadline:
        if os.waitid(os.P_PID, proc.pid, os.WEXITED | os.WNOWAIT | os.WNOHANG) is not None:
            return True
        time.sleep(0.005)
    return False


def _kill_group(pgid: int) -> None:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass  # the group is already gone


def _tail(path: Path, n_chars: int = 600) -> str:
    try:
        return path.read_text(errors="replace")[-n_chars:].strip()
    except OSError:
        return ""


def run_child(spec: Dict[str, Any], limit_s: float, work_dir: Path,
              cache_dir: Optional[str] = None) -> Dict[str, Any]:
    """One measurement in a fresh process; always returns an outcome with a status.
    A runner or workload that needs a package that is not installed is not started:
    its status is ``n/a`` (runners.NOT_INSTALLED), with what to pip install."""
    missing = runners_mod.not_installed(
        runners_mod.needed_modules(spec.get("runner", ""), spec.get("workload")))
    if missing:
        return {**runners_mod.not_installed_outcome(missing), "load1": os.getloadavg()[0]}
    fd, spec_name = tempfile.mkstemp(suffix=".json", dir=work_dir)
    os.close(fd)
    spec_path = Path(spec_name)
    out_path, log_path = spec_path.with_suffix(".out"), spec_path.with_suffix(".log")
    spec = {**spec, "out": str(out_path), "limit_s": limit_s}
    spec_path.write_text(json.dumps(spec))
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "benchmarks._child", str(spec_path)],
            cwd=ROOT, env=_child_env(cache_dir), stdout=log, stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    exited = _wait_exit(proc, time.monotonic() + limit_s + STARTUP_ALLOWANCE_S)
    _kill_group(proc.pid)  # leftover pool workers, or the whole hung measurement
    proc.wait()
    outcome = _read_outcome(out_path, log_path, proc.returncode, exited, limit_s)
    outcome["load1"] = os.getloadavg()[0]
    for path in (spec_path, out_path, log_path):
        path.unlink(missing_ok=True)
    return outcome


def _read_outcome(out_path: Path, log_path: Path, returncode: int, exited: bool,
                  limit_s: float) -> Dict[str, Any]:
    try:
        outcome = json.loads(out_path.read_text())
    except (OSError, ValueError):
        if not exited:
            return {"status": "TIMEOUT", "seconds": None,
                    "message": f"no result within {limit_s:.0f} s (+ start-up)"}
        return {"status": "FAIL", "seconds": None,
                "message": f"exit code {returncode}: {_tail(log_path)}"}
    if not exited:
        outcome["message"] = (outcome.get("message", "") + " process did not exit; killed").strip()
    if outcome["status"] == "FAIL" and "traceback" in outcome:
        outcome["message"] = outcome.get("message", "") or outcome["traceback"][-300:]
    return outcome


# --------------------------------------------------------------------------- the suite


def _specs(options: Options, n_items: int, ncpu: int, loaded: bool) -> List[RunnerSpec]:
    specs = [runners_mod.NAMED_BY_NAME[name] for name in options.runners
             if name in runners_mod.NAMED_BY_NAME]
    specs.sort(key=lambda s: s.name != "serial")  # serial first: it sets the time limits
    if "oracle" in options.runners:
        named = {(s.runner, s.workers, s.chunksize) for s in specs}
        grid = runners_mod.loaded_grid if loaded else runners_mod.grid
        specs += [g for g in grid(n_items, ncpu, options.quick)
                  if (g.runner, g.workers, g.chunksize) not in named]
    return specs


class _Progress:
    def __init__(self, stream: Optional[TextIO], total: int) -> None:
        self.stream, self.total, self.done = stream, total, 0

    def skip(self, n: int) -> None:
        self.total -= n

    def line(self, workload: str, name: str, label: str, outcome: Dict[str, Any],
             note: str = "") -> None:
        self.done += 1
        if self.stream is None:
            return
        seconds = outcome.get("seconds")
        shown = f"{seconds:8.3f} s" if seconds is not None and outcome["status"] == "ok" \
            else " " * 10
        if outcome["status"] != "ok":
            note = outcome.get("message", "")
        width = len(str(self.total))
        print(f"[{self.done:{width}d}/{self.total}] {workload:<13} {name:<22} {label:<7}"
              f" {shown}  {outcome['status']} {note[:90]}".rstrip(),
              file=self.stream, flush=True)


def _time_limit(quick: bool, serial_s: float, baseline: bool = False) -> float:
    floor, factor = SERIAL_TIME_LIMIT if baseline else \
        TIME_LIMIT_QUICK if quick else TIME_LIMIT_FULL
    return max(floor, factor * serial_s)


def _best_so_far(configs: List[Config]) -> Optional[float]:
    times = [min(c.times) for c in configs if c.spec.in_oracle and c.status == "ok"]
    return min(times) if times else None


def _worth_repeating(config: Config, best: Optional[float]) -> bool:
    if config.status != "ok":
        return False  # a failure or a time-out is not retried: it is the result
    if config.spec.name in runners_mod.ALWAYS_REPEAT:
        return True
    return best is None or min(config.times) <= SKIP_FACTOR * best


def run_workload(name: str, options: Options, work_dir: Path, progress: _Progress,
                 ncpu: int) -> Dict[str, Any]:
    """One workload scenario ('heavy' or 'heavy@loaded'): every runner, repeated."""
    workload_name, loaded = split_scenario(name)
    workload = workloads_mod.get(workload_name)
    n_items = workload.n_items(options.quick)
    nominal = workload.nominal_serial_s(options.quick)
    configs = [Config(spec) for spec in _specs(options, n_items, ncpu, loaded)]
    threaded = name.endswith(THREADED)
    base = {"workload": workload_name, "n_items": n_items, "threaded": threaded}
    warm_dir = str(work_dir / f"cache-warm-{name.replace('@', '-')}")
    os.makedirs(warm_dir, exist_ok=True)  # as the cold runs' dirs: existing and empty

    warmup = None
    if any(c.spec.name == "adaptive_warm" for c in configs):
        limit = _time_limit(options.quick, nominal)
        with _load(loaded, limit):
            warmup = run_child({**base, "runner": "adaptive"}, limit, work_dir,
                               cache_dir=warm_dir)
        progress.line(name, "adaptive_warm", "warm-up", warmup)

    repeats = options.n_repeats
    for rep in range(repeats):
        label = f"{rep + 1}/{repeats}"
        for config in configs:
            if config.runs and not _worth_repeating(config, _best_so_far(configs)):
                if len(config.runs) == rep:  # first time it is dropped
                    progress.skip(repeats - rep)
                continue
            serial = next((c for c in configs if c.spec.name == "serial" and c.times), None)
            limit = _time_limit(options.quick, min(serial.times) if serial else nominal,
                                baseline=config.spec.name == "serial")
            with _load(loaded, limit):
                outcome = _measure(config.spec, base, limit, work_dir, warm_dir)
            config.runs.append(outcome)
            progress.line(name, config.spec.name, label, outcome)

    summary = _summarize(name, workload, options.quick, configs, warmup, loaded)
    if threaded:
        summary["description"] += "; the caller runs a thread of its own meanwhile"
    summary["threaded"] = threaded
    return summary


def _load(loaded: bool, limit: float) -> ContextManager[Any]:
    """The busy process of a loaded scenario, around one measurement (else nothing); it
    ends by itself a while after the measurement's own deadline, if the harness dies."""
    return BusyCore(max_s=limit + STARTUP_ALLOWANCE_S + 30) if loaded else nullcontext()


def _measure(spec: RunnerSpec, base: Dict[str, Any], limit: float, work_dir: Path,
             warm_dir: str) -> Dict[str, Any]:
    cache_dir = None
    if spec.name == "adaptive_warm":
        cache_dir = warm_dir
    elif spec.ours:  # cold: a new empty cache dir for every run
        cache_dir = tempfile.mkdtemp(prefix="cache-cold-", dir=work_dir)
    try:
        return run_child({**base, **spec.to_json()}, limit, work_dir, cache_dir)
    finally:
        if cache_dir is not None and cache_dir != warm_dir:
            shutil.rmtree(cache_dir, ignore_errors=True)


def run_reaction(options: Options, work_dir: Path, progress: _Progress) -> Dict[str, Any]:
    """The reaction-time runs (see ``reaction``), each in a fresh process with an empty
    cache dir; the child starts and stops the busy process itself, on the map's clock."""
    runs = []
    repeats = options.n_reaction_repeats
    for rep in range(repeats):
        cache_dir = tempfile.mkdtemp(prefix="cache-reaction-", dir=work_dir)
        try:
            outcome = run_child(reaction.spec(), reaction.LIMIT_S, work_dir, cache_dir)
        finally:
            shutil.rmtree(cache_dir, ignore_errors=True)
        outcome["delays"] = reaction.delays(outcome.get("details") or {})
        runs.append(outcome)
        progress.line(REACTION, "adaptive (loky, c1)", f"{rep + 1}/{repeats}", outcome,
                      _delays_note(outcome["delays"]))
    return reaction.summarize(runs)


def _delays_note(delays: Dict[str, Any]) -> str:
    def shown(value: Optional[float]) -> str:
        return "-" if value is None else f"{value:.2f} s"

    note = f"drop after {shown(delays['drop_s'])}, rise after {shown(delays['rise_s'])}"
    return f"{note} ({delays['note']})" if delays["note"] else note


def _summarize(name: str, workload: workloads_mod.Workload, quick: bool,
               configs: List[Config], warmup: Optional[Dict[str, Any]],
               loaded: bool) -> Dict[str, Any]:
    candidates = [c for c in configs if c.spec.in_oracle and c.median is not None]
    oracle = min(candidates, key=lambda c: c.median) if candidates else None
    serial = next((c for c in configs if c.spec.name == "serial" and c.median), None)

    def ratio(value: Optional[float], ref: Optional[Config]) -> Optional[float]:
        return value / ref.median if value is not None and ref is not None else None

    entries = []
    for c in configs:
        entries.append({
            **c.spec.to_json(),
            "status": c.status,
            "median_s": c.median,
            "times_s": c.times,
            "n_runs": len(c.runs),
            "ratio_oracle": ratio(c.median, oracle),
            "ratio_serial": ratio(c.median, serial),
            "message": next((r.get("message") for r in c.runs if r.get("message")), None),
            # What to pip install, for a runner that is n/a: not installed here.
            "missing": next((r.get("missing") for r in c.runs if r.get("missing")), None),
            "details": [r.get("details") for r in c.runs if r.get("details")],
            "load1": [r.get("load1") for r in c.runs],
        })
    description = workload.description
    if loaded:
        description += "; one CPU kept busy by another process during each measurement"
    return {
        "name": name,
        "workload": workload.name,
        "loaded": loaded,
        "description": description,
        "n_items": workload.n_items(quick),
        "nominal_serial_s": workload.nominal_serial_s(quick),
        "oracle": None if oracle is None else {"name": oracle.spec.name,
                                                "seconds": oracle.median},
        "warmup": warmup,
        "runners": entries,
        "planning": {e["name"]: planning_accuracy(e) for e in entries if e["ours"]},
    }


def planning_accuracy(entry: Dict[str, Any]) -> Optional[Dict[str, Any]]:
    """The plan's estimate of the run's time against the measured median."""
    estimates, plan = [], None
    for details in entry["details"]:
        plan = details.get("plan") or {}
        key = "estimated_serial_s" if plan.get("mode") == "serial" else "estimated_parallel_s"
        if isinstance(plan.get(key), (int, float)):
            estimates.append(float(plan[key]))
    if not estimates or entry["median_s"] is None or plan is None:
        return None
    estimate = statistics.median(estimates)
    return {
        "mode": plan.get("mode"), "n_workers": plan.get("n_workers"),
        "chunksize": plan.get("chunksize"), "estimated_s": estimate,
        "measured_s": entry["median_s"], "ratio": estimate / entry["median_s"],
        "from_cache": [d.get("from_cache") for d in entry["details"]],
        "n_sampled": [d.get("n_sampled") for d in entry["details"]],
        # From the call to the plan: on a cache hit, the lookup and the planning alone.
        "sampling_s": [d.get("sampling_s") for d in entry["details"]],
        # The same plan again after the run, in the same process: a hit, first-use paid.
        "plan_again_s": [d.get("plan_again_s") for d in entry["details"]],
        "reason": plan.get("reason"),
    }


def bytecode_compiled() -> None:
    """adaptive_exec as an installed copy has it: its modules compiled to bytecode once
    (pip install compiles them), as the peers' are. A source checkout under
    PYTHONDONTWRITEBYTECODE=1 (this project's machines set it) otherwise compiles every
    module again in every process that imports it: the template and each worker of
    loky's own start included (measured: the template's imports 79-150 ms instead of
    61-65 ms). compileall writes what is stale, whatever that variable says."""
    import compileall
    import importlib.util

    spec = importlib.util.find_spec("adaptive_exec")
    for folder in (spec.submodule_search_locations or []) if spec else []:
        compileall.compile_dir(folder, quiet=1)


def run_suite(options: Options) -> Dict[str, Any]:
    from benchmarks import machine

    ncpu = usable_cpus()
    started, load_before = time.time(), os.getloadavg()
    described = machine.describe()  # before the runs: the commit that is measured
    scenarios = [name for name in options.workloads if name != REACTION]
    planned = options.n_reaction_repeats if REACTION in options.workloads else 0
    for name in scenarios:
        workload_name, loaded = split_scenario(name)
        n_items = workloads_mod.get(workload_name).n_items(options.quick)
        planned += len(_specs(options, n_items, ncpu, loaded)) * options.n_repeats
        planned += "adaptive_warm" in options.runners
    progress = _Progress(options.progress, planned)
    bytecode_compiled()
    work_dir = Path(tempfile.mkdtemp(prefix="adaptive-exec-bench-"))
    try:
        results = [run_workload(name, options, work_dir, progress, ncpu)
                   for name in scenarios]
        reacted = (run_reaction(options, work_dir, progress)
                   if REACTION in options.workloads else None)
    finally:
        shutil.rmtree(work_dir, ignore_errors=True)
    return {
        "meta": _meta(options, ncpu, started, load_before, described),
        "workloads": results,
        "reaction": reacted,
    }


def _meta(options: Options, ncpu: int, started: float, load_before: Any,
          described: Dict[str, Any]) -> Dict[str, Any]:
    return {
        "quick": options.quick,
        "repeats": options.n_repeats,
        "runners": options.runners,
        "workloads": options.workloads,
        "usable_cpus": ncpu,
        "started": time.strftime("%Y-%m-%d %H:%M:%S %Z", time.localtime(started)),
        "wall_s": time.time() - started,
        "load_before": list(load_before),
        "load_after": list(os.getloadavg()),
        "time_limits": {"quick": TIME_LIMIT_QUICK, "full": TIME_LIMIT_FULL,
                        "serial": SERIAL_TIME_LIMIT},
        "skip_factor": SKIP_FACTOR,
        "load": "one busy Python process (a spinning loop, its own process group) during "
                f"each measurement of the {LOADED} scenarios",
        **described,
    }

