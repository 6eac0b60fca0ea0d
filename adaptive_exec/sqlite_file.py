"""One SQLite file shared by the threads and processes of a program: its life, not its rows.

Its user hands it a ``Schema`` (the CREATE statements of the current layout, their version
and the steps up from each older one) and asks for work to run in a transaction:

    thread --(a connection of its own, closed when the thread ends, reopened after
              fork)--> <path> (WAL)
      read(fn):  fn(conn) in one read transaction, then ROLLBACK   (never waits on writers)
      write(fn): fn(conn) in BEGIN IMMEDIATE ... COMMIT

Both answer None, never raise, when the file cannot serve (fn's own bugs still raise):

    another process holds the lock past the timeout   None for this call, no warning
    not an SQLite file, corrupt, not of this schema   moved to <path>.corrupt-<time> with
                                                      its WAL; a fresh file next time
    a file this process may not write                 read, never written
    an older schema version                           migrated in place, step by step
    a newer schema version                            read, never written
    a directory that cannot be made, other errors     off until close()

Each of those that needs the user's attention gives one ``CacheWarning`` per process.
The version lives in ``meta(key, value)``, a table this module creates beside the
schema's own (with ``created_at``); what the other tables mean is the user's business.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sqlite3
import threading
import time
import weakref
from dataclasses import dataclass, field
from typing import Callable, Iterator, Optional, TypeVar

from .errors import CacheWarning, warn_user

logger = logging.getLogger("adaptive_exec")

_T = TypeVar("_T")

_META = "CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)"


@dataclass(frozen=True)
class Schema:
    """A layout and its history. ``create`` makes the current layout (version
    ``version``) in an empty file; ``migrations[v]`` takes a file from version v to v+1.
    A step, once released, is never edited: a later layout is a new step."""

    version: int
    create: tuple[str, ...]
    migrations: dict[int, tuple[str, ...]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.version < 1 or any(not 1 <= v < self.version for v in self.migrations):
            msg = f"schema version {self.version} with steps from {sorted(self.migrations)}"
            raise ValueError(msg)


class _NotOurs(Exception):
    """A database, but not one of this schema (or its meta table is garbage)."""


def writable(p: str) -> bool:
    """Whether this process may write the existing file ``p``, and create files beside
    it: in WAL mode a writer creates the -wal and -shm files there (a writable file in a
    read-only directory was opened for writing, failed, and turned the cache off).
    access() also answers for a read-only mount and an immutable file, where root's
    privileges do not help."""
    return _access_w(p) and _access_w(os.path.dirname(p) or ".")


def _access_w(p: str) -> bool:
    if os.access in os.supports_effective_ids:
        return os.access(p, os.W_OK, effective_ids=True)
    return os.access(p, os.W_OK)


def stored_version(conn: sqlite3.Connection) -> Optional[int]:
    """The file's schema version; None for an empty database."""
    try:
        # One statement where the file is ours (each costs a fresh process's first map
        # ~0.1 ms); the list of tables only where it is not.
        row = conn.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()
    except sqlite3.OperationalError as exc:
        if "no such table" not in str(exc):
            raise
        tables = {r[0] for r in conn.execute(
            "SELECT name FROM sqlite_master WHERE type = 'table'")}
        if not tables:
            return None
        if "meta" in tables:
            # Created by another connection between the two statements (each reads its
            # own snapshot outside a transaction): a fresh file that four threads' first
            # maps opened at once was moved aside as not ours. Read it again.
            row = conn.execute(
                "SELECT value FROM meta WHERE key = 'schema_version'").fetchone()
        else:
            raise _NotOurs(f"a database without a meta table (tables: {sorted(tables)})") from None
    try:
        version = int(row[0])
    except (TypeError, ValueError):
        raise _NotOurs(f"schema_version is {row!r}") from None
    if version < 1:
        raise _NotOurs(f"schema_version is {version}")
    return version


class _Connection:
    """One thread's connection.

    Closed when it is dropped: when its thread ends (the thread's slot in the file's
    ``threading.local`` goes with it), or when the thread replaces it. Without that, a
    program that used the file from many short-lived threads kept one open connection
    (the file, its WAL and shared memory: 3 descriptors) per ended thread until the
    garbage collector ran, since a CPython connection is in a reference cycle with its
    own statement cache: measured, 9 descriptors grew to 39 over 200 threads.
    """

    __slots__ = ("conn", "pid", "generation", "read_only", "inode")

    def __init__(self, conn: sqlite3.Connection, generation: int, read_only: bool,
                 inode: tuple[int, int]):
        self.conn = conn
        self.pid = os.getpid()
        self.generation = generation
        self.read_only = read_only
        self.inode = inode  # of the file opened: a replaced file is not moved aside twice

    def __del__(self) -> None:
        # No lock here: this may run inside the garbage collector, in any thread.
        try:
            if self.pid == os.getpid():
                self.conn.close()
            else:  # inherited through fork: see _abandoned
                _abandoned.append(self.conn)
        except Exception:  # at interpreter exit, module globals may be gone already
            pass


# Connections inherited through fork(): never used nor closed in the child (SQLite
# forbids carrying a connection across fork; closing it could touch the parent's locks).
# Those of the parent's other threads land here too: their thread-local slots are
# cleared in the child, and _Connection.__del__ keeps what it did not open.
_abandoned: list[sqlite3.Connection] = []
_files: weakref.WeakSet[SqliteFile] = weakref.WeakSet()
# Popped by whichever thread registers the at-fork hook first. A lock would do as well,
# but one held by another thread at fork() would stay held in the child forever.
_hook_pending = [True]


def _after_fork_in_child() -> None:
    for f in list(_files):
        f._after_fork()


def _register_fork_hook() -> None:
    try:
        _hook_pending.pop()
    except IndexError:
        return
    if hasattr(os, "register_at_fork"):
        os.register_at_fork(after_in_child=_after_fork_in_child)


class SqliteFile:
    """The file at ``path``, laid out by ``schema``; see the module docstring.

    ``busy_timeout_s``: how long a call waits for another connection's lock before it
    answers None. ``label`` names the file in warnings ("the cache file ..."). ``writable``
    says whether this process may write an existing file (default: ``writable()``).
    """

    def __init__(self, path: str, schema: Schema, *, busy_timeout_s: float,
                 label: str = "database", writable: Optional[Callable[[str], bool]] = None):
        self.path = path
        self.schema = schema
        self.label = label
        self._busy_timeout_s = busy_timeout_s
        self._may_write = writable
        # Guards the attributes below; held for updates only, never across SQLite calls,
        # so a thread waiting on a database lock never holds up another thread's read.
        self._lock = threading.Lock()
        self._generation = 0  # bumped to make every thread reopen (close(), moved aside)
        self._off: Optional[str] = None  # why the file is not used at all
        self._unwritable: Optional[str] = None  # why this process reads, never writes
        self._warned: set[str] = set()  # kinds of CacheWarning given ("once per process")
        self._local = threading.local()
        _files.add(self)

    # --- the interface ---------------------------------------------------------------

    def read(self, fn: Callable[[sqlite3.Connection], _T]) -> Optional[_T]:
        """``fn(conn)`` in one read transaction (one snapshot); None when there is no
        file yet or it cannot be read now. Creates nothing."""
        handle = None
        try:
            handle = self._handle(create=False)
            if handle is None:
                return None
            conn = handle.conn
            conn.execute("BEGIN")
            try:
                return fn(conn)
            finally:
                if conn.in_transaction:
                    conn.execute("ROLLBACK")  # a read: ending it cannot wait on a lock
        except (sqlite3.Error, OSError) as exc:
            self._failed(handle, getattr(fn, "__name__", "read"), exc)
            return None

    def write(self, fn: Callable[[sqlite3.Connection], _T], *, create: bool = True
              ) -> Optional[_T]:
        """``fn(conn)`` in one write transaction, committed; None when nothing was
        written (the file is read-only here, locked, unusable, or absent and not
        ``create``)."""
        handle = None
        try:
            handle = self._handle(create=create)
            if handle is None or handle.read_only:
                return None
            with _immediate(handle.conn):
                return fn(handle.conn)
        except (sqlite3.Error, OSError) as exc:
            self._failed(handle, getattr(fn, "__name__", "write"), exc)
            return None

    @property
    def read_only(self) -> bool:
        """Whether this thread's connection only reads (the file may not be written by
        this process, or has a newer schema)."""
        handle: Optional[_Connection] = getattr(self._local, "handle", None)
        return handle is not None and handle.read_only

    def connection(self) -> Optional[sqlite3.Connection]:
        """This thread's connection, opened if the file exists (for inspection)."""
        try:
            handle = self._handle(create=False)
        except (sqlite3.Error, OSError):
            return None
        return handle.conn if handle is not None else None

    def status(self) -> str:
        """In words: ok, read-only (why), off: why, no file yet, unavailable."""
        if self._off is not None:
            return f"off: {self._off}"
        try:
            handle = self._handle(create=False)
        except (sqlite3.Error, OSError):
            handle = None
        if handle is None:
            if self._off is not None:
                return f"off: {self._off}"
            return f"no {self.label} file yet" if not os.path.exists(self.path) \
                else "unavailable"
        if handle.read_only:
            return f"read-only ({self._unwritable or 'newer schema'})"
        return "ok"

    def close(self) -> None:
        """Close this thread's connection; every other thread reopens on its next call.
        Forget what was learnt about the file (off, read-only, warnings given)."""
        handle: Optional[_Connection] = getattr(self._local, "handle", None)
        self._local.handle = None
        if handle is not None and handle.pid == os.getpid():
            with contextlib.suppress(Exception):
                handle.conn.close()
        with self._lock:
            self._generation += 1
            self._off = self._unwritable = None
            self._warned.clear()

    def move_aside(self, why: str, inode: Optional[tuple[int, int]] = None) -> None:
        """Move the file (with its WAL) to ``<path>.corrupt-<timestamp>``, unless the
        file now at the path is not ``inode`` (another process replaced it already)."""
        p = self.path
        with _file_lock(p):
            try:
                if inode is not None and _inode(p) != inode:
                    return
            except FileNotFoundError:
                return
            stamp = time.strftime("%Y%m%dT%H%M%S") + f".{int(time.time() * 1000) % 1000:03d}"
            aside = f"{p}.corrupt-{stamp}"
            os.replace(p, aside)
            if os.path.exists(p + "-wal"):
                os.replace(p + "-wal", aside + "-wal")
            with contextlib.suppress(FileNotFoundError):
                os.remove(p + "-shm")
        with self._lock:
            self._generation += 1  # every thread's connection to the old file is dropped
        self._warn("corrupt", f"adaptive_exec: the {self.label} file {p} was not a usable "
                              f"{self.label} ({why}); moved it to {aside} and started a "
                              "fresh one")

    # --- this thread's connection ------------------------------------------------------

    def _handle(self, create: bool) -> Optional[_Connection]:
        """This thread's connection; None when the file is off (or, with
        ``create=False``, when there is no file yet)."""
        handle: Optional[_Connection] = getattr(self._local, "handle", None)
        pid = os.getpid()
        if handle is not None and handle.pid == pid and handle.generation == self._generation:
            return handle
        if handle is not None:
            self._local.handle = None
            if handle.pid == pid:
                with contextlib.suppress(Exception):
                    handle.conn.close()
            # else forked before the hook was registered: __del__ keeps it in _abandoned
        if self._off is not None:
            return None
        if not create and not os.path.exists(self.path):
            return None
        _register_fork_hook()
        return self._open()

    def _after_fork(self) -> None:
        self._lock = threading.Lock()  # the parent's may have been held by another thread
        self._local.handle = None  # _Connection.__del__ moves the parent's to _abandoned
        self._generation += 1
        self._warned = set()  # warnings are once per process: the child's own count

    def _connect(self, read_only: bool = False) -> sqlite3.Connection:
        # check_same_thread=False: a connection is still used only by the thread that
        # opened it (through _local); this lets whichever thread drops the last reference
        # to its _Connection close it (a traceback kept alive elsewhere, the GC).
        p, timeout = self.path, self._busy_timeout_s
        if read_only:
            uri = "file:" + p.replace("%", "%25").replace("?", "%3f").replace("#", "%23")
            # In a directory it cannot write, SQLite cannot create the -shm file a WAL
            # reader needs (SQLITE_READONLY_DIRECTORY): the file is read as immutable
            # there, as nothing can write it beside us (no -wal can be made either).
            flags = "?mode=ro" + ("" if _access_w(os.path.dirname(p) or ".")
                                  else "&immutable=1")
            return sqlite3.connect(uri + flags, uri=True, timeout=timeout,
                                   isolation_level=None, check_same_thread=False)
        return sqlite3.connect(p, timeout=timeout, isolation_level=None,
                               check_same_thread=False)

    def _open(self, retried: bool = False) -> Optional[_Connection]:
        p = self.path
        conn: Optional[sqlite3.Connection] = None
        inode: Optional[tuple[int, int]] = None
        try:
            try:
                _make_dir(os.path.dirname(p))
            except OSError as exc:
                self._turn_off(f"cannot create the {self.label} directory "
                               f"{os.path.dirname(p)} ({exc})")
                return None
            unwritable = None
            if os.path.exists(p):
                # Never opened here, not even to read its header: SQLite locks the file
                # with POSIX advisory locks, which belong to the process, and closing
                # *any* descriptor of the file drops all of them, those of this process's
                # other open connections included. In WAL mode a connection holds a shared
                # lock on the file while it is open: that is how another process, closing
                # its last connection, sees that the WAL is still in use. Without it, that
                # process deletes the -wal and -shm under our open connections, and each
                # process then writes a history of its own into the file: lost writes,
                # then "database disk image is malformed" (tests/test_cache_corruption.py).
                # A file that is not SQLite's fails stored_version() below instead
                # (SQLITE_NOTADB), untouched, and is moved aside.
                inode = _inode(p)
                unwritable = self._unwritable
                if unwritable is None and not (self._may_write or writable)(p):
                    unwritable = "this process may not write it, or create files beside it"
            if unwritable is not None:
                conn = self._connect(read_only=True)
                return self._open_unwritable(conn, unwritable)
            conn = self._connect()
            version = stored_version(conn)
            if version is not None and version > self.schema.version:
                conn.close()
                conn = self._open_newer(version)
                return self._remember(conn, True) if conn is not None else None
            if conn.execute("PRAGMA journal_mode").fetchone()[0].lower() != "wal":
                conn.execute("PRAGMA journal_mode = WAL")  # readers never wait on writers
            if version != self.schema.version:
                with _immediate(conn):
                    self._create_or_migrate(conn)
            # A commit then appends to the WAL without fsync: a power cut may lose the
            # last few writes, fine for a cache; a write of the feature cache took 40 µs
            # so against 180 µs with FULL.
            conn.execute("PRAGMA synchronous = NORMAL")
            return self._remember(conn, False)
        except Exception as exc:
            if conn is not None:
                with contextlib.suppress(Exception):
                    conn.close()
            if _is_locked(exc):
                logger.debug("adaptive_exec %s: %s is locked; not used for this call",
                             self.label, p)
                return None
            if isinstance(exc, _NotOurs) or _is_corrupt(exc):
                if inode is None and os.path.exists(p):
                    inode = _inode(p)
                if inode is not None and not retried:
                    self.move_aside(str(exc), inode)
                    return self._open(retried=True)
                logger.debug("adaptive_exec %s: %s unusable", self.label, p, exc_info=True)
                return None
            if isinstance(exc, (OSError, sqlite3.OperationalError)):
                self._turn_off(f"cannot use the {self.label} file {p} ({exc})")
                return None
            raise

    def _open_unwritable(self, conn: sqlite3.Connection, why: str) -> Optional[_Connection]:
        """A file this process cannot write, opened read-only (``conn``): read when it
        has the current layout, with one warning; else off (one warning too). Nothing is
        written: an older layout is not migrated, an empty file not filled."""
        p = self.path
        try:
            version = stored_version(conn)  # a read: fails here if it cannot even be read
        except BaseException:
            conn.close()
            raise
        if version is not None and version > self.schema.version:
            self._warn_newer(version)
            return self._remember(conn, True)
        if version != self.schema.version:
            conn.close()
            layout = "empty" if version is None else f"has the older schema version {version}"
            self._turn_off(f"the {self.label} file {p} is read-only ({why}) and {layout}")
            return None
        with self._lock:
            if self._unwritable is None:
                self._unwritable = why
        self._warn("read-only", f"adaptive_exec: the {self.label} file {p} is read-only "
                                f"({why}); it is read, never written")
        return self._remember(conn, True)

    def _open_newer(self, version: int) -> Optional[sqlite3.Connection]:
        self._warn_newer(version)
        try:
            return self._connect(read_only=True)
        except Exception:
            logger.debug("adaptive_exec %s: cannot open %s read-only", self.label, self.path,
                         exc_info=True)
            with self._lock:
                self._off = "a newer schema that cannot be read"
            return None

    def _remember(self, conn: sqlite3.Connection, read_only: bool) -> _Connection:
        handle = _Connection(conn, self._generation, read_only, _inode(self.path))
        self._local.handle = handle
        return handle

    def _create_or_migrate(self, conn: sqlite3.Connection) -> None:
        """Inside a write transaction: another process may have done it meanwhile."""
        version = stored_version(conn)
        target = self.schema.version
        if version is None:
            for statement in (_META, *self.schema.create):
                conn.execute(statement)
            conn.executemany("INSERT INTO meta (key, value) VALUES (?, ?)",
                             [("schema_version", str(target)),
                              ("created_at", repr(time.time()))])
            return
        while version < target:
            steps = self.schema.migrations.get(version)
            if steps is None:
                raise _NotOurs(f"no migration from schema version {version}")
            logger.debug("adaptive_exec %s: migrating schema %d -> %d", self.label, version,
                         version + 1)
            for statement in steps:
                conn.execute(statement)
            version += 1
            conn.execute("UPDATE meta SET value = ? WHERE key = 'schema_version'",
                         (str(version),))

    # --- what went wrong -------------------------------------------------------------

    def _failed(self, handle: Optional[_Connection], what: str, exc: BaseException) -> None:
        """A call failed inside SQLite (its transaction already ended): a lock is a miss;
        a refused write makes this process a reader; a corrupt file is moved aside."""
        if _is_locked(exc):
            logger.debug("adaptive_exec %s: %s skipped: the database is locked",
                         self.label, what)
            return
        if handle is not None and (_is_read_only(exc) or _is_corrupt(exc)):
            self._local.handle = None
            with contextlib.suppress(Exception):
                handle.conn.close()
            try:
                moved = _inode(self.path) != handle.inode
            except OSError:
                moved = True
            if moved:  # another process moved it aside: the reopen finds the new file
                logger.debug("adaptive_exec %s: %s skipped: the file was replaced",
                             self.label, what)
            elif _is_read_only(exc):
                # Opened writable, and a write was refused: the file became read-only,
                # or access() said yes where the file system says no. This thread reopens
                # it read-only; other threads do when their own write fails.
                with self._lock:
                    if self._unwritable is None:
                        self._unwritable = f"writing failed: {exc}"
                self._warn("read-only", f"adaptive_exec: cannot write the {self.label} file "
                                        f"{self.path} ({exc}); it is read, never written")
            else:
                try:
                    self.move_aside(str(exc), handle.inode)
                except OSError:
                    logger.debug("adaptive_exec %s: cannot move %s aside", self.label,
                                 self.path, exc_info=True)
            return
        logger.debug("adaptive_exec %s: %s failed", self.label, what, exc_info=True)

    def _warn(self, kind: str, msg: str) -> None:
        with self._lock:
            if kind in self._warned:
                logger.debug("%s", msg)
                return
            self._warned.add(kind)
        warn_user(msg, CacheWarning)  # points at the user's line, outside this package

    def _warn_newer(self, version: int) -> None:
        self._warn("newer", f"adaptive_exec: the {self.label} {self.path} has schema version "
                            f"{version}, newer than this version of adaptive_exec knows "
                            f"({self.schema.version}); it is read, never written")

    def _turn_off(self, msg: str) -> None:
        with self._lock:
            self._off = msg
        self._warn("off", f"adaptive_exec: {msg}; maps run without the {self.label}")


# --- helpers -----------------------------------------------------------------------------


@contextlib.contextmanager
def _immediate(conn: sqlite3.Connection) -> Iterator[None]:
    # IMMEDIATE takes the write lock up front: a deferred transaction that reads first
    # and then writes can fail with SQLITE_BUSY midway, without the busy timeout.
    conn.execute("BEGIN IMMEDIATE")
    try:
        yield
        conn.execute("COMMIT")
    except BaseException:
        if conn.in_transaction:  # never leave one open: the next BEGIN would fail
            with contextlib.suppress(Exception):
                conn.execute("ROLLBACK")
        raise


@contextlib.contextmanager
def _file_lock(p: str) -> Iterator[None]:
    """Between processes, around moving a bad file aside (POSIX; elsewhere a no-op)."""
    try:
        import fcntl
    except ImportError:
        yield
        return
    fd = os.open(p + ".lock", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def _make_dir(d: str) -> None:
    if os.path.isdir(d):
        return
    if os.path.exists(d):  # the message said only "unable to open database file"
        raise NotADirectoryError(f"{d} exists and is not a directory")
    parent = os.path.dirname(d)
    if parent:
        os.makedirs(parent, exist_ok=True)
    try:
        os.mkdir(d, 0o700)
    except FileExistsError:
        return
    os.chmod(d, 0o700)  # mkdir's mode went through the umask


def _inode(p: str) -> tuple[int, int]:
    st = os.stat(p)
    return st.st_dev, st.st_ino


def _is_locked(exc: BaseException) -> bool:
    text = str(exc).lower()
    return isinstance(exc, sqlite3.OperationalError) and ("locked" in text or "busy" in text)


def _is_read_only(exc: BaseException) -> bool:
    name = getattr(exc, "sqlite_errorname", None)  # Python 3.11+
    if name is not None:
        return name.startswith("SQLITE_READONLY")
    return isinstance(exc, sqlite3.OperationalError) and "readonly database" in str(exc).lower()


def _is_corrupt(exc: BaseException) -> bool:
    name = getattr(exc, "sqlite_errorname", None)  # Python 3.11+
    if name is not None:
        return name.startswith("SQLITE_CORRUPT") or name == "SQLITE_NOTADB"
    # Below 3.11: SQLITE_CORRUPT and SQLITE_NOTADB are the plain DatabaseError.
    return type(exc) is sqlite3.DatabaseError
