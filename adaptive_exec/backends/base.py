"""What a backend is to the dispatcher: one declared protocol (as concurrent.futures'
``Executor`` is to its users).

The dispatcher (dispatch.py) runs the same loop over every target: it opens the
target's executor, submits chunks, waits on ``concurrent.futures`` futures, decodes
results, and asks the target what a failure means. What is particular to one backend
(loky's exit codes and broken pools, dask's lost tasks, threads' shutdown) stays in its
module, behind these methods.
"""

from __future__ import annotations

import concurrent.futures as cf
from typing import Any, Optional, Protocol

from ..worker import ChunkResult

# A verdict of ``ran_where_it_broke``: no worker had begun the chunk, and a worker that
# died was not known to be running another one (it may have died taking this chunk up).
NOT_BEGUN = "not begun"


class StartupWatch(Protocol):
    """A cold pool's start-up probe: ``first`` is set when any worker answered."""

    first: Any  # threading.Event
    startup_s: Optional[float]
    # threading.Event: the workers are spawned; until then a submit waits for them.
    sent: Any


class Target(Protocol):
    # Whether a failing item's traceback is text from another process (chained as
    # the exception's cause) rather than the exception's own (threads).
    remote: bool

    def open(self, n_workers: int) -> tuple[Any, Optional[StartupWatch]]:
        """(the executor, a start-up probe when it is cold and still starting)."""

    def capacity(self) -> int:
        """How many chunks can run at once on the executor opened last."""

    def submit(self, executor: Any, chunk: list[Any], start: int, full: bool = False
               ) -> cf.Future:
        """Send one chunk (``full``: with the whole function, see worker.NEED_FUNCTION);
        raises an exception other than AdaptiveExecError when the chunk cannot be
        pickled, and ``PoolGone`` when the executor takes no more work."""

    def decode(self, res: ChunkResult) -> tuple[list[Any], Optional[BaseException]]:
        """The chunk's results and its exception, as objects of this process."""

    def is_death(self, exc: BaseException) -> bool:
        """Whether a future's exception means its workers died (the chunk is retried)."""

    def describe_death(self, exc: BaseException) -> tuple[Optional[int], str]:
        """(exit code or None, a few words for people) for a death ``is_death`` saw."""

    def recover(self, executor: Any, failed: Any, n_workers: int) -> tuple[Any, bool]:
        """After chunks died with ``failed``: (the executor to use now, whether it was
        ended on purpose, by us or another thread, rather than by a crash)."""

    def cancel(self, fut: cf.Future, executor: Any) -> None:
        """Cancel a chunk that is no longer wanted."""

    def check(self, executor: Any) -> None:
        """Called while the run waits on its chunks (every WAKE_S at most): a pool whose
        workers died without its own watch noticing is ended here, so that the chunks
        in flight fail as deaths and are sent again, instead of waiting for ever."""

    def finish(self, executor: Any, probe: Optional[StartupWatch]) -> None:
        """After a clean run: what the run taught about the backend (calibration)."""

    def close(self, executor: Any, clean: bool, interrupted: bool = False) -> None:
        """After the run: keep the executor warm, or end it (``interrupted``: Ctrl-C)."""


class PoolGone(Exception):
    """The executor a chunk was sent to takes no more work: another thread replaced it
    (a larger pool) or ended it (its time-out, Ctrl-C). Not the chunk's fault."""
