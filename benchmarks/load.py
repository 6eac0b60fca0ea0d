"""Another process keeping one CPU busy: the load of the ``NAME@loaded`` scenarios and of
the reaction-time measurement.

    with BusyCore(max_s=60):
        ...  # measured while one CPU is taken

The busy process is a bare Python loop, in its own session (so its own process group),
that spins until it is killed or ``max_s`` passes, whichever comes first: a harness that
dies cannot leave it burning a core for long.  ``start`` returns once it spins; ``stop``
kills its group and reaps it.  One object is one load: after ``stop``, from any thread,
a late ``start`` (a timer that fires after the measurement ended) starts nothing.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from typing import Any, Optional

# -I -S: no site, no user paths; the interpreter is up in ~10 ms.  The line on stdout
# says that the loop is about to run, so the load starts when start() returns.
_SPIN = (
    "import sys, time\n"
    "end = time.monotonic() + float(sys.argv[1])\n"
    "sys.stdout.write('spinning\\n'); sys.stdout.flush()\n"
    "while time.monotonic() < end:\n"
    "    pass\n"
)


class BusyCore:
    """One CPU kept busy by a separate process, for at most ``max_s`` seconds."""

    def __init__(self, max_s: float) -> None:
        self.max_s = max_s
        self.proc: Optional[subprocess.Popen] = None
        self.started_at: Optional[float] = None  # time.perf_counter() once it spins
        self.stopped_at: Optional[float] = None  # time.perf_counter() once it is gone
        self._lock = threading.Lock()  # start and stop may come from timer threads
        self._done = False

    def start(self) -> Optional[float]:
        """Start the busy process; returns ``time.perf_counter()`` once it spins (None
        when this load was already stopped)."""
        with self._lock:
            if self._done or self.proc is not None:
                return None
            self.proc = subprocess.Popen(
                [sys.executable, "-I", "-S", "-c", _SPIN, str(self.max_s)],
                stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, start_new_session=True,
            )
            assert self.proc.stdout is not None
            self.proc.stdout.readline()  # '' if it died: no load to wait for then
            self.started_at = time.perf_counter()
            return self.started_at

    def stop(self) -> Optional[float]:
        """Kill the busy process's group and reap it; returns ``time.perf_counter()``
        once it is gone (None when nothing was running)."""
        with self._lock:
            self._done = True
            proc, self.proc = self.proc, None
            if proc is None:
                return None
            self._kill(proc)
            self.stopped_at = time.perf_counter()
            return self.stopped_at

    @staticmethod
    def _kill(proc: subprocess.Popen) -> None:
        try:
            # Before the wait: until it is reaped its pid, the group's id, cannot be
            # reused, so this can only hit the process started here.
            os.killpg(proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        proc.wait()
        if proc.stdout is not None:
            proc.stdout.close()

    def __enter__(self) -> BusyCore:
        self.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stop()
