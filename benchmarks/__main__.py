"""python -m benchmarks [--quick] [--only NAMES] [--loaded] [--runners NAMES] [--repeats N]
                       [--out DIR]

Progress goes to stderr, one line per measurement; the table goes to stdout; results.json,
results.md, results.txt and results.png go to --out.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import List, Optional

from benchmarks import harness, report, runners


def _names(text: str, known: List[str], what: str) -> List[str]:
    names = [n.strip() for n in text.split(",") if n.strip()]
    unknown = [n for n in names if n not in known]
    if unknown:
        msg = f"unknown {what}: {', '.join(unknown)} (known: {', '.join(known)})"
        raise argparse.ArgumentTypeError(msg)
    return names


def _with_loaded(names: List[str]) -> List[str]:
    """--loaded: each selected workload also under load, and the reaction time."""
    out = list(names)
    for name in names:
        workload, loaded = harness.split_scenario(name)
        if not loaded and name != harness.REACTION and workload + harness.LOADED not in out:
            out.append(workload + harness.LOADED)
    if harness.REACTION not in out:
        out.append(harness.REACTION)
    return out


def parse_args(argv: Optional[List[str]]) -> argparse.Namespace:
    known_scenarios = harness.all_scenarios()
    known_runners = [*runners.NAMED_BY_NAME, "oracle"]
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks",
        description="Measure adaptive_exec against serial, joblib, multiprocessing, "
                    "concurrent.futures, loky and the best fixed configuration.")
    parser.add_argument("--quick", action="store_true",
                        help="smaller grid, fewer items and repeats (~3 min on 2 cores)")
    parser.add_argument("--only", metavar="NAMES", default=",".join(harness.DEFAULT_SCENARIOS),
                        type=lambda t: _names(t, known_scenarios, "scenario"),
                        help="comma-separated scenarios: a workload (NAME), a workload with "
                             f"one CPU kept busy by another process (NAME{harness.LOADED}), "
                             f"'{harness.REACTION}' (how soon the worker count follows a load "
                             f"change); default: {', '.join(harness.DEFAULT_SCENARIOS)}")
    parser.add_argument("--loaded", action="store_true",
                        help=f"add NAME{harness.LOADED} for every selected workload, and "
                             f"'{harness.REACTION}'")
    parser.add_argument("--runners", metavar="NAMES", default=",".join(known_runners),
                        type=lambda t: _names(t, known_runners, "runner"),
                        help=f"comma-separated runners; 'oracle' is the grid of fixed "
                             f"configurations (default all: {', '.join(known_runners)})")
    parser.add_argument("--repeats", type=int, default=None, metavar="N",
                        help=f"runs per configuration, median kept (default "
                             f"{harness.DEFAULT_REPEATS_FULL}, "
                             f"{harness.DEFAULT_REPEATS_QUICK} with --quick)")
    parser.add_argument("--out", type=Path, default=Path("bench-results"), metavar="DIR",
                        help="where results.json, .md, .txt and .png go (default "
                             "bench-results)")
    args = parser.parse_args(argv)
    if args.repeats is not None and args.repeats < 1:
        parser.error("--repeats must be at least 1")
    if args.loaded:
        args.only = _with_loaded(args.only)
    return args


def main(argv: Optional[List[str]] = None) -> int:
    args = parse_args(argv)
    options = harness.Options(quick=args.quick, workloads=args.only, runners=args.runners,
                              repeats=args.repeats, progress=sys.stderr)
    started = time.perf_counter()
    results = harness.run_suite(options)
    paths = report.write_all(results, args.out)
    print(report.render_text(results))
    print(f"\nwrote {', '.join(str(p) for p in paths.values())} "
          f"({time.perf_counter() - started:.0f} s in all)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
