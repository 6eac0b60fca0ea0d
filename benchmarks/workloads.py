"""Workloads: deterministic items, a module-level task, and the loop's results.

Each task is a plain module-level function, so every runner (fork pools, loky, joblib,
adaptive_exec) can pickle it by reference, as it would a user's function.  Each workload
also knows the loop's results, ``[task(x) for x in items]``, in a form that costs almost
nothing to compute (a closed form, or an O(n^2) equivalent of O(n^3) work), so that every
measurement can be checked without running the loop again.  Results depend on the input,
so a runner that skips, drops or reorders items is caught.

CPU costs are burnt on this thread's CPU clock (``time.thread_time``), not on the wall
clock: with a wall-clock spin, 4 workers on 2 cores or 8 threads under the GIL would
each finish their "20 ms" item in 20 ms of wall time, and oversubscription would look
free.  With a CPU-clock spin an item costs what real work costs on a busy machine.

The numpy task lives in ``numpy_task`` so that only that workload pays numpy's import.
The tasks over real data (the standard library's own files) live in ``real_tasks``; their
costs are measured, not constructed, and their loop's results are the task's own.
"""

from __future__ import annotations

import importlib
import math
import statistics
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional

# --------------------------------------------------------------------------- helpers


def _mix(i: int) -> int:
    """A cheap value that depends on the item, so a wrong or missing item shows."""
    return (i * 2654435761 + 12345) % 4294967291


def _burn_cpu(seconds: float) -> None:
    """Spend ``seconds`` of this thread's CPU time (see the module docstring for why)."""
    deadline = time.thread_time() + seconds
    while time.thread_time() < deadline:
        pass


# --------------------------------------------------------------------------- tasks
# One function per workload, even where two would do: adaptive_exec caches what it
# learns per function, and a shared function would let one workload's history leak
# into another's plan.

# 20 steps of this loop cost about 1 µs in CPython 3.11 on the 2-core Xeon this suite
# was written on; a busy-wait could not be timed that finely (a thread_time() call alone
# costs ~0.3 µs there).
_TINY_STEPS = 20
_TINY_FACTOR = _TINY_STEPS * (_TINY_STEPS - 1) // 2  # sum(range(_TINY_STEPS))


def tiny_task(x: int) -> int:
    acc = 0
    for k in range(_TINY_STEPS):
        acc += k * x
    return acc


def small_task(i: int) -> int:
    _burn_cpu(0.2e-3)
    return _mix(i)


def heavy_task(i: int) -> int:
    _burn_cpu(20e-3)
    return _mix(i)


def skewed_task(item: tuple) -> int:
    i, seconds = item
    _burn_cpu(seconds)
    return _mix(i)


def few_heavy_task(i: int) -> int:
    _burn_cpu(0.3)
    return _mix(i)


_FAT_BYTES = 200_000


def _payload(i: int) -> bytes:
    """~200 KB that differ per item; ``bytes`` pickles as a flat copy, so what is measured
    is the transfer of the result, not the cost of pickling a structure."""
    return i.to_bytes(8, "little") * (_FAT_BYTES // 8)


def fat_return_task(i: int) -> bytes:
    _burn_cpu(0.1e-3)
    return _payload(i)


_MEDIUM_BYTES = 20_000


def _medium(i: int) -> bytes:
    """~20 KB that differ per item: a parsed record, a thumbnail, a small array."""
    return i.to_bytes(8, "little") * (_MEDIUM_BYTES // 8)


def result_20k_task(i: int) -> bytes:
    _burn_cpu(1e-3)
    return _medium(i)


_MEMORY_BYTES = 200 * 2**20
_PAGE = 4096


def _memory_mark(i: int) -> int:
    return i % 251 + 1


def two_heavy_task(i: int) -> int:
    _burn_cpu(0.5)
    return _mix(i)


def memory_heavy_task(i: int) -> int:
    # bytearray(n) zero-fills, so every page is really touched and resident; the
    # stride write then makes the value depend on the item.
    buf = bytearray(_MEMORY_BYTES)
    n_pages = _MEMORY_BYTES // _PAGE
    buf[::_PAGE] = bytes([_memory_mark(i)]) * n_pages
    return sum(buf[::_PAGE])


def io_bound_task(i: int) -> int:
    time.sleep(0.01)
    return _mix(i)


def few_waits_task(i: int) -> int:
    time.sleep(0.4)  # a slow request: nothing to compute, all waiting
    return _mix(i)


# --------------------------------------------------------------------------- items


def _indices(n: int) -> List[int]:
    return list(range(n))


# Lognormal with CV 2 means sigma = sqrt(ln(1 + CV**2)).  The costs are the distribution's
# quantiles, not random draws, so the items are the same on every run and machine.
_SKEW_MEAN_S = 1e-3
_SKEW_CV = 2.0


def _skewed_costs(n: int) -> List[float]:
    """n lognormal quantiles scaled to mean 1 ms, with sigma tuned so that the sample's
    own CV is 2 (the quantiles of a finite sample miss the far tail, which would leave the
    CV near 1.85 with sigma = sqrt(ln 5)).  Ascending: the expensive items come last, the
    case where batch sizes learnt on cheap early items overshoot (joblib issue 1220)."""
    normal = statistics.NormalDist()
    z = [normal.inv_cdf((k + 0.5) / n) for k in range(n)]

    def cv(sigma: float) -> float:
        values = [math.exp(sigma * zk) for zk in z]
        return statistics.pstdev(values) / statistics.fmean(values)

    lo, hi = 0.5, 3.0
    for _ in range(40):  # bisection: cv() increases with sigma
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if cv(mid) < _SKEW_CV else (lo, mid)
    values = [math.exp(lo * zk) for zk in z]
    scale = _SKEW_MEAN_S / statistics.fmean(values)
    return [v * scale for v in values]


def _skewed_items(n: int) -> List[tuple]:
    return list(enumerate(_skewed_costs(n)))


def _real_items(maker: str) -> Callable[[int], List[Any]]:
    """Items built by ``real_tasks.<maker>(n)``, imported only when a workload needs it."""

    def make(n: int) -> List[Any]:
        from benchmarks import real_tasks

        return getattr(real_tasks, maker)(n)

    return make


# --------------------------------------------------------------------------- expected


def _loop(task: str) -> Callable[[List[Any]], List[Any]]:
    """The loop's results by running the loop: for real work there is no closed form.
    Runs after the timed map, in the measuring process."""

    def expected(items: List[Any]) -> List[Any]:
        module, _, name = task.partition(":")
        function = getattr(importlib.import_module(module), name)
        return [function(x) for x in items]

    return expected


def _expected_mix(items: List[Any]) -> List[int]:
    return [_mix(i) for i in items]


def _expected_numpy(items: List[int]) -> List[float]:
    from benchmarks import numpy_task

    return [numpy_task.expected(seed) for seed in items]


def _close(got: Any, want: Any) -> bool:
    # BLAS sums in an order that depends on its thread count, so the last digits differ
    # between a serial run and a worker capped to one BLAS thread.
    return isinstance(got, float) and math.isclose(got, want, rel_tol=1e-7, abs_tol=1e-9)


def _equal(got: Any, want: Any) -> bool:
    return type(got) is type(want) and got == want


# --------------------------------------------------------------------------- registry


@dataclass(frozen=True)
class Workload:
    name: str
    description: str
    task: str  # "module:function", imported only in the process that runs it
    n_full: int
    n_quick: int
    make_items: Callable[[int], List[Any]]
    expected: Callable[[List[Any]], List[Any]]
    per_item_s: Callable[[List[Any]], float] = field(repr=False, default=lambda items: 0.0)
    same: Callable[[Any, Any], bool] = field(repr=False, default=_equal)

    def n_items(self, quick: bool) -> int:
        return self.n_quick if quick else self.n_full

    def items(self, quick: bool) -> List[Any]:
        return self.make_items(self.n_items(quick))

    def nominal_serial_s(self, quick: bool) -> float:
        """The loop's time by construction (CPU burnt or slept); used before serial is
        measured, e.g. to size time-outs."""
        return self.per_item_s(self.items(quick))

    def load_task(self) -> Callable[[Any], Any]:
        module, _, name = self.task.partition(":")
        return getattr(importlib.import_module(module), name)

    def check(self, items: List[Any], results: Any) -> Optional[str]:
        """None when ``results`` equal the loop's, else what differs."""
        try:
            results = list(results)
        except TypeError:
            return f"results are not a sequence: {type(results).__name__}"
        want = self.expected(items)
        if len(results) != len(want):
            return f"{len(results)} results for {len(want)} items"
        for index, (got, exp) in enumerate(zip(results, want)):
            if not self.same(got, exp):
                return f"item {index}: got {_short(got)}, expected {_short(exp)}"
        return None


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _flat(seconds: float) -> Callable[[List[Any]], float]:
    return lambda items: seconds * len(items)


_THIS = __name__
_REAL = "benchmarks.real_tasks"


def _real(name: str, description: str, function: str, n_full: int, n_quick: int,
          maker: str, mean_s: float, once_s: float = 0.0) -> Workload:
    """A workload over the standard library's files; ``mean_s`` is the measured mean cost
    of an item, ``once_s`` a once-per-process set-up, both only to size time-outs."""
    task = f"{_REAL}:{function}"
    return Workload(name, description, task, n_full, n_quick, _real_items(maker),
                    _loop(task), lambda items: once_s + mean_s * len(items))

WORKLOADS: Dict[str, Workload] = {
    w.name: w
    for w in [
        Workload(
            "tiny", "~1 µs of interpreter work per item: overhead-bound",
            f"{_THIS}:tiny_task", 300_000, 300_000, _indices,
            lambda items: [x * _TINY_FACTOR for x in items], _flat(1e-6),
        ),
        Workload(
            "small", "0.2 ms of CPU per item", f"{_THIS}:small_task", 5_000, 2_000,
            _indices, _expected_mix, _flat(0.2e-3),
        ),
        Workload(
            "heavy", "20 ms of CPU per item", f"{_THIS}:heavy_task", 100, 30,
            _indices, _expected_mix, _flat(20e-3),
        ),
        Workload(
            "skewed", "lognormal CPU costs, mean 1 ms, CV 2, ascending (costly items last)",
            f"{_THIS}:skewed_task", 2_000, 600, _skewed_items,
            lambda items: [_mix(i) for i, _ in items],
            lambda items: sum(s for _, s in items),
        ),
        Workload(
            "fat_return", "0.1 ms of CPU per item returning 200 KB",
            f"{_THIS}:fat_return_task", 2_000, 1_000, _indices,
            lambda items: [_payload(i) for i in items], _flat(0.1e-3 + 25e-6),
        ),
        Workload(
            "result_20k", "1 ms of CPU per item returning 20 KB", f"{_THIS}:result_20k_task",
            1_500, 600, _indices, lambda items: [_medium(i) for i in items], _flat(1e-3),
        ),
        Workload(
            "few_heavy", "3 items of 300 ms of CPU", f"{_THIS}:few_heavy_task", 3, 3,
            _indices, _expected_mix, _flat(0.3),
        ),
        Workload(
            "two_heavy", "2 items of 500 ms of CPU: fewer items than cores cannot fill them",
            f"{_THIS}:two_heavy_task", 2, 2, _indices, _expected_mix, _flat(0.5),
        ),
        Workload(
            "memory_heavy", "200 MB allocated and touched per item, small result",
            f"{_THIS}:memory_heavy_task", 12, 6, _indices,
            lambda items: [_memory_mark(i) * (_MEMORY_BYTES // _PAGE) for i in items],
            _flat(0.15),
        ),
        Workload(
            "numpy", "10 BLAS matrix products (300x300) per item: threads oversubscribe",
            "benchmarks.numpy_task:matrix_power_sum", 200, 80, _indices,
            _expected_numpy, _flat(6e-3), _close,
        ),
        Workload(
            "io_bound", "10 ms sleep per item: waiting, not computing",
            f"{_THIS}:io_bound_task", 200, 60, _indices, _expected_mix, _flat(0.01),
        ),
        Workload(
            "few_waits", "3 items waiting 0.4 s each (slow requests): the cold map must "
            "not wait for the first before it sends the others",
            f"{_THIS}:few_waits_task", 3, 3, _indices, _expected_mix, _flat(0.4),
        ),
        # Real work on the standard library's .py files (~730 on CPython 3.11), sampled
        # evenly.  Mean item costs measured on this suite's 2-core Xeon, CPython 3.11.7,
        # 2026-12-02 (loops of 0.8-1.9 s full, 0.3-0.7 s quick); they vary with the file.
        _real("parse_stdlib", "ast.parse a stdlib file, count nodes: uneven, under the GIL",
              "parse_task", 300, 100, "sample_files", 4.5e-3),
        _real("compile_source", "compile() a stdlib file's text, sent as the item: fat inputs "
              "(~16 KB each)", "compile_task", 734, 300, "sources", 2e-3),
        _real("hash_files", "read a stdlib file and sha256 it: ~30 µs items, I/O and C code",
              "hash_task", 30_000, 12_000, "sample_files", 28e-6),
        _real("compress_lzma", "lzma-compress a stdlib file: C code that releases the GIL",
              "compress_task", 250, 100, "sample_files", 6e-3),
        _real("regex_scan", "count 7 regexes' matches in a stdlib file: ~1.3 ms items",
              "regex_scan_task", 1_000, 400, "sample_files", 1.3e-3),
        _real("sqlite_groupby", "a stdlib file's identifiers into in-memory SQLite, GROUP BY",
              "sqlite_task", 400, 150, "sample_files", 3.7e-3),
        _real("first_call_setup", "~0.2 s index built on the first call in each process, "
              "then ~1.8 ms tokenising a chunk of stdlib code", "setup_lookup_task",
              500, 200, "setup_chunks", 1.8e-3, once_s=0.2),
    ]
}


def get(name: str) -> Workload:
    try:
        return WORKLOADS[name]
    except KeyError:
        msg = f"unknown workload {name!r}; known: {', '.join(WORKLOADS)}"
        raise KeyError(msg) from None
