"""The public surface, the decorator's forms, and argument checking."""

from __future__ import annotations

import dataclasses
import functools
import pickle

import aex_helpers as h
import pytest

import adaptive_exec
from adaptive_exec import Plan, RunReport, adaptive_map, parallelize


def test_public_names():
    assert sorted(adaptive_exec.__all__) == sorted([
        "AdaptiveExecError", "CacheWarning", "Calibration", "ClusterError",
        "InitializerError", "ItemTimeoutError", "MissingDependencyError", "ParallelFunction",
        "Plan", "RemoteError", "ResultPicklingError", "RunReport", "UnpicklableWarning",
        "WorkerCrashedError", "adaptive_map", "calibrate", "parallelize",
    ])
    for name in adaptive_exec.__all__:
        assert hasattr(adaptive_exec, name)


def test_import_starts_nothing():
    import subprocess
    import sys

    code = (
        "import threading, sys, adaptive_exec;"
        "assert threading.active_count() == 1, threading.enumerate();"
        "assert 'loky' not in sys.modules and 'psutil' not in sys.modules, 'eager import'"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


def test_bare_and_with_options_keep_the_function():
    @parallelize
    def bare(x):
        """doc"""
        return x + 1

    @parallelize(max_workers=2, backend="serial")
    def opts(x):
        return x + 2

    assert bare(1) == 2 and opts(1) == 3
    assert bare.__name__ == "bare" and bare.__doc__ == "doc"
    assert bare.__wrapped__(1) == 2
    assert bare.map([1, 2]) == [2, 3]
    assert opts.map([1, 2]) == [3, 4]


def test_plain_calls_unchanged_and_timed():
    @parallelize
    def f(a, b=10, *, c=100):
        if a < 0:
            raise KeyError(a)
        return a + b + c

    assert f(1) == 111 and f(1, 2, c=3) == 6
    with pytest.raises(KeyError) as info:
        f(-1)
    assert not hasattr(info.value, "item_index")  # a plain call is not an item
    assert len(f._calls.durations) == 2  # the successful calls were kept as samples


def test_methods_can_be_parallelized():
    class Scaler:
        def __init__(self, k):
            self.k = k

        @parallelize
        def scale(self, x):
            return self.k * x

    s = Scaler(3)
    assert s.scale(2) == 6
    assert s.scale.map([1, 2, 3]) == [3, 6, 9]


def test_plan_and_report_are_frozen_records():
    pf = parallelize(h.square)
    assert pf.last_report is None
    assert pf.map(range(10)) == [x * x for x in range(10)]
    report = pf.last_report
    assert isinstance(report, RunReport) and isinstance(report.plan, Plan)
    for field in ("plan", "wall_s", "n_items", "n_sampled", "from_cache", "workers_timeline"):
        assert hasattr(report, field)
    for field in ("mode", "n_workers", "chunksize", "estimated_serial_s", "estimated_parallel_s",
                  "estimated_speedup", "reason", "from_cache", "features"):
        assert hasattr(report.plan, field)
    with pytest.raises(dataclasses.FrozenInstanceError):
        report.plan.mode = "parallel"  # type: ignore[misc]
    with pytest.raises(dataclasses.FrozenInstanceError):
        report.wall_s = 0  # type: ignore[misc]
    assert report.n_items == 10
    text = report.plan.explain()
    assert report.plan.reason in text and "pickle_size" in text


@pytest.mark.parametrize(
    ("kwargs", "error", "words"),
    [
        (dict(max_workers=-1), ValueError, "max_workers"),
        (dict(max_workers=0), ValueError, "positive"),
        (dict(max_workers="2"), TypeError, "max_workers"),
        (dict(backend="ray"), ValueError, "'auto'"),
        (dict(timeout=0), ValueError, "timeout"),
        (dict(timeout=-1.5), ValueError, "timeout"),
        (dict(chunksize=0), ValueError, "chunksize"),
        # Found by an adversarial review helper: a string taken for its truth ("no" drew
        # a bar), a dict's keys taken as the arguments, a type answered by ValueError.
        (dict(progress="no"), TypeError, "progress must be True or False"),
        (dict(strict="false"), TypeError, "strict"),
        (dict(cache="off"), TypeError, "cache"),
        (dict(initializer=h.square, initargs={"a": 1}), TypeError, "initargs"),
        (dict(chunksize="3"), TypeError, "chunksize"),
        (dict(chunksize=2.0), TypeError, "chunksize"),
        (dict(timeout="5"), TypeError, "timeout"),
        (dict(timeout=10**400), ValueError, "timeout"),  # too large for a float
        (dict(max_memory=__import__("fractions").Fraction(10**400)), ValueError,
         "max_memory"),
    ],
)
def test_bad_options_say_what_to_pass(kwargs, error, words):
    with pytest.raises(error, match=words):
        parallelize(h.square, **kwargs)
    with pytest.raises(error, match=words):
        adaptive_map(h.square, [1], **kwargs)


def test_plan_of_something_that_is_no_collection_says_what_to_pass():
    with pytest.raises(TypeError, match=r"plan\(\) needs a collection of items"):
        parallelize(h.square).plan(5)


def test_a_keyword_that_is_not_an_option_says_how_to_pass_arguments():
    """adaptive_map(power, items, p=3): the user meant an argument of power. The error
    lists the options and shows functools.partial and starmap, naming no internal class."""
    calls = [
        lambda: adaptive_map(h.add, range(5), b=3),
        lambda: parallelize(h.add, b=3),
        lambda: parallelize(b=3),
        lambda: parallelize(max_workers=2, b=3)(h.add),
    ]
    for call in calls:
        with pytest.raises(TypeError) as info:
            call()
        text = str(info.value)
        assert "'b'" in text and "not an option" in text, text
        assert "max_workers" in text and "initializer" in text, text
        assert "functools.partial" in text and "starmap" in text, text
        assert "ParallelFunction" not in text and "__init__" not in text, text
    typo = str(pytest.raises(TypeError, adaptive_map, h.add, [1], max_worker=3).value)
    assert "Did you mean 'max_workers'?" in typo, typo
    assert "functools.partial(add, b=...)" in str(
        pytest.raises(TypeError, adaptive_map, h.add, [1], b=3).value)


def test_a_keyword_given_to_a_map_method_says_where_options_go():
    """f.map(items, chunksize=3), the Pool.map habit: the error says the option belongs to
    parallelize(), and lists the options."""
    pf = parallelize(h.square)
    for call in (lambda: pf.map(range(5), chunksize=3),
                 lambda: list(pf.imap(range(5), chunksize=3)),
                 lambda: list(pf.imap_unordered(range(5), chunksize=3)),
                 lambda: pf.starmap([(1,)], chunksize=3)):
        with pytest.raises(TypeError) as info:
            call()
        text = str(info.value)
        assert "chunksize=... is an option" in text, text
        assert "parallelize(func, chunksize=...)" in text and "max_workers" in text, text


def test_adaptive_map_keeps_a_decorated_functions_options_unless_given():
    pf = parallelize(h.square, backend="serial")
    assert adaptive_map(pf, range(5)) == [x * x for x in range(5)]
    assert pf.last_report.plan.mode == "serial"
    assert adaptive_map(pf, range(5), max_workers=2) == [x * x for x in range(5)]


def test_bad_function_and_items():
    with pytest.raises(TypeError, match="callable"):
        parallelize(3)
    with pytest.raises(TypeError, match="iterable"):
        adaptive_map(h.square, 5)
    with pytest.raises(TypeError, match="iterable"):
        parallelize(h.square).imap(None)


def test_plan_refuses_a_one_shot_iterator():
    with pytest.raises(TypeError, match="list, tuple"):
        parallelize(h.square).plan(iter([1, 2, 3]))


def test_parallel_function_pickles():
    pf = parallelize(h.square, max_workers=2)
    clone = pickle.loads(pickle.dumps(pf))
    assert clone(4) == 16 and clone._options.max_workers == 2


def test_empty_input():
    pf = parallelize(h.square)
    assert pf.map([]) == [] and list(pf.imap(iter([]))) == [] and pf.starmap([]) == []
    assert pf.last_report.n_items == 0


def test_progress_bar_and_plan_log(capsys, caplog):
    import logging

    caplog.set_level(logging.INFO, logger="adaptive_exec")
    pf = parallelize(h.square, progress=True)
    assert pf.map(range(500)) == [x * x for x in range(500)]
    err = capsys.readouterr().err
    assert "500/500" in err and "it" in err  # tqdm's count and rate
    assert "map [serial]" in err  # the bar names what runs the items
    plans = [r for r in caplog.records if r.getMessage().startswith("plan for square")]
    assert len(plans) == 1 and "mode=serial" in plans[0].getMessage()
    assert list(pf.imap(range(50))) == [x * x for x in range(50)]
    assert "imap [serial]" in capsys.readouterr().err


# Found by an adversarial review helper (2026-12-04): what a loop or concurrent.futures
# takes, the library refused or got wrong.

def test_a_callable_whose_attributes_bear_our_names_still_maps():
    # functools.update_wrapper copied the callable's __dict__ over ours: its _options
    # replaced the map's options (AttributeError), its .map hid the method (TypeError).
    obj = h.NamesLikeOurs(3)
    expected = [obj(x) for x in range(6)]
    assert adaptive_map(obj, range(6)) == expected
    pf = parallelize(obj, max_workers=2)
    assert pf.map(range(6)) == expected and pf.plan(range(6)).mode in ("serial", "parallel")
    assert pf.plan == pf.plan and callable(pf.map)  # ours, not the callable's dict/str

    def g(x):
        return x + 1

    g.plan = "nightly"
    g.tag = "kept"
    pg = parallelize(g)
    assert pg.map(range(3)) == [1, 2, 3] and pg.tag == "kept"  # other attributes travel

    # functools.wraps's __wrapped__ is the function given, not the one it wraps.
    @functools.wraps(g)
    def doubled(x):
        return 2 * g(x)

    pd = parallelize(doubled)
    assert pd.__wrapped__ is doubled and pd.__wrapped__(1) == 4 and pd(1) == 4


def test_numpy_numbers_are_taken_as_options():
    np = pytest.importorskip("numpy")
    pf = parallelize(h.square, max_workers=np.int64(2), chunksize=np.int32(4),
                     timeout=np.float32(30), max_memory=np.int64(10**9))
    opts = pf._options
    assert (opts.max_workers, opts.chunksize, opts.timeout, opts.max_memory) == (
        2, 4, 30.0, 10**9)
    assert type(opts.max_workers) is int and type(opts.timeout) is float
    assert pf.map(range(5)) == [x * x for x in range(5)]


def test_int_like_options_without_numpy():
    class Count:  # any integer type (operator.index), as concurrent.futures takes it
        def __index__(self):
            return 2

    pf = parallelize(h.square, max_workers=Count(), chunksize=Count())
    assert (pf._options.max_workers, pf._options.chunksize) == (2, 2)
    with pytest.raises(TypeError, match="max_workers"):
        parallelize(h.square, max_workers=2.0)


def test_a_map_method_given_the_function_s_own_argument_points_to_partial():
    with pytest.raises(TypeError) as info:
        parallelize(h.add).map(range(3), b=3)
    text = str(info.value)
    assert "b=... is not an option" in text and "functools.partial(func, b=...)" in text
    assert "parallelize(func, b=...)" not in text, text  # which would fail too


def test_progress_bar_lets_recorders_record_the_function_s_warnings(capsys):
    import warnings

    for backend in ("serial", "loky"):
        with warnings.catch_warnings(record=True) as got:
            warnings.simplefilter("always")
            assert adaptive_map(h.warn_on, range(40), progress=True, backend=backend,
                                max_workers=2) == list(range(40))
        assert sorted(str(w.message) for w in got) == sorted(
            f"odd item {x}" for x in range(0, 40, 10)), (backend, got)
        assert "odd item" not in capsys.readouterr().err  # recorded, not printed
        with pytest.warns(UserWarning) as rec:
            adaptive_map(h.warn_on, range(40), progress=True, backend=backend, max_workers=2)
        assert len([w for w in rec if "odd item" in str(w.message)]) == 4, backend


def test_parallelize_below_classmethod_says_where_it_goes():
    with pytest.raises(TypeError, match="put @classmethod above @parallelize"):
        class Model:
            @parallelize
            @classmethod
            def run(cls, x):
                return x


@pytest.mark.timeout(60)
@pytest.mark.parametrize("value", ["false", "no", "off", "False", " 0 "])
def test_progress_variable_set_to_a_word_for_off_draws_no_bar(monkeypatch, capsys, value):
    # Only "" and "0" were off: ADAPTIVE_EXEC_PROGRESS=false drew a bar on stderr.
    monkeypatch.setenv("ADAPTIVE_EXEC_PROGRESS", value)
    assert adaptive_map(h.square, range(20), backend="serial") == [x * x for x in range(20)]
    assert "item/s" not in capsys.readouterr().err


@pytest.mark.timeout(60)
@pytest.mark.parametrize("name", ["ADAPTIVE_EXEC_PROGRESS", "ADAPTIVE_EXEC_DISABLE"])
def test_on_off_variables_refuse_other_values_before_any_item(monkeypatch, name):
    monkeypatch.setenv(name, "maybe")
    calls = []
    with pytest.raises(ValueError, match=f"{name} must be 1 .* or 0"):
        adaptive_map(calls.append, range(20), backend="serial")
    assert calls == []


@pytest.mark.timeout(60)
def test_disable_variable_set_to_false_leaves_the_map_adaptive(monkeypatch):
    monkeypatch.setenv("ADAPTIVE_EXEC_DISABLE", "false")
    pf = parallelize(h.square)
    assert pf.map(range(20)) == [x * x for x in range(20)]
    assert "ADAPTIVE_EXEC_DISABLE" not in pf.last_report.plan.reason


@pytest.mark.timeout(60)
def test_a_decorated_function_of_a_module_pickles_by_reference(tmp_path, monkeypatch):
    # @parallelize over a module's function: pickle (concurrent.futures, multiprocessing)
    # refused it, "Can't pickle <function sq>: it's not the same object as mod.sq".
    (tmp_path / "aex_decorated_mod.py").write_text(
        "from adaptive_exec import parallelize\n"
        "@parallelize\n"
        "def sq(x):\n"
        "    return x * x\n"
        "@parallelize(max_workers=2)\n"
        "def cube(x):\n"
        "    return x ** 3\n"
        "class K:\n"
        "    @parallelize\n"
        "    def m(self, x):\n"
        "        return x + 1\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    import aex_decorated_mod as mod

    for protocol in range(pickle.HIGHEST_PROTOCOL + 1):
        assert pickle.loads(pickle.dumps(mod.sq, protocol)) is mod.sq
        assert pickle.loads(pickle.dumps(mod.cube, protocol)) is mod.cube
        assert pickle.loads(pickle.dumps(mod.K.m, protocol)) is mod.K.m
        bound = pickle.loads(pickle.dumps(mod.K().m, protocol))  # by state, as before
        assert bound(1) == 2
    assert mod.cube._options.max_workers == 2
    # Not a module's attribute: pickled by its state, as before.
    clone = pickle.loads(pickle.dumps(parallelize(h.square, max_workers=2)))
    assert clone(4) == 16 and clone._options.max_workers == 2


def test_parallelize_below_staticmethod_says_where_it_goes():
    # Accepted, it was bound as a method: instance.run(3) called run(instance, 3).
    with pytest.raises(TypeError, match="put @staticmethod above @parallelize"):
        class Model:
            @parallelize
            @staticmethod
            def run(x):
                return x


def test_parallelize_above_staticmethod_works():
    class Model:
        @staticmethod
        @parallelize
        def run(x):
            return -x

    assert Model().run(3) == -3 and Model.run.map(range(3)) == [0, -1, -2]
    assert Model().run.map(range(3)) == [0, -1, -2]


class _Triple:
    def __call__(self, x):
        return x * 3


def test_a_class_attribute_binds_as_the_callable_it_wraps():
    # A builtin, a partial or a callable object in a class is not bound by Python
    # (obj.f(x) calls f(x)); parallelized, it was bound always: obj.f(x) called f(obj, x).
    class A:
        plain_abs, par_abs = abs, parallelize(abs)
        plain_part = functools.partial(divmod, 100)
        par_part = parallelize(functools.partial(divmod, 100))
        plain_obj, par_obj = _Triple(), parallelize(_Triple())

        @parallelize
        def method(self, x):
            return (type(self).__name__, x)

    a = A()
    assert a.par_abs(-2) == a.plain_abs(-2) == 2
    assert a.par_abs.map([-1, -2]) == [1, 2]
    assert a.par_part(7) == a.plain_part(7) and a.par_part.map([7]) == [a.plain_part(7)]
    assert a.par_obj(2) == a.plain_obj(2) == 6 and a.par_obj.map([1, 2]) == [3, 6]
    assert a.method(1) == ("A", 1) and a.method.map([1, 2]) == [("A", 1), ("A", 2)]
