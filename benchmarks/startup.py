"""What starting a pool costs: wall time to the first and to the last worker's answer, and
the CPU seconds the start takes (the caller's and its workers'), for 2, 4, 8 and 16
workers, on the start paths a pool could take (issue 13).

    python -m benchmarks.startup [--workers 2,4,8,16] [--repeats 5]

Each measurement runs in a fresh process, as a user's script would: create the pool,
send one 5 ms ping per worker (so every worker must be up to answer them all), wait,
shut the pool down, and read the CPU the process and its reaped children used. Medians.
On 2 cores the wall time of 16 workers is not what 16 cores give, but the CPU cost per
worker is.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys

PATHS = {
    "adaptive_fork": "adaptive_exec's pool, workers forked by the caller (one thread)",
    "adaptive_template": "adaptive_exec's pool, workers forked by its template process "
                         "(a threaded caller), the template started ahead",
    "adaptive_template_cold": "the same, the template started with the pool",
    "adaptive_exec": "adaptive_exec's pool on loky's own start (ADAPTIVE_EXEC_START=exec)",
    "loky": "loky's ProcessPoolExecutor, its default start (fork+exec)",
    "loky_fork": "loky's ProcessPoolExecutor with loky's fork context",
    "mp_fork_pool": "multiprocessing.get_context('fork').Pool",
    "cf_fork": "concurrent.futures.ProcessPoolExecutor, fork context",
}

_CHILD = r"""
import json, os, resource, sys, time
path, n = sys.argv[1], int(sys.argv[2])

def ping(_):
    time.sleep(0.005)
    return os.getpid()

def cpu():
    me = resource.getrusage(resource.RUSAGE_SELF)
    kids = resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime, kids.ru_utime + kids.ru_stime

if path.startswith("loky"):
    import loky
    from loky.backend.context import get_context
if path.startswith("adaptive"):
    import threading
    import psutil
    if path.startswith("adaptive_template"):
        os.environ["ADAPTIVE_EXEC_START"] = "template"
    elif path == "adaptive_exec":
        os.environ["ADAPTIVE_EXEC_START"] = "exec"
    from adaptive_exec.backends import loky as backend, starts
    import loky, loky.process_executor  # as a script that imported adaptive_exec has them
    if path == "adaptive_template":
        starts.template().start()
        time.sleep(0.5)  # started ahead: up before the pool is asked for
cpu0 = cpu()
t0 = time.perf_counter()
if path.startswith("adaptive"):
    pool, _, _ = backend._get(n)
    probe = backend.current_probe(pool)
    probe.first.wait(60)
    first = time.perf_counter() - t0
    while probe.startup_s is None and time.perf_counter() - t0 < 60:
        time.sleep(0.0005)
    every = time.perf_counter() - t0
    pids = set(backend.worker_pids())
    backend.shutdown()  # as the other paths: the workers' CPU once they are reaped
    cpu1 = cpu()
    template = starts.template_pid()
    helper_cpu = 0.0
    workers_cpu = cpu1[1] - cpu0[1]  # forked by us: our children
    if template:  # forked by the template: its children, reaped by it
        proc = psutil.Process(template)
        deadline = time.perf_counter() + 5
        while time.perf_counter() < deadline and any(psutil.pid_exists(p) and
                psutil.Process(p).status() != psutil.STATUS_ZOMBIE for p in pids):
            time.sleep(0.005)
        time.sleep(0.05)  # its SIGCHLD handler reaps them
        times = proc.cpu_times()
        helper_cpu = times.user + times.system
        workers_cpu = times.children_user + times.children_system
    print(json.dumps({"first_s": first, "all_s": every, "workers_seen": len(pids),
                      "caller_cpu_s": cpu1[0] - cpu0[0], "workers_cpu_s": workers_cpu,
                      "template_cpu_s": helper_cpu}))
    sys.exit(0)
if path == "loky":
    pool = loky.ProcessPoolExecutor(n)
elif path == "loky_fork":
    pool = loky.ProcessPoolExecutor(n, context=get_context("fork"))
elif path == "cf_fork":
    import concurrent.futures as cf, multiprocessing as mp
    pool = cf.ProcessPoolExecutor(n, mp_context=mp.get_context("fork"))
else:
    import multiprocessing as mp
    pool = mp.get_context("fork").Pool(n)
if path == "mp_fork_pool":
    results = [pool.apply_async(ping, (i,)) for i in range(n)]
    first = None
    pids = set()
    for r in results:
        pids.add(r.get())
        first = first or time.perf_counter() - t0
    every = time.perf_counter() - t0
    pool.close(); pool.join()
else:
    import concurrent.futures as cf
    futures = [pool.submit(ping, i) for i in range(n)]
    done, _ = cf.wait(futures, return_when=cf.FIRST_COMPLETED)
    first = time.perf_counter() - t0
    pids = {f.result() for f in futures}
    every = time.perf_counter() - t0
    pool.shutdown(wait=True)
cpu1 = cpu()
print(json.dumps({"first_s": first, "all_s": every, "workers_seen": len(pids),
                  "caller_cpu_s": cpu1[0] - cpu0[0], "workers_cpu_s": cpu1[1] - cpu0[1],
                  "template_cpu_s": 0.0}))
"""


def measure(path: str, n: int) -> dict[str, float]:
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        p for p in (root, os.environ.get("PYTHONPATH")) if p)}
    env.pop("ADAPTIVE_EXEC_START", None)
    out = subprocess.run([sys.executable, "-c", _CHILD, path, str(n)], capture_output=True,
                         text=True, timeout=120, check=True, env=env).stdout
    return json.loads(out.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.startup", description=__doc__)
    parser.add_argument("--workers", default="2,4,8,16",
                        help="comma-separated pool sizes (default 2,4,8,16)")
    parser.add_argument("--repeats", type=int, default=5, help="runs per cell (median)")
    parser.add_argument("--paths", default=",".join(PATHS),
                        help=f"comma-separated start paths among {', '.join(PATHS)}")
    args = parser.parse_args(argv)
    sizes = [int(w) for w in args.workers.split(",")]
    paths = args.paths.split(",")
    unknown = [p for p in paths if p not in PATHS]
    if unknown or any(w < 1 for w in sizes) or args.repeats < 1:
        parser.error(f"unknown paths {unknown}" if unknown else "sizes and repeats must be >= 1")
    print(f"{os.cpu_count()} logical CPUs; medians of {args.repeats} fresh processes")
    print(f"{'path':22} {'workers':>7} {'first ms':>9} {'all ms':>8} {'caller cpu ms':>14} "
          f"{'workers cpu ms':>15} {'cpu ms/worker':>14} {'template cpu ms':>16}")
    for path in paths:
        for n in sizes:
            runs = [measure(path, n) for _ in range(args.repeats)]
            med = {k: statistics.median(r[k] for r in runs) for k in runs[0]}
            print(f"{path:22} {n:7d} {med['first_s'] * 1e3:9.1f} {med['all_s'] * 1e3:8.1f} "
                  f"{med['caller_cpu_s'] * 1e3:14.1f} {med['workers_cpu_s'] * 1e3:15.1f} "
                  f"{(med['caller_cpu_s'] + med['workers_cpu_s']) / n * 1e3:14.1f} "
                  f"{med['template_cpu_s'] * 1e3:16.1f}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
