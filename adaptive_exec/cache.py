"""Remembered features, per function fingerprint and machine, in one SQLite file.

The rest of the library calls five functions: ``lookup`` (before a map), ``observe``
(after it), ``load_calibration``/``store_calibration`` (this machine's constants, or a
dask cluster's under a name of its own: ``machine="dask:..."``) and ``clear``. Behind them:

    thread --(one connection per thread, closed when the thread ends, reopened after
              fork)--> <dir>/cache.sqlite3 (WAL)
      lookup:  one read transaction: the entry + its run history  (never waits on writers)
      hits:    counted here, written with this process's next write (or at exit)
      observe: BEGIN IMMEDIATE: pending hits, the entry, one run, eviction when it grew

Tables (schema version 2, kept in ``meta``):

    meta(key PRIMARY KEY, value)                         schema_version, created_at
    entries(fingerprint, machine) PRIMARY KEY            one row per function and machine:
        module, qualname, the Features columns (named as its fields), created_at,
        updated_at, used_at (the LRU clock), hits
    runs(id, fingerprint, machine, at, n_items, mode, n_workers, chunksize,
         estimated_s, actual_s)                          the last HISTORY runs per entry
    calibration(machine PRIMARY KEY, worker_startup_s, task_overhead_s, byte_cost_s,
                n_workers, source, updated_at)

Version 1 (the layout of the first persistent cache) had entries without
input_pickle_size, peak_memory, cpu_fraction, picklable, threads_cpu and used_at,
calibration without source, and no runs table; opening it migrates it in place.

The cache is advisory (STYLE 8): every public function catches its own errors and
answers "nothing cached". A file this process cannot write (its mode, another owner, a
read-only mount) is read and never written, with one ``CacheWarning``. Only plain
columns are stored and nothing is ever unpickled, so a tampered file can at worst give
a bad plan, never run code.
"""

from __future__ import annotations

import atexit
import contextlib
import dataclasses
import hashlib
import logging
import math
import os
import platform
import sqlite3
import statistics
import sys
import threading
import time
import types
import warnings
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Optional

from .calibration import Calibration
from .errors import CacheWarning
from .sampling import Features

logger = logging.getLogger("adaptive_exec")

ENV_DIR = "ADAPTIVE_EXEC_CACHE_DIR"
ENV_MAX_ENTRIES = "ADAPTIVE_EXEC_CACHE_MAX_ENTRIES"
ENV_EXPIRE_DAYS = "ADAPTIVE_EXEC_CACHE_EXPIRE_DAYS"
FILENAME = "cache.sqlite3"
SCHEMA_VERSION = 2

# An observed per-item time this far from the remembered one replaces it.
REFRESH_RATIO = 2.0
# Past runs kept per function, and used to correct the planner.
HISTORY = 20
HISTORY_USED = 5
# A few KB per entry with its history: the default cap keeps the file near 20 MB.
DEFAULT_MAX_ENTRIES = 10_000
DEFAULT_EXPIRE_DAYS = 30.0
# How long a call waits for another process's write lock before going on without the
# cache. A write is one small transaction (~40 µs on the 2-core development machine);
# 8 processes writing 300 times each, flat out, waited at most 0.18 s there. Long
# enough for that, short enough that a stuck lock costs a map little.
BUSY_TIMEOUT_S = 0.5

_MAGIC = b"SQLite format 3\x00"




@dataclass(frozen=True)
class RunRecord:
    """One map, as planned and as it went."""

    n_items: int
    mode: str
    n_workers: int
    chunksize: int
    estimated_s: float  # the plan's estimate for the mode it chose
    actual_s: float
    at: float = 0.0  # time.time() of the run


@dataclass(frozen=True)
class Entry:
    features: Features
    module: str
    qualname: str
    runs: tuple[RunRecord, ...] = ()
    hits: int = 0
    fingerprint: str = ""
    machine: str = ""
    created_at: float = 0.0  # time.time() of the first write
    updated_at: float = 0.0  # of the last write
    used_at: float = 0.0  # of the last hit or write: the LRU and expiry clock

    def parallel_correction(self, mode: str = "parallel") -> float:
        """How much runs of this function in ``mode`` ("parallel": the local pool,
        "distributed": a dask cluster) took over their estimate (median of the last few;
        1.0 without history). Never below 1: a lucky run must not make the next plan
        bolder than the model."""
        ratios = [r.actual_s / r.estimated_s for r in self.runs[-HISTORY_USED:]
                  if r.mode == mode and r.estimated_s > 0 and r.actual_s > 0]
        if not ratios:
            return 1.0
        return max(1.0, statistics.median(ratios))


# --- the layout ------------------------------------------------------------------------

# Features fields, stored under their own names (a test checks none is missing).
FEATURE_COLUMNS = (
    "mean_s", "coefficient_of_variation", "pickle_size", "input_pickle_size", "peak_memory",
    "function_complexity", "n_samples", "cpu_fraction", "picklable", "threads_cpu",
)
_ENTRY_COLUMNS = ("module", "qualname", *FEATURE_COLUMNS,
                  "created_at", "updated_at", "used_at", "hits")
_RUN_COLUMNS = ("n_items", "mode", "n_workers", "chunksize", "estimated_s", "actual_s", "at")
_CALIBRATION_COLUMNS = ("worker_startup_s", "task_overhead_s", "byte_cost_s", "n_workers",
                        "source")

# The runs table as version 2 made it (also what migrating from 1 creates).
_V2_RUNS = """CREATE TABLE runs (
        id INTEGER PRIMARY KEY,
        fingerprint TEXT NOT NULL,
        machine TEXT NOT NULL,
        at REAL NOT NULL,
        n_items INTEGER NOT NULL,
        mode TEXT NOT NULL,
        n_workers INTEGER NOT NULL,
        chunksize INTEGER NOT NULL,
        estimated_s REAL NOT NULL,
        actual_s REAL NOT NULL)"""
_V2_RUNS_INDEX = "CREATE INDEX runs_key ON runs (fingerprint, machine, id)"

# The current layout, for a new file.
_CREATE = (
    "CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)",
    """CREATE TABLE entries (
        fingerprint TEXT NOT NULL,
        machine TEXT NOT NULL,
        module TEXT NOT NULL,
        qualname TEXT NOT NULL,
        mean_s REAL NOT NULL,
        coefficient_of_variation REAL,
        pickle_size INTEGER,
        input_pickle_size INTEGER,
        peak_memory INTEGER,
        function_complexity INTEGER,
        n_samples INTEGER NOT NULL DEFAULT 0,
        cpu_fraction REAL,
        picklable INTEGER NOT NULL DEFAULT 1,
        threads_cpu REAL,
        created_at REAL NOT NULL,
        updated_at REAL NOT NULL,
        used_at REAL NOT NULL,
        hits INTEGER NOT NULL DEFAULT 0,
        PRIMARY KEY (fingerprint, machine))""",
    "CREATE INDEX entries_used_at ON entries (used_at)",
    _V2_RUNS,
    _V2_RUNS_INDEX,
    """CREATE TABLE calibration (
        machine TEXT PRIMARY KEY,
        worker_startup_s REAL NOT NULL,
        task_overhead_s REAL NOT NULL,
        byte_cost_s REAL NOT NULL,
        n_workers INTEGER NOT NULL,
        source TEXT,
        updated_at REAL NOT NULL)""",
)

# From version v to v+1, in one transaction. A step, once released, is never edited:
# a later layout is a new step (and a new _CREATE).
_MIGRATIONS: dict[int, tuple[str, ...]] = {
    1: (
        "ALTER TABLE entries ADD COLUMN input_pickle_size INTEGER",
        "ALTER TABLE entries ADD COLUMN peak_memory INTEGER",
        "ALTER TABLE entries ADD COLUMN cpu_fraction REAL",
        "ALTER TABLE entries ADD COLUMN picklable INTEGER NOT NULL DEFAULT 1",
        "ALTER TABLE entries ADD COLUMN threads_cpu REAL",
        "ALTER TABLE entries ADD COLUMN used_at REAL NOT NULL DEFAULT 0",
        "UPDATE entries SET used_at = updated_at",
        "CREATE INDEX entries_used_at ON entries (used_at)",
        _V2_RUNS,
        _V2_RUNS_INDEX,
        "ALTER TABLE calibration ADD COLUMN source TEXT",
    ),
}

_SELECT_ENTRY = (f"SELECT {', '.join(_ENTRY_COLUMNS)} FROM entries "
                 "WHERE fingerprint = ? AND machine = ? AND used_at >= ?")
# Rows of a tampered file that are not plain, sane values are skipped here, in C: a
# lookup reads up to HISTORY of them, and checking each in Python cost ~50 µs per hit.
_VALID_RUN = (
    "typeof(n_items) = 'integer' AND n_items >= 0 AND typeof(mode) = 'text' "
    "AND typeof(n_workers) = 'integer' AND n_workers >= 0 "
    "AND typeof(chunksize) = 'integer' AND chunksize >= 0 "
    "AND typeof(estimated_s) = 'real' AND estimated_s BETWEEN 0 AND 1e12 "
    "AND typeof(actual_s) = 'real' AND actual_s BETWEEN 0 AND 1e12 "
    "AND typeof(at) = 'real' AND at BETWEEN 0 AND 1e11"
)
_SELECT_RUNS = (f"SELECT {', '.join(_RUN_COLUMNS)} FROM runs "
                f"WHERE fingerprint = ? AND machine = ? AND {_VALID_RUN} ORDER BY id")
_INSERT_ENTRY = (
    f"INSERT INTO entries (fingerprint, machine, {', '.join(_ENTRY_COLUMNS)}) "
    f"VALUES ({', '.join('?' * (len(_ENTRY_COLUMNS) + 2))})"
)
_UPDATE_ENTRY = (
    "UPDATE entries SET module = ?, qualname = ?, "
    + ", ".join(f"{c} = ?" for c in FEATURE_COLUMNS)
    + ", updated_at = ?, used_at = ? WHERE fingerprint = ? AND machine = ?"
)
_INSERT_RUN = (f"INSERT INTO runs (fingerprint, machine, {', '.join(_RUN_COLUMNS)}) "
               f"VALUES ({', '.join('?' * (len(_RUN_COLUMNS) + 2))})")
_TRIM_RUNS = (
    "DELETE FROM runs WHERE fingerprint = ? AND machine = ? AND id <= ("
    "SELECT id FROM runs WHERE fingerprint = ? AND machine = ? "
    "ORDER BY id DESC LIMIT 1 OFFSET ?)"
)


# --- configuration ---------------------------------------------------------------------

# (ADAPTIVE_EXEC_CACHE_DIR, XDG_CACHE_HOME) -> the file: path() is on every map's path
_paths: dict[tuple[Optional[str], Optional[str]], str] = {}
_machine: Optional[str] = None


def default_dir() -> str:
    """The platform's per-user cache directory, with ``adaptive_exec`` appended."""
    if sys.platform == "win32":
        base = os.environ.get("LOCALAPPDATA") or os.path.expanduser(r"~\AppData\Local")
    elif sys.platform == "darwin":
        base = os.path.expanduser("~/Library/Caches")
    else:
        base = os.environ.get("XDG_CACHE_HOME", "")
        if not os.path.isabs(base):  # the XDG spec says to ignore a relative one
            base = os.path.expanduser("~/.cache")
    return os.path.join(base, "adaptive_exec")


def path() -> str:
    """The cache file in use: ``$ADAPTIVE_EXEC_CACHE_DIR/cache.sqlite3``, else in
    ``default_dir()``."""
    configured = os.environ.get(ENV_DIR) or None
    key = (configured, None if configured else os.environ.get("XDG_CACHE_HOME"))
    found = _paths.get(key)
    if found is None:
        base = configured if configured is not None else default_dir()
        found = _paths[key] = os.path.join(os.path.abspath(base), FILENAME)
    return found


def machine_id() -> str:
    """A stable id for this host and its CPU configuration: entries and calibration
    measured elsewhere (a shared home directory) are not used here."""
    global _machine
    if _machine is None:
        parts = (platform.node(), platform.system(), platform.machine(), str(os.cpu_count()),
                 sys.implementation.name, "{}.{}".format(*sys.version_info[:2]))
        _machine = hashlib.sha256("|".join(parts).encode()).hexdigest()[:16]
    return _machine


def _env_number(name: str, default: float, cast: Callable[[str], float]) -> float:
    raw = os.environ.get(name)
    if not raw:
        return default
    try:
        value = cast(raw)
    except ValueError:
        logger.debug("adaptive_exec cache: ignoring %s=%r (not a number)", name, raw)
        return default
    if not value > 0 or math.isinf(value):
        logger.debug("adaptive_exec cache: ignoring %s=%r (not positive)", name, raw)
        return default
    return value


def max_entries() -> int:
    """The size cap (``ADAPTIVE_EXEC_CACHE_MAX_ENTRIES``): beyond it, the least recently
    used entries go."""
    return int(_env_number(ENV_MAX_ENTRIES, DEFAULT_MAX_ENTRIES, int))


def expire_days() -> float:
    """Entries unused this many days are gone (``ADAPTIVE_EXEC_CACHE_EXPIRE_DAYS``)."""
    return _env_number(ENV_EXPIRE_DAYS, DEFAULT_EXPIRE_DAYS, float)


# --- connections and process-wide state ------------------------------------------------


class _Db:
    """One thread's connection to one cache file.

    Closed when it is dropped: when its thread ends (the thread's ``_local`` slot goes
    with it), or when the thread replaces it. Without that, a program that maps from
    many short-lived threads kept one open connection (the file, its WAL and shared
    memory: 3 descriptors) per ended thread until the garbage collector ran, since a
    CPython connection is in a reference cycle with its own statement cache: measured,
    9 descriptors grew to 39 over 200 threads.
    """

    __slots__ = ("conn", "path", "pid", "generation", "read_only", "inode")

    def __init__(self, conn: sqlite3.Connection, path: str, generation: int, read_only: bool,
                 inode: tuple[int, int]):
        self.conn = conn
        self.path = path
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


class _State:
    """What this process knows about cache files, shared by its threads."""

    def __init__(self) -> None:
        # Guards every attribute below; held for dict updates only, never across SQLite
        # calls, so a thread waiting on a database lock never holds up another's lookup.
        self.lock = threading.Lock()
        self.pid = os.getpid()
        self.generation = 0  # bumped to make every thread reopen (close(), a file moved aside)
        self.off: dict[str, str] = {}  # path -> why the cache is off there
        self.warned: set[str] = set()  # kinds of CacheWarning given ("once per process")
        # path -> why this process cannot write it: read, never written
        self.unwritable: dict[str, str] = {}
        # path -> fingerprint -> [hits, last hit time], not yet written
        self.pending: dict[str, dict[str, list[float]]] = {}
        self.hooks = False  # at-fork and at-exit hooks registered


_state = _State()
_local = threading.local()
# Connections inherited through fork(): never used nor closed in the child (SQLite
# forbids carrying a connection across fork; closing it could touch the parent's locks).
# Those of the parent's other threads land here too: their thread-local slots are
# cleared in the child, and _Db.__del__ keeps what it did not open.
_abandoned: list[sqlite3.Connection] = []


def _after_fork_in_child() -> None:
    global _state
    _local.db = None  # _Db.__del__ moves the inherited connection to _abandoned
    old = _state
    _state = _State()  # a fresh lock: the parent's may have been held by another thread
    _state.off = dict(old.off)
    _state.unwritable = dict(old.unwritable)
    _state.hooks = old.hooks
    _state.generation = old.generation + 1


def _register_hooks() -> None:
    with _state.lock:
        if _state.hooks:
            return
        _state.hooks = True
    if hasattr(os, "register_at_fork"):
        os.register_at_fork(after_in_child=_after_fork_in_child)
    atexit.register(_flush_at_exit)


def _db(create: bool = True) -> Optional[_Db]:
    """This thread's connection to the current cache file; None when the cache is off
    there (or, with ``create=False``, when there is no cache file yet)."""
    db: Optional[_Db] = getattr(_local, "db", None)
    p = path()
    if (db is not None and db.path == p and db.pid == os.getpid()
            and db.generation == _state.generation):
        return db
    if db is not None:
        _local.db = None
        if db.pid == os.getpid():
            with contextlib.suppress(Exception):
                db.conn.close()
        # else forked without the hook (os.fork before the first use registers it):
        # _Db.__del__ keeps the connection in _abandoned.
    if p in _state.off:
        return None
    if not create and not os.path.exists(p):
        return None
    _register_hooks()
    return _open(p)


def _warn(kind: str, msg: str) -> None:
    with _state.lock:
        if kind in _state.warned:
            logger.debug("%s", msg)
            return
        _state.warned.add(kind)
    # Point at the caller's code, outside this package (what stacklevel is for).
    level = 2  # the caller of _warn
    frame: Optional[types.FrameType] = sys._getframe(1)
    while frame is not None and frame.f_globals.get("__name__", "").startswith("adaptive_exec"):
        level, frame = level + 1, frame.f_back
    warnings.warn(msg, CacheWarning, stacklevel=level)


def _turn_off(p: str, msg: str) -> None:
    with _state.lock:
        _state.off[p] = msg
    _warn("off", f"adaptive_exec: {msg}; maps run without the cache")


def _is_locked(exc: BaseException) -> bool:
    text = str(exc).lower()
    return isinstance(exc, sqlite3.OperationalError) and ("locked" in text or "busy" in text)


def _is_read_only(exc: BaseException) -> bool:
    name = getattr(exc, "sqlite_errorname", None)  # Python 3.11+
    if name is not None:
        return name.startswith("SQLITE_READONLY")
    return isinstance(exc, sqlite3.OperationalError) and "readonly database" in str(exc).lower()


def _writable(p: str) -> bool:
    """Whether this process may write the existing file ``p``. access() also answers
    for a read-only mount and an immutable file, where root's privileges do not help."""
    if os.access in os.supports_effective_ids:
        return os.access(p, os.W_OK, effective_ids=True)
    return os.access(p, os.W_OK)


def _connect(p: str, read_only: bool = False) -> sqlite3.Connection:
    # check_same_thread=False: a connection is still used only by the thread that opened
    # it (through _local); this lets whichever thread drops the last reference to its
    # _Db close it (a traceback kept alive elsewhere, the garbage collector).
    if read_only:
        uri = "file:" + p.replace("%", "%25").replace("?", "%3f").replace("#", "%23")
        return sqlite3.connect(uri + "?mode=ro", uri=True, timeout=BUSY_TIMEOUT_S,
                               isolation_level=None, check_same_thread=False)
    return sqlite3.connect(p, timeout=BUSY_TIMEOUT_S, isolation_level=None,
                           check_same_thread=False)


def _is_corrupt(exc: BaseException) -> bool:
    name = getattr(exc, "sqlite_errorname", None)  # Python 3.11+
    if name is not None:
        return name.startswith("SQLITE_CORRUPT") or name == "SQLITE_NOTADB"
    # Below 3.11: SQLITE_CORRUPT and SQLITE_NOTADB are the plain DatabaseError.
    return type(exc) is sqlite3.DatabaseError


class _NotOurs(Exception):
    """The file is a database, but not a cache of ours (or its meta table is garbage)."""


def _inode(p: str) -> tuple[int, int]:
    st = os.stat(p)
    return st.st_dev, st.st_ino


def _make_dir(d: str) -> None:
    if os.path.isdir(d):
        return
    parent = os.path.dirname(d)
    if parent:
        os.makedirs(parent, exist_ok=True)
    try:
        os.mkdir(d, 0o700)
    except FileExistsError:
        return
    os.chmod(d, 0o700)  # mkdir's mode went through the umask


def _schema_version(conn: sqlite3.Connection) -> Optional[int]:
    """The file's schema version; None for an empty database."""
    tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
    if not tables:
        return None
    if "meta" not in tables:
        raise _NotOurs(f"a database without our meta table (tables: {sorted(tables)})")
    row = conn.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()
    try:
        version = int(row[0])
    except (TypeError, ValueError):
        raise _NotOurs(f"schema_version is {row!r}") from None
    if version < 1:
        raise _NotOurs(f"schema_version is {version}")
    return version


def _open(p: str, retried: bool = False) -> Optional[_Db]:
    conn: Optional[sqlite3.Connection] = None
    inode: Optional[tuple[int, int]] = None
    try:
        try:
            _make_dir(os.path.dirname(p))
        except OSError as exc:
            _turn_off(p, f"cannot create the cache directory {os.path.dirname(p)} ({exc})")
            return None
        unwritable = None
        if os.path.exists(p):
            inode = _inode(p)
            with open(p, "rb") as f:
                head = f.read(len(_MAGIC))
            if head and head != _MAGIC:
                raise _NotOurs("not an SQLite file")
            with _state.lock:
                unwritable = _state.unwritable.get(p)
            if unwritable is None and not _writable(p):
                unwritable = "this process may not write it"
        if unwritable is not None:
            conn = _connect(p, read_only=True)
            return _open_unwritable(conn, p, unwritable)
        conn = _connect(p)
        version = _schema_version(conn)
        if version is not None and version > SCHEMA_VERSION:
            conn.close()
            conn = _open_read_only(p, version)
            return _remember(conn, p, True) if conn is not None else None
        if conn.execute("PRAGMA journal_mode").fetchone()[0].lower() != "wal":
            conn.execute("PRAGMA journal_mode = WAL")  # readers never wait on writers
        if version != SCHEMA_VERSION:
            with _write(conn):
                _create_or_migrate(conn)
        # A commit then appends to the WAL without fsync: a power cut may lose the last
        # few writes, fine for a cache; observe() took 40 µs so against 180 µs with FULL.
        conn.execute("PRAGMA synchronous = NORMAL")
        return _remember(conn, p, False)
    except Exception as exc:
        if conn is not None:
            with contextlib.suppress(Exception):
                conn.close()
        if _is_locked(exc):
            logger.debug("adaptive_exec cache: %s is locked; no cache for this call", p)
            return None
        if isinstance(exc, _NotOurs) or _is_corrupt(exc):
            if inode is None and os.path.exists(p):
                inode = _inode(p)
            if inode is not None and not retried:
                _move_aside(p, inode, str(exc))
                return _open(p, retried=True)
            logger.debug("adaptive_exec cache: %s unusable", p, exc_info=True)
            return None
        if isinstance(exc, (OSError, sqlite3.OperationalError)):
            _turn_off(p, f"cannot use the cache file {p} ({exc})")
            return None
        raise


def _open_unwritable(conn: sqlite3.Connection, p: str, why: str) -> Optional[_Db]:
    """A file this process cannot write, opened read-only (``conn``): read when it has
    our current layout, with one warning; else the cache is off (one warning too).
    Nothing is written: an older layout is not migrated, an empty file not filled."""
    try:
        version = _schema_version(conn)  # a read: fails here if it cannot even be read
    except BaseException:
        conn.close()
        raise
    if version is not None and version > SCHEMA_VERSION:
        _warn("newer", f"adaptive_exec: the cache {p} has schema version {version}, newer "
                       f"than this version of adaptive_exec knows ({SCHEMA_VERSION}); it is "
                       "read, never written")
        return _remember(conn, p, True)
    if version != SCHEMA_VERSION:
        conn.close()
        layout = "empty" if version is None else f"has the older schema version {version}"
        _turn_off(p, f"the cache file {p} is read-only ({why}) and {layout}")
        return None
    with _state.lock:
        _state.unwritable.setdefault(p, why)
    _warn("read-only", f"adaptive_exec: the cache file {p} is read-only ({why}); it is "
                       "read, never written")
    return _remember(conn, p, True)


def _open_read_only(p: str, version: int) -> Optional[sqlite3.Connection]:
    _warn("newer", f"adaptive_exec: the cache {p} has schema version {version}, newer than "
                   f"this version of adaptive_exec knows ({SCHEMA_VERSION}); it is read, "
                   "never written")
    try:
        return _connect(p, read_only=True)
    except Exception:
        logger.debug("adaptive_exec cache: cannot open %s read-only", p, exc_info=True)
        with _state.lock:
            _state.off[p] = "a newer schema that cannot be read"
        return None


def _remember(conn: sqlite3.Connection, p: str, read_only: bool) -> _Db:
    db = _Db(conn, p, _state.generation, read_only, _inode(p))
    _local.db = db
    return db


def _create_or_migrate(conn: sqlite3.Connection) -> None:
    """Inside a write transaction: another process may have done it meanwhile."""
    version = _schema_version(conn)
    if version is None:
        for statement in _CREATE:
            conn.execute(statement)
        conn.executemany("INSERT INTO meta (key, value) VALUES (?, ?)",
                         [("schema_version", str(SCHEMA_VERSION)),
                          ("created_at", repr(time.time()))])
        return
    while version < SCHEMA_VERSION:
        logger.debug("adaptive_exec cache: migrating schema %d -> %d", version, version + 1)
        for statement in _MIGRATIONS[version]:
            conn.execute(statement)
        version += 1
        conn.execute("UPDATE meta SET value = ? WHERE key = 'schema_version'", (str(version),))


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


def _move_aside(p: str, inode: tuple[int, int], why: str) -> None:
    """Move a bad cache file (with its WAL) to ``<file>.corrupt-<timestamp>``."""
    with _file_lock(p):
        try:
            if _inode(p) != inode:
                return  # another process already replaced it
        except FileNotFoundError:
            return
        stamp = time.strftime("%Y%m%dT%H%M%S") + f".{int(time.time() * 1000) % 1000:03d}"
        aside = f"{p}.corrupt-{stamp}"
        os.replace(p, aside)
        if os.path.exists(p + "-wal"):
            os.replace(p + "-wal", aside + "-wal")
        with contextlib.suppress(FileNotFoundError):
            os.remove(p + "-shm")
    with _state.lock:
        _state.generation += 1  # every thread's connection to the old file is dropped
    _warn("corrupt", f"adaptive_exec: the cache file {p} was not a usable cache ({why}); "
                     f"moved it to {aside} and started a fresh one")


@contextlib.contextmanager
def _write(conn: sqlite3.Connection) -> Iterator[None]:
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


def _failed(what: str, exc: BaseException) -> None:
    """Any error inside the cache: logged, and the call answers "nothing cached"."""
    db: Optional[_Db] = getattr(_local, "db", None)
    if db is not None and db.pid == os.getpid() and db.conn.in_transaction:
        with contextlib.suppress(Exception):
            db.conn.execute("ROLLBACK")
    if _is_locked(exc):
        logger.debug("adaptive_exec cache: %s skipped: the database is locked", what)
        return
    if _is_read_only(exc) and db is not None and db.pid == os.getpid():
        # Opened writable, and a write was refused: the file became read-only, or
        # access() said yes where the file system says no. This thread reopens it
        # read-only; other threads do when their own write fails. A file moved away
        # under us (SQLITE_READONLY_DBMOVED: another process moved a bad one aside)
        # is no reason to stop writing: the reopen finds the new file.
        _local.db = None
        with contextlib.suppress(Exception):
            db.conn.close()
        try:
            moved = _inode(db.path) != db.inode
        except OSError:
            moved = True
        if moved:
            logger.debug("adaptive_exec cache: %s skipped: the file was replaced", what)
            return
        with _state.lock:
            _state.unwritable.setdefault(db.path, f"writing failed: {exc}")
        _warn("read-only", f"adaptive_exec: cannot write the cache file {db.path} ({exc}); "
                           "it is read, never written")
        return
    if _is_corrupt(exc) and db is not None and db.pid == os.getpid():
        _local.db = None
        with contextlib.suppress(Exception):
            db.conn.close()
        try:
            _move_aside(db.path, db.inode, str(exc))
        except Exception:
            logger.debug("adaptive_exec cache: cannot move %s aside", db.path, exc_info=True)
        return
    logger.debug("adaptive_exec cache: %s failed", what, exc_info=True)


# --- reading rows (validated: a tampered row is a miss, never a crash) ----------------

_LIMIT = 1 << 62


def _num(v: Any, lo: float = 0.0, hi: float = 1e12) -> Optional[float]:
    if type(v) not in (int, float) or not lo <= v <= hi:  # rejects NaN, text, blobs
        return None
    return float(v)


def _int(v: Any, lo: int = 0) -> Optional[int]:
    if type(v) is float and v.is_integer():
        v = int(v)
    if type(v) is not int or not lo <= v <= _LIMIT:
        return None
    return v


def _text(v: Any) -> str:
    return v if type(v) is str else ""


def _features(row: Any) -> Optional[Features]:
    """Features from the FEATURE_COLUMNS of a row; None when the required ones are bad.
    Optional features that are missing (an entry from schema 1) or invalid are None."""
    (mean_s, cv, pickle_size, input_pickle_size, peak_memory, complexity, n_samples,
     cpu_fraction, picklable, threads_cpu) = row
    mean = _num(mean_s, hi=1e6)  # over 11 days per item is not a measurement
    if mean is None:
        return None
    return Features(
        mean_s=mean,
        coefficient_of_variation=_num(cv),
        pickle_size=_int(pickle_size),
        input_pickle_size=_int(input_pickle_size),
        peak_memory=_int(peak_memory),
        function_complexity=_int(complexity) or 0,
        n_samples=_int(n_samples) or 0,
        cpu_fraction=_num(cpu_fraction, hi=1.0),
        picklable=picklable != 0,
        threads_cpu=_num(threads_cpu, hi=1e6),
    )


def _entry(fp: str, machine: str, row: Any, runs: list[Any]) -> Optional[Entry]:
    n = len(FEATURE_COLUMNS)
    features = _features(row[2:2 + n])
    if features is None:
        return None
    created_at, updated_at, used_at, hits = row[2 + n:]
    records = tuple(RunRecord(*r) for r in runs)  # rows checked by _VALID_RUN
    return Entry(features, _text(row[0]), _text(row[1]), records, _int(hits) or 0, fp, machine,
                 _num(created_at, hi=1e11) or 0.0, _num(updated_at, hi=1e11) or 0.0,
                 _num(used_at, hi=1e11) or 0.0)


def _cutoff(now: float) -> float:
    return now - expire_days() * 86400.0


# --- the interface ---------------------------------------------------------------------


def lookup(key: str) -> Optional[Entry]:
    """The entry for fingerprint ``key`` on this machine, or None (a miss, or any
    problem with the cache). A hit counts: hits and the LRU clock are written with this
    process's next write."""
    try:
        db = _db(create=False)  # a miss creates no file: observe() will
        if db is None:
            return None
        machine = machine_id()
        now = time.time()
        conn = db.conn
        # One read transaction: the entry and its history from the same snapshot.
        conn.execute("BEGIN")
        try:
            row = conn.execute(_SELECT_ENTRY, (key, machine, _cutoff(now))).fetchone()
            runs = conn.execute(_SELECT_RUNS, (key, machine)).fetchall() if row else []
        finally:
            if conn.in_transaction:
                conn.execute("ROLLBACK")  # a read: ending it cannot wait on a lock
        if row is None:
            return None
        entry = _entry(key, machine, row, runs)
        if entry is None:
            logger.debug("adaptive_exec cache: entry %s is invalid: a miss", key)
            return None
        if db.read_only:  # never written: counting would only grow memory
            return dataclasses.replace(entry, used_at=now)
        with _state.lock:
            pending = _state.pending.setdefault(db.path, {}).setdefault(key, [0, 0.0])
            pending[0] += 1
            pending[1] = now
            hits = int(pending[0])
        return dataclasses.replace(entry, hits=entry.hits + hits, used_at=now)
    except Exception as exc:
        _failed("lookup", exc)
        return None


def observe(
    key: str,
    *,
    module: str,
    qualname: str,
    sampled: Optional[Features],
    observed_item_s: Optional[float],
    run: Optional[RunRecord],
) -> bool:
    """After a run (or a plan): keep what sampling measured, correct the per-item time
    when the run saw something else (beyond REFRESH_RATIO), and add the run's record.
    True when it was written (False: nothing to write, or the cache was unavailable)."""
    try:
        db = _db()
        if db is None or db.read_only:
            return False
        pending = _take_pending(db.path)
        try:
            return _observe(db.conn, key, module, qualname, sampled, observed_item_s, run,
                            pending)
        except BaseException:
            _restore_pending(db.path, pending)
            raise
    except Exception as exc:
        _failed("observe", exc)
        return False


def _observe(
    conn: sqlite3.Connection, key: str, module: str, qualname: str,
    sampled: Optional[Features], observed_item_s: Optional[float], run: Optional[RunRecord],
    pending: dict[str, list[float]],
) -> bool:
    machine = machine_id()
    now = time.time()
    with _write(conn):
        _write_hits(conn, machine, pending)
        row = conn.execute(
            f"SELECT {', '.join(FEATURE_COLUMNS)} FROM entries "
            "WHERE fingerprint = ? AND machine = ?", (key, machine)).fetchone()
        features = sampled if sampled is not None else (_features(row) if row else None)
        if features is None:
            return False
        if observed_item_s is not None and observed_item_s > 0 and features.mean_s > 0:
            ratio = observed_item_s / features.mean_s
            if ratio > REFRESH_RATIO or ratio < 1 / REFRESH_RATIO:
                features = dataclasses.replace(features, mean_s=observed_item_s)
        values = tuple(getattr(features, c) for c in FEATURE_COLUMNS)
        if row is None:
            conn.execute(_INSERT_ENTRY, (key, machine, module, qualname, *values, now, now, now, 0))
        else:
            conn.execute(_UPDATE_ENTRY, (module, qualname, *values, now, now, key, machine))
        if run is not None:
            conn.execute(_INSERT_RUN, (key, machine, run.n_items, run.mode, run.n_workers,
                                       run.chunksize, run.estimated_s, run.actual_s, now))
            conn.execute(_TRIM_RUNS, (key, machine, key, machine, HISTORY))
        if row is None:
            _prune(conn, now)
    return True


def _write_hits(conn: sqlite3.Connection, machine: str, pending: dict[str, list[float]]) -> None:
    conn.executemany(
        "UPDATE entries SET hits = hits + ?, used_at = max(used_at, ?) "
        "WHERE fingerprint = ? AND machine = ?",
        [(int(h), used, key, machine) for key, (h, used) in pending.items()],
    )


def _take_pending(p: str) -> dict[str, list[float]]:
    with _state.lock:
        return _state.pending.pop(p, {})


def _restore_pending(p: str, taken: dict[str, list[float]]) -> None:
    if not taken:
        return
    with _state.lock:
        now = _state.pending.setdefault(p, {})
        for key, (h, used) in taken.items():
            slot = now.setdefault(key, [0, 0.0])
            slot[0] += h
            slot[1] = max(slot[1], used)


def _flush_pending() -> None:
    if not _state.pending.get(path()):
        return
    db = _db(create=False)
    if db is None or db.read_only:
        return
    pending = _take_pending(db.path)
    if not pending:
        return
    try:
        with _write(db.conn):
            _write_hits(db.conn, machine_id(), pending)
    except BaseException:
        _restore_pending(db.path, pending)
        raise


def _flush_at_exit() -> None:
    if _state.pid != os.getpid():
        return
    try:
        _flush_pending()
    except Exception as exc:
        _failed("writing hits at exit", exc)


def _delete(conn: sqlite3.Connection, victims: list[Any]) -> int:
    conn.executemany("DELETE FROM runs WHERE fingerprint = ? AND machine = ?", victims)
    conn.executemany("DELETE FROM entries WHERE fingerprint = ? AND machine = ?", victims)
    return len(victims)


def _prune(conn: sqlite3.Connection, now: float) -> int:
    """Inside a write transaction: drop expired entries, then the least recently used
    beyond the cap. Run when an entry is added, the only time the count grows."""
    removed = _delete(conn, conn.execute(
        "SELECT fingerprint, machine FROM entries WHERE used_at < ?", (_cutoff(now),)
    ).fetchall())
    excess = conn.execute("SELECT count(*) FROM entries").fetchone()[0] - max_entries()
    if excess > 0:
        removed += _delete(conn, conn.execute(
            "SELECT fingerprint, machine FROM entries ORDER BY used_at, rowid LIMIT ?", (excess,)
        ).fetchall())
    return removed


def load_calibration(machine: Optional[str] = None) -> Optional[Calibration]:
    """This machine's pool constants (or those stored under ``machine``, a dask
    cluster's name), as last measured by any process; None if never."""
    try:
        db = _db(create=False)
        if db is None:
            return None
        row = db.conn.execute(
            f"SELECT {', '.join(_CALIBRATION_COLUMNS)} FROM calibration WHERE machine = ?",
            (machine or machine_id(),)).fetchone()
        if row is None:
            return None
        startup, overhead, byte_cost = _num(row[0]), _num(row[1]), _num(row[2])
        n_workers = _int(row[3], lo=1)
        if startup is None or not overhead or not byte_cost or n_workers is None:
            logger.debug("adaptive_exec cache: stored calibration is invalid: ignored")
            return None
        source = row[4] if type(row[4]) is str and row[4] else "measured earlier (cache)"
        return Calibration(startup, overhead, byte_cost, n_workers, source)
    except Exception as exc:
        _failed("load_calibration", exc)
        return None


def store_calibration(calib: Calibration, machine: Optional[str] = None) -> bool:
    try:
        db = _db()
        if db is None or db.read_only:
            return False
        with _write(db.conn):
            db.conn.execute(
                "INSERT OR REPLACE INTO calibration (machine, "
                f"{', '.join(_CALIBRATION_COLUMNS)}, updated_at) VALUES (?, ?, ?, ?, ?, ?, ?)",
                (machine or machine_id(), calib.worker_startup_s, calib.task_overhead_s,
                 calib.byte_cost_s, calib.n_workers, calib.source, time.time()))
        return True
    except Exception as exc:
        _failed("store_calibration", exc)
        return False


def clear() -> int:
    """Remove every entry, run and calibration from the current cache file (all
    machines). Returns the number of entries removed; creates no file."""
    try:
        with _state.lock:
            _state.pending.pop(path(), None)
        db = _db(create=False)
        if db is None or db.read_only:
            return 0
        with _write(db.conn):
            n: int = db.conn.execute("SELECT count(*) FROM entries").fetchone()[0]
            for table in ("runs", "entries", "calibration"):
                db.conn.execute(f"DELETE FROM {table}")
        return n
    except Exception as exc:
        _failed("clear", exc)
        return 0


def prune() -> int:
    """Apply expiry and the size cap now; the number of entries removed."""
    try:
        db = _db(create=False)
        if db is None or db.read_only:
            return 0
        with _write(db.conn):
            return _prune(db.conn, time.time())
    except Exception as exc:
        _failed("prune", exc)
        return 0


def close() -> None:
    """Write pending hits, close this thread's connection, and forget what this process
    learnt about cache files (off, warnings given); other threads reopen on next use.
    For tests, and for programs that change ADAPTIVE_EXEC_CACHE_DIR while running."""
    try:
        _flush_pending()
    except Exception as exc:
        _failed("close", exc)
    db: Optional[_Db] = getattr(_local, "db", None)
    _local.db = None
    if db is not None and db.pid == os.getpid():
        with contextlib.suppress(Exception):
            db.conn.close()
    with _state.lock:
        _state.generation += 1
        _state.off.clear()
        _state.warned.clear()
        _state.unwritable.clear()
        _state.pending.clear()


# --- inspection (python -m adaptive_exec cache ...) -----------------------------------


def list_entries() -> list[Entry]:
    """Every unexpired entry, all machines, most recently used first."""
    db = _db(create=False)
    if db is None:
        return []
    conn = db.conn
    conn.execute("BEGIN")
    try:
        rows = conn.execute(
            f"SELECT fingerprint, machine, {', '.join(_ENTRY_COLUMNS)} FROM entries "
            "WHERE used_at >= ? ORDER BY used_at DESC", (_cutoff(time.time()),)).fetchall()
        runs: dict[tuple[str, str], list[Any]] = {}
        for r in conn.execute(f"SELECT fingerprint, machine, {', '.join(_RUN_COLUMNS)} "
                              f"FROM runs WHERE {_VALID_RUN} ORDER BY id"):
            runs.setdefault((r[0], r[1]), []).append(r[2:])
    finally:
        if conn.in_transaction:
            conn.execute("ROLLBACK")
    out = []
    for r in rows:
        entry = _entry(_text(r[0]), _text(r[1]), r[2:], runs.get((r[0], r[1]), []))
        if entry is not None:
            out.append(entry)
    return out


def find(query: str) -> list[Entry]:
    """Entries whose fingerprint starts with ``query``, or whose name is ``query``
    (``qualname``, ``module.qualname``, ``module:qualname`` or the last name part)."""
    q = query.strip()
    out = []
    for e in list_entries():
        names = {e.qualname, f"{e.module}.{e.qualname}", f"{e.module}:{e.qualname}",
                 e.qualname.rsplit(".", 1)[-1]}
        if q in names or (len(q) >= 4 and e.fingerprint.startswith(q.lower())):
            out.append(e)
    return out


def stats() -> dict[str, Any]:
    """What the cache file holds, and how it is configured."""
    p = path()
    out: dict[str, Any] = {
        "path": p, "machine": machine_id(), "max_entries": max_entries(),
        "expire_days": expire_days(), "exists": os.path.exists(p),
    }
    if p in _state.off:
        out["status"] = f"off: {_state.off[p]}"
    db = _db(create=False)
    if db is None:
        out.setdefault("status", "no cache file yet" if not out["exists"] else "unavailable")
        return out
    conn = db.conn
    q = conn.execute
    if db.read_only:
        out["status"] = f"read-only ({_state.unwritable.get(p, 'newer schema')})"
    else:
        out["status"] = "ok"
    out["schema_version"] = q("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()[0]
    out["size_bytes"] = sum(os.path.getsize(f) for f in (p, p + "-wal") if os.path.exists(f))
    n, mine, hits, oldest, newest = q(
        "SELECT count(*), sum(machine = ?), sum(hits), min(used_at), max(used_at) FROM entries",
        (machine_id(),)).fetchone()
    out.update(entries=n, entries_this_machine=mine or 0, hits=hits or 0,
               oldest_used_at=oldest, newest_used_at=newest)
    out["expired"] = q("SELECT count(*) FROM entries WHERE used_at < ?",
                       (_cutoff(time.time()),)).fetchone()[0]
    out["runs"] = q("SELECT count(*) FROM runs").fetchone()[0]
    calib = load_calibration()
    out["calibration"] = calib.to_dict() if calib is not None else None
    return out
