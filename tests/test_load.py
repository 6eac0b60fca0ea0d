"""The worker count follows the machine: real busy processes, real memory ceilings."""

from __future__ import annotations

import logging
import re
import subprocess
import sys
import threading
import time

import aex_helpers as h
import pytest

from adaptive_exec import calibrate, parallelize, system
from adaptive_exec.system import usable_cpus

needs_two = pytest.mark.skipif(usable_cpus() < 2, reason="needs 2 usable CPUs")

BUSY = "import time\nend = time.time() + 30\nwhile time.time() < end:\n    pass\n"


class Busy:
    """A process that keeps one CPU busy (at most 30 s), always ended by the test."""

    def __init__(self) -> None:
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        self.proc = subprocess.Popen([sys.executable, "-c", BUSY])

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait(timeout=10)
            self.proc = None


@pytest.fixture
def busy():
    b = Busy()
    yield b
    b.stop()


def slow(x):
    h.spin(0.15)
    return x


def medium(x):
    h.spin(0.1)
    return x


@needs_two
def test_a_busy_process_lowers_the_planned_workers(busy):
    busy.start()
    time.sleep(0.3)
    plan = parallelize(slow).plan(range(40))  # the one sampled call is a 150 ms window
    assert plan.mode == "serial" or plan.n_workers < usable_cpus(), plan.reason
    assert plan.features["others_load"] >= 0.5
    if plan.mode == "serial":
        assert "busy with other processes" in plan.reason


def short(x):
    h.spin(0.002)
    return x


@needs_two
def test_a_busy_process_is_seen_when_sampling_is_too_short_for_cpu_counters(busy):
    """20 ms of sampling is two of the kernel's CPU ticks: too few to measure a load.
    A process that keeps a CPU busy is runnable whenever one looks: the plan sees it."""
    busy.start()
    time.sleep(0.3)
    plan = parallelize(short).plan(range(3000))  # ~6 s of work, sampled for ~20 ms
    assert plan.features["others_load"] >= 1, plan.features
    assert plan.mode == "serial" or plan.n_workers < usable_cpus(), plan.reason


@needs_two
def test_the_same_plan_under_a_faked_load_and_none():
    # The seam, both ways, so the real-machine test above has its counterpart.
    system.fake_readings(others=float(usable_cpus()))
    try:
        loaded = parallelize(slow).plan(range(40))
    finally:
        system.fake_readings(others=0.0)
    try:
        quiet = parallelize(slow).plan(range(40))
    finally:
        system.fake_readings()
    assert loaded.mode == "serial" and "busy" in loaded.reason
    assert quiet.mode == "parallel" and quiet.n_workers == usable_cpus()


@needs_two
def test_a_load_above_the_cpu_count_never_makes_more_cpus_busy_than_there_are():
    # The load counts runnable threads, like a load average: the reason said "5 of 2
    # CPUs are busy".
    n = usable_cpus()
    system.fake_readings(others=float(n + 3))
    try:
        plan = parallelize(slow).plan(range(40))
    finally:
        system.fake_readings()
    assert plan.mode == "serial"
    assert f"{n} of {n} CPUs are busy with other processes (their load: {n + 3}.0)" \
        in plan.reason, plan.reason


def _machine_is_busy() -> bool:
    """Other processes already keep a CPU busy (CI on a shared machine, the suite run
    beside a busy process): a busy process of ours then cannot lower the workers any
    further on 2 cores."""
    probe = system.LoadProbe()
    time.sleep(0.5)
    return system.busy_cpus(probe.others(min_window_s=0.0) or 0.0) >= 1


@needs_two
def test_active_workers_follow_a_busy_process_during_the_run(busy, caplog):
    caplog.set_level(logging.INFO, logger="adaptive_exec")
    calibrate()  # a warm pool, so the run's timeline starts with every worker busy
    fake = _machine_is_busy()
    timeline, said, plan = _run_beside_a_busy_spell(busy, caplog, fake)
    if not fake and plan.features["others_load"] >= 0.5:
        # Other processes' load arrived after the check above, before our busy process
        # (0.8 s into the map): the plan saw the machine busy already (a CI run: one
        # worker planned, never two). The same instants through the seam instead.
        timeline, said, plan = _run_beside_a_busy_spell(busy, caplog, fake=True)
    full = usable_cpus()
    active = [a for _, a in timeline]
    assert full in active, (timeline, plan.reason)
    first_full = active.index(full)
    lowered = [i for i, a in enumerate(active) if i > first_full and 0 < a < full]
    assert lowered, f"the busy process never lowered the workers: {timeline}"
    assert full in active[lowered[0]:], f"the workers never rose again: {timeline}"
    # One INFO line each time the monitor changes the busy workers, with the reason.
    line = rf"load: \d+ of {full} cores busy with other processes: \d+ workers? now \(was "
    assert any(re.fullmatch(line + rf"{full}\)", m) for m in said), said
    assert any(re.fullmatch(line + r"\d+\)", m) and m.split(": ")[-1].startswith(f"{full} ")
               for m in said), said


def _run_beside_a_busy_spell(busy, caplog, fake: bool):
    """A map of ~3.5 s on every worker; from 0.8 s to 2.2 s into it, a CPU is kept busy
    by a real process, or (``fake``: the machine's own load is already what that process
    would add) the load reading says so through the seam. The map's workers timeline,
    the monitor's INFO lines, its plan."""
    caplog.clear()
    if fake:
        system.fake_readings(others=0.0)
        starter = threading.Timer(0.8, system.fake_readings,
                                  kwargs={"others": float(usable_cpus())})
        stopper = threading.Timer(2.2, system.fake_readings, kwargs={"others": 0.0})
    else:
        starter = threading.Timer(0.8, busy.start)
        stopper = threading.Timer(2.2, busy.stop)
    starter.start()
    stopper.start()
    try:
        pf = parallelize(medium, backend="loky", chunksize=1)
        assert pf.map(range(70)) == list(range(70))  # ~3.5 s on 2 workers
    finally:
        starter.cancel()
        stopper.cancel()
        starter.join()
        stopper.join()
        busy.stop()
        system.fake_readings()
    said = [r.getMessage() for r in caplog.records
            if r.levelno == logging.INFO and r.getMessage().startswith("load: ")]
    return pf.last_report.workers_timeline, said, pf.last_report.plan


def test_memory_ceiling_caps_the_workers_and_the_map_completes():
    def hungry(x):
        block = bytearray(300 << 20)  # 300 MB, touched
        block[:: 4096] = b"\x01" * len(block[:: 4096])
        return x + sum(block[:: 1 << 20])

    # Once outside the map: a process's first 300 MB block faults its pages in slowly
    # (a CI run's first call took 0.47 s more than the next), the plan then took it for a
    # set-up each worker pays and went serial for that, before memory was weighed.
    hungry(-1)
    pf = parallelize(hungry, max_memory="700MB")
    assert pf.map(range(6)) == [x + 300 for x in range(6)]
    plan = pf.last_report.plan
    assert plan.features["peak_memory"] >= 250 << 20
    assert plan.n_workers <= 1 and "memory" in plan.reason


def test_memory_ceiling_from_the_environment(monkeypatch):
    monkeypatch.setenv("ADAPTIVE_EXEC_MAX_MEMORY", "1GB")
    room = system.memory_room()
    assert room is not None and room <= 1 << 30
    monkeypatch.setenv("ADAPTIVE_EXEC_MAX_MEMORY", "lots")
    with pytest.raises(ValueError, match="ADAPTIVE_EXEC_MAX_MEMORY"):
        system.memory_room()


@needs_two
def test_work_in_flight_shrinks_when_memory_runs_out():
    calibrate()
    # Other processes' CPU load is set to none: this test is about memory, and a busy
    # machine would lower the workers before the squeeze does.
    system.fake_readings(others=0.0)
    squeeze = threading.Timer(0.6, system.fake_readings, kwargs={"room": 1 << 20,
                                                               "others": 0.0})
    squeeze.start()
    try:
        pf = parallelize(medium, backend="loky", chunksize=1)
        assert pf.map(range(40)) == list(range(40))
    finally:
        squeeze.cancel()
        system.fake_readings()
    active = [a for _, a in pf.last_report.workers_timeline]
    assert usable_cpus() in active and 1 in active[active.index(usable_cpus()):]


def test_bad_memory_option():
    with pytest.raises(ValueError, match="max_memory"):
        parallelize(h.square, max_memory="-3GB")
    # A float is a number of bytes, as the same text is (2e9 was refused, "2e9" taken).
    assert (parallelize(h.square, max_memory=2e9)._options.max_memory
            == parallelize(h.square, max_memory="2e9")._options.max_memory == 2 * 10**9)
    with pytest.raises(ValueError, match="max_memory"):
        parallelize(h.square, max_memory=0.5)


@needs_two
def test_the_worker_footprint_is_the_pools_measured_rss():
    calibrate()  # a pool whose workers can be measured
    from adaptive_exec.backends import loky as loky_backend

    measured = loky_backend.worker_rss()
    assert measured is not None and 5 << 20 < measured < 1 << 30
    system.fake_readings(others=0.0)  # load is not the point here; the memory is real
    try:
        plan = parallelize(slow).plan(range(40))
    finally:
        system.fake_readings()
    assert plan.mode == "parallel", plan.reason
    assert abs(plan.features["worker_memory"] - measured) < 64 << 20
