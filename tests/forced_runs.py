"""The fault, lifecycle and correctness suites run again with each start path forced
(``ADAPTIVE_EXEC_START=template``, then ``exec``), in the background from the start of
the session, for tests/test_start_paths.py::
test_the_fault_and_lifecycle_suites_pass_on_each_forced_path, which waits for them at the
end of the session.

Why in the background: run by that test alone, the two runs held the machine for ~250 s
of CI's ~11 min while the rest of the suite waited, and the rest of the suite keeps
about one of CI's two cores busy on its own (a CI run: 12.5 min of wall time, 12 min of
CPU). One run after the other beside the rest of the suite is the standard's own load,
"a test suite passes beside a busy core", for both.

The runner is not a child of pytest's process: it forks itself away from the process
that pytest starts (which exits at once), so that the tests that count this process's
children (the pool's workers, those a test left) never see the suites' processes. It is
the leader of a process group of its own, which ``Runs.stop`` ends; it also ends its
runs by itself when the pytest that started it is gone (killed), so nothing outlives
the session.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time

from adaptive_exec.backends import starts

SUITES = ["tests/test_faults.py", "tests/test_lifecycle.py", "tests/test_correctness.py",
          "tests/test_ported.py", "tests/test_ahead.py",
          "tests/test_start_paths.py::test_a_large_function_crosses_once_per_worker_per_map"]
PATHS = (starts.TEMPLATE, starts.EXEC)


class Runs:
    """The caller's side: where the runs write, and their process group."""

    def __init__(self, folder: str, group: int):
        self.folder = folder
        self.group = group

    def results(self, timeout: float) -> dict[str, tuple[int | None, str]]:
        """Each path's exit status and output; the status is None for a run that had
        not ended within ``timeout`` seconds (then every run is ended)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and not all(
                os.path.exists(self._file(path, "rc")) for path in PATHS):
            time.sleep(0.5)
        out: dict[str, tuple[int | None, str]] = {}
        for path in PATHS:
            try:
                with open(self._file(path, "rc")) as f:
                    rc: int | None = int(f.read())
            except FileNotFoundError:
                rc = None
            try:
                with open(self._file(path, "log"), errors="replace") as f:
                    log = f.read()
            except FileNotFoundError:
                log = "(not started)"
            out[path] = (rc, log)
        if any(rc is None for rc, _ in out.values()):
            self.stop()
        return out

    def stop(self) -> None:
        """End the runner and its runs, if still going, and remove their files."""
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.group, signal.SIGKILL)
        shutil.rmtree(self.folder, ignore_errors=True)

    def _file(self, path: str, kind: str) -> str:
        return os.path.join(self.folder, f"{path}.{kind}")


def start(root: str) -> Runs:
    """Start the runner; returns once it runs on its own (a few ms)."""
    folder = tempfile.mkdtemp(prefix="aex-forced-")
    proc = subprocess.Popen([sys.executable, os.path.abspath(__file__), folder,
                             str(os.getpid()), root], start_new_session=True,
                            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    proc.wait(timeout=60)  # it forked the runner and exited
    return Runs(folder, proc.pid)  # its pid is the group's id (start_new_session)


def _started(pid: int) -> object:
    """What tells this process from a later one given the same pid: its start, in clock
    ticks since boot where Linux says it (/proc/<pid>/stat), else its creation time. Not
    psutil's create_time() alone: it adds the boot time, which Linux derives from the
    wall clock, so a clock set forward moved it later, and a busy-core run's runner took
    the living pytest for a new process, ended its runs and removed their files (the
    session then waited 880 s for results that never came)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return int(f.read().rsplit(")", 1)[1].split()[19])  # field 22, starttime
    except (OSError, ValueError, IndexError):
        import psutil

        return round(psutil.Process(pid).create_time())  # raises NoSuchProcess if gone


def _alive(pid: int, started: object) -> bool:
    import psutil

    try:
        return (_started(pid) == started
                and psutil.Process(pid).status() != psutil.STATUS_ZOMBIE)
    except psutil.NoSuchProcess:
        return False


def _run(folder: str, pytest_pid: int, root: str) -> None:
    import psutil

    try:
        since = _started(pytest_pid)
    except psutil.NoSuchProcess:
        return  # the session is gone already: nothing to run for
    for path in PATHS:
        with open(os.path.join(folder, f"{path}.log"), "w") as out:
            # -B: an interpreter flag, so that loky's own start (exec) runs its workers
            # under the caller's flags (loky.FlaggedContext) here, as the rest of the
            # suite runs them without.
            proc = subprocess.Popen([sys.executable, "-B", "-m", "pytest", "-q", "-p",
                                     "no:cacheprovider", "-x", *SUITES], cwd=root,
                                    stdout=out, stderr=subprocess.STDOUT,
                                    stdin=subprocess.DEVNULL,
                                    env={**os.environ, starts.ENV_START: path})
            while True:
                try:
                    rc = proc.wait(timeout=1.0)
                    break
                except subprocess.TimeoutExpired:
                    if not _alive(pytest_pid, since):  # its session is gone: so are we
                        shutil.rmtree(folder, ignore_errors=True)
                        os.killpg(0, signal.SIGKILL)
        tmp = os.path.join(folder, f"{path}.rc.tmp")
        with open(tmp, "w") as f:
            f.write(str(rc))
        os.replace(tmp, os.path.join(folder, f"{path}.rc"))  # whole, or not there


if __name__ == "__main__":
    if os.fork():  # the process pytest started exits; the runner goes on, not its child
        os._exit(0)
    _run(sys.argv[1], int(sys.argv[2]), sys.argv[3])
