"""The SQLite file's life on a toy schema: versions, corruption, locks, read-only, fork, threads.

Nothing here knows the feature cache: a two-table schema of notes and tags, version 1
and then 2, stands for any user. tests/test_cache.py checks the same behaviour through
the cache, with real processes.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import sqlite3
import stat
import threading
import time
import warnings

import pytest

from adaptive_exec.errors import CacheWarning
from adaptive_exec.sqlite_file import Schema, SqliteFile

V1 = Schema(1, (
    "CREATE TABLE notes (id INTEGER PRIMARY KEY, text TEXT NOT NULL)",
    "CREATE TABLE tags (note_id INTEGER NOT NULL, tag TEXT NOT NULL)",
))
V2 = Schema(2, (
    "CREATE TABLE notes (id INTEGER PRIMARY KEY, text TEXT NOT NULL, "
    "stars INTEGER NOT NULL DEFAULT 0)",
    "CREATE TABLE tags (note_id INTEGER NOT NULL, tag TEXT NOT NULL)",
    "CREATE INDEX tags_by_note ON tags (note_id)",
), {1: (
    "ALTER TABLE notes ADD COLUMN stars INTEGER NOT NULL DEFAULT 0",
    "CREATE INDEX tags_by_note ON tags (note_id)",
)})
# Short: the lock tests wait this long for each call that finds the file locked.
TIMEOUT_S = 0.05
BOUND_S = 30  # for what must not hang: a child process, a thread


@pytest.fixture
def opened():
    """Makes SqliteFiles; closes this thread's connection of each at the end."""
    files: list[SqliteFile] = []

    def make(path, schema=V2, **kw):
        f = SqliteFile(str(path), schema, busy_timeout_s=TIMEOUT_S, label="toy", **kw)
        files.append(f)
        return f

    yield make
    for f in files:
        f.close()


@pytest.fixture
def db_path(tmp_path):
    return tmp_path / "toy" / "toy.sqlite3"


def add_note(f, text, tags=()):
    def write(conn):
        note = conn.execute("INSERT INTO notes (text) VALUES (?)", (text,)).lastrowid
        conn.executemany("INSERT INTO tags VALUES (?, ?)", [(note, t) for t in tags])
        return note
    return f.write(write)


def notes(f):
    return f.read(lambda conn: conn.execute("SELECT text FROM notes ORDER BY id").fetchall())


@contextlib.contextmanager
def own_connection(p):
    """A connection of the test's own, beside the file's (autocommit)."""
    conn = sqlite3.connect(str(p), timeout=BOUND_S, isolation_level=None)
    try:
        yield conn
    finally:
        conn.close()


@contextlib.contextmanager
def caught():
    with warnings.catch_warnings(record=True) as got:
        warnings.simplefilter("always")
        yield got


def ours(got):
    return [str(w.message) for w in got if issubclass(w.category, CacheWarning)]


def digest(p):
    return hashlib.sha256(p.read_bytes()).hexdigest()


def test_a_new_file_is_private_in_wal_mode_with_its_version(opened, db_path):
    f = opened(db_path)
    assert notes(f) is None and not db_path.parent.exists()  # a read creates nothing
    assert add_note(f, "first", ["a"]) == 1
    assert notes(f) == [("first",)]
    assert stat.S_IMODE(os.stat(db_path.parent).st_mode) == 0o700
    conn = f.connection()
    assert conn.execute("PRAGMA busy_timeout").fetchone()[0] == int(TIMEOUT_S * 1000)
    assert conn.execute("PRAGMA synchronous").fetchone()[0] == 1  # NORMAL
    with own_connection(db_path) as other:
        assert other.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        meta = dict(other.execute("SELECT key, value FROM meta"))
        assert meta["schema_version"] == "2" and float(meta["created_at"]) <= time.time()
        tables = {r[0] for r in other.execute("SELECT name FROM sqlite_master "
                                              "WHERE type = 'table'")}
        assert tables == {"meta", "notes", "tags"}
    assert f.status() == "ok" and not f.read_only


def test_an_error_in_the_callers_code_is_raised_and_its_transaction_undone(opened, db_path):
    f = opened(db_path)
    add_note(f, "kept")

    def half_a_write(conn):
        conn.execute("INSERT INTO notes (text) VALUES ('lost')")
        raise KeyError("the caller's bug")

    with pytest.raises(KeyError):
        f.write(half_a_write)
    with pytest.raises(ZeroDivisionError):
        f.read(lambda conn: 1 / 0)
    assert not f.connection().in_transaction
    assert add_note(f, "after") and notes(f) == [("kept",), ("after",)]


def test_an_older_version_is_migrated_in_place_keeping_its_rows(opened, db_path):
    old = opened(db_path, V1)
    add_note(old, "from v1", ["x", "y"])
    old.close()
    inode = os.stat(db_path).st_ino
    with caught() as got:
        new = opened(db_path, V2)
        assert notes(new) == [("from v1",)]
        assert new.read(lambda c: c.execute("SELECT stars FROM notes").fetchall()) == [(0,)]
        assert new.write(lambda c: c.execute("UPDATE notes SET stars = 5").rowcount) == 1
    assert ours(got) == []  # a migration needs nobody's attention
    assert os.stat(db_path).st_ino == inode
    with own_connection(db_path) as conn:
        assert conn.execute("SELECT value FROM meta WHERE key = 'schema_version'"
                            ).fetchone()[0] == "2"
        assert conn.execute("SELECT count(*) FROM tags").fetchone()[0] == 2
        assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        assert conn.execute("SELECT name FROM sqlite_master WHERE name = 'tags_by_note'"
                            ).fetchone()


def test_a_schema_takes_steps_only_from_its_earlier_versions():
    with pytest.raises(ValueError):
        Schema(2, V2.create, {2: ()})
    with pytest.raises(ValueError):
        Schema(0, ())


def test_a_newer_version_is_read_never_written_with_one_warning(opened, db_path):
    add_note(opened(db_path, V2), "from v2")
    with own_connection(db_path) as conn:
        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    before = digest(db_path)
    with caught() as got:
        older = opened(db_path, V1)  # this program knows version 1 only
        for _ in range(3):
            assert notes(older) == [("from v2",)]
            assert add_note(older, "never") is None
        assert older.read_only and older.status() == "read-only (newer schema)"
    (warning,) = ours(got)
    assert "newer" in warning and "never written" in warning
    assert digest(db_path) == before


def a_database(p, script):
    conn = sqlite3.connect(str(p))
    try:
        conn.executescript(script)
    finally:
        conn.close()


GARBAGE = {
    "not sqlite": lambda p: p.write_bytes(b"a shopping list, not a database\n" * 50),
    "not ours": lambda p: a_database(p, "CREATE TABLE other (x); INSERT INTO other VALUES (1);"),
    "bad version": lambda p: a_database(
        p, "CREATE TABLE meta (key, value); INSERT INTO meta VALUES ('schema_version', 'x');"),
}


@pytest.mark.parametrize("kind", sorted(GARBAGE))
def test_a_file_that_is_not_ours_is_moved_aside_with_one_warning(opened, db_path, kind):
    db_path.parent.mkdir(parents=True)
    GARBAGE[kind](db_path)
    original = db_path.read_bytes()
    f = opened(db_path)
    with caught() as got:
        assert notes(f) == []  # a fresh file at once
        assert add_note(f, "fresh") and notes(f) == [("fresh",)]
    (warning,) = ours(got)
    assert "moved it to" in warning
    (aside,) = [p for p in db_path.parent.iterdir() if ".corrupt-" in p.name]
    assert aside.name.startswith(db_path.name + ".corrupt-")
    assert aside.read_bytes() == original


def test_a_file_corrupted_under_an_open_connection_is_moved_aside(opened, db_path):
    f = opened(db_path)
    for i in range(300):  # several pages
        add_note(f, "n" * 200 + str(i), ["t" * 50])
    f.close()
    with own_connection(db_path) as conn:
        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    with open(db_path, "r+b") as out:  # the header and first pages stay: it opens
        out.seek(3 * 4096)
        out.write(os.urandom(db_path.stat().st_size - 3 * 4096))
    with caught() as got:
        assert f.read(lambda c: c.execute("SELECT count(*) FROM tags").fetchall()) is None
        assert notes(f) is None  # moved aside: no file until the next write
        assert add_note(f, "again") and notes(f) == [("again",)]
    assert len(ours(got)) == 1
    with own_connection(db_path) as conn:
        assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"


@pytest.mark.parametrize("how", ["write", "exclusive"])
def test_a_lock_held_past_the_timeout_is_a_miss_not_an_error(opened, db_path, how):
    f = opened(db_path)
    add_note(f, "before")
    if how == "exclusive":
        f.close()  # the holder must be alone on the file to take it whole
    holder = sqlite3.connect(str(db_path), timeout=BOUND_S, isolation_level=None)
    try:
        if how == "exclusive":  # nobody may even read
            holder.execute("PRAGMA locking_mode = EXCLUSIVE")
            holder.execute("BEGIN EXCLUSIVE")
            holder.execute("UPDATE meta SET value = value")
        else:  # the write lock, as another process's long write holds it
            holder.execute("BEGIN IMMEDIATE")
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # a lock is worth no warning
            assert add_note(f, "blocked") is None
            assert notes(f) == ([("before",)] if how == "write" else None)  # WAL: reads go on
    finally:
        holder.execute("ROLLBACK")
        holder.close()
    assert add_note(f, "after") and notes(f) == [("before",), ("after",)]
    assert f.status() == "ok"


def test_an_unwritable_file_is_read_never_written_with_one_warning(opened, db_path):
    add_note(opened(db_path), "kept")
    with own_connection(db_path) as conn:
        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    before = digest(db_path)
    with caught() as got:
        f = opened(db_path, writable=lambda p: False)  # access() says no
        for _ in range(3):
            assert notes(f) == [("kept",)]
            assert add_note(f, "never") is None
    (warning,) = ours(got)
    assert "read-only" in warning and "never written" in warning and str(db_path) in warning
    assert f.status() == "read-only (this process may not write it, or create files beside it)"
    assert digest(db_path) == before


def test_a_refused_write_makes_the_file_read_only_with_one_warning(opened, db_path,
                                                                  monkeypatch):
    add_note(opened(db_path), "kept")
    with own_connection(db_path) as conn:
        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    before = digest(db_path)
    # As on a network file system: access() says yes, the file system refuses the write
    # (every connection is opened read-only underneath; root ignores a file's mode).
    f = opened(db_path, writable=lambda p: True)
    monkeypatch.setattr(f, "_connect", lambda read_only=False: SqliteFile._connect(f, True))
    with caught() as got:
        for _ in range(3):
            assert add_note(f, "refused") is None
            assert notes(f) == [("kept",)]
    (warning,) = ours(got)
    assert "cannot write" in warning and "never written" in warning
    assert f.status().startswith("read-only (writing failed")
    assert digest(db_path) == before


def test_a_directory_that_cannot_be_made_turns_the_file_off_with_one_warning(opened,
                                                                             tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    f = opened(blocker / "dir" / "toy.sqlite3")
    with caught() as got:
        for _ in range(3):
            assert add_note(f, "x") is None and notes(f) is None
    (warning,) = ours(got)
    assert "without the toy" in warning and f.status().startswith("off: ")
    f.close()  # forgets: tries again (and warns again) on next use
    with caught() as got:
        assert add_note(f, "x") is None
    assert len(ours(got)) == 1


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork()")
def test_a_forked_child_opens_a_connection_of_its_own(opened, db_path):
    f = opened(db_path)
    add_note(f, "parent")
    parent_conn = f.connection()
    # Held across fork() as another thread could hold it: the child must not need it.
    f._lock.acquire()
    try:
        pid = os.fork()
        if pid == 0:  # the child never returns into pytest
            code = 3
            try:
                mine = f.connection()
                f.close()  # takes the lock
                ok = (mine is not None and mine is not parent_conn
                      and notes(f) == [("parent",)] and add_note(f, "child") is not None)
                code = 0 if ok else 1
            finally:
                os._exit(code)
    finally:
        f._lock.release()
    deadline = time.monotonic() + BOUND_S
    while time.monotonic() < deadline:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            break
        time.sleep(0.01)
    else:
        os.kill(pid, 9)
        os.waitpid(pid, 0)
        pytest.fail("the forked child did not finish")
    assert os.waitstatus_to_exitcode(status) == 0
    assert f.connection() is parent_conn  # the parent's own is still in use
    assert notes(f) == [("parent",), ("child",)]
    with own_connection(db_path) as conn:
        assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"


def count_fds():
    return len(os.listdir("/proc/self/fd"))


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="counts /proc/self/fd")
def test_each_thread_has_its_connection_closed_when_the_thread_ends(opened, db_path):
    f = opened(db_path)
    add_note(f, "main")
    seen, errors = [], []

    def work(i, together):
        try:
            for j in range(5):
                assert add_note(f, f"t{i}-{j}") is not None and notes(f)
            conn = f.connection()
            if together is not None:  # all alive at once: their ids cannot be reused
                together.wait(BOUND_S)
                seen.append(id(conn))
        except Exception as exc:  # reported below, with the thread's number
            errors.append((i, exc))

    def in_threads(n, together=None):
        threads = [threading.Thread(target=work, args=(i, together)) for i in range(n)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(BOUND_S)
        assert not any(t.is_alive() for t in threads)

    # Eight connections open at once, each its own.
    in_threads(8, threading.Barrier(8))
    assert not errors and len(set(seen)) == 8 and id(f.connection()) not in seen
    # SQLite keeps the descriptor of a connection closed while another connection of
    # this process holds a lock on the file, for reuse: as many as were open at once.
    in_threads(1)
    warm = count_fds()
    for _ in range(50):  # short-lived threads, one after another
        in_threads(1)
    # join() can return before the thread's locals are cleared: wait for that, bounded.
    deadline = time.monotonic() + 5
    while count_fds() != warm and time.monotonic() < deadline:
        time.sleep(0.01)
    assert count_fds() == warm and not errors
    assert len(notes(f)) == 1 + 5 * (8 + 1 + 50)


def test_a_schema_made_by_another_connection_between_two_reads_is_ours(opened, db_path):
    # Four threads' first maps on a fresh cache: one found no meta table, and before it
    # listed the tables (a second statement, its own snapshot) another had made them all;
    # the file was moved aside as "a database without a meta table (tables: [..., 'meta',
    # ...])", losing what was learnt (3 runs of 10; found by a hunting helper).
    from adaptive_exec.sqlite_file import stored_version

    made = opened(db_path)
    add_note(made, "made")  # the schema, as another connection's first write makes it
    made.close()

    class Racing:
        """A connection whose first read finds no meta table yet: the other connection
        created it just after."""

        def __init__(self, conn):
            self.conn, self.first = conn, True

        def execute(self, sql, *args):
            if self.first and "FROM meta" in sql:
                self.first = False
                raise sqlite3.OperationalError("no such table: meta")
            return self.conn.execute(sql, *args)

    conn = sqlite3.connect(str(db_path))
    try:
        assert stored_version(Racing(conn)) == V2.version
    finally:
        conn.close()
