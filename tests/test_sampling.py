from __future__ import annotations

import functools
import os
import sys

import aex_helpers as h
import pytest

from adaptive_exec import parallelize, system
from adaptive_exec.backends import loky as loky_backend
from adaptive_exec.sampling import ITEM_BUDGET, features_from, sample


def test_a_fast_function_stops_at_the_item_budget():
    it = iter(range(100_000))
    s = sample(h.tiny, it, star=False, complexity=1)
    assert len(s.results) == ITEM_BUDGET
    assert s.results == [h.tiny(x) for x in range(ITEM_BUDGET)]
    assert next(it) == ITEM_BUDGET  # the iterator continues where sampling stopped
    f = s.features
    assert f.n_samples == ITEM_BUDGET and f.mean_s > 0
    assert f.coefficient_of_variation is not None
    assert f.pickle_size and f.input_pickle_size
    assert 0 < s.calls_s <= s.wall_s  # its cost is reported (benchmarks.figures_core)


def test_a_slow_function_is_sampled_on_one_item():
    s = sample(h.heavy, iter(range(10)), star=False, complexity=1)
    assert s.results == [0] and s.features.n_samples == 1
    assert s.features.coefficient_of_variation is None


def test_sizes_and_memory_are_measured():
    def fat(x):
        block = bytearray(50 << 20)  # 50 MB touched: raises the peak RSS
        block[:: 4096] = b"x" * len(block[:: 4096])
        return b"y" * 100_000

    s = sample(fat, iter(range(3)), star=False, complexity=1)
    assert s.features.pickle_size >= 100_000
    assert s.features.peak_memory >= 20 << 20


def test_an_exception_ends_the_sample_with_the_results_before_it():
    s = sample(lambda x: 1 // (x - 3), iter(range(10)), star=False, complexity=1)
    assert s.results == [1 // (x - 3) for x in range(3)]
    assert isinstance(s.error, ZeroDivisionError) and s.error.item_index == 3


def test_unpicklable_results_are_noticed():
    import threading

    s = sample(lambda x: threading.Lock(), iter(range(5)), star=False, complexity=1)
    assert s.features.picklable is False


def test_what_the_hook_spends_between_calls_is_not_the_samples_time():
    # A fork of the pool's workers made between two sampled calls (SamplingWatch.on_item)
    # took ~25 ms: counted in the 20 ms budget, it ended the sample at a handful of calls.
    import time

    def hook(n):
        if n == 2:
            time.sleep(0.05)  # the wall time a fork takes here
            return 0.001  # it did something: its time is not the function's
        return 0.0

    def one_ms(x):
        h.spin(0.001)
        return x

    s = sample(one_ms, iter(range(200)), star=False, complexity=1, on_item=hook)
    # Counted in the budget, the hook ended the sample at its third call; beside a busy
    # machine a 1 ms spin takes ~2 ms of wall time, and 9 calls fit (a run at load 4).
    assert s.features.n_samples >= 5
    assert s.calls_s < 0.05  # the hook's sleep is in neither figure
    assert s.wall_s < s.calls_s + 0.05


def test_a_first_call_that_paid_a_set_up_does_not_spend_the_samples_budget():
    # Issue 14: one call after a 0.3 s set-up was the per-item cost (0.8 ms for 1.8):
    # once a second call shows the first one paid a set-up, the budget is the next
    # calls' time, and they are sampled on.
    calls = []

    def lazily_built(x):
        h.spin(0.08 if not calls else 0.002)
        calls.append(x)
        return x

    s = sample(lazily_built, iter(range(100)), star=False, complexity=0,
               keep_going=lambda n: n < 2)  # a second call, as the watch asks for one
    f = s.features
    assert f.setup_s is not None and 0.06 < f.setup_s < 0.2
    assert f.n_samples >= 6, f  # ~20 ms of 2 ms calls after the set-up
    assert 0.0015 < f.mean_s < 0.004


def test_workers_forked_after_a_first_call_here_have_its_set_up():
    from adaptive_exec import adapt
    from adaptive_exec.backends import loky as loky_backend
    from adaptive_exec.backends import starts

    loky_backend.shutdown()
    assert loky_backend.prestart(2) is not None
    adapt.note_ran_here("after-the-pool")  # ran here after these workers were made
    assert not adapt.workers_inherit_setup("after-the-pool")
    assert not adapt.workers_inherit_setup("never-ran-here")
    loky_backend.shutdown()
    adapt.note_ran_here("before-the-pool")
    assert loky_backend.prestart(2) is not None
    # Copies of this process, made after its first call, if they were forked from it.
    forked = loky_backend._state.path == starts.FORK
    assert adapt.workers_inherit_setup("before-the-pool") == forked


def _disk_looks():
    """ThreadWaits' record as a watch thread leaves it: 10 looks in the first call, 9 of
    them at the disk."""
    looks = system.ThreadWaits(None)
    looks.looks, looks.waits = 10, {"the disk": 9}
    return looks


def test_what_a_first_call_that_paid_a_one_time_cost_waited_on_is_left_out():
    looks = _disk_looks()
    mark = looks.mark()  # the first call's end
    looks.looks += 10  # the next calls: computing
    # 0.4 s first call, 10 ms of CPU in it; then four calls of 20 ms of CPU each.
    durations = [0.4, 0.02, 0.02, 0.02, 0.02]
    f = features_from(durations, [], [], 0, 1, cpu_s=0.09, wall_s=0.48, picklable=True,
                      others_cpu_s=0.048, waits=looks, first_call=(0.01, 0.4, mark))
    assert f.setup_s is not None and f.mean_s == 0.02
    # Other threads' CPU over the whole sample's time: 0.1 CPU, not 0.6 over the later
    # calls' (a watch's and a pool's start read as 2 CPUs of the function's own threads).
    assert f.threads_cpu == pytest.approx(0.1)
    assert f.cpu_fraction == 1.0 and f.wait_share == 0.0 and f.waits_on is None
    # No set-up told apart (calls alike): all the calls' waits and CPU count.
    g = features_from([0.1, 0.1], [], [], 0, 1, cpu_s=0.02, wall_s=0.2, picklable=True,
                      waits=looks, first_call=(0.01, 0.1, mark))
    assert g.setup_s is None and g.waits_on == "the disk"
    assert g.cpu_fraction == pytest.approx(0.1)
    assert g.wait_share == 9 / 20
    # A set-up told apart, but the later calls looked at too few times to tell (the watch
    # ends once it has decided): the whole sample's waits, not "no waits" from none.
    few = _disk_looks()
    mark = few.mark()
    few.looks += 2
    h_ = features_from(durations, [], [], 0, 1, cpu_s=0.09, wall_s=0.48, picklable=True,
                       waits=few, first_call=(0.01, 0.4, mark))
    assert h_.setup_s is not None and h_.waits_on == "the disk" and h_.wait_share == 9 / 12


def test_too_few_looks_say_neither_how_much_nor_on_what_the_calls_waited():
    # Beside two test suites the watch thread looked at the calls a few times only: the
    # features said "waits on sockets or pipes" with no share beside it.
    looks = system.ThreadWaits(None)
    looks.looks, looks.waits = system.ThreadWaits.MIN_LOOKS - 1, {"sleeping": 2}
    f = features_from([0.01, 0.01], [], [], 0, 1, cpu_s=0.001, wall_s=0.02, picklable=True,
                      waits=looks)
    assert f.wait_share is None and f.waits_on is None
    looks.looks += 1
    g = features_from([0.01, 0.01], [], [], 0, 1, cpu_s=0.001, wall_s=0.02, picklable=True,
                      waits=looks)
    assert g.wait_share is not None and g.waits_on == "sleeping"


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="/proc and fadvise")
def test_a_first_call_that_waited_on_the_disk_does_not_make_a_waiting_function(tmp_path):
    # The numpy workload's first call read its libraries from the disk (0.47 s, 84% of
    # the looks waiting there); sampled on that one call, 200 items of 12 ms of BLAS were
    # planned on 30 threads, 1.3-1.5x slower than the loop, and the cache kept it. A first
    # call that waited on the disk is now followed by a second, which tells the one-time
    # read from the per-item cost.
    path = str(tmp_path / "library")
    with open(path, "wb") as f:
        for _ in range(96):
            f.write(os.urandom(1 << 20))
        f.flush()
        os.fsync(f.fileno())
    h.drop_from_page_cache(path)
    system.fake_readings(others=0.0)
    loky_backend.shutdown()  # a cold pool: the sample is watched (a warm one is not)
    try:
        pf = parallelize(functools.partial(h.reads_once_then_burns, path=path), cache=False)
        # A generator: nothing is sent ahead of the first call, whose sample alone decides.
        assert pf.map(x for x in range(40)) == [x + 1 for x in range(40)]
    finally:
        system.fake_readings()
    report = pf.last_report
    features = report.plan.features
    if report.n_sampled == 1 and report.plan.mode != "threads":
        pytest.skip("the first call's read did not wait on a disk here (a tmpfs?)")
    assert report.plan.mode != "threads", report.plan.reason
    assert report.n_sampled >= 2, report.plan.reason
    # Told apart as a one-time cost, the read is not the calls' CPU share. (Beside a busy
    # core the second call can come out under 3x shorter and the read is not told apart:
    # the plan above is what must hold then.)
    if features["setup_s"] is not None:
        assert features["cpu_fraction"] >= 0.5, features  # the calls after it compute
