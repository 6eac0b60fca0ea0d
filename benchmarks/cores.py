"""Physical or logical cores? Throughput with 1..N workers on a pure-Python and a numpy
workload, measured on this machine:

    python -m benchmarks.cores

Each worker count runs in a fresh process on a warm pool (start-up not counted), with
one BLAS thread per worker as adaptive_exec's workers have. A logical CPU worth using
raises the throughput; an SMT sibling that adds nothing does not.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

CHILD = r"""
import json, sys, time
workers, kind = int(sys.argv[1]), sys.argv[2]
import loky
from benchmarks import cores
ex = loky.ProcessPoolExecutor(workers, env={"OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1",
                                            "MKL_NUM_THREADS": "1"})
task = cores.python_task if kind == "python" else cores.numpy_task
list(ex.map(task, range(workers * 2)))  # warm: every worker up and imported
n = 60 * workers
t0 = time.perf_counter()
list(ex.map(task, range(n)))
print(json.dumps({"items_per_s": n / (time.perf_counter() - t0)}))
ex.shutdown()
"""


def python_task(i: int) -> int:
    total = 0
    for k in range(400_000):
        total += (k ^ i) & 7
    return total


def numpy_task(i: int) -> float:
    import numpy as np

    a = np.full((300, 300), 1.0 / 300) + np.eye(300) * (i % 7) * 1e-3
    for _ in range(10):
        a = a @ a
    return float(a.sum())


def main() -> int:
    try:
        import psutil

        logical, physical = psutil.cpu_count(), psutil.cpu_count(logical=False)
    except ImportError:
        logical, physical = os.cpu_count(), None
    print(f"logical CPUs {logical}, physical cores {physical}")
    print("| workers | pure Python items/s | x 1 worker | numpy items/s | x 1 worker |")
    print("|---|---|---|---|---|")
    base: dict[str, float] = {}
    for w in range(1, (logical or 1) + 1):
        row = [str(w)]
        for kind in ("python", "numpy"):
            out = subprocess.run([sys.executable, "-c", CHILD, str(w), kind],
                                 capture_output=True, text=True, timeout=300)
            if out.returncode != 0:
                row += ["FAIL", "-"]
                continue
            rate = json.loads(out.stdout.strip().splitlines()[-1])["items_per_s"]
            base.setdefault(kind, rate)
            row += [f"{rate:.1f}", f"{rate / base[kind]:.2f}x"]
        print("| " + " | ".join(row) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
