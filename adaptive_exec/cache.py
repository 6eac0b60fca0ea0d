"""What is remembered: per function fingerprint and machine, its features and run history,
and this machine's pool constants. How the file lives is ``sqlite_file``'s business.

The rest of the library calls five functions: ``lookup`` (before a map), ``observe``
(after it), ``load_calibration``/``store_calibration`` (this machine's constants, or a
dask cluster's under a name of its own: ``machine="dask:..."``) and ``clear``; the
command line reads the whole file through ``list_entries``, ``counts`` and ``status``
(what it prints, and finding entries by name, is ``cache_views``'s business):

    lookup:  one read: the entry + its run history (the planner turns the history into
             a correction: planner.parallel_correction)
    hits:    counted here, written with this process's next write (or at exit)
    observe: one write: pending hits, the entry, one run, eviction when it grew

Tables (schema version 4; ``meta`` with the version is sqlite_file's):

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

The cache is advisory (STYLE 8): every public function answers "nothing cached" on any
failure; the file's own troubles (locks, corruption, read-only, versions) are answered
by ``SqliteFile`` as None. Only plain columns are stored and nothing is ever unpickled,
so a tampered file can at worst give a bad plan, never run code.
"""

from __future__ import annotations

import atexit
import dataclasses
import hashlib
import logging
import math
import os
import platform
import sqlite3
import sys
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable, Optional, Sequence, TypeVar

from . import cache_schema as schema
from . import sqlite_file
from .cache_schema import FEATURE_COLUMNS, HISTORY
from .records import Calibration, Features
from .sqlite_file import SqliteFile

logger = logging.getLogger("adaptive_exec")
_T = TypeVar("_T")

ENV_DIR = "ADAPTIVE_EXEC_CACHE_DIR"
ENV_MAX_ENTRIES = "ADAPTIVE_EXEC_CACHE_MAX_ENTRIES"
ENV_EXPIRE_DAYS = "ADAPTIVE_EXEC_CACHE_EXPIRE_DAYS"
FILENAME = "cache.sqlite3"

# An observed per-item time more than REFRESH_RATIO off the remembered one replaces it
# (the work changed); one more than REFRESH_MIN off moves it REFRESH_WEIGHT of the way
# (in log terms): warm estimates converge on what runs show (issue 14: within 10% warm)
# without one odd run (a busy moment: up to ~2x on a shared 2-core machine) taking over.
# Was: replaced beyond 2x, else kept, so a 1.3x error stayed for ever. Judgements.
REFRESH_RATIO = 2.0
REFRESH_MIN = 0.05
REFRESH_WEIGHT = 0.5
# Features.worker_ratio outside this is not a measurement (a tampered file): unknown.
WORKER_RATIO_BOUNDS = (0.05, 20.0)
# observe(defer=True): observations of quick maps wait at most this long to be written
# (with the next write of this process, or at its exit, if sooner).
DEFER_FLUSH_S = 1.0
# A few KB per entry with its history: the default cap keeps the file near 20 MB.
DEFAULT_MAX_ENTRIES = 10_000
DEFAULT_EXPIRE_DAYS = 30.0
# How long a call waits for another process's write lock before going on without the
# cache. A write is one small transaction (~40 µs on the 2-core development machine);
# 8 processes writing 300 times each, flat out, waited at most 0.18 s there. Long
# enough for that, short enough that a stuck lock costs a map little.
BUSY_TIMEOUT_S = 0.5


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
    runs: tuple[RunRecord, ...] = ()  # oldest first, the last HISTORY
    hits: int = 0
    fingerprint: str = ""
    machine: str = ""
    created_at: float = 0.0  # time.time() of the first write
    updated_at: float = 0.0  # of the last write
    used_at: float = 0.0  # of the last hit or write: the LRU and expiry clock


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
    # Blank is unset, as for every other variable of ours: " " made a directory named
    # " " in the current one, a cache of its own in each directory a program ran in.
    raw = os.environ.get(ENV_DIR)
    configured = raw if raw is not None and raw.strip() else None
    key = (configured, None if configured else os.environ.get("XDG_CACHE_HOME"))
    found = _paths.get(key)
    if found is None:
        # "~/cache" as written in an env file or a unit (quoted: no shell expanded it)
        # made a directory named "~" in the current one.
        base = (os.path.expanduser(configured) if configured is not None
                else default_dir())
        found = _paths[key] = os.path.join(os.path.abspath(base), FILENAME)
    return found


def machine_id() -> str:
    """A stable id for this host and its CPU configuration: entries and calibration
    measured elsewhere (a shared home directory) are not used here."""
    global _machine
    if _machine is None:
        # os.uname() gives platform's three strings in one call (~1 µs against ~13 µs
        # for platform's first calls, in a fresh process's first map).
        u = (os.uname() if hasattr(os, "uname")
             else (platform.system(), platform.node(), "", "", platform.machine()))
        parts = (u[1], u[0], u[4], str(os.cpu_count()),
                 sys.implementation.name, "{}.{}".format(*sys.version_info[:2]))
        _machine = hashlib.sha256("|".join(parts).encode()).hexdigest()[:16]
    return _machine


def _env_number(name: str, default: float, cast: Callable[[str], float], what: str) -> float:
    """A positive limit from the environment, the default where it is unset or empty; a
    ValueError naming the variable for anything else (checked before a map's first item,
    api.py). (A bad value fell back to the default silently: ..._MAX_ENTRIES=0, meant as
    "keep nothing", kept 10 000 entries.)"""
    raw = os.environ.get(name, "").strip()
    if not raw:
        return default
    try:
        value = cast(raw)
    except ValueError:
        value = math.nan
    if not value > 0 or math.isinf(value):  # nan fails the first test
        msg = f"{name} must be {what}, got {os.environ.get(name)!r} (or unset it)"
        raise ValueError(msg)
    return value


def max_entries() -> int:
    """The size cap (``ADAPTIVE_EXEC_CACHE_MAX_ENTRIES``): beyond it, the least recently
    used entries go."""
    return int(_env_number(ENV_MAX_ENTRIES, DEFAULT_MAX_ENTRIES, int,
                           f"a whole number of entries above 0 (default {DEFAULT_MAX_ENTRIES})"))


def expire_days() -> float:
    """Entries unused this many days are gone (``ADAPTIVE_EXEC_CACHE_EXPIRE_DAYS``)."""
    return _env_number(ENV_EXPIRE_DAYS, DEFAULT_EXPIRE_DAYS, float,
                       f"a number of days above 0 (default {DEFAULT_EXPIRE_DAYS:g})")


def check_env() -> None:
    """A ValueError naming the variable if a cache limit in the environment is not one."""
    max_entries()
    expire_days()


# --- the file, and what this process holds back from it -------------------------------


class _State:
    """Hits not yet written, and the open files, shared by this process's threads."""

    def __init__(self) -> None:
        # Guards the attributes below and _files; held for dict updates only, never
        # across SQLite calls.
        self.lock = threading.Lock()
        self.pid = os.getpid()
        # path -> fingerprint -> [hits, last hit time], not yet written
        self.pending: dict[str, dict[str, list[float]]] = {}
        # path -> (when the first was kept, observations of quick maps not yet written:
        # observe(defer=True))
        self.deferred: dict[str, tuple[float, list[tuple[Any, ...]]]] = {}
        self.hooks = False  # at-fork and at-exit hooks registered


_state = _State()
# path -> its file: path() follows ADAPTIVE_EXEC_CACHE_DIR, which a program may change.
_files: dict[str, SqliteFile] = {}
# Whether this process may write the file, looked up at each open rather than bound
# once: tests/test_lifecycle.py replaces it to play a file system whose access() says
# yes where writes are refused.
_writable = sqlite_file.writable


def _file() -> SqliteFile:
    """The current cache file (``path()``); nothing is opened here."""
    p = path()
    f = _files.get(p)
    if f is None:
        _register_hooks()
        with _state.lock:
            f = _files.get(p)
            if f is None:
                f = _files[p] = SqliteFile(p, schema.SCHEMA, busy_timeout_s=BUSY_TIMEOUT_S,
                                           label="cache", writable=lambda q: _writable(q))
    return f


def _after_fork_in_child() -> None:
    global _state
    old = _state
    _state = _State()  # a fresh lock: the parent's may have been held by another thread
    _state.hooks = old.hooks  # and no pending hits nor deferred observations: the
    # parent writes its own


def _register_hooks() -> None:
    with _state.lock:
        if _state.hooks:
            return
        _state.hooks = True
    if hasattr(os, "register_at_fork"):
        os.register_at_fork(after_in_child=_after_fork_in_child)
    atexit.register(_flush_at_exit)


def _failed(what: str, exc: BaseException) -> None:
    """An error of the cache's own (the file's are answered by SqliteFile): logged, and
    the call answers "nothing cached"."""
    logger.debug("adaptive_exec cache: %s failed (%s)", what, exc, exc_info=True)


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
     cpu_fraction, picklable, threads_cpu, setup_s, wait_share, waits_on, worker_ratio) = row
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
        setup_s=_num(setup_s, hi=1e6),
        wait_share=_num(wait_share, hi=1.0),
        waits_on=waits_on if type(waits_on) is str and waits_on else None,
        worker_ratio=_num(worker_ratio, *WORKER_RATIO_BOUNDS),
    )


def _entry(fp: str, machine: str, row: Any, runs: list[Any]) -> Optional[Entry]:
    n = len(FEATURE_COLUMNS)
    features = _features(row[2:2 + n])
    if features is None:
        return None
    created_at, updated_at, used_at, hits = row[2 + n:]
    records = tuple(RunRecord(*r) for r in runs)  # rows checked by schema.VALID_RUN
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
        f = _file()
        machine = machine_id()
        now = time.time()

        def read_entry(conn: sqlite3.Connection) -> Optional[Entry]:
            # One read transaction: the entry and its history from the same snapshot.
            row = conn.execute(schema.SELECT_ENTRY, (key, machine, _cutoff(now))).fetchone()
            if row is None:
                return None
            runs = conn.execute(schema.SELECT_RUNS, (key, machine)).fetchall()
            entry = _entry(key, machine, row, runs)
            if entry is None:
                logger.debug("adaptive_exec cache: entry %s is invalid: a miss", key)
            return entry

        entry = f.read(read_entry)  # a miss creates no file: observe() will
        if entry is None:
            return None
        if f.read_only:  # never written: counting would only grow memory
            return dataclasses.replace(entry, used_at=now)
        with _state.lock:
            pending = _state.pending.setdefault(f.path, {}).setdefault(key, [0, 0.0])
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
    observed_setup_s: Optional[float] = None,
    defer: bool = False,
    observed_cv: Optional[float] = None,
    observed_worker_ratio: Optional[float] = None,
) -> bool:
    """After a run (or a plan): keep what sampling measured, correct the per-item time
    when the run saw something else (beyond REFRESH_MIN), keep a one-time set-up the
    workers showed (``observed_setup_s``) and the spread of item costs they showed when
    sampling could not tell it (``observed_cv``: one sampled call, whose spread the plan
    would otherwise guess), how much longer an item of a function that runs threads
    of its own takes in a worker (``observed_worker_ratio``, learnt as the per-item
    time is),
    and add the run's record. True when it was written (False: nothing to write, the
    cache was unavailable, or ``defer``red).

    ``defer`` (a quick map of a remembered function, ``sampled`` None): kept in memory
    and written with this process's next write, at exit, or once DEFER_FLUSH_S have
    passed since the first kept: a write (~0.4 ms) was 3-4% of a 12 ms map repeated in
    a loop, and one transaction then writes several."""
    try:
        if defer and sampled is None:
            f = _file()
            now = time.monotonic()
            with _state.lock:
                since, kept = _state.deferred.setdefault(f.path, (now, []))
                kept.append((key, module, qualname, observed_item_s, run, observed_setup_s,
                             observed_cv, observed_worker_ratio))
            if now - since < DEFER_FLUSH_S:
                return False
            return bool(_write_with_hits(lambda conn: True))
        wrote = _write_with_hits(lambda conn: _observe(conn, key, module, qualname, sampled,
                                                       observed_item_s, run,
                                                       observed_setup_s, observed_cv,
                                                       observed_worker_ratio))
        return bool(wrote)
    except Exception as exc:
        _failed("observe", exc)
        return False


def _observe(
    conn: sqlite3.Connection, key: str, module: str, qualname: str,
    sampled: Optional[Features], observed_item_s: Optional[float], run: Optional[RunRecord],
    observed_setup_s: Optional[float] = None, observed_cv: Optional[float] = None,
    observed_worker_ratio: Optional[float] = None,
) -> bool:
    """Inside a write transaction."""
    machine = machine_id()
    now = time.time()
    row = conn.execute(
        f"SELECT {', '.join(FEATURE_COLUMNS)} FROM entries "
        "WHERE fingerprint = ? AND machine = ?", (key, machine)).fetchone()
    features = sampled if sampled is not None else (_features(row) if row else None)
    if features is None:
        return False
    if observed_item_s is not None and observed_item_s > 0:
        features = dataclasses.replace(
            features, mean_s=_refreshed(features.mean_s, observed_item_s))
    if observed_worker_ratio is not None and observed_worker_ratio > 0:
        low, high = WORKER_RATIO_BOUNDS
        features = dataclasses.replace(features, worker_ratio=min(high, max(low, _refreshed(
            features.worker_ratio or 0.0, observed_worker_ratio))))
    if observed_setup_s is not None and observed_setup_s > 0:
        features = dataclasses.replace(features, setup_s=observed_setup_s)
    if observed_cv is not None and features.coefficient_of_variation is None:
        features = dataclasses.replace(features, coefficient_of_variation=observed_cv)
    values = tuple(getattr(features, c) for c in FEATURE_COLUMNS)
    if row is None:
        conn.execute(schema.INSERT_ENTRY,
                     (key, machine, module, qualname, *values, now, now, now, 0))
    else:
        conn.execute(schema.UPDATE_ENTRY, (module, qualname, *values, now, now, key, machine))
    if run is not None:
        conn.execute(schema.INSERT_RUN, (key, machine, run.n_items, run.mode, run.n_workers,
                                   run.chunksize, run.estimated_s, run.actual_s, now))
        conn.execute(schema.TRIM_RUNS, (key, machine, key, machine, HISTORY))
    if row is None:
        _prune(conn, now)
    return True


def _refreshed(remembered: float, observed: float) -> float:
    """A remembered per-item time (or ratio of them) after a run that saw ``observed``."""
    # (No time at all: nothing remembered yet, or an entry an earlier version stored for
    # a map that measured nothing. The run's time replaces it.)
    ratio = observed / remembered if remembered > 0 else math.inf
    if ratio > REFRESH_RATIO or ratio < 1 / REFRESH_RATIO:
        return observed  # the work changed (other inputs): what the run saw replaces it
    if ratio > 1 + REFRESH_MIN or ratio < 1 / (1 + REFRESH_MIN):
        # Half way, in ratio, towards what the run saw: a few runs that agree converge
        # (1.33x off: 1.15x, 1.07x, 1.04x), one odd run (a busy moment) moves it only
        # part of the way.
        return remembered * ratio ** REFRESH_WEIGHT
    return remembered


def _write_with_hits(fn: Callable[[sqlite3.Connection], _T], create: bool = True
                     ) -> Optional[_T]:
    """``fn`` in one write transaction with this process's pending hits, which wait for
    the next write when this one writes nothing (None: locked, read-only, absent)."""
    f = _file()
    with _state.lock:
        pending = _state.pending.pop(f.path, {})
        _, deferred = _state.deferred.pop(f.path, (0.0, []))

    def write(conn: sqlite3.Connection) -> _T:
        conn.executemany(
            "UPDATE entries SET hits = hits + ?, used_at = max(used_at, ?) "
            "WHERE fingerprint = ? AND machine = ?",
            [(int(h), used, key, machine_id()) for key, (h, used) in pending.items()])
        for key, module, qualname, observed_item_s, run, setup_s, cv, in_worker in deferred:
            _observe(conn, key, module, qualname, None, observed_item_s, run, setup_s, cv,
                     in_worker)
        return fn(conn)

    wrote = None
    try:
        wrote = f.write(write, create=create)
    finally:
        if wrote is None and deferred:
            # Not written (locked, read-only): dropped, as an observation that could
            # not be written at once is (it is a cache; kept, they would pile up).
            logger.debug("adaptive_exec cache: %d deferred observations dropped",
                         len(deferred))
        if wrote is None and pending:  # also on an error of ours: nothing was committed
            with _state.lock:
                now = _state.pending.setdefault(f.path, {})
                for key, (h, used) in pending.items():
                    slot = now.setdefault(key, [0, 0.0])
                    slot[0] += h
                    slot[1] = max(slot[1], used)
    return wrote


def _flush_pending() -> None:
    p = path()
    if _state.pending.get(p) or _state.deferred.get(p):
        _write_with_hits(lambda conn: True, create=False)


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
    key = machine or machine_id()
    return load_calibrations([key]).get(key)


def load_calibrations(machines: Sequence[str]) -> dict[str, Calibration]:
    """The constants stored under each of ``machines`` that has valid ones, read in one
    transaction (a fresh process's first map reads three rows: one read, not three)."""
    try:
        def read_calibrations(conn: sqlite3.Connection) -> Any:
            return conn.execute(
                f"SELECT machine, {', '.join(schema.CALIBRATION_COLUMNS)} FROM calibration "
                f"WHERE machine IN ({', '.join('?' * len(machines))})",
                tuple(machines)).fetchall()

        out = {}
        for machine, *row in _file().read(read_calibrations) or ():
            startup, overhead, byte_cost = _num(row[0]), _num(row[1]), _num(row[2])
            n_workers = _int(row[3], lo=1)
            if startup is None or not overhead or not byte_cost or n_workers is None:
                logger.debug("adaptive_exec cache: stored calibration is invalid: ignored")
                continue
            source = row[4] if type(row[4]) is str and row[4] else "measured earlier (cache)"
            out[machine] = Calibration(startup, overhead, byte_cost, n_workers, source)
        return out
    except Exception as exc:
        _failed("load_calibration", exc)
        return {}


def store_calibration(calib: Calibration, machine: Optional[str] = None) -> bool:
    try:
        def write_calibration(conn: sqlite3.Connection) -> bool:
            conn.execute(
                "INSERT OR REPLACE INTO calibration (machine, "
                f"{', '.join(schema.CALIBRATION_COLUMNS)}, updated_at) "
                "VALUES (?, ?, ?, ?, ?, ?, ?)",
                (machine or machine_id(), calib.worker_startup_s, calib.task_overhead_s,
                 calib.byte_cost_s, calib.n_workers, calib.source, time.time()))
            return True

        return _file().write(write_calibration) is not None
    except Exception as exc:
        _failed("store_calibration", exc)
        return False


def clear() -> Optional[int]:
    """Remove every entry, run and calibration from the current cache file (all
    machines). Returns the number of entries removed (0 where there is no file; it
    creates none), or None when the file is there but could not be cleared: locked by
    another process past the busy timeout, read-only, unusable. (It returned 0 then,
    and ``cache clear`` said "cleared 0 entries" with the entries still there.)"""
    try:
        f = _file()
        with _state.lock:
            _state.pending.pop(f.path, None)

        def delete_all(conn: sqlite3.Connection) -> int:
            n: int = conn.execute("SELECT count(*) FROM entries").fetchone()[0]
            for table in ("runs", "entries", "calibration"):
                conn.execute(f"DELETE FROM {table}")
            return n

        n = f.write(delete_all, create=False)
        if n is None and os.path.exists(f.path):
            return None
        return n or 0
    except Exception as exc:
        _failed("clear", exc)
        return None


def prune() -> int:
    """Apply expiry and the size cap now; the number of entries removed."""
    try:
        return _file().write(lambda conn: _prune(conn, time.time()), create=False) or 0
    except Exception as exc:
        _failed("prune", exc)
        return 0


def close() -> None:
    """Write pending hits, close this thread's connection, and forget what this process
    learnt about cache files (off, read-only, warnings given); other threads reopen on
    next use. For tests, and for programs that change ADAPTIVE_EXEC_CACHE_DIR while
    running."""
    try:
        _flush_pending()
    except Exception as exc:
        _failed("close", exc)
    with _state.lock:
        files = list(_files.values())
        _files.clear()
        _state.pending.clear()
    for f in files:
        f.close()


# --- the whole file, for reading (cache_views prints it) ------------------------------


def list_entries() -> list[Entry]:
    """Every unexpired entry, all machines, most recently used first."""

    def read_all(conn: sqlite3.Connection) -> list[Entry]:
        rows = conn.execute(
            f"SELECT fingerprint, machine, {', '.join(schema.ENTRY_COLUMNS)} FROM entries "
            "WHERE used_at >= ? ORDER BY used_at DESC", (_cutoff(time.time()),)).fetchall()
        runs: dict[tuple[str, str], list[Any]] = {}
        for r in conn.execute(f"SELECT fingerprint, machine, {', '.join(schema.RUN_COLUMNS)} "
                              f"FROM runs WHERE {schema.VALID_RUN} ORDER BY id"):
            runs.setdefault((r[0], r[1]), []).append(r[2:])
        entries = (_entry(_text(r[0]), _text(r[1]), r[2:], runs.get((r[0], r[1]), []))
                   for r in rows)
        return [e for e in entries if e is not None]

    return _file().read(read_all) or []


def status() -> str:
    """The file's state in sqlite_file's words: ok, read-only (why), off: why, ..."""
    return _file().status()


def writes() -> bool:
    """Whether what a map learns would be written: the file is usable and writable
    here, or not made yet."""
    state = status()
    return state == "ok" or state.startswith("no ")


def counts() -> Optional[dict[str, Any]]:
    """What the file holds, counted in one read; None when it cannot be read."""
    f = _file()
    p, machine = f.path, machine_id()

    def read_counts(conn: sqlite3.Connection) -> dict[str, Any]:
        q = conn.execute
        n, mine, hits, oldest, newest = q(
            "SELECT count(*), sum(machine = ?), sum(hits), min(used_at), max(used_at) "
            "FROM entries", (machine,)).fetchone()
        return {
            "schema_version": sqlite_file.stored_version(conn),
            "size_bytes": sum(os.path.getsize(x) for x in (p, p + "-wal") if os.path.exists(x)),
            "entries": n, "entries_this_machine": mine or 0, "hits": hits or 0,
            "oldest_used_at": oldest, "newest_used_at": newest,
            "expired": q("SELECT count(*) FROM entries WHERE used_at < ?",
                         (_cutoff(time.time()),)).fetchone()[0],
            "runs": q("SELECT count(*) FROM runs").fetchone()[0],
        }

    return f.read(read_counts)
