"""The dask.distributed backend: the same maps, on a running cluster.

We use dask as it is and build no scheduler of our own: a chunk is one dask task, and
dask places it, moves data, and re-runs the tasks of a worker that died. What we add is
what the loky backend does too: chunks sized from measurements, bounded work in flight,
results in order, a failing item's index and traceback (dispatch.ParallelRun runs the
same loop over this target as over the local pool).

    caller thread (ParallelRun)              scheduler                  workers
    ---------------------------              ---------                  -------
    open:   scatter(FunctionRef, broadcast) ------------------------> every worker,
                                                                       once per map
                                                   (again if all its holders died)
    submit: client.submit(run_chunk, ref future, start, pickled chunk,
                          pure=False, retries=1) ------> placement ----> run_chunk
    cf.Future <- set_result / set_exception <- Dask-Callback-Thread <- ChunkResult
                 (the callback gathers the result, then frees it on the worker)

The loop waits with ``concurrent.futures.wait`` on the bridged futures, unchanged.

``distributed`` is imported only here, and only when a map asks for it (``backend="dask"``
or ``client=``) or, for ``backend="auto"``, when the process has already imported it
(a client can only exist then): importing it costs ~0.35 s here, and importing
adaptive_exec starts nothing (STYLE 7). A worker that runs our chunks imports only
``adaptive_exec.worker`` (and ``calibration`` for the measurement tasks), not this module.
"""

from __future__ import annotations

import atexit
import concurrent.futures as cf
import dataclasses
import functools
import importlib.util
import logging
import os
import sys
import threading
import time
import uuid
from typing import Any, Optional

from .. import cache
from ..errors import ClusterError, MissingDependencyError, WorkerCrashedError
from ..records import Calibration
from ..worker import (
    ChunkResult,
    FunctionRef,
    bytes_of,
    decode,
    dumps,
    forget_function,
    noop,
    run_chunk,
    this_process,
)

logger = logging.getLogger("adaptive_exec")

ENV_ADDRESS = "ADAPTIVE_EXEC_DASK_ADDRESS"
# How long a map waits for a cluster without workers to get one (an adaptive cluster
# scaling from zero starts one in seconds). A judgement.
WAIT_FOR_WORKERS_S = 30.0
INSTALL_HINT = 'pip install "adaptive_exec[dask]"'
# A chunk task re-runs once if it raised outside the user's function (our own code: the
# user's exceptions come back inside the ChunkResult and are never retried). A worker
# that dies is another matter: the scheduler re-runs its tasks elsewhere by itself, up to
# distributed.scheduler.allowed-failures times (3 by default), then reports KilledWorker
# (scheduler.py, remove_worker: worker deaths do not count against ``retries``).
RETRIES = 1
# Measuring a cluster: a warm-up task, then a burst of no-ops (at least this many, four
# per worker thread, at most _MAX_NOOPS) for the per-task cost, and round trips with and
# without a 2 MiB result for the per-byte cost. About 0.1 s on a busy local cluster.
_MIN_NOOPS = 16
_MAX_NOOPS = 256
_N_ROUND_TRIPS = 3
_BYTES_PROBE = 2 << 20
# No cluster moves bytes between processes faster than memory copies them (~0.1 ns/B).
_MIN_BYTE_COST_S = 1e-10
# For a cluster with no worker yet: DESIGN.md's figure for one task on a local cluster
# (1.7 ms), and a guess for the bytes (about three times the local pool's 3 ns per byte).
UNMEASURED = Calibration(0.0, 1.7e-3, 1e-8, 1,
                         "defaults for a dask cluster (no worker to measure on yet)")
# Asking the scheduler for its threads is a round trip (1-10 ms measured here); a serial
# run re-plans between chunks as short as 20 ms, so a count this recent is reused.
_THREADS_FRESH_S = 1.0
# A chunk's pickled items at least this large are scattered to a worker first, not
# sent inside the task (dask warns of a "large graph" from 10 MB on). A judgement.
SCATTER_ITEMS_MIN_BYTES = 1 << 20
# A map's function at least this large (with what it captured) is let go on the
# workers at the map's end (DaskTarget.close); smaller ones go with the bound on count.
FORGET_MIN_BYTES = 1 << 20
_LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1", "[::1]", "0.0.0.0")


# --- is it there, and which client -------------------------------------------------


def installed() -> bool:
    """Whether distributed can be imported, without importing it."""
    try:
        return importlib.util.find_spec("distributed") is not None
    except (ImportError, ValueError):  # a broken or half-imported package
        return False


def require() -> Any:
    """The ``distributed`` module, or an error naming the extra that provides it."""
    try:
        import distributed
    except ImportError as exc:
        msg = (f"backend='dask' needs dask.distributed, which is not installed: "
               f"{INSTALL_HINT}")
        raise MissingDependencyError(msg) from exc
    return distributed


def check_client(client: Any) -> None:
    """Raise TypeError unless ``client`` is a dask.distributed Client."""
    distributed = sys.modules.get("distributed")  # a Client exists only if it is imported
    if distributed is None or not isinstance(client, distributed.Client):
        msg = ("client must be a dask.distributed Client (or None: the current client, "
               f"else one at {ENV_ADDRESS}), got {type(client).__name__}")
        raise TypeError(msg)


def in_task() -> bool:
    """Whether this thread runs a dask task: a map there runs serially, as a map inside
    a loky worker does (a task that fans out again would oversubscribe the cluster)."""
    worker_module = sys.modules.get("distributed.worker")
    if worker_module is None:
        return False
    try:
        worker_module.get_worker()
    except ValueError:
        return False
    return True


def _usable(client: Any) -> bool:
    # A blocking map needs a running, synchronous client.
    return getattr(client, "status", None) == "running" and not getattr(
        client, "asynchronous", False)


def current_client() -> Any:
    """The client active in this process (``Client.current()``: the one of an
    ``as_current()`` block, else the default one), or None. Never imports
    distributed and never creates a client: for ``backend="auto"``."""
    distributed = sys.modules.get("distributed")
    if distributed is None or in_task():
        return None
    try:
        client = distributed.Client.current(allow_global=True)
    except ValueError:  # no client at all
        return None
    return client if _usable(client) else None


class _State:
    """Clients this module opened (from ENV_ADDRESS) and each cluster's measured
    constants, shared by every thread of the process."""

    def __init__(self) -> None:
        self.lock = threading.Lock()  # guards clients and calibrations
        self.clients: dict[str, Any] = {}
        self.calibrations: dict[str, Calibration] = {}
        # client id -> (workers, threads, when)
        self.threads: dict[str, tuple[int, int, float]] = {}
        # Held while a cluster is measured, so that two threads starting maps at once
        # measure it once (the measurement is ~50 ms; the other thread waits for it).
        self.measuring = threading.Lock()
        self.exit_registered = False


_state = _State()


def resolve(client: Any = None) -> Any:
    """The client for ``backend="dask"``: ``client`` if given, else the current one,
    else one connected to ``$ADAPTIVE_EXEC_DASK_ADDRESS`` (kept for the process)."""
    distributed = require()
    if client is not None:
        if not _usable(client):
            msg = (f"the dask client given is not usable (status {client.status!r}"
                   f"{', asynchronous' if client.asynchronous else ''}): a map needs a "
                   "running, synchronous Client")
            raise ValueError(msg)
        return client
    try:
        current = distributed.Client.current(allow_global=True)
    except ValueError:
        current = None
    if current is not None and _usable(current):
        return current
    address = os.environ.get(ENV_ADDRESS, "").strip()
    if not address:
        msg = ("backend='dask' found no dask client: pass client=, create a "
               f"distributed.Client first, or set {ENV_ADDRESS} to the scheduler's address")
        raise ValueError(msg)
    _check_address(address)
    with _state.lock:
        client = _state.clients.get(address)
        if client is not None and _usable(client):
            return client
        try:
            # Not made the default client: the user's own dask code must not start
            # sending its work to a cluster that only we were told about.
            client = distributed.Client(address, set_as_default=False)
        except OSError as exc:
            msg = f"cannot reach the dask scheduler at {address} ({ENV_ADDRESS}): {exc}"
            raise OSError(msg) from exc
        _state.clients[address] = client
        if not _state.exit_registered:
            _state.exit_registered = True
            atexit.register(close_clients)
    return client


def _check_address(address: str) -> None:
    """Raise ValueError, naming the variable, for an address no scheduler can have
    (distributed's own error did not name it, and the half-built client it left held
    the interpreter's exit for 60 s)."""
    from distributed.comm import registry
    from distributed.comm.addressing import parse_address, parse_host_port

    try:
        scheme, location = parse_address(address)
        registry.get_backend(scheme)
        if scheme in ("tcp", "tls", "ws", "wss"):
            parse_host_port(location)  # a port is required
    except (ValueError, TypeError) as exc:
        msg = (f"{ENV_ADDRESS}={address!r} is not a dask scheduler's address ({exc}); "
               "set it to one such as tcp://10.0.0.5:8786")
        raise ValueError(msg) from None


def close_clients() -> None:
    """Close the clients this module opened from ENV_ADDRESS (tests; interpreter exit)."""
    with _state.lock:
        clients, _state.clients = list(_state.clients.values()), {}
    for client in clients:
        try:
            client.close()
        except Exception as exc:  # closing at exit must not raise
            logger.debug("closing a dask client: %r", exc)


def address(client: Any) -> str:
    return str(client.scheduler.address)


def n_threads(client: Any) -> int:
    """Worker threads of the whole cluster, as the scheduler knew them at most
    _THREADS_FRESH_S ago."""
    return _workers_and_threads(client)[1]


def n_workers(client: Any) -> int:
    """Worker processes of the cluster, as fresh as ``n_threads``."""
    return _workers_and_threads(client)[0]


def _workers_and_threads(client: Any) -> tuple[int, int]:
    now = time.monotonic()
    with _state.lock:
        seen = _state.threads.get(client.id)
    if seen is not None and now - seen[2] < _THREADS_FRESH_S:
        return seen[0], seen[1]
    threads = client.nthreads()
    workers, count = len(threads), int(sum(threads.values()))
    with _state.lock:
        _state.threads[client.id] = (workers, count, now)
    return workers, count


def cluster_key(scheduler_address: str) -> str:
    """The cache's name for a cluster's constants. A remote scheduler is its address; a
    local one gets a new port every time it starts, so it is named by scheme and this
    machine instead: its costs are this machine's, whatever the port."""
    scheme, sep, rest = scheduler_address.partition("://")
    if not sep:
        scheme, rest = "tcp", scheduler_address
    host = rest.rsplit(":", 1)[0] if rest.count(":") == 1 or rest.startswith("[") else rest
    if scheme == "inproc" or host in _LOOPBACK_HOSTS:
        return f"dask:{scheme}://local@{cache.machine_id()}"
    return f"dask:{scheme}://{rest}"


# --- the cluster's constants ---------------------------------------------------------


def measure(client: Any, threads: int) -> tuple[float, float]:
    """(per-task overhead, per-byte cost) of this cluster, seen from this process.

    The per-task overhead is what the planner's cost model means by it (as for loky):
    the time a worker thread loses per task when tasks come back to back, i.e. the
    burst's elapsed time times the threads, over the tasks. It covers the scheduler,
    the network and our client's share of each round trip.
    """
    try:
        client.submit(noop, 0, pure=False).result()  # the workers import adaptive_exec
    except ImportError as exc:
        msg = ("adaptive_exec is not importable on the dask cluster's workers: install it "
               f"there too (its tasks run adaptive_exec.worker): {exc}")
        raise MissingDependencyError(msg) from exc
    latency = min(_round_trip(client, noop, 1) for _ in range(_N_ROUND_TRIPS))
    n = min(_MAX_NOOPS, max(_MIN_NOOPS, 4 * threads))
    t0 = time.perf_counter()
    client.gather(client.map(noop, range(n), pure=False))
    overhead = (time.perf_counter() - t0) * min(threads, n) / n
    # The bytes' share is a difference of two round trips of ~10 ms each on a busy local
    # cluster (measured: 8-12 ms without bytes, 9-10 ms with 2 MiB): the fastest of a
    # few of each, so that one slow trip does not make bytes look free or dear.
    with_bytes = min(_round_trip(client, bytes_of, _BYTES_PROBE) for _ in range(_N_ROUND_TRIPS))
    byte_cost = max(with_bytes - latency, 0.0) / _BYTES_PROBE
    return max(overhead, 1e-6), max(byte_cost, _MIN_BYTE_COST_S)


def _round_trip(client: Any, func: Any, arg: int) -> float:
    t0 = time.perf_counter()
    client.submit(func, arg, pure=False).result()
    return time.perf_counter() - t0


def calibration_for(client: Any, threads: int) -> Calibration:
    """The cluster's constants: measured in this process, else remembered in the cache
    (for the same number of worker threads: the per-task cost per thread depends on
    it), else measured now and remembered. A running cluster has no start-up to pay."""
    if threads < 1:
        return UNMEASURED  # no worker to measure on yet; tasks will wait for one
    key = cluster_key(address(client))
    with _state.lock:
        known = _state.calibrations.get(key)
    if known is not None and known.n_workers == threads:
        return known
    with _state.measuring:
        with _state.lock:
            known = _state.calibrations.get(key)
        if known is not None and known.n_workers == threads:
            return known
        stored = cache.load_calibration(machine=key)
        if stored is not None and stored.n_workers == threads:
            calib = Calibration(0.0, stored.task_overhead_s, stored.byte_cost_s, threads,
                                f"measured earlier on this dask cluster ({key}, cache)")
        else:
            overhead, byte_cost = measure(client, threads)
            calib = Calibration(0.0, overhead, byte_cost, threads,
                                f"measured on this dask cluster ({key})")
            logger.debug("dask cluster %s: %.2f ms per task, %.2f ns per byte", key,
                         overhead * 1e3, byte_cost * 1e9)
            cache.store_calibration(calib, machine=key)
        with _state.lock:
            _state.calibrations[key] = calib
    return calib


# --- chunks as tasks -------------------------------------------------------------------


class _Bridge(cf.Future):
    """A concurrent.futures.Future settled by a dask future, so that the dispatch loop
    waits on dask tasks with ``concurrent.futures.wait`` as on loky's. Cancelling it
    releases the dask future: the scheduler then drops the task if it has not started
    (a running one finishes on its worker, unwatched)."""

    def __init__(self, dask_future: Any):
        super().__init__()
        self.dask_future: Any = dask_future

    def cancel(self) -> bool:
        if not super().cancel():
            return False
        dask_future, self.dask_future = self.dask_future, None
        if dask_future is not None:
            dask_future.release()  # thread-safe and non-blocking (distributed's note)
        return True


def _client_closed(client: Any) -> bool:
    return getattr(client, "status", None) in ("closing", "closed")


def _is_comm_error(exc: BaseException) -> bool:
    # dask's own comm errors (CommClosedError...), not an OSError our task raised.
    return isinstance(exc, OSError) and type(exc).__module__.startswith("distributed.comm")


def _translate(exc: BaseException, start: int, n: int, client_closed: bool = False
               ) -> BaseException:
    """A dask-side failure of a chunk, as the dispatch loop understands it."""
    span = f"items {start}..{start + n - 1}"
    if type(exc).__name__ == "KilledWorker":
        allowed = getattr(exc, "allowed_failures", None)
        tries = f"{allowed + 1} workers" if isinstance(allowed, int) else "its workers"
        msg = (f"{span} killed {tries} of the dask cluster, each time it ran there "
               "(dask's KilledWorker)")
        err: BaseException = WorkerCrashedError(msg, index=start)
    elif (client_closed and (isinstance(exc, (cf.CancelledError, OSError)) or (
            isinstance(exc, RuntimeError) and "ConnectionPool is closed" in str(exc)))) or (
            _is_comm_error(exc)):
        # The result was being fetched when the client closed or the connection to
        # the scheduler dropped: dask says "Stream is closed" (CommClosedError), or,
        # where the client's connections were closed first, "ConnectionPool is closed"
        # (a RuntimeError: it ended the map as itself, in CI at 074722f).
        why = ("its client was closed" if client_closed
               else f"the connection to the cluster was lost: {exc}")
        err = ClusterError(f"cannot fetch the results of {span} from the dask cluster: "
                           f"{why}")
    elif isinstance(exc, cf.CancelledError):
        # Not our cancel (that one is never settled): the scheduler dropped the task,
        # because the function's copies were lost with the workers that held them
        # (scattered data cannot be recomputed), or it was restarted. The loop runs
        # such a chunk again, as after a worker death; cf.CancelledError would make it
        # skip the chunk.
        msg = f"the dask cluster dropped the task of {span}: {exc}"
        err = ClusterError(msg)
    else:
        return exc  # raised by our code in the task (ResultPicklingError...): as is
    err.__cause__ = exc
    return err


class DaskTarget:
    """Chunks go to a dask cluster, one task each; the function goes once per map."""

    remote = True  # a failing item's traceback is text from a worker process

    def __init__(self, client: Any, ref: FunctionRef, star: bool):
        self.client = client
        # A key of this map's own: the workers outlive this process and serve others,
        # and their function cache (worker._FUNCTIONS) must not hand this map the
        # function of another map whose fingerprint happens to match.
        # The caller's working directory and sys.path stay here: a cluster's workers
        # serve others and may run on other machines.
        # A worker that is a thread of this process (processes=False) leaves this
        # process's modules as they are (FunctionRef.home).
        self.ref = dataclasses.replace(ref.without_context(),
                                       key=f"{ref.key}-{uuid.uuid4().hex}",
                                       home=this_process())
        self.star = star
        self.ref_future: Any = None
        # Set on dask's callback thread when a task was dropped: the function's copies
        # may have died with their workers, so the next chunk sends it again.
        self.dropped = threading.Event()
        # Pickled bytes handed to the cluster's workers (RunReport.bytes_sent): the
        # function once per worker it was broadcast to, and each chunk's items.
        self.bytes_sent = 0

    def open(self, n_workers: int) -> tuple[Any, None]:
        if not self.client.nthreads():
            # No worker yet (one scaling from zero, or started without any): the
            # function's broadcast would wait 30 s, then fail with dask's bare
            # "TimeoutError: No valid workers found". Wait for one, then say what is wrong.
            try:
                self.client.wait_for_workers(1, timeout=WAIT_FOR_WORKERS_S)
            except Exception as exc:  # TimeoutError (distributed's own or the builtin)
                msg = (f"the dask cluster at {self.client.scheduler.address} has no "
                       f"workers (waited {WAIT_FOR_WORKERS_S:g} s for one): start some, "
                       "or map without client=/backend='dask'")
                raise ClusterError(msg) from exc
        self._send_function()
        return self.client, None  # a running cluster: no start-up probe

    def capacity(self) -> int:
        return n_threads(self.client)

    def cancel(self, fut: cf.Future, executor: Any) -> None:
        fut.cancel()  # the bridge releases its dask future

    def is_death(self, exc: BaseException) -> bool:
        return False  # a lost task arrives as ClusterError, a given-up one as KilledWorker

    def describe_death(self, exc: BaseException) -> tuple[Optional[int], str]:
        return None, str(exc)

    def finish(self, executor: Any, probe: Any) -> None:
        pass  # the cluster's constants are measured on first use (calibration_for)

    def recover(self, executor: Any, failed: Any, n_workers: int) -> tuple[Any, bool]:
        # The scheduler re-runs lost tasks itself; the function goes out again on the
        # next submit when its copies were lost (``dropped``).
        return executor, False

    def _send_function(self) -> None:
        # Sent to every worker now, once: each chunk's task then names it, so a large
        # object the function captured crosses the network once per worker, not once
        # per task. hash=False: a key of this map's own, released when the map ends.
        old, self.ref_future = self.ref_future, None
        if old is not None:
            old.release()
        self.ref_future = self.client.scatter(self.ref, broadcast=True, hash=False)
        # (Broadcast: one copy to each worker; their count was read, a moment ago, by
        # open's check or the plan's, so this is no round trip of its own.)
        self.bytes_sent += self.ref.size() * max(n_workers(self.client), 1)

    def submit(self, executor: Any, chunk: list[Any], start: int, full: bool = False
               ) -> cf.Future:
        payload = dumps(chunk)  # raises when an item cannot be pickled: the caller runs it
        try:
            if self.dropped.is_set() or self.ref_future.status != "finished":
                # Every worker that held the function died (a restarted one starts
                # empty): dask cannot recompute scattered data, so it goes out again.
                self.dropped.clear()
                self._send_function()
            items: Any = payload
            if len(payload) >= SCATTER_ITEMS_MIN_BYTES:
                # Straight to a worker, not inside the task through the scheduler: 60
                # items of 2 MiB gave dask's "Sending large graph of size 30.00 MiB"
                # UserWarning five times a map (its advice is not the user's to
                # follow), and under -W error the map raised ClusterError where the
                # loop ran. The task depends on it; it is freed with the task.
                items = executor.scatter(payload, hash=False)
            dask_future = executor.submit(run_chunk, self.ref_future, start, items,
                                          self.star, pure=False, retries=RETRIES)
            self.bytes_sent += len(payload)
        except Exception as exc:  # the client closed, the scheduler is gone...
            # A closed client fails inside dask ("'NoneType' object has no attribute
            # 'scatter'"): said as what happened.
            why = "its client was closed" if _client_closed(self.client) else str(exc)
            msg = (f"cannot send items {start}..{start + len(chunk) - 1} to the dask "
                   f"cluster: {why}")
            raise ClusterError(msg) from exc
        bridge = _Bridge(dask_future)
        dask_future.add_done_callback(
            functools.partial(_settle, bridge, start, len(chunk), self.dropped))
        return bridge

    def decode(self, res: ChunkResult) -> tuple[list[Any], Optional[BaseException]]:
        return decode(res)

    def check(self, executor: Any) -> None:
        pass  # the scheduler reports a lost worker's tasks itself

    def close(self, executor: Any, clean: bool, interrupted: bool = False) -> None:
        # Chunks still in flight were cancelled by the loop (their futures released);
        # the function's copies on the workers go with its future.
        ref_future, self.ref_future = self.ref_future, None
        if ref_future is not None:
            ref_future.release()
            # And the function as each worker rebuilt it (worker._FUNCTIONS), with what
            # it captured: its key is this map's own, never asked for again. Where that
            # is large: the message costs a round trip to the scheduler (~1.7 ms here,
            # 2.5% of a small map), for a few kB that the count bound frees anyway.
            # (Not after Ctrl-C, nor with the scheduler unreachable: a reconnecting
            # client would hold the map's end for its connect time-out.)
            if (self.ref.size() >= FORGET_MIN_BYTES and not interrupted
                    and _usable(self.client)):
                try:
                    self.client.run(forget_function, self.ref.key, wait=False)
                except Exception as exc:  # the cluster is gone: nothing to free there
                    logger.debug("freeing a map's function on the workers: %r", exc)


def _settle(bridge: _Bridge, start: int, n: int, dropped: threading.Event,
            dask_future: Any) -> None:
    """On dask's callback thread: fetch the chunk's result and settle the bridge."""
    if bridge.cancelled():
        return
    try:
        outcome: Any = dask_future.result()  # the result travels here, once
        failed = False
    except BaseException as exc:
        closed = _client_closed(getattr(dask_future, "client", None))
        outcome, failed = _translate(exc, start, n, closed), True
        if isinstance(outcome, ClusterError):
            dropped.set()
    finally:
        bridge.dask_future = None
        dask_future.release()  # the worker may free the result now
    try:
        if failed:
            bridge.set_exception(outcome)
        else:
            bridge.set_result(outcome)
    except cf.InvalidStateError:  # cancelled meanwhile: nobody waits for it
        pass
