"""One measurement, in a fresh process: ``python -m benchmarks._child SPEC.json``.

The spec names a workload and a runner; the child builds the items, imports what the
runner needs, times only the runner's map (pool start-up and teardown included), checks
the results against the loop's, and writes one JSON object to the spec's ``out`` path.
Anything that goes wrong is written there too; a child that dies or hangs writes nothing,
and the harness reports FAIL or TIMEOUT.  A peer that is not installed (its own import
raises ModuleNotFoundError naming it) is reported as ``n/a`` with what to pip install.
"""

from __future__ import annotations

import gc
import json
import os
import signal
import sys
import threading
import time
import traceback
from typing import Any, Callable, Dict


def measure(spec: Dict[str, Any]) -> Dict[str, Any]:
    from benchmarks import runners, workloads

    workload = workloads.get(spec["workload"])
    items = workload.make_items(spec["n_items"])
    try:
        task = workload.load_task()
        go, details = runners.prepare(task, items, spec)
    except ModuleNotFoundError as exc:
        # The peer (or the workload's library) itself is absent: not a failure, not a
        # time. Anything else, a missing dependency of an installed peer included, is.
        missing = runners.missing_from_error(
            exc, runners.needed_modules(spec["runner"], spec["workload"]))
        if not missing:
            raise
        return runners.not_installed_outcome(missing)
    gc.collect()  # garbage from building the items is not the runner's to collect
    if spec.get("threaded"):
        # A caller that runs a thread of its own (a GUI's, a server's), parked meanwhile.
        threading.Thread(target=threading.Event().wait, name="caller's own",
                         daemon=True).start()
    watchdog = _Watchdog(spec["limit_s"], lambda: _write(spec["out"], {
        "status": "TIMEOUT", "seconds": None,
        "message": f"no result within {spec['limit_s']:.0f} s"}))
    start = time.perf_counter()
    try:
        results = go()
    except BaseException as exc:  # noqa: BLE001 - a crash is a result (FAIL), not an abort
        watchdog.stop()
        return {"status": "FAIL", "seconds": time.perf_counter() - start,
                "message": f"{type(exc).__name__}: {exc}",
                "traceback": traceback.format_exc()}
    seconds = time.perf_counter() - start
    watchdog.stop()
    outcome: Dict[str, Any] = {"seconds": seconds}
    try:
        outcome["details"] = details()
    except Exception as exc:  # noqa: BLE001 - a missing report is not a wrong result
        outcome["details"] = {"error": f"{type(exc).__name__}: {exc}"}
    problem = workload.check(items, results)
    outcome["status"] = "ok" if problem is None else "WRONG"
    if problem is not None:
        outcome["message"] = problem
    return outcome


class _Watchdog:
    """Ends the process when the timed part runs past its limit.  The limit counts from
    the start of the map, not from the process's start (imports vary by runner); the
    harness kills this process's group afterwards, pool workers included.

    A SIGALRM timer, not a thread: a thread would make every measured caller a threaded
    one, and adaptive_exec starts the workers of a threaded caller differently (see
    adaptive_exec/backends/starts.py). The ``@threaded`` scenarios add a thread on
    purpose (``spec["threaded"]``)."""

    def __init__(self, limit_s: float, on_timeout: Callable[[], None]) -> None:
        self._on_timeout = on_timeout
        self._old = signal.signal(signal.SIGALRM, self._fire)
        signal.setitimer(signal.ITIMER_REAL, limit_s)

    def _fire(self, signum: int, frame: Any) -> None:
        self._on_timeout()
        os._exit(3)

    def stop(self) -> None:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, self._old)


def _write(path: str, outcome: Dict[str, Any]) -> None:
    with open(path, "w") as f:
        json.dump(outcome, f)


def main(argv: list) -> int:
    with open(argv[0]) as f:
        spec = json.load(f)
    try:
        outcome = measure(spec)
    except BaseException as exc:  # noqa: BLE001 - e.g. adaptive_exec not importable
        outcome = {"status": "FAIL", "message": f"{type(exc).__name__}: {exc}",
                   "traceback": traceback.format_exc()}
    _write(spec["out"], outcome)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
