"""A user's exception comes back as itself, with its index and the worker's traceback."""

from __future__ import annotations

import functools
import sys

import aex_helpers as h
import pytest

from adaptive_exec import calibrate, parallelize
from adaptive_exec.errors import RemoteTraceback


@pytest.mark.parametrize("backend", ["loky", "serial", "auto"])
@pytest.mark.parametrize("at", [7, 700])  # inside the sample (in the caller), and after it
def test_original_type_index_and_traceback(backend, at):
    # A warm pool: on a cold one the caller itself works through items while the
    # workers start, and an item it runs raises here, without a remote traceback.
    calibrate()
    pf = parallelize(functools.partial(h.raise_custom, at=at), backend=backend, chunksize=3)
    with pytest.raises(h.CustomError) as info:
        pf.map(range(1000))
    exc = info.value
    assert exc.code == 42 and exc.detail == "seven"
    assert exc.item_index == at
    if sys.version_info >= (3, 11):
        assert any(f"item {at}" in note for note in exc.__notes__)
    if backend == "loky" and at == 700:  # past the sample (at most 256 items): a worker
        assert isinstance(exc.__cause__, RemoteTraceback)
        assert "raise_custom" in str(exc.__cause__)


def test_imap_yields_the_results_before_the_failure():
    pf = parallelize(functools.partial(h.fail_on, bad={30}), backend="loky", chunksize=4)
    it = pf.imap(range(100))
    got = []
    with pytest.raises(ValueError, match="bad item 30"):
        for r in it:
            got.append(r)
    assert got == list(range(30))


def test_the_first_failure_in_order_wins():
    pf = parallelize(functools.partial(h.fail_on, bad={12, 40, 80}), backend="loky", chunksize=5)
    with pytest.raises(ValueError) as info:
        pf.map(range(100))
    assert info.value.item_index == 12


def test_remaining_work_is_cancelled_and_the_next_map_works(tmp_path):
    path = str(tmp_path / "calls")

    def slow_then_fail(x):
        h.record_call(path, x, seconds=0.01)
        if x == 20:
            raise RuntimeError("stop here")
        return x

    pf = parallelize(slow_then_fail, backend="loky", chunksize=2)
    with pytest.raises(RuntimeError, match="stop here"):
        pf.map(range(2000))
    with open(path) as f:
        executed = sum(1 for _ in f)
    # Items past the failure that had not started were cancelled: far fewer than 2000 ran.
    assert executed < 200, executed
    assert parallelize(h.square, backend="loky").map(range(30)) == [x * x for x in range(30)]


def test_an_exception_that_cannot_be_pickled_still_arrives():
    def bad(x):
        if x == 3:
            e = ValueError("has a lock")
            import threading

            e.lock = threading.Lock()
            raise e
        return x

    from adaptive_exec import AdaptiveExecError

    pf = parallelize(bad, backend="loky", chunksize=2)
    with pytest.raises((ValueError, AdaptiveExecError)) as info:
        pf.map(range(10))
    assert info.value.item_index == 3
    assert "has a lock" in str(info.value)


def test_a_dying_worker_raises_and_the_next_map_works():
    from adaptive_exec import WorkerCrashedError

    calibrate()  # a warm pool, so that item 400 runs in a worker, not in the caller
    pf = parallelize(functools.partial(h.die_on, at=400), backend="loky", chunksize=5)
    with pytest.raises(WorkerCrashedError) as info:
        pf.map(range(1000))
    assert isinstance(info.value, RuntimeError)
    assert "killed its worker" in str(info.value) and info.value.index == 400
    assert info.value.exitcode == 3
    assert parallelize(h.square, backend="loky").map(range(300)) == [x * x for x in range(300)]
