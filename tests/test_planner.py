"""The cost model on constructed inputs: no processes, no clock."""

from __future__ import annotations

from adaptive_exec.calibration import DEFAULTS
from adaptive_exec.planner import blocked_by_pickling, make_plan
from adaptive_exec.sampling import Features
from adaptive_exec.system import SystemSnapshot

TWO = SystemSnapshot(usable_cpus=2, available_memory=16 << 30)
FOUR = SystemSnapshot(usable_cpus=4, available_memory=16 << 30)
EIGHT = SystemSnapshot(usable_cpus=8, available_memory=16 << 30)


def feats(mean_s, out_bytes=8, in_bytes=8, peak=0, cv=0.1):
    return Features(mean_s, cv, out_bytes, in_bytes, peak, 10, 16, 1.0)


def plan(f, n, system=TWO, warm=False, **kw):
    return make_plan(f, n, 0, system, DEFAULTS, warm=warm, from_cache=False, **kw)


def test_microsecond_items_stay_serial_on_a_cold_pool():
    p = plan(feats(1e-6), 100_000)
    assert p.mode == "serial"
    assert "start-up" in p.reason and "100,000 items" in p.reason


def test_heavy_items_go_parallel_with_every_core():
    p = plan(feats(0.02), 100)
    assert p.mode == "parallel" and p.n_workers == 2 and p.estimated_speedup > 1.5
    assert plan(feats(0.02), 1000, system=EIGHT).n_workers == 8


def test_fat_results_stay_serial():
    # 0.1 ms of work returning 200 KB: moving the bytes costs more than the work.
    p = plan(feats(1e-4, out_bytes=200_000), 2000)
    assert p.mode == "serial" and "through the parent" in p.reason


def test_chunks_grow_when_items_are_small():
    small = plan(feats(2e-4), 5000)
    heavy = plan(feats(0.02), 100)
    assert small.mode == heavy.mode == "parallel"
    assert small.chunksize > 8
    # A chunk of heavy items stays short (errors, Ctrl-C and load changes are seen
    # between chunks): at most ~0.1 s of work here, 5 items of 20 ms.
    assert heavy.chunksize * 0.02 <= 0.1


def test_memory_caps_the_workers():
    # The reserve, plus three workers' base footprint and per-call peak.
    room = (256 << 20) + 3 * ((40 << 20) + (400 << 20))
    tight = SystemSnapshot(usable_cpus=8, available_memory=room)
    p = plan(feats(0.05, peak=400 << 20), 200, system=tight)
    assert p.mode == "parallel" and p.n_workers == 3


def test_forced_serial_and_single_cpu():
    assert plan(feats(0.02), 100, forced_serial="because").reason == "because"
    one = SystemSnapshot(usable_cpus=1, available_memory=None)
    assert "one CPU" in plan(feats(0.02), 100, system=one).reason


def test_unpicklable_blocks_a_winning_pool():
    f = Features(0.02, 0.1, None, None, 0, 10, 1, 1.0, picklable=False)
    p = plan(f, 100)
    assert p.mode == "serial" and blocked_by_pickling(f, p, forced_parallel=False)
    assert "cannot be pickled" in p.reason


def test_a_warm_pool_changes_the_decision_for_medium_work():
    f = feats(1e-4)
    cold, warm = plan(f, 2000), plan(f, 2000, warm=True)
    assert cold.estimated_parallel_s > warm.estimated_parallel_s


def test_the_caller_runs_the_odd_items_of_a_last_round_beside_the_workers():
    # Three items of 0.3 s on two workers: all three at once, the three processes sharing
    # the two cores (1.5 items' time), rather than two rounds (2 items' time).
    p = plan(feats(0.3), 3, warm=True)
    assert p.mode == "parallel" and p.n_workers == 2 and p.chunksize == 1
    assert p.features["caller_items"] == 1
    assert "1 of the items run in the caller beside them" in p.reason
    assert abs(p.estimated_parallel_s - 3 * 0.3 / 2) < 0.05
    # Even rounds, short items, a timeout: the workers take all.
    for shown in (plan(feats(0.3), 4, warm=True), plan(feats(0.3), 8, warm=True),
                  plan(feats(0.01), 3, warm=True),
                  plan(feats(0.3), 3, warm=True, caller_helps=False)):
        assert "caller_items" not in shown.features
        assert "in the caller beside" not in shown.reason
    # Five or seven on two: two or three rounds of two for the workers, one item for the
    # caller beside them (measured, 7 x 0.3 s warm: 1.22-1.24 s when the workers took
    # all, 1.07-1.09 s with the caller's one).
    assert plan(feats(0.3), 5, warm=True).features["caller_items"] == 1
    assert plan(feats(0.3), 7, warm=True).features["caller_items"] == 1


def test_the_caller_keeps_one_item_at_most_whatever_the_workers():
    # It runs what it keeps one after the other: 7 items on 4 workers kept 3, three items'
    # time for the caller where two rounds of the workers take two.
    for n in range(3, 30):
        p = plan(feats(0.3), n, system=FOUR, warm=True)
        kept = p.features.get("caller_items", 0)
        assert kept <= 1 and (not kept or n % p.n_workers == 1), (n, p.reason)
        if n % 4 > 1 and p.n_workers == 4:
            assert not kept, (n, p.reason)  # it took 2 or 3 here
    # One left over a full round: that one is the caller's, on 4 workers as on 2.
    p = plan(feats(0.3), 9, system=FOUR, warm=True)
    assert p.n_workers == 4 and p.features["caller_items"] == 1
    assert abs(p.estimated_parallel_s - 9 * 0.3 / 4) < 0.1


def test_a_function_running_threads_of_its_own_keeps_the_caller_out():
    blas = Features(0.3, 0.1, 8, 8, 0, 10, 16, 1.0, threads_cpu=1.0)
    p = plan(blas, 3, system=EIGHT, warm=True)
    assert "caller_items" not in p.features
