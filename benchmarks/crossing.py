"""What crosses to the workers when the mapped function holds a large object: a bound
method of an object holding SIZE MB, mapped over 300 items of 2 ms on the process pool
(backend="loky", so that the pool is used even where the loop would win), one map cold and
one on the warm pool; RunReport.bytes_sent against the object's size and the workers.

    python -m benchmarks.crossing [--mb 500]
"""

from __future__ import annotations

import argparse
import os
import time

from benchmarks.workloads import _burn_cpu


class Holder:
    def __init__(self, n_bytes: int):
        self.data = os.urandom(1 << 20) * (n_bytes >> 20)

    def work(self, i: int) -> int:
        _burn_cpu(2e-3)
        return self.data[i] + i


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.crossing", description=__doc__)
    parser.add_argument("--mb", type=int, default=500, help="the object's size (default 500)")
    args = parser.parse_args(argv)
    if args.mb < 1:
        parser.error("--mb must be at least 1")
    from adaptive_exec import parallelize

    holder = Holder(args.mb << 20)
    size = len(holder.data)
    t0 = time.perf_counter()
    loop = [holder.work(i) for i in range(300)]
    print(f"object {size / 1e6:.0f} MB; the loop: {time.perf_counter() - t0:.2f} s")
    pf = parallelize(holder.work, backend="loky", cache=False)
    for label in ("cold pool", "warm pool"):
        t0 = time.perf_counter()
        assert pf.map(range(300)) == loop
        seconds = time.perf_counter() - t0
        report = pf.last_report
        workers = max((n for _, n in report.workers_timeline), default=0)
        per_worker = report.bytes_sent / size / max(1, workers)
        print(f"{label}: {seconds:.2f} s, {report.bytes_sent / 1e6:.0f} MB sent to "
              f"{workers} workers = {per_worker:.2f}x the object per worker")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
