"""The public entry points: ``parallelize``, ``adaptive_map`` and ``calibrate``.

``ParallelFunction`` is a thin face: it holds the function, its options (validated once
into ``records.Options``) and what outlives a map (plain-call samples, the last report).
Each map is a ``run.MapRun`` of its own: measure -> plan -> execute -> record.
"""

from __future__ import annotations

import functools
import numbers
import operator
import textwrap
import threading
import time
import weakref
from collections.abc import Mapping
from typing import (
    TYPE_CHECKING,
    Any,
    Callable,
    Concatenate,
    Generator,
    Generic,
    Iterable,
    Iterator,
    NoReturn,
    Optional,
    ParamSpec,
    TypeVar,
    Union,
    overload,
)

from . import cache, system
from .backends import dask as dask_backend
from .backends import loky as loky_backend
from .errors import hide_library_frames, item_of
from .fingerprint import fingerprint
from .records import BACKENDS, Calibration, Options, Plan, RunReport
from .run import MapKind, MapRun, guard, known_length

if TYPE_CHECKING:
    from dask.distributed import Client

ENV_PROGRESS = "ADAPTIVE_EXEC_PROGRESS"

# The decorated function's parameters and return type: plain calls keep its signature,
# the maps return its results' type (list[R], Iterator[R]).
P = ParamSpec("P")
R = TypeVar("R")
S = TypeVar("S")  # the instance a decorated method is bound to
P2 = ParamSpec("P2")  # a decorated method's parameters after self

__all__ = ["ParallelFunction", "RunReport", "adaptive_map", "calibrate", "parallelize"]


def make_options(
    max_workers: Optional[int] = None,
    cache: bool = True,
    progress: bool = False,
    backend: str = "auto",
    timeout: Optional[float] = None,
    strict: bool = False,
    chunksize: Optional[int] = None,
    max_memory: Union[int, float, str, None] = None,
    client: Any = None,
    initializer: Optional[Callable[..., Any]] = None,
    initargs: Iterable[Any] = (),
) -> Options:
    """The options, validated once; a TypeError or ValueError that says what to pass."""
    import math

    memory = None if max_memory is None else system.parse_bytes(max_memory, "max_memory")
    for name, flag in (("cache", cache), ("progress", progress), ("strict", strict)):
        # Taken for their truth, "no" and "off" were True: a bar was drawn for "no".
        if not isinstance(flag, (bool, int)):
            msg = f"{name} must be True or False, got {flag!r}"
            raise TypeError(msg)
    if chunksize is not None:
        msg = f"chunksize must be a positive int or None (chosen for you), got {chunksize!r}"
        chunksize = _as_int(chunksize)
        if chunksize is None:
            raise TypeError(msg)  # a type, as max_workers's ("3", 2.0)
        if chunksize < 1:
            raise ValueError(msg)
    if max_workers is not None:
        workers = _as_int(max_workers)
        if workers is None:
            msg = f"max_workers must be a positive int or None, got {max_workers!r}"
            raise TypeError(msg)
        max_workers = workers
        if max_workers < 1:
            msg = f"max_workers must be a positive int or None, got {max_workers!r}"
            raise ValueError(msg)
    if backend not in BACKENDS:
        msg = f"backend must be one of {', '.join(map(repr, BACKENDS))}, got {backend!r}"
        raise ValueError(msg)
    if timeout is not None:
        msg = (f"timeout must be a positive, finite number of seconds per item, or None "
               f"for no limit, got {timeout!r}")
        if isinstance(timeout, bool) or not isinstance(timeout, numbers.Real):
            raise TypeError(msg)
        try:
            timeout = float(timeout)  # numpy's float32 too, as concurrent.futures takes it
        except OverflowError:
            raise ValueError(msg) from None
        if not math.isfinite(timeout) or timeout <= 0:
            raise ValueError(msg)
        if backend == "serial":
            msg = ("timeout= needs worker processes (an item running in the caller cannot "
                   "be stopped safely); it cannot be combined with backend='serial'")
            raise ValueError(msg)
    if client is not None:
        if backend not in ("auto", "dask"):
            msg = (f"client= runs the map on a dask cluster; it cannot be combined with "
                   f"backend={backend!r} (use backend='dask' or 'auto')")
            raise ValueError(msg)
        dask_backend.check_client(client)
    if backend == "dask" or client is not None:
        if timeout is not None:
            msg = ("timeout= needs worker processes of our own, which it ends when an item "
                   "runs too long; a dask cluster's workers are not ours to end, so it "
                   "cannot be combined with backend='dask' or client=")
            raise ValueError(msg)
        if not dask_backend.installed():
            dask_backend.require()  # raises, naming the extra
    if initializer is not None and not callable(initializer):
        msg = (f"initializer must be a callable run once in each worker before its first "
               f"item (or None), got {initializer!r}")
        raise TypeError(msg)
    if isinstance(initargs, (str, bytes, Mapping, set, frozenset)) or not isinstance(
            initargs, Iterable):  # (a dict's keys, a set's order: never what was meant)
        msg = (f"initargs must be a tuple of arguments for the initializer, got "
               f"{initargs!r}; for one argument write (value,)")
        raise TypeError(msg)
    return Options(max_workers, bool(cache), bool(progress), backend, timeout, bool(strict),
                   chunksize, memory, client, initializer, tuple(initargs))


def _as_int(value: Any) -> Optional[int]:
    """An integer option as a plain int: numpy's int64 too (what ``len(arr) // 4`` or
    ``np.int64`` gives), as concurrent.futures takes it; None for anything else (a bool,
    a float, "3")."""
    if isinstance(value, bool):
        return None
    try:
        return operator.index(value)
    except TypeError:
        return None


OPTION_NAMES = tuple(Options.__dataclass_fields__)


def _no_options(method: str, unknown: dict[str, Any]) -> None:
    """A keyword given to a map method: options belong to parallelize()."""
    if not unknown:
        return
    names = ", ".join(f"{k}=..." for k in unknown)
    if all(k in OPTION_NAMES for k in unknown):
        msg = (f"{method}() takes only the items; {names} is an option: options go to "
               f"parallelize(func, {names}) or adaptive_map(func, items, {names}); the "
               f"options are {', '.join(OPTION_NAMES)}")
    else:  # the function's own argument, most likely (power.map(items, p=3))
        msg = (f"{method}() takes only the items; {names} is not an option of "
               f"adaptive_exec (those are {', '.join(OPTION_NAMES)}). To give the function "
               f"arguments of its own, bind them with functools.partial(func, {names}) "
               f"and map that, or give each item its arguments as a tuple and use starmap")
    raise TypeError(msg)


def reject_unknown(where: str, func: Any, unknown: dict[str, Any]) -> None:
    """A keyword that is not an option: a TypeError saying which are, and how to give
    the function its own arguments (the likely intent)."""
    if not unknown:
        return
    import difflib

    names = ", ".join(repr(k) for k in unknown)
    fname = getattr(func, "__name__", "func")
    example = ", ".join(f"{k}=..." for k in unknown)
    close = [m for k in unknown for m in difflib.get_close_matches(k, OPTION_NAMES, 1)]
    typo = f" Did you mean {', '.join(map(repr, close))}?" if close else ""
    msg = (f"{where}() got unexpected keyword argument(s) {names}: not an option.{typo} "
           f"Its options are {', '.join(OPTION_NAMES)}. To pass arguments to the function "
           f"itself, bind them with functools.partial({fname}, {example}), or give each "
           f"item its arguments as a tuple and use .starmap()")
    raise TypeError(msg)


class _CallStats:
    """Durations of plain calls, kept as samples for the next map (bounded)."""

    MAX = 64  # a judgement: enough for a mean and a spread, bounded memory

    def __init__(self) -> None:
        self.lock = threading.Lock()  # guards durations
        self.durations: list[float] = []

    def add(self, seconds: float) -> None:
        with self.lock:
            if len(self.durations) < self.MAX:
                self.durations.append(seconds)

    def take(self) -> list[float]:
        with self.lock:
            out, self.durations = self.durations, []
            return out


class _Reports(threading.local):
    """``last_report`` per thread: the one of this thread's last map."""

    report: Optional[RunReport] = None


class _Shared:
    """What outlives one map of a function: the samples of its plain calls and its
    reports. A decorated method's bound copies of one instance share one (see __get__)."""

    def __init__(self) -> None:
        self.calls = _CallStats()
        # The report of this thread's last map; the last of any thread's for a thread
        # that has run none (several threads may map one function at once).
        self.reports = _Reports()
        self.latest_report: Optional[RunReport] = None

    def keep(self, report: RunReport) -> None:
        self.reports.report = report
        self.latest_report = report


class ParallelFunction(Generic[P, R]):
    """A function with ``map``, ``imap``, ``imap_unordered``, ``starmap`` and ``plan``.

    Calling it plainly runs it here, unchanged; the call is timed as a sample. Made by
    ``parallelize(func, **options)``; the options follow.
    """

    def __init__(
        self,
        func: Callable[P, R],
        *,
        max_workers: Optional[int] = None,
        cache: bool = True,
        progress: bool = False,
        backend: str = "auto",
        timeout: Optional[float] = None,
        strict: bool = False,
        chunksize: Optional[int] = None,
        max_memory: Union[int, float, str, None] = None,
        client: Optional[Client] = None,
        initializer: Optional[Callable[..., Any]] = None,
        initargs: Iterable[Any] = (),
        _shared: Optional[_Shared] = None,
        **unknown: NoReturn,
    ):
        if isinstance(func, staticmethod):
            # Callable since Python 3.10, so it passed; but our __get__ then bound it as
            # a method: instance.f(3) called f(instance, 3), a TypeError the loop never has.
            msg = ("parallelize needs a plain function here, got a staticmethod; put "
                   "@staticmethod above @parallelize, not below it")
            raise TypeError(msg)
        if not callable(func):
            msg = (
                "parallelize needs a callable (a function, lambda or callable object), "
                f"got {func!r}"
            )
            if isinstance(func, classmethod):
                msg += "; put @classmethod above @parallelize, not below it"
            raise TypeError(msg)
        reject_unknown("parallelize", func, unknown)
        options = make_options(max_workers, cache, progress, backend, timeout, strict,
                               chunksize, max_memory, client, initializer, initargs)
        # As functools.wraps, but the function's own attributes never hide ours: a
        # callable whose ``self._options`` or ``self.map`` is a dict, or a function given
        # ``g.plan = "nightly"``, broke every map (update_wrapper copies __dict__ whole).
        functools.update_wrapper(self, func, updated=())
        for name, value in getattr(func, "__dict__", {}).items():
            if not hasattr(ParallelFunction, name):  # our own state is set below
                setattr(self, name, value)
        self.__wrapped__ = func  # not the function's own __wrapped__, copied just above
        self._options = options
        self.__adaptive_exec_wrapped__ = func
        self._func = func
        self._shared = _shared if _shared is not None else _Shared()
        self._calls = self._shared.calls
        self._key: Optional[str] = None
        # Used as a method: what each instance's bound copies share, while it lives.
        self._per_instance: dict[int, tuple[Any, _Shared]] = {}
        self._per_instance_lock = threading.Lock()  # guards _per_instance

    @property
    def last_report(self) -> Optional[RunReport]:
        """The RunReport of this thread's last map (of any thread's, if this thread ran
        none), or None before the first."""
        mine = self._shared.reports.report
        return mine if mine is not None else self._shared.latest_report

    # --- plain calls, and use as a method -----------------------------------------

    def __call__(self, *args: P.args, **kwargs: P.kwargs) -> R:
        t0 = time.perf_counter()
        result = self._func(*args, **kwargs)
        self._calls.add(time.perf_counter() - t0)
        return result

    @overload
    def __get__(self, obj: None, objtype: Any = None) -> ParallelFunction[P, R]: ...
    @overload
    def __get__(self: ParallelFunction[Concatenate[S, P2], R], obj: S, objtype: Any = None
                ) -> ParallelFunction[P2, R]: ...

    def __get__(self, obj: Any, objtype: Any = None) -> Any:
        if obj is None:
            return self
        # Bound as the callable itself binds: a class attribute holding abs, a
        # functools.partial or a callable object is not bound (obj.f(x) calls f(x)); it was
        # bound always, and obj.f(x) called f(obj, x).
        get = getattr(type(self._func), "__get__", None)
        if get is None:
            return self
        # A bound copy per read, sharing per instance its last_report and the samples
        # of its plain calls (kept while the instance lives, without keeping it alive).
        key = id(obj)
        with self._per_instance_lock:
            entry = self._per_instance.get(key)
            shared = entry[1] if entry is not None and entry[0]() is obj else None
        if shared is None:
            shared = _Shared()
            try:
                ref = weakref.ref(obj, functools.partial(self._forget, key))
            except TypeError:  # no weak references (__slots__): nothing is kept
                ref = None
            if ref is not None:
                with self._per_instance_lock:
                    self._per_instance[key] = (ref, shared)
        return ParallelFunction(get(self._func, obj, objtype), _shared=shared,
                                **self._options.as_kwargs())

    def _forget(self, key: int, ref: Any) -> None:
        with self._per_instance_lock:
            entry = self._per_instance.get(key)
            if entry is not None and entry[0] is ref:
                del self._per_instance[key]

    def __repr__(self) -> str:
        return f"<parallelized {getattr(self._func, '__qualname__', self._func)!r}>"

    def __reduce_ex__(self, protocol: Any) -> Any:
        # A decorated function of an importable module is that module's attribute, as a
        # plain function is: pickled by reference. (Its function, under the same name, is
        # not the module's attribute: pickle refused it, "not the same object as m.f".)
        # A script's (__main__) keeps its state: cloudpickle sends it by value.
        name = _global_name(self)
        if name is not None:
            return name
        return super().__reduce_ex__(protocol)

    def __getstate__(self) -> dict[str, Any]:
        # A dask client does not travel (it is a connection): the copy finds its own.
        return {"func": self._func, "options": {**self._options.as_kwargs(), "client": None}}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["func"], **state["options"])  # type: ignore[misc]

    # --- the maps -----------------------------------------------------------------

    def map(self, items: Iterable[Any], **unknown: NoReturn) -> list[R]:
        """``[func(x) for x in items]``, as fast as this machine allows."""
        _no_options("map", unknown)
        try:
            return _collect(self._run(items, star=False, ordered=True, name="map"))
        except BaseException as exc:
            hide_library_frames(exc)  # the user's call, then their function's frames
            raise

    def starmap(self, arg_tuples: Iterable[Iterable[Any]], **unknown: NoReturn) -> list[R]:
        """``[func(*args) for args in arg_tuples]``."""
        _no_options("starmap", unknown)
        try:
            return _collect(self._run(arg_tuples, star=True, ordered=True, name="starmap"))
        except BaseException as exc:
            hide_library_frames(exc)  # the user's call, then their function's frames
            raise

    def imap(self, items: Iterable[Any], **unknown: NoReturn) -> Iterator[R]:
        """Results in order, lazily, with bounded read-ahead."""
        _no_options("imap", unknown)
        return _flatten(self._run(items, star=False, ordered=True, name="imap"))

    def imap_unordered(self, items: Iterable[Any], **unknown: NoReturn) -> Iterator[R]:
        """Results as they complete."""
        _no_options("imap_unordered", unknown)
        return _flatten(self._run(items, star=False, ordered=False, name="imap_unordered"))

    def plan(self, items: Iterable[Any]) -> Plan:
        """The decision a ``map`` over ``items`` would take, without running the whole
        workload: the first items are run to measure them (their results are dropped,
        and the measurement is remembered, so the next map does not sample again)."""
        try:
            first = iter(items)
        except TypeError:
            msg = (f"plan() needs a collection of items (a list, tuple, range...), got "
                   f"{type(items).__name__}")
            raise TypeError(msg) from None
        if first is items:  # type: ignore[comparison-overlap]
            msg = (
                "plan() needs a collection it can read without using it up (a list, tuple "
                "or range); a one-shot iterator would lose the items it samples"
            )
            raise TypeError(msg)
        run = self._map_run(items, star=False, ordered=True, name="plan", plan_only=True)
        try:
            for _ in run:
                pass
        except BaseException as exc:
            hide_library_frames(exc)
            raise
        assert run.plan is not None
        return run.plan

    # --- one run ------------------------------------------------------------------

    def _map_run(self, items: Iterable[Any], *, star: bool, ordered: bool, name: str,
                 plan_only: bool = False) -> MapRun:
        # Options read from the environment are checked before any item runs.
        system.env_max_memory()
        system.disabled()
        system.env_flag(ENV_PROGRESS)
        if self._options.cache:
            cache.check_env()
        try:
            it = iter(items)
        except TypeError:
            msg = (
                f"{name}() needs an iterable of items (a list, range, generator...), "
                f"got {type(items).__name__}"
            )
            raise TypeError(msg) from None
        if self._key is None:
            self._key = fingerprint(self._func)
        kind = MapKind(star, ordered, partial=name.startswith("imap"), plan_only=plan_only)
        return MapRun(self._func, self._options, self._key, guard(it), known_length(items),
                      kind, plain_calls=self._calls.take, on_report=self._shared.keep,
                      items=items if isinstance(items, list) else None)

    def _run(self, items: Iterable[Any], *, star: bool, ordered: bool, name: str
             ) -> Iterator[list[Any]]:
        run = self._map_run(items, star=star, ordered=ordered, name=name)
        batches: Iterator[list[Any]] = iter(run)
        if self._options.progress or system.env_flag(ENV_PROGRESS):
            batches = _with_progress(batches, run, name)
        return batches


def _global_name(pf: ParallelFunction[Any, Any]) -> Optional[str]:
    """pf's qualified name where its module (not __main__) holds pf under it, else None."""
    import sys

    module = getattr(pf, "__module__", None)
    qualname = getattr(pf, "__qualname__", None)
    if (not isinstance(module, str) or not isinstance(qualname, str) or module == "__main__"
            or "<locals>" in qualname or module not in sys.modules):
        return None
    obj: Any = sys.modules[module]
    try:
        for part in qualname.split("."):
            obj = getattr(obj, part)
    except Exception:
        return None
    return qualname if obj is pf else None


def _flatten(batches: Iterator[list[Any]]) -> Generator[Any, None, None]:
    """The results one by one; closing it (or dropping it) stops the map's work.

    Each result is taken out of its batch as it is yielded: once the consumer drops it,
    nothing of ours keeps it alive (as CPython's Executor.map since bpo-14406)."""
    try:
        for batch in batches:
            batch.reverse()  # every batch is a fresh list of ours (see _collect)
            pop = batch.pop
            while batch:
                yield pop()
    except BaseException as exc:
        if not isinstance(exc, GeneratorExit):
            hide_library_frames(exc)
        raise
    finally:
        close = getattr(batches, "close", None)
        if close is not None:
            close()


def _collect(batches: Iterator[list[Any]]) -> list[Any]:
    # Every batch is a fresh list nobody else holds: the first becomes the answer
    # rather than a copy (a 300k-item serial map is mostly one or two batches).
    out: Optional[list[Any]] = None
    try:
        for batch in batches:
            if out is None:
                out = batch
            else:
                out.extend(batch)
    except KeyboardInterrupt as exc:
        # Ctrl-C between two batches lands here, not in the dispatcher: end the pool's
        # workers all the same, so that nothing runs on and no process is left behind.
        # (An item's own KeyboardInterrupt carries its index: the pool is fine.)
        if item_of(exc) is None:
            loky_backend.shutdown()
        raise
    except RuntimeError as exc:
        # An item's StopIteration, raised inside our generators, became the RuntimeError
        # of PEP 479 on its way out; the loop (a list comprehension) raises it as it is.
        # (imap keeps the RuntimeError: a generator expression, and CPython's
        # Executor.map, give that too.)
        cause = exc.__cause__
        if isinstance(cause, StopIteration) and item_of(cause) is not None:
            raise cause from cause.__cause__
        raise
    return out if out is not None else []


def _with_progress(gen: Iterator[list[Any]], run: MapRun, name: str) -> Iterator[list[Any]]:
    """The batches on a progress bar labelled with what runs them (progress.py)."""
    from .progress import with_progress

    return with_progress(gen, run, name)


@overload
def parallelize(
    func: Callable[P, R], *, max_workers: Optional[int] = None, cache: bool = True,
    progress: bool = False, backend: str = "auto", timeout: Optional[float] = None,
    strict: bool = False, chunksize: Optional[int] = None,
    max_memory: Union[int, float, str, None] = None, client: Optional[Client] = None,
    initializer: Optional[Callable[..., Any]] = None, initargs: Iterable[Any] = (),
) -> ParallelFunction[P, R]: ...
@overload
def parallelize(
    func: None = None, *, max_workers: Optional[int] = None, cache: bool = True,
    progress: bool = False, backend: str = "auto", timeout: Optional[float] = None,
    strict: bool = False, chunksize: Optional[int] = None,
    max_memory: Union[int, float, str, None] = None, client: Optional[Client] = None,
    initializer: Optional[Callable[..., Any]] = None, initargs: Iterable[Any] = (),
) -> Callable[[Callable[P, R]], ParallelFunction[P, R]]: ...


def parallelize(
    func: Optional[Callable[P, R]] = None,
    *,
    max_workers: Optional[int] = None,
    cache: bool = True,
    progress: bool = False,
    backend: str = "auto",
    timeout: Optional[float] = None,
    strict: bool = False,
    chunksize: Optional[int] = None,
    max_memory: Union[int, float, str, None] = None,
    client: Optional[Client] = None,
    initializer: Optional[Callable[..., Any]] = None,
    initargs: Iterable[Any] = (),
    **unknown: NoReturn,
) -> Union[ParallelFunction[P, R], Callable[[Callable[P, R]], ParallelFunction[P, R]]]:
    """Give a function ``map``, ``starmap``, ``imap``, ``imap_unordered`` and ``plan``;
    use it bare (``@parallelize``) or with options (``@parallelize(max_workers=4)``).

    ``f.map(items)`` returns ``[f(x) for x in items]``, run in the caller, a process pool,
    threads or a dask cluster, whichever the measurements of f's first calls say is
    fastest. Calling ``f(x)`` plainly runs it here, unchanged.

    Arguments of the function itself are not options: bind them with
    ``functools.partial``, or map tuples with ``starmap``. The options follow.
    """
    reject_unknown("parallelize", func, unknown)
    options = make_options(max_workers, cache, progress, backend, timeout, strict,
                           chunksize, max_memory, client, initializer, initargs).as_kwargs()
    if func is None:
        def decorate(f: Callable[P, R]) -> ParallelFunction[P, R]:
            return ParallelFunction(f, **options)

        return decorate
    return ParallelFunction(func, **options)


def adaptive_map(
    func: Callable[..., R],
    items: Iterable[Any],
    /,
    *,
    max_workers: Optional[int] = None,
    cache: bool = True,
    progress: bool = False,
    backend: str = "auto",
    timeout: Optional[float] = None,
    strict: bool = False,
    chunksize: Optional[int] = None,
    max_memory: Union[int, float, str, None] = None,
    client: Optional[Client] = None,
    initializer: Optional[Callable[..., Any]] = None,
    initargs: Iterable[Any] = (),
    **unknown: NoReturn,
) -> list[R]:
    """``[func(x) for x in items]`` for any callable (lambdas and closures too), in
    parallel when that is faster. The options, below, are ``parallelize``'s. With a
    function made by ``parallelize``, options left at their defaults keep its own. To
    give ``func`` arguments of its own, use ``functools.partial`` or ``starmap``."""
    reject_unknown("adaptive_map", func, unknown)
    given = make_options(max_workers, cache, progress, backend, timeout, strict, chunksize,
                         max_memory, client, initializer, initargs)
    if isinstance(func, ParallelFunction):
        default = Options()
        changed = {k: v for k, v in given.as_kwargs().items() if v != getattr(default, k)}
        pf = func if not changed else ParallelFunction(
            func._func, **{**func._options.as_kwargs(), **changed})
    else:
        pf = ParallelFunction(func, **given.as_kwargs())
    try:
        return pf.map(items)
    except BaseException as exc:
        hide_library_frames(exc)  # this frame too: the user's call, then their function
        raise


# One text for the options, in the help of every public name that takes them.
OPTIONS_DOC = """

Options (all keyword-only):

max_workers: a ceiling on workers of every kind: processes, threads, and tasks in
    flight on a dask cluster (None: what the machine allows; also
    $ADAPTIVE_EXEC_MAX_WORKERS).
cache: remember what was measured about the function (a SQLite file, see
    ``python -m adaptive_exec cache path``), to plan its next map at once.
progress: show a tqdm progress bar (also ADAPTIVE_EXEC_PROGRESS=1).
backend: "auto" decides (on the dask cluster of the active client, if there is one);
    "loky" always uses the process pool; "serial" never leaves the caller; "dask"
    runs on a dask cluster: ``client``, else the current client, else
    $ADAPTIVE_EXEC_DASK_ADDRESS.
timeout: seconds one item may run in a worker process before the map raises
    ItemTimeoutError and that worker is ended (None: no limit). Every item then runs
    in a worker, none in the caller.
strict: raise instead of warning and running serially when pickling fails.
chunksize: items per task sent to a worker (None: chosen from measurements).
max_memory: a ceiling on the memory the map's processes may hold, in bytes or as
    "2GB" (also ADAPTIVE_EXEC_MAX_MEMORY); workers are capped to fit under it.
client: a dask.distributed Client: run on its cluster (needs the ``dask`` extra).
initializer, initargs: ``initializer(*initargs)`` runs once in each process before
    it runs items: in each worker, and in the caller before it runs any itself (as
    ``initializer=`` of concurrent.futures' executors). If it raises, the map
    raises InitializerError naming it, with its exception as the cause.
"""

for _documented in (parallelize, adaptive_map, ParallelFunction):
    _documented.__doc__ = (_documented.__doc__ or "").rstrip() + textwrap.indent(
        OPTIONS_DOC, "    ")


def calibrate(n_workers: Optional[int] = None) -> Calibration:
    """Start a fresh pool, measure this machine's constants on it (start-up, per-task
    overhead, per-byte cost), keep them for this process and in the cache, and return
    them.

    n_workers: the pool size to measure with (None: the usable CPUs).
    """
    return loky_backend.calibrate(n_workers)
