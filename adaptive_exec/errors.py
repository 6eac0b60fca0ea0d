"""The exception hierarchy.

Every error of ours subclasses ``AdaptiveExecError`` and the closest builtin, so
``except RuntimeError`` keeps working for code that never heard of us. A user
function's own exception is never wrapped: it is re-raised as itself, with the
failing item's index and the worker's traceback attached (see ``attach_origin``).
"""

from __future__ import annotations

import sys
from typing import Optional


class AdaptiveExecError(Exception):
    """Base of every error raised by adaptive_exec itself."""


class WorkerCrashedError(AdaptiveExecError, RuntimeError):
    """A worker process died (os._exit, a signal, the OOM killer) while running items."""

    def __init__(self, msg: str, index: Optional[int] = None, exitcode: Optional[int] = None):
        super().__init__(msg)
        self.index = index
        self.exitcode = exitcode


class ItemTimeoutError(AdaptiveExecError, TimeoutError):
    """An item ran past the ``timeout=`` given to the map."""


class ResultPicklingError(AdaptiveExecError, TypeError):
    """A worker ran items whose results cannot be pickled back to the caller."""


class RemoteError(AdaptiveExecError, RuntimeError):
    """Stands in for a worker exception that could not itself be pickled."""


class MissingDependencyError(AdaptiveExecError, ImportError):
    """A backend was asked for whose optional dependency is not installed; the message
    names the extra that provides it (``pip install "adaptive_exec[dask]"``)."""


class ClusterError(AdaptiveExecError, RuntimeError):
    """The dask cluster cancelled or lost a chunk's task (the client closed, the
    scheduler went away), so its items have no result."""


class UnpicklableWarning(UserWarning):
    """The function, an item or a result cannot be pickled: the map ran serially instead."""


class CacheWarning(UserWarning):
    """The cache could not be used as it is (corrupt, unwritable, or a newer schema):
    maps go on without it, or read-only."""


class RemoteTraceback(Exception):
    """Carries a worker's formatted traceback as the ``__cause__`` of a re-raised exception.

    The same device concurrent.futures.process uses: the traceback text shows up in
    the caller's report, under "The above exception was the direct cause of ...".
    """

    def __init__(self, tb: str):
        super().__init__(tb)
        self.tb = tb

    def __str__(self) -> str:
        return self.tb


def attach_origin(exc: BaseException, index: int, remote_tb: Optional[str]) -> BaseException:
    """Mark ``exc`` as raised by item ``index``; chain the worker traceback when there is one."""
    note = f"adaptive_exec: raised while processing item {index}"
    try:
        exc.item_index = index  # type: ignore[attr-defined]
    except Exception:  # exceptions with __slots__ or read-only attributes
        pass
    if sys.version_info >= (3, 11):
        exc.add_note(note)
    elif not exc.args or not isinstance(exc.args[-1], str) or note not in exc.args[-1]:
        # Below 3.11 there are no notes; the index still reaches the user via the
        # cause's text, which is printed with the traceback.
        remote_tb = f"{note}\n{remote_tb or ''}"
    if remote_tb:
        exc.__cause__ = RemoteTraceback(f'\n"""\n{remote_tb}"""')
    return exc
