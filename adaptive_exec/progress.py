"""The progress bar of a map (``progress=True``, or ADAPTIVE_EXEC_PROGRESS=1).

The bar counts the items as their results arrive, and names what runs them:
``map [2 processes]``, ``map [serial]``, ``map [8 threads]``, ``map [dask]`` (the name is
the map's kind: map, imap, starmap...). It is labelled once the plan is known, again when
the plan changes (a serial loop moving to the pool), and when the load monitor changes
the number of busy workers (``map [1 of 2 processes]``): the map tells it through
``MapRun.on_plan``.

While a bar is shown, log records reach the console through ``tqdm.write``, above the
bar, never onto its line: each console handler that would print the library's records
(the root's, after ``logging.basicConfig``, or one of ours) gets a filter that writes
every record it handles with ``tqdm.write`` instead, in its own format and stream: ours,
and the user's own (an item run in the caller may log). Handlers that are not the
console (log files) are left alone. Warnings shown meanwhile (ours, or the function's)
go the same way, unless the program replaced ``warnings.showwarning`` itself.
"""

from __future__ import annotations

import contextlib
import logging
import sys
import threading
import warnings
from typing import TYPE_CHECKING, Any, Callable, Iterator, Optional

from .records import Plan

if TYPE_CHECKING:
    from .run import MapRun

LOGGER = "adaptive_exec"


def label(name: str, plan: Optional[Plan] = None, busy: Optional[int] = None) -> str:
    """The bar's label: the map's kind, and what runs it once that is known."""
    return name if plan is None else f"{name} [{plan.runs_on(busy)}]"


def with_progress(batches: Iterator[list[Any]], run: MapRun, name: str
                  ) -> Iterator[list[Any]]:
    """``batches``, counted on a bar named ``name [what runs it]``; the library's log
    lines go above the bar while it is shown."""
    from tqdm.auto import tqdm

    with _logs_above_bars(tqdm.write), tqdm(total=run.n_known, desc=name,
                                            unit="item") as bar:
        lock = threading.Lock()  # the monitor's thread relabels it too

        def show(plan: Plan, busy: Optional[int] = None) -> None:
            with lock:
                if not bar.disable:
                    bar.set_description_str(label(name, plan, busy), refresh=True)

        run.on_plan = show
        try:
            for batch in batches:
                bar.update(len(batch))
                yield batch
        finally:
            run.on_plan = None
            close = getattr(batches, "close", None)
            if close is not None:
                close()


# --- log records above the bar ----------------------------------------------------------

class _AboveTheBar(logging.Filter):
    """On a console handler: its records are written through ``tqdm.write`` (the bars
    are cleared, the line written, the bars drawn again), not by the handler."""

    def __init__(self, handler: logging.StreamHandler[Any], write: Callable[..., Any]):
        super().__init__()
        self.handler = handler
        self.write = write

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            self.write(self.handler.format(record), file=self.handler.stream)
        except Exception:
            self.handler.handleError(record)
        return False


def _console_handlers() -> list[logging.StreamHandler[Any]]:
    """The handlers that would print the library's records on the console: those of its
    logger and its ancestors (as far as records propagate), else logging's last resort."""
    consoles = {id(s) for s in (sys.stdout, sys.stderr, sys.__stdout__, sys.__stderr__)
                if s is not None}
    found: list[logging.StreamHandler[Any]] = []
    logger: Optional[logging.Logger] = logging.getLogger(LOGGER)
    any_handler = False
    while logger is not None:
        for handler in logger.handlers:
            any_handler = True
            if (isinstance(handler, logging.StreamHandler)
                    and not isinstance(handler, logging.FileHandler)
                    and id(handler.stream) in consoles and handler not in found):
                found.append(handler)
        if not logger.propagate:
            break
        logger = logger.parent
    last = logging.lastResort
    if not any_handler and isinstance(last, logging.StreamHandler):
        found.append(last)
    return found


_lock = threading.Lock()  # guards _depth, _filters and _shown
_depth = 0  # bars shown at once (threads' maps, nested maps)
_filters: list[_AboveTheBar] = []
_shown: list[Callable[..., Any]] = []  # warnings.showwarning replaced, to restore


def _warnings_above(write: Callable[..., Any]) -> Callable[..., Any]:
    def show(message: Any, category: Any, filename: str, lineno: int, file: Any = None,
             line: Optional[str] = None) -> None:
        impl: Any = getattr(warnings, "_showwarnmsg_impl", None)
        if isinstance(getattr(impl, "__self__", None), list):
            # A recorder is on (catch_warnings(record=True), pytest.warns): it sets
            # _showwarnmsg_impl to its list's append, which a replaced showwarning would
            # bypass (the warnings were printed, not recorded).
            impl(warnings.WarningMessage(message, category, filename, lineno, file, line))
            return
        text = warnings.formatwarning(message, category, filename, lineno, line)
        write(text.rstrip("\n"), file=file if file is not None else sys.stderr)

    return show


@contextlib.contextmanager
def _logs_above_bars(write: Callable[..., Any]) -> Iterator[None]:
    """While the block runs, the library's console log lines go through ``write``
    (tqdm.write). Bars shown at once share one set of filters: the first installs them,
    the last removes them."""
    global _depth
    with _lock:
        if _depth == 0:
            for handler in _console_handlers():
                f = _AboveTheBar(handler, write)
                handler.addFilter(f)
                _filters.append(f)
            if warnings.showwarning is getattr(warnings, "_showwarning_orig", None):
                _shown.append(warnings.showwarning)
                warnings.showwarning = _warnings_above(write)
        _depth += 1
    try:
        yield
    finally:
        with _lock:
            _depth -= 1
            if _depth == 0:
                for f in _filters:
                    f.handler.removeFilter(f)
                _filters.clear()
                if _shown:
                    warnings.showwarning = _shown.pop()
