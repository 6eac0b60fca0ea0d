"""The fixed cost of a map (issue 14): a function of a few tens of nanoseconds over 300k
items, mapped again and again in a process whose pool is already warm from earlier heavy
maps, against the plain loop; and how long a cache hit takes to plan in a fresh process
(its first map) and again.

    python -m benchmarks.fixed_cost [--pairs 60] [--fresh 7]

Each map is timed right after a loop over the same items (pairs, interleaved, so that the
machine's drift touches both alike): medians, and the median of the pairs' differences.
The planning figure runs ``ParallelFunction.plan`` in fresh processes whose cache already
holds the function (written by a first process): it plans, samples nothing.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Callable

N_ITEMS = 300_000


def identity(x: int) -> int:
    return x


def shifted(x: int) -> int:
    return abs(x - 5) + 1


FUNCTIONS: dict[str, Callable[[int], int]] = {"identity": identity, "shifted": shifted}


def pairs(func: Callable[[int], int], n_pairs: int) -> dict[str, float]:
    from adaptive_exec import adaptive_map

    items = list(range(N_ITEMS))
    loops, ours, diffs = [], [], []
    for _ in range(n_pairs):
        t0 = time.perf_counter()
        expected = [func(x) for x in items]
        loop = time.perf_counter() - t0
        t0 = time.perf_counter()
        got = adaptive_map(func, items)
        mapped = time.perf_counter() - t0
        if got != expected:
            raise SystemExit(f"WRONG results for {func.__name__}")
        loops.append(loop)
        ours.append(mapped)
        diffs.append(mapped - loop)
    m = statistics.median
    return {"loop_ms": m(loops) * 1e3, "map_ms": m(ours) * 1e3, "ratio": m(ours) / m(loops),
            "extra_ms": m(diffs) * 1e3, "per_call_us": m(loops) / N_ITEMS * 1e6}


_PLAN_CHILD = r"""
import json, sys, time
sys.path.insert(0, {root!r})
from benchmarks.fixed_cost import shifted
from adaptive_exec import parallelize
items = list(range({n}))
pf = parallelize(shifted)
if {first}:
    pf.map(items)  # the first process: sampled, remembered
    print(json.dumps({{}}))
else:
    t0 = time.perf_counter(); plan = pf.plan(items); first = time.perf_counter() - t0
    t0 = time.perf_counter(); pf.plan(items); again = time.perf_counter() - t0
    print(json.dumps({{"first_ms": first * 1e3, "again_ms": again * 1e3,
                      "from_cache": plan.from_cache}}))
"""


def cache_hit_planning(n_fresh: int) -> dict[str, float]:
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    firsts, agains = [], []
    with tempfile.TemporaryDirectory(prefix="fixed-cost-") as cache_dir:
        env = {**os.environ, "ADAPTIVE_EXEC_CACHE_DIR": cache_dir}
        for i in range(n_fresh + 1):
            code = _PLAN_CHILD.format(root=root, n=N_ITEMS, first=i == 0)
            out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                                 text=True, timeout=120, check=True).stdout
            got = json.loads(out.strip().splitlines()[-1])
            if i:
                if not got["from_cache"]:
                    raise SystemExit("the plan was not a cache hit")
                firsts.append(got["first_ms"])
                agains.append(got["again_ms"])
    return {"first_ms": statistics.median(firsts), "again_ms": statistics.median(agains)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.fixed_cost", description=__doc__)
    parser.add_argument("--pairs", type=int, default=60, help="timed pairs per function")
    parser.add_argument("--fresh", type=int, default=7, help="fresh processes that plan")
    args = parser.parse_args(argv)
    if args.pairs < 1 or args.fresh < 1:
        parser.error("--pairs and --fresh must be at least 1")
    from adaptive_exec import adaptive_map
    from benchmarks.workloads import heavy_task

    adaptive_map(heavy_task, range(40))  # a warm pool, as in a program's earlier maps
    adaptive_map(heavy_task, range(40))
    print(f"{os.cpu_count()} logical CPUs; {N_ITEMS:,} items; medians of {args.pairs} pairs")
    print(f"{'function':10s} {'per call':>9s} {'loop ms':>8s} {'map ms':>8s} "
          f"{'map/loop':>9s} {'extra ms':>9s}")
    for name, func in FUNCTIONS.items():
        r = pairs(func, args.pairs)
        print(f"{name:10s} {r['per_call_us']:7.3f}us {r['loop_ms']:8.2f} {r['map_ms']:8.2f} "
              f"{r['ratio']:8.3f}x {r['extra_ms']:9.2f}")
    hit = cache_hit_planning(args.fresh)
    print(f"a cache hit planned: {hit['first_ms']:.2f} ms in a fresh process (its first map), "
          f"{hit['again_ms']:.2f} ms again (medians of {args.fresh} processes)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
