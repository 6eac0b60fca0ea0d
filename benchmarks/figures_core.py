"""The core figures of issue 2, measured side by side in fresh processes.

    python -m benchmarks.figures_core [--repeats N]

Each measurement is a new Python process with an empty cache, as a user's first run of a
script would be: the workload's input is built, then only the call is timed
(``import adaptive_exec`` is timed apart).
Runners alternate within each repeat so that drift on a noisy machine hits all alike;
medians are reported. No figure here is asserted anywhere: they go in the README.
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

from benchmarks.runners import RUNNER_NEEDS, not_installed, pip_command

CHILD = r'''
import json, sys, time
t0 = time.perf_counter()
import adaptive_exec
adaptive_exec.parallelize  # the package loads its API (and loky with it) on first use
import_s = time.perf_counter() - t0
from benchmarks.figures_core import WORKLOADS
name, runner = sys.argv[1], sys.argv[2]
func, n = WORKLOADS[name]
items = list(range(n))
out = {"import_s": import_s}
if runner == "loop":
    t0 = time.perf_counter(); res = [func(x) for x in items]; out["s"] = time.perf_counter() - t0
elif runner == "joblib":
    from joblib import Parallel, delayed
    t0 = time.perf_counter()
    res = Parallel(n_jobs=-1)(delayed(func)(x) for x in items)
    out["s"] = time.perf_counter() - t0
else:
    pf = adaptive_exec.parallelize(func)
    if runner == "adaptive_warm_pool":
        # Another function's map started the pool earlier in this process.
        adaptive_exec.adaptive_map(WORKLOADS["warmup"][0], range(200), backend="loky")
    t0 = time.perf_counter(); res = pf.map(items); out["s"] = time.perf_counter() - t0
    r = pf.last_report
    out.update(mode=r.plan.mode, workers=r.plan.n_workers, chunksize=r.plan.chunksize,
               sampling_s=r.sampling_s, overhead_s=r.planning_overhead_s,
               n_sampled=r.n_sampled, est=r.plan.estimated_parallel_s if r.plan.mode != "serial"
               else r.plan.estimated_serial_s)
assert res == [func(x) for x in items[:2000]] + res[2000:], "wrong results"
print(json.dumps(out))
'''


def _spin(seconds: float) -> None:
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        pass


def tiny(x: int) -> int:
    # ~1 µs of pure Python on the 2-core development machine.
    total = 0
    for i in range(16):
        total += (x ^ i) & 7
    return total


def small(x: int) -> int:
    _spin(0.0002)
    return x + 1


def heavy(x: int) -> int:
    _spin(0.02)
    return x * x


def warmup(x: int) -> int:
    _spin(0.002)
    return x


WORKLOADS = {
    "tiny": (tiny, 300_000),
    "small": (small, 5_000),
    "heavy": (heavy, 100),
    "warmup": (warmup, 200),
}

PLAN = [
    ("tiny", ["loop", "adaptive", "joblib"]),
    ("small", ["loop", "adaptive"]),
    ("heavy", ["loop", "adaptive", "adaptive_warm_pool"]),
]


def _run(name: str, runner: str) -> dict:
    # A first run, as the figures mean: an empty cache in every process.
    with tempfile.TemporaryDirectory() as cache_dir:
        env = {**os.environ, "ADAPTIVE_EXEC_CACHE_DIR": cache_dir}
        proc = subprocess.run([sys.executable, "-c", CHILD, name, runner],
                              capture_output=True, text=True, timeout=300, env=env)
    if proc.returncode != 0:
        return {"error": proc.stderr.strip().splitlines()[-1:]}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--skip-joblib", action="store_true")
    args = parser.parse_args(argv)
    results: dict[tuple[str, str], list[dict]] = {}
    # A peer that is not installed is not run: its rows say what to pip install.
    missing = {runner: not_installed(RUNNER_NEEDS.get(runner, ()))
               for _, runners in PLAN for runner in runners}
    for rep in range(args.repeats):
        for name, runners in PLAN:
            for runner in runners:
                if runner == "joblib" and args.skip_joblib or missing[runner]:
                    continue
                r = _run(name, runner)
                results.setdefault((name, runner), []).append(r)
                print(f"[{rep + 1}/{args.repeats}] {name:6s} {runner:20s} "
                      f"{r.get('s', float('nan')):.4f}s {r.get('mode', '')}", file=sys.stderr)
    print("| workload | runner | median s | vs loop | plan | sampling+planning s "
          "(overhead beyond sampled calls) |")
    print("|---|---|---|---|---|---|")
    for name, runners in PLAN:
        loop = statistics.median(r["s"] for r in results[(name, "loop")])
        for runner in runners:
            rs = [r for r in results.get((name, runner), []) if "s" in r]
            if not rs:
                if missing[runner]:
                    print(f"| {name} | {runner} | n/a ({pip_command(missing[runner])}) "
                          "| | | |")
                continue
            med = statistics.median(r["s"] for r in rs)
            plan = ""
            if "mode" in rs[0]:
                plan = f"{rs[0]['mode']}, {rs[0]['workers']}w, chunk {rs[0]['chunksize']}"
            samp = ""
            if "sampling_s" in rs[0]:
                samp = (f"{statistics.median(r['sampling_s'] for r in rs) * 1e3:.1f} ms "
                        f"({statistics.median(r['overhead_s'] for r in rs) * 1e3:.2f} ms)")
            print(f"| {name} | {runner} | {med:.4f} | {med / loop:.2f}x | {plan} | {samp} |")
    imports = [r["import_s"] for v in results.values() for r in v if "import_s" in r]
    print(f"\nimport adaptive_exec: median {statistics.median(imports) * 1e3:.1f} ms "
          "(not in the timings above)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
