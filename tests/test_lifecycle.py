"""The pool and the cache over a process's life: fork, a killed parent, idle resources,
a cache file this process may not write. Real processes, real signals, bounded waits.

Every process a test starts is ended by that test (killed in a ``finally`` when it did
not end by itself); a forked child never returns into pytest (``os._exit``).
"""

from __future__ import annotations

import functools
import json
import multiprocessing
import os
import pwd
import select
import shutil
import signal
import sqlite3
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
import warnings

import aex_helpers as h
import psutil
import pytest

from adaptive_exec import cache, calibration, parallelize
from adaptive_exec.backends import loky as loky_backend
from adaptive_exec.backends import starts

TESTS = os.path.dirname(os.path.abspath(__file__))
# Bounds for the failure cases only (a child that hangs): a passing run takes ~1 s.
CHILD_TIMEOUT_S = 30

needs_fork = pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork()")
posix_only = pytest.mark.skipif(sys.platform == "win32", reason="POSIX signals and /proc")


def alive(pids):
    """Those of ``pids`` still running; a zombie (dead, not yet reaped by whichever
    process adopted it) holds nothing and counts as gone."""
    out = []
    for pid in pids:
        try:
            if psutil.Process(pid).status() != psutil.STATUS_ZOMBIE:
                out.append(pid)
        except psutil.NoSuchProcess:
            pass
    return out


def kill_all(pids):
    for pid in alive(pids):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def abort_and_read(proc, family):
    """A child that hangs: SIGABRT (PYTHONFAULTHANDLER prints every thread's stack), then
    its output, and which of its processes outlived it. Those are ended first: they hold
    its stdout and stderr too, and the read waited for them (a hang's stacks were lost
    so, the read timing out in turn)."""
    try:
        family += [c.pid for c in psutil.Process(proc.pid).children(recursive=True)]
    except psutil.NoSuchProcess:
        pass
    proc.send_signal(signal.SIGABRT)
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=10)
    left = alive(family[1:])
    kill_all(family)
    out, err = proc.communicate(timeout=10)
    return out, err, left


def communicate_or_abort(proc, family, timeout, what):
    """``proc``'s (stdout, stderr) once it exits within ``timeout``; else the test fails
    with ``what``, the thread stacks abort_and_read gets and the processes left."""
    try:
        return proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        out, err, left = abort_and_read(proc, family)
    pytest.fail(f"{what} (its processes running after it: {left}):\n{out}\n{err[-8000:]}")


def read_line(proc, timeout):
    """One line of ``proc``'s stdout, or fail after ``timeout`` seconds."""
    ready, _, _ = select.select([proc.stdout], [], [], timeout)
    assert ready, f"no output from the child within {timeout} s"
    return proc.stdout.readline()


# --- 1. fork after use ------------------------------------------------------------------


def map_here():
    """In a forked child: a map on the pool, and what the pool was. Long enough that
    some items reach workers on the template path beside a busy machine (20 items: in CI,
    beside another suite, the template served only after the caller had run them all)."""
    pf = parallelize(h.heavy, backend="loky")
    out = pf.map(range(60))
    workers = loky_backend.worker_pids()
    for _ in range(2):
        # Beside CI's other suites a template once served only after the caller had run
        # all 60 (no worker, no error): the next map finds it up.
        if workers:
            break
        out = pf.map(range(60))
        workers = loky_backend.worker_pids()
    parents = []
    for pid in workers:
        try:
            parents.append(psutil.Process(pid).ppid())
        except psutil.NoSuchProcess:
            pass
    template = starts.template_pid()  # this child's own template, if its workers need one
    loky_backend.shutdown()  # this child's own pool: ended before it exits
    starts.template().stop()
    return {"ok": out == [x * 3 for x in range(60)], "mode": pf.last_report.plan.mode,
            "workers": workers, "worker_parents": parents, "pid": os.getpid(),
            "template": template, "left": alive(workers)}


def fork_and_report(work):
    """Run ``work`` in a child made by os.fork(); its JSON report, read with a bound.
    The child is reaped (or killed) before this returns."""
    r, w = os.pipe()
    with warnings.catch_warnings():
        # Python 3.12+ warns that forking a process with threads may deadlock the
        # child: that is the situation under test.
        warnings.simplefilter("ignore", DeprecationWarning)
        pid = os.fork()
    if pid == 0:  # the child: report through the pipe, never return into pytest
        code = 3
        try:
            os.close(r)
            try:
                report = work()
            except BaseException as exc:
                report = {"error": repr(exc)}
            os.write(w, json.dumps(report).encode())
            code = 0
        finally:
            os._exit(code)
    os.close(w)
    data = b""
    try:
        deadline = time.monotonic() + CHILD_TIMEOUT_S
        while True:
            left = deadline - time.monotonic()
            ready, _, _ = select.select([r], [], [], max(0.0, left))
            if not ready:
                pytest.fail(f"the forked child did not report within {CHILD_TIMEOUT_S} s")
            chunk = os.read(r, 65536)
            if not chunk:
                break
            data += chunk
    finally:
        os.close(r)
        reap(pid)
    return json.loads(data)


def reap(pid, timeout=10.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        done, _ = os.waitpid(pid, os.WNOHANG)
        if done:
            return
        time.sleep(0.01)
    os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)


def check_child_report(report, parent_workers):
    assert "error" not in report, report["error"]
    assert report["ok"] and report["mode"] == "parallel"
    assert report["workers"] and not set(report["workers"]) & set(parent_workers)
    # A pool of its own: forked by the child, or by the child's own template.
    assert set(report["worker_parents"]) <= {report["pid"], report["template"]}
    assert report["template"] != starts.template_pid() or report["template"] is None
    assert report["left"] == []


def check_parent_pool_untouched(parent_workers):
    assert sorted(loky_backend.worker_pids()) == sorted(parent_workers)
    pf = parallelize(h.heavy, backend="loky")
    assert pf.map(range(20)) == [x * 3 for x in range(20)]
    # The same pool: its workers still serve (one planned narrower under load, then
    # wider, has grown by a worker on the template and exec paths).
    assert set(parent_workers) <= set(loky_backend.worker_pids())


def use_the_pool():
    assert parallelize(h.heavy, backend="loky").map(range(20)) == [x * 3 for x in range(20)]
    workers = loky_backend.worker_pids()
    assert workers
    return workers


@needs_fork
def test_a_child_forked_after_a_map_maps_on_a_pool_of_its_own():
    parent_workers = use_the_pool()
    report = fork_and_report(map_here)
    check_child_report(report, parent_workers)
    check_parent_pool_untouched(parent_workers)


def _mp_target(conn):
    try:
        conn.send(map_here())
    except BaseException as exc:
        conn.send({"error": repr(exc)})
    finally:
        conn.close()


@needs_fork
def test_a_multiprocessing_fork_child_maps_on_a_pool_of_its_own():
    parent_workers = use_the_pool()
    ctx = multiprocessing.get_context("fork")
    ours, theirs = ctx.Pipe(duplex=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # see fork_and_report
        proc = ctx.Process(target=_mp_target, args=(theirs,))
        proc.start()
    try:
        theirs.close()
        assert ours.poll(CHILD_TIMEOUT_S), "the child did not report"
        report = ours.recv()
        proc.join(CHILD_TIMEOUT_S)
        assert proc.exitcode == 0
    finally:
        if proc.is_alive():
            proc.kill()
            proc.join(10)
        ours.close()
    check_child_report(report, parent_workers)
    check_parent_pool_untouched(parent_workers)


@needs_fork
def test_a_child_forked_while_another_thread_held_the_locks_can_map():
    # A lock held at fork() stays held in the child forever: the thread that would
    # release it is not there. Held here by this thread, which is the same for the
    # child: a plain Lock has no owner.
    parent_workers = use_the_pool()
    cache.lookup("anything")  # the cache's at-fork hook is registered on first use
    locks = [loky_backend._state.lock, calibration._lock, cache._state.lock]
    for lock in locks:
        lock.acquire()
    try:
        report = fork_and_report(map_here)
    finally:
        for lock in locks:
            if lock.locked():
                lock.release()
    check_child_report(report, parent_workers)
    check_parent_pool_untouched(parent_workers)


# --- 2. the parent killed ---------------------------------------------------------------

OWNER = textwrap.dedent("""
    import json, os, sys, time
    sys.path.insert(0, {tests!r})
    import aex_helpers as h
    import psutil
    from adaptive_exec import parallelize
    from adaptive_exec.backends import loky as loky_backend

    assert parallelize(h.heavy, backend="loky").map(range(20)) == [x * 3 for x in range(20)]
    family = [(p.pid, " ".join(p.cmdline())) for p in psutil.Process().children(recursive=True)]
    child = None
    if {fork_child}:  # a long-lived child of the program's own, which never maps
        child = os.fork()
        if child == 0:
            time.sleep(60)
            os._exit(0)
    from adaptive_exec.backends import starts
    print(json.dumps({{"workers": loky_backend.worker_pids(), "family": family,
                      "child": child, "socket": starts._template.address}}), flush=True)
    time.sleep(120)  # until killed by the test
""")

# The lifecycle issue asks that workers and helpers be gone within 2 s of their parent's
# death. Measured here: 0.06-0.23 s (workers poll every PARENT_POLL_S = 0.1 s; loky's
# resource tracker follows at once). The extra second is a margin for a busy CI machine,
# not a looser requirement.
GONE_WITHIN_S = 2.0
MARGIN_S = 1.0


# The helper process each start path leaves beside the workers (backends/starts.py): loky's
# resource tracker for loky's own start, the template for the template's; none for fork.
HELPERS = {"exec": "loky.backend.resource_tracker", "template": "adaptive_exec.backends.starts",
           "fork": None}


@posix_only
@pytest.mark.parametrize("path", sorted(HELPERS))
@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM], ids=["SIGKILL", "SIGTERM"])
def test_workers_and_their_helpers_go_when_their_parent_is_killed(tmp_path, sig, path):
    _killed_owner_leaves_nothing(tmp_path, sig, path, fork_child=False)


@posix_only
@pytest.mark.parametrize("path", sorted(HELPERS))
def test_they_go_too_when_the_parent_had_forked_a_child_that_lives_on(tmp_path, path):
    # The child inherited the write end of each template worker's "parent alive" pipe:
    # the template and its workers ran on for as long as the child lived.
    _killed_owner_leaves_nothing(tmp_path, signal.SIGKILL, path, fork_child=True)


def _killed_owner_leaves_nothing(tmp_path, sig, path, fork_child):
    script = tmp_path / "owner.py"
    script.write_text(OWNER.format(tests=TESTS, fork_child=fork_child))
    env = {**os.environ, cache.ENV_DIR: str(tmp_path / "cache"), starts.ENV_START: path}
    proc = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, text=True,
                            env=env)
    family = []
    try:
        info = json.loads(read_line(proc, CHILD_TIMEOUT_S))
        family = [pid for pid, _ in info["family"]]
        own_child = [info["child"]] if info["child"] else []
        # A resource tracker (multiprocessing's, loky's) ends when the last process
        # holding its pipe does, the program's own child too: the standard library's
        # way, and it runs no item. Not waited for then; ended by the test.
        trackers = [pid for pid, cmd in info["family"] if own_child and "resource_tracker" in cmd]
        commands = [cmd for _, cmd in info["family"]]
        assert info["workers"] and set(info["workers"]) <= set(family)
        if HELPERS[path] is not None:  # the helper process the pool started: it must go too
            assert any(HELPERS[path] in cmd for cmd in commands), commands
        assert alive(family) == family
        killed_at = time.monotonic()
        proc.send_signal(sig)
        proc.wait(timeout=10)
        assert proc.returncode == -sig
        watched = [pid for pid in family if pid not in trackers]
        while alive(watched) and time.monotonic() - killed_at < GONE_WITHIN_S + MARGIN_S:
            time.sleep(0.02)
        took = time.monotonic() - killed_at
        left = {pid: cmd for pid, cmd in info["family"] if pid in alive(watched)}
        assert not left, f"still running {took:.2f} s after {sig.name}: {left}"
        print(f"{sig.name}, {path}: workers and helpers gone after {took:.2f} s")
        if info["socket"] and not own_child:
            # Nor the template's socket file and its directory (a pymp-* in /tmp), which
            # a killed caller cannot remove: the template does, as it ends.
            assert not os.path.exists(info["socket"])
            assert not os.path.exists(os.path.dirname(info["socket"]))
        assert alive(own_child) == own_child  # the program's own child lives on
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=10)
        kill_all(family + own_child)


# --- 3. idle resources ------------------------------------------------------------------

IDLE = textwrap.dedent("""
    import json, os, sys, threading, time
    sys.path.insert(0, {tests!r})
    import aex_helpers as h
    from adaptive_exec import adaptive_map, calibrate, parallelize

    lingering = []

    def counts():
        # A map's helper threads (the load monitor, a pool start ahead) end just after
        # it returns: wait for them, bounded. One that never ends is counted: a leak.
        # The bound only tells a leak from a loaded machine (they end within ms quiet;
        # a pool start ahead still under way beside the CI's suites outlasted 5 s). Once
        # it has run out, a leak is counted and the test fails: no later count waits.
        deadline = time.monotonic() + (1 if lingering else 30)
        while (any(t.name.startswith("adaptive_exec") for t in threading.enumerate())
               and time.monotonic() < deadline):
            time.sleep(0.01)
        if any(t.name.startswith("adaptive_exec") for t in threading.enumerate()):
            lingering.append([t.name for t in threading.enumerate()])
        return len(os.listdir("/proc/self/fd")), threading.active_count()

    def one_map():
        assert adaptive_map(h.square, [1, 2, 3]) == [1, 4, 9]

    def one_pool_map():
        pf = parallelize(h.heavy, backend="loky")
        assert pf.map(range(4)) == [0, 3, 6, 9]
        assert pf.last_report.plan.mode == "parallel"

    def in_threads(func, n):
        for _ in range(n):
            t = threading.Thread(target=func)
            t.start()
            t.join(30)

    out = {{"start": counts()}}
    # Warm-up: the cache file open in this thread, one thread's connection opened and
    # closed (SQLite keeps that descriptor for reuse while this process holds a lock on
    # the file), the pool up with its two threads, at its full size (a map planned for
    # fewer workers, a busy core seen at its plan, reuses it; one planned for more
    # would replace a smaller pool, with more descriptors: not a leak).
    one_map()
    in_threads(one_map, 1)
    calibrate()
    one_pool_map()
    in_threads(one_pool_map, 1)
    out["warm"] = counts()
    for _ in range(1000):
        one_map()
    out["after 1000 maps"] = counts()
    in_threads(one_map, 300)
    out["after 300 threads"] = counts()
    in_threads(one_pool_map, 30)
    out["after 30 threads on the pool"] = counts()
    out["lingering"] = lingering
    print(json.dumps(out))
""")


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="counts /proc/self/fd")
def test_descriptors_and_threads_stay_flat_over_many_maps_and_short_lived_threads(tmp_path):
    script = tmp_path / "idle.py"
    script.write_text(IDLE.format(tests=TESTS))
    env = {**os.environ, cache.ENV_DIR: str(tmp_path / "cache")}
    proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True,
                          env=env, timeout=CHILD_TIMEOUT_S * 3)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    print(got)
    warm = got["warm"]
    assert got["lingering"] == [], got  # helper threads that never ended
    for phase in ("after 1000 maps", "after 300 threads", "after 30 threads on the pool"):
        assert got[phase] == warm, got
    # The cache: its file, WAL and shared memory, and the descriptor SQLite keeps for
    # reuse (4); the pool: its pipes and the workers' sentinels (a handful, by loky's
    # design). Bounds, not measurements: the point is that the counts stop growing.
    assert warm[0] - got["start"][0] <= 30, got
    assert warm[1] - got["start"][1] <= 3, got  # the pool's manager and feeder threads


# --- 4. a cache file this process may not write -----------------------------------------

READ_ONLY = textwrap.dedent("""
    import json, os, sys, warnings
    from adaptive_exec import CacheWarning, cache, cache_views, parallelize

    def triple(x):
        return x * 3

    def quadruple(x):  # never cached: a run whose features cannot be stored
        return x * 4

    mode, cache_dir, scratch, nobody = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
    if mode == "fill":
        os.environ[cache.ENV_DIR] = cache_dir
        assert parallelize(triple, max_workers=1).map(range(300)) == [x * 3 for x in range(300)]
        sys.exit(0)
    # A map in a scratch cache first: whatever a map imports is imported now, while the
    # interpreter's own files are still readable (root's Python may live under /root).
    os.environ[cache.ENV_DIR] = scratch
    assert parallelize(triple, max_workers=1).map(range(300)) == [x * 3 for x in range(300)]
    cache.close()
    os.environ[cache.ENV_DIR] = cache_dir
    if os.geteuid() == 0:  # root writes any file: be a user that may not write this one
        try:
            os.setgroups([])
            os.setgid(nobody)
            os.setuid(nobody)
        except PermissionError as exc:
            print(json.dumps({"skip": f"cannot drop root's privileges: {exc}"}))
            sys.exit(0)
    if mode == "access-lies":
        # As access() may on a network file system: says writable, the write is refused.
        cache._writable = lambda p: True
    if mode.endswith("directory"):
        assert not os.access(cache_dir, os.W_OK)
    else:
        assert not os.access(cache.path(), os.W_OK)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ok, from_cache = [], []
        for _ in range(3):
            pf = parallelize(triple, max_workers=1)
            ok.append(pf.map(range(300)) == [x * 3 for x in range(300)])
            from_cache.append(pf.last_report.from_cache)
            ok.append(parallelize(quadruple, max_workers=1).map(range(300))
                      == [x * 4 for x in range(300)])
            cache.load_calibration()
            cache.store_calibration(cache.Calibration(0.2, 3e-4, 3e-9, 2, "test"))
    ours = [str(w.message) for w in caught if issubclass(w.category, CacheWarning)]
    print(json.dumps({"ok": ok, "from_cache": from_cache, "warnings": ours,
                      "status": cache_views.stats()["status"]}))
""")


def snapshot(db_path):
    conn = sqlite3.connect(f"file:{db_path}?mode=ro", uri=True)
    try:
        return (conn.execute("SELECT fingerprint, qualname, hits, used_at, updated_at "
                             "FROM entries ORDER BY fingerprint").fetchall(),
                conn.execute("SELECT count(*) FROM runs").fetchone()[0],
                conn.execute("SELECT count(*) FROM calibration").fetchone()[0])
    finally:
        conn.close()


@posix_only
@pytest.mark.parametrize("mode", ["read-only", "access-lies", "writable file, read-only directory",
                                  "read-only file and directory"])
def test_a_read_only_cache_file_is_read_never_written_with_one_warning(tmp_path, mode):
    # In a directory it may not write (a read-only mount, a cache baked into an image),
    # the file, writable or not, turned the cache off ("attempt to write a readonly
    # database"; "cache list" said it was empty): SQLite's WAL needs its -wal and -shm
    # files beside it.
    try:
        nobody = pwd.getpwnam("nobody").pw_uid
    except KeyError:
        nobody = 65534
    script = tmp_path / "read_only.py"
    script.write_text(READ_ONLY)
    # Outside tmp_path: pytest's base directory is private to the user running it, and
    # the child may run as nobody.
    cache_dir = tempfile.mkdtemp(prefix="aex-read-only-")
    try:
        def child(step):
            proc = subprocess.run(
                [sys.executable, str(script), step, cache_dir, str(tmp_path / "scratch"),
                 str(nobody)], capture_output=True, text=True, timeout=CHILD_TIMEOUT_S * 2,
                env={**os.environ, "PYTHONDONTWRITEBYTECODE": "1"})
            assert proc.returncode == 0, proc.stdout + proc.stderr
            return proc.stdout

        child("fill")
        db_path = os.path.join(cache_dir, cache.FILENAME)
        before = snapshot(db_path)
        assert [row[1] for row in before[0]] == ["triple"]
        if os.geteuid() == 0:
            for name in [".", *os.listdir(cache_dir)]:  # the directory stays writable
                os.chown(os.path.join(cache_dir, name), nobody, -1)
        for name in os.listdir(cache_dir):  # a reader in a read-only directory finds none
            if name.endswith(("-wal", "-shm")):
                os.remove(os.path.join(cache_dir, name))
        os.chmod(db_path, 0o644 if mode.startswith("writable file") else 0o444)
        os.chmod(cache_dir, 0o555 if mode.endswith("directory") else 0o755)
        got = json.loads(child(mode).strip().splitlines()[-1])
        if "skip" in got:
            pytest.skip(got["skip"])
        assert all(got["ok"]) and len(got["ok"]) == 6  # the maps are unaffected
        assert got["from_cache"] == [True, True, True]  # and the file is still read
        assert len(got["warnings"]) == 1, got["warnings"]
        assert "never written" in got["warnings"][0] and db_path in got["warnings"][0]
        assert got["status"].startswith("read-only")
        assert snapshot(db_path) == before  # no hit, entry, run or calibration written
    finally:
        os.chmod(cache_dir, 0o755)
        shutil.rmtree(cache_dir, ignore_errors=True)


# --- Ctrl-C at any moment --------------------------------------------------------------

CTRL_C_CHILD = """
import json, os, signal, sys, time
sys.path.insert(0, {tests!r})
import psutil
import aex_helpers as h
from adaptive_exec import parallelize

t_sig = None

def on_sigint(signum, frame):
    global t_sig
    t_sig = time.perf_counter()
    raise KeyboardInterrupt

signal.signal(signal.SIGINT, on_sigint)

def ours():
    out = []
    for c in psutil.Process().children(recursive=True):
        try:
            cmd = " ".join(c.cmdline())
            # Helpers that live as long as this process (backends/starts.py): not workers.
            if "resource_tracker" not in cmd and "adaptive_exec.backends.starts" not in cmd:
                out.append(c.pid)
        except psutil.NoSuchProcess:
            pass
    return out

# 20 ms items from nothing remembered: the first is sampled here, the pool is started
# ahead while it runs, the rest go to it. {n} of them: a minute's work or more on two
# workers, so that control given back only once the map is done is told from a prompt
# return by far, under any load (with 150, a Ctrl-C held until the map's end came back
# within ~1.5 s, inside any bound that load leaves room for).
pf = parallelize(h.heavy, cache=False)
outcome = "finished"
try:
    print("go", flush=True)  # inside the try: a signal sent at once lands in it
    if {mode!r} == "map":
        assert pf.map(range({n})) == [3 * x for x in range({n})]
    else:
        for i, r in enumerate(pf.imap(range({n}))):
            assert r == 3 * i
            h.spin(0.01)  # the consumer's own code, between results
except KeyboardInterrupt:
    took = time.perf_counter() - t_sig
    procs = []
    for pid in ours():
        try:
            procs.append(psutil.Process(pid))
        except psutil.NoSuchProcess:  # ended meanwhile: gone already
            pass
    # Gone, polled for as long as a hang takes to tell (they are at once quiet; the 2 s
    # once waited here is short beside shutdown's own 10 s for loky's manager to end them).
    gone, left = psutil.wait_procs(procs, timeout={gone_s})
    # A helper read between its fork and its exec showed this script's command line:
    # read again now (a CI run once listed one as a worker left behind).
    outcome = json.dumps({{"took": took, "left": [p.pid for p in left if p.pid in ours()]}})
print(outcome, flush=True)
signal.signal(signal.SIGINT, signal.default_int_handler)
# The next map works.
assert parallelize(h.heavy, cache=False).map(range(40)) == [3 * x for x in range(40)]
print("next ok", flush=True)
"""

# Spread over sampling (the first 20 ms item), the start ahead and the run.
CTRL_C_INSTANTS_S = (0.0, 0.01, 0.025, 0.04, 0.06, 0.1, 0.15, 0.3, 0.6, 1.0)
# Items of the map interrupted: 6000 x 20 ms, 60 s of work on two workers at best.
CTRL_C_ITEMS = 6000
# Bounds that only tell a hang from a loaded machine (the bound is 1 s; control
# came back within ~0.01 s quiet, 0.04 s beside two busy processes with the workers'
# start slowed 1.5 s, and the workers were gone at once; shutdown() gives loky's manager
# up to 10 s to end them, which a loaded machine may use: a shutdown forced 4 s slow
# failed the old 3 s bound): far beyond any delay load brings, far below what finishing
# the map's work would take.
CTRL_C_BACK_WITHIN_S = 20
CTRL_C_GONE_WITHIN_S = 20


@posix_only
@pytest.mark.parametrize("mode", ["map", "imap"])
@pytest.mark.parametrize("delay", CTRL_C_INSTANTS_S)
def test_ctrl_c_at_any_moment_gives_control_back_and_leaves_no_worker(tmp_path, mode, delay):
    script = tmp_path / "child.py"
    script.write_text(CTRL_C_CHILD.format(tests=TESTS, mode=mode, n=CTRL_C_ITEMS,
                                          gone_s=CTRL_C_GONE_WITHIN_S))
    # PYTHONFAULTHANDLER: a child that hangs is sent SIGABRT and prints every thread's
    # stack, so that the failure says where it hung.
    proc = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONFAULTHANDLER": "1"})
    family = [proc.pid]
    try:
        assert proc.stdout.readline().strip() == "go"
        time.sleep(delay)
        family += [c.pid for c in psutil.Process(proc.pid).children(recursive=True)]
        proc.send_signal(signal.SIGINT)
        # Its own bounds, its next map and its start, on a loaded machine.
        out, err = communicate_or_abort(proc, family, CHILD_TIMEOUT_S * 2,
                                        f"the child hung after Ctrl-C at {delay} s")
        assert proc.returncode == 0, out + err[-3000:]
        lines = out.strip().splitlines()
        assert lines[-1] == "next ok", out + err[-3000:]
        # The signal landed before the map ended (it has far more work than the delays).
        assert lines[0] != "finished", out + err[-3000:]
        report = json.loads(lines[0])
        print(f"control back {report['took']:.3f} s after Ctrl-C at {delay} s")
        assert report["took"] < CTRL_C_BACK_WITHIN_S, report
        assert report["left"] == [], report
        time.sleep(0.1)
        deadline = time.monotonic() + CTRL_C_GONE_WITHIN_S
        while alive(family) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert alive(family) == [], "processes left after the child ended"
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=10)
        kill_all(family)


def _run_to_its_end(script, path, timeout, *args, quiet=False):
    """Run ``script`` (with ``args``) on start path ``path``; its output, once it exited
    0 by itself within ``timeout`` (``quiet``: with no warning or error on stderr). One
    that hangs is sent SIGABRT (PYTHONFAULTHANDLER: every thread's stack is printed) and
    the test fails with it; its processes are ended."""
    proc = subprocess.Popen([sys.executable, str(script), *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONFAULTHANDLER": "1",
                                 starts.ENV_START: path})
    family = [proc.pid]
    try:
        out, err = communicate_or_abort(proc, family, timeout, "the child did not exit")
        assert proc.returncode == 0, out + err[-3000:]
        if quiet:
            assert "Warning" not in err and "Error" not in err, out + err[-3000:]
        return out
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=10)
        kill_all(family)


HELD_BY_THE_CALLER = """
import fcntl, json, os, select, socket, subprocess, sys, time
sys.path.insert(0, {tests!r})
import aex_helpers as h
from adaptive_exec import parallelize
from adaptive_exec.backends import loky as loky_backend

lock_path = sys.argv[1]
cat = subprocess.Popen(["cat"], stdin=subprocess.PIPE, stdout=subprocess.PIPE)
r, w = os.pipe()
locked = open(lock_path, "w")
fcntl.flock(locked, fcntl.LOCK_EX)
server = socket.socket()
server.bind(("127.0.0.1", 0))
server.listen()
port = server.getsockname()[1]

pf = parallelize(h.heavy, backend="loky", max_workers=2)
n = int(sys.argv[2])
assert pf.map(range(n)) == [x * 3 for x in range(n)]
assert loky_backend.worker_pids(), "no pool"

def eof(fd, data=b""):  # within 5 s, as a reader waiting for the writer's end
    got, end = b"", time.monotonic() + 5
    while select.select([fd], [], [], max(0, end - time.monotonic()))[0]:
        chunk = os.read(fd, 100)
        if not chunk:
            return got == data
        got += chunk
    return "no end of file"

cat.stdin.write(b"hi")
cat.stdin.close()  # what communicate() does, then it reads to the end
seen = {{"cat": eof(cat.stdout.fileno(), b"hi")}}
cat.kill()
cat.wait(5)
os.close(w)
seen["pipe"] = eof(r)
locked.close()
seen["flock"] = subprocess.run(
    [sys.executable, "-c", "import fcntl; f = open(%r, 'w'); "
     "fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)" % lock_path]).returncode == 0
server.close()
again = socket.socket()
try:
    again.bind(("127.0.0.1", port))
    seen["port"] = True
except OSError as exc:
    seen["port"] = str(exc)
again.close()
assert pf.map(range(n)) == [x * 3 for x in range(n)]  # the pool still works
print(json.dumps(seen), flush=True)
"""


@needs_fork
@pytest.mark.parametrize(("path", "n"), [(starts.FORK, 40), (starts.FORK, 3),
                                         (starts.TEMPLATE, 40), (starts.EXEC, 40)],
                         ids=["forked", "forked template", "template", "exec"])
def test_a_warm_pool_holds_none_of_the_pipes_sockets_and_locks_the_caller_closes(
        tmp_path, path, n):
    # Forked workers held the caller's descriptors while the pool stayed warm (up to
    # 300 s idle): a child process's pipe closed by the caller gave no end of file (its
    # communicate() waited), an flock stayed held, a port stayed bound. n=3 comes from
    # the template forked at the map's start, which held them too.
    script = tmp_path / "held.py"
    script.write_text(HELD_BY_THE_CALLER.format(tests=TESTS))
    out = _run_to_its_end(script, path, 90, str(tmp_path / "lock"), str(n))
    seen = json.loads(out.strip().splitlines()[-1])
    assert seen == {"cat": True, "pipe": True, "flock": True, "port": True}, seen


PRINTS_THROUGH_A_COPY = """
import os, sys
sys.path.insert(0, {tests!r})
sys.stdout = open(os.dup(1), "w", buffering=1)  # a copy of the pipe, on a descriptor of its own
import aex_helpers as h
from adaptive_exec import parallelize

import functools
say = functools.partial(h.say, cost={cost})
pf = parallelize(say, backend="loky", max_workers=2)
assert pf.map(range({n})) == list(range({n}))
assert pf.last_report.plan.mode == "parallel", pf.last_report.plan.explain()
"""


@needs_fork
@pytest.mark.parametrize("n", [40, 3], ids=["forked", "forked template"])
def test_workers_print_through_the_callers_sys_stdout_on_a_descriptor_of_its_own(
        tmp_path, n):
    # Under a pipe (CI, | tee), a worker forked from a caller whose sys.stdout is a file
    # on a copy of descriptor 1 let that copy go: print raised EBADF.
    script = tmp_path / "prints.py"
    script.write_text(PRINTS_THROUGH_A_COPY.format(tests=TESTS, n=n,
                                                   cost=0.002 if n > 3 else 0.2))
    out = _run_to_its_end(script, starts.FORK, 90)
    assert sorted(out.split()) == sorted(f"said-{x}" for x in range(n)), out


EXITING_CHILD = """
import os, sys, time
sys.path.insert(0, {tests!r})
import aex_helpers as h
from adaptive_exec import parallelize
from adaptive_exec.backends import loky as loky_backend

pf = parallelize(h.heavy, backend="loky")
assert pf.map(range(20)) == [x * 3 for x in range(20)]
workers = loky_backend.worker_pids()
pid = os.fork()
if pid == 0:
    sys.exit(0)  # a normal exit: the atexit hooks run, ours and multiprocessing's
os.waitpid(pid, 0)
print(pf.map(range(20)) == [x * 3 for x in range(20)],
      set(workers) <= set(loky_backend.worker_pids()), flush=True)
"""


@needs_fork
@pytest.mark.parametrize("path", [starts.FORK, starts.TEMPLATE, starts.EXEC])
def test_a_forked_child_that_exits_normally_leaves_the_parents_pool_alone(tmp_path, path):
    # The child inherited multiprocessing's table of the parent's workers, and our exit
    # hook killed them there (SIGKILL; poll() cannot tell another's child is alive):
    # the parent's next map ran on a new pool, or its map under way failed with
    # "killed its worker process twice". The child's exit also failed to join them.
    script = tmp_path / "exiting_child.py"
    script.write_text(EXITING_CHILD.format(tests=TESTS))
    assert _run_to_its_end(script, path, 60, quiet=True).split() == ["True", "True"]


MP_CHILD_MAPS = """
import multiprocessing as mp, sys, time
sys.path.insert(0, {tests!r})
import aex_helpers as h
from adaptive_exec import parallelize

def child():
    assert parallelize(h.heavy, backend="loky").map(range(20)) == [x * 3 for x in range(20)]

if __name__ == "__main__":
    proc = mp.get_context("fork").Process(target=child)
    proc.start()
    proc.join(30)
    print(proc.exitcode, flush=True)
    if proc.exitcode is None:
        proc.kill()
        proc.join()
"""


@needs_fork
@pytest.mark.parametrize("path", [starts.FORK, starts.TEMPLATE, starts.EXEC])
def test_a_multiprocessing_child_that_maps_exits_when_its_target_returns(tmp_path, path):
    # multiprocessing ends its child with os._exit: our atexit hook never ran there, and
    # its own exit joined the child's pool workers, which wait for the child to go: the
    # child never exited (found by an adversarial review helper).
    script = tmp_path / "mp_child.py"
    script.write_text(MP_CHILD_MAPS.format(tests=TESTS))
    assert _run_to_its_end(script, path, 90, quiet=True).split() == ["0"]


# Put before MP_CHILD_MAPS's child(): widens a race seen 1 in ~200 runs beside busy
# processes. The thread that unsticks loky's manager thread (_close_if_stuck) holds it,
# and with it the pool's queues and locks: it ends a little after it (here: 10 ms), while
# the exit goes on (here: 50 ms after shutdown()), and the semaphores' clean-up, then run
# on that thread, takes a while (here: 200 ms between its sem_unlink and its word to
# loky's resource tracker). Loky's semaphores (exec path) and multiprocessing's
# (template path: its context).
SLOW_CLEANUP = """
import importlib, threading
from adaptive_exec.backends import loky as loky_backend

def slowed(cleanup):
    def slow_cleanup(name):
        if threading.current_thread() is not threading.main_thread():
            time.sleep(0.2)
        cleanup(name)
    return staticmethod(slow_cleanup)

for module in ("loky.backend.synchronize", "multiprocessing.synchronize"):
    synchronize = importlib.import_module(module)
    synchronize.SemLock._cleanup = slowed(synchronize.SemLock._cleanup)
close_if_stuck = loky_backend._close_if_stuck

def late_close_if_stuck(*args):
    close_if_stuck(*args)
    time.sleep(0.01)

loky_backend._close_if_stuck = late_close_if_stuck
shutdown = loky_backend.shutdown

def slow_shutdown():
    shutdown()
    time.sleep(0.05)

loky_backend.shutdown = slow_shutdown
"""


@needs_fork
@pytest.mark.parametrize("path", [starts.TEMPLATE, starts.EXEC])
def test_a_multiprocessing_childs_exit_waits_for_the_pools_semaphores_clean_up(
        tmp_path, path):
    # The child's exit (os._exit) cut off our daemon thread that unsticks loky's manager
    # thread while it ran loky's clean-up of the pool's semaphores, which fell to it as
    # it let go of that thread: unlinked, not unregistered, loky's resource tracker
    # warned of "leaked semlock objects" (loky's, exec path; multiprocessing's "leaked
    # semaphore objects" on the template path; found beside 3 busy processes, 1 in ~240).
    script = tmp_path / "mp_child_slow_cleanup.py"
    text = MP_CHILD_MAPS.format(tests=TESTS)
    script.write_text(text.replace("\ndef child():", SLOW_CLEANUP + "\ndef child():", 1))
    assert _run_to_its_end(script, path, 90, quiet=True).split() == ["0"]


EXIT_WHILE_ITEMS_RUN = """
import sys, threading, time
sys.path.insert(0, {tests!r})
import aex_helpers as h
from adaptive_exec import parallelize

def work(x):
    # Items 4 and on, in a worker: longer than the test waits. (Not in the caller: beside
    # other suites a worker of the warm pool was let go under load, and the caller ran an
    # item while the pool grew back: 60 s in the main thread.)
    h.spin(0.02 if x < 4 or not h.in_worker() else 60.0)
    return x

parallelize(h.heavy, backend="loky").map(range(20))  # a warm pool
pf = parallelize(work, backend="loky", chunksize=1)
if sys.argv[1] == "imap":
    it = pf.imap(range(40))
    print([next(it) for _ in range(4)], flush=True)
else:
    threading.Thread(target=pf.map, args=(range(40),), daemon=True).start()
    time.sleep(1.0)
print("returns", flush=True)
"""


@posix_only
@pytest.mark.parametrize("how", ["imap", "daemon"])
def test_a_script_returning_while_its_workers_run_items_exits_at_once(tmp_path, how):
    # loky's exit hook waits for the items its workers run, and ran before ours, which
    # ends them: a script that returned with an imap open, or a map running in a daemon
    # thread, waited for them (10 s items: 10 s at its exit; found by an adversarial
    # review helper). Nothing can want those results any more.
    script = tmp_path / "returns.py"
    script.write_text(EXIT_WHILE_ITEMS_RUN.format(tests=TESTS))
    out = _run_to_its_end(script, starts.FORK if starts.fork_works() else starts.EXEC,
                          30, how)
    assert out.split()[-1] == "returns", out


AT_EXIT_CHILD = """
import atexit, sys, threading, time
from adaptive_exec import parallelize

def busy(x):
    t = time.process_time()
    while time.process_time() - t < 0.003:
        pass
    return 2 * x

pf = parallelize(busy, backend="loky")

def at_exit():
    print("at exit", pf.map(range(200)) == [2 * x for x in range(200)], flush=True)

def later():  # a non-daemon thread that outlives the main one, its map under way then
    time.sleep(0.3)
    print("thread", pf.map(range(400)) == [2 * x for x in range(400)], flush=True)

atexit.register(at_exit)
if sys.argv[1] == "pool first":
    print("main", pf.map(range(50)) == [2 * x for x in range(50)], flush=True)
    threading.Thread(target=later).start()
"""


@pytest.mark.parametrize("first", ["no pool first", "pool first"])
@pytest.mark.parametrize("path", [starts.FORK, starts.TEMPLATE, starts.EXEC])
def test_a_map_once_the_main_thread_has_returned_gives_the_loops_results_and_exits(
        tmp_path, path, first):
    # A map from an atexit handler, in a process without a pool, hung for good (its
    # workers, started while the interpreter ended, were never ended; on the fork path
    # loky first failed to register its own exit handler); after a pool, it raised
    # "cannot schedule new futures after interpreter shutdown", or warned that the
    # items could not be pickled. A non-daemon thread's map under way when the main
    # thread returned raised the same. The rest now runs in the caller.
    script = tmp_path / "at_exit.py"
    script.write_text(AT_EXIT_CHILD)
    out = _run_to_its_end(script, path, 60, first, quiet=True)
    want = ["main True", "thread True", "at exit True"] if first == "pool first" else [
        "at exit True"]
    assert out.split("\n")[:-1] == want, out


THREAD_OUTLIVES_MAIN_CHILD = """
import sys, threading, time
from adaptive_exec import adaptive_map

def slow(x):
    end = time.perf_counter() + 0.05
    while time.perf_counter() < end:
        pass
    return x * 2

def mapping(n):
    print("thread", adaptive_map(slow, range(n)) == [x * 2 for x in range(n)], flush=True)

daemon = sys.argv[1] == "daemon"
threading.Thread(target=mapping, args=(200 if daemon else 40,), daemon=daemon).start()
time.sleep(0.7 if daemon else 0.08)
print("main returns", flush=True)
"""


@pytest.mark.parametrize("kind", ["non-daemon", "daemon"])
def test_a_thread_whose_map_outlives_the_main_thread_lets_the_process_exit(tmp_path, kind):
    # The main thread returned while a thread's map planned from the cache (warm: the
    # first run fills it): its start ahead made a pool after Python's shutdown began;
    # loky's manager thread started, its exit hook was refused ("can't register atexit
    # after shutdown", the map's results lost), and the process then waited for that
    # thread for good (3 of 3 runs). A daemon thread's map, whose pool our exit hook
    # ended, made a new one the same way and printed that traceback. Found by an
    # adversarial review helper.
    script = tmp_path / "outlives.py"
    script.write_text(THREAD_OUTLIVES_MAIN_CHILD)
    for _ in range(3):  # the first run samples and remembers; the next ones plan at once
        out = _run_to_its_end(script, "", 60, kind, quiet=True)  # the path it chooses
        if kind == "non-daemon":
            assert out.split("\n")[:-1] == ["main returns", "thread True"], out
        else:
            assert out.split("\n")[0] == "main returns", out


BIG_RESULTS_CHILD = """
import os, signal, threading, time
from adaptive_exec import parallelize
from adaptive_exec.backends import loky as loky_backend

def big(i):
    return bytes(4 << 20)  # written into the result pipe in many pieces

pf = parallelize(big, backend="loky", chunksize=1)
for k in range(15):
    # Ctrl-C, from a timer thread (as a terminal's arrives: SIGINT, any moment).
    timer = threading.Timer(0.05 + 0.1 * (k % 7) / 7, os.kill, (os.getpid(), signal.SIGINT))
    try:
        timer.start()
        pf.map(range(400))
        timer.cancel()
    except KeyboardInterrupt:
        pass
    # A map that ended as its timer fired: that SIGINT comes once the timer has sent it
    # (in CI, under load, it came at the next timer's start, outside the try).
    while True:
        try:
            timer.join()
            time.sleep(0.01)  # (a sleep takes a pending signal: here, inside the try)
            break
        except KeyboardInterrupt:
            pass
# The pool this process may still hold is ended as at exit; those of the interrupted
# maps were ended by them.
loky_backend.shutdown()
loky_threads = ("ExecutorManagerThread", "QueueFeederThread")
deadline = time.monotonic() + 10
while (time.monotonic() < deadline
       and any(t.name in loky_threads for t in threading.enumerate())):
    time.sleep(0.05)
print(sorted(t.name for t in threading.enumerate() if t.name in loky_threads), flush=True)
"""


@posix_only
@pytest.mark.parametrize("path", [starts.TEMPLATE, starts.EXEC])
def test_ctrl_c_while_workers_send_large_results_leaves_no_thread_and_the_process_exits(
        tmp_path, path):
    # A worker killed halfway through writing a 4 MB result left loky's manager thread
    # reading the rest for ever (this process holds a write end of that pipe too): one
    # such thread per interrupted map, and the interpreter's exit, which joins them,
    # hung (CI: the forced-path suites once ended so, 191 tests passed). (The timer
    # is a thread: the caller is a threaded one, so there is no fork path here.)
    script = tmp_path / "child.py"
    script.write_text(BIG_RESULTS_CHILD)
    out = _run_to_its_end(script, path, timeout=90)
    assert out.strip().splitlines()[-1] == "[]", out


def test_our_end_of_the_result_pipe_is_closed_under_a_stuck_read_only(monkeypatch):
    # Closed after UNSTICK_AFTER_S whatever loky's manager thread was doing: beside busy
    # processes it was still ending its pool at a multiprocessing child's exit, and died
    # on EBADF (a traceback on the child's stderr). Only a thread stuck in one read of
    # the result pipe is unstuck; one busy elsewhere, or reading another pipe (loky's
    # wake-up pipe), is waited for.
    monkeypatch.setattr(loky_backend, "UNSTICK_AFTER_S", 0.02)
    reader, writer = multiprocessing.Pipe(duplex=False)
    busy = threading.Thread(target=time.sleep, args=(0.3,))  # ending its pool, slowly
    busy.start()
    loky_backend._close_if_stuck(busy, writer, reader)
    assert not busy.is_alive() and not writer.closed

    other_r, other_w = multiprocessing.Pipe(duplex=False)
    elsewhere = threading.Thread(target=other_r.recv_bytes)  # a read, of another pipe
    elsewhere.start()
    threading.Timer(0.3, other_w.send_bytes, args=(b"wake up",)).start()
    loky_backend._close_if_stuck(elsewhere, writer, reader)
    assert not elsewhere.is_alive() and not writer.closed
    other_r.close()
    other_w.close()

    got = []

    def read():  # no message will come: what a stuck manager thread waits in
        try:
            reader.recv_bytes()
        except EOFError:
            got.append("EOF")

    stuck = threading.Thread(target=read)
    stuck.start()
    loky_backend._close_if_stuck(stuck, writer, reader)
    stuck.join(10)
    assert writer.closed and got == ["EOF"]
    reader.close()


def test_a_pool_ended_while_its_manager_thread_ends_it_is_left_to_that_thread(
        monkeypatch):
    # loky's shutdown() forgets its manager thread: read after it, the thread looked
    # gone, and our end of the result pipe was closed at once beside that thread
    # closing it too (EBADF in loky's thread, 1-3% of multiprocessing children's exits
    # beside busy processes). Here the manager thread is held for a moment as it would
    # close the pipe; the pipe is closed once, by that thread.
    pf = parallelize(h.heavy, backend="loky", chunksize=1)
    assert pf.map(range(20)) == [3 * x for x in range(20)]
    executor = loky_backend.current_executor()
    assert executor is not None, pf.last_report
    writer = executor._result_queue._writer
    closed_by = []
    close = writer.close

    def noted_close():
        closed_by.append(threading.current_thread().name)
        if threading.current_thread() is manager:
            time.sleep(0.3)  # slow, as beside busy processes
        close()

    manager = executor._executor_manager_thread
    monkeypatch.setattr(writer, "close", noted_close)
    loky_backend.shutdown()
    manager.join(10)
    time.sleep(loky_backend.UNSTICK_AFTER_S * 2 + 0.2)  # the unstick thread: done
    assert not manager.is_alive()
    assert closed_by == [manager.name], closed_by


KILLED_MID_RESULT_CHILD = """
import functools, os, signal, sys, threading
sys.path.insert(0, {tests!r})
import aex_helpers as h
from adaptive_exec import parallelize

marker = {marker!r}
killed = []

def kill_while_the_result_is_read(signum, frame):
    # SIGKILL, as the OOM killer sends it, to the worker sending the 64 MB result,
    # once loky's manager thread here is reading its body (more than 1 MB asked).
    # From a timer's signal, every 0.5 ms: a thread would make the caller a threaded
    # one, and its workers would not be forked.
    if killed:
        return
    killed.append(False)  # a signal during this call (nested) does nothing
    try:
        pid = open(marker).read() if os.path.exists(marker) else ""
        frames = sys._current_frames()
        for t in threading.enumerate():
            f = frames.get(t.ident) if t.name == "ExecutorManagerThread" else None
            while pid and f is not None:
                if f.f_code.co_name == "_recv" and f.f_locals.get("size", 0) > 1 << 20:
                    signal.setitimer(signal.ITIMER_REAL, 0)
                    killed[0] = True
                    os.kill(int(pid), signal.SIGKILL)
                    print("killed", flush=True)
                    return
                f = f.f_back
    finally:
        if not killed[0]:
            killed.clear()

signal.signal(signal.SIGALRM, kill_while_the_result_is_read)
signal.setitimer(signal.ITIMER_REAL, 0.0005, 0.0005)
# timeout=: every item runs in a worker (none in the caller while the pool starts).
pf = parallelize(functools.partial(h.large_once, marker=marker), backend="loky",
                 timeout=60)
out = pf.map(range(60))
signal.setitimer(signal.ITIMER_REAL, 0)
print(out == list(range(60)), flush=True)
"""


@posix_only
@pytest.mark.parametrize("path", [starts.FORK, starts.TEMPLATE, starts.EXEC])
def test_a_worker_killed_halfway_through_sending_a_result_is_a_crash_not_a_hang(
        tmp_path, path):
    # The OOM killer ends a worker at any moment. One killed while its 64 MB result was
    # being read left loky's manager thread reading the rest for ever (forked workers
    # each hold a write end of that pipe): the pool was never found broken, and the map
    # waited for ever.
    if path == starts.FORK and not starts.fork_works():
        pytest.skip("fork: Linux")
    marker = tmp_path / "pid"
    script = tmp_path / "child.py"
    script.write_text(KILLED_MID_RESULT_CHILD.format(tests=TESTS, marker=str(marker)))
    assert _run_to_its_end(script, path, timeout=60).split() == ["killed", "True"]


STUCK_MANAGER_CHILD = """
import os, signal, struct, sys, threading, time
sys.path.insert(0, {tests!r})
import aex_helpers as h
from adaptive_exec import parallelize
from adaptive_exec.backends import loky as loky_backend

pf = parallelize(h.heavy, backend="loky", chunksize=1)
for _ in range(5):  # a warm pool (beside busy processes a map may be planned serial)
    assert pf.map(range(20)) == [3 * x for x in range(20)]
    executor = loky_backend.current_executor()
    if executor is not None and getattr(executor, "_executor_manager_thread", None):
        break
else:
    raise SystemExit("no pool after 5 maps: " + str(pf.last_report))
# A pool at rest first: the first map's end queues the overhead probe (16 no-ops and a
# 2 MB result, written into the pipe in pieces by a worker), still under way when the map
# returns. The message below, written in the middle of that result (beside busy
# processes that write spans many reads), made it unreadable: loky ended the pool and its
# manager thread ("A result has failed to un-serialize", reproduced with that thread's
# reads slowed and the message sent 5 ms after the no-ops), which the wait below then
# never saw in our read: CI's "never read the half message".
deadline = time.monotonic() + 30
while loky_backend._state.overhead_probe is not None:
    if time.monotonic() > deadline:
        raise SystemExit("the overhead probe never ended")
    time.sleep(0.01)
# What a worker killed halfway through writing a result leaves: a message whose header
# promises more than ever comes. loky's manager thread reads it for ever, and sees no
# worker's death meanwhile; then a worker dies (the OOM killer).
executor._result_queue._writer._send(struct.pack("!i", 2**31 - 1) + b"half")
manager = executor._executor_manager_thread
deadline = time.monotonic() + 30
while time.monotonic() < deadline:
    f = sys._current_frames().get(manager.ident)
    names = []
    while f is not None:
        names.append(f.f_code.co_name)
        f = f.f_back
    if "_recv" in names:
        break
    time.sleep(0.01)
else:
    raise SystemExit("loky's manager thread never read the half message")
victim = next(iter(executor._processes.values())).pid
os.kill(victim, signal.SIGKILL)
print(pf.map(range(40)) == [3 * x for x in range(40)], flush=True)
"""


@posix_only
@pytest.mark.parametrize("path", [starts.FORK, starts.TEMPLATE, starts.EXEC])
def test_a_pool_whose_manager_thread_is_stuck_on_a_half_result_is_replaced(tmp_path, path):
    # The state a worker killed halfway through sending a result leaves, made directly:
    # loky's manager thread blocked reading a message that never completes, and a worker
    # dead beside it. The old code's map waited on that pool for ever; now the run sees
    # a worker dead 1 s that loky still runs as healthy, ends the pool, and sends its
    # chunks again.
    if path == starts.FORK and not starts.fork_works():
        pytest.skip("fork: Linux")
    script = tmp_path / "child.py"
    script.write_text(STUCK_MANAGER_CHILD.format(tests=TESTS))
    assert _run_to_its_end(script, path, timeout=90).split() == ["True"]


@posix_only
@pytest.mark.parametrize("path", [starts.EXEC, starts.TEMPLATE])
def test_an_imap_left_while_its_pool_is_still_starting_leaves_no_worker(monkeypatch, path):
    """The first call runs 0.15 s: the watch starts the pool ahead on its own thread,
    which on loky's path takes longer than that. The consumer takes the first result and
    closes the stream while the start is still under way: the pool, once started, is
    ended, not left idling for its 300 s timeout (CI saw one left after a Ctrl-C)."""
    monkeypatch.setenv(starts.ENV_START, path)
    loky_backend.shutdown()

    def new_workers():
        out = []
        for child in psutil.Process().children(recursive=True):
            try:
                cmd = " ".join(child.cmdline())
            except psutil.NoSuchProcess:
                continue
            if child.pid not in before and "resource_tracker" not in cmd \
                    and "adaptive_exec.backends.starts" not in cmd:
                out.append(child)
        return out

    before = {p.pid for p in psutil.Process().children(recursive=True)}
    it = parallelize(functools.partial(h.faulty, cost=0.15), cache=False).imap(range(150))
    assert next(it) == 0
    it.close()
    for thread in threading.enumerate():  # the start ahead, still under way
        if thread.name.startswith("adaptive_exec"):
            thread.join(10)
    gone, alive_ = psutil.wait_procs(new_workers(), timeout=3)
    left = [p.pid for p in alive_]
    assert left == [], "workers of a pool started for a map that was left"


# --- a map started inside another's machinery ------------------------------------------

# A signal handler that maps, run while the main thread's map is inside its own machinery
# (``where``: loky's submit, holding the executor's shutdown_lock; our wait on the futures,
# holding their conditions). The alarm rings there, once, deterministically.
REENTERED_CHILD = """
import json, signal, sys
import concurrent.futures._base as cf_base
sys.path.insert(0, {tests!r})
import aex_helpers as h
from adaptive_exec import parallelize
from adaptive_exec.backends import loky as loky_backend

where = sys.argv[1]
pf = parallelize(h.heavy, backend="loky", chunksize=1)
pg = parallelize(h.heavy, backend="loky", chunksize=1)
for _ in range(5):  # a warm pool, each function's plan remembered
    assert pf.map(range(10)) == pg.map(range(10)) == [3 * x for x in range(10)]
    if loky_backend.current_executor() is not None and pg.last_report.plan.mode == "parallel":
        break
else:
    raise SystemExit("no pool after 5 maps: " + str(pg.last_report))
nested = []

def on_alarm(signum, frame):
    out = pg.map(range(10))
    nested.append([out == [3 * x for x in range(10)], pg.last_report.plan.reason])

signal.signal(signal.SIGALRM, on_alarm)
armed = [True]

def ring():
    if armed:
        armed.clear()
        signal.raise_signal(signal.SIGALRM)

class Ringing:
    # The executor's shutdown_lock, ringing once while submit holds it.
    def __init__(self, lock):
        self.lock = lock
    def acquire(self, *args, **kwargs):
        return self.lock.acquire(*args, **kwargs)
    def release(self):
        self.lock.release()
    def __enter__(self):
        self.lock.acquire()
        ring()
    def __exit__(self, *exc):
        self.lock.release()

if where == "submit":
    flags = loky_backend.current_executor()._flags
    flags.shutdown_lock = Ringing(flags.shutdown_lock)
else:
    acquire_all = cf_base._AcquireFutures.__enter__
    entered = [0]
    def acquiring(self):
        acquire_all(self)
        entered[0] += 1
        if entered[0] == 3:  # results in flight
            ring()
    cf_base._AcquireFutures.__enter__ = acquiring
out = pf.map(range(40))
print(json.dumps({{"main": out == [3 * x for x in range(40)], "nested": nested}}), flush=True)
"""


@posix_only
@pytest.mark.parametrize("where", ["submit", "wait"])
@pytest.mark.parametrize("path", [starts.FORK, starts.TEMPLATE, starts.EXEC])
def test_a_map_in_a_signal_handler_that_interrupts_a_map_runs_in_the_caller(
        tmp_path, path, where):
    # The handler's map waited for ever on a lock the interrupted map held (loky's
    # shutdown_lock), or for results loky's thread could not deliver while the main
    # thread held their futures' conditions: the loop never hangs. Now it runs in the
    # caller and says why.
    if path == starts.FORK and not starts.fork_works():
        pytest.skip("fork: Linux")
    script = tmp_path / "child.py"
    script.write_text(REENTERED_CHILD.format(tests=TESTS))
    seen = json.loads(_run_to_its_end(script, path, 30, where))
    assert seen["main"]
    assert len(seen["nested"]) == 1, seen  # the alarm rang, once
    same, reason = seen["nested"][0]
    assert same and "inside another map's machinery" in reason, reason


def test_a_map_nested_in_the_users_code_in_the_caller_still_uses_the_pool():
    # Called by the function run in the caller (sampled, or on a serial plan), by a plain
    # call, by the items' generator, in an imap's loop body, or by another thread: no
    # lock of the outer map is held there, and the inner map uses the pool as before.
    inner = parallelize(h.heavy, backend="loky", chunksize=1)
    seen = {}

    def note(where):
        out = inner.map(range(6))
        seen.setdefault(where, (out == [3 * x for x in range(6)],
                                inner.last_report.plan.mode))

    def sampled(x):
        note("the function, sampled")
        return x

    def serial(x):
        note("the function, serial")
        return x

    def items():
        note("the items")
        yield 1

    parallelize(sampled).map(range(2))
    parallelize(serial, backend="serial").map(range(2))
    parallelize(lambda x: note("a plain call"))(0)
    parallelize(lambda x: x).map(items())
    for _ in parallelize(lambda x: x, backend="loky").imap(range(2)):
        note("an imap's body")
    thread = threading.Thread(target=note, args=("another thread",), daemon=True)
    thread.start()
    thread.join(60)
    assert not thread.is_alive()
    assert seen == dict.fromkeys(
        ["the function, sampled", "the function, serial", "a plain call", "the items",
         "an imap's body", "another thread"], (True, "parallel")), seen


# --- threads sharing the pool -----------------------------------------------------------

def _in_threads(jobs, timeout=60):
    """Run each ``(name, fn)`` in its own thread; {name: result or exception}."""
    import threading

    out = {}

    def run(name, fn):
        try:
            out[name] = fn()
        except BaseException as exc:  # reported to the test
            out[name] = exc

    threads = [threading.Thread(target=run, args=job, daemon=True) for job in jobs]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout)
    assert not any(t.is_alive() for t in threads), "a thread's map hung"
    return out


def test_four_threads_share_the_pool_while_one_times_out():
    from adaptive_exec import ItemTimeoutError, calibrate

    calibrate()
    heavy = parallelize(h.heavy, backend="loky", strict=True, chunksize=2)

    def timing_out():
        parallelize(h.hang_on, timeout=0.5).starmap([(x, 3, 30.0) for x in range(8)])

    out = _in_threads([("t", timing_out)] + [
        (k, lambda k=k: heavy.map(range(k * 100, k * 100 + 60))) for k in range(3)])
    assert isinstance(out["t"], ItemTimeoutError), out["t"]
    for k in range(3):
        assert out[k] == [3 * x for x in range(k * 100, k * 100 + 60)], out[k]


def test_a_map_survives_another_threads_pool_growth_and_rebuild():
    import threading

    loky_backend.shutdown()
    small = parallelize(h.heavy, backend="loky", max_workers=1, strict=True, chunksize=1)
    big = parallelize(h.heavy, backend="loky", strict=True, chunksize=1)
    started = threading.Event()

    def first():
        started.set()
        return small.map(range(60))  # a pool of one worker, ~1.2 s

    def second():
        started.wait(10)
        time.sleep(0.3)
        return big.map(range(40))  # wants every CPU: the pool grows (or, forked, is replaced)

    out = _in_threads([("first", first), ("second", second)])
    assert out["first"] == [3 * x for x in range(60)], out["first"]
    assert out["second"] == [3 * x for x in range(40)], out["second"]


def test_a_closures_captured_data_is_let_go_after_its_map():
    # A closure's cell was taken for a stateless sentinel (as small as a plain object,
    # no __dict__): looked for in every module, and kept, with the 10 MB it captured,
    # in a table of up to 1024 (found by a review helper: RSS 40 -> 167 MB over 12
    # maps).
    import gc
    import weakref

    refs = []
    for _ in range(3):
        table = h.Table(1 << 20)
        refs.append(weakref.ref(table))
        func = h.reads_table(table)
        assert parallelize(func, backend="loky", chunksize=5).map(range(40)) == [
            x + (1 << 20) for x in range(40)]
        del func, table
    gc.collect()
    assert [r() for r in refs] == [None, None, None]


def test_a_worker_keeps_a_bounded_number_of_initializers():
    # Each map with other initargs left its initializer and initargs in every worker
    # for as long as the pool lived (2 MB of initargs per map: ~1.8 MB more per map).
    for i in range(12):
        pf = parallelize(h.square, backend="loky", timeout=60, initializer=h.set_arg,
                         initargs=(bytes(1000) + bytes([i]),), chunksize=2)
        assert pf.map(range(8)) == [x * x for x in range(8)]
    kept = parallelize(h.initializers_kept, backend="loky", timeout=60).map(range(8))
    assert 1 <= max(kept) <= 8  # worker._MAX_INITIALIZERS


@pytest.mark.parametrize("path", [starts.FORK, starts.TEMPLATE, starts.EXEC])
def test_the_callers_signal_handlers_do_not_run_in_its_workers(path, monkeypatch):
    # A forked worker kept the script's handlers: a SIGTERM to the process group
    # (systemd, a container's stop) ran the caller's handler in a worker too (found by
    # a review helper, 4 of 4 runs). A module's handler stays: a worker that imports
    # the module has it too (a library's SIGALRM handler, reset, let its own alarm
    # kill the worker: found by a second helper).
    import signal

    from adaptive_exec.backends import loky as loky_backend

    def scripts(signum, frame):
        pass

    scripts.__module__ = "__main__"  # as a handler defined in the user's script is
    monkeypatch.setenv(starts.ENV_START, path)
    loky_backend.shutdown()  # workers made now, under the handlers set below
    old_term = signal.signal(signal.SIGTERM, scripts)
    old_usr1 = signal.signal(signal.SIGUSR1, h.library_handler)
    try:
        # Forked from here only while this process runs one thread (else, from the
        # template, which imported no handler): a thread an earlier test left
        # finishing made CI's workers template ones.
        forked = path == starts.FORK and starts.threads_now() == 1
        got = parallelize(h.own_handlers, backend="loky", timeout=60).map(range(6))
    finally:
        signal.signal(signal.SIGTERM, old_term)
        signal.signal(signal.SIGUSR1, old_usr1)
        loky_backend.shutdown()
    # Never the script's; forked workers have the library's (template and exec ones
    # import no handler).
    assert got in ([["SIGUSR1"]] * 6, [[]] * 6)
    if forked and starts.threads_now() == 1:
        assert got == [["SIGUSR1"]] * 6


def test_a_closure_cell_is_not_taken_for_a_sentinel():
    # A cell is as small as a class statement's instance and has no __dict__: taken for
    # a stateless sentinel, it was looked up in every module and kept for ever, with what
    # it captured (a leak of 10 MB per closure map, up to 1024 of them).
    from adaptive_exec.worker import _stateless

    table = [1, 2, 3]
    cell = (lambda: table).__closure__[0]
    assert not _stateless(cell)
    assert _stateless(object()) and _stateless(type("Missing", (), {})())


AT_THE_DESCRIPTOR_LIMIT = """
import os, resource, sys, warnings
sys.path.insert(0, {tests!r})
import aex_helpers as h
from adaptive_exec import UnpicklableWarning, parallelize

pf = parallelize(h.heavy, backend="loky")
free = int(sys.argv[1])
resource.setrlimit(resource.RLIMIT_NOFILE, (256, 256))
held = []
while True:  # a server at its limit of open files: each descriptor in use
    try:
        held.append(os.open(os.devnull, os.O_RDONLY))
    except OSError:
        break
for _ in range(free):
    os.close(held.pop())
with warnings.catch_warnings(record=True) as seen:
    warnings.simplefilter("always")
    out = pf.map(range(40))
print(out == [x * 3 for x in range(40)],
      any(issubclass(w.category, UnpicklableWarning) for w in seen), flush=True)
for fd in held:  # room again for the exit's own needs (glibc's libgcc_s for a thread)
    os.close(fd)
"""


@posix_only
@pytest.mark.parametrize("free", [0, 4])
@pytest.mark.parametrize("path", [starts.FORK, starts.TEMPLATE, starts.EXEC])
def test_a_caller_at_its_limit_of_open_files_gets_the_loops_results(tmp_path, path, free):
    # The loop needs no descriptor; the pool's queues and semaphores do. At the limit
    # (RLIMIT_NOFILE) the map raised OSError EMFILE from loky.ProcessPoolExecutor (and
    # from psutil reading /proc/meminfo, with none left at all): found by a hunting
    # helper. The items now run in the caller, with one UnpicklableWarning saying why.
    if path == starts.FORK and not starts.fork_works():
        pytest.skip("fork is not available here")
    script = tmp_path / "at_the_limit.py"
    script.write_text(AT_THE_DESCRIPTOR_LIMIT.format(tests=TESTS))
    out = _run_to_its_end(script, path, 60, str(free))
    assert out.split()[-2:] == ["True", "True"], out


class _Alarm(Exception):
    """What a program's own SIGALRM handler raises (a time-out of its own)."""


class _RingsWhenPickled:
    """Pickling it is where the signal lands: the handler runs in our code, in the
    middle of pickling what goes to the workers, as a timer's may at any instant."""

    def __init__(self, value=0):
        self.value = value

    def __reduce__(self):
        if not _RINGS_LEFT:
            return (_RingsWhenPickled, (self.value,))
        _RINGS_LEFT.pop()
        signal.raise_signal(signal.SIGALRM)  # the handler runs here, and raises
        raise AssertionError("the SIGALRM handler did not run")


_RINGS_LEFT: list[int] = []


def _takes(_arg):
    pass


def _heavy_ring(x):
    return h.heavy(x.value if isinstance(x, _RingsWhenPickled) else x)


@posix_only
@pytest.mark.parametrize("where", ["initargs", "items"])
def test_an_exception_from_the_callers_signal_handler_is_not_taken_for_a_pickling_error(
        where):
    # A SIGALRM handler raising the program's own time-out while our code pickled the
    # initializer's arguments or a chunk was swallowed as "cannot be pickled ()": the map
    # went on in the caller, with an UnpicklableWarning, and the time-out was lost (1 in
    # 40 maps under a random timer; found by a hunting helper). The loop raises it.
    def handler(signum, frame):
        raise _Alarm()

    old = signal.signal(signal.SIGALRM, handler)
    try:
        if where == "initargs":
            pf = parallelize(h.heavy, backend="loky", initializer=_takes,
                             initargs=(_RingsWhenPickled(),))
            items = list(range(60))
        else:
            pf = parallelize(_heavy_ring, backend="loky")
            items = [_RingsWhenPickled(x) for x in range(60)]
        _RINGS_LEFT[:] = [1]
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # an UnpicklableWarning fails the test
            with pytest.raises(_Alarm):
                pf.map(items)
        assert not _RINGS_LEFT, "the signal never came"
        # The next map works, on the pool.
        assert pf.map(items) == [x * 3 for x in range(60)]
    finally:
        _RINGS_LEFT.clear()
        signal.signal(signal.SIGALRM, old)
