"""Reports of one suite run: the table on stdout, results.json, results.md, results.png.

Everything here reads only the results dict (results.json's content), so a report can be
rebuilt from a saved run: ``python -m benchmarks.report bench-results/results.json``.
"""

from __future__ import annotations

import importlib.util
import json
import math
import statistics
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Iterable, List, Optional, Sequence

from benchmarks import machine
from benchmarks.runners import NOT_INSTALLED, pip_command

# The runners shown as columns, in this order (the grid is summed up by the oracle).
SHOWN = ("serial", "adaptive_cold", "adaptive_warm", "joblib", "mp_pool", "process_pool",
         "loky", "threads")

# The project's goals (the issues' "Figures").
COLD_MAX_RATIO = 1.15
WARM_MAX_GEOMEAN = 1.05
MAX_VS_SERIAL = 1.10
LOADED_MAX_RATIO = 1.15  # under load, against the best fixed configuration under it
HIT_MAX_MS = 1.0  # the call to the plan on a cache hit: lookup and planning


# --------------------------------------------------------------------------- helpers


def geometric_mean(values: Iterable[Optional[float]]) -> Optional[float]:
    kept = [v for v in values if v is not None and v > 0]
    if not kept:
        return None
    return math.exp(sum(math.log(v) for v in kept) / len(kept))


def _entry(workload: Dict[str, Any], name: str) -> Optional[Dict[str, Any]]:
    return next((e for e in workload["runners"] if e["name"] == name), None)


def _plain(results: Dict[str, Any]) -> List[Dict[str, Any]]:
    """The workloads measured on the machine as it is (not the @loaded scenarios)."""
    return [w for w in results["workloads"] if not w.get("loaded")]


def _loaded(results: Dict[str, Any]) -> List[Dict[str, Any]]:
    return [w for w in results["workloads"] if w.get("loaded")]


def _shown(results: Dict[str, Any]) -> List[str]:
    present = {e["name"] for w in results["workloads"] for e in w["runners"]}
    return [name for name in SHOWN if name in present]


def _missing(entry: Optional[Dict[str, Any]]) -> List[str]:
    """What to pip install for a runner that was not measured because a package is not
    installed; [] for any other entry."""
    if entry is None or entry["status"] != NOT_INSTALLED:
        return []
    return list(entry.get("missing") or [])


def _status(entry: Dict[str, Any]) -> str:
    """A result that is not a time: 'n/a (pip install joblib)', FAIL, WRONG, TIMEOUT."""
    if entry["status"] == NOT_INSTALLED:
        return f"{NOT_INSTALLED} ({pip_command(_missing(entry))})"
    return entry["status"]


def _seconds(entry: Optional[Dict[str, Any]]) -> str:
    if entry is None:
        return "-"
    if entry["status"] != "ok":
        return _status(entry)
    return f"{entry['median_s']:.3f}"


def _ratio(value: Optional[float]) -> str:
    return "-" if value is None else f"{value:.2f}x"


def _plan_note(workload: Dict[str, Any], name: str) -> str:
    acc = workload.get("planning", {}).get(name)
    if not acc:
        return ""
    shape = acc["mode"] or "?"
    if acc["mode"] != "serial":
        shape += f" w{acc['n_workers']} c{acc['chunksize']}"
    return f"plan {shape}, est {acc['estimated_s']:.3f} s ({acc['ratio']:.2f}x measured)"


def _best_grid(workload: Dict[str, Any]) -> Optional[Dict[str, Any]]:
    grid = [e for e in workload["runners"] if e["grid"] and e["median_s"] is not None]
    return min(grid, key=lambda e: e["median_s"]) if grid else None


def load_range(results: Dict[str, Any]) -> str:
    """The 1-minute load average seen after each measurement: how noisy the machine was."""
    loads = [x for w in results["workloads"] for e in w["runners"] for x in e.get("load1", [])
             if x is not None]
    return f"{min(loads):.2f}-{max(loads):.2f}" if loads else "unknown"


def _oracle_text(workload: Dict[str, Any]) -> str:
    oracle = workload["oracle"]
    return "-" if oracle is None else f"{oracle['seconds']:.3f} ({oracle['name']})"


# --------------------------------------------------------------------------- goals


def evaluate_goals(results: Dict[str, Any]) -> List[Dict[str, Any]]:
    """The issues' figures, each with its measured value and whether it is met today
    ("met" is None for a figure that is only reported, and for a goal that was not
    measured).  A runner that failed, was wrong or timed out on a workload misses every
    goal there.  A goal is never met without every one of its comparisons: one that
    needs a runner or workload that was not measured (a package not installed, a peer
    that failed) is "not measured", unless what was measured already misses it.  The
    workload goals are about the machine as it is; the @loaded scenarios have their own.
    Each goal's ``verdict`` is the word the reports show."""
    plain = _plain(results)
    goals = []
    cold = _per_workload(plain, "adaptive_cold", "ratio_oracle")
    if cold:
        goals.append(_goal(f"adaptive_cold <= {COLD_MAX_RATIO}x the oracle on every workload",
                           cold, COLD_MAX_RATIO))
    warm = _per_workload(plain, "adaptive_warm", "ratio_oracle")
    if warm:
        goals.append(_geomean_goal("adaptive_warm", warm, WARM_MAX_GEOMEAN))
    if cold:
        goals.append(_geomean_goal("adaptive_cold", cold, None))
    for name in ("adaptive_cold", "adaptive_warm"):
        vs_serial = _per_workload(plain, name, "ratio_serial")
        if vs_serial:
            goals.append(_goal(f"{name} never slower than serial by more than "
                               f"{MAX_VS_SERIAL - 1:.0%}", vs_serial, MAX_VS_SERIAL))
    goals += _joblib_goals(plain)
    goals += _loaded_goals(_loaded(results))
    goals += _cache_goals(results["workloads"])
    reacted = results.get("reaction")
    if reacted:
        goals.append(_reaction_goal(reacted))
    for goal in goals:
        goal["verdict"] = _verdict(goal)
    return goals


@dataclass
class Compared:
    """A goal's comparisons, one per workload: ``values`` holds the measured ones (None
    where our runner itself failed: the goal is missed there); ``unmeasured`` says why
    there is none on a workload, and ``needs`` what to pip install to have it."""

    values: Dict[str, Optional[float]] = field(default_factory=dict)
    unmeasured: Dict[str, str] = field(default_factory=dict)
    needs: List[str] = field(default_factory=list)

    def skip(self, workload: str, why: str, needs: Iterable[str] = ()) -> None:
        self.unmeasured[workload] = why
        self.needs += [p for p in needs if p not in self.needs]

    def skip_entry(self, workload: str, entry: Dict[str, Any]) -> None:
        """No comparison on ``workload`` because ``entry``, a peer or a reference, has no
        time there (not installed, failed, timed out)."""
        missing = _missing(entry)
        why = f"needs {pip_command(missing)}" if missing else f"{entry['name']} {_status(entry)}"
        self.skip(workload, why, missing)

    def __bool__(self) -> bool:
        return bool(self.values or self.unmeasured)


def _settle(goal: Dict[str, Any], compared: Compared) -> Dict[str, Any]:
    """A goal is met only over every comparison it needs: with a comparison missing (or
    none at all) it is "not measured", unless what was measured already misses it."""
    if compared.unmeasured:
        goal["value"] += "; not measured on " + ", ".join(
            f"{name} ({why})" for name, why in compared.unmeasured.items())
    complete = compared.values and not compared.unmeasured
    if not complete and goal["met"] is not None and not goal["failing"]:
        goal.update(met=None, not_measured=True, needs=list(compared.needs))
    return goal


def _geomean_goal(runner: str, ratios: Compared, limit: Optional[float]) -> Dict[str, Any]:
    values = ratios.values
    failed = [name for name, v in values.items() if v is None]
    gm = None if failed else geometric_mean(values.values())
    text = f"{runner} / oracle as a geometric mean over the workloads"
    over = f" over {len(values)} of {len(values) + len(ratios.unmeasured)} workloads" \
        if ratios.unmeasured and gm is not None else ""
    goal: Dict[str, Any]
    if limit is None:  # reported, not a goal
        goal = {"goal": text, "value": _ratio(gm) + over, "met": None, "failing": failed}
    else:
        goal = {"goal": f"{text} <= {limit}x", "value": f"geometric mean {_ratio(gm)}{over}",
                "met": gm is not None and gm <= limit, "failing": failed}
    return _settle(goal, ratios)


def _joblib_goals(plain: List[Dict[str, Any]]) -> List[Dict[str, Any]]:
    goals = []
    vs_joblib = Compared()
    for w in plain:
        ours, joblib = _entry(w, "adaptive_cold"), _entry(w, "joblib")
        if ours is None or joblib is None:
            continue
        if ours["status"] == NOT_INSTALLED:
            vs_joblib.skip_entry(w["name"], ours)
        elif ours["median_s"] is None:
            vs_joblib.values[w["name"]] = None
        elif joblib["status"] == "TIMEOUT":
            # Ours finished within the limit that joblib ran past: ours is ahead.
            vs_joblib.values[w["name"]] = 0.0
        elif joblib["median_s"] is None:
            # Not installed, failed or wrong: no time of joblib's to compare with.
            vs_joblib.skip_entry(w["name"], joblib)
        else:
            vs_joblib.values[w["name"]] = ours["median_s"] / joblib["median_s"]
    if vs_joblib:
        goal = _goal("adaptive_cold ahead of joblib's auto batching on every workload "
                     "(seconds / joblib's < 1)", vs_joblib, 1.0, strict=True)
        n = len(vs_joblib.values)
        goal["value"] = f"ahead on {n - len(goal['failing'])}/{n}; {goal['value']}"
        goals.append(goal)
    return goals


def _loaded_goals(loaded: List[Dict[str, Any]]) -> List[Dict[str, Any]]:
    """Issue 5: with one CPU kept busy, within 1.15x of the best fixed configuration
    measured under the same load (the oracle of that scenario, named)."""
    goals = []
    for runner in ("adaptive_cold", "adaptive_warm"):
        ratios = _per_workload(loaded, runner, "ratio_oracle")
        if ratios:
            goal = _goal(f"under load (one CPU busy): {runner} <= {LOADED_MAX_RATIO}x the "
                         "best fixed configuration under the same load", ratios,
                         LOADED_MAX_RATIO)
            goal["value"] += "; best under load: " + ", ".join(
                f"{w['name']} {_oracle_text(w)}{_best_grid_text(w)}" for w in loaded)
            goals.append(goal)
    return goals


def _best_grid_text(workload: Dict[str, Any]) -> str:
    best = _best_grid(workload)
    return "" if best is None else f", best grid {best['name']} {best['median_s']:.3f}"


def hit_times_ms(entry: Dict[str, Any]) -> List[float]:
    """A runner's time from the call to the plan, in ms, on its cache hits: the lookup
    and the planning (``RunReport.sampling_s``, nothing sampled)."""
    return [1e3 * d["sampling_s"] for d in entry["details"]
            if d.get("from_cache") is True and isinstance(d.get("sampling_s"), (int, float))]


def _cache_goals(workloads: List[Dict[str, Any]]) -> List[Dict[str, Any]]:
    """Issue 4: a hit costs under 1 ms of lookup and planning, and the warm-cache runner
    samples nothing (every one of its runs a hit, with 0 items sampled)."""
    entries = {w["name"]: e for w in workloads if (e := _entry(w, "adaptive_warm")) is not None}
    if not entries:
        return []
    compared = Compared()
    for name, entry in entries.items():
        if entry["status"] == NOT_INSTALLED:
            compared.skip_entry(name, entry)
    warm = {name: e for name, e in entries.items() if name not in compared.unmeasured}
    hits = {name: hit_times_ms(entry) for name, entry in warm.items()}
    all_hits = [ms for values in hits.values() for ms in values]
    medians = {name: statistics.median(v) for name, v in hits.items() if v}
    compared.values = {name: medians.get(name) for name in warm}
    value = "no cache hit measured"
    if all_hits:
        slowest = max(medians, key=medians.__getitem__)
        value = (f"median {statistics.median(all_hits):.2f} ms over {len(all_hits)} hits; "
                 f"slowest workload {medians[slowest]:.2f} ms ({slowest})")
    again = _ms(d.get("plan_again_s") for e in warm.values() for d in e["details"])
    if again:
        value += (f"; the same plan again in the same process: median "
                  f"{statistics.median(again):.2f} ms")
    goals = [_settle({
        "goal": f"lookup and planning on a cache hit under {HIT_MAX_MS:g} ms median "
                "(adaptive_warm, from the call to the plan)",
        "value": value,
        "met": bool(all_hits) and statistics.median(all_hits) < HIT_MAX_MS,
        "failing": [name for name in hits if medians.get(name, HIT_MAX_MS) >= HIT_MAX_MS]},
        compared)]
    clean = {name: [d.get("from_cache") is True and d.get("n_sampled") == 0
                    for d in entry["details"]] for name, entry in warm.items()}
    n_runs = sum(len(v) for v in clean.values())
    goals.append(_settle({
        "goal": "adaptive_warm spends no time sampling (every run a cache hit, 0 items "
                "sampled)",
        "value": f"{sum(sum(v) for v in clean.values())}/{n_runs} runs",
        "met": n_runs > 0 and all(all(v) for v in clean.values()),
        "failing": [name for name, v in clean.items() if not v or not all(v)]}, compared))
    return goals


def _reaction_goal(reacted: Dict[str, Any]) -> Dict[str, Any]:
    """Issue 5: the worker count reacts to a load change within 1 s."""
    limit, n = reacted["goal_s"], reacted["n_runs"]
    drop, rise = reacted["drop_s"], reacted["rise_s"]
    value = (f"median {_secs(drop)} from the load's start to the first drop in active "
             f"workers ({reacted['n_drops']}/{n} runs saw one), {_secs(rise)} from its end "
             f"to the next rise ({reacted['n_rises']}/{n})")
    failing = [what for what, v, seen in (("drop", drop, reacted["n_drops"]),
                                          ("rise", rise, reacted["n_rises"]))
               if v is None or v > limit or seen < n]
    return {"goal": f"the worker count reacts to a load change within {limit:g} s",
            "value": value, "met": bool(n) and not failing, "failing": failing}


def _secs(value: Optional[float]) -> str:
    return "-" if value is None else f"{value:.2f} s"


def _per_workload(workloads: List[Dict[str, Any]], runner: str, key: str) -> Compared:
    """{workload: ratio}, None where the runner did not produce a checked time; no
    comparison where the runner was not measured (not installed) or where the ratio's
    reference (the oracle, serial) has no time."""
    out = Compared()
    for w in workloads:
        entry = _entry(w, runner)
        if entry is None:
            continue
        if entry["status"] == NOT_INSTALLED:
            out.skip_entry(w["name"], entry)
        elif entry["status"] != "ok":
            out.values[w["name"]] = None
        elif entry[key] is not None:
            out.values[w["name"]] = entry[key]
        else:  # ok, but its reference has no time here
            reference = "oracle" if key == "ratio_oracle" else "serial"
            serial = _entry(w, "serial")
            if reference == "serial" and serial is not None:
                out.skip_entry(w["name"], serial)
            else:
                out.skip(w["name"], f"no {reference} time")
    return out


def _goal(text: str, values: Compared, limit: float, strict: bool = False) -> Dict[str, Any]:
    """A goal over every comparison: met when each is within ``limit``; over zero
    comparisons, or with one missing, never met (see ``_settle``)."""
    def ok(v: Optional[float]) -> bool:
        return v is not None and (v < limit if strict else v <= limit)

    failing = [name for name, v in values.values.items() if not ok(v)]
    measured = [(v, name) for name, v in values.values.items() if v is not None]
    worst = f"worst {_ratio(max(measured)[0])} on {max(measured)[1]}" if measured \
        else "no comparison"
    broken = [name for name, v in values.values.items() if v is None]
    if broken:
        worst += f"; no checked time on {', '.join(broken)}"
    return _settle({"goal": text, "value": worst, "met": not failing, "failing": failing},
                   values)


# --------------------------------------------------------------------------- text


def _table(header: Sequence[str], rows: List[Sequence[str]], align: str = "") -> List[str]:
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    align = align or "l" + "r" * (len(header) - 1)

    def fmt(row: Sequence[str]) -> str:
        cells = [str(c).ljust(w) if a == "l" else str(c).rjust(w)
                 for c, w, a in zip(row, widths, align)]
        return "  ".join(cells).rstrip()

    return [fmt(header), "  ".join("-" * w for w in widths), *[fmt(r) for r in rows]]


def render_text(results: Dict[str, Any]) -> str:
    meta = results["meta"]
    lines = [f"adaptive_exec benchmarks ({'quick' if meta['quick'] else 'full'}, median of "
             f"up to {meta['repeats']} runs, each a fresh process) on {machine.one_line(meta)}",
             f"started {meta['started']}, took {meta['wall_s']:.0f} s; 1-min load average "
             f"{meta['load_before'][0]:.2f} before, {load_range(results)} during "
             "(own runs included)", ""]
    for w in results["workloads"]:
        lines.append(f"{w['name']}: {w['description']} ({w['n_items']} items, loop by "
                     f"construction ~{w['nominal_serial_s']:.2f} s)")
        rows = []
        for e in [_entry(w, n) for n in _shown(results)] + [_best_grid(w)]:
            if e is None:
                continue
            name = e["name"] if not e["grid"] else f"best grid: {e['name']}"
            rows.append([name, _seconds(e), _ratio(e["ratio_oracle"]),
                         _ratio(e["ratio_serial"]), str(e["n_runs"]),
                         _plan_note(w, e["name"]) or _short(e.get("message"))])
        lines += ["  " + line for line in _table(
            ["runner", "seconds", "x oracle", "x serial", "runs", "note"], rows, "lrrrrl")]
        lines += [f"  oracle: {_oracle_text(w)}", ""]
    lines += _summary_text(results)
    return "\n".join(lines)


def _short(text: Optional[str], n: int = 70) -> str:
    if not text:
        return ""
    text = " ".join(text.split())
    return text if len(text) <= n else text[: n - 3] + "..."


def _summary_text(results: Dict[str, Any]) -> List[str]:
    shown = _shown(results)
    rows = []
    for w in results["workloads"]:
        cells = []
        for name in shown:
            e = _entry(w, name)
            cells.append("-" if e is None else _status(e) if e["status"] != "ok"
                         else _ratio(e["ratio_oracle"]))
        rows.append([w["name"], *cells, _oracle_text(w)])
    lines = ["Ratio to the oracle (median seconds / oracle's; lower is better, 1.00x = as good "
             "as the best fixed configuration):"]
    lines += _table(["workload", *shown, "oracle s (config)"], rows,
                    "l" + "r" * len(shown) + "l")
    lines += ["", "Planning accuracy (plan's estimate of the run / measured median) and cost: "
                  "to plan ms, from the call to the plan (on a cache hit: lookup and planning, "
                  "first-use costs of a fresh process included); again ms, the same plan once "
                  "more after the run, in the same process:"]
    lines += _table(PLAN_HEADER, _plan_rows(results), "llllrrrrrrlr")
    if results.get("reaction"):
        lines += ["", *_reaction_text(results["reaction"])]
    lines += ["", "Goals (reported as they are today):"]
    for g in evaluate_goals(results):
        failing = f"; {_failing(g)}" if g["failing"] else ""
        verdict = _verdict(g)
        # "NOT MEASURED (needs: pip install joblib)": the command as it is typed.
        head, sep, tail = verdict.partition(" (")
        tag = head.upper() + sep + tail
        lines.append(f"  [{tag}] {g['goal']}: {g['value']}{failing}")
    return lines


def _verdict(goal: Dict[str, Any]) -> str:
    """'met', 'not met', 'figure' (reported only) or 'not measured (needs: pip install
    joblib)' (a comparison it needs is missing: never 'met')."""
    if goal.get("not_measured"):
        needs = goal.get("needs") or []
        return f"not measured (needs: {pip_command(needs)})" if needs else "not measured"
    return "figure" if goal["met"] is None else "met" if goal["met"] else "not met"


def _failing(goal: Dict[str, Any]) -> str:
    where = ", ".join(goal["failing"])
    return f"no checked ratio on {where}" if goal["met"] is None else f"not met on {where}"


PLAN_HEADER = ["workload", "runner", "mode", "workers", "chunk", "estimated s", "measured s",
               "est/measured", "to plan ms", "sampled", "cache", "again ms"]


def _plan_rows(results: Dict[str, Any]) -> List[List[str]]:
    """Per adaptive runner: the plan against the run, and what planning cost (median ms
    from the call to the plan, items sampled, cache hits) over its runs."""
    rows = []
    for w in results["workloads"]:
        for name, acc in w.get("planning", {}).items():
            if not acc:
                entry = _entry(w, name)
                why = _status(entry) if entry is not None and _missing(entry) else "no plan"
                rows.append([w["name"], name, "-", "-", "-", "-", "-", why, "-", "-", "-", "-"])
                continue
            to_plan = _ms(acc.get("sampling_s", []))
            again = _ms(acc.get("plan_again_s", []))
            sampled = sorted({n for n in acc.get("n_sampled", []) if n is not None})
            hits = acc.get("from_cache", [])
            cache = "-" if not hits else "hit" if all(hits) else \
                "miss" if not any(hits) else f"{sum(map(bool, hits))}/{len(hits)} hits"
            rows.append([w["name"], name, str(acc["mode"]), str(acc["n_workers"]),
                         str(acc["chunksize"]), f"{acc['estimated_s']:.3f}",
                         f"{acc['measured_s']:.3f}", _ratio(acc["ratio"]),
                         f"{statistics.median(to_plan):.2f}" if to_plan else "-",
                         "-" if not sampled else str(sampled[0]) if len(sampled) == 1
                         else f"{sampled[0]}-{sampled[-1]}", cache,
                         f"{statistics.median(again):.2f}" if again else "-"])
    return rows


def _ms(seconds: Iterable[Optional[float]]) -> List[float]:
    return [1e3 * s for s in seconds if isinstance(s, (int, float))]


def _reaction_rows(reacted: Dict[str, Any]) -> List[List[str]]:
    rows = []
    for k, run in enumerate(reacted["runs"], 1):
        d, delays = run.get("details") or {}, run["delays"]
        rows.append([str(k), run["status"], _secs(run.get("seconds")), _secs(d.get("load_on")),
                     _secs(d.get("load_off")), _secs(delays["drop_s"]), _secs(delays["rise_s"]),
                     "-" if d.get("offset_s") is None else f"{1e3 * d['offset_s']:.2f} ms",
                     "-" if run.get("load1") is None else f"{run['load1']:.2f}",
                     delays["note"] or _short(run.get("message"))])
    return rows


REACTION_HEADER = ["run", "status", "map", "load on", "load off", "drop after", "rise after",
                   "timeline offset", "load avg", "note"]


def _reaction_summary(reacted: Dict[str, Any]) -> str:
    n = reacted["n_runs"]
    return (f"median delay from the load's start to the first drop in active workers "
            f"{_secs(reacted['drop_s'])} ({reacted['n_drops']}/{n} runs saw one); from its "
            f"end to the next rise {_secs(reacted['rise_s'])} ({reacted['n_rises']}/{n})")


def _reaction_text(reacted: Dict[str, Any]) -> List[str]:
    lines = [f"Reaction to a load change: {reacted['description']}. Times since the map's "
             "call; the timeline's own clock starts later by its offset (the call to the "
             "plan), subtracted. Load avg: the 1-minute load average after the run (other "
             "processes lower the workers before the busy one starts).", ""]
    lines += ["  " + line for line in _table(REACTION_HEADER, _reaction_rows(reacted),
                                             "llrrrrrrrl")]
    return [*lines, "  " + _reaction_summary(reacted)]


# --------------------------------------------------------------------------- markdown


def _md_table(header: Sequence[str], rows: List[Sequence[str]]) -> List[str]:
    def fmt(row: Sequence[str]) -> str:
        return "| " + " | ".join(str(c).replace("|", "\\|") for c in row) + " |"

    return [fmt(header), "|" + "---|" * len(header), *[fmt(r) for r in rows]]


def render_markdown(results: Dict[str, Any]) -> str:
    meta = results["meta"]
    shown = _shown(results)
    out = [
        "# adaptive_exec benchmarks", "",
        f"Machine: {machine.one_line(meta)}. Run {meta['started']}"
        f" ({'--quick' if meta['quick'] else 'full'}, median of up to {meta['repeats']} runs,"
        f" each in a fresh process, pool start-up included; took {meta['wall_s']:.0f} s;"
        f" 1-min load average {meta['load_before'][0]:.2f} before, {load_range(results)}"
        f" during, own runs included). Commit {meta.get('git_commit') or 'unknown'}.", "",
        "Seconds (ratio to the oracle). The oracle is the best of every runner that is not"
        " adaptive_exec and of a grid of fixed (pool kind, workers, chunk size)"
        " configurations; its configuration is named.", "",
    ]
    rows = []
    for w in results["workloads"]:
        cells = []
        for name in shown:
            e = _entry(w, name)
            cells.append("-" if e is None else _status(e) if e["status"] != "ok"
                         else f"{e['median_s']:.3f} ({_ratio(e['ratio_oracle'])})")
        rows.append([w["name"], *cells, _oracle_text(w)])
    out += _md_table(["workload", *shown, "oracle"], rows)
    out += ["", "## Goals", ""]
    for g in evaluate_goals(results):
        failing = f" ({_failing(g)})" if g["failing"] else ""
        out.append(f"- **{_verdict(g)}**: {g['goal']}: {g['value']}{failing}")
    out += ["", "## Planning accuracy and cost", "",
            "The plan's estimate against the measured median; *to plan ms*: median time from "
            "the call to the plan (on a cache hit: lookup and planning alone, with a fresh "
            "process's first-use costs); *sampled*: items run to measure the function; "
            "*again ms*: `plan()` of the same items once more after the run, in the same "
            "process (a hit, first-use costs paid).", ""]
    out += _md_table(PLAN_HEADER, _plan_rows(results))
    reacted = results.get("reaction")
    if reacted:
        out += ["", "## Reaction to a load change", "",
                f"{reacted['description']}. Times since the map's call; the timeline's own "
                "clock starts later by its offset (the call to the plan), subtracted. *Load "
                "avg*: the 1-minute load average after the run (other processes lower the "
                "workers before the busy one starts).", ""]
        out += _md_table(REACTION_HEADER, _reaction_rows(reacted))
        summary = _reaction_summary(reacted)
        out += ["", summary[0].upper() + summary[1:] + "."]
    out += ["", "## Every configuration", ""]
    for w in results["workloads"]:
        out += [f"### {w['name']}", "", f"{w['description']}; {w['n_items']} items.", ""]
        rows = [[e["name"], _seconds(e), _ratio(e["ratio_oracle"]), _ratio(e["ratio_serial"]),
                 str(e["n_runs"]), _plan_note(w, e["name"]) or _short(e.get("message"), 100)]
                for e in w["runners"]]
        out += _md_table(["runner", "seconds", "x oracle", "x serial", "runs", "note"], rows)
        out.append("")
    return "\n".join(out)


# --------------------------------------------------------------------------- chart


# Ratios the chart's y axis may be labelled with (log scale): plain "2x", never 10^0.
CHART_TICKS = (0.25, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 5.0, 10.0, 20.0, 50.0, 100.0, 200.0,
               500.0, 1000.0)
NO_CHART = ('no chart (results.png): matplotlib is not installed; pip install matplotlib, '
            'or every peer and the chart: pip install -e ".[bench]"')


def write_png(results: Dict[str, Any], path: Path) -> Optional[str]:
    """A grouped bar chart of ratios to the oracle; returns why not, if it cannot."""
    if importlib.util.find_spec("matplotlib") is None:
        return NO_CHART
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from matplotlib.lines import Line2D
        from matplotlib.patches import Patch
        from matplotlib.ticker import FixedLocator, FuncFormatter, NullLocator
    except Exception as exc:  # installed, yet broken: the run's other files stand
        return f"no chart (results.png): matplotlib failed to import: {exc}"
    shown = _shown(results)
    names = [w["name"] for w in results["workloads"]]
    fig, ax = plt.subplots(figsize=(max(8.0, 0.9 * len(names) + 4), 5.5))
    width = 0.8 / max(1, len(shown))
    ratios = [e["ratio_oracle"] for w in results["workloads"] for e in w["runners"]
              if e["name"] in shown and e["ratio_oracle"]]
    bottom = min([0.5, *(0.8 * r for r in ratios)])
    top = max([2.0, *(1.3 * r for r in ratios)])
    handles: List[Any] = []
    for k, runner in enumerate(shown):
        offset = (k - (len(shown) - 1) / 2) * width
        xs, ys = [], []
        for i, w in enumerate(results["workloads"]):
            e = _entry(w, runner)
            if e is not None and e["ratio_oracle"] is not None:
                xs.append(i + offset)
                ys.append(e["ratio_oracle"])
        # A fixed colour per runner, and a legend made of them: one without any bar
        # (not installed, failed everywhere) keeps its own colour there.
        style = {"facecolor": f"C{k % 10}",
                 "edgecolor": "black" if runner.startswith("adaptive") else "none"}
        ax.bar(xs, ys, width, **style)
        handles.append(Patch(label=runner, **style))
        for i, w in enumerate(results["workloads"]):
            e = _entry(w, runner)
            if e is not None and e["status"] != "ok":  # no bar: say why, at its foot
                ax.text(i + offset, bottom * 1.05, e["status"], rotation=90, fontsize=6,
                        ha="center", va="bottom")
    ax.axhline(1.0, color="black", linewidth=0.8)
    ax.axhline(COLD_MAX_RATIO, color="red", linewidth=0.8, linestyle="--")
    handles.append(Line2D([], [], color="red", linewidth=0.8, linestyle="--",
                          label=f"goal {COLD_MAX_RATIO}x"))
    ax.set_yscale("log")
    ax.set_ylim(bottom, top)
    # Plain labels on a few round ratios; no minor labels, no offset, no 10^k.
    ax.yaxis.set_major_locator(FixedLocator([t for t in CHART_TICKS if bottom <= t <= top]))
    ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}x"))
    ax.yaxis.set_minor_locator(NullLocator())
    ax.set_xticks(range(len(names)))
    ax.set_xticklabels(names, rotation=30, ha="right", rotation_mode="anchor")
    ax.set_xlim(-0.6, len(names) - 0.4)
    ax.set_ylabel("seconds / oracle's (log scale; lower is better)")
    ax.set_title(f"adaptive_exec vs peers on {results['meta']['usable_cpus']} CPUs\n"
                 "(no bar: failed, wrong, timed out, or n/a: not installed)", fontsize=10)
    # Outside the plot area, right of it: no bar is ever under the legend.
    ax.legend(handles=handles, fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0),
              borderaxespad=0.0, frameon=False)
    fig.tight_layout()
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return None


# --------------------------------------------------------------------------- all of it


def write_all(results: Dict[str, Any], out_dir: Path) -> Dict[str, Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    results = {**results, "goals": evaluate_goals(results)}
    paths = {name: out_dir / name for name in
             ("results.json", "results.md", "results.txt", "results.png")}
    paths["results.json"].write_text(json.dumps(results, indent=1, default=str))
    paths["results.md"].write_text(render_markdown(results) + "\n")
    paths["results.txt"].write_text(render_text(results) + "\n")
    problem = write_png(results, paths["results.png"])
    if problem is not None:
        print(problem, file=sys.stderr)  # one line: why, and how to get it
        del paths["results.png"]
    return paths


def main(argv: List[str]) -> int:
    results = json.loads(Path(argv[0]).read_text())
    print(render_text(results))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
