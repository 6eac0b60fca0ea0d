"""Functions the dask tests send to the cluster's worker processes (module-level, so
the workers import them by name: the tests directory is on their sys.path)."""

from __future__ import annotations

import os

from aex_helpers import spin


def in_dask_task() -> bool:
    try:
        from distributed import get_worker

        get_worker()
    except (ImportError, ValueError):
        return False
    return True


def slow_value(table, x):
    # Half a millisecond: sampling stops after ~40 items, the rest reach the cluster.
    spin(0.0005)
    return table[x % len(table)]


def slow_fail(x, bad=frozenset()):
    spin(0.0005)
    if x in bad:
        raise ValueError(f"bad item {x}")
    return x


def where(x):
    spin(0.002)
    return x, os.getpid()


def die_once(x, flag, at):
    """Kill the dask worker that runs item ``at``, the first time only (``flag``)."""
    if x == at and in_dask_task() and not os.path.exists(flag):
        with open(flag, "w"):
            pass
        os._exit(13)
    spin(0.002)
    return x * 2


def always_die(x, at):
    if x == at and in_dask_task():
        os._exit(13)
    spin(0.002)
    return x * 2


def nested(x):
    """A map inside a dask task: it must run serially there."""
    from adaptive_exec import parallelize

    spin(0.025)  # sampling stops after one item: the rest run on the cluster
    inner = parallelize(spin_square, backend="loky")
    return sum(inner.map(range(x))), inner.last_report.plan.mode, os.getpid()


def spin_square(x):
    return x * x


class Payload:
    """A large object that writes one line to ``path`` each time it is unpickled."""

    def __init__(self, path: str, size: int):
        self.path = path
        self.data = bytes(size)

    def __reduce__(self):
        return _rebuilt, (self.path, self.data)


def _rebuilt(path: str, data: bytes) -> Payload:
    with open(path, "a") as f:
        f.write(f"{os.getpid()}\n")
    obj = Payload.__new__(Payload)
    obj.path, obj.data = path, data
    return obj


TABLE = {"a": 1}


def read_table(x):
    spin(0.0005)
    return x + TABLE["a"]


def plus_length(data, x):
    spin(0.002)
    return x + len(data)


def largest_function_held() -> int:
    """In a worker: the bytes of the largest function adaptive_exec keeps there."""
    from adaptive_exec import worker

    return max((size for _, size in worker._FUNCTIONS.values()), default=0)


def first_and_length(data):
    spin(0.002)
    return data[0], len(data)


def seventh(x):
    """A loop's item that reads the decimal context."""
    import decimal

    spin(0.002)
    return str(decimal.Decimal(1) / decimal.Decimal(7 + x % 3))


def worker_precision(*_):
    """The decimal precision of a worker's thread outside any item: its own."""
    import decimal

    return decimal.getcontext().prec
