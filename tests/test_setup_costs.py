"""One-time costs told from per-item costs (issue 14: a function whose first call pays a
set-up was planned from that one call, 1.8 s of work estimated at 171 s in chunks of 1)."""

from __future__ import annotations

import functools
import json
import os
import subprocess
import sys
import textwrap

import aex_helpers as h
import pytest

from adaptive_exec import cache, parallelize, system
from adaptive_exec.backends import loky as loky_backend
from adaptive_exec.backends import starts
from adaptive_exec.fingerprint import fingerprint
from adaptive_exec.sampling import features_from

TESTS = os.path.dirname(__file__)


def _features(durations):
    return features_from(durations, [10], [10], 0, 100, sum(durations), sum(durations), True)


def test_a_first_call_far_slower_than_the_next_is_a_set_up_not_the_mean():
    f = _features([1.0, 0.010, 0.011, 0.009])
    assert f.setup_s == pytest.approx(0.99)
    assert f.mean_s == pytest.approx(0.010)
    assert f.n_samples == 4
    # A first call only somewhat slower (a cold cache), or one call alone: no set-up.
    assert _features([0.003, 0.002, 0.002]).setup_s is None
    assert _features([0.5]).setup_s is None and _features([0.5]).mean_s == 0.5
    # Microseconds are not a set-up worth planning on.
    assert _features([0.0005, 1e-6, 1e-6]).setup_s is None


def test_a_function_that_builds_a_table_on_its_first_call_is_planned_per_item():
    # Read as a quiet machine (the system seam): with another process keeping one of 2
    # CPUs busy nothing goes to workers ahead of the plan (test_ahead.py checks that).
    system.fake_readings(others=0.0)
    try:
        _table_map()
    finally:
        system.fake_readings()


def _table_map():
    # Workers and a template of earlier tests may hold a table built in this process
    # (a template forked while it had one: its workers paid no set-up, a CI run).
    loky_backend.shutdown()
    starts.template().stop()
    h.forget_table()
    func = functools.partial(h.lazy_table, setup=0.5, cost=0.005)
    # The pool whatever the estimate: with the caller's table built and the workers'
    # still to build, pool and loop are close here, and a loaded CI run planned the
    # rest serial (test_ahead.py checks that case); what this test reads is the pool's.
    pf = parallelize(func, backend="loky")
    n = 300
    assert pf.map(range(n)) == [x + 1 for x in range(n)]
    report = pf.last_report
    plan = report.plan
    # Measured here on two calls: the first's set-up is set apart, the mean is the rest.
    assert plan.features["setup_s"] == pytest.approx(0.5, rel=0.5)
    assert plan.features["mean_s"] < 0.05
    assert "one-time set-up (first call in a process)" in plan.explain()
    # Workers built their own table: each paid it once, not per item. (Workers forked
    # after the caller's first call have its table, and pay none: then None.)
    assert report.worker_setup_s is None or report.worker_setup_s > 0.2, report
    assert report.observed_item_s < 0.05
    # Remembered apart: the next map plans per item, and its workers have the table.
    entry = cache.lookup(fingerprint(func))
    assert entry.features.setup_s is not None and entry.features.mean_s < 0.05
    again = parallelize(func).plan(range(n))
    assert again.from_cache and "set-up in each worker" not in again.reason
    assert again.estimated_parallel_s < 5 * again.features["mean_s"] * n


WARM_TABLE = """
    import functools, json, os, sys
    sys.path.insert(0, {tests!r})
    import aex_helpers as h
    from adaptive_exec import parallelize, system

    system.fake_readings(others=0.0)  # a quiet machine: the plan is the cache's
    # backend="loky": the pool whatever the estimate (beside a busy core the cold run took
    # 1.57 s, not the 1.1 estimated, and the warm plan, corrected for it, began serial).
    pf = parallelize(functools.partial(h.lazy_logged, path={path!r}, setup=0.3, cost=0.003),
                     backend="loky")
    assert pf.map(range(300)) == [x + 1 for x in range(300)]
    r = pf.last_report
    print(json.dumps({{"me": os.getpid(), "from_cache": r.from_cache, "mode": r.plan.mode}}))
"""


def test_a_warm_map_leaves_a_one_time_set_up_to_the_workers(tmp_path):
    # Planned from the cache in a fresh process, whose first call would build the
    # function's table: the caller runs no item while the pool starts. The one item it
    # ran cost it the whole set-up on a core the workers needed for theirs
    # (first_call_setup warm: a 0.2 s table built three times at once on 2 cores).
    env = {**os.environ, "ADAPTIVE_EXEC_CACHE_DIR": str(tmp_path / "cache")}
    runs = []
    path = str(tmp_path / "calls")  # one function: the same arguments in both runs
    for _ in ("cold", "warm"):
        if os.path.exists(path):
            os.remove(path)
        proc = subprocess.run(
            [sys.executable, "-c", textwrap.dedent(WARM_TABLE.format(tests=TESTS, path=path))],
            capture_output=True, text=True, timeout=120, env=env, cwd=tmp_path)
        assert proc.returncode == 0, proc.stderr[-3000:]
        runs.append((json.loads(proc.stdout.strip().splitlines()[-1]), h.read_spin_log(path)))
    got, log = runs[1]
    assert got["from_cache"] and got["mode"] == "parallel", got
    assert all(pid != got["me"] for pid, _, _ in log.values()), log


SHORT_SETUP = """
    import functools, json, os, sys
    sys.path.insert(0, {tests!r})
    import aex_helpers as h
    from adaptive_exec import parallelize, system

    system.fake_readings(others=0.0)  # a quiet machine: the pool is planned
    pf = parallelize(functools.partial(h.lazy_logged, path={path!r}, setup={setup},
                                       cost=0.002))
    assert pf.map(range(150)) == [x + 1 for x in range(150)]
    print(json.dumps({{"me": os.getpid(), "mode": pf.last_report.plan.mode}}))
"""


@pytest.mark.skipif(bool(os.environ.get("ADAPTIVE_EXEC_START")),
                    reason="the caller's own fork is the path under test")
def test_workers_forked_after_a_short_first_call_keep_what_it_set_up(tmp_path):
    # A single-threaded caller forks its workers when its first call ends, where a
    # template spawned meanwhile is not serving yet: they are up sooner, and a copy of the
    # caller as it then is, with the table that call built. The watch used to wait for
    # the template instead (first_call_setup: every worker built the table again, 0.66-
    # 0.75 s where a fork pool took 0.50 s).
    setup = 0.1
    for run in range(2):  # fresh processes: each caller's first map, template not up
        env = {**os.environ, "ADAPTIVE_EXEC_CACHE_DIR": str(tmp_path / f"cache{run}")}
        path = str(tmp_path / f"calls{run}")
        proc = subprocess.run(
            [sys.executable, "-c", textwrap.dedent(
                SHORT_SETUP.format(tests=TESTS, path=path, setup=setup))],
            capture_output=True, text=True, timeout=120, env=env, cwd=tmp_path)
        assert proc.returncode == 0, proc.stderr[-3000:]
        got = json.loads(proc.stdout.strip().splitlines()[-1])
        log = h.read_spin_log(path)
        assert got["mode"] == "parallel", got
        in_workers = {x: (pid, end - start) for x, (pid, start, end) in log.items()
                      if pid != got["me"]}
        assert in_workers, log
        # No worker's item took a set-up's time: none built the table again.
        slow = {x: v for x, v in in_workers.items() if v[1] >= setup / 2}
        assert not slow, (run, slow)
