"""The cache file stays one database while threads and processes share it.

Regression tests for a corruption seen in full test runs ("the cache file ... was not a
usable cache (database disk image is malformed)"). SQLite locks its file with POSIX
advisory locks, which belong to the process: closing *any* descriptor of the file
drops all of them. The library read the file's header with ``open()`` each time a
thread opened its connection, and so dropped the shared lock that the process's other
open connections held. Another process closing its last connection then found nobody
holding the file, checkpointed, and deleted the -wal and -shm still in use here; from
then on each process wrote a history of its own into the one file: writes lost, then
a malformed database.

Real SQLite files, real threads, real processes; every wait is bounded.
"""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys
import textwrap
import threading
import warnings

import pytest

from adaptive_exec import cache
from adaptive_exec.errors import CacheWarning
from adaptive_exec.sampling import Features

F = Features(mean_s=2e-4, coefficient_of_variation=0.25, pickle_size=120,
             input_pickle_size=40, peak_memory=4096, function_complexity=88, n_samples=64,
             cpu_fraction=0.97, threads_cpu=0.05)
BOUND_S = 60  # for a child process or a thread: a passing run takes well under 1 s each

pytestmark = pytest.mark.timeout(240)

# Another program using the same cache: looks some keys up, writes its own, and ends,
# closing its connection (its last one, so SQLite checkpoints and, when no other process
# holds the file, deletes the WAL).
OTHER = textwrap.dedent("""
    import json, sys, warnings
    warnings.simplefilter("always")
    from adaptive_exec import cache
    from adaptive_exec.sampling import Features

    f = Features(1e-3, 0.1, 10, 10, 0, 5, 3, 1.0)
    with warnings.catch_warnings(record=True) as caught:
        found = [k for k in sys.argv[2].split(",") if k and cache.lookup(k) is not None]
        wrote = [cache.observe(k, module="m", qualname="q" * 200, sampled=f,
                               observed_item_s=None, run=None)
                 for k in sys.argv[1].split(",") if k]
        cache.close()
    print(json.dumps({"found": found, "wrote": wrote,
                      "warnings": [str(w.message) for w in caught]}))
""")


@pytest.fixture
def cache_dir(tmp_path, monkeypatch):
    d = tmp_path / "cache"
    monkeypatch.setenv(cache.ENV_DIR, str(d))
    cache.close()
    yield d
    cache.close()


def other_process(writes=(), reads=()):
    """Run OTHER in a new process; its report."""
    proc = subprocess.run([sys.executable, "-c", OTHER, ",".join(writes), ",".join(reads)],
                          capture_output=True, text=True, timeout=BOUND_S)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert report["warnings"] == []
    return report


def put(key):
    assert cache.observe(key, module="m", qualname="q" * 200, sampled=F,
                         observed_item_s=None, run=None)


def in_a_thread(fn):
    """``fn()`` on a thread of its own (which opens a connection of its own and closes
    it when it ends); its result."""
    box = []
    t = threading.Thread(target=lambda: box.append(fn()))
    t.start()
    t.join(BOUND_S)
    assert not t.is_alive() and len(box) == 1
    return box[0]


def integrity(path):
    """PRAGMA integrity_check in a process of its own (not beside this one's connections)."""
    code = ("import sqlite3, sys; c = sqlite3.connect(sys.argv[1]); "
            "print(c.execute('PRAGMA integrity_check').fetchone()[0]); c.close()")
    proc = subprocess.run([sys.executable, "-c", code, str(path)], capture_output=True,
                          text=True, timeout=BOUND_S)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.strip()


def test_a_thread_opening_its_connection_leaves_the_file_shared_with_other_processes(
        cache_dir):
    p = cache_dir / cache.FILENAME
    with warnings.catch_warnings():
        warnings.simplefilter("error", CacheWarning)
        put("here-1")  # this thread's connection: open from now on
        assert in_a_thread(lambda: cache.lookup("here-1")) is not None  # a second one
        assert other_process(writes=["there-1"], reads=["here-1"])["found"] == ["here-1"]
        # The other process's last connection is gone; ours is open: the WAL stays.
        assert os.path.exists(f"{p}-wal") and os.path.exists(f"{p}-shm")
        # Both processes still see one database: each other's writes, both ways.
        assert cache.lookup("there-1") is not None
        put("here-2")
        report = other_process(writes=["there-2"], reads=["here-1", "here-2", "there-1"])
        assert report["found"] == ["here-1", "here-2", "there-1"]
        assert all(cache.lookup(k) is not None for k in ("here-1", "here-2", "there-1",
                                                        "there-2"))
    cache.close()
    assert integrity(p) == "ok"


def test_threads_and_processes_sharing_the_cache_lose_and_corrupt_nothing(cache_dir):
    """The shape of the full test run: the caller's connection stays open, short-lived
    threads open and close their own, and other processes come and go."""
    p = cache_dir / cache.FILENAME
    ours, theirs = [], []
    with warnings.catch_warnings():
        warnings.simplefilter("error", CacheWarning)
        put("start")
        for i in range(8):
            in_a_thread(lambda: cache.lookup("start"))
            keys = [f"there-{i}-{j}" for j in range(20)]
            other_process(writes=keys)
            theirs += keys
            for j in range(20):
                put(f"here-{i}-{j}")
                ours.append(f"here-{i}-{j}")
            assert [k for k in ours + theirs if cache.lookup(k) is None] == []
        everything = other_process(reads=["start", *ours, *theirs])["found"]
        assert everything == ["start", *ours, *theirs]
    cache.close()
    assert integrity(p) == "ok"
    conn = sqlite3.connect(p)
    try:
        assert conn.execute("SELECT count(*) FROM entries").fetchone()[0] == 1 + 2 * 8 * 20
    finally:
        conn.close()
    assert not [q for q in cache_dir.iterdir() if ".corrupt-" in q.name]
