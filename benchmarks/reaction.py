"""Reaction time: how soon adaptive_exec's worker count follows a load change (issue 5:
"the worker count reacts to a load change within 1 s").

In a fresh process (``_child``, runner ``reaction``), on a warm pool with the function's
features already cached:

    t = 0      parallelize(heavy_task, backend="loky", chunksize=1).map(300 items of 20 ms)
    t = 1.0 s  a timer starts a busy process (``load.BusyCore``): one CPU taken
    t = 2.5 s  a timer kills it
    t ~ 3.5 s  the map ends (~4 s of work on 2 workers)

``RunReport.workers_timeline`` lists (seconds, active workers) at each change.  From it:
the delay from the load's start to the first drop in active workers, and from its end
to the next rise.  The moments of the load are taken when the busy process really spins
and when it is really gone, on the map's clock (``time.perf_counter()`` at the call).

The timeline's clock starts when the run's dispatch loop starts, after the call has
looked up the cache and planned: that offset is ``RunReport.sampling_s`` (on a cache hit,
about a millisecond), subtracted here; what it misses, opening the already warm pool, is
well under a millisecond, so the delays are at most that much too short.
"""

from __future__ import annotations

import statistics
import threading
import time
from typing import Any, Callable, Dict, List, Optional, Tuple

WORKLOAD = "heavy"  # 20 ms of CPU per item: the timeline moves every ~20 ms
N_ITEMS = 300
LOAD_AT_S = 1.0
UNLOAD_AT_S = 2.5
WARMUP_ITEMS = 20
LIMIT_S = 40.0  # the child's time limit: the map alone takes ~4 s
GOAL_S = 1.0


def spec() -> Dict[str, Any]:
    return {"workload": WORKLOAD, "n_items": N_ITEMS, "runner": "reaction",
            "name": "reaction", "load_at_s": LOAD_AT_S, "unload_at_s": UNLOAD_AT_S}


# --------------------------------------------------------------------------- in the child


def prepare(task: Callable, items: List[Any], spec: Dict[str, Any]
            ) -> Tuple[Callable[[], Any], Callable[[], Dict[str, Any]]]:
    import adaptive_exec
    from benchmarks.load import BusyCore

    adaptive_exec.calibrate()  # a warm pool, its start-up and overheads measured
    pf = adaptive_exec.parallelize(task, backend="loky", chunksize=1)
    pf.map(items[:WARMUP_ITEMS])  # caches the features: the timed map does not sample
    moments: Dict[str, Optional[float]] = {}

    def go() -> Any:
        busy = BusyCore(max_s=spec["unload_at_s"] + LIMIT_S)
        timers = [threading.Timer(spec["load_at_s"], busy.start),
                  threading.Timer(spec["unload_at_s"], busy.stop)]
        t0 = time.perf_counter()
        for timer in timers:
            timer.start()
        try:
            return pf.map(items)
        finally:
            moments["end"] = time.perf_counter() - t0
            for timer in timers:
                timer.cancel()
            busy.stop()  # the map ended first; a timer that fires later starts nothing
            moments["load_on"] = None if busy.started_at is None else busy.started_at - t0
            moments["load_off"] = None if busy.stopped_at is None else busy.stopped_at - t0

    def details() -> Dict[str, Any]:
        report = pf.last_report
        plan = report.plan
        return {
            **moments,
            "timeline": [list(point) for point in report.workers_timeline],
            "offset_s": report.sampling_s,
            "n_workers": plan.n_workers,
            "mode": plan.mode,
            "from_cache": report.from_cache,
            "n_sampled": report.n_sampled,
        }

    return go, details


# --------------------------------------------------------------------------- analysis


def delays(details: Dict[str, Any]) -> Dict[str, Any]:
    """{"drop_s", "rise_s", "note"}: the delays (None when not seen) and why not.

    A drop is the first timeline point after the load's start, and before its end, with
    fewer active workers than at the start (not 0: that is the run's end); a rise is the
    first point after the load's end with more active workers than at that moment."""
    out: Dict[str, Any] = {"drop_s": None, "rise_s": None, "note": ""}
    timeline = [(float(t), int(a)) for t, a in details.get("timeline") or []]
    full = details.get("n_workers") or 0
    on, off = details.get("load_on"), details.get("load_off")
    if details.get("mode") != "parallel" or full < 2:
        out["note"] = f"needs a parallel run on 2+ workers (plan: {details.get('mode')}, " \
                      f"{full} workers)"
        return out
    if on is None or off is None or not timeline:
        out["note"] = "the load never started" if on is None else "no timeline"
        return out
    offset = details.get("offset_s") or 0.0
    on_t, off_t = on - offset, off - offset  # on the timeline's clock

    def active_at(t: float) -> int:
        before = [a for s, a in timeline if s <= t]
        return before[-1] if before else 0

    notes = []
    if active_at(on_t) < full:
        notes.append(f"only {active_at(on_t)} of {full} workers active when the load began")
    else:
        drop = next((s for s, a in timeline if on_t <= s < off_t and 0 < a < full), None)
        if drop is None:
            notes.append("no drop while the load lasted")
        else:
            out["drop_s"] = drop - on_t
    at_off = active_at(off_t)
    if at_off == 0:
        notes.append("the map had ended when the load stopped")
    elif at_off >= full:
        notes.append("all workers active when the load stopped")
    else:
        rise = next((s for s, a in timeline if s >= off_t and a > at_off), None)
        if rise is None:
            notes.append("no rise after the load")
        else:
            out["rise_s"] = rise - off_t
    out["note"] = "; ".join(notes)
    return out


def summarize(runs: List[Dict[str, Any]]) -> Dict[str, Any]:
    """The runs, each with its delays, and the medians over the runs that saw them."""
    def median(key: str) -> Optional[float]:
        values = [r["delays"][key] for r in runs if r["delays"][key] is not None]
        return statistics.median(values) if values else None

    return {
        "description": f"parallelize({WORKLOAD}_task, backend='loky', chunksize=1)"
                       f".map({N_ITEMS} items of 20 ms CPU) on a warm pool, features cached;"
                       f" one CPU made busy by another process at +{LOAD_AT_S} s and freed"
                       f" at +{UNLOAD_AT_S} s",
        "load_at_s": LOAD_AT_S, "unload_at_s": UNLOAD_AT_S, "goal_s": GOAL_S,
        "drop_s": median("drop_s"), "rise_s": median("rise_s"),
        "n_runs": len(runs),
        "n_drops": sum(r["delays"]["drop_s"] is not None for r in runs),
        "n_rises": sum(r["delays"]["rise_s"] is not None for r in runs),
        "runs": runs,
    }
