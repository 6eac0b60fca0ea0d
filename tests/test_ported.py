"""Behaviour a map user relies on, ported from the test suites of our peers.

Each test names its origin in its docstring: mpire (``tests/``), joblib
(``joblib/test/test_parallel.py``), loky (``tests/``) and CPython
(``Lib/test/test_concurrent_futures/``). The tests are rewritten against our API, and
the expectation is always what a plain ``[f(x) for x in items]`` loop would do, unless
the docstring says where a process pool cannot (or we choose not to) behave like it.

How items reach real workers: ``backend="loky"`` forces the pool, ``_warm()`` makes
sure it is up (on a cold pool the caller itself works through items while the workers
start), and a function costing ``COST`` seconds stops sampling (which runs the first
items in the caller) after about ten items, so anything from item ``PAST`` on runs in
a worker process. Items that kill their process do so only inside a worker.

BaseException subclasses (SystemExit, KeyboardInterrupt) are caught with ``_outcome``
rather than ``pytest.raises``: one that arrived where another was expected would
otherwise end the whole pytest session.
"""

from __future__ import annotations

import dataclasses
import functools
import gc
import itertools
import math
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
import traceback
import warnings
import weakref

import aex_helpers as h
import pytest

from adaptive_exec import (
    AdaptiveExecError,
    ItemTimeoutError,
    Plan,
    RemoteError,
    UnpicklableWarning,
    WorkerCrashedError,
    adaptive_map,
    calibrate,
    parallelize,
)
from adaptive_exec import system as aex_system
from adaptive_exec.backends import loky as loky_backend
from adaptive_exec.errors import RemoteTraceback

COST = 0.002  # seconds per item: sampling (20 ms in the caller) stops after ~10 items
N = 80  # items per map in the worker tests
PAST = 40  # an index safely past the sample: it runs in a worker


# --------------------------------------------------------------------------------------
# Helpers (module level: the workers import this module to find them)
# --------------------------------------------------------------------------------------


def _warm() -> None:
    """A warm pool: every item past the sample goes to a worker, none to the caller."""
    if not loky_backend.is_warm(aex_system.usable_cpus()):
        calibrate()


def _outcome(fn):
    """(value, exception) of ``fn()``, catching BaseException too."""
    try:
        return fn(), None
    except BaseException as exc:  # noqa: BLE001 - SystemExit/KeyboardInterrupt are data here
        return None, exc


def _drain(iterator):
    """(results before the exception, the exception or None), BaseException included."""
    got = []
    try:
        for r in iterator:
            got.append(r)
    except BaseException as exc:  # noqa: BLE001
        return got, exc
    return got, None


def _next_map_works():
    pf = parallelize(costly_square, backend="loky")
    assert pf.map(range(60)) == [x * x for x in range(60)]


def costly_square(x):
    h.spin(COST)
    return x * x


def costly_pow(a, b):
    h.spin(COST)
    return pow(a, b)


def with_pid(x):
    h.spin(COST)
    return x * x, os.getpid()


def uneven(x):
    # Earlier items cost more than later ones: later chunks finish first.
    h.spin(0.006 if x % 5 == 0 else 0.001)
    return x * 3


def division(x, y):
    h.spin(COST)
    return x / y


def costly_divmod(pair):
    h.spin(COST)
    return divmod(*pair)


def f_kwargs(x, y=0, z=0):
    h.spin(COST)
    return x ** 2 + y + z


def nap(seconds):
    time.sleep(seconds)
    return seconds


def sleep_then_sqrt(x, slow_at=-1, slow_s=1.5):
    if x == slow_at:
        time.sleep(slow_s)
    else:
        h.spin(0.003)
    return math.sqrt(x * x)


def big_result(x):
    h.spin(COST)
    return bytes([x % 256]) * (1 << 20)  # 1 MiB: far past a pipe's buffer


def length_of(blob):
    h.spin(COST)
    return len(blob)


def tiny_add(x):
    return x + 1


class MyExceptionWithFinickyInit(Exception):
    """Its __init__ takes four arguments and does not pass them on."""

    def __init__(self, a, b, c, d):
        pass


def finicky_raiser(x):
    h.spin(COST)
    if x == PAST:
        raise MyExceptionWithFinickyInit("a", "b", "c", "d")
    return x


class TwoPartError(Exception):
    """Cannot be rebuilt from its args: pickle calls TwoPartError("7-seven")."""

    def __init__(self, code, detail):
        super().__init__(f"{code}-{detail}")
        self.code = code


def two_part_raiser(x):
    h.spin(COST)
    if x == PAST:
        raise TwoPartError(7, "seven")
    return x


def raise_123_at_past(x):
    h.spin(COST)
    if x == PAST:
        raise RuntimeError(123)  # the worker's own line, expected in the traceback
    return x


class FalseyBoolException(Exception):
    def __bool__(self):
        return False


class FalseyLenException(Exception):
    def __len__(self):
        return 0


def falsey_raiser(x, cls=FalseyBoolException):
    h.spin(COST)
    if x == PAST:
        raise cls("falsey but raised")
    return x


class StrFailsError(Exception):
    def __str__(self):
        raise RuntimeError("this exception cannot be turned into text")


def raise_str_fails(x, at=PAST, slow_value_error_at=None):
    if x == slow_value_error_at:
        h.spin(0.5)
        raise ValueError(f"value error at {x}")
    h.spin(COST)
    if x == at:
        raise StrFailsError(x)
    return x


def raise_timeout_error_at_past(x):
    h.spin(COST)
    if x == PAST:
        raise TimeoutError("the function's own time-out")
    return x


def exit_in_worker(x, at=PAST, code=99):
    h.spin(COST)
    if x == at and h.in_worker():
        os._exit(code)
    return x


def segfault_in_worker(x, at=PAST):
    h.spin(COST)
    if x == at and h.in_worker():
        import faulthandler

        faulthandler.disable()
        faulthandler._sigsegv()
    return x


def sigterm_in_worker(x, at=PAST):
    h.spin(COST)
    if x == at and h.in_worker():
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(5)
    return x


def crash_with_data(blob):
    h.spin(COST)
    if h.in_worker():
        os._exit(3)
    return len(blob)


def sys_exit_at(x, at=PAST):
    h.spin(COST)
    if x == at:
        sys.exit(1)
    return x


def interrupt_at(x, at=PAST):
    h.spin(COST)
    if x == at:
        raise KeyboardInterrupt
    return x


def slow_value_error_then_base(x, slow_at=20, base_at=60, base=SystemExit):
    if x == slow_at:
        h.spin(0.5)  # the earlier failure comes back last
        raise ValueError(f"value error at {x}")
    h.spin(COST)
    if x == base_at:
        raise base(5)
    return x


class Unpicklable:
    """Carries a lock, which neither pickle nor cloudpickle can copy."""

    def __init__(self, tag):
        self.tag = tag
        self.lock = threading.Lock()

    def __eq__(self, other):
        return isinstance(other, Unpicklable) and other.tag == self.tag

    def __hash__(self):
        return hash(self.tag)


def unpicklable_result_at_past(x):
    h.spin(COST)
    return Unpicklable(x) if x == PAST else x


def tag_of(item):
    h.spin(COST)
    return item.tag if isinstance(item, Unpicklable) else item


@dataclasses.dataclass(frozen=True)
class Point:
    x: int
    y: int


def scale_point(p):
    h.spin(COST)
    return Point(p.x * 2, p.y * 3)


class MyObject:
    def __init__(self, value=0):
        self.value = value

    def __repr__(self):
        return f"MyObject({self.value})"

    def __eq__(self, other):
        return isinstance(other, MyObject) and other.value == self.value

    def my_method(self, x):
        h.spin(COST)
        return self.value + x


def bump_object(obj):
    h.spin(COST)
    return MyObject(obj.value + 1)


class Scaler:
    def __init__(self, k):
        self.k = k

    @parallelize(backend="loky")
    def scale(self, x):
        h.spin(COST)
        return self.k * x, os.getpid()


class Multiplier:
    """A callable object carrying state."""

    def __init__(self, k):
        self.k = k

    def __call__(self, x):
        h.spin(COST)
        return self.k * x


def subtract(d):
    h.spin(COST)
    return d["x"] - d["y"]


def subtract_kw(*, x, y):
    return x - y


def subtract_unpacked(d):
    h.spin(COST)
    return subtract_kw(**d)


def inner_square(x):
    return x * x


def inner_raiser(x):
    if x == 3:
        raise ValueError("raised by the inner map")
    return x


def outer_with_nested(x):
    h.spin(0.025)  # so that sampling stops after one item and the rest goes to workers
    inner = parallelize(inner_square, backend="loky")
    return sum(inner.map(range(x))), inner.last_report.plan.mode, h.in_worker()


def outer_nested_or_raise(x):
    h.spin(0.025)
    if x == 5:
        raise ValueError("outer item 5")
    return sum(parallelize(inner_square, backend="loky").map(range(10)))


def outer_calls_failing_inner(x):
    h.spin(0.025)
    return parallelize(inner_raiser, backend="loky").map(range(6))


def concurrency_probe(x, folder):
    """How many items are running at this moment (one marker file each)."""
    marker = os.path.join(folder, f"{x}-{os.getpid()}")
    with open(marker, "w"):
        pass
    try:
        running = len(os.listdir(folder))
        h.spin(0.004)
    finally:
        os.remove(marker)
    return running


class Payload:
    """A weak-referenceable result of some size."""

    def __init__(self, x, size=0):
        self.x = x
        self.data = bytes(size)


def make_payload(x):
    h.spin(COST)
    return Payload(x, 100_000)


def payload_x(p):
    h.spin(COST)
    return p.x


def raising_generator(total, raise_at, exc=ValueError, msg="Iterator Raising Error"):
    for i in range(total):
        if i == raise_at:
            raise exc(msg)
        yield i


class SayWhenError(ValueError):
    pass


# --------------------------------------------------------------------------------------
# Ordering, inputs, outputs
# --------------------------------------------------------------------------------------


def test_results_in_input_order_from_real_workers():
    """joblib test_parallel.py::test_simple_parallel -- the pool's answer equals the
    loop's, in input order, even when later chunks finish before earlier ones."""
    _warm()
    items = list(range(200))
    assert adaptive_map(uneven, items, backend="loky", chunksize=3) == [uneven(x) for x in items]
    got = adaptive_map(with_pid, range(N), backend="loky")
    assert [r for r, _ in got] == [x * x for x in range(N)]
    assert {pid for _, pid in got} - {os.getpid()}, "no item ran in a worker"


def test_map_imap_unordered_and_starmap_agree_with_the_loop():
    """mpire tests/test_pool.py::MapTest::test_all_maps -- map, imap, imap_unordered and
    starmap all give the loop's results (unordered: the same multiset)."""
    _warm()
    pf = parallelize(costly_square, backend="loky")
    expected = [x * x for x in range(N)]
    assert pf.map(range(N)) == expected
    it = pf.imap(range(N))
    assert iter(it) is it and list(it) == expected
    assert sorted(pf.imap_unordered(range(N))) == expected
    pairs = [(i, 2) for i in range(N)]
    assert parallelize(costly_pow, backend="loky").starmap(pairs) == expected


def test_generator_input():
    """mpire tests/test_pool.py::MapTest::test_all_maps (input='generator') -- a
    generator is consumed once and gives the same results as a list."""
    _warm()
    pf = parallelize(costly_square, backend="loky")
    assert pf.map(x for x in range(N)) == [x * x for x in range(N)]
    assert list(pf.imap(iter(range(N)))) == [x * x for x in range(N)]
    assert sorted(pf.imap_unordered(x for x in range(N))) == [x * x for x in range(N)]


def test_empty_input_for_every_entry_point():
    """mpire tests/test_pool.py::MapTest::test_all_maps (input='empty list') and
    ProgressBarTest::test_no_input_data -- no items, no results, progress bar or not."""
    for progress in (False, True):
        pf = parallelize(costly_square, backend="loky", progress=progress)
        assert pf.map([]) == []
        assert list(pf.imap([])) == []
        assert list(pf.imap_unordered([])) == []
        assert pf.starmap([]) == []
        assert pf.last_report is not None and pf.last_report.n_items == 0


def test_exhausted_iterator():
    """joblib test_parallel.py::test_parallel_with_exhausted_iterator -- an iterator
    that is already used up is an empty input, not an error."""
    it = iter([1, 2, 3])
    list(it)
    assert adaptive_map(costly_square, it, backend="loky") == []
    assert list(parallelize(costly_square).imap(iter([]))) == []


def test_plan_of_empty_input():
    """mpire tests/test_pool.py::ProgressBarTest::test_no_input_data (this failed
    before) -- planning no items says so; it does not fail."""
    plan = parallelize(costly_square, backend="loky").plan([])
    assert isinstance(plan, Plan)
    assert plan.mode == "serial"


def test_results_larger_than_a_pipe_buffer():
    """mpire tests/test_pool.py::MapTest::test_all_maps (output='data exceeding pipe
    limits') -- 1 MiB results come back whole and in order."""
    _warm()
    out = adaptive_map(big_result, range(30), backend="loky")
    assert len(out) == 30
    assert all(len(b) == 1 << 20 and b[:1] == bytes([i]) and b[-1:] == bytes([i])
               for i, b in enumerate(out))


def test_large_items_reach_workers():
    """CPython test_concurrent_futures/test_deadlock.py::test_crash_big_data (the data
    half) and loky _test_process_executor.py::test_no_failure_on_large_data_send,
    scaled down -- 2 MiB items are sent to workers intact."""
    _warm()
    items = [bytes([i]) * ((2 << 20) + i) for i in range(24)]
    assert adaptive_map(length_of, items, backend="loky") == [len(b) for b in items]


def test_many_small_tasks():
    """joblib test_parallel.py::test_batching_auto_subprocesses -- many microsecond
    tasks on the pool give the loop's answer."""
    _warm()
    n = 20_000
    assert adaptive_map(tiny_add, range(n), backend="loky") == list(range(1, n + 1))


def test_starmap_with_tuples():
    """CPython test_concurrent_futures/executor.py::test_map -- map(pow, a, b) is our
    starmap over zipped tuples."""
    _warm()
    pf = parallelize(costly_pow, backend="loky")
    expected = list(map(pow, range(N), [2] * N))
    assert pf.starmap(zip(range(N), [2] * N)) == expected
    assert parallelize(costly_pow, backend="loky", chunksize=3).starmap(
        [(a, 2) for a in range(N)]) == expected


def test_chunksize_values_do_not_change_results():
    """CPython test_concurrent_futures/test_process_pool.py::test_map_chunksize -- any
    chunk size, smaller or larger than the input, gives the loop's answer."""
    _warm()
    pairs = [(a, a % 4) for a in range(40)]
    ref = [pow(a, b) for a, b in pairs]
    for chunksize in (1, 6, 40, 50):
        assert parallelize(costly_pow, backend="loky", chunksize=chunksize).starmap(pairs) == ref


def test_dict_items_are_passed_whole():
    """mpire tests/test_pool.py::MapTest::test_dictionary_input -- mpire unpacks dicts
    into keyword arguments; we pass each item as it is (as the loop does), and a
    function that unpacks one itself raises its own TypeError for a bad dict."""
    _warm()
    items = [{"x": 5, "y": 2}, {"y": 5, "x": 2}] * 30
    assert adaptive_map(subtract, items, backend="loky") == [3, -3] * 30
    bad = [{"x": i, "y": 1} for i in range(N)]
    bad[PAST] = {"x": 5, "z": 2}
    with pytest.raises(TypeError) as info:
        adaptive_map(subtract_unpacked, bad, backend="loky")
    assert info.value.item_index == PAST


# --------------------------------------------------------------------------------------
# Callables of every kind
# --------------------------------------------------------------------------------------


def test_partial_with_keyword_arguments():
    """joblib test_parallel.py::test_parallel_kwargs -- keyword arguments bound with
    functools.partial reach the workers."""
    _warm()
    assert adaptive_map(functools.partial(f_kwargs, y=1), range(N), backend="loky") == \
        [f_kwargs(x, y=1) for x in range(N)]
    assert adaptive_map(functools.partial(f_kwargs, y=1, z=2), range(N), backend="loky",
                        chunksize=7) == [x ** 2 + 3 for x in range(N)]


def test_lambda_expression():
    """joblib test_parallel.py::test_lambda_expression -- lambdas run in workers."""
    _warm()
    got = adaptive_map(lambda x: (h.spin(COST), x ** 2, os.getpid())[1:], range(N),
                       backend="loky")
    assert [r for r, _ in got] == [x ** 2 for x in range(N)]
    assert {pid for _, pid in got} - {os.getpid()}


def test_closures_from_one_factory_do_not_collapse():
    """loky tests/test_reusable_executor.py::test_interactively_defined_recursive_functions
    -- two closures of one factory, with different captured state, give their own
    results in the same workers; a recursive closure works."""
    _warm()

    def make_func(seed):
        def func(x):
            if x <= 0:
                h.spin(COST)
                return seed
            return func(x - 1) + 1

        return func

    assert adaptive_map(make_func(0), [5] * N, backend="loky") == [5] * N
    assert adaptive_map(make_func(1), [5] * N, backend="loky") == [6] * N


def test_bound_method_and_collected_instance():
    """loky _test_process_executor.py::test_no_stale_references -- a bound method runs
    in workers, and its instance is not kept alive by the map afterwards."""
    _warm()
    obj = MyObject(10)
    collected = threading.Event()
    ref = weakref.ref(obj, lambda _: collected.set())
    assert adaptive_map(obj.my_method, range(N), backend="loky") == [10 + x for x in range(N)]
    del obj
    gc.collect()
    assert collected.is_set() and ref() is None


def test_parallelized_method_on_a_class():
    """joblib test_parallel.py::test_parallel_with_interactively_defined_bound_method_loky
    -- a method decorated with @parallelize maps with its instance bound."""
    _warm()
    s = Scaler(3)
    got = s.scale.map(range(N))
    assert [r for r, _ in got] == [3 * x for x in range(N)]
    assert {pid for _, pid in got} - {os.getpid()}


def test_callable_object():
    """joblib test_parallel.py::test_parallel_kwargs, variant -- state carried by a
    callable object instead of keyword arguments."""
    _warm()
    assert adaptive_map(Multiplier(7), range(N), backend="loky") == [7 * x for x in range(N)]


def test_instances_of_a_test_module_class_round_trip():
    """loky _test_process_executor.py::test_serialization -- instances of a class of
    ours travel to workers and back with their state (no custom reducers)."""
    _warm()
    items = [MyObject(i) for i in range(N)]
    assert adaptive_map(bump_object, items, backend="loky") == [MyObject(i + 1) for i in range(N)]


def test_dataclasses_as_items_and_results():
    """joblib test_parallel.py::test_parallel_with_interactively_defined_functions_loky,
    in-module variant -- dataclass instances as items and as results."""
    _warm()
    items = [Point(i, -i) for i in range(N)]
    assert adaptive_map(scale_point, items, backend="loky") == [Point(2 * i, -3 * i)
                                                                 for i in range(N)]


def _run_script(tmp_path, code: str) -> subprocess.CompletedProcess:
    script = tmp_path / "script_under_test.py"
    script.write_text(textwrap.dedent(code))
    return subprocess.run([sys.executable, str(script)], capture_output=True, text=True,
                          timeout=90, cwd=str(tmp_path))


def test_main_defined_function_and_class_in_a_script(tmp_path):
    """joblib test_parallel.py::test_parallel_with_interactively_defined_functions_loky
    and loky tests/test_cloudpickle_wrapper.py::test_serialization_class_from_main -- a
    script's own function, partial and class (all in __main__, no __main__ guard) work
    as function, items and results."""
    proc = _run_script(tmp_path, """
        import functools, time
        from adaptive_exec import adaptive_map, calibrate

        class MyClass:
            def __init__(self, value):
                self.value = value

        def square(x, ignored=None, ignored2=None):
            end = time.perf_counter() + 0.002
            while time.perf_counter() < end:
                pass
            return MyClass(x.value ** 2)

        square2 = functools.partial(square, ignored2="something")
        calibrate()
        out = adaptive_map(square2, [MyClass(i) for i in range(80)], backend="loky")
        assert [o.value for o in out] == [i * i for i in range(80)], out
        print("ok")
    """)
    assert proc.returncode == 0 and "ok" in proc.stdout, proc.stderr[-3000:]


def test_main_redefined_helper_is_seen_by_the_next_map(tmp_path):
    """loky tests/test_reusable_executor.py::test_interactively_defined_nested_functions
    -- a helper redefined in __main__ between two maps of the same function is used by
    the second map, as the loop would use it."""
    proc = _run_script(tmp_path, """
        import time
        from adaptive_exec import calibrate, parallelize

        def inner_func(x):
            return -x

        @parallelize(backend="loky")
        def outer_func(x):
            end = time.perf_counter() + 0.002
            while time.perf_counter() < end:
                pass
            return inner_func(x)

        calibrate()
        assert outer_func.map(range(80)) == [-x for x in range(80)]

        def inner_func(x):
            return x

        got = outer_func.map(range(80))
        assert got == list(range(80)), got
        print("ok")
    """)
    assert proc.returncode == 0 and "ok" in proc.stdout, proc.stderr[-3000:]


def test_globals_update_at_each_map():
    """joblib test_parallel.py::test_globals_update_at_each_parallel_call -- a global the
    function reads, changed between two maps of the same function, is seen changed."""
    _warm()
    global MY_GLOBAL_VARIABLE
    MY_GLOBAL_VARIABLE = "original value"

    @parallelize(backend="loky")
    def check_globals(_x):
        h.spin(COST)
        return MY_GLOBAL_VARIABLE

    assert set(check_globals.map(range(N))) == {"original value"}
    MY_GLOBAL_VARIABLE = "changed value"
    assert set(check_globals.map(range(N))) == {"changed value"}


# --------------------------------------------------------------------------------------
# Exceptions raised by the function
# --------------------------------------------------------------------------------------


def test_exception_comes_back_as_itself_for_the_first_failing_item():
    """joblib test_parallel.py::test_error_capture -- ZeroDivisionError arrives as
    itself, naming the first failing item in input order."""
    _warm()
    pairs = [(i, 0 if i in (PAST, PAST + 10, 70) else 1) for i in range(N)]
    with pytest.raises(ZeroDivisionError) as info:
        parallelize(division, backend="loky", chunksize=4).starmap(pairs)
    assert type(info.value) is ZeroDivisionError
    assert info.value.item_index == PAST
    if sys.version_info >= (3, 11):
        assert any(f"item {PAST}" in note for note in info.value.__notes__)


def test_exception_with_finicky_init():
    """joblib test_parallel.py::test_error_capture (MyExceptionWithFinickyInit) -- an
    exception whose __init__ takes several arguments comes back as its own class."""
    _warm()
    with pytest.raises(MyExceptionWithFinickyInit) as info:
        adaptive_map(finicky_raiser, range(N), backend="loky")
    assert info.value.item_index == PAST


def test_exception_that_cannot_be_rebuilt_is_still_informative():
    """loky tests/test_reusable_executor.py::test_informative_error_when_fail_at_unpickle
    -- an exception whose __init__ does not match its args cannot be rebuilt from a
    pickle; the caller still learns the class, the message and the item."""
    _warm()
    with pytest.raises((TwoPartError, RemoteError)) as info:
        adaptive_map(two_part_raiser, range(N), backend="loky")
    exc = info.value
    assert exc.item_index == PAST
    assert "7-seven" in str(exc)
    if isinstance(exc, RemoteError):
        assert "TwoPartError" in str(exc)


def test_worker_traceback_is_the_cause():
    """CPython test_concurrent_futures/test_process_pool.py::test_traceback (and loky's)
    -- the exception is the original type and args, its __cause__ carries the worker's
    traceback with the raising line."""
    _warm()
    with pytest.raises(Exception) as info:
        adaptive_map(raise_123_at_past, range(N), backend="loky")
    exc = info.value
    assert type(exc) is RuntimeError
    assert exc.args == (123,)
    assert isinstance(exc.__cause__, RemoteTraceback)
    assert "raise RuntimeError(123)  # the worker's own line" in str(exc.__cause__)
    report = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
    assert "raise_123_at_past" in report


def test_imap_yields_the_results_before_the_error_then_stops():
    """CPython test_concurrent_futures/executor.py::test_map_exception -- the results
    before the failing item come first, then its exception; the iterator is then
    finished, as a generator over the loop would be."""
    _warm()
    pairs = [(5, 2)] * N
    pairs[PAST + 5] = (5, 0)
    it = parallelize(costly_divmod, backend="loky", chunksize=3).imap(pairs)
    got = [next(it) for _ in range(PAST + 5)]
    assert got == [(2, 1)] * (PAST + 5)
    with pytest.raises(ZeroDivisionError):
        next(it)
    with pytest.raises(StopIteration):
        next(it)


def test_falsey_exceptions_are_raised():
    """CPython test_concurrent_futures/executor.py::test_swallows_falsey_exceptions --
    an exception that is falsy (__bool__ or __len__) is still raised."""
    _warm()
    for cls in (FalseyBoolException, FalseyLenException):
        with pytest.raises(cls, match="falsey but raised") as info:
            adaptive_map(functools.partial(falsey_raiser, cls=cls), range(N), backend="loky")
        assert info.value.item_index == PAST


def test_exception_whose_str_raises():
    """CPython test_concurrent_futures/executor.py::test_swallows_falsey_exceptions,
    variant -- an exception whose __str__ itself raises still comes back as itself,
    for its item."""
    _warm()
    exc = _outcome(lambda: adaptive_map(raise_str_fails, range(N), backend="loky"))[1]
    assert type(exc) is StrFailsError, repr(type(exc))
    assert exc.item_index == PAST


def test_exception_whose_str_raises_does_not_overtake_an_earlier_error():
    """CPython test_concurrent_futures/executor.py::test_swallows_falsey_exceptions,
    variant -- with a slow ValueError at item 20 and a str-less exception at item 60,
    the loop raises the ValueError: so must the map."""
    _warm()
    fn = functools.partial(raise_str_fails, at=60, slow_value_error_at=20)
    exc = _outcome(lambda: adaptive_map(fn, range(N), backend="loky", chunksize=1))[1]
    assert type(exc) is ValueError, repr(type(exc))
    assert exc.item_index == 20


def test_timeout_error_raised_by_the_function_is_its_own():
    """CPython test_concurrent_futures/executor.py::test_map_timeout_from_callable -- a
    TimeoutError the function raises is not the map's timeout, timeout= or not."""
    _warm()
    for options in ({}, {"timeout": 60}):
        with pytest.raises(TimeoutError) as info:
            adaptive_map(raise_timeout_error_at_past, range(N), backend="loky", **options)
        assert type(info.value) is TimeoutError, options
        assert not isinstance(info.value, ItemTimeoutError)
        assert info.value.item_index == PAST


def test_a_map_after_an_error_still_works():
    """joblib test_parallel.py::test_error_capture (the pool stays usable after a
    caught exception) -- the same function maps again, and so does another."""
    _warm()
    pairs = [(i, 0 if i == PAST else 1) for i in range(N)]
    pf = parallelize(division, backend="loky")
    with pytest.raises(ZeroDivisionError):
        pf.starmap(pairs)
    good = [(i, 2) for i in range(N)]
    assert pf.starmap(good) == [i / 2 for i in range(N)]
    _next_map_works()


def test_remaining_work_is_abandoned_after_an_error(tmp_path):
    """joblib test_parallel.py::test_abort_backend -- after the first failure the map
    does not go on running the rest of the items."""
    _warm()
    path = str(tmp_path / "calls")

    def record_or_fail(x):
        if x == "a":
            raise TypeError("an integer is required")
        return h.record_call(path, 0, seconds=x)

    with pytest.raises(TypeError):
        adaptive_map(record_or_fail, ["a"] + [0.05] * 100, backend="loky")
    ran = open(path).read().count("\n") if os.path.exists(path) else 0
    assert ran < 20, ran
    _next_map_works()


def test_progress_bar_changes_neither_results_nor_errors():
    """mpire tests/test_pool.py::ExceptionTest::test_exceptions (progress_bar=True) --
    with a progress bar, map and imap_unordered raise the function's exception."""
    _warm()
    pairs = [(i, 0 if i == PAST else 1) for i in range(N)]
    pf = parallelize(division, backend="loky", progress=True)
    with pytest.raises(ZeroDivisionError):
        pf.starmap(pairs)
    with pytest.raises(ValueError):
        list(parallelize(functools.partial(h.fail_on, bad={PAST}), backend="loky",
                         progress=True).imap_unordered(range(N)))
    assert parallelize(costly_square, backend="loky", progress=True).map(range(N)) == \
        [x * x for x in range(N)]


def test_starmap_with_a_lambda_raising_zero_division():
    """mpire tests/test_pool.py::ExceptionTest::test_dill_deadlock -- a lambda over
    argument tuples raising ZeroDivisionError part-way raises it, no deadlock."""
    _warm()
    data = list(zip(range(0, 100), range(42, 142), range(10, -90, -1)))
    fn = lambda x, y, z: (h.spin(COST), x * y / z)[1]  # noqa: E731
    with pytest.raises(ZeroDivisionError) as info:
        parallelize(fn, backend="loky").starmap(data)
    assert info.value.item_index == 10
    with pytest.raises(ZeroDivisionError):
        for _ in parallelize(lambda t: fn(*t), backend="loky").imap(data):
            pass


# --------------------------------------------------------------------------------------
# Input iterators that fail
# --------------------------------------------------------------------------------------


def test_error_in_the_input_iterator():
    """joblib test_parallel.py::test_error_in_task_iterator -- the iterator's own
    exception is raised, whether at its start, in its middle or near its end."""
    _warm()
    pf = parallelize(costly_square, backend="loky")
    for raise_at in (0, 5, 19, 150):
        with pytest.raises(ValueError, match="Iterator Raising Error"):
            pf.map(raising_generator(200, raise_at))


def test_imap_yields_results_before_the_input_iterator_fails():
    """loky tests/test_reusable_executor.py::test_imap_handle_iterable_exception -- for
    any chunk size, imap yields every result before the failing input, then raises
    the iterator's exception."""
    _warm()
    for chunksize in (1, 2, 4):
        pf = parallelize(costly_square, backend="loky", chunksize=chunksize)
        got, exc = _drain(pf.imap(raising_generator(200, 150, SayWhenError, "when")))
        assert type(exc) is SayWhenError, (chunksize, exc)
        assert got == [x * x for x in range(150)], (chunksize, len(got))


# --------------------------------------------------------------------------------------
# Laziness, iterator protocol, memory
# --------------------------------------------------------------------------------------


def test_imap_on_an_infinite_iterable():
    """CPython test_concurrent_futures/executor.py::test_map_buffersize_on_infinite_iterable
    -- imap over an endless input gives its first results."""
    it = parallelize(str).imap(itertools.count())
    assert [next(it), next(it), next(it)] == ["0", "1", "2"]
    it.close()


def test_imap_on_a_range_too_large_for_len():
    """CPython test_concurrent_futures/executor.py::test_map_buffersize_on_infinite_iterable,
    variant -- range(10**20) has no len() (OverflowError), but is an ordinary input."""
    it = parallelize(tiny_add).imap(range(10 ** 20))
    assert [next(it) for _ in range(3)] == [1, 2, 3]
    it.close()


def test_imap_reads_only_a_bounded_stretch_ahead():
    """CPython test_concurrent_futures/executor.py::test_map_buffersize_when_buffer_is_full
    -- taking a few results from imap reads a bounded part of the input, not all of it."""
    ints = iter(range(10 ** 6))
    it = parallelize(tiny_add).imap(ints)
    assert [next(it) for _ in range(3)] == [1, 2, 3]
    it.close()
    assert next(ints) < 100_000


def test_imap_close_ends_the_iterator():
    """CPython test_concurrent_futures/executor.py::test_map_close -- after close(),
    the iterator is finished; the next map is unaffected."""
    _warm()
    pairs = [(5, 2)] * N
    pairs[1] = (5, 0)
    for chunksize in (None, 3):
        it = parallelize(costly_divmod, backend="loky", chunksize=chunksize).imap(pairs)
        assert next(it) == (2, 1)
        it.close()
        with pytest.raises(StopIteration):
            next(it)
        with pytest.raises(StopIteration):
            next(it)
    _next_map_works()


def test_dropped_imap_stops_its_work_and_the_next_map_runs(tmp_path):
    """joblib test_parallel.py::test_multiple_generator_call_separated_gc -- an imap
    dropped part-way stops dispatching, and another map runs to completion."""
    _warm()
    path = str(tmp_path / "calls")
    it = parallelize(functools.partial(h.record_call, path, seconds=0.05), backend="loky",
                     chunksize=1).imap(range(60))
    assert [next(it) for _ in range(3)] == [0, 2, 4]
    del it
    gc.collect()
    assert adaptive_map(costly_square, range(N), backend="loky") == [x * x for x in range(N)]
    with open(path) as f:
        ran = sum(1 for _ in f)
    assert ran < 30, ran


def test_imap_is_ordered():
    """joblib test_parallel.py::test_parallel_return_order_with_return_as_generator_parameter
    -- imap yields in input order even when later items finish first."""
    _warm()
    items = list(range(150))
    assert list(parallelize(uneven, backend="loky", chunksize=2).imap(items)) == \
        [uneven(x) for x in items]


def test_imap_unordered_returns_the_fastest_first():
    """joblib test_parallel.py::test_parallel_unordered_generator_returns_fastest_first
    -- a slow item does not hold back the results of the items after it."""
    _warm()
    fn = functools.partial(sleep_then_sqrt, slow_at=PAST)
    # Two workers whatever else keeps this machine busy: with one, nothing overtakes.
    aex_system.fake_readings(others=0.0)
    try:
        it = parallelize(fn, backend="loky", chunksize=1).imap_unordered(range(60))
        got = list(it)
    finally:
        aex_system.fake_readings()
    assert sorted(got) == [float(x) for x in range(60)]
    assert got[-1] == float(PAST)


def test_two_imaps_interleaved():
    """joblib test_parallel.py::test_multiple_generator_call_separated -- two lazy maps
    consumed in turns both give their own, complete results."""
    _warm()
    g = parallelize(costly_square, backend="loky").imap(range(N))
    g2 = parallelize(costly_square, backend="loky").imap_unordered(range(N, 2 * N))
    a, b = [], []
    for x, y in zip(g, g2):
        a.append(x)
        b.append(y)
    assert a == [x * x for x in range(N)]
    assert sorted(b) == [x * x for x in range(N, 2 * N)]


def test_map_while_an_imap_is_suspended():
    """mpire tests/test_pool.py::MapTest::test_mixing_map_calls -- mpire refuses a map
    while an imap is running on its pool; we allow it: both complete correctly."""
    _warm()
    pf = parallelize(costly_square, backend="loky")
    it = pf.imap(range(N))
    head = [next(it) for _ in range(15)]
    assert pf.map(range(N, 2 * N)) == [x * x for x in range(N, 2 * N)]
    assert head + list(it) == [x * x for x in range(N)]


def test_results_and_items_are_freed_after_the_map():
    """CPython test_concurrent_futures/executor.py::test_free_reference -- the map keeps
    no reference to results (nor to items) once the caller drops them."""
    _warm()
    items = [Payload(i) for i in range(N)]
    item_refs = [weakref.ref(p) for p in items]
    results = adaptive_map(make_payload, range(N), backend="loky")
    result_refs = [weakref.ref(r) for r in results]
    assert adaptive_map(payload_x, items, backend="loky") == list(range(N))
    del results, items
    gc.collect()
    assert sum(r() is not None for r in result_refs) == 0
    assert sum(r() is not None for r in item_refs) == 0


def test_imap_does_not_hoard_results():
    """CPython test_concurrent_futures/executor.py::test_free_reference (lazy form) --
    results the caller has dropped are not all kept alive while imap goes on."""
    _warm()
    refs = []
    n = 400
    for i, obj in enumerate(parallelize(make_payload, backend="loky").imap(range(n))):
        refs.append(weakref.ref(obj))
        del obj
        if i == n - 1:
            gc.collect()
            alive = sum(r() is not None for r in refs)
            assert alive < n // 2, alive
    gc.collect()
    assert sum(r() is not None for r in refs) == 0


# --------------------------------------------------------------------------------------
# Pickling problems: warning and serial run, or TypeError with strict=True
# --------------------------------------------------------------------------------------


def test_unpicklable_function_falls_back_or_raises_when_strict():
    """joblib test_parallel.py::test_parallel_pickling -- joblib raises PicklingError
    for an unpicklable callable; we warn once and run serially (strict: TypeError)."""
    lock = threading.Lock()

    def uses_lock(x):
        with lock:
            h.spin(COST)
            return x + 1

    _warm()
    with pytest.warns(UnpicklableWarning):
        assert adaptive_map(uses_lock, range(N), backend="loky") == [x + 1 for x in range(N)]
    with pytest.raises(TypeError):
        adaptive_map(uses_lock, range(N), backend="loky", strict=True)


def test_unpicklable_item_falls_back_or_raises_when_strict():
    """CPython test_concurrent_futures/test_deadlock.py::test_error_at_task_pickle --
    an item that cannot be pickled: a warning and the loop's answer (strict: TypeError)."""
    _warm()
    items = list(range(N))
    items[PAST] = Unpicklable("odd one")
    expected = [tag_of(x) for x in items]
    with pytest.warns(UnpicklableWarning):
        assert adaptive_map(tag_of, items, backend="loky") == expected
    with pytest.raises(TypeError):
        adaptive_map(tag_of, items, backend="loky", strict=True)
    _next_map_works()


def test_unpicklable_result_after_the_sample_falls_back_or_raises_when_strict():
    """CPython test_concurrent_futures/test_deadlock.py::test_error_during_result_pickle_on_worker
    -- a result that cannot travel back from a worker (not among the sampled ones): a
    warning and the loop's answer (strict: TypeError)."""
    _warm()
    expected = [unpicklable_result_at_past(x) for x in range(N)]
    with pytest.warns(UnpicklableWarning):
        got = adaptive_map(unpicklable_result_at_past, range(N), backend="loky")
    assert got == expected
    with pytest.raises(TypeError):
        adaptive_map(unpicklable_result_at_past, range(N), backend="loky", strict=True)
    _next_map_works()


# --------------------------------------------------------------------------------------
# Nested maps
# --------------------------------------------------------------------------------------


def test_nested_map_runs_serially_inside_workers():
    """joblib test_parallel.py::test_nested_parallel_warnings and test_nested_loop --
    a map inside a worker runs serially there (no pool of pools) and is right."""
    _warm()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing to warn about
        got = adaptive_map(outer_with_nested, [5, 6, 7, 8, 9, 10, 11, 12], backend="loky")
    assert [s for s, _, _ in got] == [sum(i * i for i in range(x)) for x in range(5, 13)]
    in_workers = [mode for _, mode, worker in got if worker]
    assert in_workers, "no outer item ran in a worker"
    assert set(in_workers) == {"serial"}


def test_nested_maps_with_an_exception():
    """joblib test_parallel.py::test_nested_loop_with_exception_with_loky -- one outer
    item raises while others run nested maps: its exception arrives."""
    _warm()
    with pytest.raises(ValueError, match="outer item 5") as info:
        adaptive_map(outer_nested_or_raise, range(8), backend="loky", chunksize=1)
    assert info.value.item_index == 5
    _next_map_works()


def test_nested_exception_reaches_the_caller_with_both_functions():
    """joblib test_parallel.py::test_nested_exception_dispatch (xfail in joblib) -- an
    exception from an inner map's item, inside a worker, arrives as itself with both
    functions named in the report."""
    _warm()
    with pytest.raises(ValueError, match="raised by the inner map") as info:
        adaptive_map(outer_calls_failing_inner, range(6), backend="loky")
    exc = info.value
    assert type(exc) is ValueError
    report = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
    assert "outer_calls_failing_inner" in report
    assert "inner_raiser" in report


# --------------------------------------------------------------------------------------
# Workers that die, BaseException from the function
# --------------------------------------------------------------------------------------


def test_worker_exiting_abruptly_raises_worker_crashed_error():
    """CPython test_concurrent_futures/test_process_pool.py::
    test_traceback_when_child_process_terminates_abruptly and loky
    _test_process_executor.py::test_exited_child -- os._exit(99) in a worker
    raises WorkerCrashedError naming the item and the exit code; the next map works."""
    _warm()
    with pytest.raises(WorkerCrashedError) as info:
        adaptive_map(exit_in_worker, range(N), backend="loky", chunksize=1)
    err = info.value
    assert isinstance(err, RuntimeError)
    assert err.index == PAST and err.exitcode == 99
    assert "99" in str(err)
    _next_map_works()


def test_segfault_in_a_worker():
    """CPython test_concurrent_futures/test_deadlock.py::test_crash_during_func_exec_on_worker
    -- a segfault in a worker is a WorkerCrashedError (no hang); the next map works."""
    _warm()
    with pytest.raises(WorkerCrashedError) as info:
        adaptive_map(segfault_in_worker, range(N), backend="loky", chunksize=1)
    assert info.value.index == PAST
    assert info.value.exitcode == -signal.SIGSEGV
    _next_map_works()


def test_terminated_worker():
    """CPython test_concurrent_futures/test_process_pool.py::test_killed_child and mpire
    tests/test_pool.py::ExceptionTest::test_defunct_processes_kill_map -- a worker
    terminated by a signal gives a RuntimeError (WorkerCrashedError) naming it."""
    _warm()
    with pytest.raises(RuntimeError) as info:
        adaptive_map(sigterm_in_worker, range(N), backend="loky", chunksize=1)
    assert isinstance(info.value, WorkerCrashedError)
    assert info.value.index == PAST and info.value.exitcode == -signal.SIGTERM
    _next_map_works()


def test_crash_while_big_data_is_in_flight():
    """CPython test_concurrent_futures/test_deadlock.py::test_crash_big_data -- workers
    dying while large items are in flight raise WorkerCrashedError, not a deadlock."""
    _warm()
    data = "a" * (1 << 20)
    with pytest.raises(WorkerCrashedError):
        adaptive_map(crash_with_data, [data] * 30, backend="loky", chunksize=1)
    _next_map_works()


def test_sys_exit_in_a_worker_comes_back_as_system_exit():
    """CPython test_concurrent_futures/test_deadlock.py::test_exit_during_func_exec_on_worker
    and mpire tests/test_pool.py::ExceptionTest::test_defunct_processes_exit -- sys.exit()
    in the function raises SystemExit in the caller, as the loop would."""
    _warm()
    _, exc = _outcome(lambda: adaptive_map(sys_exit_at, range(N), backend="loky"))
    assert type(exc) is SystemExit, repr(exc)
    assert exc.code == 1
    _next_map_works()


def test_keyboard_interrupt_raised_by_the_function():
    """joblib test_parallel.py::test_error_capture (interrupt_raiser) -- a
    KeyboardInterrupt raised by the function in a worker arrives as such, and the
    next map works."""
    _warm()
    _, exc = _outcome(lambda: adaptive_map(interrupt_at, range(N), backend="loky"))
    assert type(exc) is KeyboardInterrupt, repr(exc)
    _next_map_works()


def test_base_exception_in_imap_after_the_results_before_it():
    """mpire tests/test_pool.py::ExceptionTest::test_defunct_processes_exit, lazy form --
    imap yields every result before the item that calls sys.exit, then SystemExit."""
    _warm()
    got, exc = _drain(parallelize(sys_exit_at, backend="loky", chunksize=2).imap(range(N)))
    assert type(exc) is SystemExit, repr(exc)
    assert got == list(range(PAST))
    _next_map_works()


@pytest.mark.parametrize("base", [SystemExit, KeyboardInterrupt])
def test_base_exception_does_not_overtake_an_earlier_error(base):
    """joblib test_parallel.py::test_error_capture (ZeroDivisionError and
    KeyboardInterrupt in one suite) -- the first failing item in input order wins:
    a slow ValueError at item 20 beats a fast SystemExit/KeyboardInterrupt at item 60."""
    _warm()
    fn = functools.partial(slow_value_error_then_base, base=base)
    _, exc = _outcome(lambda: adaptive_map(fn, range(N), backend="loky", chunksize=1))
    assert type(exc) is ValueError, repr(exc)
    assert exc.item_index == 20
    _next_map_works()


# --------------------------------------------------------------------------------------
# Timeouts
# --------------------------------------------------------------------------------------


def test_timeout_not_reached():
    """joblib test_parallel.py::test_parallel_timeout_success and mpire
    tests/test_pool.py::TimeoutTest::test_worker_task_timeout (well below) -- a generous
    timeout changes nothing."""
    assert adaptive_map(nap, [0.001] * 10, backend="loky", timeout=30) == [0.001] * 10
    assert list(parallelize(nap, timeout=100).imap([0.0] * 10)) == [0.0] * 10


def test_timeout_exceeded():
    """joblib test_parallel.py::test_parallel_timeout_fail -- items far slower than the
    timeout raise ItemTimeoutError (a TimeoutError); the next map works."""
    with pytest.raises(TimeoutError) as info:
        adaptive_map(nap, [10] * 10, backend="loky", timeout=0.3)
    assert isinstance(info.value, ItemTimeoutError)
    assert isinstance(info.value, AdaptiveExecError)
    assert info.value.item_index in (0, 1)
    _next_map_works()


def test_timeout_exceeded_in_imap_and_imap_unordered():
    """joblib test_parallel.py::test_parallel_timeout_fail_with_generator -- the lazy
    forms raise too, and fast items with a high timeout do not."""
    for lazy in ("imap", "imap_unordered"):
        pf = parallelize(nap, backend="loky", timeout=0.3)
        with pytest.raises(ItemTimeoutError):
            list(getattr(pf, lazy)([10] * 10))
        fast = parallelize(nap, backend="loky", timeout=10)
        assert sorted(getattr(fast, lazy)([0.01] * 10)) == [0.01] * 10


def test_timeout_in_imap_keeps_the_results_before_it():
    """CPython test_concurrent_futures/executor.py::test_map_timeout -- the results of
    the items before the slow one are yielded, then the timeout; then the iterator is
    finished. Our timeout is per item and does not count the pool's start-up."""
    it = parallelize(time.sleep, backend="loky", timeout=0.5).imap([0, 0, 30])
    got, exc = _drain(it)
    assert isinstance(exc, ItemTimeoutError), repr(exc)
    assert exc.item_index == 2
    assert got == [None, None]
    with pytest.raises(StopIteration):
        next(it)


# --------------------------------------------------------------------------------------
# Workers: caps, reuse, threads
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("max_workers", [1, 2])
def test_max_workers_caps_concurrency(tmp_path, max_workers):
    """CPython test_concurrent_futures/test_process_pool.py::test_saturation and joblib
    test_parallel.py::test_effective_n_jobs -- never more items run at once than
    max_workers allows, even on a pool started larger."""
    _warm()
    folder = tmp_path / "running"
    folder.mkdir()
    fn = functools.partial(concurrency_probe, folder=str(folder))
    running = adaptive_map(fn, range(200), backend="loky", max_workers=max_workers)
    assert max(running) <= max_workers, max(running)


def test_pool_is_kept_alive_between_maps():
    """mpire tests/test_pool.py::KeepAliveTest::test_keep_alive -- consecutive maps
    reuse the same worker processes instead of starting new ones."""
    _warm()
    first = {pid for _, pid in adaptive_map(with_pid, range(N), backend="loky")}
    second = {pid for _, pid in adaptive_map(with_pid, range(N), backend="loky")}
    workers_first = first - {os.getpid()}
    workers_second = second - {os.getpid()}
    assert workers_first and workers_second
    assert workers_second <= workers_first | set(loky_backend.worker_pids())
    assert workers_first & workers_second


def test_different_functions_one_after_another_on_a_kept_pool():
    """mpire tests/test_pool.py::KeepAliveTest::test_keep_alive_map_params_change --
    switching functions between maps on the same workers uses the right one each time."""
    _warm()
    f1 = functools.partial(f_kwargs, y=1)
    f2 = Multiplier(3)
    for fn, expected in ((f1, [x * x + 1 for x in range(N)]), (f2, [3 * x for x in range(N)]),
                         (f1, [x * x + 1 for x in range(N)]), (costly_square,
                                                               [x * x for x in range(N)])):
        assert adaptive_map(fn, range(N), backend="loky") == expected


def test_map_started_from_a_thread():
    """mpire tests/test_pool.py::PoolInThreadTest::test_start_methods -- a map called
    from a thread other than the main one works."""
    out = {}

    def run():
        assert threading.current_thread() is not threading.main_thread()
        out["r"] = adaptive_map(costly_square, range(N), backend="loky")

    t = threading.Thread(target=run)
    t.start()
    t.join(60)
    assert out.get("r") == [x * x for x in range(N)]


def test_concurrent_maps_from_several_threads():
    """loky _test_process_executor.py::test_thread_safety -- maps run concurrently from
    several threads on the shared pool each get their own, right results."""
    _warm()
    results: dict[int, object] = {}

    def work(idx):
        try:
            a = adaptive_map(costly_square, range(idx, idx + 60), backend="loky")
            b = adaptive_map(functools.partial(f_kwargs, y=idx), range(40), backend="loky")
            assert a == [x * x for x in range(idx, idx + 60)]
            assert b == [x * x + idx for x in range(40)]
            results[idx] = "ok"
        except BaseException as exc:  # noqa: BLE001 - reported by the main thread
            results[idx] = exc

    threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert results == {i: "ok" for i in range(4)}, results


# --------------------------------------------------------------------------------------
# Options: checked up front, keyword-only
# --------------------------------------------------------------------------------------


def test_invalid_max_workers():
    """CPython test_concurrent_futures/executor.py::test_max_workers_negative (and
    loky's) -- 0 and negatives are ValueErrors that name max_workers; a non-int is a
    TypeError."""
    for number in (0, -1):
        with pytest.raises(ValueError, match="max_workers"):
            parallelize(costly_square, max_workers=number)
        with pytest.raises(ValueError, match="max_workers"):
            adaptive_map(costly_square, [1], max_workers=number)
    for bad in ("2", 2.5):
        with pytest.raises(TypeError, match="max_workers"):
            parallelize(costly_square, max_workers=bad)


def test_invalid_backend():
    """joblib test_parallel.py::test_invalid_backend -- an unknown backend is a
    ValueError listing the valid ones."""
    with pytest.raises(ValueError, match="backend") as info:
        parallelize(costly_square, backend="unit-testing")
    assert "'loky'" in str(info.value) and "'serial'" in str(info.value)
    with pytest.raises(ValueError, match="backend"):
        adaptive_map(costly_square, [1], backend="unit-testing")


def test_invalid_chunksize():
    """CPython test_concurrent_futures/test_process_pool.py::test_map_chunksize (bad_map)
    and joblib test_parallel.py::test_invalid_batch_size -- a chunk size below one, or
    not an int, is refused before anything runs."""
    for bad in (-1, 0, 2.5, "3", True):
        with pytest.raises((ValueError, TypeError), match="chunksize"):
            adaptive_map(costly_square, range(40), chunksize=bad)


def test_invalid_timeout():
    """mpire tests/test_params.py::CheckMapParametersTest::test_timeout -- timeouts must
    be positive numbers of seconds (or None); NaN is not one."""
    for ok in (None, 0.5, 1, 100.5, int(1e8)):
        parallelize(costly_square, timeout=ok)
    for bad in (0, -1, "3", {8}, float("nan")):
        with pytest.raises((ValueError, TypeError), match="timeout"):
            parallelize(costly_square, timeout=bad)


def test_options_are_keyword_only():
    """CPython test_concurrent_futures/executor.py::test_submit_keyword (submit(fn=...)
    and unknown keywords are TypeErrors) -- options cannot be passed by position, nor
    misspelt, and adaptive_map's function and items are positional."""
    with pytest.raises(TypeError):
        parallelize(costly_square, 2)  # type: ignore[misc]
    with pytest.raises(TypeError):
        adaptive_map(costly_square, [1], max_worker=2)
    with pytest.raises(TypeError):
        adaptive_map(func=costly_square, items=[1])  # type: ignore[call-arg]
    with pytest.raises(TypeError):
        parallelize(max_workers=2)(costly_square).map([1], chunksize=2)  # type: ignore[call-arg]
