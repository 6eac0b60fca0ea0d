"""The exception hierarchy.

Every error of ours subclasses ``AdaptiveExecError`` and the closest builtin, so
``except RuntimeError`` keeps working for code that never heard of us. A user
function's own exception is never wrapped: it is re-raised as itself, with the
failing item's index and the worker's traceback attached (see ``attach_origin``).
"""

from __future__ import annotations

import builtins
import signal
import sys
import types
import warnings
from dataclasses import dataclass, field
from typing import Any, Optional

# Frames of this package are the library's: hidden from the tracebacks a user sees, and
# skipped to find the user's line a warning points at.
_PACKAGE = __name__.partition(".")[0]


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
    """Stands in for a worker's exception that could not be rebuilt in the caller as
    itself (its class cannot travel, or cannot be made without calling __init__).

    ``type_name`` is the original's qualified type name (module included), ``message``
    its text, ``item_index`` the failing item, and the worker's traceback is chained as
    ``__cause__``. When the original subclassed a builtin exception (ValueError...), the
    stand-in is a subclass of both RemoteError and that builtin, so ``except ValueError``
    still catches it; its class is named ``RemoteError[<type name>]``.
    """

    def __init__(self, message: str, type_name: str = "", original_message: str = ""):
        super().__init__(message)
        self.type_name = type_name
        self.message = original_message or message


class MissingDependencyError(AdaptiveExecError, ImportError):
    """A backend was asked for whose optional dependency is not installed; the message
    names the extra that provides it (``pip install "adaptive_exec[dask]"``)."""


class ClusterError(AdaptiveExecError, RuntimeError):
    """The dask cluster cancelled or lost a chunk's task (the client closed, the
    scheduler went away), so its items have no result."""


class InitializerError(AdaptiveExecError, RuntimeError):
    """The ``initializer=`` of a map raised: in a worker (no item ran there after it)
    or in the caller. Its own exception is the ``__cause__``."""


class UnpicklableWarning(UserWarning):
    """The function, an item or a result cannot be pickled (or the pool cannot start: the
    process is at its limit of open files): the map ran serially instead."""


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


def attach_origin(exc: BaseException, index: int, remote_tb: Optional[str],
                  where: Optional[str] = None) -> BaseException:
    """Mark ``exc`` as raised by item ``index`` (``where``: the worker that ran it, for
    the note); chain the worker traceback when there is one. Frames of ours at the head
    of its traceback (the loop that called the function) are dropped when the user's
    own frames follow: the traceback, and a worker's text of it, start at the function."""
    if isinstance(exc, InitializerError):
        # Before any item: its message says where; the initializer's own traceback (from
        # a worker) is the cause.
        if remote_tb:
            remote = RemoteTraceback(f'\n"""\n{remote_tb}"""')
            # The initializer's exception came back as the cause (as in the caller):
            # the worker's traceback is chained at its root, as for an item's error.
            root = exc.__cause__
            if isinstance(root, BaseException) and not isinstance(root, RemoteTraceback):
                seen = {id(root)}  # (a chain may loop back on itself)
                while (isinstance(root.__cause__, BaseException)
                       and id(root.__cause__) not in seen):
                    root = root.__cause__
                    seen.add(id(root))
                set_on(root, "__cause__", remote)
            else:
                set_on(exc, "__cause__", remote)
        return exc
    note = f"adaptive_exec: raised while processing item {index}"
    if where:
        note = f"{note} in {where}"
    # The user's own attribute of that name (a row id of theirs) is left as it is, as
    # the loop leaves it: the index is then in ITEM_ATTR, and the note, alone. (It was
    # overwritten: the exception differed from the loop's.) One set by a map of ours
    # (a nested map's) is replaced.
    held = getattr(exc, "item_index", _NONE)
    if held is _NONE or held == getattr(exc, ITEM_ATTR, _NONE):
        set_on(exc, "item_index", index)
    set_on(exc, ITEM_ATTR, index)
    user_tb = _without_our_head(exc.__traceback__)
    if user_tb is not None:
        set_on(exc, "__traceback__", user_tb)
    if sys.version_info >= (3, 11):
        notes = getattr(exc, "__notes__", None)
        last = notes[-1] if isinstance(notes, list) and notes else ""
        # From a worker, the exception already carries the note it was given there
        # (with the worker's pid): not a second time.
        if not (isinstance(last, str) and _same_item(last, index)):
            if isinstance(notes, list):
                notes.append(note)
            elif notes is None:  # (not add_note(): a frozen dataclass refuses it too)
                set_on(exc, "__notes__", [note])
    elif not exc.args or not isinstance(exc.args[-1], str) or note not in exc.args[-1]:
        # Below 3.11 there are no notes; the index still reaches the user via the
        # cause's text, which is printed with the traceback.
        remote_tb = f"{note}\n{remote_tb or ''}"
    if remote_tb:
        _chain_remote(exc, RemoteTraceback(f'\n"""\n{remote_tb}"""'))
    return exc


def _chain_remote(exc: BaseException, remote: RemoteTraceback) -> None:
    """The worker's traceback as ``exc``'s cause; where the function set a cause of
    its own (``raise Wrapped(...) from err``, carried back with it), that one stays, as
    in the loop, and the traceback becomes the cause at the chain's root."""
    root, seen = exc, 0
    while root.__cause__ is not None and seen < 8:
        if isinstance(root.__cause__, RemoteTraceback):
            return  # chained already (an exception raised again)
        root, seen = root.__cause__, seen + 1
    suppress = root.__suppress_context__
    set_on(root, "__cause__", remote)
    # (Setting a cause sets this flag; the loop's exception has its own value. A cause
    # is shown before a context either way.)
    set_on(root, "__suppress_context__", suppress)


# Where the index of the item an exception came from is kept for the library's own use
# (``item_of``): ``item_index`` may be the user's own attribute.
ITEM_ATTR = "_adaptive_exec_item"
_NONE = object()


def item_of(exc: BaseException) -> Optional[int]:
    """The index of the item ``exc`` came from, as a map of ours noted it; None when it
    came from no item (Ctrl-C, the input iterator, a bug of ours)."""
    index = getattr(exc, ITEM_ATTR, None)
    if index is None:
        index = getattr(exc, "item_index", None)  # set by a constructor of ours
    return index if type(index) is int else None


def from_a_signal_handler(exc: BaseException) -> bool:
    """Did ``exc`` come out of one of the caller's Python signal handlers (a ``SIGALRM``
    handler raising its own timeout), which ran while our code pickled or submitted?
    Such an exception is the caller's to handle, as in the loop: taken for a pickling
    failure it was swallowed (the map went on in the caller, an UnpicklableWarning saying
    "cannot be pickled ()"), and the program's own time-out was lost."""
    codes = set()
    for sig in signal.valid_signals():
        try:
            handler = signal.getsignal(sig)
        except (OSError, ValueError):
            continue
        handler = getattr(handler, "func", handler)  # a functools.partial
        handler = getattr(handler, "__func__", handler)  # a bound method
        code = getattr(handler, "__code__", None)
        if code is not None:
            codes.add(code)
    tb = exc.__traceback__
    while tb is not None and codes:
        if tb.tb_frame.f_code in codes:
            return True
        tb = tb.tb_next
    return False


def set_on(exc: BaseException, name: str, value: Any) -> None:
    """``exc.<name> = value``, past a ``__setattr__`` that refuses it: a frozen
    dataclass's refused even ``__traceback__`` (FrozenInstanceError came out of a map
    where the loop raised the user's exception). Nothing where there is no room for it
    (``__slots__``)."""
    try:
        setattr(exc, name, value)
    except Exception:
        try:
            object.__setattr__(exc, name, value)
        except Exception:
            pass


def _same_item(note: str, index: int) -> bool:
    prefix = f"adaptive_exec: raised while processing item {index}"
    return note == prefix or note.startswith(prefix + " ")


def _ours(frame: types.FrameType) -> bool:
    name = frame.f_globals.get("__name__")
    return isinstance(name, str) and (name == _PACKAGE or name.startswith(_PACKAGE + "."))


def _without_our_head(tb: Optional[types.TracebackType]) -> Optional[types.TracebackType]:
    """``tb`` from its first frame that is not ours on; None when all its frames are."""
    while tb is not None and _ours(tb.tb_frame):
        tb = tb.tb_next
    return tb


def hide_library_frames(exc: BaseException) -> BaseException:
    """Drop our frames from the head of ``exc``'s traceback, where it leaves the package
    for the user's code, so that their report goes from their own call (``pf.map(...)``)
    straight to their function's frames; for an exception from a worker, which has none
    here, to the call alone, under the worker's traceback chained as its cause.

    Use in the outermost frame of ours, followed by a bare ``raise``, which (Python 3.11
    and later) re-raises with the traceback as set here and does not add that frame
    again::

        except BaseException as exc:
            hide_library_frames(exc)
            raise

    An exception with neither a frame of the user's nor an item (a bug of ours, an
    argument we refused) keeps its frames: they are what there is to see."""
    tb = exc.__traceback__
    rest = _without_our_head(tb)
    if rest is not tb and (rest is not None or item_of(exc) is not None):
        set_on(exc, "__traceback__", rest)
    return exc


def unenforced(timeout: Optional[float]) -> str:
    """What a warning that items run in the caller adds under ``timeout=``: said, not
    silently dropped (a 3 s item of a function that cannot be pickled returned under
    timeout=0.5, with a warning that did not mention it)."""
    if timeout is None:
        return ""
    return f", where timeout={timeout:g} s is not enforced (nothing here can stop an item)"


def warn_user(message: str, category: type[Warning]) -> None:
    """``warnings.warn`` pointing at the user's line: the first frame up the stack that
    is not ours (a map's warning points at the ``pf.map(...)`` that caused it, not into
    api.py). Filters, the once-per-location registry and ``catch_warnings`` work as for
    a ``warnings.warn`` made there."""
    frame: Optional[types.FrameType] = sys._getframe(1)
    while frame is not None and _ours(frame):
        frame = frame.f_back
    if frame is None:  # no frame but ours on this stack: point at the one warning
        warnings.warn(message, category, stacklevel=2)
        return
    module_globals = frame.f_globals
    registry = module_globals.setdefault("__warningregistry__", {})
    # Not module_globals=: with it, warnings asks the module's loader for the source
    # at once, which raises (ImportError) for a script this process may no longer read
    # (a process that dropped its privileges); the line is read, if it can be, when
    # the warning is shown.
    warnings.warn_explicit(message, category, frame.f_code.co_filename, frame.f_lineno,
                           module=module_globals.get("__name__", "<string>"),
                           registry=registry)


# --- exceptions that do not round-trip through pickle ----------------------------------


@dataclass(frozen=True)
class ExceptionState:
    """What travels instead of an exception that does not survive pickle's round trip
    (required __init__ arguments it does not pass to ``super().__init__``, a lock in
    its attributes): its class, its args and attributes that pickle (the others are
    dropped), and its type name and message, for a stand-in when the class cannot
    be rebuilt."""

    cls: Optional[bytes]  # the pickled class; None when it cannot travel
    args: tuple[Any, ...]
    state: dict[str, Any]
    type_name: str
    message: str
    builtin_base: str  # the nearest builtin exception class in its MRO
    # What builtin bases keep outside args and __dict__ (builtin_fields): an OSError
    # subclass's errno and filename.
    fields: dict[str, Any] = field(default_factory=dict)


# Attributes every exception has, handled apart (or never carried); and
# AttributeError's obj, the object that lacked the attribute: it could be any size
# (a typo on a model of 300 MB sent it all back).
_GENERIC = frozenset(("args", "__traceback__", "__context__", "__cause__",
                      "__suppress_context__", "__dict__", "__weakref__", "obj"))


def builtin_fields(exc: BaseException) -> dict[str, Any]:
    """The values builtin exception classes keep in C outside ``args`` and
    ``__dict__``: OSError's errno, strerror and filename, SyntaxError's lineno,
    AttributeError's name, StopIteration's value... An exception rebuilt without its
    __init__, or whose __init__ does not pass them on, loses them otherwise (an OSError
    subclass with its own __init__ came back with errno None)."""
    out: dict[str, Any] = {}
    for klass in type(exc).__mro__:
        if getattr(builtins, klass.__name__, None) is not klass:
            continue
        for name, attr in vars(klass).items():
            if name in _GENERIC or name in out or not isinstance(
                    attr, (types.MemberDescriptorType, types.GetSetDescriptorType)):
                continue
            try:
                out[name] = getattr(exc, name)
            except Exception:  # noqa: BLE001 - unset (OSError.characters_written)
                pass
    return out


def same_exception(exc: BaseException, copy: Any) -> bool:
    """Is ``copy`` (``exc`` through pickle) the same exception: class, args and builtin
    fields? Unpickling calls the class with the pickled args, so an __init__ that
    formats its message formatted it twice (loop: "invalid field 'age'", map: "invalid
    field \"invalid field 'age'\"")."""
    try:
        return (type(copy) is type(exc) and _same(copy.args, exc.args)
                and _same(builtin_fields(copy), builtin_fields(exc)))
    except Exception:  # noqa: BLE001 - an __eq__ that raises: not shown the same
        return False


def _same(a: Any, b: Any) -> bool:
    """Equal, or pickled alike: exceptions (an exception group's), a lambda or an
    object without __eq__ in the args compare by identity, which no copy has."""
    if bool(a == b):
        return True
    from .worker import dumps  # (worker imports this module)

    return dumps(a) == dumps(b)


def safe_str(exc: BaseException) -> str:
    try:
        return str(exc)
    except Exception:
        return "<its message cannot be shown: its __str__ raised>"


_STAND_INS: dict[tuple[str, str], type] = {}


def rebuild_exception(record: ExceptionState) -> BaseException:
    """In the caller: the exception as itself (class and state, __init__ not called),
    or a RemoteError stand-in that keeps its type name and message."""
    blob = record.cls
    if blob is not None:
        try:
            from .worker import loads_returned  # (worker imports this module)

            cls = loads_returned(blob)
            try:
                # With its args: an exception group's __new__ requires them.
                exc = cls.__new__(cls, *record.args)
            except Exception:  # noqa: BLE001 - a __new__ of another signature
                exc = cls.__new__(cls)
            set_on(exc, "args", record.args)
            exc.__dict__.update(record.state)
            for name, value in record.fields.items():
                set_on(exc, name, value)  # read-only ones (an exception group's) stay
            return exc  # type: ignore[no-any-return]
        except Exception:
            pass
    key = (record.type_name, record.builtin_base)
    stand_in = _STAND_INS.get(key)
    if stand_in is None:
        base = getattr(builtins, record.builtin_base, Exception)
        bases: tuple[type, ...] = (RemoteError,)
        if not issubclass(RemoteError, base) and issubclass(base, Exception):
            bases = (RemoteError, base)
        try:
            stand_in = type(f"RemoteError[{record.type_name}]", bases, {})
        except TypeError:  # an incompatible layout (OSError...): RemoteError alone
            stand_in = type(f"RemoteError[{record.type_name}]", (RemoteError,), {})
        stand_in.__module__ = __name__
        _STAND_INS[key] = stand_in
    msg = f"{record.type_name}: {record.message} (rebuilt from its type name and message: " \
          "the exception itself could not be sent back from the worker)"
    try:
        return stand_in(msg, record.type_name, record.message)  # type: ignore[no-any-return]
    except Exception:  # noqa: BLE001 - a base whose constructor wants other args
        return RemoteError(msg, record.type_name, record.message)
