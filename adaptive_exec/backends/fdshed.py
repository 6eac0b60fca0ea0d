"""What a process forked from the caller (a worker, or the template) lets go of among
the descriptors it inherited: those the caller opened for itself, which a worker started
by exec or by the spawned template never had (Python opens every descriptor
close-on-exec).

Without this, a warm pool's forked workers held the caller's copies for as long as they
lived (minutes): a pipe to a child process the caller then closed gave no end of file
(``Popen.communicate()`` waited), a pipe's reader saw no end of file, a listening socket
the caller closed kept its port, and an ``flock`` released by closing its file stayed
held. ``multiprocessing.Pool`` (fork) does the same; its forkserver does not.

Which descriptors a worker needs is what the forkserver and loky's exec start send it:
those its process object pickles (``duplicate_for_child``, collected here by the same
pickling, in the caller before the fork: the numbers are the same in the child), its
"parent alive" pipe, the resource trackers' pipes and stdin/stdout/stderr. Kept too: a
``multiprocessing.Queue`` of the caller's (sharing one by inheritance is what its docs
teach; not a SimpleQueue or Pipe, which register nothing to find them by), and the
descriptors of its standard streams and logging handlers. Of the rest, only those that
cause the harms above are let go: pipes, FIFOs and sockets, and regular files that hold
an ``flock``, each only when close-on-exec (one the
caller made inheritable is meant to be shared). Other files stay: a log file the
caller's ``logging`` has open is still written by its forked workers, as before.

A descriptor let go is not closed but pointed at an ``O_PATH`` descriptor of "/": a
Python object in the worker that still holds the number (the caller's socket) gets
EBADF from it, never another file that reused the number, and can close it.
Linux only (/proc, O_PATH), as forking is (starts.fork_works); elsewhere nothing is done.
"""

from __future__ import annotations

import fcntl
import io
import os
import signal
import stat
from typing import Any, Iterable, Optional

_O_PATH = getattr(os, "O_PATH", 0)


class _Collector:
    """Stands in for a forkserver Popen while the process object is pickled: notes the
    descriptors the child would be sent."""

    def __init__(self) -> None:
        self.fds: list[int] = []

    def duplicate_for_child(self, fd: int) -> int:
        self.fds.append(fd)
        return len(self.fds) - 1

    @staticmethod
    def DupFd(index: int) -> Any:  # noqa: N802 (multiprocessing's name)
        from multiprocessing import popen_forkserver

        return popen_forkserver._DupFd(index)  # type: ignore[attr-defined]


class _Sink(io.RawIOBase):
    def writable(self) -> bool:
        return True

    def write(self, b: Any) -> int:
        return len(b)


def needed_fds(process_obj: Any) -> Optional[set[int]]:
    """In the caller, before forking ``process_obj``: the descriptors its child must
    keep. None when they cannot be told (the child then lets go of nothing)."""
    from multiprocessing import context, reduction

    collector = _Collector()
    context.set_spawning_popen(collector)  # type: ignore[arg-type]
    try:
        reduction.dump(process_obj, _Sink())
    except Exception:  # noqa: BLE001 - an object that would not pickle: keep everything
        return None
    finally:
        context.set_spawning_popen(None)
    return {0, 1, 2, *collector.fds, *shared_by_inheritance()}


def shared_by_inheritance() -> list[int]:
    """What every forked child of the caller keeps: the resource trackers' pipes, the
    caller's multiprocessing queues, the descriptors of its sys.stdin/stdout/stderr
    (``sys.stdout = open(os.dup(1), "w")`` under a pipe: print raised EBADF in workers)
    and of its logging handlers (a SysLogHandler's socket: every record of the workers
    was lost)."""
    return [*_trackers(), *_queues(), *_streams(), *_log_handlers()]


def _fileno(obj: Any) -> Optional[int]:
    try:
        fd = obj.fileno()
    except Exception:  # noqa: BLE001 - no descriptor (a StringIO), or closed
        return None
    return fd if isinstance(fd, int) else None


def _streams() -> list[int]:
    import sys

    names = ("stdin", "stdout", "stderr", "__stdin__", "__stdout__", "__stderr__")
    found = (_fileno(getattr(sys, name, None)) for name in names)
    return [fd for fd in found if fd is not None]


def _log_handlers() -> list[int]:
    """The descriptors of the logging handlers of every logger made so far (a stream's,
    a socket's)."""
    import sys

    logging = sys.modules.get("logging")
    if logging is None:
        return []
    loggers = [logging.getLogger(), *list(logging.Logger.manager.loggerDict.values())]
    fds = []
    for logger in loggers:
        for handler in list(getattr(logger, "handlers", ())):
            for part in ("stream", "socket", "sock"):
                fd = _fileno(getattr(handler, part, None))
                if fd is not None:
                    fds.append(fd)
    return fds


def _trackers() -> list[int]:
    """The pipes to multiprocessing's and loky's resource trackers, where running."""
    import sys

    fds = []
    for name in ("multiprocessing.resource_tracker", "loky.backend.resource_tracker"):
        module = sys.modules.get(name)
        fd = getattr(getattr(module, "_resource_tracker", None), "_fd", None)
        if isinstance(fd, int):
            fds.append(fd)
    return fds


def _queues() -> list[int]:
    """The pipes of the caller's multiprocessing queues (each registers for after-fork)."""
    from multiprocessing import queues, util

    fds = []
    for obj in list(util._afterfork_registry.values()):  # type: ignore[attr-defined]
        if isinstance(obj, queues.Queue):
            for end in (getattr(obj, "_reader", None), getattr(obj, "_writer", None)):
                try:
                    fds.append(end.fileno())  # type: ignore[union-attr]
                except Exception:  # noqa: BLE001 - closed, or none
                    pass
    return fds


def _holds_flock(fd: int) -> bool:
    try:
        with open(f"/proc/self/fdinfo/{fd}", "rb") as f:
            return b" FLOCK " in f.read()
    except OSError:
        return False


def _let_go(fd: int) -> bool:
    try:
        if not fcntl.fcntl(fd, fcntl.F_GETFD) & fcntl.FD_CLOEXEC:
            return False  # made inheritable on purpose: an exec'd child has it too
        mode = os.fstat(fd).st_mode
    except OSError:
        return False
    if stat.S_ISFIFO(mode) or stat.S_ISSOCK(mode):
        return True
    return stat.S_ISREG(mode) and _holds_flock(fd)


# The descriptors this process let go of (a worker's error EBADF says so: errors_note).
LET_GO: list[int] = []


def note(exc: BaseException) -> Optional[str]:
    """For an item's EBADF in a worker that let descriptors go: what happened, and what
    to do; else None."""
    import errno

    if not LET_GO or not isinstance(exc, OSError) or exc.errno != errno.EBADF:
        return None
    return (f"this worker was forked from your process and let go of the pipes and "
            f"sockets it inherited (descriptors {', '.join(map(str, LET_GO[:8]))}), as a "
            f"worker started by exec never has them: open what the function uses in the "
            f"worker (initializer=), or set ADAPTIVE_EXEC_START=exec")


def shed(keep: Optional[Iterable[int]]) -> list[int]:
    """In a child just forked: let go of the inherited descriptors the module doc names,
    other than ``keep`` (None: nothing is let go). Returns the numbers let go; never
    raises (the child then runs as before)."""
    if keep is None or not _O_PATH:
        return []
    try:
        kept = set(keep)
        names = os.listdir("/proc/self/fd")  # its own descriptor is closed on return
        gone = [fd for fd in map(int, names) if fd not in kept and _let_go(fd)]
        if not gone:
            return []
        hole = os.open("/", _O_PATH | os.O_CLOEXEC)
        try:
            for fd in gone:
                os.dup2(hole, fd, inheritable=False)
        finally:
            os.close(hole)
    except Exception:  # noqa: BLE001 - /proc unreadable: as before
        return []
    LET_GO[:] = gone
    try:  # a caller's asyncio loop had signals woken through a socket let go here
        old = signal.set_wakeup_fd(-1)
        if old != -1 and old not in gone:
            signal.set_wakeup_fd(old)
    except (ValueError, OSError):
        pass
    return gone
