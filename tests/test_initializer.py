"""initializer= and initargs=, as concurrent.futures' executors have them: run once in
each process before it runs items (each worker, and the caller), with real workers."""

from __future__ import annotations

import functools
import json
import os
import subprocess
import sys

import aex_helpers as h
import pytest

from adaptive_exec import InitializerError, parallelize
from adaptive_exec.backends import starts


def _runs(path):
    """[(pid, value)] of each initializer run noted in ``path``."""
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [(int(pid), value) for pid, value in (line.split() for line in f)]


def test_every_item_sees_the_state_and_each_process_set_it_up_once(tmp_path):
    log = tmp_path / "runs"
    pf = parallelize(h.read_state, backend="loky", chunksize=5,
                     initializer=h.init_state, initargs=(str(log), "ready"))
    out = pf.map(range(200))
    assert [x for x, _, _ in out] == list(range(200))
    assert {state for _, state, _ in out} == {"ready"}  # no item ran before its set-up
    runs = _runs(log)
    pids = [pid for pid, _ in runs]
    assert len(pids) == len(set(pids)), f"an initializer ran twice in a process: {runs}"
    assert {pid for _, _, pid in out} <= set(pids)  # every process that ran items
    assert os.getpid() in pids  # the caller, before it ran items itself
    assert all(value == "ready" for _, value in runs)


FORKED_CHILD = """
import functools, json, os, sys
sys.path.insert(0, {tests!r})
import aex_helpers as h
from adaptive_exec import parallelize
from adaptive_exec.backends import loky as loky_backend

pf = parallelize(functools.partial(h.read_state, cost=0.02), backend="loky",
                 chunksize=1, initializer=h.init_state, initargs=({log!r}, "x"))
out = pf.map(range(30))
print(json.dumps({{"pids": sorted({{pid for _, _, pid in out}}), "me": os.getpid(),
                  "states": sorted({{state for _, state, _ in out}}),
                  "path": loky_backend.start_path()}}))
"""


def test_a_forked_worker_runs_it_again_though_the_caller_had(tmp_path):
    """A worker forked from a caller that already ran the initializer inherits its state,
    but not a connection or a file it opened: the initializer runs in the worker too.
    (In a fresh process: this one may run threads by now, and is then never forked.)"""
    if not starts.fork_works():
        pytest.skip("no fork here")
    log = tmp_path / "runs"
    script = tmp_path / "child.py"
    script.write_text(FORKED_CHILD.format(tests=os.path.dirname(__file__), log=str(log)))
    env = {**os.environ, starts.ENV_START: starts.FORK}
    run = subprocess.run([sys.executable, str(script)], capture_output=True, text=True,
                         timeout=120, env=env)
    assert run.returncode == 0, run.stderr
    got = json.loads(run.stdout.strip().splitlines()[-1])
    assert got["path"] == starts.FORK
    assert got["states"] == ["x"]
    workers = set(got["pids"]) - {got["me"]}
    assert workers, "no item reached a worker"
    ran_in = [pid for pid, _ in _runs(log)]
    assert got["me"] in ran_in and workers <= set(ran_in)
    assert len(ran_in) == len(set(ran_in))


def test_a_warm_pool_does_not_rerun_it_but_new_initargs_do(tmp_path):
    log = tmp_path / "runs"
    work = functools.partial(h.read_state, cost=0.01)
    first = parallelize(work, backend="loky", chunksize=2,
                        initializer=h.init_state, initargs=(str(log), "a"))
    assert len({pid for _, _, pid in first.map(range(60))}) > 1
    n_first = len(_runs(log))
    again = parallelize(work, backend="loky", chunksize=2,
                        initializer=h.init_state, initargs=(str(log), "a"))
    again.map(range(60))
    assert len(_runs(log)) == n_first  # the same set-up, in the same processes
    other = parallelize(work, backend="loky", chunksize=2,
                        initializer=h.init_state, initargs=(str(log), "b"))
    out = other.map(range(60))
    assert {state for _, state, _ in out} == {"b"}
    assert any(value == "b" for _, value in _runs(log)[n_first:])


def test_an_initializer_that_raises_in_the_workers_names_itself_and_does_not_hang():
    pf = parallelize(functools.partial(h.read_state, cost=0.01), backend="loky",
                     chunksize=1, initializer=h.init_fails, initargs=("worker",))
    with pytest.raises(InitializerError, match=r"init_fails\(\) raised ValueError: cannot "
                                               r"set up \(worker\) in worker process"):
        pf.map(range(50))
    # The pool is fine for the next map.
    assert parallelize(h.square, backend="loky").map(range(10)) == [x * x for x in range(10)]


def test_an_initializer_that_raises_in_the_caller_runs_no_item():
    calls = []
    pf = parallelize(calls.append, initializer=h.init_fails, initargs=("always",))
    with pytest.raises(InitializerError, match="in the caller") as info:
        pf.map(range(5))
    assert isinstance(info.value.__cause__, ValueError)
    assert calls == []


def test_with_a_timeout_the_caller_runs_none_and_workers_do(tmp_path):
    log = tmp_path / "runs"
    pf = parallelize(h.read_state, timeout=30, initializer=h.init_state,
                     initargs=(str(log), "t"))
    out = pf.map(range(8))
    assert {state for _, state, _ in out} == {"t"}
    assert os.getpid() not in {pid for pid, _ in _runs(log)}


def test_a_serial_map_runs_it_once_here(tmp_path):
    log = tmp_path / "runs"
    pf = parallelize(h.read_state, backend="serial", initializer=h.init_state,
                     initargs=(str(log), "s"))
    assert pf.map(range(3)) == [(x, "s", os.getpid()) for x in range(3)]
    pf.map(range(3))
    assert _runs(log) == [(os.getpid(), "s")]


@pytest.mark.parametrize("kwargs, error, words", [
    (dict(initializer=42), TypeError, "initializer must be a callable"),
    (dict(initializer=print, initargs="abc"), TypeError, "for one argument write (value,)"),
    (dict(initializer=print, initargs=5), TypeError, "initargs must be a tuple"),
])
def test_bad_initializer_options_say_what_to_pass(kwargs, error, words):
    with pytest.raises(error, match=words.replace("(", r"\(").replace(")", r"\)")):
        parallelize(h.square, **kwargs)
