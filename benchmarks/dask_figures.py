"""The dask figures: 10k items of ~1 ms CPU on a 2-worker LocalCluster.

    python -m benchmarks.dask_figures [--repeats 3] [--items 10000]

Three runners on one cluster, started once and not timed (a user's cluster is already
running when the map starts):

- ``adaptive``: ``adaptive_map(task, items, backend="dask", client=client)``, sampling
  and planning included. Its first run starts from an empty cache (it also measures the
  cluster's constants); later runs find the function's features and the constants there,
  as a second run of a script would. Both are reported.
- ``joblib``: ``with joblib.parallel_backend("dask"): Parallel()(delayed(task)(x) ...)``,
  joblib's own dask backend with its automatic batching.
- ``client.map``: ``client.gather(client.map(task, items, pure=False))``, one task per item.

Runners alternate within each repeat, so that drift on a noisy machine hits all alike;
medians are printed as a markdown table. Nothing here is asserted anywhere.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from typing import Any, Callable

from benchmarks.runners import RUNNER_NEEDS, not_installed, pip_command
from benchmarks.workloads import _burn_cpu, _mix


def ms_task(x: int) -> int:
    """About 1 ms of CPU (on this thread's CPU clock: see benchmarks/workloads.py)."""
    _burn_cpu(0.001)
    return _mix(x)


def _adaptive(client: Any, items: list[int]) -> list[int]:
    from adaptive_exec import adaptive_map

    return adaptive_map(ms_task, items, backend="dask", client=client)


def _joblib(client: Any, items: list[int]) -> list[int]:
    import joblib

    with joblib.parallel_backend("dask"):
        return joblib.Parallel()(joblib.delayed(ms_task)(x) for x in items)


def _client_map(client: Any, items: list[int]) -> list[int]:
    return client.gather(client.map(ms_task, items, pure=False))


RUNNERS: dict[str, Callable[[Any, list[int]], list[int]]] = {
    "adaptive": _adaptive,
    "joblib": _joblib,
    "client.map": _client_map,
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--items", type=int, default=10_000)
    args = parser.parse_args(argv)

    no_dask = not_installed(["distributed"])
    if no_dask:  # nothing here runs without a cluster: one line says how to get one
        print(f"no dask figures: n/a ({pip_command(no_dask)})", file=sys.stderr)
        return 0
    # A peer that is not installed is not run: its row says what to pip install.
    missing = {name: not_installed(RUNNER_NEEDS.get(name, ())) for name in RUNNERS}
    runners = {name: run for name, run in RUNNERS.items() if not missing[name]}

    # An empty cache of its own: the first adaptive run is a first run.
    os.environ["ADAPTIVE_EXEC_CACHE_DIR"] = tempfile.mkdtemp(prefix="aex-dask-bench-")
    from distributed import Client, LocalCluster

    items = list(range(args.items))
    expected = [_mix(x) for x in items]
    times: dict[str, list[float]] = {name: [] for name in runners}
    first_adaptive = None
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True,
                      dashboard_address=None) as cluster, Client(cluster) as client:
        client.run(ms_task, 0)  # the workers import this module before anything is timed
        for repeat in range(args.repeats):
            for name, run in runners.items():
                t0 = time.perf_counter()
                got = run(client, items)
                elapsed = time.perf_counter() - t0
                if got != expected:
                    print(f"{name}: wrong results", file=sys.stderr)
                    return 1
                times[name].append(elapsed)
                print(f"[{repeat + 1}/{args.repeats}] {name:<11} {elapsed:7.3f} s",
                      file=sys.stderr)
                if name == "adaptive" and first_adaptive is None:
                    first_adaptive = elapsed
        plan = _plan(client, items)

    medians = {name: statistics.median(ts) for name, ts in times.items()}
    ref = medians["adaptive"]
    print(f"\n{args.items:,} items of ~1 ms CPU on a 2-worker LocalCluster "
          f"(processes, 1 thread each); median of {args.repeats}\n")
    print("| runner | median (s) | runs (s) | vs adaptive |")
    print("|---|---|---|---|")
    for name, ts in times.items():
        runs = ", ".join(f"{t:.2f}" for t in ts)
        print(f"| {name} | {medians[name]:.2f} | {runs} | {medians[name] / ref:.2f}x |")
    for name, needs in missing.items():
        if needs:
            print(f"| {name} | n/a ({pip_command(needs)}) | | |")
    if first_adaptive is not None:
        print(f"\nadaptive's first run (empty cache: sampling + measuring the cluster): "
              f"{first_adaptive:.2f} s")
    print(f"plan: {plan}")
    return 0


def _plan(client: Any, items: list[int]) -> str:
    """The plan adaptive_exec takes for this workload (from the cache: no sampling)."""
    from adaptive_exec import parallelize

    plan = parallelize(ms_task, backend="dask", client=client).plan(items)
    return f"{plan.n_workers} threads, chunks of {plan.chunksize}: {plan.reason}"


if __name__ == "__main__":
    raise SystemExit(main())
