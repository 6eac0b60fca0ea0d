"""python -m adaptive_exec demo | calibrate | cache ...: the arguments, and the demo's and
calibration's reports (what ``cache list|show|stats`` prints is ``cache_views``'s)."""

from __future__ import annotations

import argparse
import sys
import time
from typing import Callable, Optional

from . import api, calibration
from .api import ParallelFunction
from .demo_workloads import DEMOS


def _demo(args: argparse.Namespace) -> int:
    print("adaptive_exec demo: each workload runs as a plain loop, then through "
          "adaptive_map, and the results are compared.\n")
    for name, func, make_items, blurb in DEMOS:
        if args.only and name not in args.only:
            continue
        items = make_items(args.scale)
        # Short workloads are timed best of three, alternating, so that neither side is
        # charged for the first growth of the heap; long ones once (pool start-up counts).
        # Each timed result is freed before the other side runs: a 300k-item list still
        # alive makes the next one allocate fresh memory, a 20% handicap on tiny.
        expected = [func(x) for x in items]  # untimed, alive during both timings alike
        loop_s = ours_s = float("inf")
        same = True
        for _ in range(3):
            t0 = time.perf_counter()
            timed = [func(x) for x in items]
            loop_s = min(loop_s, time.perf_counter() - t0)
            del timed
            pf = ParallelFunction(func)
            t0 = time.perf_counter()
            got = pf.map(items)
            ours_s = min(ours_s, time.perf_counter() - t0)
            same = same and got == expected
            del got
            if loop_s > 0.2:
                break
        report = pf.last_report
        assert report is not None
        plan = report.plan
        status = "same results" if same else "RESULTS DIFFER"
        print(f"== {name}: {blurb}")
        print(f"   plan:    {plan.mode}, {plan.n_workers} worker(s), chunks of {plan.chunksize}")
        print(f"   why:     {plan.reason}")
        print(f"   loop {loop_s:.3f} s, adaptive_exec {ours_s:.3f} s: "
              f"speedup {loop_s / ours_s:.2f}x ({status})\n")
        if not same:
            return 1
    print(f"calibration: {calibration.get()}")
    return 0


def _calibrate(args: argparse.Namespace) -> int:
    c = api.calibrate(args.workers)
    print(f"worker start-up:   {c.worker_startup_s * 1e3:.1f} ms for {c.n_workers} workers")
    print(f"per-task overhead: {c.task_overhead_s * 1e6:.1f} µs")
    print(f"per-byte cost:     {c.byte_cost_s * 1e9:.3f} ns ({1 / c.byte_cost_s / 1e9:.2f} GB/s)")
    print(f"source:            {c.source}")
    return 0


def _cache(args: argparse.Namespace) -> int:
    from . import cache as store
    from . import cache_views as views

    action, target = args.action, args.target
    if action == "show" and not target:
        print("cache show needs a function name or a fingerprint (see: cache list)",
              file=sys.stderr)
        return 2
    if target and action != "show":
        print(f"cache {action} takes no argument (got {target!r})", file=sys.stderr)
        return 2
    if action == "path":
        print(store.path())
        return 0
    try:
        if action == "clear":
            n = store.clear()
            print(f"cleared {n} entries from {store.path()}")
            return 0
        if action == "stats":
            return views.print_stats()
        if action == "list":
            return views.print_list()
        return views.print_show(target)
    except Exception as exc:
        print(f"cannot read the cache at {store.path()}: {exc}", file=sys.stderr)
        return 1


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m adaptive_exec")
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="run built-in workloads, show the plans and speedups")
    demo.add_argument("--only", nargs="*", help="names of workloads to run")
    demo.add_argument("--scale", type=float, default=1.0, help="multiply workload sizes")
    cal = sub.add_parser("calibrate", help="measure this machine's pool constants")
    cal.add_argument("--workers", type=int, default=None)
    cache = sub.add_parser("cache", help="inspect or clear the persistent feature cache")
    cache.add_argument("action", nargs="?", default="path",
                       choices=("path", "list", "show", "stats", "clear"))
    cache.add_argument("target", nargs="?", help="for show: a function name or fingerprint")
    args = parser.parse_args(argv)
    handlers: dict[str, Callable[[argparse.Namespace], int]] = {
        "demo": _demo, "calibrate": _calibrate, "cache": _cache,
    }
    return handlers[args.command](args)
