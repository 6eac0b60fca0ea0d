"""Items sent to the pool while the caller still runs its first ones.

A map measures its function on its first items, in the caller. When one of those calls
runs long (a 500 ms function), deciding only once it returns is the stall of a
sample-then-decide design: two such items ran one after the other. So the sampling
watch (adapt.SamplingWatch), once it has started the pool, also hands it the next items,
one per worker, while the caller's call goes on; the map's parallel run
(dispatch.ParallelRun) takes them over, still in flight, when sampling ends.

    caller: item 0 (long) .......... [item 1, reserved] -> its sample ends
    watch:      pool up -> items 2, 3 to the workers, topped up as they finish
    ParallelRun: items 2, 3 in flight, then the rest, in index order

A call that waits (sleeping, on a socket, a child process, a lock) has the items behind
it sent to threads of this process instead, as the plan would run them
(adapt.SamplingWatch._send_to_threads): two 0.5 s waits took 1.06 s cold, one after
the other, where threads take 0.5 s.

Only a list's, tuple's or range's items are read from the watch's thread: a generator
is only ever advanced by the caller's own (a sqlite cursor, thread-local state).
"""

from __future__ import annotations

import collections
import concurrent.futures as cf
import threading
import time
from typing import Any, Iterator, Optional

from .dispatch import BUFFERED_PER_WORKER, IN_FLIGHT_PER_WORKER, Pending
from .worker import NEED_FUNCTION


class SharedSource:
    """The input, read one item at a time by the caller's sampling loop and by the
    watch, in order. Once the watch has taken over (``hand_over``), the caller gets the
    items reserved for it and then its loop ends: the caller's items stay the first ones,
    the pool's follow them."""

    def __init__(self, it: Iterator[Any]):
        self._it = it
        self._lock = threading.Lock()
        self.taken = 0  # items read so far, by either side
        # (index, item) read for the caller, not yet given to it; what is left of them
        # when sampling ends (the caller's loop had ended first) is ``leftover``.
        self.reserved: collections.deque[tuple[int, Any]] = collections.deque()
        self.leftover: list[tuple[int, Any]] = []
        self.handed = False  # the watch took over
        self.cut = False  # the caller's loop was ended by the hand-over (not by the input)
        self.closed = False  # sampling ended: the watch reads nothing more

    def __iter__(self) -> SharedSource:
        return self

    def __next__(self) -> Any:  # the caller's sampling loop
        with self._lock:
            if self.reserved:
                return self.reserved.popleft()[1]
            if self.handed:
                self.cut = True
                raise StopIteration
            item = next(self._it)
            self.taken += 1
            return item

    def hand_over(self, reserve: int) -> bool:
        """The watch takes over: ``reserve`` more items are kept for the caller (its
        sample then shows a second call: a first call's one-time cost is told from the
        next ones'). False when sampling already ended."""
        with self._lock:
            if self.closed:
                return False
            self.handed = True
            for _ in range(reserve):
                item = next(self._it, _END)
                if item is _END:
                    break
                self.reserved.append((self.taken, item))
                self.taken += 1
            return True

    def take(self) -> Optional[tuple[int, Any]]:
        """The next item for the pool, with its index; None once sampling ended or the
        input ran out."""
        with self._lock:
            if self.closed:
                return None
            item = next(self._it, _END)
            if item is _END:
                return None
            self.taken += 1
            return self.taken - 1, item

    def close(self) -> None:
        """Sampling ended: the watch takes nothing more. Items reserved for the caller
        that it did not take (its loop had ended just before the hand-over) are kept in
        ``leftover``, for the map to run in their turn: never dropped."""
        with self._lock:
            self.closed = True
            self.leftover = list(self.reserved)
            self.reserved.clear()

    def wants_more(self) -> bool:
        """Items are still reserved for the caller's sample."""
        return bool(self.reserved)

    def rest(self) -> Iterator[Any]:
        """What is left of the input, for the map to run (after ``close``)."""
        return self._it


_END = object()


class SentAhead:
    """The items the watch sent to the pool, one per task, topped up to one per worker
    as they finish, until sampling ends; then handed to the map's parallel run."""

    def __init__(self, source: SharedSource, target: Any, executor: Any, n_workers: int,
                 bounded: bool = False):
        self.source = source
        # imap: at most what its run holds (dispatch: 2 in flight plus 4 waiting per
        # worker) is taken ahead, results kept until the run takes them over. Unbounded,
        # a first call of 1 s had 1,496 items of imap(range(10**9)) run (and their results
        # held) before its first result; ten times that for a 10 s call.
        self.limit = ((IN_FLIGHT_PER_WORKER + BUFFERED_PER_WORKER) * max(1, n_workers)
                      if bounded else None)
        self.target = target  # a backends.loky.LokyTarget, or threads.ThreadTarget
        self.executor = executor
        self.n_workers = n_workers
        self.pending: dict[cf.Future, Pending] = {}
        self.unsent: list[Pending] = []  # taken from the input, not in the pool
        self.first_sent: Optional[float] = None  # perf_counter() of the first send
        # An item sent has raised (or its chunk failed): the loop runs nothing after it,
        # so nothing more is sent, and the caller's loop beside them stops (failed()).
        self._failed = False

    def feed(self) -> bool:
        """Top the pool up to one item per worker; resend, whole, an item whose worker
        lacked the function. False once nothing more is to be sent."""
        for fut in [f for f in self.pending if f.done()]:
            try:
                res = fut.result()
            except BaseException:  # a dead worker, a cancel: the parallel run deals with it
                continue
            if res.status == NEED_FUNCTION and not self._send(self.pending.pop(fut), True):
                return False
        while sum(1 for f in self.pending if not f.done()) < self.n_workers:
            if self._failed:
                # Topped up as they finished, 600-1,000 items went out after item 2
                # raised, where the loop ran 3.
                return False
            if self.limit is not None and len(self.pending) + len(self.unsent) >= self.limit:
                return True  # the bound: more once the run takes these over
            got = self.source.take()
            if got is None:
                return False
            index, item = got
            if not self._send(Pending(index, [item])):
                return False
        return True

    def _send(self, info: Pending, full: bool = False) -> bool:
        """Submit ``info``; one that could not be (the pool went, an item that cannot be
        pickled) is kept for the parallel run to send again (or run in the caller)."""
        try:
            fut = self.target.submit(self.executor, info.items, info.start, full)
        except Exception:
            self.unsent.append(info)
            return False
        info.submitted = time.perf_counter()
        if self.first_sent is None:
            self.first_sent = info.submitted
        info.executor = self.executor
        self.pending[fut] = info
        fut.add_done_callback(self._note_outcome)
        return True

    def _note_outcome(self, fut: cf.Future) -> None:
        # (On the thread that completes the future: a flag, nothing more.)
        if fut.cancelled():
            return
        if fut.exception() is not None or getattr(fut.result(), "error", None) is not None:
            self._failed = True

    def failed(self) -> bool:
        """An item sent has raised: the loop runs nothing after it, nor may the caller's
        loop that runs the rest beside them (run._serial_beside: it ran the whole rest
        of the input, 3,000 items where the loop ran 3, before raising item 2's error)."""
        return self._failed

    def running(self) -> bool:
        """Some of the items sent are still running (or queued) in the pool."""
        return any(not fut.done() for fut in self.pending)

    @property
    def n_items(self) -> int:
        """Items taken from the input for the pool."""
        return sum(info.n for info in self.pending.values()) + sum(i.n for i in self.unsent)

    def cancel(self) -> None:
        for fut, info in self.pending.items():
            self.target.cancel(fut, info.executor)
        if not self.target.remote:
            # Threads of this process: an item running finishes (it cannot be stopped),
            # nothing queued runs, and the idle threads end.
            self.executor.shutdown(wait=False, cancel_futures=True)

    @property
    def on_threads(self) -> bool:
        """Sent to threads of this process (a function that waits), not to a pool."""
        return not self.target.remote
