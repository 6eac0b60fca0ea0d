"""The loky process pool, kept warm between maps.

How its workers are started (fork, a template process, or loky's own fork+exec) is
``starts.py``'s rule; loky is the pool whichever path started them.

One pool per process, shared by every thread: loky's ``get_reusable_executor`` keeps
one executor per thread, and a pool started ahead from a helper thread (see
``prestart``) then came back as a second pool, four workers on two cores (measured:
the heavy workload went from 1.2 s to 2.1 s). So we hold a ``loky.ProcessPoolExecutor``
ourselves and reuse it between maps. It is rebuilt only when broken or too small, and
never shrunk during a process: a plan that wants fewer workers keeps fewer chunks in
flight instead (see dispatch).

Lifecycle. The pool belongs to the process that started it. A child made by ``fork()``
inherits our state but not the executor's threads (its map would wait forever), so the
child forgets the inherited pool (``_after_fork_in_child``) and starts its own on first
use; the parent's is untouched. Workers watch their parent (``worker.worker_init``) and exit
within ``worker.PARENT_POLL_S`` when it is gone, SIGKILL and SIGTERM included, instead of
waiting out ``IDLE_TIMEOUT_S``; loky's resource tracker then reads EOF on its pipe, whose
last writers were the parent and the workers, and exits by itself.
"""

from __future__ import annotations

import atexit
import concurrent.futures as cf
import contextlib
import dataclasses
import functools
import os
import re
import signal
import sys
import threading
import time
import weakref
from multiprocessing import process as mp_process
from typing import Any, Callable, Optional

# Imported with us, not at a map's first pool: importing loky takes ~20 ms of the
# caller's CPU, and under a long first call the sampling watch's thread imported it
# beside that call, each of its GIL hand-offs waiting on the call (~70 ms, the call
# slowed with it). Measured, cold maps, 3 runs x 3: two_heavy 0.69-0.72 s -> 0.64 s,
# small 0.61-0.64 s -> 0.57-0.59 s. ``import adaptive_exec.api`` costs that ~20 ms
# instead, as ``import joblib`` imports loky too.
import loky
import loky.process_executor  # noqa: F401

from .. import calibration, system
from ..records import Calibration
from ..system import ENV_IN_WORKER
from ..worker import (
    BLOB_FILE_MIN_BYTES,
    BlobFile,
    ChunkResult,
    FunctionRef,
    ItemClock,
    bytes_of,
    decode,
    dumps,
    noop,
    ping,
    run_chunk,
    stamped_bytes,
    worker_init,
)
from . import starts
from .base import NOT_BEGUN, PoolGone

# Workers idle this long exit; a map a few minutes later then pays start-up again.
IDLE_TIMEOUT_S = 300


class _PoolState:
    """The executor we last used and whether its workers are known to be up."""

    def __init__(self) -> None:
        self.lock = threading.Lock()  # guards every field below
        self.executor: Any = None
        self.size = 0
        self.warm = False
        self.last_used = 0.0
        self.probe: Any = None  # the StartupProbe of a pool started ahead of its map
        # When a start ahead began (perf_counter): importing loky and spawning take a
        # while on a thread that shares the GIL with the caller, and the planner counts
        # the start-up from here, not from when the probe exists.
        self.starting_at: Optional[float] = None
        # Bumped by shutdown(): a start ahead that began before it (still importing
        # loky when Ctrl-C ended the map) must not leave a pool behind after it.
        self.epoch = 0
        # Pools we ended or replaced on purpose (a time-out, Ctrl-C, growth): another
        # thread whose chunks die with them sends them again, without counting a crash.
        self.ended: weakref.WeakSet[Any] = weakref.WeakSet()
        self.path = starts.EXEC  # how the executor's workers were started (starts.py)
        self.parent = 0  # the process they were started from (ours, or the template)
        self.made_at = 0.0  # perf_counter() when the executor was made (its workers forked)
        # Keys of the functions sent whole to this executor's workers (for the maps to
        # come: their workers have them; one that does not asks, NEED_FUNCTION).
        self.given: set[str] = set()
        self.path_measurable = True  # its start-up measures the path's (see _get_locked)
        self.starting_path: Optional[str] = None  # the path of a start ahead under way
        # Chunks submitted by maps so far: an overhead probe that saw this move was not
        # measuring an idle pool (OverheadProbe). Counted without the lock: any change
        # is enough, and two maps submitting at once change it either way.
        self.submits = 0
        self.overhead_probe: Any = None  # the OverheadProbe under way, if any


_state = _PoolState()
# Executors inherited through fork(): kept referenced, never shut down nor collected in
# the child. Their pipes and queues are shared with the parent's live pool; loky's
# clean-up on collection wakes the manager thread through such a pipe.
_abandoned: list[Any] = []


def _after_fork_in_child() -> None:
    """In a child made by fork(): forget the parent's pool. Its manager and feeder
    threads did not come along, so a map on it would wait forever; its workers are the
    parent's. A fresh lock too: another thread of the parent may have held ours."""
    global _state, _exit_registered
    if _state.executor is not None:
        _abandoned.append(_state.executor)
    _state = _PoolState()
    # A multiprocessing child forgets its parent's finalizers: register ours again there.
    _exit_registered = False
    global _clock_lock
    _clock_lock = threading.Lock()  # a parent's thread may have held it at the fork
    for clock in _clocks:  # the parent's: its workers write there
        if clock is not None:
            try:
                clock.close()
            except (OSError, ValueError):
                pass
    _clocks.clear()
    global _unstickers_lock
    _unstickers_lock = threading.Lock()  # a parent's thread may have held it at the fork
    _unstickers.clear()  # the parent's threads: not running here
    process_executor = sys.modules.get("loky.process_executor")
    if process_executor is not None:
        # What loky does itself for a multiprocessing child (util.register_after_fork),
        # not for a plain os.fork(): the parent's threads are not ours to wake at exit.
        wakeups = getattr(process_executor, "_threads_wakeups", None)
        if wakeups is not None:
            wakeups.clear()
        lock = getattr(process_executor, "_global_shutdown_lock", None)
        if lock is not None and hasattr(lock, "_at_fork_reinit"):
            lock._at_fork_reinit()  # held by a parent's thread at fork: never released here
    # The parent's workers are not this process's children: multiprocessing's table of
    # them came along with the fork, and a child that exited normally killed them
    # (_end_at_exit: they looked alive, poll() cannot tell for another's child), and
    # failed to join them. Forgotten here, as multiprocessing forgets its own children
    # in a child it starts.
    children = getattr(mp_process, "_children", None)
    if children is not None:
        for proc in list(children):
            if _ours(proc) and getattr(proc, "_parent_pid", None) != os.getpid():
                children.discard(proc)


# This process's clock (worker.ItemClock), shared by its maps: a worker opens it once.
_clocks: list[Optional[ItemClock]] = []
_clock_lock = threading.Lock()


def _clock() -> Optional[ItemClock]:
    with _clock_lock:
        if not _clocks:
            made = None
            if BlobFile.available():
                try:
                    made = ItemClock()
                except (OSError, ImportError):  # ImportError: mmap, with no descriptor left
                    made = None
            _clocks.append(made)
        return _clocks[0]


# A pool that broke -> {pid: exit code} of its workers dead at that moment, read as loky
# fails its futures, before it kills the others (_note_break).
_dead_at_break: weakref.WeakKeyDictionary[Any, dict[int, int]] = weakref.WeakKeyDictionary()


_DEATHS = ("TerminatedWorkerError", "BrokenProcessPool")  # loky's: a worker died
# A pool -> the clock slots of the chunks sent to it whose results have not come back
# (any map's, any thread's): a worker dead at a break that had noted one of them was
# running that chunk, not taking up another (_note_break).
_in_flight: weakref.WeakKeyDictionary[Any, set[int]] = weakref.WeakKeyDictionary()
# A pool that broke -> whether each worker dead then was running such a chunk.
_deaths_explained: weakref.WeakKeyDictionary[Any, bool] = weakref.WeakKeyDictionary()
# How long a run whose chunk failed with a broken pool waits for _note_break's record.
BREAK_NOTE_WAIT_S = 0.5
_break_events: weakref.WeakKeyDictionary[Any, threading.Event] = weakref.WeakKeyDictionary()


def _break_noted(executor: Any) -> threading.Event:
    with _clock_lock:
        event = _break_events.get(executor)
        if event is None:
            event = _break_events[executor] = threading.Event()
        return event


def _note_break(executor: Any, fut: cf.Future) -> None:
    """A future's done callback (in loky's thread): when it failed as its pool broke,
    note which workers were dead then, once per pool. Loky fails the futures first and
    kills the workers still alive after: a chunk that ran in one of those was not the
    cause."""
    try:
        if fut.cancelled() or executor in _dead_at_break:
            return
        exc = fut.exception()
        if type(exc).__name__ not in _DEATHS:
            return
        dead = {}
        for pid, proc in list((getattr(executor, "_processes", None) or {}).items()):
            code = proc.exitcode
            if code is not None:
                dead[pid] = code
        clock = _clocks[0] if _clocks else None
        with _clock_lock:
            slots = list(_in_flight.get(executor, ()))
        running = {clock.ran_by(slot) for slot in slots} if clock is not None else set()
        _deaths_explained[executor] = bool(dead) and set(dead) <= running
        _dead_at_break[executor] = dead
        _break_noted(executor).set()
    except Exception:  # a callback must not raise into loky's thread
        pass


def _back_from_worker(executor: Any, slot: int, fut: cf.Future) -> None:
    """A future's done callback: its chunk is no longer in flight, unless it failed as
    its pool broke (_note_break, called after this one, reads the slots left)."""
    if not fut.cancelled() and type(fut.exception()).__name__ in _DEATHS:
        return
    with _clock_lock:
        _in_flight.get(executor, set()).discard(slot)


def _ours(proc: Any) -> bool:
    """A worker of ours: loky's process, one our start paths made, or loky's started
    under the caller's interpreter flags (FlaggedProcess: missed here, a forked child's
    exit joined the parent's workers, "can only join a child process")."""
    kind = type(proc).__module__
    return kind.startswith("loky.") or kind in (starts.__name__, __name__)


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


def _callers_start_method() -> Optional[str]:
    """The caller's multiprocessing start method, None for the platform's default
    (read without fixing it, as get_start_method() would)."""
    import multiprocessing

    return multiprocessing.get_start_method(allow_none=True)


def _worker_env(n_workers: int) -> dict[str, str]:
    env = {ENV_IN_WORKER: "1"}
    # One BLAS/OpenMP thread per worker: W workers x all-cores BLAS pools would
    # oversubscribe the machine (issue 6 revisits this for numpy workloads).
    for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        env[var] = "1"
    return env


def _is_broken(executor: Any) -> bool:
    flags = getattr(executor, "_flags", None)  # loky's own state; absent: assume fine
    return bool(flags is not None and (getattr(flags, "broken", None)
                                       or getattr(flags, "shutdown", False)))


def _get(n_workers: int, epoch: Optional[int] = None) -> tuple[Any, bool, float]:
    """(executor, cold, created_or_reused_at) with at least ``n_workers`` workers.

    Workers that must be started are started on the path ``starts.choose`` picks. A
    fork happens on this thread, with Ctrl-C held back until loky has noted each worker.
    Other paths never start workers on the main thread: a Ctrl-C landing while loky
    spawns one (between its fork+exec and the data it then sends down a pipe) left a
    process that no executor knew of, stuck on that pipe (seen in 1 of ~60 interrupts
    with a core kept busy). On a helper thread the spawn completes; the main thread's
    wait is what the interrupt ends, and shutdown() then finds every worker.
    """
    if _ready(n_workers):
        return _get_locked(n_workers, epoch)
    starts.settle()  # our helper threads that are ending do not make the caller threaded
    path = starts.choose()
    if path == starts.FORK:
        with starts.sigint_deferred():
            return _get_locked(n_workers, epoch, path)
    if threading.current_thread() is threading.main_thread():
        box: dict[str, Any] = {}
        if epoch is None:  # a shutdown() before the helper takes the lock: no pool after it
            epoch = current_epoch()

        made = threading.Event()

        def keep(result: tuple[Any, bool, float]) -> None:
            box["result"] = result
            made.set()

        def start() -> None:
            try:
                box.setdefault("result", _get_locked(n_workers, epoch, path, on_made=keep))
            except BaseException as exc:  # handed to the caller's thread, if still there
                box["error"] = exc
            finally:
                made.set()

        thread = threading.Thread(target=start, name="adaptive_exec-start", daemon=True)
        thread.start()
        # Back as soon as the pool exists: its workers are spawned by the helper while
        # the caller runs items (the probe's ``sent`` says when submitting is free).
        made.wait()
        starts.note_helper(thread)
        if "result" not in box:
            raise box["error"]
        # (A spawn that fails after this breaks the pool: the run's first chunk says so.)
        return box["result"]  # type: ignore[no-any-return]
    return _get_locked(n_workers, epoch, path)


def _ready(n_workers: int) -> bool:
    """A warm pool of at least ``n_workers``: using it starts no process."""
    with _state.lock:
        executor = _state.executor
        return (executor is not None and not _is_broken(executor)
                and _state.size >= n_workers and _state.warm
                and time.perf_counter() - _state.last_used <= IDLE_TIMEOUT_S * 0.9)


# loky's own start runs ``python -m loky.backend.popen_loky_posix`` without the caller's
# interpreter flags: under ``python -O`` a module's ``assert`` (``if __debug__:``) ran in
# exec'd workers and not in the loop (AssertionError where the loop returned). Our
# context's processes are launched with them (starts.exec_flags); at module level, as
# loky pickles the process object for the child.
_launching = threading.local()
if sys.platform != "win32":
    from loky.backend import fork_exec as _loky_fork_exec
    from loky.backend import popen_loky_posix as _popen_loky_posix
    from loky.backend.context import LokyContext as _LokyContext
    from loky.backend.process import LokyProcess as _LokyProcess

    _plain_fork_exec = _loky_fork_exec.fork_exec
    if not getattr(_plain_fork_exec, "_adaptive_exec_flags", False):
        def _fork_exec_with_flags(cmd: list[Any], *args: Any, **kwargs: Any) -> Any:
            # Only for FlaggedPopen's launches, on the thread launching them.
            flags = getattr(_launching, "flags", None)
            if flags:
                cmd = [cmd[0], *flags, *cmd[1:]]
            return _plain_fork_exec(cmd, *args, **kwargs)

        _fork_exec_with_flags._adaptive_exec_flags = True  # type: ignore[attr-defined]
        _loky_fork_exec.fork_exec = _fork_exec_with_flags

    class FlaggedPopen(_popen_loky_posix.Popen):  # type: ignore[misc]
        # loky runs ``python -m <its Popen's module>`` as the child's main.
        __module__ = _popen_loky_posix.__name__

        def _launch(self, process_obj: Any) -> None:
            _launching.flags = starts.exec_flags()
            try:
                super()._launch(process_obj)
            finally:
                _launching.flags = None

    class FlaggedProcess(_LokyProcess):  # type: ignore[misc]
        @staticmethod
        def _Popen(process_obj: Any) -> Any:
            return FlaggedPopen(process_obj)

    class FlaggedContext(_LokyContext):  # type: ignore[misc]
        Process = FlaggedProcess


def _exec_context() -> Any:
    """None (loky's own) unless the caller runs with flags its workers need."""
    if sys.platform == "win32" or not starts.exec_flags():
        return None
    return FlaggedContext()


def _get_locked(n_workers: int, epoch: Optional[int] = None, path: str = starts.EXEC,
                on_made: Optional[Callable[[tuple[Any, bool, float]], None]] = None,
                ) -> tuple[Any, bool, float]:
    """_get's work, under the pool's lock; a pool it must start is started on ``path``
    (``on_made``: told the result once the pool exists, before its workers are spawned).

    A cold pool gets its start-up probe (pings queued ahead of any work) here, under
    the same lock, so that a pool started ahead by one thread and used by another is
    probed once: its first ping is what starts loky's workers, on this thread.
    """
    unsent = grown = None
    with _state.lock:
        if epoch is not None and epoch != _state.epoch:
            return None, False, 0.0  # a start ahead overtaken by shutdown(): no pool
        now = time.perf_counter()
        old = _state.executor
        broken = old is not None and _is_broken(old)
        if (old is not None and not broken and _state.size < n_workers
                and _grows_in_place(old, path)):
            # A larger pool is wanted: the old one gets more workers, started on its own
            # path below, outside this lock. Replacing it threw its warm workers away,
            # and with them every function they had been sent (a 24 MB function crossed
            # again to each worker of the new pool) and a pool's start-up.
            with old._processes_management_lock:
                old._max_workers = n_workers
            _state.size = n_workers
            grown = old
        elif old is None or broken or _state.size < n_workers:
            if system.shutting_down():
                # The main thread has returned: a pool made now (a start ahead from a
                # non-daemon thread's map, a replacement after the exit hook ended the
                # last one) started loky's manager thread, failed to register its exit
                # hook, and Python then waited for that thread for good.
                raise PoolGone()
            if old is not None and not broken:
                # A larger pool is wanted; the old one drains what it was given, and
                # takes nothing new (another thread's map then sends to the new one).
                _state.ended.add(old)
                old.shutdown(wait=False)
            size = max(n_workers, 0 if broken else _state.size)
            if path == starts.FORK and starts.threads_now() > 1:
                path = starts.TEMPLATE  # a thread appeared since the choice: never fork
            # A template started now makes this start-up no measure of the path's own.
            measurable = path != starts.TEMPLATE or starts.template_pid() is not None
            parent = starts.template().start() if path == starts.TEMPLATE else os.getpid()
            env = _worker_env(size)
            _state.executor = loky.ProcessPoolExecutor(
                max_workers=size, timeout=IDLE_TIMEOUT_S, env=env,
                context=starts.context(path) or _exec_context(),
                initializer=worker_init,
                initargs=(parent, env, _callers_start_method()),
            )
            _state.size = size
            _state.given = set()
            _state.path = path
            _state.parent = parent
            _state.made_at = time.perf_counter()
            _state.path_measurable = measurable
            _state.warm = False
            _state.probe = None
            _state.overhead_probe = None  # one on the old pool may never end
            _register_exit()
        cold = not _state.warm or now - _state.last_used > IDLE_TIMEOUT_S * 0.9
        if cold:
            _state.warm = False
            if _state.probe is None:
                _state.probe = unsent = StartupProbe(
                    _state.executor, _state.size, now,
                    _state.path if _state.path_measurable else None)
        _state.last_used = now
        executor = _state.executor
    if on_made is not None:
        on_made((executor, cold, now))
    if grown is not None:
        _spawn_missing(grown)
    if unsent is not None:
        # Outside the lock: spawning a template's workers waits for the template's own
        # start, and another thread's map must meanwhile find the pool (and its probe)
        # to run items in its caller until they are spawned.
        unsent.send(executor)
    return executor, cold, now


def _grows_in_place(executor: Any, path: str) -> bool:
    """Under _state.lock: can ``executor``, which a map wants larger, take more workers
    started as its own were? Only on its own path (a fork pool in a caller that now runs
    threads is replaced by a template's), from the same process (a template's workers
    watch the template that started the pool: one started since would orphan them), and
    while loky keeps the state this reads (else it is replaced, as before)."""
    if path == starts.FORK and starts.threads_now() > 1:
        path = starts.TEMPLATE
    if path != _state.path or not all(
            hasattr(executor, name) for name in
            ("_max_workers", "_processes_management_lock", "_adjust_process_count",
             "_shutdown_lock")):
        return False
    if path == starts.TEMPLATE:
        return starts.template_pid() == _state.parent
    return _state.parent == os.getpid()


def _spawn_missing(executor: Any) -> None:
    """Start the workers a grown pool lacks, now, on this thread (``_get`` says which
    thread spawns on each path). One that cannot be started (the template died since)
    ends the pool: the map then sends its chunks to a new one (PoolGone)."""
    try:
        # Under the pool's shutdown lock, as loky's own submit spawns: a shutdown (ours,
        # on Ctrl-C or at exit; a replacement's) then waits for the spawn and ends the new
        # workers with the others. Spawned after it, a worker was handed the pool's call
        # queue as loky had just dropped it (a traceback on stderr, a process started for
        # a pool that was gone).
        with executor._shutdown_lock:
            if _is_broken(executor):
                return
            with executor._processes_management_lock:
                executor._adjust_process_count()
    except Exception:
        with _state.lock:
            if _state.executor is executor:
                _state.ended.add(executor)
                _state.executor = None
                _state.size = 0
        with contextlib.suppress(Exception):
            executor.shutdown(wait=False)


_exit_registered = False


def _register_exit() -> None:
    # Caller holds _state.lock. Workers also exit when this process dies; this just
    # ends them promptly and quietly at a normal interpreter exit.
    global _exit_registered
    if not _exit_registered:
        _exit_registered = True
        atexit.register(_end_at_exit)
        # A multiprocessing child ends with os._exit: no atexit handler runs there, but
        # multiprocessing's own exit runs its finalizers (priority >= 0) before it joins
        # every child, ours too: without this, a child that mapped waited on its own
        # workers for ever (they wait for it to go).
        from multiprocessing import util

        util.Finalize(None, _end_at_exit, exitpriority=10)


def _end_at_exit() -> None:
    """At interpreter exit: end the pool, and any worker of a pool ended earlier that is
    still alive. A pool ended by Ctrl-C is ended by loky's thread, asynchronously: one of
    its workers still alive at exit made multiprocessing's own exit hook wait for it
    forever (join), while the worker waited for its parent to go (seen under load)."""
    import multiprocessing

    shutdown()
    _join_unstickers(_UNSTICKERS_END_S)
    for proc in multiprocessing.active_children():
        if _ours(proc) and getattr(proc, "_parent_pid", None) == os.getpid():
            try:
                _kill(proc)
                proc.join(1)
            except Exception:  # gone meanwhile, or not ours to signal: exit goes on
                pass


def _join_unstickers(timeout: float) -> None:
    """Wait (``timeout`` in all) for the threads _kill_workers_now started: one still
    running may be in the clean-up of the pool's semaphores (see ``_unstickers``)."""
    with _unstickers_lock:
        threads = list(_unstickers)
    deadline = time.monotonic() + timeout
    for thread in threads:
        if thread is not threading.current_thread():
            thread.join(max(0.0, deadline - time.monotonic()))
    with _unstickers_lock:
        _unstickers[:] = [t for t in _unstickers if t.is_alive()]


def _end_first_at_exit() -> None:
    """Keep our exit hook after loky's, so that it runs first
    (``threading._register_atexit`` runs the last one first, before the interpreter
    joins its threads): loky's waits for the items running in the pool, and ours, an
    ``atexit`` one, came after it. A script that returned with an imap open, or a
    daemon thread mid-map, waited for those items at its exit (10 s items: 10 s).
    Loky adds its hook again with each pool it starts: ours is added again after it."""
    hooks = getattr(threading, "_threading_atexits", None)
    if not isinstance(hooks, list) or (
            hooks and getattr(hooks[-1], "func", None) is _end_unwatched_at_exit):
        return
    try:
        threading._register_atexit(_end_unwatched_at_exit)  # type: ignore[attr-defined]
    except RuntimeError:  # the interpreter is shutting down already
        pass


def _end_unwatched_at_exit() -> None:
    """As the main thread returns: end the pool when no thread of the user's that the
    interpreter will wait for (a non-daemon one) may still want its results."""
    me = threading.current_thread()
    if any(t is not me and not t.daemon and t.is_alive() and not _pool_thread(t)
           for t in threading.enumerate()):
        return  # it is joined next, and maps on: its pool stays until then
    shutdown()


def _pool_thread(thread: threading.Thread) -> bool:
    """A thread of a pool's (loky's, ours), not the user's."""
    return thread.name.startswith(("ExecutorManagerThread", "QueueFeederThread",
                                   "adaptive_exec"))


def fresh_executor(n_workers: int) -> tuple[Any, float]:
    """A newly started pool (for calibration): the old one's workers are ended."""
    shutdown()
    executor, _, created = _get(n_workers)
    return executor, created


def start_path() -> str:
    """The start path of the pool a map would use now: that of the pool that exists (or
    is being started ahead), else the one a new pool would take from this thread."""
    with _state.lock:
        if _state.executor is not None and not _is_broken(_state.executor):
            return _state.path
        if _state.starting_at is not None and _state.starting_path is not None:
            return _state.starting_path
    return starts.choose()


def current_epoch() -> int:
    """Bumped by every shutdown(): a start ahead decided before it must not happen."""
    with _state.lock:
        return _state.epoch


def prestart(n_workers: int, epoch: Optional[int] = None) -> Any:
    """Start the pool's workers now, ahead of a map that will probably want them: the
    caller keeps working meanwhile, so on a machine with a free core this is nearly free.
    The map that uses the pool then finds its probe (``current_probe``). Returns the
    executor, or None when none was started (a shutdown overtook the decision)."""
    with _state.lock:
        if epoch is not None and epoch != _state.epoch:
            return None  # decided before a shutdown (Ctrl-C ended the map meanwhile)
        if _state.starting_at is None:
            _state.starting_at = time.perf_counter()
            _state.starting_path = starts.choose()
        epoch = _state.epoch
    try:
        return _get(n_workers, epoch)[0]
    except PoolGone:
        return None  # the interpreter is ending: no pool, the map runs in its caller
    except OSError:
        # No room for the pool's pipes, semaphores or processes (RLIMIT_NOFILE,
        # RLIMIT_NPROC): none ahead; the map that wants one says why (Run._open).
        return None
    finally:
        with _state.lock:
            _state.starting_at = None
            _state.starting_path = None


def current_probe(executor: Any) -> Any:
    """The start-up probe of ``executor`` while it is cold, else None."""
    with _state.lock:
        if executor is _state.executor and not _state.warm:
            return _state.probe
        return None


def _answered(executor: Any) -> bool:
    """Is ``executor`` whole and has a worker of it answered (its probe, when cold)?"""
    if _is_broken(executor):
        return False
    probe = current_probe(executor)
    return probe is None or probe.first.is_set()


def startup_left(full_startup_s: float, n_workers: int) -> Optional[float]:
    """Seconds until a pool of ``n_workers`` can take work: 0 when warm, the rest of the
    start-up when one was started ahead, else None (no pool: all of a start-up, which
    the planner sizes for the workers it picks)."""
    if is_warm(n_workers):
        return 0.0
    with _state.lock:
        probe = _state.probe
        if probe is not None and _state.size >= n_workers:
            if probe.first.is_set():
                return 0.0
            return max(0.0, full_startup_s - (time.perf_counter() - probe.created_at))
        if _state.starting_at is not None:
            return max(0.0, full_startup_s - (time.perf_counter() - _state.starting_at))
    return None


def is_warm(n_workers: int) -> bool:
    with _state.lock:
        return (
            _state.executor is not None
            and _state.warm
            and _state.size >= n_workers
            and time.perf_counter() - _state.last_used < IDLE_TIMEOUT_S * 0.9
        )


def mark_warm(executor: Any) -> None:
    with _state.lock:
        if executor is _state.executor:
            _state.warm = True
            _state.probe = None
            _state.last_used = time.perf_counter()


def mark_broken(executor: Any, on_purpose: bool = False) -> bool:
    """End a pool that lost a worker (or must lose one: a time-out, Ctrl-C: then
    ``on_purpose``) and forget it: the next request builds a new one. False when it was
    already forgotten."""
    with _state.lock:
        if on_purpose:
            _state.ended.add(executor)
        if executor is not _state.executor:
            return False
        _state.executor = None
        _state.warm = False
        _state.size = 0
        _state.probe = None
    _end_now(executor)
    starts.template().retire_forked()  # a template forked for a map ends with its pool
    return True


def _kill(proc: Any) -> None:
    """SIGKILL a worker process, by pid where the platform has it: loky's own Popen (its
    exec start) has no kill(), and ``proc.kill()`` raised AttributeError there, so those
    workers were never killed here (nor at exit, where one left alive made
    multiprocessing's exit hook wait for it for ever)."""
    if hasattr(signal, "SIGKILL"):
        os.kill(proc.pid, signal.SIGKILL)
    else:
        proc.kill()


def _end_now(executor: Any) -> None:
    """Shut ``executor`` down (it spawns and takes nothing more), then kill its workers
    and close our end of its result pipe now (_kill_workers_now); not the pipe of a
    pool loky found broken itself: its manager thread is past the read that could hang,
    and closes the pipe as it ends the pool. Closed from here as well, the two threads
    raced, and loky's died on EBADF (a traceback on stderr, its clean-up cut short)."""
    flags = getattr(executor, "_flags", None)
    broken = bool(getattr(flags, "broken", None))
    # Read before shutdown(), which forgets them: with the manager thread forgotten,
    # the pipe was closed here at once, beside that thread ending the pool and closing
    # it too (EBADF in loky's thread at 1-3% of multiprocessing children's exits).
    results = getattr(executor, "_result_queue", None)
    manager = getattr(executor, "_executor_manager_thread", None)
    _uncancel_queued(executor)
    executor.shutdown(wait=False, kill_workers=True)
    _kill_workers_now(executor, results, manager, close_pipe=not broken)


def _uncancel_queued(executor: Any) -> None:
    """Cancelled futures still queued in ``executor``, made pending again for its kill
    to fail: loky's manager thread sets an exception on every queued future as it kills
    a pool, and one cancelled already (by us, or by loky's own shutdown at exit) made it
    raise InvalidStateError (a traceback on stderr, its clean-up cut short). Nobody
    waits on them: cancelled, they were dropped. (Once our end of the result pipe was
    no longer closed at once, 3284ba6, loky ended our pools this way, not as broken,
    where it tolerates them.)"""
    from concurrent.futures import _base

    for item in list((getattr(executor, "_pending_work_items", None) or {}).values()):
        fut: Any = getattr(item, "future", None)
        condition = getattr(fut, "_condition", None)
        if condition is None:
            continue
        with condition:
            if fut._state == _base.CANCELLED:
                fut._state = _base.PENDING


def _kill_workers_now(executor: Any, results: Any, manager: Optional[threading.Thread],
                      close_pipe: bool = True) -> None:
    """Kill ``executor``'s live workers here, now: loky's own kill runs later on its
    manager thread, and under load a map left by Ctrl-C returned with them alive.

    Then close this process's end of the pipe the workers write ``results`` into. A
    worker killed halfway through writing a result (a 4 MB one is written in many
    pieces) left loky's ``manager`` thread reading the rest for ever: this process holds
    a write end too (loky never writes through it), so no end of file came. The thread
    outlived the pool, and the interpreter's exit, which joins it, hung (every Ctrl-C
    during maps of large results left one). With the workers gone and our end closed,
    the read ends (an error) and loky ends that pool as broken."""
    for proc in list((getattr(executor, "_processes", None) or {}).values()):
        try:
            if proc.is_alive():
                _kill(proc)
        except Exception:  # gone meanwhile
            pass
    writer = getattr(results, "_writer", None)
    if not close_pipe or writer is None:
        return
    if manager is None or manager is threading.current_thread() or not manager.is_alive():
        _close_quietly(writer)  # no thread of loky's left to close it, or this is it
        return
    # Closed only once loky's manager thread is seen stuck in a read of that pipe: one
    # that is ending the pool closes the pipe itself, and two threads closing it at once
    # raced (EBADF in loky's thread, at a child's exit). On a thread of its own: the
    # caller returns at once (Ctrl-C).
    thread = threading.Thread(target=_close_if_stuck, args=(manager, writer, results._reader),
                              daemon=True, name="adaptive_exec-unstick")
    with _unstickers_lock:
        _unstickers[:] = [t for t in _unstickers if t.is_alive()]
        _unstickers.append(thread)
    thread.start()


# The threads _kill_workers_now started (_close_if_stuck). Each holds loky's manager
# thread, and with it the pool's queues and locks: when it ends, it may drop the last
# reference to them, and their clean-up (the SemLocks' finalizers: sem_unlink, then
# telling the resource tracker) then runs on it. A daemon thread cut off there by
# the process's exit (a multiprocessing child's os._exit, the interpreter's end) left
# a semaphore the tracker reported as leaked ("leaked semlock objects", 1 in ~200
# multiprocessing children that mapped, beside busy processes): _end_at_exit joins them.
_unstickers: list[threading.Thread] = []
_unstickers_lock = threading.Lock()
# How long _end_at_exit waits in all for them (each ends once its manager thread has).
_UNSTICKERS_END_S = 2.0


def _close_if_stuck(manager: threading.Thread, writer: Any, reader: Any) -> None:
    """Close ``writer`` once loky's ``manager`` thread is seen in the same read of
    ``reader`` (a message of the result pipe) twice, UNSTICK_AFTER_S apart, with the
    workers gone: nothing will ever write the rest. Not while it is ending the pool,
    however long that takes: beside busy processes it took more than UNSTICK_AFTER_S,
    the pipe was closed under it, and it died on EBADF; nor while it empties its wake-up
    pipe (a read too) or reads a whole result a worker left."""
    give_up = time.monotonic() + UNSTICK_GIVE_UP_S
    seen = None
    while True:
        manager.join(UNSTICK_AFTER_S)
        if not manager.is_alive():
            return
        reading = _read_of(manager, reader)
        if reading is not None and reading is seen:
            _close_quietly(writer)
            return
        seen = reading
        if time.monotonic() >= give_up:
            return


def _read_of(thread: threading.Thread, reader: Any) -> Any:
    """The frame of ``thread``'s read of a message from ``reader`` (a
    multiprocessing.connection.Connection's ``_recv_bytes``), or None when it reads none.
    Kept, it stays that frame: seen again, the thread is still in that one read."""
    frame = sys._current_frames().get(thread.ident or -1)
    while frame is not None:
        if (frame.f_code.co_name == "_recv_bytes"
                and frame.f_code.co_filename.endswith("connection.py")
                and frame.f_locals.get("self") is reader):
            return frame
        frame = frame.f_back
    return None


def _close_quietly(writer: Any) -> None:
    """Close ``writer`` (a multiprocessing Connection) so that loky's own close of it,
    racing with this one, finds nothing to close: its handle is taken first. Closed by
    ``writer.close()``, the fd went while the handle was still set (os.close lets the
    GIL go), loky's manager thread, woken by that very EOF, closed it again, and died on
    EBADF at a multiprocessing child's exit (once, beside a busy core)."""
    handle = getattr(writer, "_handle", None)
    if handle is None or not isinstance(handle, int):
        try:
            writer.close()
        except OSError:  # closed already
            pass
        return
    writer._handle = None
    try:
        os.close(handle)
    except OSError:  # closed already
        pass


# How long loky's manager thread must be seen in one read of its result pipe, its workers
# gone, before our end of that pipe is closed under it (_close_if_stuck).
UNSTICK_AFTER_S = 0.5
# How long the thread that would unstick it waits at most for a manager thread that is
# busy elsewhere than in a read (ending the pool slowly) before it leaves it be.
UNSTICK_GIVE_UP_S = 60.0
# A worker found dead this long while loky still runs its pool as healthy: loky's
# manager thread, which ends a pool within milliseconds of a worker's death, is stuck.
# (Seen: a worker killed from outside, as the OOM killer does, halfway through writing
# a large result; the thread then waited for the rest and the map for ever.)
STUCK_AFTER_S = 1.0
_dead_since: weakref.WeakKeyDictionary[Any, float] = weakref.WeakKeyDictionary()


def end_if_stuck(executor: Any) -> bool:
    """End ``executor`` when one of its workers has been dead STUCK_AFTER_S and loky has
    not ended the pool: killing the others and closing our write end of the result pipe
    (_kill_workers_now) ends its manager thread's read, and loky then fails the pool's
    futures as a broken pool, which the run sends again. True when it did."""
    flags = getattr(executor, "_flags", None)
    if flags is None or flags.broken or flags.shutdown:
        return False
    try:
        dead = any(p.exitcode is not None
                   for p in list((getattr(executor, "_processes", None) or {}).values()))
    except Exception:  # a process being replaced meanwhile: look again next time
        return False
    if not dead:
        _dead_since.pop(executor, None)
        return False
    now = time.perf_counter()
    if now - _dead_since.setdefault(executor, now) < STUCK_AFTER_S:
        return False
    if not mark_broken(executor):  # forgotten already: ended here all the same
        _end_now(executor)
    return True


def given_before(executor: Any, key: str) -> bool:
    """Whether a whole function of this key went to ``executor``'s workers already."""
    with _state.lock:
        return executor is _state.executor and key in _state.given


def note_given(executor: Any, key: str) -> None:
    with _state.lock:
        if executor is _state.executor:
            _state.given.add(key)


def copies_this_process_since(since: float) -> bool:
    """Would the pool's workers be copies of this process as it was at ``since`` or
    later: forked by it (the current pool's after ``since``, or a pool started now)? A
    function's one-time set-up paid here before then is theirs too (a table built on
    its first call, an import)."""
    with _state.lock:
        if _state.executor is not None:
            return _state.path == starts.FORK and _state.made_at >= since
    return starts.choose() == starts.FORK


def current_executor() -> Any:
    """The pool a map would use now (None: none)."""
    with _state.lock:
        return _state.executor


def end_unused(executor: Any) -> None:
    """End ``executor`` if no map has used it yet: started ahead for a map that was then
    left (an imap closed, or left by Ctrl-C in the consumer's code, while sampling)."""
    if executor is None:
        return
    with _state.lock:
        unused = executor is _state.executor and not _state.warm
    if unused:
        mark_broken(executor, on_purpose=True)


def ended_on_purpose(executor: Any) -> bool:
    """Whether we ended or replaced ``executor`` ourselves (not a crash of its worker)."""
    with _state.lock:
        return executor in _state.ended


def is_gone(executor: Any) -> bool:
    """Whether ``executor`` takes no more work (shut down, broken, or replaced)."""
    with _state.lock:
        return executor is not _state.executor or _is_broken(executor)


def shutdown() -> None:
    """End the pool's workers now (Ctrl-C, tests, interpreter exit); a start ahead
    still under way when this is called leaves no pool behind."""
    with _state.lock:
        executor = _state.executor
        _state.epoch += 1
        if executor is not None:
            _state.ended.add(executor)
        _state.executor = None
        _state.warm = False
        _state.size = 0
        _state.probe = None
        _state.overhead_probe = None  # its tasks die with the pool: the next one measures
    if executor is not None:
        # Its threads, read before loky forgets them: they end a moment after its
        # shutdown returns (loky does not join the call queue's feeder), and a pool
        # started then would count them: a caller that runs no thread of its own would
        # be sent to the template (calibrate() measured the template's start, not the
        # fork's, in 1 run of 3).
        threads = _threads_of(executor)
        manager = getattr(executor, "_executor_manager_thread", None)
        _end_now(executor)  # its manager thread may be stuck reading: unstuck so
        if manager is not None and manager is not threading.current_thread():
            manager.join(_MANAGER_END_S)  # as loky's shutdown(wait=True), bounded
        for thread in threads:
            if thread is not threading.current_thread():
                thread.join(_THREADS_END_S)
                starts.wait_gone(thread)
    starts.template().retire_forked()  # a template forked for a map ends with its pool


# How long shutdown() waits for the ended pool's threads (they end within milliseconds),
# and for its manager thread, which first ends the workers.
_THREADS_END_S = 0.2
_MANAGER_END_S = 10.0


def pool_threads() -> list[threading.Thread]:
    """The threads the current pool runs in this process (loky's manager and queue
    feeder), alive ones only: their CPU is ours, not the mapped function's."""
    with _state.lock:
        executor = _state.executor
    return [t for t in _threads_of(executor) if t.is_alive()]


def _threads_of(executor: Any) -> list[threading.Thread]:
    """``executor``'s threads in this process: loky's manager and its call queue's feeder."""
    call_queue = getattr(executor, "_call_queue", None)
    threads = (getattr(executor, "_executor_manager_thread", None),
               getattr(call_queue, "_thread", None))
    return [t for t in threads if isinstance(t, threading.Thread)]


def worker_pids() -> list[int]:
    """Process ids of the pool's workers (their CPU is ours, not load)."""
    with _state.lock:
        executor = _state.executor
    processes = getattr(executor, "_processes", None) or {}
    return list(processes)


def our_pids() -> list[int]:
    """Process ids whose CPU is ours, not load: the pool's workers and the template that
    forks them (its start takes ~0.13 s of a CPU: counted as another process's load, it
    kept a map from sending items ahead on 2 cores)."""
    template = starts.template_pid()
    return worker_pids() + ([template] if template is not None else [])


def worker_rss() -> Optional[int]:
    """Mean resident bytes of the pool's workers now, or None without a pool."""
    from ..system import process_rss

    sizes = [s for s in (process_rss(pid) for pid in worker_pids()) if s]
    return int(sum(sizes) / len(sizes)) if sizes else None


def pool_size() -> int:
    with _state.lock:
        return _state.size


# --- the dispatcher's target (backends/base.py) -------------------------------------------


class LokyTarget:
    """Chunks go to the process pool, pickled by us (see worker.py)."""

    remote = True

    def __init__(self, ref: FunctionRef, star: bool, timed: bool = False):
        self.ref = ref
        # Where workers note when each chunk begins, and which worker runs it
        # (worker.ItemClock): for a timeout, and to tell which chunk a dead worker ran.
        self.clock = _clock()
        self.slots: dict[int, int] = {}  # chunk start -> its clock slot
        self.lean = ref.lean_copy()
        self.with_context = dataclasses.replace(self.lean, context=ref.context)
        self.context_left = 0  # lean chunks still to send with the context variables
        self.star = star
        self.full_left = 0  # chunks still to send with the whole function
        # A large function is written once where the workers read it (worker.BlobFile),
        # not pickled into each chunk that carries it; written when first needed.
        self.blob_file: Optional[BlobFile] = None
        self.whole = ref
        self.big = (ref.blob is not None and len(ref.blob) >= BLOB_FILE_MIN_BYTES
                    and BlobFile.available())
        # Pickled bytes that crossed to workers: every chunk's items, the function inside
        # the chunks that carried it, and what workers read of a blob file.
        self.bytes_sent = 0
        self.pointed: set[int] = set()  # chunks (by start) sent pointing at the blob file

    def open(self, n_workers: int) -> tuple[Any, Optional[StartupProbe]]:
        executor, cold, _ = _get(n_workers)
        # One whole ref per worker, about: the others carry its key alone, and a worker
        # that lacks it asks (NEED_FUNCTION) and gets the chunk again, whole. None when
        # this pool was given this very function (same key) by an earlier map: its
        # workers keep it.
        self.full_left = 0 if given_before(executor, self.ref.key) else n_workers
        # The caller's context variables the same way, on their own: chunks carry them
        # (with the function's key alone) until each worker has had them about once.
        self.context_left = 0 if self.ref.context_key is None or given_before(
            executor, f"context:{self.ref.context_key}") else n_workers
        return executor, current_probe(executor) if cold else None

    def _whole(self) -> FunctionRef:
        if self.big and self.blob_file is None:
            assert self.ref.blob is not None
            try:
                self.blob_file = BlobFile(self.ref.blob)
                self.whole = dataclasses.replace(self.ref, blob=None,
                                                 blob_at=self.blob_file.at)
            except OSError:  # no room in memory, or no memfd: in the chunks, as before
                self.big = False
        return self.whole

    def capacity(self) -> int:
        return pool_size()

    def submit(self, executor: Any, chunk: list[Any], start: int, full: bool = False
               ) -> cf.Future:
        payload = dumps(chunk)  # raises when an item cannot be pickled
        if self.full_left > 0:
            self.full_left -= 1
            full = True
        ref = self.lean
        if not full and self.context_left > 0:
            self.context_left -= 1
            ref = self.with_context
            self.bytes_sent += len(ref.context or b"")
            note_given(executor, f"context:{self.ref.context_key}")
        if full:
            if self.ref.context_key is not None:  # (the whole ref carries them too)
                self.context_left = max(0, self.context_left - 1)
                note_given(executor, f"context:{self.ref.context_key}")
            ref = self._whole()
            if self.blob_file is not None:
                if start in self.pointed:
                    # Its worker was pointed at the function and could not read it there
                    # (not allowed, or not this machine): it comes inside the chunk.
                    ref = self.ref
                self.pointed.add(start)
            self.bytes_sent += ref.size()
            note_given(executor, self.ref.key)
        self.bytes_sent += len(payload)
        clock = None
        if self.clock is not None:
            clock = self.clock.slot()
            self.slots[start] = clock[3]
        _state.submits += 1
        try:
            fut = executor.submit(run_chunk, ref, start, payload, self.star, clock)
        except Exception as exc:
            if is_gone(executor):
                raise PoolGone() from exc
            raise
        if clock is not None:
            with _clock_lock:
                _in_flight.setdefault(executor, set()).add(clock[3])
            fut.add_done_callback(functools.partial(_back_from_worker, executor, clock[3]))
        fut.add_done_callback(functools.partial(_note_break, executor))
        _end_first_at_exit()
        return fut

    def decode(self, res: ChunkResult) -> tuple[list[Any], Optional[BaseException]]:
        self.bytes_sent += res.function_bytes  # read from the blob file by its worker
        return decode(res)

    def is_death(self, exc: BaseException) -> bool:
        name = type(exc).__name__
        return name in ("TerminatedWorkerError", "BrokenProcessPool", "ShutdownExecutorError")

    def describe_death(self, exc: BaseException) -> tuple[Optional[int], str]:
        # The dead worker's exit code, from loky's message ("{EXIT(13)}", "{SIGKILL(-9)}").
        match = re.search(r"\((-?\d+)\)", str(exc))
        code = int(match.group(1)) if match else None
        if code is None:
            return None, "exit code unknown"
        if code < 0:
            try:
                return code, f"signal {signal.Signals(-code).name}"
            except ValueError:
                return code, f"signal {-code}"
        return code, f"exit code {code}"

    def recover(self, executor: Any, failed: Any, n_workers: int) -> tuple[Any, bool]:
        deliberate = ended_on_purpose(failed)
        mark_broken(failed)
        if is_gone(executor):
            try:
                executor, _ = self.open(n_workers)
            except PoolGone:
                pass  # the interpreter is ending: what is left runs in the caller (_send)
        return executor, deliberate

    def cancel(self, fut: cf.Future, executor: Any) -> None:
        # A pool being ended fails its queued futures itself; one cancelled by us
        # meanwhile made loky's manager thread print InvalidStateError (it sets an
        # exception on every queued future, cancelled or not).
        if not is_gone(executor):
            fut.cancel()

    def finish(self, executor: Any, probe: Optional[StartupProbe]) -> None:
        if probe is not None and probe.startup_s is not None and probe.path is not None:
            calibration.record_startup(probe.startup_s, pool_size(), probe.path)
        if not calibration.overheads_measured():
            # Once per process, in the background: the map's results are not held back.
            OverheadProbe.start(executor, pool_size())

    def ran_where_it_broke(self, start: int, executor: Any, exc: BaseException
                           ) -> Optional[Any]:
        """Was the chunk at ``start`` in a worker that had died when ``executor`` broke?
        False: it was in a live one, killed only as loky ended the pool, or in none while
        each dead worker was running another chunk (another thread's maybe); NOT_BEGUN:
        in none, and a dead worker may have died taking it up; None when not known (no
        clock, no dead worker noted). Asked before the pool is ended from here (which
        kills the live workers too), and waits briefly for the note: a future's waiters
        wake before its callbacks run."""
        slot = self.slots.get(start)
        if (self.clock is None or slot is None or type(exc).__name__ not in _DEATHS
                or ended_on_purpose(executor)):
            return None  # no worker died: ended by us (a time-out, Ctrl-C, growth)
        _break_noted(executor).wait(BREAK_NOTE_WAIT_S)
        dead = _dead_at_break.get(executor)
        if not dead:
            return None
        pid = self.clock.ran_by(slot)
        if pid is None and not _deaths_explained.get(executor, False):
            return NOT_BEGUN  # spared a bounded number of times (dispatch.SPARED_MAX)
        return pid is not None and pid in dead

    def item_started(self, start: int) -> Optional[float]:
        """When the chunk at ``start`` began running in its worker (monotonic seconds);
        None when not yet, or not known."""
        slot = self.slots.get(start)
        if self.clock is None or slot is None:
            return None
        return self.clock.started(slot)

    def initializer_started(self, start: int) -> Optional[float]:
        """When the worker that took the chunk at ``start`` began the map's initializer,
        which has not returned (monotonic seconds); None otherwise, or not known."""
        slot = self.slots.get(start)
        if self.clock is None or slot is None:
            return None
        return self.clock.initializing(slot)

    def check(self, executor: Any) -> None:
        end_if_stuck(executor)

    def close(self, executor: Any, clean: bool, interrupted: bool = False) -> None:
        if self.blob_file is not None:
            self.blob_file.close()
        if interrupted:
            # Ctrl-C: end the workers too, so that nothing runs on and nothing is left.
            mark_broken(executor, on_purpose=True)
        elif clean or _answered(executor):
            # Also after a map ended by its function's exception: the pool stays, up, and
            # the next map's plan must not count a start-up for it (it said "pool
            # already running: no" while its workers took that map at once).
            mark_warm(executor)


# --- measuring the pool (calibration.py keeps what is measured) ---------------------------

_BYTES_PROBE = 2 << 20  # 2 MiB: large enough that per-task overhead is noise next to it
_N_NOOPS = 16


def measure_overheads(executor: Any, n_workers: int) -> tuple[float, float]:
    """(per-task overhead, per-byte cost) on a warm, idle pool.

    Run when the caller is idle too: a caller busy in Python holds the GIL that loky's
    feeder thread needs, which would inflate every round trip measured here.
    """
    t0 = time.perf_counter()
    futures = [executor.submit(noop, i) for i in range(_N_NOOPS)]
    for f in futures:
        f.result()
    # The no-ops ran n_workers at a time: per task, each worker paid elapsed/_N_NOOPS*W.
    overhead = (time.perf_counter() - t0) * n_workers / _N_NOOPS
    t0 = time.perf_counter()
    executor.submit(bytes_of, _BYTES_PROBE).result()
    byte_cost = max(0.0, time.perf_counter() - t0 - overhead) / _BYTES_PROBE
    return overhead, max(byte_cost, 1e-11)


class OverheadProbe:
    """``measure_overheads`` without anyone waiting: after a map's last result, the probe's
    tasks are queued and their callbacks (on loky's thread) time them; the caller returns
    its results at once (the wait was ~13 ms of every map that measured, the first of a
    process on a machine whose cache holds no calibration). A map that submits anything
    before the probe ends makes it measure a busy pool: it is then discarded, and the
    next map's end tries again."""

    def __init__(self, executor: Any, n_workers: int):
        self.n_workers = n_workers
        self.submits = _state.submits
        self._lock = threading.Lock()  # guards the fields below
        self._noops_left = _N_NOOPS
        self._left = _N_NOOPS + 1  # every task, the bytes' included
        self.overhead_s: Optional[float] = None
        self.byte_cost_s: Optional[float] = None
        self.ended = False  # every task has ended (set under _state.lock)
        self.t0 = time.perf_counter()
        futures = [executor.submit(noop, i) for i in range(_N_NOOPS)]
        # Queued behind the no-ops: it starts as they end. Its worker stamps when the
        # bytes exist; their way back to here (pickled, piped, read) is the byte cost.
        last = executor.submit(stamped_bytes, _BYTES_PROBE)
        for f in futures:
            f.add_done_callback(self._noop_done)
        last.add_done_callback(self._bytes_done)

    @classmethod
    def start(cls, executor: Any, n_workers: int) -> None:
        with _state.lock:
            if _state.overhead_probe is not None:
                return  # one at a time
            _state.overhead_probe = True  # reserved; the probe itself below
        try:
            probe: Optional[OverheadProbe] = cls(executor, n_workers)
        except Exception:  # the pool went away meanwhile: a later map measures
            probe = None
        with _state.lock:
            # A probe that ended before this line (its callbacks run on loky's thread)
            # must not stay noted as under way: no other would ever start.
            _state.overhead_probe = probe if probe is not None and not probe.ended else None

    def _noop_done(self, fut: Any) -> None:
        now = time.perf_counter()
        ok = not fut.cancelled() and fut.exception() is None
        with self._lock:
            self._noops_left -= 1
            if self._noops_left == 0 and ok:
                # The no-ops ran n_workers at a time: per task, each worker paid
                # elapsed / _N_NOOPS * n_workers.
                self.overhead_s = (now - self.t0) * self.n_workers / _N_NOOPS
        self._one_done()

    def _bytes_done(self, fut: Any) -> None:
        arrived = time.monotonic()
        if not fut.cancelled() and fut.exception() is None:
            stamp, _ = fut.result()
            with self._lock:
                self.byte_cost_s = max(max(arrived - stamp, 0.0) / _BYTES_PROBE, 1e-11)
        self._one_done()

    def _one_done(self) -> None:
        """Callbacks come in the order tasks end, not the order they were sent: the
        figures are kept once every task has ended (a failed one leaves them None)."""
        with self._lock:
            self._left -= 1
            if self._left:
                return
            overhead, byte_cost = self.overhead_s, self.byte_cost_s
        if overhead is not None and byte_cost is not None and _state.submits == self.submits:
            calibration.record_overheads(overhead, byte_cost)
        with _state.lock:
            self.ended = True
            if _state.overhead_probe is self:
                _state.overhead_probe = None


class StartupProbe:
    """Pings submitted to a cold pool ahead of real work: when every ping has answered,
    the pool is up, and the time it took is the start-up cost. Callbacks run on loky's
    thread; ``first`` lets the caller stop working through items as soon as any worker
    is ready."""

    def __init__(self, executor: Any, n_workers: int, created_at: float,
                 path: Optional[str] = starts.EXEC):
        self.created_at = created_at
        self.path = path  # the start path measured; None: not a measure of one
        self.first = threading.Event()
        self._lock = threading.Lock()  # guards _left and startup_s
        self._left = n_workers
        self.startup_s: Optional[float] = None
        self.n_workers = n_workers
        # Set once its pings are queued: loky spawns every worker on the first submit,
        # and any other submit waits for that meanwhile (a template's workers wait for
        # the template's own start, ~0.1 s). The dispatcher runs items in the caller
        # until then (dispatch.ParallelRun.run) rather than wait.
        self.sent = threading.Event()
        self._unsettled = 0  # pings sent that neither answered nor failed yet

    def send(self, executor: Any) -> None:
        """Queue the pings, which makes loky spawn the workers (on this thread). Until
        each has answered or failed, the GIL changes hands faster (system.fast_switching):
        the workers are spawned, and their first work sent, by threads of this process
        while the caller runs items (small@threaded: the workers' first items 84-87 ms
        after the call instead of 95-130)."""
        sent = 0
        try:
            # Inside the try: a Ctrl-C landing here still lets go (below).
            with self._lock:
                self._unsettled = self.n_workers
            system.fast_switching(True)
            for _ in range(self.n_workers):
                try:
                    fut = executor.submit(ping, 0.005)
                except RuntimeError as exc:
                    if not system.shutting_down():
                        if is_gone(executor):
                            # Another thread's map ended this pool between its making
                            # and these pings (an imap of its closed early, a time-out,
                            # Ctrl-C): loky's ShutdownExecutorError came out of this
                            # map, where the loop returned. No worker will answer: the
                            # map sends its chunks, finds the pool gone (PoolGone) and
                            # takes the current one.
                            self.first.set()
                            return
                        raise
                    # The interpreter began to end since the pool was made: loky started
                    # its manager thread but could not register its exit hook. Told to
                    # end here, that thread does not hold the exit.
                    executor.shutdown(wait=False, kill_workers=True)
                    raise PoolGone() from exc
                fut.add_done_callback(self._done)
                sent += 1
        finally:
            self.sent.set()
            self._settle(self.n_workers - sent)  # those never sent never answer

    def _settle(self, n: int) -> None:
        with self._lock:
            if n <= 0 or self._unsettled <= 0:
                return
            self._unsettled -= n
            last = self._unsettled <= 0
        if last:
            system.fast_switching(False)

    def _done(self, fut: Any) -> None:
        now = time.perf_counter()
        self.first.set()
        self._settle(1)
        if fut.cancelled() or fut.exception() is not None:
            return
        with self._lock:
            self._left -= 1
            if self._left == 0:
                self.startup_s = now - self.created_at


def calibrate(n_workers: Optional[int] = None) -> Calibration:
    """Start a fresh pool, measure it, keep the result for this process, and return it."""
    from ..system import usable_cpus

    most = usable_cpus()
    if n_workers is not None and (isinstance(n_workers, bool) or not isinstance(n_workers, int)
                                  or not 1 <= n_workers <= most):
        # A pool larger than any map may use measures nothing a plan reads, and
        # calibrate(100000) forked workers until the machine stalled.
        msg = (f"n_workers must be an integer from 1 to {most} (the CPUs this process may "
               f"use), or None for all of them; got {n_workers!r}")
        raise ValueError(msg)
    w = n_workers or most
    # What earlier processes stored is read first, so that it does not then replace
    # (and name as "measured earlier") what this call measures.
    calibration.get()
    for _ in range(2):
        executor, created_at = fresh_executor(w)
        probe = current_probe(executor)
        if probe is None:
            probe = StartupProbe(executor, w, created_at, _state.path)
            probe.send(executor)
        executor.submit(noop, 0).result()
        deadline = time.perf_counter() + 60
        while probe.startup_s is None and time.perf_counter() < deadline:
            time.sleep(0.001)
        if probe.path is not None:
            break
        # No measure of the path: its template started with this pool, and its own
        # start is in the time. Measured again from the template now up (a threaded
        # caller's first calibrate() returned the default start-up, as if measured).
    if probe.startup_s is not None and probe.path is not None:
        calibration.record_startup(probe.startup_s, w, probe.path, smooth=False)
    mark_warm(executor)
    calibration.record_overheads(*measure_overheads(executor, w))
    calibration.save()  # for this machine's later processes
    return calibration.get(_state.path)
