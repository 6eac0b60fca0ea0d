"""What people read: str(RunReport), Plan.explain(), the progress bar and the log lines.

Real maps throughout (real worker processes where the pool is involved); the load
monitor's readings go through system's test seam where a test needs a given load (the
same behaviour runs on a real busy process in test_load.py).
"""

from __future__ import annotations

import contextlib
import functools
import logging
import re
import sys
import threading
import time
from typing import Iterator

import aex_helpers as h
import pytest

from adaptive_exec import adaptive_map, dispatch, parallelize, system
from adaptive_exec.adapt import monitor
from adaptive_exec.api import make_options
from adaptive_exec.records import Features, Plan, RunReport, fmt_s, fmt_speedup
from adaptive_exec.system import usable_cpus

needs_two = pytest.mark.skipif(usable_cpus() < 2, reason="needs 2 usable CPUs")

# A reason's estimate: the pool's, the loop's, and (for a plan that runs) the speedup.
ESTIMATE = re.compile(r"estimated at (\S+ \S+) in all, against (\S+ \S+) for the loop "
                      r"\((\d+\.\d\dx)?")
# A number with its unit, as fmt_s writes one.
SECONDS = r"\d+\.\d+ (?:s|ms|µs|ns)"


def work(x):
    h.spin(0.01)
    return x


def slowish(x):
    h.spin(0.05)
    return x


def explain_value(text: str, line: str) -> str:
    """The value of ``line:`` in an explain() text, without "(estimated)"."""
    found = re.search(rf"^{line}:\s+(.*?)(?: \(estimated\))?$", text, re.M)
    assert found, text
    return found.group(1)


# --- str(RunReport) ---------------------------------------------------------------------

def test_a_pool_map_reads_as_one_short_line_and_says_from_cache():
    pf = parallelize(work, backend="loky")  # the pool, whatever the estimate
    assert pf.map(range(120)) == list(range(120))
    first = pf.last_report
    line = str(first)
    # A run whose items took other than planned (beside a busy core: 5.7 ms in the
    # workers, 12.7 planned) says so after the line, in the same line.
    head, *rest = line.split("; ")
    assert rest == ([first.adjusted] if first.adjusted else []), line
    assert "\n" not in line and len(head) < 120, line
    assert re.fullmatch(rf"parallel, \d+ process(es)?, chunks of \d+, 120 items in {SECONDS}, "
                        rf"estimated {SECONDS}", head), line
    assert f"{first.plan.n_workers} process" in line
    assert f"chunks of {first.plan.chunksize}," in line
    assert f"estimated {fmt_s(first.plan.estimated_parallel_s)}" in line
    pf.map(range(120))
    again = str(pf.last_report)
    head = again.split("; ")[0]  # (an adjustment, as above, follows it)
    assert head.endswith(", from cache") and head.startswith("parallel, "), again
    # repr stays the dataclass's: every field, for debugging.
    assert repr(pf.last_report).startswith("RunReport(plan=Plan(mode='parallel'")


def test_serial_and_threads_maps_read_as_what_ran_them():
    pf = parallelize(h.square)
    pf.map(range(120))
    line = str(pf.last_report)
    assert re.fullmatch(rf"serial in the caller, 120 items in {SECONDS}, estimated {SECONDS}",
                        line), line
    assert f"estimated {fmt_s(pf.last_report.plan.estimated_serial_s)}" in line

    waits = parallelize(h.sleepy)
    assert waits.map(range(60)) == [x + 1 for x in range(60)]
    report = waits.last_report
    assert report.plan.mode == "threads", report.plan.reason
    assert re.fullmatch(rf"{report.plan.n_workers} threads, chunks of \d+, 60 items in "
                        rf"{SECONDS}, estimated {SECONDS}", str(report)), str(report)

    empty = parallelize(h.square)
    empty.map([])
    assert str(empty.last_report).startswith("serial in the caller, no items")


def test_a_dask_map_reads_as_the_cluster():
    distributed = pytest.importorskip("distributed")
    with distributed.LocalCluster(n_workers=1, threads_per_worker=2, processes=False,
                                  dashboard_address=None) as cluster, \
            distributed.Client(cluster) as client:
        pf = parallelize(work, client=client)
        assert pf.map(range(40)) == list(range(40))
    line = str(pf.last_report)
    assert re.match(r"dask cluster, \d+ threads?, chunks of \d+, 40 items in ", line), line


def test_a_dask_report_counts_threads_not_tasks_in_flight():
    # Two chunks per cluster thread are in flight (README: "two per worker thread in
    # flight"); the line said "2 tasks in flight" for a 2-thread cluster holding 4.
    plan = Plan("distributed", 2, 10, 1.0, 0.5, 2.0, "why", False, {"n_samples": 3})
    line = str(RunReport(plan, 0.4, 40, 3, False))
    assert line.startswith("dask cluster, 2 threads, chunks of 10, 40 items in "), line


# --- explain() and the reasons: people's units, one number per quantity --------------------

def test_explain_reads_in_human_units():
    pf = parallelize(work, backend="loky")
    plan = pf.plan(range(120))
    text = plan.explain()
    # No raw float anywhere (3.1753815413410654e-09), no raw byte count, no True/False.
    assert not re.search(r"\d\.\d{5,}|\de-\d|\bTrue\b|\bFalse\b|\bNone\b", text), text
    assert "from cache:  no" in text
    assert re.search(r"cost of moving a byte\s+\d+\.\d (ns|µs)/byte \(\d+\.\d [KMG]B/s\)",
                     text), text
    memory = plan.features["available_memory"]
    if memory is not None:
        assert re.search(r"available memory\s+\d+\.\d [KMG]B", text), text
        assert str(memory) not in text
    assert re.search(r"CPU share of a call\s+\d+(\.\d)?%", text), text
    assert re.search(r"time per item\s+\d+\.\d ms", text), text
    assert re.search(r"pool start-up\s+" + SECONDS, text), text
    assert re.search(r"items and results pickle\s+yes", text), text
    # Each feature has a label; its key is still named, to find it in plan.features.
    for key in plan.features:
        assert f"({key})" in text


def test_the_reason_explain_and_the_report_show_the_same_estimate():
    pf = parallelize(work, backend="loky")
    pf.map(range(120))
    report = pf.last_report
    plan = report.plan
    text = plan.explain()
    said = ESTIMATE.search(plan.reason)
    assert said, plan.reason
    assert said.group(1) == explain_value(text, "parallel") == fmt_s(plan.estimated_parallel_s)
    assert said.group(2) == explain_value(text, "serial") == fmt_s(plan.estimated_serial_s)
    assert said.group(3) == explain_value(text, "speedup") == fmt_speedup(
        plan.estimated_speedup)
    assert f"estimated {said.group(1)}" in str(report)

    # A serial plan names the best pool's estimate: the one explain() shows. (The load
    # is set to none: a pool too few free CPUs rule out is not estimated at all.)
    system.fake_readings(others=0.0)
    try:
        serial = parallelize(h.square).plan(range(20_000))
    finally:
        system.fake_readings()
    assert serial.mode == "serial", serial.reason
    said = ESTIMATE.search(serial.reason)
    assert said, serial.reason
    assert said.group(1) == explain_value(serial.explain(), "parallel")
    assert said.group(2) == explain_value(serial.explain(), "serial")
    assert f"a speedup of {explain_value(serial.explain(), 'speedup')}" in serial.reason


def test_a_plan_without_a_pool_estimate_says_so():
    plan = parallelize(h.square, backend="serial").plan(range(50))
    text = plan.explain()
    assert "parallel:    not estimated" in text and "workers:     none" in text


# --- the bar and the log lines ------------------------------------------------------------

@contextlib.contextmanager
def console_log() -> Iterator[logging.Handler]:
    """A console handler on the root logger, as logging.basicConfig(level=INFO) sets, on
    the stderr capsys captures now (made in the test itself: each phase of a test gets a
    capture stream of its own)."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(levelname)s:%(name)s:%(message)s"))
    root = logging.getLogger()
    ours = logging.getLogger("adaptive_exec")
    old_level = ours.level
    ours.setLevel(logging.INFO)
    root.addHandler(handler)
    try:
        yield handler
    finally:
        root.removeHandler(handler)
        ours.setLevel(old_level)


def segments(err: str) -> list[str]:
    """What a terminal shows as separate writes: split at carriage returns and newlines."""
    return re.split(r"[\r\n]", err)


def test_the_bar_is_named_for_what_runs_and_logs_go_above_it(capsys):
    pf = parallelize(h.square, progress=True)
    with console_log() as handler:
        assert pf.map(range(120)) == [x * x for x in range(120)]
    err = capsys.readouterr().err
    assert "map [serial]" in err and "120/120" in err
    logged = [s for s in segments(err) if "adaptive_exec:plan for square" in s]
    # The record is a line of its own: not written after the bar's text on its line.
    assert logged and all(s.startswith("INFO:adaptive_exec:plan for square") for s in logged), \
        err
    assert re.search(r"(^|[\r\n])INFO:adaptive_exec:plan for square[^\r\n]*\n", err), err
    # After the bar, the root's handler prints our records itself again, filter-free.
    assert not handler.filters

    pool = parallelize(work, progress=True, backend="loky")
    pool.starmap([(x,) for x in range(40)])
    err = capsys.readouterr().err
    n = pool.last_report.plan.n_workers
    assert f"starmap [{n} process{'es' if n > 1 else ''}]" in err, err

    waits = parallelize(h.sleepy, progress=True)
    waits.map(range(60))
    err = capsys.readouterr().err
    assert waits.last_report.plan.mode == "threads"
    assert f"map [{waits.last_report.plan.n_workers} threads]" in err, err


def test_the_users_log_lines_and_warnings_go_above_the_bar_too(capsys):
    """An item run in the caller logs, or warns, while the bar is shown: each is a line
    of its own, not written onto the bar's line; afterwards logging and warnings are as
    they were."""
    import warnings

    other = logging.getLogger("not_ours")
    other.setLevel(logging.INFO)
    shown_before = warnings.showwarning

    def logs(x):
        if x == 300:
            other.info("from the user's code")
        if x == 301:
            warnings.warn("a warning of the user's", UserWarning, stacklevel=1)
        return x

    with console_log() as handler, warnings.catch_warnings(record=True) as recorded:
        warnings.simplefilter("always")
        parallelize(logs, progress=True, backend="serial").map(range(1000))
        assert not handler.filters
    assert [str(w.message) for w in recorded] == ["a warning of the user's"]
    err = capsys.readouterr().err
    parts = segments(err)
    assert any(p == "INFO:not_ours:from the user's code" for p in parts), err
    assert re.search(r"(^|[\r\n])INFO:not_ours:from the user's code\n", err), err
    assert warnings.showwarning is shown_before
    # pytest records every test's warnings (catch_warnings(record=True)), and a recorder
    # gets them, bar or not: shown above the bar where nothing records them, in a script.
    import subprocess

    code = ("import warnings\n"
            "from adaptive_exec import parallelize\n"
            "def warns(x):\n"
            "    if x == 301:\n"
            "        warnings.warn(\"a warning of the user's\", UserWarning, stacklevel=1)\n"
            "    return x\n"
            "assert parallelize(warns, progress=True, backend='serial').map(range(1000))"
            " == list(range(1000))\n")
    err = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=120, check=True).stderr
    assert re.search(r"(^|[\r\n])\S+:\d+: UserWarning: a warning of the user's\n", err), err


# --- the load monitor: one INFO line when the busy workers change, with the reason ----------

@needs_two
def test_the_monitor_logs_once_per_change_with_the_reason(caplog, monkeypatch):
    monkeypatch.setattr(dispatch, "MONITOR_INTERVAL_S", 0.02)
    caplog.set_level(logging.DEBUG, logger="adaptive_exec")  # not at every reading either
    n = usable_cpus()
    plan = Plan("parallel", n, 4, 1.0, 0.5, 2.0, "test", False)
    features = Features(0.01, 0.1, 8, 8, 0, 10, 4, 1.0)
    throttle = dispatch._Throttle(n)
    told: list[int] = []
    system.fake_readings(others=0.0, room=float(8 << 30))
    thread = threading.Thread(target=dispatch._monitor,
                              args=(throttle, monitor(make_options(), plan, features),
                                    told.append))
    thread.start()

    def settle(expected: int) -> None:
        end = time.monotonic() + 5
        while throttle.get() != expected and time.monotonic() < end:
            time.sleep(0.01)
        time.sleep(0.2)  # ten more readings, none of which may log again
        assert throttle.get() == expected

    try:
        settle(n)
        system.fake_readings(others=float(n), room=float(8 << 30))
        settle(1)
        system.fake_readings(others=0.0, room=float(8 << 30))
        settle(n)
        system.fake_readings(others=0.0, room=float(1 << 20))
        settle(1)  # one worker fewer at each reading, down to one
    finally:
        throttle.stop.set()
        thread.join(5)
        system.fake_readings()
    lines = [r for r in caplog.records if r.name == "adaptive_exec"]
    shed = list(range(n - 1, 0, -1))
    assert [r.levelno for r in lines] == [logging.INFO] * (2 + len(shed)), \
        [r.getMessage() for r in lines]
    assert [r.getMessage() for r in lines] == [
        f"load: {n} of {n} cores busy with other processes: 1 worker now (was {n})",
        f"load: 0 of {n} cores busy with other processes: {n} workers now (was 1)",
    ] + [f"memory: 1.0 MB free, below the reserve: {k} worker{'s' if k > 1 else ''} now "
         f"(was {k + 1})" for k in shed]
    assert told == [1, n, *shed]


@needs_two
def test_the_bar_follows_the_monitor_during_a_real_map(capsys, caplog):
    caplog.set_level(logging.INFO, logger="adaptive_exec")
    n = usable_cpus()
    pf = parallelize(slowish, backend="loky", chunksize=1, progress=True)
    got = []
    system.fake_readings(others=0.0)
    try:
        # The load rises once results come in, and falls again ~1 s later (50 ms items,
        # on one worker meanwhile): whatever the pool's start-up took.
        for i, x in enumerate(pf.imap(range(60))):
            got.append(x)
            if i == 8:
                system.fake_readings(others=float(n))
            elif i == 30:
                system.fake_readings(others=0.0)
    finally:
        system.fake_readings()
    assert got == list(range(60))
    err = capsys.readouterr().err
    assert pf.last_report.plan.n_workers == n, pf.last_report.plan.reason
    assert f"imap [{n} processes]" in err
    assert f"imap [1 of {n} processes]" in err, err
    messages = [r.getMessage() for r in caplog.records if r.levelno == logging.INFO]
    assert f"load: {n} of {n} cores busy with other processes: 1 worker now (was {n})" \
        in messages, messages


def test_a_report_line_without_a_map():
    plan = Plan("threads", 8, 1, 1.0, 0.1, 10.0, "r", True)
    report = RunReport(plan, 0.12, 500, 2, True)
    assert str(report) == "8 threads, chunks of 1, 500 items in 120.0 ms, estimated " \
                          "100.0 ms, from cache"
    assert Plan("distributed", 4, 2, 1.0, 0.5, 2.0, "r", False).runs_on() == "dask"
    assert Plan("parallel", 2, 2, 1.0, 0.5, 2.0, "r", False).runs_on(1) == "1 of 2 processes"


# --- one truth: the plan, the warning, the reason and the report agree with what ran ------

def _locked(lock, x):
    with lock:
        h.spin(0.005)
        return x


def test_a_function_that_cannot_be_pickled_runs_here_and_the_report_says_so():
    import functools
    import warnings

    from adaptive_exec import UnpicklableWarning

    func = functools.partial(_locked, threading.Lock())  # a lock does not pickle
    pf = parallelize(func, backend="loky")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert pf.map(range(200)) == list(range(200))  # 1 s: more than sampling takes
    (warning,) = [w for w in caught if issubclass(w.category, UnpicklableWarning)]
    assert "running serially in the caller" in str(warning.message)
    report = pf.last_report
    assert report.plan.mode == "serial", report.plan  # as the warning says
    assert report.ran is not None and report.ran.startswith("serially in the caller, not ")
    assert "cannot be pickled" in report.ran and "as planned" in report.ran
    assert "so it ran serially in the caller" in report.plan.reason
    assert str(report).startswith("serial in the caller") and report.ran in str(report)
    assert "mode:        serial" in report.plan.explain()


def _returns_a_lock(x):
    h.spin(0.005)
    if h.in_worker():
        return threading.Lock()  # cannot travel back from a worker
    return x


def test_items_run_in_the_caller_are_counted_in_the_report():
    import warnings

    pf = parallelize(_returns_a_lock, backend="loky", chunksize=4)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out = pf.map(range(200))
    assert out == list(range(200))  # each came back from the caller's own run
    report = pf.last_report
    assert report.plan.mode == "parallel"
    assert report.ran is not None, str(report)
    n = int(re.match(r"([\d,]+) of the items ran in the caller: ", report.ran).group(1))
    assert 0 < n <= 200 - report.n_sampled, report.ran
    assert "cannot be pickled" in report.ran
    assert report.ran in str(report)
    plain = parallelize(h.square, backend="loky")
    plain.map(range(40))
    assert plain.last_report.ran is None and ";" not in str(plain.last_report)


def test_the_reason_names_the_start_up_as_the_features_do():
    from adaptive_exec.calibration import DEFAULTS
    from adaptive_exec.planner import make_plan
    from adaptive_exec.system import SystemSnapshot

    features = Features(0.01, 0.1, 8, 8, 0, 10, 4, 1.0)
    two = SystemSnapshot(usable_cpus=2, available_memory=8 << 30)
    warm = make_plan(features, 400, 0, two, DEFAULTS, warm=True, from_cache=False)
    ahead_up = make_plan(features, 400, 0, two, DEFAULTS, warm=False, from_cache=False,
                         startup_left=0.0)
    ahead_half = make_plan(features, 400, 0, two, DEFAULTS, warm=False, from_cache=False,
                           startup_left=0.03)
    cold = make_plan(features, 400, 0, two, DEFAULTS, warm=False, from_cache=False)
    assert all(p.mode == "parallel" for p in (warm, ahead_up, ahead_half, cold))
    assert warm.features["pool_warm"] and "already warm" in warm.reason
    assert not ahead_up.features["pool_warm"] and "already warm" not in ahead_up.reason
    assert "started ahead of this map is up" in ahead_up.reason
    assert ahead_up.features["startup_left_s"] == 0.0
    assert f"{fmt_s(0.03)} of pool start-up left (started ahead" in ahead_half.reason
    assert "start-up included" in cold.reason and "startup_left_s" not in cold.features


@needs_two
def test_a_pool_left_by_a_map_that_raised_is_reported_warm():
    # Its workers are up and take the next map at once; the next plan said "pool already
    # running: no" (and, without a pool started ahead, "the pool started ahead of this
    # map is up").
    with pytest.raises(ValueError, match="raised on 30"):
        parallelize(functools.partial(h.faulty, raise_on={30}, cost=0.01), backend="loky",
                    chunksize=5).map(range(60))
    system.fake_readings(others=0.0)  # a machine read as quiet: a busy one plans serial
    try:
        plan = parallelize(h.heavy).plan(range(40))
    finally:
        system.fake_readings()
    assert plan.mode == "parallel" and plan.features["pool_warm"] is True, plan.explain()
    assert "already warm" in plan.reason and "started ahead" not in plan.reason, plan.reason


def test_a_map_that_ends_early_leaves_its_own_report():
    # last_report described the map before it (README: "the RunReport of the last map").
    pf = parallelize(functools.partial(h.faulty, raise_on={150}, cost=0.001))
    pf.map(range(10))
    with pytest.raises(ValueError, match="raised on 150"):
        pf.map(range(300))
    report = pf.last_report
    assert report.n_items <= 150 and "ended by item 150, which raised ValueError" in report.ran
    assert str(report).endswith(f"{report.n_items:,} results made"), str(report)
    it = pf.imap(range(300, 10_000))
    assert next(it) == 3000
    it.close()
    assert "left by its consumer" in pf.last_report.ran, pf.last_report
    first = parallelize(functools.partial(h.faulty, raise_on={0}))
    with pytest.raises(ValueError, match="raised on 0"):
        first.map(range(5))
    assert first.last_report.ran == "ended by item 0, which raised ValueError; 0 results made"
    assert "ended by item 0" in first.last_report.plan.reason


class _RecordError(Exception):
    @property
    def item_index(self):  # the user's own attribute of that name, read-only
        return "record-7"


def _bad_record(x):
    if x == 2:
        raise _RecordError("bad record")
    return x


def test_a_map_ended_while_sampling_counts_what_it_gave_and_keeps_the_users_error():
    # The results its sample gave were counted as none ("no items; 0 results made"), and
    # a user's item_index that is not ours turned the user's exception into a ValueError.
    pf = parallelize(functools.partial(h.fail_on, bad={3}))
    got = []
    with pytest.raises(ValueError, match="bad item 3"):
        for r in pf.imap(list(range(100))):
            got.append(r)
    assert got == [0, 1, 2]
    assert pf.last_report.n_items == 3, pf.last_report
    assert pf.last_report.ran == "ended by item 3, which raised ValueError; 3 results made"
    with pytest.raises(_RecordError, match="bad record"):
        adaptive_map(_bad_record, [0, 1, 2, 3], backend="serial")


def test_a_map_ended_by_its_input_says_so():
    def items():
        yield from range(50)
        raise OSError("the input broke")

    pf = parallelize(h.square)
    with pytest.raises(OSError, match="the input broke"):
        pf.map(items())
    assert pf.last_report.ran.startswith("ended by its input iterator's OSError; 50 results"), \
        pf.last_report


def _raises_at(x, at, make):
    if x == at:
        raise make()
    return x


@pytest.mark.parametrize("make, name", [
    # map raises an item's StopIteration as itself; the report named the RuntimeError
    # a generator wraps it in.
    (lambda: StopIteration("stop"), "StopIteration"),
    # A function's own RuntimeError from a StopIteration was named "StopIteration".
    (lambda: _chained(RuntimeError("no data")), "RuntimeError"),
    # An item's own GeneratorExit was "left by its consumer".
    (lambda: GeneratorExit("its own"), "GeneratorExit"),
])
def test_an_items_own_error_is_named_whatever_its_type_or_cause(make, name):
    pf = parallelize(functools.partial(_raises_at, at=7, make=make))
    with pytest.raises(BaseException) as info:
        pf.map(range(20))
    assert type(info.value).__name__ == name
    assert pf.last_report.ran.startswith(f"ended by item 7, which raised {name}"), \
        pf.last_report.ran


def _chained(exc):
    exc.__cause__ = StopIteration()
    return exc


def _pool_work_reported(report: RunReport) -> bool:
    return bool(report.start_path and report.bytes_sent > 0 and report.workers_timeline)


def test_a_map_ended_by_an_item_s_error_reports_what_its_pool_did():
    # Ended by item 70's ValueError, on a pool whose workers ran items: the report said
    # no worker was used (no timeline, 0 bytes sent, no start path), 3 of 3 (a hunting
    # helper's finding).
    pf = parallelize(functools.partial(h.spin_fail_on, bad=frozenset({70})), backend="loky",
                     max_workers=2)
    with pytest.raises(ValueError):
        pf.map(range(200))
    report = pf.last_report
    assert report.plan.mode == "parallel", report.plan.reason
    assert "ended by item 70" in (report.ran or ""), report.ran
    assert _pool_work_reported(report), (report.start_path, report.bytes_sent,
                                         report.workers_timeline)



def test_a_plan_made_before_any_call_is_not_estimated(monkeypatch):
    # ADAPTIVE_EXEC_DISABLE, a nested map, timeout=: nothing is sampled, and the reports
    # showed the time spent so far as the estimate ("30 items in 307.1 ms, estimated
    # 919.4 µs"; "200 items x 0.0 µs = 0.0 µs of work ... (0.00x)": a hunting helper).
    monkeypatch.setenv("ADAPTIVE_EXEC_DISABLE", "1")
    pf = parallelize(h.spin_fail_on, cache=False)
    assert pf.map(range(30)) == list(range(30))
    report = pf.last_report
    assert report.plan.mode == "serial" and not report.plan.measured
    assert str(report).endswith("not estimated"), str(report)
    assert "serial:      not estimated" in report.plan.explain()
    monkeypatch.delenv("ADAPTIVE_EXEC_DISABLE")
    timed = parallelize(h.spin_fail_on, cache=False, timeout=30)
    assert timed.map(range(40)) == list(range(40))
    plan = timed.last_report.plan
    assert not plan.measured and "estimated at" not in plan.reason, plan.reason
    assert "40 items, not measured" in plan.reason, plan.reason
    # A measured map still says its estimate.
    measured = parallelize(h.spin_fail_on, cache=False)
    measured.map(range(40))
    assert measured.last_report.plan.measured
    assert "estimated" in str(measured.last_report)


def test_a_report_that_fails_never_replaces_the_item_s_error(monkeypatch):
    # What the pool did is noted for the report also when an item's error ends the run:
    # a failure of ours there must not be what the map raises.
    from adaptive_exec import adapt

    def broken(*args, **kwargs):
        raise RuntimeError("the report's own failure")

    monkeypatch.setattr(adapt, "note_ran_on_pool", broken)
    pf = parallelize(functools.partial(h.spin_fail_on, bad=frozenset({70})), backend="loky",
                     max_workers=2)
    with pytest.raises(ValueError, match="bad item 70"):
        pf.map(range(200))


def _lock_from_the_pool(x):
    h.burn(0.005)
    if h.in_worker():
        return threading.Lock()  # cannot travel back from a worker
    return x


@pytest.mark.timeout(120)
def test_a_map_whose_items_fell_back_to_the_caller_teaches_the_cache_no_pool_time(
        monkeypatch):
    """Every item's result failed to come back from a worker and ran in the caller: the
    run's wall time is the loop's, not the pool's. Remembered as a parallel run against
    the pool's estimate, it set a correction (x1.30 after one such map) that made the
    next map of the same function, whose results cross fine, more cautious or serial."""
    import warnings

    from adaptive_exec import cache
    from adaptive_exec import run as run_module
    from adaptive_exec.backends import loky as loky_backend
    from adaptive_exec.fingerprint import fingerprint

    # Whatever the workers' few items measured against the sample (a busy core stretches
    # one and not the other): a run is remembered unless it is known to say nothing.
    monkeypatch.setattr(run_module, "TELLING_RATIO", 1e9)
    pf = parallelize(_lock_from_the_pool, backend="loky", chunksize=4)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            assert pf.map(range(60)) == list(range(60))
        report = pf.last_report
        assert report.plan.mode == "parallel" and report.ran is not None, str(report)
        assert "ran in the caller" in report.ran
        cache._flush_pending()
        entry = cache.lookup(fingerprint(_lock_from_the_pool))
        assert entry is not None
        pool_runs = [r for r in entry.runs if r.mode == "parallel"]
        assert pool_runs == [], (str(report), entry.runs)
    finally:
        loky_backend.shutdown()


class _Carrier:
    """A bound method that carries a large object to every worker it is sent to."""

    def __init__(self, size: int):
        self.data = bytes(size)

    def work(self, x):
        h.spin(0.002)
        return self.data[x] + x


@needs_two
@pytest.mark.timeout(120)
def test_a_function_too_heavy_to_ship_explains_the_pool_estimate_its_reason_gives():
    """The plan turned serial because shipping the function loses: explain() showed the
    pool's estimate without that shipping and a speedup of 1.00x (parallel 229.8 ms
    against the loop's 392.1 ms, where the reason said 1.80 s more for the pool)."""
    from adaptive_exec.backends import loky as loky_backend

    carrier = _Carrier(128 << 20)
    system.fake_readings(others=0.0)  # a quiet machine: the pool wins on the sample
    try:
        pf = parallelize(carrier.work, cache=False)
        assert pf.map(range(300)) == list(range(300))
    finally:
        system.fake_readings()
        loky_backend.shutdown()
    plan = pf.last_report.plan
    assert plan.mode == "serial", plan.reason
    if "carries" not in plan.reason:
        pytest.skip(f"the sample alone said serial: {plan.reason}")
    assert plan.estimated_parallel_s > plan.estimated_serial_s, plan.explain()
    assert plan.estimated_speedup == pytest.approx(
        plan.estimated_serial_s / plan.estimated_parallel_s, rel=1e-6), plan.explain()
    text = plan.explain()
    assert explain_value(text, "parallel") == fmt_s(plan.estimated_parallel_s), text
    assert explain_value(text, "speedup") == fmt_speedup(plan.estimated_speedup), text
    assert plan.estimated_speedup < 1.0, text
