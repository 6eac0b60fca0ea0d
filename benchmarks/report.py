"""Reports of one suite run: the table on stdout, results.json, results.md, results.png.

Everything here reads only the results dict (results.json's content), so a report can be
rebuilt from a saved run: ``python -m benchmarks.report bench-results/results.json``.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path
from typing import Any, Dict, Iterable, List, Optional, Sequence

from benchmarks import machine

# The runners shown as columns, in this order (the grid is summed up by the oracle).
SHOWN = ("serial", "adaptive_cold", "adaptive_warm", "joblib", "mp_pool", "process_pool",
         "loky", "threads")

# The project's goals (the "Figures").
COLD_MAX_RATIO = 1.15
WARM_MAX_GEOMEAN = 1.05
MAX_VS_SERIAL = 1.10


# --------------------------------------------------------------------------- helpers


def geometric_mean(values: Iterable[Optional[float]]) -> Optional[float]:
    kept = [v for v in values if v is not None and v > 0]
    if not kept:
        return None
    return math.exp(sum(math.log(v) for v in kept) / len(kept))


def _entry(workload: Dict[str, Any], name: str) -> Optional[Dict[str, Any]]:
    return next((e for e in workload["runners"] if e["name"] == name), None)


def _shown(results: Dict[str, Any]) -> List[str]:
    present = {e["name"] for w in results["workloads"] for e in w["runners"]}
    return [name for name in SHOWN if name in present]


def _seconds(entry: Optional[Dict[str, Any]]) -> str:
    if entry is None:
        return "-"
    if entry["status"] != "ok":
        return entry["status"]
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
    """The issue's figures, each with its measured value and whether it is met today.
    A runner that failed, was wrong or timed out on a workload misses every goal there."""
    goals = []
    cold = _per_workload(results, "adaptive_cold", "ratio_oracle")
    if cold:
        goals.append(_goal(f"adaptive_cold <= {COLD_MAX_RATIO}x the oracle on every workload",
                           cold, COLD_MAX_RATIO))
    warm = _per_workload(results, "adaptive_warm", "ratio_oracle")
    if warm:
        failed = [name for name, v in warm.items() if v is None]
        gm = None if failed else geometric_mean(warm.values())
        goals.append({"goal": f"adaptive_warm <= {WARM_MAX_GEOMEAN}x the oracle as a geometric"
                              " mean", "value": f"geometric mean {_ratio(gm)}",
                      "met": gm is not None and gm <= WARM_MAX_GEOMEAN, "failing": failed})
    for name in ("adaptive_cold", "adaptive_warm"):
        vs_serial = _per_workload(results, name, "ratio_serial")
        if vs_serial:
            goals.append(_goal(f"{name} never slower than serial by more than "
                               f"{MAX_VS_SERIAL - 1:.0%}", vs_serial, MAX_VS_SERIAL))
    vs_joblib: Dict[str, Optional[float]] = {}
    for w in results["workloads"]:
        ours, joblib = _entry(w, "adaptive_cold"), _entry(w, "joblib")
        if ours is None or joblib is None:
            continue
        if ours["median_s"] is None:
            vs_joblib[w["name"]] = None
        elif joblib["median_s"] is None:
            vs_joblib[w["name"]] = 0.0  # joblib failed or timed out: ours is ahead
        else:
            vs_joblib[w["name"]] = ours["median_s"] / joblib["median_s"]
    if vs_joblib:
        goal = _goal("adaptive_cold ahead of joblib's auto batching on every workload "
                     "(seconds / joblib's < 1)", vs_joblib, 1.0, strict=True)
        goal["value"] = f"ahead on {len(vs_joblib) - len(goal['failing'])}/{len(vs_joblib)}; " \
                        + goal["value"]
        goals.append(goal)
    return goals


def _per_workload(results: Dict[str, Any], runner: str, key: str) -> Dict[str, Optional[float]]:
    """{workload: ratio}, None where the runner did not produce a checked time."""
    out: Dict[str, Optional[float]] = {}
    for w in results["workloads"]:
        entry = _entry(w, runner)
        if entry is not None:
            out[w["name"]] = entry[key] if entry["status"] == "ok" else None
    return out


def _goal(text: str, values: Dict[str, Optional[float]], limit: float,
          strict: bool = False) -> Dict[str, Any]:
    def ok(v: Optional[float]) -> bool:
        return v is not None and (v < limit if strict else v <= limit)

    failing = [name for name, v in values.items() if not ok(v)]
    measured = [(v, name) for name, v in values.items() if v is not None]
    worst = f"worst {_ratio(max(measured)[0])} on {max(measured)[1]}" if measured else "no data"
    broken = [name for name, v in values.items() if v is None]
    if broken:
        worst += f"; no checked time on {', '.join(broken)}"
    return {"goal": text, "value": worst, "met": not failing, "failing": failing}


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
            cells.append("-" if e is None else e["status"] if e["status"] != "ok"
                         else _ratio(e["ratio_oracle"]))
        rows.append([w["name"], *cells, _oracle_text(w)])
    lines = ["Ratio to the oracle (median seconds / oracle's; lower is better, 1.00x = as good "
             "as the best fixed configuration):"]
    lines += _table(["workload", *shown, "oracle s (config)"], rows,
                    "l" + "r" * len(shown) + "l")
    lines += ["", "Planning accuracy (plan's estimate of the run / measured median):"]
    plan_rows = []
    for w in results["workloads"]:
        for name, acc in w.get("planning", {}).items():
            if acc:
                plan_rows.append([w["name"], name, str(acc["mode"]), str(acc["n_workers"]),
                                  str(acc["chunksize"]), f"{acc['estimated_s']:.3f}",
                                  f"{acc['measured_s']:.3f}", _ratio(acc["ratio"])])
            else:
                plan_rows.append([w["name"], name, "-", "-", "-", "-", "-", "no plan"])
    lines += _table(["workload", "runner", "mode", "workers", "chunk", "estimated s",
                     "measured s", "est/measured"], plan_rows, "llllrrrr")
    lines += ["", "Goals (reported as they are today):"]
    for g in evaluate_goals(results):
        failing = f"; not met on {', '.join(g['failing'])}" if g["failing"] else ""
        lines.append(f"  [{'met' if g['met'] else 'NOT MET'}] {g['goal']}: {g['value']}"
                     f"{failing}")
    return lines


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
            cells.append("-" if e is None else e["status"] if e["status"] != "ok"
                         else f"{e['median_s']:.3f} ({_ratio(e['ratio_oracle'])})")
        rows.append([w["name"], *cells, _oracle_text(w)])
    out += _md_table(["workload", *shown, "oracle"], rows)
    out += ["", "## Goals", ""]
    for g in evaluate_goals(results):
        failing = f" (not met on {', '.join(g['failing'])})" if g["failing"] else ""
        out.append(f"- **{'met' if g['met'] else 'not met'}**: {g['goal']}: {g['value']}"
                   f"{failing}")
    out += ["", "## Planning accuracy", ""]
    plan_rows = [[w["name"], name, str(a["mode"]), str(a["n_workers"]), str(a["chunksize"]),
                  f"{a['estimated_s']:.3f}", f"{a['measured_s']:.3f}", _ratio(a["ratio"])]
                 for w in results["workloads"] for name, a in w.get("planning", {}).items()
                 if a]
    out += _md_table(["workload", "runner", "mode", "workers", "chunk", "estimated s",
                      "measured s", "estimate / measured"], plan_rows)
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


def write_png(results: Dict[str, Any], path: Path) -> Optional[str]:
    """A grouped bar chart of ratios to the oracle; returns why not, if it cannot."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib is not installed (pip install adaptive_exec[plot])"
    shown = _shown(results)
    names = [w["name"] for w in results["workloads"]]
    fig, ax = plt.subplots(figsize=(max(8.0, 1.3 * len(names) + 3), 5))
    width = 0.8 / max(1, len(shown))
    for k, runner in enumerate(shown):
        xs, ys = [], []
        for i, w in enumerate(results["workloads"]):
            e = _entry(w, runner)
            if e is not None and e["ratio_oracle"] is not None:
                xs.append(i + (k - (len(shown) - 1) / 2) * width)
                ys.append(e["ratio_oracle"])
        ax.bar(xs, ys, width, label=runner,
               edgecolor="black" if runner.startswith("adaptive") else None)
        for i, w in enumerate(results["workloads"]):
            e = _entry(w, runner)
            if e is not None and e["status"] != "ok":
                ax.text(i + (k - (len(shown) - 1) / 2) * width, 1.0, e["status"],
                        rotation=90, fontsize=6, ha="center", va="bottom")
    ax.axhline(1.0, color="black", linewidth=0.8)
    ax.axhline(COLD_MAX_RATIO, color="red", linewidth=0.8, linestyle="--",
               label=f"goal {COLD_MAX_RATIO}x")
    ax.set_yscale("log")
    ax.set_ylim(bottom=0.5)
    ax.set_xticks(range(len(names)))
    ax.set_xticklabels(names, rotation=20)
    ax.set_ylabel("seconds / oracle's (log; lower is better)")
    ax.set_title(f"adaptive_exec vs peers on {results['meta']['usable_cpus']} CPUs "
                 "(missing bar: failed, wrong or timed out)")
    ax.legend(fontsize=8, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
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
        print(f"no chart: {problem}", file=sys.stderr)
        del paths["results.png"]
    return paths


def main(argv: List[str]) -> int:
    results = json.loads(Path(argv[0]).read_text())
    print(render_text(results))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
