"""python -m benchmarks [--quick] [--only NAMES] [--runners NAMES] [--repeats N] [--out DIR]

Progress goes to stderr, one line per measurement; the table goes to stdout; results.json,
results.md, results.txt and results.png go to --out.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import List, Optional

from benchmarks import harness, report, runners, workloads


def _names(text: str, known: List[str], what: str) -> List[str]:
    names = [n.strip() for n in text.split(",") if n.strip()]
    unknown = [n for n in names if n not in known]
    if unknown:
        msg = f"unknown {what}: {', '.join(unknown)} (known: {', '.join(known)})"
        raise argparse.ArgumentTypeError(msg)
    return names


def parse_args(argv: Optional[List[str]]) -> argparse.Namespace:
    known_workloads = list(workloads.WORKLOADS)
    known_runners = [*runners.NAMED_BY_NAME, "oracle"]
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks",
        description="Measure adaptive_exec against serial, joblib, multiprocessing, "
                    "concurrent.futures, loky and the best fixed configuration.")
    parser.add_argument("--quick", action="store_true",
                        help="smaller grid, fewer items and repeats (~3 min on 2 cores)")
    parser.add_argument("--only", metavar="NAMES", default=",".join(known_workloads),
                        type=lambda t: _names(t, known_workloads, "workload"),
                        help=f"comma-separated workloads (default all: "
                             f"{', '.join(known_workloads)})")
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
