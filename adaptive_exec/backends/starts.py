"""How a pool's worker processes come to be: three start paths and the rule between them.

Measured on the 2-core development machine (``python -m benchmarks.startup``, a fresh
process each, medians), the time from creating a 2-worker pool to its first result:

    fork      the caller forks each worker                     ~12-22 ms, ~7 ms of caller CPU
    template  a template process forks each worker             ~25-32 ms once it is up;
              (the template itself: ~120 ms, started ahead)    ~4 ms of caller CPU
    exec      loky's default: fork + exec + imports per worker ~105-155 ms

The rule (``choose``):

- **fork** when the calling process runs no thread but the one asking. A fork copies
  only the forking thread; a lock another thread held at that instant stays held in the
  child, so a worker could hang on its first log line or import. With one thread there
  is no such lock. The threads are counted by the kernel (``/proc/self/task``), so
  native threads (BLAS pools, a GUI's, a server's) count too. The rule holds for each
  worker, not just the pool's first: loky starts replacements later (a worker recycled
  for its memory, one that idled out), from a caller that by then runs loky's own
  threads, and those come from the template (``ForkProcess``). Hence the semaphores and
  queues of such a pool are named ones, as forkserver's, that any process can share;
  measured, that costs a fork pool nothing (18-29 ms to every worker's answer, either way).
- **template** otherwise: a small single-threaded process, started by fork + exec (safe
  from any thread) the first time a threaded caller needs workers, that imports loky,
  cloudpickle and adaptive_exec once and then forks each worker on request. Its server
  loop is the standard library's forkserver's; unlike ``forkserver``, it never imports
  the user's ``__main__`` (neither at its start nor in a worker), so a script without an
  ``if __name__ == "__main__"`` guard is not run again. Functions defined there travel by
  value (cloudpickle), as with loky's default start.
  A map of few items (at most 4 per worker) whose pool is cold forks the template
  instead, from its caller's only thread, before its first call (~1 ms): should that
  call run long, the items behind it go to workers the template forks meanwhile, ~0.1 s
  sooner than from a spawned one (benchmark two_heavy, two items of 0.5 s: 0.85 s ->
  0.72 s, where a fork pool takes 0.52 s; few_heavy 1.09x -> 1.00x a fork pool's). It
  ends with the map when unused, else with its pool: it is a copy of the caller, which
  pays for each page it writes while the copy lives (why not for many items), and a
  caller over 512 MB spawns its template as before.
- **exec** (loky's default) where fork is not available or not safe (Windows, macOS,
  whose system libraries do not survive a fork), or when asked for.

``ADAPTIVE_EXEC_START=fork|template|exec`` forces a path (the test suites run under each);
a forced ``fork`` still falls back to ``template`` when the caller runs threads: we never
fork a threaded process.

Loky stays the pool whichever path started its workers: its crash detection, timeouts
and reuse are the same. What differs is what a worker inherits: forked workers start
from the caller's memory (copy-on-write; nothing is re-imported), template workers from
a fresh interpreter that imported our modules, exec workers from a fresh interpreter.
"""

from __future__ import annotations

import gc
import io
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from contextlib import contextmanager
from multiprocessing import connection, forkserver, reduction, util
from multiprocessing import context as mp_context
from multiprocessing import process as mp_process
from typing import Any, Callable, Iterator, NoReturn, Optional

from . import fdshed

try:
    from multiprocessing import popen_forkserver
except ImportError:  # no file descriptors to pass (Windows): loky's own start only
    popen_forkserver = None  # type: ignore[assignment]

ENV_START = "ADAPTIVE_EXEC_START"
FORK, TEMPLATE, EXEC = "fork", "template", "exec"
PATHS = (FORK, TEMPLATE, EXEC)

# What the template imports before it forks anything: what every worker needs.
# (Not the caller's side, adaptive_exec.backends.loky and what it imports: a worker does
# not need it, and the template starts ~30 ms sooner without it.)
PRELOAD = ("loky.process_executor", "cloudpickle", "adaptive_exec.worker")


def threads_now() -> int:
    """Threads in this process, native ones included (``/proc/self/task``); elsewhere
    only Python's own are known."""
    try:
        return len(os.listdir("/proc/self/task"))
    except OSError:
        return threading.active_count()


_helpers: list[threading.Thread] = []  # threads of ours that end soon (see settle)


def note_helper(thread: threading.Thread) -> None:
    """A thread of ours that is ending (told to stop) but may still be busy a moment
    (starting a pool): a fork waits for it (``settle``); a map that starts no pool does not.
    Those that ended meanwhile leave the list here (a warm pool's maps never settle it)."""
    _helpers[:] = [t for t in _helpers if t.is_alive()]
    _helpers.append(thread)


# How long a map's start waits for the watch of the map before to end, before it forks
# the template (fork_template_early): a watch told to stop ends within ~1 ms unless it
# is starting a pool, which a map of few items does not wait for.
SETTLE_EARLY_S = 0.02  # for all of them together


def settle(timeout: float = 1.0, keep_busy: bool = False) -> None:
    """Before choosing how to start workers: let our ending helper threads end, so that a
    caller that runs no thread of its own still counts one. ``keep_busy``: one still busy
    after ``timeout`` stays noted, for the next to wait for (else it is waited for once)."""
    if not _helpers:
        return
    me = threading.current_thread()
    alive = [t for t in _helpers if t is not me and t.is_alive()]
    if threads_now() - len(alive) > 1:
        # Threads not ours run too: the workers come from the template whatever our
        # helpers do, and one of them may be spawning this very pool's workers (a
        # template's take ~0.1 s): not waited for.
        return
    deadline = time.monotonic() + timeout  # for them all, not each
    for thread in list(_helpers):
        if thread is me:
            continue  # a helper starting a pool itself, on its way out
        thread.join(max(0.0, deadline - time.monotonic()))
        if keep_busy and thread.is_alive():
            continue
        try:
            _helpers.remove(thread)
        except ValueError:  # another thread settled it meanwhile
            continue
        wait_gone(thread)


def wait_gone(thread: threading.Thread, timeout: float = 0.05) -> None:
    """After ``thread.join()``: wait (at most ``timeout``) until the kernel no longer lists
    it. join() returns when Python is done with the thread, a moment before the thread
    itself ends; on a busy machine that moment was long enough for the caller to count
    two threads and send its workers to the template."""
    tid = thread.native_id
    if tid is None:
        return
    deadline = time.monotonic() + timeout
    while os.path.exists(f"/proc/self/task/{tid}") and time.monotonic() < deadline:
        time.sleep(0.0005)


def forced() -> Optional[str]:
    """The path ``ADAPTIVE_EXEC_START`` asks for, or None; raises on a value that is not
    a path, saying which are."""
    value = os.environ.get(ENV_START, "").strip().lower()
    if not value:
        return None
    if value not in PATHS:
        raise ValueError(f"{ENV_START}={value!r} is not a start path; use one of "
                         f"{', '.join(PATHS)} (or leave it unset to let adaptive_exec choose)")
    return value


def fork_works() -> bool:
    """Whether this platform forks safely: Linux and the like, not macOS or Windows."""
    return (hasattr(os, "fork") and popen_forkserver is not None
            and sys.platform != "darwin")


def choose() -> str:
    """The start path for workers started now, from this thread (see the module doc)."""
    wanted = forced()
    if wanted == EXEC or not fork_works():
        return EXEC
    if wanted == TEMPLATE:
        return TEMPLATE
    # Our helper threads that are ending (settle waits for them before a fork) do not count;
    # the one asking does: a watch told to stop while it started a pool ahead had the pool
    # forked from it, beside the caller's running thread.
    me = threading.current_thread()
    ending = sum(1 for t in _helpers if t is not me and t.is_alive())
    return FORK if threads_now() - ending == 1 else TEMPLATE


def forks_once_alone() -> bool:
    """Called from a helper thread of ours: would the caller fork its workers, once this
    thread (the only other one) has ended?"""
    wanted = forced()
    return fork_works() and wanted in (None, FORK) and threads_now() == 2


def context(path: str) -> Any:
    """The multiprocessing context loky is given for ``path`` (None: loky's default)."""
    if path == FORK:
        return ForkContext()
    if path == TEMPLATE:
        return TemplateContext()
    return None


# Interpreter flags that leave where modules are found alone: -I, -E, -s, -S and -P
# would make an exec'd worker import loky and adaptive_exec from elsewhere than the
# caller (a path the caller added at run time, PYTHONPATH), before it is given the
# caller's sys.path.
_PATH_FLAGS = {"-I", "-E", "-s", "-S", "-P"}


def exec_flags() -> list[str]:
    """The caller's interpreter flags (``-O``, ``-X dev``, ``-X utf8``, ``-b``) for a
    worker started by exec: loky's own start runs ``python -m ...`` without them, so
    under ``python -O`` a module's ``assert`` (and ``if __debug__:``) ran in its
    workers, not in the loop: AssertionError where the loop returned."""
    flags = subprocess._args_from_interpreter_flags()  # type: ignore[attr-defined]
    return [f for f in flags if f not in _PATH_FLAGS]


@contextmanager
def sigint_deferred(also: tuple[signal.Signals, ...] = ()) -> Iterator[None]:
    """Hold a Ctrl-C back while workers are forked: one landing between a fork and loky's
    note of the new worker would leave a process no pool knows of. The signal stays
    pending and is raised as soon as the block ends; the forked workers get it unblocked
    (``_after_fork_in_child``). ``also``: other signals held back the same way (the
    child unblocks those itself)."""
    if threading.current_thread() is not threading.main_thread():
        yield  # signals are handled on the main thread only
        return
    global _blocked_here
    signums = (signal.SIGINT, *also)
    old = signal.pthread_sigmask(signal.SIG_BLOCK, set(signums))
    _blocked_here = signal.SIGINT not in old
    # A Ctrl-C that arrived just before the block has already been noted by Python,
    # whose handler would raise it inside the block (the mask cannot hold it back: seen
    # under load, a worker forked meanwhile was left running): noted here instead, and
    # raised once the block ends, by the handler it was meant for. (A child forked
    # meanwhile inherits this note-taker, not the caller's handler.)
    held: list[int] = []
    previous: dict[int, Any] = {}
    for signum in signums:
        try:
            previous[signum] = signal.signal(signum, lambda n, frame: held.append(n))
        except (ValueError, TypeError):  # no Python handler can be set here
            pass
    try:
        yield
    finally:
        for number, handler in previous.items():
            signal.signal(number, handler)
        _blocked_here = False
        signal.pthread_sigmask(signal.SIG_SETMASK, old)
        for number in dict.fromkeys(held):
            handler = previous.get(number)
            if callable(handler):
                handler(number, None)  # Python's default SIGINT raises KeyboardInterrupt
            elif handler == signal.SIG_DFL:
                os.kill(os.getpid(), number)


_blocked_here = False


# --- the template --------------------------------------------------------------------------


def serve(listener_fd: int, alive_fd: int, sys_path: list[str], ready_fd: int) -> None:
    """The template's main: import what workers need, then fork one per request until
    every process holding the "alive" pipe (the caller and the workers) is gone."""
    sys.path[:] = sys_path
    caller, path = os.getppid(), _socket_path(listener_fd)
    for name in PRELOAD:
        __import__(name)
    gc.freeze()  # what it imported stays out of its workers' collections (gc_frozen)
    _say_ready(ready_fd)
    try:
        forkserver.main(listener_fd, alive_fd, [])
    finally:
        _clean_after(caller, path)


def _say_ready(ready_fd: int) -> None:
    """Tell the caller the template serves (Template.is_ready)."""
    try:
        os.write(ready_fd, b"1")
    except OSError:
        pass  # the caller closed its end (it retired this template): nothing to tell
    finally:
        os.close(ready_fd)  # not inherited by every worker forked from here


def _socket_path(listener_fd: int) -> Optional[str]:
    """The file the template's socket is bound to (forkserver.main closes the socket
    as it ends: read before)."""
    try:
        with socket.socket(fileno=os.dup(listener_fd)) as listener:
            path = listener.getsockname()
    except OSError:
        return None
    return path if isinstance(path, str) and path else None


def _clean_after(caller: int, path: Optional[str]) -> None:
    """As the template ends: where the caller was killed (SIGKILL, or a signal it did
    not handle, so no exit handler of its ran), its socket file, and the temporary
    directory holding it once empty (a full test run left two such ``pymp-*``
    directories in /tmp). A caller that lives, or ended normally, removes its own."""
    if path is None:
        return
    # The alive pipe's end of file comes as a dying caller's descriptors are closed,
    # before the kernel gives its children a new parent: a full run's SIGKILL test saw
    # the caller still as the parent here once, and left the socket.
    deadline = time.monotonic() + 0.5
    while os.getppid() == caller and time.monotonic() < deadline:
        time.sleep(0.005)
    if os.getppid() == caller:
        return
    try:
        os.unlink(path)
        os.rmdir(os.path.dirname(path))  # only if nothing else is left there
    except OSError:
        pass


class Template:
    """The caller's side of the template process: start it, ask it for a worker."""

    def __init__(self) -> None:
        self.lock = threading.Lock()  # guards the fields below
        self.pid: Optional[int] = None
        self.address: Optional[str] = None
        self.alive_w: Optional[int] = None
        self.forked = False  # forked from the caller (fork_here), not spawned (start)
        self.used = False  # asked for a worker since it started
        # Read end of a pipe the template writes one byte to once it serves (its
        # imports done); ``is_ready`` looks without waiting.
        self.ready_r: Optional[int] = None
        self.ready = False

    def start(self) -> int:
        """Start the template unless it runs; its pid. Callable from any thread: it is
        started by fork + exec, which copies no lock into a process that runs Python."""
        with self.lock:
            if self.pid is not None:
                try:
                    pid, _ = os.waitpid(self.pid, os.WNOHANG)
                except ChildProcessError:
                    pid = self.pid
                if not pid:
                    return self.pid
                self._forget()  # it died (killed by someone): start another
            return self._launch(_spawn)

    def fork_here(self) -> bool:
        """Fork the template from this thread, the process's only one: ~0.7 ms for a
        20 MB caller (0.9-1.3 ms once it has imported loky and this package), where a
        spawned template is up ~0.12 s after it is asked for. Made at a map's start,
        before its first call: should that call run long, the items behind it are sent
        to workers the template forks meanwhile (adapt.py), which the caller's thread,
        busy in the call, cannot fork itself. The template is a copy of the caller as it
        is now, as a worker forked directly would be. False where a template runs
        already."""
        reap_ended()
        with self.lock:
            if self.pid is not None:
                return False
            self._launch(_fork)
            self.forked, self.used = True, False
            return True

    def _launch(self, launch: Callable[[int, int, int, int], int]) -> int:
        """Under ``lock``: the template's socket, "alive" pipe and "ready" pipe, handed to
        ``launch`` (listener fd, alive_r, alive_w, ready_w) -> its pid, which is noted
        and returned."""
        address = connection.arbitrary_address("AF_UNIX")  # type: ignore[attr-defined]
        with socket.socket(socket.AF_UNIX) as listener:
            listener.bind(address)
            os.chmod(address, 0o600)
            listener.listen()
            alive_r, alive_w = os.pipe()
            try:
                ready_r, ready_w = os.pipe()
            except BaseException:
                os.close(alive_r)
                os.close(alive_w)
                raise
            # Read without select(), whose descriptors must be under FD_SETSIZE (1024):
            # a caller holding more open files raised ValueError in is_ready.
            os.set_blocking(ready_r, False)
            try:
                pid = launch(listener.fileno(), alive_r, alive_w, ready_w)
            except BaseException:
                os.close(alive_w)
                os.close(ready_r)
                raise
            finally:
                os.close(alive_r)
                os.close(ready_w)
        self.pid, self.address, self.alive_w = pid, address, alive_w
        self.ready_r, self.ready = ready_r, False
        return pid

    def is_ready(self) -> bool:
        """Does the template serve already (a worker asked for now comes in a fork's
        time, not after its imports)? Never waits."""
        with self.lock:
            self._look_ready()
            return self.ready

    def is_coming(self) -> bool:
        """Was the template started, and is it still importing (alive, not serving
        yet)? False when none runs, or it died before it served: a pool asked for then
        waits for none to come. Never waits."""
        with self.lock:
            self._look_ready()
            return self.ready_r is not None

    def _look_ready(self) -> None:
        """Under ``lock``: read the ready pipe, if it says anything yet."""
        fd = self.ready_r
        if fd is None:
            return
        try:
            got = os.read(fd, 1)
        except BlockingIOError:
            return  # nothing yet: it still imports
        except OSError:
            got = b""
        # One byte once it serves; end of file if it died first (not ready).
        self.ready = got == b"1"
        self.ready_r = None
        os.close(fd)

    def retire_forked(self, unused_only: bool = False) -> None:
        """End a template forked from the caller (``unused_only``: unless it forked a
        worker). It is a snapshot of the caller's memory: kept no longer than the pool it
        started (or the map it was forked for), it holds no more of it than that pool's
        workers do. A spawned template stays: it is the process's."""
        with self.lock:
            if not self.forked or (unused_only and self.used):
                return
            pid = self.pid
            self._forget()
        # One forked for a map and not used is not waited for: its exit (the kernel
        # freeing a copy of the caller's page tables) cost a tiny first map 0.5-0.7 ms
        # here, 2-3 ms on a busy machine. Reaped at the next template's fork or end.
        _end(pid, wait=not unused_only)

    def _forget(self) -> None:
        for fd in (self.alive_w, self.ready_r):
            if fd is not None:
                try:
                    os.close(fd)
                except OSError:
                    pass
        self.pid = self.address = self.alive_w = self.ready_r = None
        self.forked = self.used = self.ready = False

    def connect(self, fds: list[int]) -> tuple[int, int]:
        """Ask for a worker: (status_r, data_w). The template forks; the child reads what
        to run from data_w, and its pid (then its exit code) arrives on status_r."""
        from multiprocessing import resource_tracker

        self.start()
        with self.lock:
            address, alive_w = self.address, self.alive_w
            self.used = True
        assert address is not None and alive_w is not None
        # Everything that can fail, before connecting: the template's server loop (the
        # standard library's forkserver's) ends on a client that connects and sends no
        # descriptors, and every later worker was then refused (a descriptor of a pool
        # being ended, closed meanwhile, failed sendfds so).
        tracker = resource_tracker.getfd()
        assert tracker is not None
        for fd in fds:
            os.fstat(fd)  # OSError (EBADF) here, not halfway through the request
        parent_r, child_w = os.pipe()
        child_r, parent_w = os.pipe()
        try:
            with socket.socket(socket.AF_UNIX) as client:
                client.connect(address)
                reduction.sendfds(client, [child_r, child_w, alive_w, tracker, *fds])
        except BaseException:
            os.close(parent_r)
            os.close(parent_w)
            raise
        finally:
            os.close(child_r)
            os.close(child_w)
        return parent_r, parent_w

    def stop(self) -> None:
        """End the template (tests): closing our end of the alive pipe tells it to go
        once its workers are gone too."""
        with self.lock:
            pid = self.pid
            self._forget()
        _end(pid)


def _end(pid: Optional[int], wait: bool = True) -> None:
    """End template ``pid``: reaped now, or (``wait=False``) by ``reap_ended``."""
    reap_ended()
    if pid is None:
        return
    try:
        os.kill(pid, signal.SIGTERM)
        if wait:
            os.waitpid(pid, 0)
        else:
            _ended.append(pid)
    except (ProcessLookupError, ChildProcessError):
        pass


_ended: list[int] = []  # templates told to end, not yet reaped


def reap_ended(block: bool = False) -> None:
    """Reap the templates told to end that have (``block``: wait for them)."""
    for pid in list(_ended):
        try:
            done = os.waitpid(pid, 0 if block else os.WNOHANG)[0]
        except ChildProcessError:
            done = pid  # not ours to reap (any more)
        if done:
            _ended.remove(pid)


def _spawn(listener_fd: int, alive_r: int, alive_w: int, ready_w: int) -> int:
    """The template as a fresh interpreter (fork + exec) running ``serve``."""
    from multiprocessing import spawn

    code = (f"from adaptive_exec.backends.starts import serve; "
            f"serve({listener_fd}, {alive_r}, "
            f"{[p for p in sys.path if isinstance(p, str)]!r}, {ready_w})")
    exe = os.fsencode(spawn.get_executable())
    flags = subprocess._args_from_interpreter_flags()  # type: ignore[attr-defined]
    return util.spawnv_passfds(exe, [exe, *flags, "-c", code],  # type: ignore[attr-defined]
                               [listener_fd, alive_r, ready_w])


def _fork(listener_fd: int, alive_r: int, alive_w: int, ready_w: int) -> int:
    """The template as a fork of this process (Template.fork_here)."""
    util._flush_std_streams()  # type: ignore[attr-defined]  # buffered output: not twice
    # SIGTERM too: a template retired at once (a tiny map's) was sent it before it had
    # dropped the caller's handler, which then ran in the template (a user's SIGTERM
    # handler, run in a process of ours: 6 maps in 30).
    keep = {0, 1, 2, listener_fd, alive_r, ready_w, *fdshed.shared_by_inheritance()}
    with sigint_deferred(also=(signal.SIGTERM,)):
        with gc_frozen():
            pid = os.fork()
        if pid == 0:
            _serve_forked(listener_fd, alive_r, alive_w, ready_w, keep)
    return pid


def _serve_forked(listener_fd: int, alive_r: int, alive_w: int, ready_w: int,
                  keep: Optional[set[int]]) -> NoReturn:
    """The forked template's main (see Template.fork_here): it never returns into the
    caller's code, whose exit handlers (a cache write, the user's own) are not its own."""
    caller, path = os.getppid(), _socket_path(listener_fd)
    try:
        os.close(alive_w)  # the caller's end: its EOF tells the template to go
        signal.signal(signal.SIGTERM, signal.SIG_DFL)  # not the caller's handler
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGTERM})  # (held at the fork)
        fdshed.shed(keep)  # the caller's pipes and sockets: not the template's own
        for name in PRELOAD:
            __import__(name)  # once here, not in each worker
        gc.freeze()  # stays frozen in the template and its workers (gc_frozen)
        _say_ready(ready_w)
        forkserver.main(listener_fd, alive_r, [])  # type: ignore[attr-defined]
    finally:
        _clean_after(caller, path)
        os._exit(0)


# A caller larger than this spawns its template instead (see fork_template_early).
FORKED_TEMPLATE_MAX_RSS = 512 << 20


def fork_template_early() -> bool:
    """At a map's start, before its first call, in a caller that runs this one thread
    and would fork its workers: fork the template now (Template.fork_here). Not for a
    caller larger than FORKED_TEMPLATE_MAX_RSS: its fork takes longer (page tables), and
    the template would hold a copy of what the caller then changes."""
    if not fork_works() or forced() not in (None, FORK) or _template.pid is not None:
        return False
    if threading.current_thread() is not threading.main_thread():
        return False
    # The watch of the map before may still be ending (under load, 2 maps in 10 returned
    # before it had): let it, briefly. Counted, it had this map's few long items wait for
    # a template spawned while the first call ran.
    rss = _rss()
    if rss is None or rss > FORKED_TEMPLATE_MAX_RSS:
        return False
    settle(timeout=SETTLE_EARLY_S, keep_busy=True)
    if threads_now() != 1:
        return False
    return _template.fork_here()


def _rss() -> Optional[int]:
    try:
        with open("/proc/self/statm", "rb") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return None


_template = Template()


def template() -> Template:
    return _template


def start_template_ahead() -> None:
    """In a threaded caller, start the template now, so that it is up when this map's
    workers are wanted: its own start (~60 ms of an interpreter importing loky and us,
    on another core) is then off the caller's path. Started from this thread: the
    fork + exec itself costs the caller ~0.3-0.9 ms (vfork: the same for a 2 GB caller),
    once per process. From a helper thread, as before, the plan of a cache hit took
    6.4-7.8 ms instead of 2.2: the helper's every system call handed the GIL back and
    forth with the planning thread (5 ms switch interval). Nothing where workers would
    be forked, or come from loky's own start, or the template runs already."""
    global _ahead_started
    if _ahead_started or _template.pid is not None or not fork_works():
        return
    if forced() == EXEC or (forced() != TEMPLATE and threads_now() == 1):
        return
    _ahead_started = True
    try:
        _template.start()
    except Exception:  # the pool will try again, on its own path, and say what fails
        pass


_ahead_started = False


def template_pid() -> Optional[int]:
    """The running template's pid, or None."""
    with _template.lock:
        return _template.pid


class TemplatePopen(popen_forkserver.Popen if popen_forkserver else object):  # type: ignore[misc]
    """The standard forkserver's Popen, asking our template, and sending the child only
    what it needs: never the path of the user's ``__main__``, which the child would
    import (and so run a script without a main guard once more)."""

    def _launch(self, process_obj: Any) -> None:
        preparation = {"name": process_obj.name, "sys_path": list(sys.path),
                       "authkey": bytes(mp_process.current_process().authkey)}
        try:
            preparation["dir"] = os.getcwd()
        except OSError:
            pass
        buf = io.BytesIO()
        mp_context.set_spawning_popen(self)
        try:
            reduction.dump(preparation, buf)
            reduction.dump(process_obj, buf)
        finally:
            mp_context.set_spawning_popen(None)
        self.sentinel, data_w = _template.connect(self._fds)
        # The child's "parent alive" sentinel: it reads EOF when this process is gone.
        keep = os.dup(data_w)
        _alive_ends.add(keep)
        self.finalizer = util.Finalize(self, _close_own_fds,
                                       (os.getpid(), keep, self.sentinel))
        with open(data_w, "wb", closefd=True) as f:
            f.write(buf.getbuffer())
        self.pid = forkserver.read_signed(self.sentinel)


def _close_fds(*fds: int) -> None:
    for fd in fds:
        os.close(fd)


# The write ends of template workers' "parent alive" pipes this process holds. A child
# forked from it closes its copies (_after_fork_in_child): one that kept them (a
# long-lived child of the user's) kept the workers, and so the template, running for as
# long as it lived after the parent was killed.
_alive_ends: set[int] = set()


def _close_own_fds(pid: int, keep: int, sentinel: int) -> None:
    """A template worker's descriptors, closed by the process that opened them (a forked
    child closes its copy of ``keep`` at the fork, and may reuse the numbers since)."""
    if os.getpid() != pid:
        return
    _alive_ends.discard(keep)
    _close_fds(keep, sentinel)


class TemplateProcess(mp_context.ForkServerProcess):  # type: ignore[misc]
    @staticmethod
    def _Popen(process_obj: Any) -> Any:
        return TemplatePopen(process_obj)


class TemplateContext(mp_context.ForkServerContext):  # type: ignore[misc]
    """A forkserver context whose processes come from our template."""

    Process = TemplateProcess


class ForkProcess(mp_context.ForkServerProcess):  # type: ignore[misc]
    """Forked by the caller while it runs one thread, else by the template: loky may
    start a worker at any time (a replacement), from a caller that runs threads by then."""

    @staticmethod
    def _Popen(process_obj: Any) -> Any:
        if threads_now() == 1:
            with gc_frozen():
                return _ForkPopen(process_obj)
        return TemplatePopen(process_obj)


if hasattr(os, "fork"):
    from multiprocessing import popen_fork

    class _ForkPopen(popen_fork.Popen):  # type: ignore[misc]
        """``popen_fork.Popen`` (CPython's _launch, unchanged but for one line), whose
        child lets go of the caller's descriptors it does not need (fdshed) before it
        runs anything: a warm pool's workers held a pipe the caller closed open."""

        def _launch(self, process_obj: Any) -> None:
            keep = fdshed.needed_fds(process_obj)  # the same numbers in the child
            code = 1
            parent_r, child_w = os.pipe()
            child_r, parent_w = os.pipe()
            self.pid = os.fork()
            if self.pid == 0:
                try:
                    os.close(parent_r)
                    os.close(parent_w)
                    fdshed.shed(None if keep is None else keep | {child_r, child_w})
                    code = process_obj._bootstrap(parent_sentinel=child_r)
                finally:
                    os._exit(code)
            else:
                os.close(child_w)
                os.close(child_r)
                self.finalizer = util.Finalize(self, util.close_fds,  # type: ignore[attr-defined]
                                               (parent_r, parent_w))
                self.sentinel = parent_r


@contextmanager
def gc_frozen() -> Iterator[None]:
    """The caller's objects are left out of the garbage collector of a child forked in
    this block (gc.freeze, as the gc module's documentation advises before a fork), and
    given back to this process's collector after it. Without it a forked worker's first
    collection, which loky forces after the first task to take its memory reference,
    walks every object it inherited: 8 ms of CPU here for a caller that imported us
    (a worker's first item began after 11-19 ms of its CPU, 6 with this, 2 in a fork
    pool's), and each
    page it touches is copied. Both calls only move lists: no time for the caller.
    Not where the caller froze objects itself: unfreezing would undo that."""
    if gc.get_freeze_count():
        yield
        return
    gc.freeze()
    try:
        yield
    finally:
        gc.unfreeze()


class ForkContext(mp_context.ForkServerContext):  # type: ignore[misc]
    """Semaphores and queues that any process may share (named, as for forkserver),
    with processes that are forked when that is safe (ForkProcess)."""

    Process = ForkProcess


def _after_fork_in_child() -> None:
    """A child made by fork(): a worker we forked gets Ctrl-C back; any child forgets
    the parent's template (its lock may be held by a parent's thread) and closes its copy
    of the alive pipe, so that the template does not wait for it."""
    global _template, _blocked_here, _ahead_started
    _ahead_started = False
    _ended.clear()  # the parent's children, not this process's
    _helpers.clear()  # the parent's threads: not this process's
    if _blocked_here:
        _blocked_here = False
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})
    old = _template
    _template = Template()
    for fd in [old.alive_w, old.ready_r, *_alive_ends]:
        if fd is None:
            continue
        try:
            os.close(fd)
        except OSError:
            pass
    _alive_ends.clear()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)
