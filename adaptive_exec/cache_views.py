"""The cache as people read it: what ``python -m adaptive_exec cache list|show|stats``
prints, and finding an entry by name or fingerprint prefix.

Everything here comes from ``cache``'s own answers (``list_entries``, ``counts``,
``status``, ``load_calibration``); nothing here opens the file or writes to it. The
printers raise on a cache they cannot read: the command line reports that.
"""

from __future__ import annotations

import os
import sys
import time
from typing import Any

from . import cache, cache_schema, planner
from .cache import Entry
from .planner import fmt_s


def find(query: str) -> list[Entry]:
    """Entries whose fingerprint starts with ``query``, or whose name is ``query``
    (``qualname``, ``module.qualname``, ``module:qualname`` or the last name part)."""
    q = query.strip()
    out = []
    for e in cache.list_entries():
        names = {e.qualname, f"{e.module}.{e.qualname}", f"{e.module}:{e.qualname}",
                 e.qualname.rsplit(".", 1)[-1]}
        if q in names or (len(q) >= 4 and e.fingerprint.startswith(q.lower())):
            out.append(e)
    return out


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
    return out


def _when(t: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(t)) if t else "-"


def print_stats() -> int:
    """``cache stats``: one line per fact, times as local dates. The exit status."""
    for key, value in stats().items():
        if key.endswith("_at") and isinstance(value, float):
            value = _when(value)
        print(f"{key + ':':22} {value}")
    return 0


def print_list() -> int:
    """``cache list``: one line per entry, most recently used first. The exit status."""
    here = cache.machine_id()
    entries = cache.list_entries()
    if not entries:
        print(f"the cache is empty ({cache.path()})")
        return 0
    print(f"{'fingerprint':12}  {'hits':>6}  {'runs':>4}  {'per item':>9}  "
          f"{'last used':19}  function")
    for e in entries:
        other = "" if e.machine == here else f"  (machine {e.machine})"
        print(f"{e.fingerprint[:12]:12}  {e.hits:>6}  {len(e.runs):>4}  "
              f"{fmt_s(e.features.mean_s):>9}  {_when(e.used_at):19}  "
              f"{e.module}:{e.qualname}{other}")
    print(f"{len(entries)} entries in {cache.path()}")
    return 0


def print_show(query: str) -> int:
    """``cache show QUERY``: every column and the run history of each entry ``find``
    finds. The exit status: 1 when none matches."""
    here = cache.machine_id()
    found = find(query)
    if not found:
        print(f"no cache entry matches {query!r} (see: cache list)", file=sys.stderr)
        return 1
    for e in found:
        mine = " (this machine)" if e.machine == here else " (another machine)"
        rows: list[tuple[str, object]] = [
            ("fingerprint", e.fingerprint), ("machine", e.machine + mine),
            ("module", e.module), ("qualname", e.qualname),
        ]
        rows += [(name, getattr(e.features, name)) for name in cache_schema.FEATURE_COLUMNS]
        rows += [("created_at", _when(e.created_at)), ("updated_at", _when(e.updated_at)),
                 ("used_at", _when(e.used_at)), ("hits", e.hits),
                 ("parallel_correction", f"{planner.parallel_correction(e.runs):.3f}")]
        print(f"== {e.module}:{e.qualname}")
        for name, value in rows:
            note = " (per item: " + fmt_s(e.features.mean_s) + ")" if name == "mean_s" else ""
            print(f"  {name:26} {value}{note}")
        print(f"  run history ({len(e.runs)}, oldest first):")
        if e.runs:
            print(f"    {'at':19}  {'items':>8}  {'mode':8}  {'workers':>7}  "
                  f"{'chunksize':>9}  {'estimated_s':>11}  {'actual_s':>9}  actual/estimated")
        for r in e.runs:
            ratio = f"{r.actual_s / r.estimated_s:.2f}" if r.estimated_s > 0 else "-"
            print(f"    {_when(r.at):19}  {r.n_items:>8}  {r.mode:8}  {r.n_workers:>7}  "
                  f"{r.chunksize:>9}  {r.estimated_s:>11.4g}  {r.actual_s:>9.4g}  {ratio}")
    return 0
