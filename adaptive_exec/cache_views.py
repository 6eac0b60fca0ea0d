"""The cache as people read it: what ``adaptive-exec cache list|show|stats`` prints
(aligned "label: value" lines, or ``--json`` for scripts), and finding an entry by name
or fingerprint prefix.

Everything here comes from ``cache``'s own answers (``list_entries``, ``counts``,
``status``, ``load_calibration``); nothing here opens the file or writes to it. The
printers raise on a cache they cannot read: the command line reports that.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import os
import sys
import time
from typing import Any, Callable, Optional

from . import cache, cache_schema, planner
from .cache import Entry
from .records import fmt_bytes, fmt_s

# Past this many candidates, ``cache show`` lists the first ones and counts the rest.
MAX_CANDIDATES = 10
# How many known names ``cache show`` suggests when nothing matches.
MAX_SUGGESTIONS = 5
# A fingerprint prefix this short would match most words typed as names ("add", "bfs").
MIN_FINGERPRINT_PREFIX = 4


def _names(e: Entry) -> tuple[str, ...]:
    """What a person may call the entry's function by."""
    return (e.qualname, f"{e.module}.{e.qualname}", f"{e.module}:{e.qualname}",
            e.qualname.rsplit(".", 1)[-1])


def find(query: str) -> list[Entry]:
    """Entries that ``query`` names: exactly (``qualname``, ``module.qualname``,
    ``module:qualname``, the last name part, or the whole fingerprint) if any entry is so
    named, else those with a name or fingerprint that ``query`` begins. An exact name
    wins, so that ``square`` still means ``square`` once ``square_root`` is cached too."""
    q = query.strip()
    if not q:
        return []
    entries = cache.list_entries()
    fp = q.lower()
    exact = [e for e in entries if q in _names(e) or e.fingerprint == fp]
    if exact:
        return exact
    return [e for e in entries
            if any(n.startswith(q) for n in _names(e))
            or (len(q) >= MIN_FINGERPRINT_PREFIX and e.fingerprint.startswith(fp))]


def stats() -> dict[str, Any]:
    """What the cache file holds, and how it is configured."""
    p = cache.path()
    out: dict[str, Any] = {
        "path": p, "machine": cache.machine_id(), "max_entries": cache.max_entries(),
        "expire_days": cache.expire_days(), "exists": os.path.exists(p),
    }
    out["status"] = cache.status()
    counts = cache.counts()
    if counts is None:
        if out["status"] == "ok" or out["status"].startswith("read-only"):
            out["status"] = "unavailable (locked or unreadable)"
        return out
    out.update(counts)
    calib = cache.load_calibration()
    out["calibration"] = calib.to_dict() if calib is not None else None
    # Each start path's measured start-up, kept beside it (calibration.save).
    from . import calibration
    from .backends import starts

    startups = {}
    for path in (starts.FORK, starts.TEMPLATE):
        row = cache.load_calibration(calibration._path_key(path))
        if row is not None:
            startups[path] = {"worker_startup_s": row.worker_startup_s,
                              "n_workers": row.n_workers}
    out["startup_by_path"] = startups
    return out


# --- for people: values in their units, "label: value" lines --------------------------

def _when(t: Optional[float]) -> str:
    """A local date to the minute (seconds would only make the columns wider)."""
    return time.strftime("%Y-%m-%d %H:%M", time.localtime(t)) if t else "-"


def _yes_no(value: object) -> str:
    return "yes" if value else "no"


def _count(n: Optional[int]) -> str:
    return "-" if n is None else f"{n:,}"


def print_rows(rows: list[tuple[str, str]]) -> None:
    """``label: value`` lines with the values in one column; a label's leading spaces
    make it a detail of the row above, an empty value a heading."""
    width = max((len(label) for label, _ in rows), default=0) + 2
    for label, value in rows:
        print(f"{label + ':':{width}}{value}".rstrip())


def calibration_rows(c: dict[str, Any], indent: str = "") -> list[tuple[str, str]]:
    """A calibration (``Calibration.to_dict()``) as rows; the per-byte cost with the
    throughput it amounts to."""
    b = c["byte_cost_s"]
    per_byte = f"{fmt_s(b)} ({fmt_bytes(1 / b)}/s)" if b > 0 else "-"
    return [
        (f"{indent}worker start-up", f"{fmt_s(c['worker_startup_s'])} for "
                                     f"{c['n_workers']} workers"),
        (f"{indent}per-task overhead", fmt_s(c["task_overhead_s"])),
        (f"{indent}per-byte cost", per_byte),
        (f"{indent}start path", str(c.get("start_path", "-"))),
        (f"{indent}source", str(c["source"])),
    ]


def _stats_rows(s: dict[str, Any]) -> list[tuple[str, str]]:
    rows = [("file", s["path"]), ("exists", _yes_no(s["exists"])), ("status", s["status"])]
    if "entries" in s:  # else the file could not be read: only its configuration is known
        rows += [
            ("schema version", str(s["schema_version"])),
            ("size", fmt_bytes(s["size_bytes"])),
            ("entries", _count(s["entries"])),
            ("  of this machine", _count(s["entries_this_machine"])),
            ("  expired", _count(s["expired"])),
            ("runs recorded", _count(s["runs"])),
            ("hits", _count(s["hits"])),
            ("least recently used", _when(s["oldest_used_at"])),
            ("most recently used", _when(s["newest_used_at"])),
        ]
    rows += [("max entries", _count(s["max_entries"])),
             ("expire after", f"{s['expire_days']:g} days unused"),
             ("machine", s["machine"])]
    if "calibration" in s:
        calib = s["calibration"]
        rows.append(("calibration", "stored" if calib else "none stored for this machine"))
        rows += calibration_rows(calib, indent="  ") if calib else []
        for path, row in (s.get("startup_by_path") or {}).items():
            rows.append((f"  start-up ({path} path)",
                         f"{fmt_s(row['worker_startup_s'])} for {row['n_workers']} workers, "
                         "measured"))
    return rows


def print_stats(as_json: bool = False) -> int:
    """``cache stats``: one line per fact for people, or ``stats()`` as JSON (times as
    ``time.time()`` seconds, sizes in bytes). The exit status."""
    s = stats()
    if as_json:
        print(json.dumps(s, indent=2))
    else:
        print_rows(_stats_rows(s))
    return 0


def print_list() -> int:
    """``cache list``: one line per entry, most recently used first. The exit status."""
    here = cache.machine_id()
    entries = cache.list_entries()
    if not entries:
        why = _unreadable()  # (a file that cannot be read is not an empty cache)
        if why is not None:
            raise OSError(why)  # the command line's "cannot read the cache" (exit status 1)
        print(f"the cache is empty ({cache.path()})")
        return 0
    print(f"{'fingerprint':12}  {'hits':>6}  {'runs':>4}  {'per item':>9}  "
          f"{'last used':16}  function")
    for e in entries:
        other = "" if e.machine == here else f"  (machine {e.machine})"
        print(f"{e.fingerprint[:12]:12}  {e.hits:>6}  {len(e.runs):>4}  "
              f"{fmt_s(e.features.mean_s):>9}  {_when(e.used_at):16}  "
              f"{e.module}:{e.qualname}{other}")
    print(f"{len(entries)} entries in {cache.path()}")
    return 0


# How ``cache show`` writes each feature column: its label, and its value for people
# (None, a measurement that could not be taken, is "-"). A column missing here is shown
# under its own name, as stored.
_FEATURES: dict[str, tuple[str, Callable[[Any], str]]] = {
    "mean_s": ("time per item", fmt_s),
    "coefficient_of_variation": ("variation (CV)", lambda v: f"{v:.2f}"),
    "input_pickle_size": ("item size, pickled", fmt_bytes),
    "pickle_size": ("result size, pickled", fmt_bytes),
    "peak_memory": ("peak memory per call", fmt_bytes),
    "function_complexity": ("bytecode size", fmt_bytes),
    "n_samples": ("calls sampled", _count),
    "cpu_fraction": ("CPU while sampled", lambda v: f"{v:.0%} of wall time"),
    "threads_cpu": ("other threads' CPU", lambda v: f"{v:.2f} cores"),
    "worker_ratio": ("an item's time in a worker", lambda v: f"x{v:.2f} of here"),
    "picklable": ("picklable", _yes_no),
}


def _feature_rows(e: Entry) -> list[tuple[str, str]]:
    rows = []
    for column in cache_schema.FEATURE_COLUMNS:
        label, fmt = _FEATURES.get(column, (column, str))
        value = getattr(e.features, column)
        rows.append((f"  {label}", "-" if value is None else fmt(value)))
    return rows


def _print_entry(e: Entry, here: str) -> None:
    mine = " (this machine)" if e.machine == here else " (another machine)"
    print(f"== {e.module}:{e.qualname}")
    print_rows([
        ("  fingerprint", e.fingerprint), ("  machine", e.machine + mine),
        ("  module", e.module), ("  function", e.qualname),
        *_feature_rows(e),
        ("  first measured", _when(e.created_at)), ("  last measured", _when(e.updated_at)),
        ("  last used", _when(e.used_at)), ("  hits", _count(e.hits)),
        ("  parallel correction", f"{planner.parallel_correction(e.runs):.2f}x"),
    ])
    print(f"  run history ({len(e.runs)}, oldest first):")
    if e.runs:
        print(f"    {'at':16}  {'items':>8}  {'mode':11}  {'workers':>7}  "
              f"{'chunksize':>9}  {'estimated':>9}  {'actual':>9}  actual/estimated")
    for r in e.runs:
        ratio = f"{r.actual_s / r.estimated_s:.2f}" if r.estimated_s > 0 else "-"
        print(f"    {_when(r.at):16}  {r.n_items:>8}  {r.mode:11}  {r.n_workers:>7}  "
              f"{r.chunksize:>9}  {fmt_s(r.estimated_s):>9}  {fmt_s(r.actual_s):>9}  {ratio}")


def _entry_json(e: Entry, here: str) -> dict[str, Any]:
    """An entry as stored (times as ``time.time()`` seconds, sizes in bytes), with what
    ``cache show`` works out from it."""
    out = dataclasses.asdict(e)
    out["this_machine"] = e.machine == here
    out["parallel_correction"] = planner.parallel_correction(e.runs)
    return out


def _unreadable() -> Optional[str]:
    """Why the cache file cannot be read now, or None (read, or there is no file):
    ``list_entries`` answers [] either way, and finding nothing in a file that cannot be
    read is not the user's mistake."""
    if not os.path.exists(cache.path()) or cache.counts() is not None:
        return None
    return cache.status()


def _no_match(query: str) -> int:
    why = _unreadable()
    if why is not None:
        raise OSError(why)  # the command line's "cannot read the cache" (exit status 1)
    entries = cache.list_entries()
    if not entries:
        print(f"no cache entry matches {query!r}: the cache is empty ({cache.path()})",
              file=sys.stderr)
        return 2
    known = list(dict.fromkeys(e.qualname for e in entries))  # most recently used first
    close = difflib.get_close_matches(query, known, n=MAX_SUGGESTIONS)
    names = close or known[:MAX_SUGGESTIONS]
    more = "" if close or len(known) <= MAX_SUGGESTIONS else ", ..."
    print(f"no cache entry matches {query!r}; {'similar' if close else 'known'} names: "
          f"{', '.join(names)}{more} (all of them: adaptive-exec cache list)", file=sys.stderr)
    return 2


def _ambiguous(query: str, found: list[Entry]) -> int:
    functions = list({e.fingerprint: e for e in found}.values())
    print(f"{query!r} matches {len(functions)} cached functions; give a longer name or "
          f"the fingerprint:", file=sys.stderr)
    width = max(len(e.module) for e in functions[:MAX_CANDIDATES])
    print(f"  {'fingerprint':12}  {'module':{width}}  function", file=sys.stderr)
    for e in functions[:MAX_CANDIDATES]:
        print(f"  {e.fingerprint[:12]:12}  {e.module:{width}}  {e.qualname}", file=sys.stderr)
    if len(functions) > MAX_CANDIDATES:
        print(f"  ... and {len(functions) - MAX_CANDIDATES} more", file=sys.stderr)
    return 2


def print_show(query: str, as_json: bool = False) -> int:
    """``cache show QUERY``: every column and the run history of the function ``find``
    finds (one entry per machine it was measured on), or with ``as_json`` those entries
    as a JSON list. The exit status: 2 when no function or several match (they are
    listed); raises when the file cannot be read."""
    here = cache.machine_id()
    found = find(query)
    if not found:
        return _no_match(query)
    # One function measured on several machines (a shared home directory) has one
    # fingerprint and several entries: that is still one answer.
    if len({e.fingerprint for e in found}) > 1:
        return _ambiguous(query, found)
    if as_json:
        print(json.dumps([_entry_json(e, here) for e in found], indent=2))
        return 0
    for e in found:
        _print_entry(e, here)
    return 0
