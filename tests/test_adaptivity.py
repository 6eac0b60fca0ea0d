"""What the planner and the dispatcher do with what they observe, on real processes."""

from __future__ import annotations

import dataclasses
import functools
import math
import sys
import threading

import aex_helpers as h
import pytest

from adaptive_exec import calibrate, parallelize
from adaptive_exec.backends.loky import LokyTarget
from adaptive_exec.dispatch import ParallelRun, RunSpec
from adaptive_exec.sampling import sample
from adaptive_exec.system import usable_cpus
from adaptive_exec.worker import function_ref


def test_a_waiting_function_runs_on_threads():
    pf = parallelize(h.sleepy)
    assert pf.map(range(120)) == [x + 1 for x in range(120)]
    plan = pf.last_report.plan
    assert plan.mode == "threads", plan.reason
    assert plan.n_workers > usable_cpus()  # sized for waiting, not for cores
    assert "waits" in plan.reason
    assert plan.features["cpu_fraction"] < 0.5


def test_threads_that_do_not_beat_the_loop_give_way_to_it_and_are_not_planned_again():
    """A function that waits while holding a lock every call shares looks like waiting
    (its CPU share is ~0), yet threads cannot overlap it: their trial loses, the rest
    runs in the caller, the report says so, and the next map gets no threads."""
    pf = parallelize(h.one_at_a_time)
    assert pf.map(range(400)) == list(range(400))
    report = pf.last_report
    assert report.plan.mode == "serial", report.plan.reason
    assert report.ran is not None and "threads for the first" in report.ran, report.ran
    assert "threads did not beat the loop" in report.ran
    again = pf.plan(range(400))
    assert again.mode != "threads", again.reason
    assert again.features.get("threads_lost") is True


@pytest.mark.parametrize("seconds, n", [(0.01, 200), (0.05, 60)])
@pytest.mark.parametrize("cap", [3, 8])
def test_max_workers_caps_the_threads_of_a_waiting_function(cap, seconds, n):
    """Someone throttling requests with max_workers=8 gets at most 8 at once, not 64;
    also where the first call is long enough for items to go to threads while it runs
    (50 ms: the caller's call is one of the 8; 9 ran at once)."""
    h.most_at_once(reset=True)
    pf = parallelize(functools.partial(h.waiting_counted, seconds=seconds), max_workers=cap)
    assert pf.map(range(n)) == [x + 1 for x in range(n)]
    plan = pf.last_report.plan
    assert plan.mode == "threads", plan.reason
    assert plan.n_workers == cap
    assert 2 <= h.most_at_once() <= cap


def test_max_workers_1_keeps_a_waiting_function_in_the_caller():
    h.most_at_once(reset=True)
    pf = parallelize(h.waiting_counted, max_workers=1)
    assert pf.map(range(60)) == [x + 1 for x in range(60)]
    assert pf.last_report.plan.mode == "serial"
    assert h.most_at_once() == 1


@pytest.mark.skipif(usable_cpus() < 2, reason="needs 2 CPUs to see two threads at once")
def test_a_function_with_threads_of_its_own_is_seen():
    # ~1: one more CPU than the caller's. Beside CI's other suites two hashing threads
    # got less than a CPU in all (0.23 once): the best of three samples.
    seen = []
    for _ in range(3):
        s = sample(h.hash_in_two_threads, iter(range(5)), star=False, complexity=1)
        seen.append(s.features.threads_cpu)
        if seen[-1] > 0.3:
            break
    assert max(seen) > 0.3, seen


def test_a_function_with_threads_of_its_own_gets_no_pool():
    from adaptive_exec.calibration import DEFAULTS
    from adaptive_exec.planner import make_plan
    from adaptive_exec.sampling import Features
    from adaptive_exec.system import SystemSnapshot

    two = SystemSnapshot(usable_cpus=2, available_memory=8 << 30)

    def plan(threads_cpu):
        # 0.6 s of work: too short for a trial of the pool (test below).
        f = Features(0.006, 0.1, 8, 8, 0, 10, 5, 1.0, threads_cpu=threads_cpu)
        return make_plan(f, 100, 0, two, DEFAULTS, warm=True, from_cache=False)

    assert plan(0.0).mode == "parallel"
    blas = plan(1.0)
    assert blas.mode == "serial" and "threads of its own" in blas.reason


@pytest.mark.skipif(usable_cpus() < 2, reason="needs 2 CPUs to see two threads at once")
def test_a_pool_run_of_a_function_with_threads_of_its_own_teaches_its_workers_time():
    # A BLAS stand-in: its spinning second thread doubles its CPU seconds in the caller,
    # not its time in a worker, which caps it at one thread; the same function whose
    # thread a worker does not cap (a pool of its own) takes twice as long there, with
    # the other worker's threads beside it. What a pool measured is kept apart from the
    # caller's time, as a ratio, and the pool's items do not move the caller's time.
    from adaptive_exec import cache
    from adaptive_exec.fingerprint import fingerprint
    from adaptive_exec.planner import OWN_THREADS_MIN

    # Calls of ~30-60 ms: the CPU of the spinning threads is read over enough time
    # even on a crowded machine (calls of ~15 ms read 0.2 beside two test suites).
    big, small = [24 << 20] * 30, [3 << 20] * 30
    funcs = {capped: functools.partial(h.blas_like, capped=capped)
             for capped in (True, False)}

    def measured_ratios(order):
        # A sample beside a burst of other work can read the spinning threads below
        # OWN_THREADS_MIN (no ratio is learnt then): sampled again, up to 3 times.
        for _ in range(3):
            cache.clear()  # each attempt sampled here afresh, not planned from the last
            ratios = {}
            for capped in order:
                pool = parallelize(funcs[capped], backend="loky")
                assert pool.map(big) == [3 * s for s in big]  # sampled here, then the pool
                planned = pool.last_report.plan
                assert planned.mode == "parallel"
                if planned.features["threads_cpu"] <= OWN_THREADS_MIN:
                    break
                assert planned.features["worker_ratio"] is None
                entry = cache.lookup(fingerprint(funcs[capped]))
                assert entry is not None and entry.features.worker_ratio is not None
                assert entry.features.mean_s == planned.features["mean_s"]  # not the pool's
                assert entry.runs and entry.runs[-1].mode == "parallel"
                ratios[capped] = entry.features.worker_ratio
            else:
                return ratios
        raise AssertionError(f"own threads not seen in 3 samples: {planned.features}")

    # The uncapped threads contend with the other worker's: their wall time says so.
    # Each ratio is two timings seconds apart, and one burst of the CI's other work
    # moves one by 2x: a single comparison failed now and then beside the forced-path
    # runs. It also passed half the time on a worker time of CPU seconds (no contention
    # seen: the bug), the function measured first reading lower than the other (x0.3-0.9
    # of it). So four attempts, each function first in two, judged together (geometric
    # mean): x0.2-0.4 measured, 0.8 the bound; x0.6-1.2 on CPU seconds.
    attempts = [measured_ratios(order)
                for order in ((True, False), (False, True)) * 2]
    together = math.prod(r[True] / r[False] for r in attempts) ** (1 / len(attempts))
    assert together < 0.8, attempts
    assert "an item's time in a worker, over here" in parallelize(funcs[True]).plan(
        big).explain()
    # Other inputs, on the pool alone: the caller's time follows them through the ratio
    # (8x less work an item: replaced, as a serial run's would be).
    key = fingerprint(funcs[True])
    before = cache.lookup(key).features
    pool = parallelize(funcs[True], backend="loky")
    assert pool.map(small) == [3 * s for s in small]
    after = cache.lookup(key).features
    assert after.mean_s < before.mean_s / 2, (before, after)
    assert after.worker_ratio == before.worker_ratio


def test_a_chunk_tells_its_wall_time_apart_as_compute_and_waits_for_a_cpu():
    # What a pool's worker time of a function with threads of its own is learnt from:
    # the chunk's wall time. Its compute alone (waits for a CPU left out) took a
    # function whose own threads contend with each other for 1.6x faster than it was.
    import time

    from adaptive_exec.worker import run_items

    uncapped = functools.partial(h.blas_like, capped=False)
    t0 = time.perf_counter()
    res = run_items(uncapped, 0, [4 << 20] * 8, star=False)
    wall = time.perf_counter() - t0
    assert res.results == [3 * (4 << 20)] * 8
    assert res.queued_s >= 0 and res.compute_s > 0
    assert res.compute_s + res.queued_s == pytest.approx(wall, rel=0.1, abs=0.002)


def test_a_function_with_threads_of_its_own_is_planned_on_its_workers_measured_time():
    from adaptive_exec.calibration import DEFAULTS
    from adaptive_exec.planner import make_plan, pool_item_s
    from adaptive_exec.sampling import Features
    from adaptive_exec.system import SystemSnapshot

    two = SystemSnapshot(usable_cpus=2, available_memory=8 << 30)

    def plan(worker_ratio, n=200, mean_s=0.0106, picklable=True, may_learn=True,
             from_cache=False):
        # numpy's matrix products, from the benchmark suite: 10.6 ms an item in the
        # caller on 2 BLAS threads, threads_cpu 1.3; 14.6 ms in a worker on one (1.38x).
        f = Features(mean_s, 0.1, 24, 8, 0, 10, 5, 1.0, picklable=picklable,
                     threads_cpu=1.3, worker_ratio=worker_ratio)
        return make_plan(f, n, 0, two, DEFAULTS, warm=True, from_cache=from_cache,
                         may_learn=may_learn)

    # Unmeasured: by the CPU seconds, 2 x 10.6 ms in a worker, about the loop's time;
    # over 2 s of work, the pool is given once, to measure it...
    trial = plan(None)
    assert trial.mode == "parallel" and "a trial" in trial.reason, trial.reason
    # ...not where it cannot be remembered, nor for a short map, nor where the items
    # or results cannot reach a worker, nor on a remembered time (of other inputs,
    # maybe: the run could not tell the ratio, and every later map was a trial).
    for no_trial in (plan(None, may_learn=False), plan(None, n=50),
                     plan(None, picklable=False), plan(None, from_cache=True)):
        assert no_trial.mode == "serial", no_trial.reason
    measured = plan(1.38)
    assert measured.mode == "parallel", measured.reason
    assert "a trial" not in measured.reason
    assert "14.6 ms an item in a worker with one BLAS thread" in measured.reason
    assert measured.estimated_parallel_s == pytest.approx(200 * 0.0146 / 2, rel=0.15)
    # A pool that measured it as slow as the CPU seconds said: no gain, and no new
    # trial; slower still (a busy machine): no worse than the CPU seconds say.
    assert plan(2.0).mode == "serial"
    assert plan(5.0).estimated_parallel_s == plan(2.0).estimated_parallel_s
    # Other inputs (10x cheaper items, a serial run's time): the workers' follows.
    assert plan(1.38, n=2000, mean_s=0.00106).estimated_parallel_s == pytest.approx(
        measured.estimated_parallel_s, rel=0.15)
    # What a run's chunks are sized by, and its report compares the workers' times to.
    blas = Features(0.0106, 0.1, 24, 8, 0, 10, 5, 1.0, threads_cpu=1.3)
    assert pool_item_s(blas, 2) == pytest.approx(0.0212)
    assert pool_item_s(dataclasses.replace(blas, worker_ratio=1.38), 2) == pytest.approx(
        0.0146, rel=0.01)
    assert pool_item_s(dataclasses.replace(blas, threads_cpu=0.1), 2) == 0.0106


def test_chunks_shrink_towards_the_end(tmp_path):
    by_start = {}

    class Recording(LokyTarget):
        def submit(self, executor, chunk, start, full=False):
            # A chunk sent again (a worker new to the function asks for it whole) is
            # the same chunk: counted once.
            by_start.setdefault(start, len(chunk))
            return super().submit(executor, chunk, start, full)

    calibrate()  # a warm pool: on a cold one the caller would run these quick items itself
    target = Recording(function_ref(h.square), star=False)
    run = ParallelRun(h.square, target, iter(range(4000)), 0,
                      RunSpec(n_workers=2, chunksize=500), n_left=4000)
    out = [r for batch in run for r in batch]
    assert out == [x * x for x in range(4000)]
    sizes = [by_start[k] for k in sorted(by_start)]
    assert sizes[0] == 500  # the plan's chunk is the upper bound
    assert sizes[-1] < sizes[0] / 4  # the last chunks are small: workers end together
    assert sizes == sorted(sizes, reverse=True)


def test_chunks_follow_what_items_cost_in_the_workers_and_the_report_says_so():
    # Issue 14, item 6: a plan made on a far-off time per item (here a remembered 200 ms
    # for items of 2 ms: chunks of 1) is corrected during the run.
    import functools

    from adaptive_exec import cache
    from adaptive_exec.fingerprint import fingerprint
    from adaptive_exec.records import Features

    func = functools.partial(h.faulty, cost=0.002)
    assert cache.observe(fingerprint(func), module="m", qualname="q",
                         sampled=Features(0.2, 0.0, 30, 30, 0, 40, 5, 1.0),
                         observed_item_s=None, run=None)
    pf = parallelize(func, backend="loky")
    assert pf.map(range(600)) == [10 * x for x in range(600)]
    report = pf.last_report
    assert report.plan.chunksize == 1 and report.plan.from_cache
    assert report.adjusted is not None and "not the 200.0 ms planned" in report.adjusted
    became = int(report.adjusted.rsplit(" ", 1)[1].replace(",", ""))
    assert became >= 10, report.adjusted
    assert report.adjusted in str(report)
    # The next plan starts from what the workers saw.
    assert cache.lookup(fingerprint(func)).features.mean_s < 0.02


# --- waiting told from computing by what the calls do (system.ThreadWaits) -------------

linux_looks = pytest.mark.skipif(not sys.platform.startswith("linux"),
                                 reason="the looks read /proc/self/task/<tid>/syscall")


@linux_looks
@pytest.mark.parametrize("func, on", [
    (h.sleepy, "sleeping"),
    (h.wait_in_select, "sockets or pipes (poll)"),
    (h.wait_for_a_child, "child processes"),
    (h.wait_on_a_queue, "locks"),
])
def test_what_a_waiting_function_waits_on_is_seen_and_said(func, on):
    pf = parallelize(func, cache=False)
    assert pf.map(range(40)) == [x + 1 for x in range(40)]
    plan = pf.last_report.plan
    assert plan.features["waits_on"] == on, plan.features
    assert plan.features["wait_share"] >= 0.5, plan.features
    assert plan.mode == "threads", plan.reason
    assert f"on {on}" in plan.reason, plan.reason
    assert on in plan.explain()


@linux_looks
def test_a_computing_call_kept_off_the_gil_by_a_thread_of_ours_is_not_taken_for_waiting():
    # Threads of ours (as the sampling watch importing loky beside a first call) hold
    # the GIL most of the time: the call computes throughout, yet waits for the GIL so
    # long that its CPU share falls under a half, and that thread's CPU, being ours, is
    # not the function's own threads. By its CPU share it got a thread pool, where the
    # GIL runs one call at a time. Looked at, it waits on nothing threads overlap.
    import time

    from adaptive_exec.calibration import DEFAULTS
    from adaptive_exec.planner import make_plan
    from adaptive_exec.system import SystemSnapshot, ThreadWaits, fast_switching

    def confused_sample():
        stop = threading.Event()
        waits = ThreadWaits(threading.get_native_id(), threading.get_ident())
        # Three of them: one alone left the call a CPU share of 0.54 beside a busy core.
        hogs = [threading.Thread(target=_spin_until, args=(stop,)) for _ in range(3)]
        looker = threading.Thread(target=_look_until, args=(stop, waits))
        # The GIL handed on as often as the sampling watch has it while it looks: at
        # the default 5 ms the looker itself, queued for the GIL behind three others,
        # made 3-9 looks in 0.4 s (CI: under 5, no share at all).
        fast_switching(True)
        for t in (*hogs, looker):
            t.start()

        def ours():
            return sum(time.clock_gettime(time.pthread_getcpuclockid(t.ident))
                       for t in (*hogs, looker))

        try:
            s = sample(h.crunch, iter(range(2)), star=False, complexity=1, ours_cpu=ours,
                       waits=waits)
        finally:
            stop.set()
            for t in (*hogs, looker):
                t.join()
            fast_switching(False)
        return s.features, waits

    # The confusion depends on how the machine shares its cores: beside two busy
    # processes one try left the call a CPU share of 0.502. Tried again then.
    for _ in range(3):
        f, waits = confused_sample()
        if f.cpu_fraction < 0.5 and f.threads_cpu < 0.3:
            break
    else:  # (a full suite beside two busy processes: 0.50-0.54 three times)
        pytest.skip(f"the CPU share this test needs did not come about here: {f}")
    assert f.wait_share is not None and f.wait_share < 0.25, (f, waits.waits)
    two = SystemSnapshot(usable_cpus=2, available_memory=8 << 30)
    plan = make_plan(f, 200, 0, two, DEFAULTS, warm=True, from_cache=False)
    assert plan.mode != "threads", plan.reason
    # The same measurements without the looks: the CPU share alone chose threads.
    blind = make_plan(dataclasses.replace(f, wait_share=None, waits_on=None), 200, 0, two,
                      DEFAULTS, warm=True, from_cache=False)
    assert blind.mode == "threads", blind.reason


def _look_until(stop, waits):
    while not stop.wait(0.002):
        waits.look()


def _spin_until(stop):
    while not stop.is_set():
        sum(i for i in range(1000))


def test_results_that_cost_more_to_move_than_to_make_start_no_pool():
    # 200 KB results of 0.1 ms calls: the plan stays serial (the caller alone would
    # unpickle them slower than the loop makes them), and no pool is started while
    # sampling for nothing (one forked then cost the serial map ~13%).
    from adaptive_exec.backends import loky as loky_backend

    # An earlier test's sampling watch may still be starting a pool ahead: let it end
    # first, so that a pool found afterwards is this map's.
    for thread in threading.enumerate():
        if thread.name.startswith("adaptive_exec-prestart"):
            thread.join(30)
    loky_backend.shutdown()
    pf = parallelize(h.fat_result, cache=False)
    assert len(pf.map(range(3000))) == 3000
    assert pf.last_report.plan.mode == "serial"
    assert loky_backend.current_executor() is None
