"""The cache file's layout: its tables, columns, version and migrations, and the SQL
that reads and writes them (cache.py is what is stored; sqlite_file.py the file's life).
Changing anything here that SQLite keeps in the file is a new SCHEMA_VERSION with a
migration step."""

from __future__ import annotations

from .sqlite_file import Schema

SCHEMA_VERSION = 6
# Past runs kept per function (the planner uses the last few: planner.HISTORY_USED).
HISTORY = 20

# --- the layout ------------------------------------------------------------------------

# Features fields, stored under their own names (a test checks none is missing).
FEATURE_COLUMNS = (
    "mean_s", "coefficient_of_variation", "pickle_size", "input_pickle_size", "peak_memory",
    "function_complexity", "n_samples", "cpu_fraction", "picklable", "threads_cpu",
    "setup_s", "wait_share", "waits_on", "worker_ratio",
)
ENTRY_COLUMNS = ("module", "qualname", *FEATURE_COLUMNS,
                  "created_at", "updated_at", "used_at", "hits")
RUN_COLUMNS = ("n_items", "mode", "n_workers", "chunksize", "estimated_s", "actual_s", "at")
CALIBRATION_COLUMNS = ("worker_startup_s", "task_overhead_s", "byte_cost_s", "n_workers",
                        "source")

# The runs table as version 2 made it (also what migrating from 1 creates).
V2_RUNS = """CREATE TABLE runs (
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
V2_RUNS_INDEX = "CREATE INDEX runs_key ON runs (fingerprint, machine, id)"

# The current layout, for a new file (meta, which holds the version, is sqlite_file's).
CREATE = (
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
        setup_s REAL,
        wait_share REAL,
        waits_on TEXT,
        worker_ratio REAL,
        created_at REAL NOT NULL,
        updated_at REAL NOT NULL,
        used_at REAL NOT NULL,
        hits INTEGER NOT NULL DEFAULT 0,
        PRIMARY KEY (fingerprint, machine))""",
    "CREATE INDEX entries_used_at ON entries (used_at)",
    V2_RUNS,
    V2_RUNS_INDEX,
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
# a later layout is a new step (and a new CREATE).
MIGRATIONS: dict[int, tuple[str, ...]] = {
    1: (
        "ALTER TABLE entries ADD COLUMN input_pickle_size INTEGER",
        "ALTER TABLE entries ADD COLUMN peak_memory INTEGER",
        "ALTER TABLE entries ADD COLUMN cpu_fraction REAL",
        "ALTER TABLE entries ADD COLUMN picklable INTEGER NOT NULL DEFAULT 1",
        "ALTER TABLE entries ADD COLUMN threads_cpu REAL",
        "ALTER TABLE entries ADD COLUMN used_at REAL NOT NULL DEFAULT 0",
        "UPDATE entries SET used_at = updated_at",
        "CREATE INDEX entries_used_at ON entries (used_at)",
        V2_RUNS,
        V2_RUNS_INDEX,
        "ALTER TABLE calibration ADD COLUMN source TEXT",
    ),
    2: ("ALTER TABLE entries ADD COLUMN setup_s REAL",),
    3: ("ALTER TABLE entries ADD COLUMN wait_share REAL",
        "ALTER TABLE entries ADD COLUMN waits_on TEXT"),
    # Version 5 (05865d1..c69c0bd) kept a worker's per-item time in seconds, a column
    # no longer read; version 6 keeps it as a ratio to the caller's (Features).
    4: ("ALTER TABLE entries ADD COLUMN worker_item_s REAL",),
    5: ("ALTER TABLE entries ADD COLUMN worker_ratio REAL",),
}

SCHEMA = Schema(SCHEMA_VERSION, CREATE, MIGRATIONS)

SELECT_ENTRY = (f"SELECT {', '.join(ENTRY_COLUMNS)} FROM entries "
                 "WHERE fingerprint = ? AND machine = ? AND used_at >= ?")
# Rows of a tampered file that are not plain, sane values are skipped here, in C: a
# lookup reads up to HISTORY of them, and checking each in Python cost ~50 µs per hit.
VALID_RUN = (
    "typeof(n_items) = 'integer' AND n_items >= 0 AND typeof(mode) = 'text' "
    "AND typeof(n_workers) = 'integer' AND n_workers >= 0 "
    "AND typeof(chunksize) = 'integer' AND chunksize >= 0 "
    "AND typeof(estimated_s) = 'real' AND estimated_s BETWEEN 0 AND 1e12 "
    "AND typeof(actual_s) = 'real' AND actual_s BETWEEN 0 AND 1e12 "
    "AND typeof(at) = 'real' AND at BETWEEN 0 AND 1e11"
)
SELECT_RUNS = (f"SELECT {', '.join(RUN_COLUMNS)} FROM runs "
                f"WHERE fingerprint = ? AND machine = ? AND {VALID_RUN} ORDER BY id")
INSERT_ENTRY = (
    f"INSERT INTO entries (fingerprint, machine, {', '.join(ENTRY_COLUMNS)}) "
    f"VALUES ({', '.join('?' * (len(ENTRY_COLUMNS) + 2))})"
)
UPDATE_ENTRY = (
    "UPDATE entries SET module = ?, qualname = ?, "
    + ", ".join(f"{c} = ?" for c in FEATURE_COLUMNS)
    + ", updated_at = ?, used_at = ? WHERE fingerprint = ? AND machine = ?"
)
INSERT_RUN = (f"INSERT INTO runs (fingerprint, machine, {', '.join(RUN_COLUMNS)}) "
               f"VALUES ({', '.join('?' * (len(RUN_COLUMNS) + 2))})")
TRIM_RUNS = (
    "DELETE FROM runs WHERE fingerprint = ? AND machine = ? AND id <= ("
    "SELECT id FROM runs WHERE fingerprint = ? AND machine = ? "
    "ORDER BY id DESC LIMIT 1 OFFSET ?)"
)
