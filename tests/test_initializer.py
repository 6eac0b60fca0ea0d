"""initializer= and initargs=, as concurrent.futures' executors have them: run once in
each process before it runs items (each worker, and the caller), with real workers."""

from __future__ import annotations

import functools
import json
import os
import subprocess
import sys

import aex_helpers as h
import psutil
import pytest

from adaptive_exec import InitializerError, dispatch, parallelize
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
    # The same set-up is not run again in a process that ran it (a busy machine may hand
    # the second map's chunks to a worker the first did not use: that one runs it once).
    a_runs = [pid for pid, value in _runs(log) if value == "a"]
    assert len(a_runs) == len(set(a_runs)), _runs(log)
    n_first = len(_runs(log))
    other = parallelize(work, backend="loky", chunksize=2,
                        initializer=h.init_state, initargs=(str(log), "b"))
    out = other.map(range(60))
    assert {state for _, state, _ in out} == {"b"}
    assert any(value == "b" for _, value in _runs(log)[n_first:])


@pytest.mark.parametrize("backend", ["serial", "loky"])
def test_initargs_a_then_b_then_a_again_run_it_again(tmp_path, backend):
    # Each map's items see its own initargs' state. The third map (initargs "a", which
    # had run in these processes before "b") was skipped: every item read "b".
    log = tmp_path / "runs"
    work = functools.partial(h.read_state, cost=0.005 if backend == "loky" else 0.0)
    for value in ("a", "b", "a", "a"):
        pf = parallelize(work, backend=backend, chunksize=2,
                         initializer=h.init_state, initargs=(str(log), value))
        assert {state for _, state, _ in pf.map(range(40))} == {value}, (value, _runs(log))
    # The fourth map, the same initargs as the third's, ran it nowhere again: "a" ran
    # at most twice in a process (before "b", and after it).
    a_runs = [pid for pid, value in _runs(log) if value == "a"]
    assert max(a_runs.count(pid) for pid in a_runs) <= 2, _runs(log)


def test_an_initializer_that_raises_in_the_workers_names_itself_and_does_not_hang():
    pf = parallelize(functools.partial(h.read_state, cost=0.01), backend="loky",
                     chunksize=1, initializer=h.init_fails, initargs=("worker",))
    with pytest.raises(InitializerError, match=r"init_fails\(\) raised ValueError: cannot "
                                               r"set up \(worker\) in worker process") as info:
        pf.map(range(50))
    exc = info.value
    # The initializer's own exception is the cause, as in the caller, with its traceback
    # chained under it; no item is named (none ran there).
    assert isinstance(exc.__cause__, ValueError)
    assert str(exc.__cause__) == "cannot set up (worker)"
    assert "init_fails" in str(exc.__cause__.__cause__)
    assert not any("raised while processing item" in n for n in getattr(exc, "__notes__", []))
    # The pool is fine for the next map.
    assert parallelize(h.square, backend="loky").map(range(10)) == [x * x for x in range(10)]


def test_an_initializer_that_hangs_under_a_timeout_is_named_and_its_worker_ended(
        tmp_path, monkeypatch):
    # It was reported as item 0 running past the timeout (ItemTimeoutError), though no
    # item had begun. Its allowance is the timeout plus the set-up's, shortened here.
    monkeypatch.setattr(dispatch, "UNNOTED_START_S", 1.0)
    pids = tmp_path / "pids"
    pf = parallelize(h.read_state, timeout=0.5, initializer=h.init_hangs,
                     initargs=(str(pids),))
    with pytest.raises(InitializerError, match=r"initializer did not return within 1.5 s "
                                               r"in a worker \(timeout=0.5 s per item") as info:
        pf.map(range(4))
    assert not isinstance(info.value, TimeoutError)
    hung = []
    for pid in map(int, pids.read_text().split()):
        try:
            hung.append(psutil.Process(pid))
        except psutil.NoSuchProcess:
            pass  # already ended
    _, alive = psutil.wait_procs(hung, timeout=10)
    assert not alive  # the workers stuck in it were ended with the pool


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


def test_a_map_forced_into_the_caller_with_a_timeout_still_runs_it_here(tmp_path,
                                                                        monkeypatch):
    # With timeout= the caller normally runs no item, so it skipped the initializer; a
    # map forced into the caller (the user's switch, a nested map) then ran every item
    # without the state: a wrong result where the loop with the initializer is right.
    monkeypatch.setenv("ADAPTIVE_EXEC_DISABLE", "1")
    log = tmp_path / "runs"
    pf = parallelize(h.read_state, timeout=5, initializer=h.init_state,
                     initargs=(str(log), "f"))
    with pytest.warns(RuntimeWarning, match="timeout=5 s is not enforced"):
        assert pf.map(range(3)) == [(x, "f", os.getpid()) for x in range(3)]
    assert _runs(log) == [(os.getpid(), "f")]


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


def test_the_state_an_initializer_sets_is_each_processs_own():
    """The global an importable initializer sets is read by the function in the same
    process: the caller's value of it never travels to a worker."""
    pf = parallelize(functools.partial(h.read_state, cost=0.005), backend="loky",
                     chunksize=2, initializer=h.init_pid_state)
    out = pf.map(range(120))
    assert all(state == pid for _, state, pid in out), [o for o in out if o[1] != o[2]][:5]
    assert len({pid for _, _, pid in out}) > 1  # workers ran some


SCRIPT_STATE = """
import json, os, sqlite3, sys, warnings
from adaptive_exec import parallelize

STATE = None
conn = None


def init(tag):
    global STATE, conn
    STATE = (tag, os.getpid())
    conn = sqlite3.connect(":memory:")  # a connection: each process opens its own


def work(x):
    import time
    t = time.perf_counter()
    while time.perf_counter() - t < 0.005:  # enough that workers take some items
        pass
    return STATE, os.getpid(), conn.execute("select ? * 2", (x,)).fetchone()[0]


if __name__ == "__main__":
    warnings.simplefilter("error")  # an UnpicklableWarning fails the script
    for options in ({{"backend": "loky", "chunksize": 3}}, {{"timeout": 30}}):
        out = parallelize(work, initializer=init, initargs=("t",), **options).map(range(60))
        assert [r[2] for r in out] == [2 * x for x in range(60)]
        print(json.dumps({{"me": os.getpid(), "rows": [[s[0], s[1], pid] for s, pid, _ in out]}}))
"""


def test_a_script_initializer_sets_globals_its_function_reads_in_each_worker(tmp_path):
    """concurrent.futures' own pattern, in a script (functions sent by value): the
    initializer opens a connection into a global, the function uses it. Each worker
    reads what its own initializer set; nothing runs serially for want of pickling."""
    _each_worker_saw_its_own_state(tmp_path, SCRIPT_STATE.format())


def _each_worker_saw_its_own_state(tmp_path, text):
    """Run the script ``text``; each of its two maps' rows (tag, the pid its state
    names, the pid that ran it) shows the state its own process's initializer set, and
    workers ran some."""
    script = tmp_path / "state.py"
    script.write_text(text)
    run = subprocess.run([sys.executable, str(script)], capture_output=True, text=True,
                         timeout=120, cwd=tmp_path)
    assert run.returncode == 0, run.stderr
    lines = [json.loads(line) for line in run.stdout.strip().splitlines()]
    assert len(lines) == 2
    for got in lines:
        rows = got["rows"]
        assert all(tag == "t" and state_pid == pid for tag, state_pid, pid in rows), rows[:5]
        assert {pid for _, _, pid in rows} - {got["me"]}, "no item ran in a worker"


SCRIPT_DICT_STATE = """
import json, os, sys
from adaptive_exec import parallelize

STATE = {}


def init(tag):
    STATE["tag"] = tag           # fills a global dict: no global statement
    STATE["pid"] = os.getpid()


def work(x):
    import time
    t = time.perf_counter()
    while time.perf_counter() - t < 0.005:  # enough that workers take some items
        pass
    return STATE.get("tag"), STATE.get("pid"), os.getpid()


if __name__ == "__main__":
    for options in ({"backend": "loky", "chunksize": 3}, {"timeout": 30}):
        out = parallelize(work, initializer=init, initargs=("t",), **options).map(range(60))
        print(json.dumps({"me": os.getpid(), "rows": out}))
"""


def test_a_script_initializer_that_fills_a_global_dict_is_seen_by_its_function(tmp_path):
    # The function and the initializer travel by value; pickled apart, each rebuilt a
    # namespace of its own in the worker: with a timeout every item read the caller's
    # empty dict, without one the caller's copy of it (3 of 60 items saw their own
    # process's state).
    _each_worker_saw_its_own_state(tmp_path, SCRIPT_DICT_STATE)


SCRIPT_ALTERNATING = """
import os, sys, time
from adaptive_exec import parallelize

LOG = sys.argv[1]
MODEL = None


def load():  # an expensive set-up, once per process and function
    global MODEL
    MODEL = 2
    with open(LOG, "a") as f:
        f.write(f"{os.getpid()} -\\n")


def spin():
    end = time.perf_counter() + 0.003
    while time.perf_counter() < end:
        pass


def f(x):
    spin()
    return x * MODEL


def g(x):
    spin()
    return x + MODEL


if __name__ == "__main__":
    for func in (f, g, f, g, f, g):
        out = parallelize(func, backend="loky", chunksize=4, initializer=load).map(range(60))
        assert out == [func(x) for x in range(60)]
    print("ok")
"""


def test_alternating_two_script_functions_does_not_rerun_their_initializer(tmp_path):
    # Each function sent by value has its own namespace in a worker, which its own copy
    # of the initializer sets: taken for one initializer whose state changed back, it
    # was run again on every map (2 runs became 7-12 over six maps).
    script = tmp_path / "alternating.py"
    script.write_text(SCRIPT_ALTERNATING)
    log = tmp_path / "runs"
    run = subprocess.run([sys.executable, str(script), str(log)], capture_output=True,
                         text=True, timeout=120, cwd=tmp_path)
    assert run.returncode == 0 and run.stdout.strip() == "ok", run.stderr
    pids = [int(pid) for pid, _ in _runs(log)]
    assert max(pids.count(pid) for pid in pids) <= 2, pids  # once per function there


def test_items_a_timed_map_runs_in_the_caller_see_the_state_too(tmp_path):
    # With timeout= the caller runs no item, so it skipped the initializer; an item that
    # cannot reach a worker (a lock) runs in the caller all the same, and read no state
    # there (KeyError in the reviewer's module). So did the items of a thread's map that
    # the interpreter's end kept from the pool. Found by a review helper.
    import threading
    import warnings

    from adaptive_exec import UnpicklableWarning

    log = tmp_path / "runs"
    lock = threading.Lock()
    pf = parallelize(h.read_state, timeout=30, initializer=h.init_state,
                     initargs=(str(log), "t"))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UnpicklableWarning)
        got = pf.map([0, 1, lock, 3])
    assert got[2] == (lock, "t", os.getpid())
    assert [state for _, state, _ in got] == ["t"] * 4


def test_an_initializer_failing_in_the_caller_comes_after_the_results_before_it():
    # A timed map runs an item that cannot reach a worker here, and first the
    # initializer, which fails here: its error jumped ahead of item 4's result, which
    # imap never yielded. Found by a review helper.
    import threading
    import warnings

    from adaptive_exec import UnpicklableWarning

    items = [0, 1, 2, 3, 4, threading.Lock(), 6, 7]
    pf = parallelize(h.square, timeout=30, initializer=h.init_fails_in,
                     initargs=(os.getpid(),))
    got = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UnpicklableWarning)
        with pytest.raises(InitializerError, match="in the caller"):
            for r in pf.imap(items):
                got.append(r)
    assert got == [0, 1, 4, 9, 16]


EVICTING = """
import sys
sys.path.insert(0, {tests!r})
from adaptive_exec import parallelize

def init(v):
    global STATE
    STATE = v

def f(x):
    return (x, STATE)

if __name__ == "__main__":
    for round_ in range(2):
        for k in range(12):
            pf = parallelize(f, backend="loky", timeout=60, chunksize=2, initializer=init,
                             initargs=(k,))
            assert pf.map(range(8)) == [(x, k) for x in range(8)], (round_, k)
    print("ok")
"""


def test_a_script_function_whose_initializer_was_let_go_runs_it_again(tmp_path):
    # A worker keeps the last 8 initializers: a script's function bundled with one let
    # go is rebuilt from its blob, in a namespace of its own, where the initializer had
    # not run; it was taken for run, and every later map raised NameError: STATE (found
    # by a review helper; the same past 16 initargs before the bound).
    script = tmp_path / "evicting.py"
    script.write_text(EVICTING.format(tests=os.path.dirname(__file__)))
    run = subprocess.run([sys.executable, str(script)], capture_output=True, text=True,
                         timeout=240, cwd=tmp_path)
    assert run.returncode == 0 and run.stdout.strip() == "ok", run.stderr[-3000:]


def test_an_initializer_error_whose_causes_loop_gets_the_worker_traceback_once():
    # The worker's traceback is chained at the root of the cause chain: a chain that
    # loops back on itself has no root, and must not hang the map's end.
    from adaptive_exec.errors import RemoteTraceback, attach_origin

    first, second = ValueError("first"), KeyError("second")
    first.__cause__, second.__cause__ = second, first
    exc = InitializerError("initializer=setup raised in a worker")
    exc.__cause__ = first
    assert attach_origin(exc, 0, "Traceback: ...") is exc
    assert exc.__cause__ is first and isinstance(second.__cause__, RemoteTraceback)
