"""What runs in a worker process, and the wire format of a chunk.

A chunk travels as bytes we pickled ourselves, not as objects handed to loky: a
pickling failure is then ours to see (and to answer with a serial fallback), and the
bytes moved are counted.

The function travels as a ``FunctionRef`` whose key is a digest of everything the worker
needs to rebuild it as the caller has it *now*: the cloudpickled function (by value: its
code, what it captured and the globals it reads), or, for a function importable by name,
its module and name plus the current values of the module globals it reads (``patch``).
A worker keeps rebuilt functions by that key, so a function, a global it reads or an
object it captures that changed in the caller is a new key and is sent again: a warm
worker never runs a stale copy. Only the first chunks of a map carry the whole ref; the
rest carry the key alone (``lean``), and a worker that does not know it answers
``NEED_FUNCTION`` instead of running the chunk, which is then sent again whole.

The caller's world travels with the ref: its working directory and ``sys.path``, which a
worker adopts before it unpickles anything (see ``_enter_context``).
"""

from __future__ import annotations

import builtins
import collections
import contextlib
import dataclasses
import enum
import functools
import hashlib
import importlib
import inspect
import io
import itertools
import os
import pickle
import struct
import sys
import threading
import time
import traceback
import types
import warnings
import weakref
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Iterator, Optional, Protocol, TypeVar

from .errors import (
    ExceptionState,
    InitializerError,
    UnpicklableWarning,
    attach_origin,
    builtin_fields,
    rebuild_exception,
    safe_str,
    same_exception,
    set_on,
    warn_user,
)

_PROTOCOL = pickle.HIGHEST_PROTOCOL
# In a worker: rebuilt functions by key, least recently used first. Bounded in count
# and in the bytes they arrived as (a closure over a large array is as large as it):
# a judgement, about what one worker may keep for maps to come.
_FUNCTIONS: collections.OrderedDict[str, tuple[Any, int]] = (
    collections.OrderedDict())
_MAX_FUNCTIONS = 16
_MAX_FUNCTION_BYTES = 256 << 20
# The patch last applied to each module in this worker: two refs of one module with
# different global values (SCALE = 3, then 5, then 3 again) re-apply theirs on each change.
_APPLIED: dict[str, str] = {}

# Chunk outcomes besides "ran" (ChunkResult.status).
NEED_FUNCTION = "need_function"  # a lean ref whose key this worker does not know
FALLBACK = "fallback"  # something could not cross: the caller runs what is missing


def dumps(obj: Any) -> bytes:
    """Pickle with the standard pickler (fast, C), falling back to cloudpickle for
    lambdas, closures and local classes, and using it for anything that names
    ``__main__``: a class defined in the user's script pickles by reference with the
    standard pickler, but a worker's ``__main__`` is not the user's script, so it
    must travel by value (cloudpickle maps it back to the same class on return)."""
    try:
        data = pickle.dumps(obj, protocol=_PROTOCOL)
    except Exception:
        return cloudpickle_dumps(obj)
    # A scan of the bytes, far cheaper than the pickling. (A multiprocessing spawn
    # child's script is __mp_main__: its classes in items went by name, and no worker
    # could load them.)
    if b"__main__" in data or b"__mp_main__" in data:
        return cloudpickle_dumps(obj)
    return data


def dumps_returned(obj: Any) -> bytes:
    """``dumps`` for what a worker sends back: a function of the caller's script in it
    comes back as the caller's own (``_callers_function``)."""
    try:
        data = pickle.dumps(obj, protocol=_PROTOCOL)
    except Exception:
        return cloudpickle_dumps(obj, returned=True)
    if b"__main__" in data or b"__mp_main__" in data:  # as in dumps
        return cloudpickle_dumps(obj, returned=True)
    return data


def cloudpickle_dumps(obj: Any, sentinels_by_name: bool = False,
                      returned: bool = False) -> bytes:
    """``cloudpickle.dumps``, except that the code of what travels by value keeps its
    file name: cloudpickle writes "<dynamic-code>" in its place, and a traceback from a
    worker then names neither the user's file nor the line's text (its line numbers and
    line table cloudpickle keeps). ``sentinels_by_name``: a function's, whose sentinels
    travel by name (_by_name_if_stateless)."""
    picklers = _pickler()
    _main_by_value()
    with io.BytesIO() as file:
        picklers[2 if returned else sentinels_by_name](file, protocol=_PROTOCOL).dump(obj)
        return file.getvalue()


def _main_by_value() -> None:
    """In a multiprocessing spawn or forkserver child the script runs as ``__mp_main__``:
    cloudpickle, which sends ``__main__``'s functions and classes by value, sent those by
    name, which our workers cannot import. Registered by value, once per process."""
    main = sys.modules.get("__main__")
    name = getattr(main, "__name__", "__main__")
    if name != "__main__" and name not in _BY_VALUE and sys.modules.get(name) is main:
        import cloudpickle

        cloudpickle.register_pickle_by_value(main)
        _BY_VALUE.add(name)


_BY_VALUE: set[str] = set()
# This interpreter, apart from any other on any machine (a forked child keeps the
# token, but not the pid): FunctionRef.home.
_PROCESS_TOKEN = os.urandom(8).hex()


def this_process() -> str:
    return f"{_PROCESS_TOKEN}:{os.getpid()}"


# cloudpickle's Pickler, with code's file names kept; and one that also sends sentinels
# by name. Made once.
_PICKLER: list[Any] = []
_T = TypeVar("_T")


def _pickler() -> list[Any]:
    if not _PICKLER:
        import cloudpickle

        base = cloudpickle.Pickler
        reduce_code = base.dispatch_table.get(types.CodeType)
        ours: dict[type, Callable[[Any], Any]] = {memoryview: _reduce_memoryview,
                                                  io.TextIOWrapper: _reduce_text_file}
        if reduce_code is not None:  # (None: a cloudpickle that leaves code as it is)
            ours[types.CodeType] = functools.partial(_reduce_code, reduce_code)
        table = collections.ChainMap(ours, base.dispatch_table)
        keep = type("KeepFileNames", (base,), {"dispatch_table": table})
        _PICKLER.extend([keep, type("KeepSentinels", (keep,), {
            "reducer_override": functools.partialmethod(_by_name_if_stateless, base)}),
            type("KeepCallersFunctions", (keep,), {
                "reducer_override": _by_name_if_callers(base)})])
    return _PICKLER


def _by_name_if_stateless(pickler: Any, base: Any, obj: Any) -> Any:
    """cloudpickle's ``reducer_override``, except that an object with no state that a
    module holds (a sentinel: ``dataclasses.MISSING``, a module's ``MISSING =
    object()``) travels by its name: the worker's is then the one its own code compares
    with. Copied, ``def f(x, default=mymod.MISSING): return default is mymod.MISSING``
    returned False in every worker."""
    if not isinstance(obj, (type, types.FunctionType)) and _stateless(obj):
        home = _home_of(obj)
        if home is not None:
            return _attribute_of, (*home, type(obj))
    override = getattr(base, "reducer_override", None)  # cloudpickle's
    return override(pickler, obj) if override is not None else NotImplemented


def _by_name_if_callers(base: Any) -> Callable[[Any, Any], Any]:
    """cloudpickle's ``reducer_override`` for what a worker sends back, except that a
    function of the caller's script (``__main__``: it came to this worker by value, as
    a global of the mapped function or in an item) goes back with its name, so that the
    caller gets its own function, as the loop returns it: a copy is not ``is``, ``==``
    or a dict key of the caller's function, and reads its globals as they were sent
    (``return double if x % 2 else triple``: 53 of 60 results were such copies).
    Called for every object of a result that cloudpickle sends: cloudpickle's own is
    looked up once, and anything but a function goes to it at once (through a
    partialmethod and a lookup each, 200k dataclass instances pickled 1.23x slower)."""
    cloud = getattr(base, "reducer_override", None)
    function = types.FunctionType

    def reducer_override(pickler: Any, obj: Any) -> Any:
        if (type(obj) is function
                and getattr(obj, "__module__", None) in ("__main__", "__mp_main__")
                and "<" not in getattr(obj, "__qualname__", "<")):
            with io.BytesIO() as file:
                _pickler()[0](file, protocol=_PROTOCOL).dump(obj)
                blob = file.getvalue()
            return _callers_function, (obj.__module__, obj.__qualname__, blob)
        return cloud(pickler, obj) if cloud is not None else NotImplemented

    return reducer_override


def _callers_function(module: str, qualname: str, blob: bytes) -> Any:
    """In the caller: its own function of that name when it has the same code and
    defaults, and no closure (the loop's result), else the copy the worker sent."""
    copy = loads_returned(blob)
    found: Any = sys.modules.get(module)
    for part in qualname.split("."):
        found = getattr(found, part, None)
    found = getattr(found, "__func__", found)  # a staticmethod or classmethod's
    try:
        same = (isinstance(found, types.FunctionType) and found.__code__ == copy.__code__
                # Not a closure: one made in the worker with the name it wraps
                # (functools.wraps) holds values of its own.
                and found.__closure__ is None and copy.__closure__ is None
                and bool(found.__defaults__ == copy.__defaults__)
                and bool(found.__kwdefaults__ == copy.__kwdefaults__)
                and _same_attributes(found.__dict__, copy.__dict__))
    except Exception:  # noqa: BLE001 - a default whose __eq__ raises: the copy
        same = False
    return found if same else copy


def _same_attributes(ours: dict[str, Any], sent: dict[str, Any]) -> bool:
    """Do a function's attributes (``h.tag = i``) match the copy's? Functions made in a
    loop have one name and one code: ``[h0, h1, h2, h3]`` each with its own tag came
    back as the last of them (117 of 156 results had its tag). A function among them
    (``__wrapped__``) matches one of the same name and code, as it travels by value."""
    if ours.keys() != sent.keys():
        return False
    for name, value in ours.items():
        other = sent[name]
        if isinstance(value, types.FunctionType) and isinstance(other, types.FunctionType):
            if (value.__qualname__ != other.__qualname__
                    or value.__code__ != other.__code__):
                return False
        elif value is not other and not bool(value == other):
            return False
    return True


# id -> (the object, its module and name or None): the object is kept, so its id stays.
_HOMES: dict[int, tuple[Any, Optional[tuple[str, str]]]] = {}


def _home_of(obj: Any) -> Optional[tuple[str, str]]:
    """(module, name) of an importable module's global that is ``obj``, or None."""
    known = _HOMES.get(id(obj))
    if known is not None and known[0] is obj:
        return known[1]
    home = None
    for name, module in list(sys.modules.items()):
        if name.startswith("__") or module is None:  # __main__, __mp_main__: not by name
            continue
        try:
            found = next((k for k, v in vars(module).items() if v is obj), None)
        except Exception:  # a module whose namespace cannot be read
            continue
        if found is not None:
            home = (name, found)
            break
    if len(_HOMES) < 1024:
        _HOMES[id(obj)] = (obj, home)
    return home


def _attribute_of(module: str, name: str, cls: Any) -> Any:
    """In a worker: the module's own object (``_by_name_if_stateless``); a fresh one of
    its class, as a copy would have been, where the module cannot be imported here."""
    try:
        return getattr(importlib.import_module(module), name)
    except Exception:
        return object.__new__(cls)  # (a class with no state: nothing else to set)


def _reduce_memoryview(view: memoryview) -> Any:
    """A memoryview as a memoryview, of its bytes, format and shape (cloudpickle sent
    bytes: an item or result of another type than the loop's). One whose format a
    memoryview cannot be cast to (a structured or half-float numpy view) is refused
    here, not in the worker: its items run in the caller, warned."""
    if view.format != "B":
        try:
            memoryview(bytes(view.itemsize)).cast(view.format)  # type: ignore[call-overload]
        except (TypeError, ValueError) as exc:
            raise pickle.PicklingError(f"a memoryview of format {view.format!r} cannot "
                                       "be rebuilt in another process") from exc
    return _memoryview_of, (view.tobytes(), view.format, view.shape, view.readonly)


def _memoryview_of(data: bytes, fmt: str, shape: tuple[int, ...], readonly: bool
                   ) -> memoryview:
    view = memoryview(data if readonly else bytearray(data))
    if fmt != "B" or len(shape) != 1:
        view = view.cast(fmt, shape)  # type: ignore[call-overload]
    return view


def _reduce_text_file(file: Any) -> Any:
    """The caller's standard streams by name; any other open file is refused, as it
    cannot be shared with another process (cloudpickle sent a StringIO of what it
    read: the function's reads and writes went to a copy), so the items or function
    holding it run in the caller."""
    for name in ("stdout", "stderr"):
        if file is getattr(sys, name):
            return getattr, (sys, name)
    raise pickle.PicklingError(f"an open file ({getattr(file, 'name', '?')!r}) cannot be "
                               "sent to another process: pass its path instead")


def _reduce_code(reduce_code: Callable[[types.CodeType], Any], code: types.CodeType) -> Any:
    make, args = reduce_code(code)
    return _code_from, (make, args, code.co_filename)


def _code_from(make: Callable[..., types.CodeType], args: tuple[Any, ...], filename: str
               ) -> types.CodeType:
    """In a worker: the code object as cloudpickle rebuilds it, with its own file name."""
    code = make(*args)
    return code if code.co_filename == filename else code.replace(co_filename=filename)


@dataclass(frozen=True)
class FunctionRef:
    """A function as it travels: by reference to a module attribute, or as a blob."""

    key: str  # a digest of what follows (blob, or module + qualname + patch)
    module: Optional[str] = None
    qualname: Optional[str] = None
    blob: Optional[bytes] = None
    # When the code that runs is a module's function taken by reference (the function
    # itself, or inside a partial, a bound method, a callable object's __call__): the
    # pickled {name: value} of the module globals it (and the module's functions it
    # calls) reads, as the caller has them now, and that module's name.
    patch: Optional[bytes] = None
    patch_module: Optional[str] = None
    cwd: Optional[str] = None  # the caller's working directory (None: keep the worker's)
    sys_path: tuple[str, ...] = ()  # the caller's sys.path (empty: keep the worker's)
    lean: bool = False  # only the key: a worker that lacks it answers NEED_FUNCTION
    # The map's initializer and its initargs, pickled (None in a lean ref), and their
    # digest, which ``key`` includes: see ``with_initializer``.
    init: Optional[bytes] = None
    init_key: Optional[str] = None
    # The blob holds (function, initializer, initargs), pickled together: see
    # ``with_initializer``.
    bundled: bool = False
    # A large blob left in the caller's memory (``BlobFile``): (caller pid, fd, size).
    # A worker on this machine reads it there; one that cannot answers NEED_FUNCTION.
    blob_at: Optional[tuple[int, int, int]] = None
    # {(module, name): pickled value} of attributes of the user's other modules the code
    # reads (``_attributes_read``), set in the worker's copies of them before it runs;
    # ``key`` includes their digests.
    attrs: Optional[dict[tuple[str, str], bytes]] = None
    # Where the code that runs is a module's function taken by reference: a digest of
    # its code and of the module's functions it reaches, as the caller has them
    # (``_code_digest``). A worker whose copy of the module differs (the caller
    # reloaded it, or its file changed since) reloads it, or answers FALLBACK.
    code: Optional[str] = None
    # The caller's interpreter settings a loop's items would run under (``_settings``);
    # None: the worker keeps its own (a dask cluster's workers).
    settings: Optional[Settings] = None
    # The caller's context variables (context_blob), and their digest, which the key
    # includes (a lean ref keeps the digest: with_context).
    context: Optional[bytes] = None
    context_key: Optional[str] = None
    # The caller's process (``this_process()``), for workers that may be threads of
    # that very process (a dask cluster started with processes=False): there the
    # module globals the patch and attrs carry are the caller's own, live, and setting
    # their copies would replace the caller's objects (a dict the caller holds
    # was no longer the module's after a map). None: never the caller's process.
    home: Optional[str] = None

    def size(self) -> int:
        """The bytes a whole ref carries: the function, its globals, the attributes,
        the context variables."""
        return (len(self.blob or b"") + len(self.patch or b"") + len(self.context or b"")
                + sum(len(v) for v in (self.attrs or {}).values()))

    def lean_copy(self) -> FunctionRef:
        return dataclasses.replace(self, blob=None, patch=None, patch_module=None,
                                   blob_at=None, init=None, attrs=None, context=None,
                                   settings=_lean_settings(self.settings), lean=True)

    def without_context(self) -> FunctionRef:
        """For workers that are not ours to move (a dask cluster's, maybe elsewhere): no
        directory, no path; the settings go, but only the decimal context is taken
        there (per item's context: _shared_settings)."""
        return dataclasses.replace(self, cwd=None, sys_path=())


def _importable(value: Any, exact: bool = False) -> bool:
    """True when ``value`` is what its module and qualified name resolve to: a worker
    that imports the module has the same object, so it need not travel. ``exact``: the
    name must give ``value`` itself (or our wrapper of it), not a decorator's wrapper
    of it: a function mapped so is rebuilt by name, as what the name holds."""
    module = getattr(value, "__module__", None)
    qualname = getattr(value, "__qualname__", None)
    if not isinstance(module, str) or not isinstance(qualname, str) or module == "__main__":
        return False
    target: Any = sys.modules.get(module)
    if target is not None and target is sys.modules.get("__main__"):
        # A multiprocessing spawn or forkserver child runs the script as __mp_main__,
        # which our workers do not have: by value, as from __main__ (every map of such
        # a child warned that the function could not be rebuilt, and ran serially).
        return False
    try:
        for part in qualname.split("."):
            target = getattr(target, part)
    except AttributeError:
        return False
    # (Under a decorator: functools.wraps', or lru_cache's, a C object whose
    # __wrapped__ is read without running any code of the user's.)
    if target is value or getattr(target, "__adaptive_exec_wrapped__", None) is value:
        return True
    return (not exact
            and isinstance(target, (types.FunctionType, functools._lru_cache_wrapper))  # type: ignore[attr-defined]
            and _innermost(target) is value)


def _innermost(func: Any) -> Any:
    """The function under ``func``'s decorators (``functools.wraps`` leaves it as
    ``__wrapped__``): the code that reads the globals. Its wrapper's code reads none of
    them (the function is a closure cell there), and the globals a decorated function
    read were never sent: its workers kept their values from import."""
    for _ in range(100):  # (a cycle of __wrapped__ ends too)
        inner = getattr(func, "__wrapped__", None)
        if not isinstance(inner, types.FunctionType):
            break
        func = inner
    return func


def _code_objects(code: types.CodeType) -> list[types.CodeType]:
    out, stack = [], [code]
    while stack:
        c = stack.pop()
        out.append(c)
        stack.extend(k for k in c.co_consts if isinstance(k, types.CodeType))
    return out


def _methods(cls: type, module_globals: dict[str, Any]) -> list[types.FunctionType]:
    """The functions defined in ``cls`` and its bases that share ``module_globals``."""
    out = []
    for klass in cls.__mro__:
        for member in vars(klass).values():
            member = getattr(member, "__func__", member)  # staticmethod, classmethod
            if isinstance(member, functools._lru_cache_wrapper):  # type: ignore[attr-defined]
                member = _innermost(member)  # a cached method: its code runs too
            if isinstance(member, types.FunctionType) and member.__globals__ is module_globals:
                out.append(member)
    return out


def _reached(func: types.FunctionType, owner: Optional[type] = None,
             module_globals: Optional[dict[str, Any]] = None) -> list[types.FunctionType]:
    """``func``, the methods of ``owner`` (the class of the object it is bound to), and
    the functions and classes' methods of the same module they load, transitively: the
    code of that module that may run. ``module_globals``: the module's namespace, where
    ``func`` is a copy that came by value (its own holds only the names it reads)."""
    if module_globals is None:
        module_globals = func.__globals__
    out: list[types.FunctionType] = []
    seen: set[int] = set()
    stack = [func] + (_methods(owner, module_globals) if owner is not None else [])
    seen_closures: set[tuple[int, int]] = set()
    while stack:
        f = stack.pop()
        code = getattr(f, "__code__", None)
        if code is None:
            continue
        closure = getattr(f, "__closure__", None)
        if id(code) in seen:
            # The same code over other cells (two wrappers of one decorator): the
            # cells hold other functions, whose reads count (_attributes_read).
            if closure is None or (id(code), id(closure)) in seen_closures:
                continue
            seen_closures.add((id(code), id(closure)))
            out.append(f)
            continue
        seen.add(id(code))
        if closure is not None:
            seen_closures.add((id(code), id(closure)))
        out.append(f)
        for c in _code_objects(code):
            for name in c.co_names:
                inner = module_globals.get(name)
                inner = _innermost(getattr(inner, "__adaptive_exec_wrapped__", inner))
                if isinstance(inner, types.FunctionType) and inner.__globals__ is module_globals:
                    stack.append(inner)  # a helper of the same module: what it reads counts
                elif isinstance(inner, type) and inner.__module__ == func.__module__:
                    stack.extend(_methods(inner, module_globals))
                elif (type(inner).__module__ == func.__module__
                      and not isinstance(inner, (types.FunctionType, type))):
                    # A module-level object of the module's own class (GUARD.arm()):
                    # its methods run too.
                    stack.extend(_methods(type(inner), module_globals))
    return out


def _code_digest(func: types.FunctionType, owner: Optional[type] = None) -> str:
    """A digest of the code of ``func`` and of what it reaches in its module
    (``_reached``): the same in a worker only where its copy of the module is the
    caller's. A key that named the function alone kept a warm worker running the code
    from before the caller's ``importlib.reload`` (a wrong result)."""
    from .fingerprint import feed_code

    h = hashlib.sha1()
    # A module's function that came by value (one under a decorator, mapped as
    # ``g.__wrapped__``) reads its module's helpers as the worker's module has them:
    # reached through the module, as in the caller.
    module = sys.modules.get(getattr(func, "__module__", None) or "")
    space = vars(module) if module is not None and module is not sys.modules.get(
        "__main__") else None
    for f in sorted(_reached(func, owner, space), key=lambda f: f.__qualname__):
        if f is not func and "<locals>" in f.__qualname__:
            # A closure the caller set as a global (transform = make(3)) reaches the
            # worker in the patch, by value, as the caller has it: not the module's.
            # (Only closures: a helper under lru_cache, a classmethod reached through its
            # class are the module's code, which a stale worker must not keep.)
            continue
        h.update(f.__qualname__.encode())
        feed_code(h, f.__code__)
    others = _other_modules_digests(func, owner, space)
    if not others:
        return h.hexdigest()
    return h.hexdigest() + "|" + ";".join(f"{m}={d}" for m, d in sorted(others.items()))


def _other_modules_digests(func: types.FunctionType, owner: Optional[type] = None,
                           space: Optional[dict[str, Any]] = None,
                           depth: int = 2) -> dict[str, str]:
    """{module: digest of the code of its functions that ``func`` reaches}, for the
    user's *other* modules whose functions ``func`` (and what it reaches in its module)
    calls: ``helpers.f(x)``, ``pkg.sub.f(x)``, ``from helpers import f``, ``depth``
    modules deep. Without them a warm worker kept the code of ``helpers`` from before the
    caller's ``importlib.reload(helpers)`` (%autoreload after editing helpers.py): every
    result it made was the old code's."""
    from .fingerprint import feed_code

    found: dict[str, dict[str, types.CodeType]] = {}
    here = getattr(func, "__module__", None)

    def add(value: Any, level: int) -> None:
        if isinstance(value, functools._lru_cache_wrapper):  # type: ignore[attr-defined]
            value = _innermost(value)
        value = _innermost(getattr(value, "__adaptive_exec_wrapped__", value))
        if not isinstance(value, types.FunctionType):
            return
        name = value.__module__
        module = sys.modules.get(name or "")
        if (not name or name == here or module is None or not _users_module(module)
                or not _compiled_plainly(name) or not _importable(value)):
            return
        codes = found.setdefault(name, {})
        if value.__qualname__ in codes or sum(map(len, found.values())) > 64:
            return
        for f in _reached(value, None, vars(module)):
            if "<locals>" not in f.__qualname__:
                codes.setdefault(f.__qualname__, f.__code__)
        if level > 1:
            walk(value, None, vars(module), level - 1)

    def walk(f0: types.FunctionType, own: Optional[type], names: Optional[dict[str, Any]],
             level: int) -> None:
        if names is None:
            names = f0.__globals__
        for f in _reached(f0, own, names):
            for name, attrs in _name_chains(f.__code__):
                holder = (sys.modules.get(name[len(IMPORTED):]) if name.startswith(IMPORTED)
                          else names.get(name))
                if isinstance(holder, types.ModuleType):
                    for attr in attrs:
                        try:
                            value = inspect.getattr_static(holder, attr)
                        except AttributeError:
                            break
                        if isinstance(value, types.ModuleType):
                            holder = value
                            continue
                        add(value, level)
                        break
                else:
                    add(holder, level)

    try:
        walk(func, owner, space, depth)
    except Exception:  # never let the check break a map
        return {}
    out = {}
    for name, codes in found.items():
        h = hashlib.sha1()
        for qualname in sorted(codes):
            h.update(qualname.encode())
            feed_code(h, codes[qualname])
        out[name] = h.hexdigest()
    return out


def _forget_state_of(module: types.ModuleType) -> None:
    """After ``module`` was reloaded here its globals are its file's again: what the
    initializers that set state there (those of the module, or naming it) and the
    caller's patches had set is gone, and is set again before the next item. Others
    keep theirs: an initializer runs once per process per initargs."""
    name = module.__name__
    with _INIT_LOCK:
        for key, identity in list(_IDENTITY.items()):
            found = _INITIALIZERS.get(key)
            if found is None or _initializer_touches(found[0], module):
                _CURRENT.pop(identity, None)
    for applied in list(_APPLIED):
        if applied == name or applied.startswith(name + "."):
            del _APPLIED[applied]


def _initializer_touches(initializer: Any, module: types.ModuleType) -> bool:
    """Is ``initializer`` of ``module``, or does it name it (``mod.STATE[...] = ...``)?
    True where it cannot be told."""
    core, _ = _code_that_runs(initializer)
    if core is None:
        return True
    if core.__module__ == module.__name__:
        return True
    names = core.__globals__
    return any(names.get(name) is module for name, _ in _name_chains(core.__code__))


def _compiled_plainly(module: str) -> bool:
    """Was ``module`` compiled from its file by Python's own loader, as a worker's
    import compiles it? Code from an import hook (pytest rewrites the asserts of test
    modules) differs from a worker's for the same file: compared, it was taken for a
    stale copy and every item ran in the caller."""
    loader = type(getattr(getattr(sys.modules.get(module), "__spec__", None), "loader", None))
    # By name: the modules imported at start-up have the frozen bootstrap's classes,
    # which are not importlib.machinery's.
    return (loader.__name__ in ("SourceFileLoader", "SourcelessFileLoader")
            and loader.__module__ in ("_frozen_importlib_external",
                                      "importlib._bootstrap_external"))


# (module, the caller's code digest) this worker reloaded that module for: a copy that
# a reload did not make the caller's (the caller rebound one of its functions to one a
# worker cannot have, its file changed since the caller imported it) is not reloaded
# again for every map (each re-ran the module's code in every worker).
_RELOADED_FOR: set[tuple[str, str]] = set()


def _reload_once(module: types.ModuleType, code: str) -> bool:
    """Reload ``module`` here, once per caller's ``code``; False if done before."""
    if (module.__name__, code) in _RELOADED_FOR:
        return False
    if len(_RELOADED_FOR) > 1024:
        _RELOADED_FOR.clear()
    _RELOADED_FOR.add((module.__name__, code))
    importlib.reload(module)
    _forget_state_of(module)
    return True


def _current_code(func: Any, ref: FunctionRef, rebuild: Callable[[], Any],
                  patch: Callable[..., dict[str, Any]],
                  attrs: Optional[_WithAttributes] = None) -> Any:
    """``func`` where the code it runs is the caller's (``ref.code``); else the module
    it comes from is reloaded here (the caller reloaded it) and ``func`` rebuilt; raises
    where it still differs (the module's file changed since the caller imported it:
    only the caller has that code)."""
    def same() -> bool:
        # Compared with the caller's globals set here first (the patch): a global the
        # caller set to a closure of the module's (transform = make(3)) is what the
        # function reaches there, and only then here. So are the attributes of other
        # modules it reads (a function the caller rebound there: helpers.f = helpers.g).
        if ref.patch is not None and ref.patch_module is not None:
            _Patched(func, ref.patch_module, f"{ref.key}:check", patch()).enter()
        if attrs is not None:
            attrs.enter()
        found, owner = _code_that_runs(func)
        if found is None or not (ref.code or "").startswith(f"{sys.flags.optimize}:"):
            # A caller under python -O, a worker without it (loky's own start passes no
            # -O): the code differs for its asserts alone. Not compared, as before.
            return True
        return f"{sys.flags.optimize}:{_code_digest(found, owner)}" == ref.code

    if same():
        return func
    core, owner = _code_that_runs(func)
    assert core is not None
    # The user's other modules whose code the function calls (``helpers.f``) and that
    # the caller reloaded since this worker imported them: reloaded here first.
    _, _, theirs = (ref.code or "").partition("|")
    if theirs:
        module = sys.modules.get(core.__module__)
        ours = _other_modules_digests(core, owner, vars(module) if module else None)
        for part in theirs.split(";"):
            name, _, digest = part.partition("=")
            other = sys.modules.get(name)
            if other is not None and ours.get(name) != digest:
                _reload_once(other, ref.code or "")
        if same():
            return func
    module = sys.modules.get(core.__module__)
    if module is not None and _reload_once(module, ref.code or ""):
        if ref.patch is not None:
            patch(again=True)
        func = rebuild()
        if same():
            return func
    raise ImportError(f"this worker's module {core.__module__!r} is not the caller's copy "
                      "of it (its file, or one it calls into, changed since the caller "
                      "imported it, or the caller rebound a function it calls to one a "
                      "worker cannot import)")


def _globals_read(func: types.FunctionType, owner: Optional[type] = None) -> dict[str, Any]:
    """The module globals ``func`` reads, and those read by the functions and classes'
    methods of the same module it reads (transitively; ``owner``: the class of the
    object it is bound to), that a worker importing the module might hold differently:
    values the caller set or changed since import. Modules, and the module's own
    functions and classes under their own names, are left out (the worker's import has
    them). Another module's function or class (``rounder = math.floor``, ``from math
    import floor``) is not: the caller may have bound the name to another one since
    (``rounder = math.ceil``: warm workers kept floor), and it travels by reference, a
    few bytes."""
    module_globals = func.__globals__
    here = module_globals.get("__name__")
    found: dict[str, Any] = {}
    for f in _reached(func, owner):
        for c in _code_objects(f.__code__):
            for name in c.co_names:
                if name in found or name not in module_globals:
                    continue
                value = module_globals[name]
                if isinstance(value, types.ModuleType) or (_importable(value) and (
                        not isinstance(value, _BY_REFERENCE)
                        or (getattr(value, "__module__", None) == here
                            and getattr(value, "__qualname__", None) == name))):
                    # (An importable object of another kind, a @parallelize function
                    # of another module, would travel by value, its module's data
                    # with it: 9.9 MB per map.)
                    continue
                found[name] = value
    return found


_ATTRIBUTE_OPS = ("LOAD_ATTR", "LOAD_METHOD")
# What pickle sends by reference, its module and name, when importable.
_BY_REFERENCE = (types.FunctionType, types.BuiltinFunctionType, type)


def _users_module(module: Any) -> bool:
    """A module of the user's own: not the standard library's, not an installed
    package's (site-packages), not the script (which travels by value), not ours. The
    state of those is not carried: setting it in a worker could break the library."""
    name = getattr(module, "__name__", None)
    path = getattr(module, "__file__", None)
    if not isinstance(name, str) or not isinstance(path, str) or name == "__main__":
        return False
    top = name.partition(".")[0]
    if top in getattr(sys, "stdlib_module_names", ()) or top == __name__.partition(".")[0]:
        return False
    parts = os.path.normpath(path).split(os.sep)
    return "site-packages" not in parts and "dist-packages" not in parts


def _plain_value(value: Any) -> bool:
    """State, not code: what a worker's import does not already have as the caller does."""
    return not (isinstance(value, (types.ModuleType, type, types.FunctionType,
                                   types.BuiltinFunctionType, types.MethodType,
                                   functools.partial)))


@functools.lru_cache(maxsize=1024)
def _name_chains(code: types.CodeType) -> tuple[tuple[str, tuple[str, ...]], ...]:
    """Each global ``code`` (its nested code too) loads, with the attributes read on it
    right after (``settings.Config.factor``: ("settings", ("Config", "factor"))). The
    code's own: kept per code object (the scan is ~0.1 ms, each map asks)."""
    import dis

    out: list[tuple[str, tuple[str, ...]]] = []
    for c in _code_objects(code):
        name: Optional[str] = None
        attrs: list[str] = []
        # Imports inside the function (``import settings``, then settings.SCALE;
        # ``from settings import SCALE``): read off the module, as a global is.
        consts: list[Any] = []  # the constants loaded last: an import's level, fromlist
        base: Optional[str] = None  # the module of the import statement under way
        from_list = False  # ``from base import ...``
        pending: Optional[str] = None  # the module the next store binds, by name
        local_modules: dict[str, str] = {}  # a local a module was imported into
        for ins in dis.get_instructions(c):
            if ins.opname in _ATTRIBUTE_OPS and name is not None:
                attrs.append(ins.argval)
                continue
            if name is not None:
                out.append((name, tuple(attrs)))
            name, attrs = (ins.argval, []) if ins.opname == "LOAD_GLOBAL" else (None, [])
            op = ins.opname
            if op == "LOAD_CONST":
                consts = [*consts[-1:], ins.argval]
                continue
            if op == "IMPORT_NAME":
                level, fromlist = consts if len(consts) == 2 else (None, None)
                # Absolute imports only: a relative one names its module from the
                # package of the code, which a code object does not say.
                base = ins.argval if level == 0 else None
                from_list = bool(fromlist)
                # ``import a.b`` binds the top package ``a``
                pending = None if base is None else base.partition(".")[0]
                consts = []
                continue
            consts = []
            if base is not None and op == "IMPORT_FROM":
                if from_list:  # from a import b: the local b is a's b
                    out.append((IMPORTED + base, (ins.argval,)))
                    pending = f"{base}.{ins.argval}"
                else:  # import a.b as c: c is a.b itself
                    pending = base
                continue
            if base is not None and op == "STORE_FAST":
                if pending is not None:
                    local_modules[ins.argval] = pending
                pending = None
                continue
            if base is not None and op in ("ROT_TWO", "SWAP", "POP_TOP"):
                continue  # (3.10 moves the module about before storing it)
            base = pending = None
            if op in _LOCAL_LOADS and ins.argval in local_modules:
                name = IMPORTED + local_modules[ins.argval]
        if name is not None:
            out.append((name, tuple(attrs)))
    return tuple(out)


# Marks a chain's start that is a module the code imports itself, by its module name
# (``_name_chains``), not a global's name.
IMPORTED = "\0import:"
# How a local is read (3.12 checks some for being bound first).
_LOCAL_LOADS = ("LOAD_FAST", "LOAD_FAST_CHECK")


def _attributes_read(func: types.FunctionType, owner: Optional[type] = None,
                     depth: int = 2) -> dict[tuple[str, str], Any]:
    """Attributes of the user's other modules that ``func`` (and the functions of its
    module it calls) reads by name: ``settings.SCALE``, ``pkg.sub.LIMIT``; and,
    ``depth`` calls deep, the globals read by such a module's functions it calls
    (``cfg.helper()`` reading its own module's ``SCALE``). A worker's copy of the
    module holds the value at its import (exec, template) or at its fork: without these,
    a map after ``settings.SCALE = 10`` ran its workers' items with SCALE = 1 (the loop:
    10). Only modules that their import gives back (``sys.modules``), and not classes'
    attributes: a descriptor, an Enum's members, what a subclass inherits cannot be
    set back as plain values. {(module, name): value}."""
    module_globals = func.__globals__
    found: dict[tuple[str, str], Any] = {}
    for f in _reached(func, owner):
        if depth > 0:
            # A function held in a closure cell runs too: the function a decorator
            # without functools.wraps wrapped (its reads of settings.SCALE were not
            # seen, and workers kept SCALE at its import).
            for cell in f.__closure__ or ():
                try:
                    held = cell.cell_contents
                except ValueError:  # an empty cell
                    continue
                # Plain functions only: any other object's getattr may run its code
                # (an attribute dict's __getattr__ raised KeyError).
                if isinstance(held, types.FunctionType):
                    for k, v in _attributes_read(_innermost(held), None,
                                                 depth - 1).items():
                        found.setdefault(k, v)
        for name, attrs in _name_chains(f.__code__):
            holder = (sys.modules.get(name[len(IMPORTED):]) if name.startswith(IMPORTED)
                      else module_globals.get(name))
            if isinstance(holder, functools._lru_cache_wrapper):  # type: ignore[attr-defined]
                holder = _innermost(holder)  # from cfg import cached: its reads count
            if attrs and holder is not None and not isinstance(
                    holder, (types.ModuleType, type, types.FunctionType)):
                # A method called on an object of a class of another of the user's
                # modules (model.predict(x), reading models.THRESHOLD): what it reads
                # of its module counts too.
                method = _method_of(type(holder), attrs[0])
                if method is not None and method.__module__ != func.__module__:
                    _add_reads_of(method, depth, found)
                continue
            if (isinstance(holder, types.FunctionType) and attrs
                    and attrs[0] in holder.__dict__ and _importable(holder)
                    and _users_module(sys.modules.get(holder.__module__))
                    and _plain_value(holder.__dict__[attrs[0]])):
                # An attribute of a function of the user's modules (``scale.factor``,
                # which scale reads, set to 9 between two maps: workers kept 1).
                found[(holder.__module__,
                       f"{FUNCTION_ATTRIBUTE}{holder.__qualname__}.{attrs[0]}")] = \
                    holder.__dict__[attrs[0]]
            if (isinstance(holder, types.FunctionType) and holder.__module__ != func.__module__
                    and _users_module(sys.modules.get(holder.__module__))):
                # A helper imported by name from another module of the user's (``from
                # cfg import helper``): what it reads of its own module counts too.
                _add_reads_of(holder, depth, found)
                continue
            # The script itself imported inside the function (``import __main__``, then
            # ``__main__.SCALE``): a worker's __main__ is not the script (template,
            # exec: AttributeError where the loop gave results) or its copy at the
            # fork (the value then). Its globals read so are set there too.
            script = name == IMPORTED + "__main__" and holder is sys.modules.get("__main__")
            for attr in attrs:
                if not (isinstance(holder, types.ModuleType)
                        and (_users_module(holder) or script)
                        and sys.modules.get(holder.__name__) is holder):
                    break
                try:
                    value = getattr(holder, attr)
                except Exception:  # a lazy module attribute that raises
                    break
                if isinstance(value, types.ModuleType):
                    holder = value  # pkg.sub.NAME: read on
                    continue
                if isinstance(value, functools._lru_cache_wrapper):  # type: ignore[attr-defined]
                    value = _innermost(value)  # cfg.cached(x): what it reads counts
                if isinstance(value, types.FunctionType):
                    if (value.__module__, value.__qualname__) != (holder.__name__, attr):
                        # Rebound by the caller (helpers.f = helpers.g, or mock-style to
                        # a function of another module): the binding travels, by name;
                        # warm workers called their own helpers.f, 100 of 100 wrong.
                        found[(holder.__name__, attr)] = value
                    _add_reads_of(value, depth, found)
                elif _plain_value(value):
                    found[(holder.__name__, attr)] = value
                break
    return found


def _add_reads_of(func: types.FunctionType, depth: int,
                  found: dict[tuple[str, str], Any]) -> None:
    """Into ``found``: what ``func``, a function of another module that is called, reads
    (``depth`` > 0): its own module's globals, when that module is the user's, and the
    attributes it reads of the user's other modules."""
    if depth <= 0 or not _importable(func):
        return
    core = _innermost(func)
    for k, v in _attributes_read(core, None, depth - 1).items():
        found.setdefault(k, v)
    if _users_module(sys.modules.get(core.__module__)):
        for global_name, v in _globals_read(core).items():
            if _plain_value(v):
                found.setdefault((core.__module__, global_name), v)


# Module attributes at least this large, of a type that cannot change in place, are
# pickled once per object in this process, not once per map: a 200 MB table pickled and
# hashed with every map made it 3x slower than the loop. (A smaller one, or one that can
# change in place, a list or a dict, is pickled each map: it may have changed.)
ATTRIBUTE_REUSE_BYTES = 1 << 20
_IMMUTABLE = (bytes, str, int, float, complex, tuple, frozenset, type(None))
# (module, name) -> (the object, its pickle, the pickle's digest), for those
# ATTRIBUTE_REUSE_BYTES or larger.
_attribute_pickles: dict[tuple[str, str], tuple[Any, bytes, bytes]] = {}


def _immutable(value: Any) -> bool:
    """Can ``value`` never change? A tuple can, through a list it holds (a table of
    rows, changed in place between two maps, was sent as it was at the first)."""
    stack = [value]
    while stack:
        v = stack.pop()
        if type(v) not in _IMMUTABLE:
            return False
        if isinstance(v, (tuple, frozenset)):
            stack.extend(v)
    return True


class _NotPlainData(Exception):
    pass


# What a module attribute may be made of to travel: builtin data, whose copy in the
# worker is as good as the caller's. An instance of any other class may be compared by
# identity (a sentinel, MISSING = object(), kept in a dict at import): its copy would not
# be the worker's own object, and `CONFIG["a"] is MISSING` turned False there.
_PLAIN_TYPES = frozenset({int, float, complex, str, bytes, bytearray, bool, type(None),
                          list, tuple, dict, set, frozenset})


class _PlainPickler(pickle.Pickler):
    def persistent_id(self, obj: Any) -> None:
        kind = type(obj)
        if kind not in _PLAIN_TYPES and not isinstance(
                obj, (type, types.FunctionType, types.BuiltinFunctionType, enum.Enum)):
            raise _NotPlainData(kind.__name__)  # classes, functions, members: by name
        return None


def _plain_dumps(value: Any) -> bytes:
    buf = io.BytesIO()
    _PlainPickler(buf, protocol=_PROTOCOL).dump(value)
    return buf.getvalue()


def _attribute_pickle(where: tuple[str, str], value: Any) -> tuple[bytes, bytes]:
    """(the pickle of ``value``, its digest), reused for a large value that cannot
    change in place and is still the same object. Raises for a value that is not plain
    data (_PLAIN_TYPES): it stays the worker's own."""
    known = _attribute_pickles.get(where)
    if known is not None and known[0] is value:
        return known[1], known[2]
    data = _plain_dumps(value)
    digest = hashlib.sha1(data).digest()
    if len(data) >= ATTRIBUTE_REUSE_BYTES and _immutable(value):
        _attribute_pickles[where] = (value, data, digest)  # kept: its id stays its own
    return data, digest


def _attributes_patch(core: Optional[types.FunctionType], owner: Optional[type],
                      kept: frozenset[tuple[str, str]] = frozenset()
                      ) -> tuple[Optional[dict[tuple[str, str], bytes]], bytes]:
    """``_attributes_read``, pickled; not those in ``kept`` (what an initializer sets in
    each process), nor what cannot be pickled: the worker keeps its own. A large value
    travels once per key to each worker, as a large function does: an unchanged one
    keeps the key, and workers that have it are not sent it again."""
    if core is None:
        return None, b""
    values: dict[tuple[str, str], bytes] = {}
    h = hashlib.sha1()
    for where, value in sorted(_attributes_read(core, owner).items()):
        if where in kept:
            continue
        try:
            values[where], digest = _attribute_pickle(where, value)
        except Exception:
            continue
        h.update(repr(where).encode() + digest)
    return (values, h.digest()) if values else (None, b"")


# The names under which FunctionRef.attrs carries a singledispatch function's
# registrations (_dispatch_registrations) and a function's attribute (as
# "<qualname>.<attribute>", _attributes_read): no module attribute can have them.
DISPATCH = "\0dispatch:"
FUNCTION_ATTRIBUTE = "\0function:"


def _singledispatch(value: Any) -> bool:
    """A functools.singledispatch function (a plain function holding its registry)."""
    return (isinstance(value, types.FunctionType) and "registry" in value.__dict__
            and "register" in value.__dict__)


def _dispatch_registrations(func: Any, core: Optional[types.FunctionType],
                            owner: Optional[type]) -> dict[tuple[str, str], bytes]:
    """The registrations of the singledispatch functions the map reaches by name: the
    function mapped, and those its code (and its module's functions it calls) loads, as
    a global or a module's attribute; {(module, DISPATCH + qualname): pickled
    [(class, implementation)]}. A worker imports the module and has the registrations
    made at its import, not those another module made (a plugin registering its types:
    it was never imported there) nor those made since (``@to_json.register(float)``
    between two maps): it answered the generic case, 150 of 150 results wrong.
    _WithAttributes registers them there."""
    found: dict[tuple[str, str], Any] = {}

    def consider(value: Any) -> None:
        if _singledispatch(value) and _importable(value):
            found[(value.__module__, value.__qualname__)] = value

    consider(func)
    if core is not None:
        module_globals = core.__globals__
        for f in _reached(core, owner):
            for name, attrs in _name_chains(f.__code__):
                holder = (sys.modules.get(name[len(IMPORTED):]) if name.startswith(IMPORTED)
                          else module_globals.get(name))
                consider(holder)
                if isinstance(holder, types.ModuleType) and attrs:
                    consider(holder.__dict__.get(attrs[0]))  # fmt.to_json(x)
    out: dict[tuple[str, str], bytes] = {}
    for (module, qualname), dispatcher in found.items():
        pairs = [(cls, impl) for cls, impl in dispatcher.registry.items() if cls is not object]
        if pairs:
            # All or none: a worker's registry without one of them answers the generic
            # case for its class (dropped whole, one implementation holding a lock lost
            # a plugin's registration too). One that cannot travel raises: the function
            # cannot be rebuilt there, and its items run in the caller, warned.
            out[(module, DISPATCH + qualname)] = dumps(pairs)
    return out


def _resolve_name(module: str, qualname: str) -> Any:
    target: Any = importlib.import_module(module)
    for part in qualname.split("."):
        target = getattr(target, part)
    return target


def _attribute_here(module: str, name: str) -> Any:
    """What _set_attribute_here would replace (_UNSET: nothing to compare with)."""
    if name.startswith(DISPATCH):
        return _UNSET
    if name.startswith(FUNCTION_ATTRIBUTE):
        qualname, attribute = name[len(FUNCTION_ATTRIBUTE):].rsplit(".", 1)
        return getattr(_resolve_name(module, qualname), attribute, _UNSET)
    return getattr(importlib.import_module(module), name, _UNSET)


def _set_attribute_here(module: str, name: str, value: Any) -> None:
    """In a worker: an attribute the caller's function reads, set as the caller has it:
    a module's (``settings.SCALE``), or a function's (FUNCTION_ATTRIBUTE)."""
    if name.startswith(DISPATCH):
        _register_here(_resolve_name(module, name[len(DISPATCH):]), value)
    elif name.startswith(FUNCTION_ATTRIBUTE):
        qualname, attribute = name[len(FUNCTION_ATTRIBUTE):].rsplit(".", 1)
        target = _resolve_name(module, qualname)
        if isinstance(target, types.FunctionType):
            setattr(target, attribute, value)
    else:
        setattr(importlib.import_module(module), name, value)


# builtins as this module found it: what a name held then (_builtins_read).
_BUILTINS_AT_IMPORT: dict[str, Any] = dict(vars(builtins))


def _builtins_read(core: Optional[types.FunctionType], owner: Optional[type]
                   ) -> dict[tuple[str, str], bytes]:
    """The names the caller put into builtins that the function (or its module's
    functions it calls) reads: ``gettext.install()``'s ``_``, ``builtins.DEBUG = 3``;
    {("builtins", name): pickled value}. A worker started from a fresh interpreter (the
    template, loky's start), or forked before, lacks them: NameError where the loop
    gave results. Not Python's own (print, len, exit: the worker has them)."""
    if core is None:
        return {}
    module_globals = core.__globals__
    table = vars(builtins)
    out: dict[tuple[str, str], bytes] = {}
    for f in _reached(core, owner):
        for name, _ in _name_chains(f.__code__):
            if name in module_globals or name not in table or ("builtins", name) in out:
                continue
            value = table[name]
            if _BUILTINS_AT_IMPORT.get(name, _UNSET) is value and (
                    getattr(value, "__module__", None) in ("builtins", "_sitebuiltins")
                    or type(value).__module__ == "_sitebuiltins"
                    or value is None or value is Ellipsis or value is NotImplemented
                    or isinstance(value, bool)):
                continue  # Python's own (by name and value: builtins.DEBUG = True is not)
            try:
                out[("builtins", name)] = dumps(value)
            except Exception:  # cannot travel: the worker keeps its own (or none)
                continue
    return out


def _register_here(target: Any, pairs: list[tuple[Any, Any]]) -> None:
    """In a worker: the caller's registrations made on its singledispatch function."""
    if not _singledispatch(target):
        return
    for cls, impl in pairs:
        if target.registry.get(cls) is not impl:
            target.register(cls, impl)


def _set_per_process(initializer: Callable[..., Any],
                     per_process: frozenset[str]) -> frozenset[tuple[str, str]]:
    """(module, name) of what ``initializer`` sets for its process: the globals it
    assigns in its own module, and the attributes it stores on a module it names
    (``settings.MODEL = ...``; not those it stores on other objects). Never sent with
    the function (``_attributes_patch``): the caller's value would overwrite the
    worker's own."""
    import dis

    core, _ = _code_that_runs(initializer)
    if core is None:
        return frozenset()
    home = core.__module__
    out = {(home, name) for name in per_process}
    for c in _code_objects(core.__code__):
        target: Any = None  # the module the instruction before loaded, if one
        for ins in dis.get_instructions(c):
            if ins.opname == "STORE_ATTR" and isinstance(target, types.ModuleType):
                out.add((target.__name__, ins.argval))  # settings.MODEL = ...
            value = core.__globals__.get(ins.argval) if ins.opname == "LOAD_GLOBAL" else None
            target = value if isinstance(value, types.ModuleType) else None
    return frozenset(out)


# The caller's recursion limit, int-to-str digit limit (None where Python has none),
# decimal context as (prec, rounding, Emin, Emax, capitals, clamp, trap names) or None
# where the caller never imported decimal, warnings filters, its environment
# variables changed since we were imported (_environment_changes), its file mode
# creation mask (None where it cannot be read) and its time zone as its C library last
# read it (_time_zone), sys.argv (_argv), its C locale (_locale_now), its sockets'
# default timeout (_socket_timeout) and numpy's floating-point error handling
# (_numpy_errors). (Its context variables travel apart, once per worker:
# FunctionRef.context.)
Settings = tuple[int, Optional[int], Optional[tuple[Any, ...]], tuple[Any, ...],
                 tuple[tuple[str, Optional[str]], ...], Optional[int], tuple[Any, ...],
                 tuple[str, Optional[tuple[Any, ...]]],
                 Optional[tuple[tuple[int, str], ...]], Optional[tuple[Optional[float]]],
                 Optional[tuple[tuple[str, str], ...]]]


def caller_settings() -> Settings:
    """Interpreter settings the caller's loop would run its items under: a program that
    raised its recursion limit or int_max_str_digits, or set a decimal precision, got
    RecursionError, ValueError or 28 digits from workers where the loop gave results."""
    digits = getattr(sys, "get_int_max_str_digits", None)
    decimal = sys.modules.get("decimal")
    dec = _decimal_settings(decimal.getcontext()) if decimal is not None else None
    return (sys.getrecursionlimit(), digits() if digits is not None else None, dec,
            tuple(warnings.filters), _environment_changes(), _umask(), _time_zone(),
            _argv(), _locale_now(), _socket_timeout(), _numpy_errors())


_NUMPY_DEFAULT_ERRORS = (("divide", "warn"), ("invalid", "warn"), ("over", "warn"),
                         ("under", "ignore"))


def _numpy_errors() -> Optional[tuple[tuple[str, str], ...]]:
    """numpy's handling of floating-point errors (``np.seterr``), where numpy is
    imported: it lives in a context variable whose value (a capsule) cannot be pickled,
    so ``np.seterr(over="raise")`` before a map gave ``inf`` in workers where the loop
    raised FloatingPointError (a hunting helper: 200 of 200)."""
    numpy = sys.modules.get("numpy")
    geterr = getattr(numpy, "geterr", None)
    if geterr is None:
        return None
    try:
        return tuple(sorted(geterr().items()))
    except Exception:  # noqa: BLE001 - a numpy we do not know: not carried
        return None


# The C locale's categories a worker follows the caller in (LC_ALL is all of them).
_LOCALE_CATEGORIES = ("LC_CTYPE", "LC_COLLATE", "LC_TIME", "LC_NUMERIC", "LC_MONETARY",
                      "LC_MESSAGES")


def _locale_now() -> Optional[tuple[tuple[int, str], ...]]:
    """This process's C locale, as (category, name) pairs; None where the locale module
    was never imported (nothing of Python's changed it then). The locale is one per
    process: ``locale.setlocale(LC_ALL, "de_DE.UTF-8")`` between two maps formatted
    numbers and month names, and sorted with strxfrm, as the loop did in the caller
    only (workers kept the locale of their start: a hunting helper's 300 of 300)."""
    loc = sys.modules.get("locale")
    if loc is None:
        return None
    out = []
    for name in _LOCALE_CATEGORIES:
        category = getattr(loc, name, None)
        if category is None:
            continue
        try:
            out.append((category, loc.setlocale(category)))
        except Exception:  # noqa: BLE001 - (locale.Error) not readable: not carried
            continue
    return tuple(out)


def _socket_timeout() -> Optional[tuple[Optional[float]]]:
    """The sockets' default timeout (``socket.setdefaulttimeout``, one per process), as
    a 1-tuple; None where the socket module was never imported."""
    sock = sys.modules.get("socket")
    return (sock.getdefaulttimeout(),) if sock is not None else None


def _argv() -> tuple[str, Optional[tuple[Any, ...]]]:
    """The caller's ``sys.argv``, as (its digest, its entries): a worker from the
    template ran with ``['-c']``, so a function reading the script's arguments
    (``sys.argv[1:]``, ``argparse`` without arguments) read none there (15 of 60
    results wrong). Every entry keeps its place (one that is not a str, a Path the
    script put there, was dropped: sys.argv[1] was the next one); one that cannot be
    pickled goes as its str. Lean refs carry the digest alone (``_lean_settings``): a
    script run with 25,000 file names sent 1.1 MB with every chunk (3,000 items: 4 s
    before, 15.5 s)."""
    argv = getattr(sys, "argv", None)
    if not isinstance(argv, list):
        return "", ()
    entries = tuple(a if isinstance(a, str) or _picklable(a) else str(a) for a in argv)
    try:
        digest = hashlib.sha1(pickle.dumps(entries, protocol=_PROTOCOL)).hexdigest()
    except Exception:  # noqa: BLE001 - (entries each pickle: kept as str)
        entries = tuple(str(a) for a in argv)
        digest = hashlib.sha1(repr(entries).encode()).hexdigest()
    return digest, entries


def _lean_settings(settings: Optional[Settings]) -> Optional[Settings]:
    """``settings`` with sys.argv's digest alone: a worker keeps the entries it got
    (``_ARGVS``); one that lacks them asks for the whole ref (NEED_FUNCTION)."""
    if settings is None:
        return None
    digest, _ = settings[7]
    return (*settings[:7], (digest, None), *settings[8:])  # type: ignore[return-value]


# digest -> sys.argv's entries, the last few a caller sent to this worker.
_ARGVS: collections.OrderedDict[str, tuple[Any, ...]] = collections.OrderedDict()
_MAX_ARGVS = 4


def _time_zone() -> tuple[Any, ...]:
    """The time zone this process's C library uses: what time.tzset() last read (a TZ
    set without it is not read yet, in the loop either)."""
    return time.tzname, time.timezone, time.altzone, time.daylight


def _umask() -> Optional[int]:
    """This process's file mode creation mask, as Linux shows it on the second line of
    /proc/self/status (~11 us, read once per map that uses a pool): os.umask() can only
    be read by setting it, and another thread creating a file meanwhile would get the
    mask set for the read. None where it cannot be read (then workers keep theirs)."""
    try:
        fd = os.open("/proc/self/status", os.O_RDONLY)
        try:
            head = os.read(fd, 128)
        finally:
            os.close(fd)
        at = head.index(b"\nUmask:") + 7
        return int(head[at:head.index(b"\n", at)], 8)
    except (OSError, ValueError):
        return None


# The environment as this module found it (os.environ's own mapping, where it has one:
# compared in ~1 us), the names changed since, and the last answer.
_ENV_DATA: Any = getattr(os.environ, "_data", None)
_ENV_AT_START: dict[Any, Any] = dict(_ENV_DATA) if isinstance(_ENV_DATA, dict) else {}
_ENV_SEEN: list[Any] = [dict(_ENV_AT_START), ()]  # [the mapping, its changes]
_ENV_CHANGED: set[Any] = set()
# What a worker has of its own, whatever the caller's: adaptive_exec.backends.loky's
# _worker_env (one BLAS thread; "in a worker").
_ENV_OURS = frozenset({"ADAPTIVE_EXEC_IN_WORKER", "OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS",
                       "MKL_NUM_THREADS"})


def _environment_changes() -> tuple[tuple[str, Optional[str]], ...]:
    """The caller's environment variables set, changed or removed since this module was
    imported, as (name, value or None): workers have the environment of their start
    (``os.environ["MODE"] = "b"`` between two maps: a warm worker's items read "a").
    Every name changed once stays in the answer, so a worker started before a change
    and one started after agree."""
    data = _ENV_DATA
    if not isinstance(data, dict) or data == _ENV_SEEN[0]:
        return _ENV_SEEN[1]  # type: ignore[no-any-return]
    for key in set(data) | set(_ENV_AT_START):
        if data.get(key) != _ENV_AT_START.get(key):
            _ENV_CHANGED.add(key)
    changes = []
    for key in _ENV_CHANGED:
        name = os.fsdecode(key) if isinstance(key, bytes) else key
        if name not in _ENV_OURS:
            changes.append((name, os.environ.get(name)))
    _ENV_SEEN[:] = [dict(data), tuple(sorted(changes))]
    return _ENV_SEEN[1]  # type: ignore[no-any-return]


def context_blob(ctx: Any = None) -> Optional[bytes]:
    """The caller's context variables that a module holds (``RATE = ContextVar(...)``),
    as one pickle of (module, name, pickled value) triples; None when there are none.
    ``ctx``: a ``contextvars.Context`` copied on the caller's thread (the sampling
    watch reads it from its own); else this thread's. A worker's items read them set as
    the loop's do: they read the worker's own before (a forked worker's from when the
    pool started: ``RATE.set(5)`` between two maps gave 199 of 200 results wrong). A
    variable no module holds, or whose value cannot be pickled, is not carried (a
    script's own: a function that reads it cannot be pickled, and runs in the caller).
    Values travel as a module's globals do: a module's sentinel by name."""
    import contextvars

    if ctx is None:
        ctx = contextvars.copy_context()
    if not len(ctx):
        return None
    out, kept = [], []
    decimal_var = _decimal_var()
    for var, value in ctx.items():
        if var is decimal_var:
            continue  # the decimal context travels with the settings (caller_settings)
        home = _context_var_home(var)
        if home is None:
            continue
        try:
            out.append((*home, cloudpickle_dumps(value, sentinels_by_name=True)))
        except Exception:  # noqa: BLE001 - not carried: the worker keeps its own
            kept.append(home)  # (a forked worker's is the caller's of the fork: a lock)
    if not out and not kept:
        return None
    return pickle.dumps((tuple(sorted(out)), tuple(sorted(kept))), protocol=_PROTOCOL)


def _decimal_var() -> Any:
    """The ContextVar the decimal module keeps its context in (set by any
    ``decimal.getcontext()``, ours in caller_settings included), or None before decimal
    is imported. No module global holds the C module's: looking for its home cost a
    scan of every module on each map's first use (5-19 ms, on the path to the first
    worker's item)."""
    decimal = sys.modules.get("decimal")
    if decimal is None:
        return None
    if _DECIMAL_VAR and _DECIMAL_VAR[0] is decimal:
        return _DECIMAL_VAR[1]
    import contextvars

    ctx = contextvars.Context()
    ctx.run(decimal.getcontext)
    var = next(iter(ctx), None)
    _DECIMAL_VAR[:] = [decimal, var]
    return var


_DECIMAL_VAR: list[Any] = []  # [decimal module, its ContextVar]

# id(var) -> (module, name, var) of every ContextVar a module holds, brought up to date
# when modules were imported since (those alone are scanned), and made again from every
# module when a variable is not found (once per import: one a module came to hold after
# its scan, a lazily made one, a reload's) or is no longer where it was (a reload).
# Under _VAR_HOMES_LOCK: two threads' maps (or a watch beside its map) look at once.
_VAR_HOMES: dict[int, tuple[str, str, Any]] = {}
_VAR_HOMES_MADE = [-1]  # len(sys.modules) when last brought up to date
_VAR_HOMES_FULL = [-1]  # len(sys.modules) when every module was last scanned
# module name -> the module scanned (a weak reference where it takes one): not its id,
# which a module imported again after the old one was freed often gets.
_VAR_HOMES_SCANNED: dict[str, Any] = {}
_VAR_HOMES_LOCK = threading.RLock()


def _context_var_home(var: Any) -> Optional[tuple[str, str]]:
    """(module, name) of the importable module's global that holds ``var``, or None.
    At most one scan of every module per import, not per variable: a program that makes
    a variable per request (no module holds those) paid a scan of every module each."""
    with _VAR_HOMES_LOCK:
        if len(sys.modules) != _VAR_HOMES_MADE[0]:
            _scan_var_homes(new_only=True)
        home = _VAR_HOMES.get(id(var))
        if home is not None and home[2] is var:
            if getattr(sys.modules.get(home[0]), home[1], None) is var:
                return home[0], home[1]
            # moved, or replaced (a reload): where is it now?
        elif _VAR_HOMES_FULL[0] == len(sys.modules):
            return None  # no module holds it (a variable per request): no scan again
        _scan_var_homes()
        home = _VAR_HOMES.get(id(var))
        return (home[0], home[1]) if home is not None and home[2] is var else None


def _scanned(name: str, module: Any) -> bool:
    seen = _VAR_HOMES_SCANNED.get(name)
    if isinstance(seen, weakref.ref):
        seen = seen()
    return seen is module


def _scan_var_homes(new_only: bool = False) -> None:
    """Note the ContextVars modules hold: of every module, or (``new_only``) of those
    not scanned before (a module imported since, or a new one under an old name).
    Under _VAR_HOMES_LOCK."""
    import contextvars

    if not new_only:
        _VAR_HOMES.clear()
        _VAR_HOMES_SCANNED.clear()
    for name, module in list(sys.modules.items()):
        if name.startswith("__") or module is None:  # __main__, __mp_main__: not by name
            continue
        if _scanned(name, module):
            continue
        try:
            for key, value in list(vars(module).items()):
                if isinstance(value, contextvars.ContextVar) and id(value) not in _VAR_HOMES:
                    _VAR_HOMES[id(value)] = (name, key, value)
        except Exception:  # noqa: BLE001 - a module whose namespace cannot be read
            pass
        try:
            _VAR_HOMES_SCANNED[name] = weakref.ref(module)
        except TypeError:  # not a module (any object may be in sys.modules)
            _VAR_HOMES_SCANNED[name] = module
    _VAR_HOMES_MADE[0] = len(sys.modules)
    if not new_only:
        _VAR_HOMES_FULL[0] = _VAR_HOMES_MADE[0]


def with_context(ref: FunctionRef, blob: Optional[bytes]) -> FunctionRef:
    """``ref`` carrying the caller's context variables (``context_blob``), named by a
    digest that lean refs keep: a worker gets them once per change of their values
    (backends.loky.LokyTarget; one that lacks them asks for the whole ref), not with
    every chunk, and not the function again with them."""
    if blob is None:
        return ref
    return dataclasses.replace(ref, context=blob,
                               context_key=hashlib.sha1(blob).hexdigest()[:16])


# context_key -> the caller's context variables as unpickled here: [(var, value)] to
# set, and the variables it had set but could not send (the worker keeps its own). The
# last few, within _CONTEXT_BYTES of pickles but for the newest (values change often:
# each set was kept whole, 16 of 100 MB each).
Context = tuple[list[tuple[Any, Any]], frozenset[Any]]
_CONTEXTS: collections.OrderedDict[str, tuple[Context, int]] = collections.OrderedDict()
_MAX_CONTEXTS = 4
_CONTEXT_BYTES = 64 << 20
_NO_CONTEXT: Context = ([], frozenset())
_CONTEXTS_LOCK = threading.Lock()


def _context_of(ref: FunctionRef) -> Optional[Context]:
    """The context variables to set for ``ref``'s chunk; None when a lean ref names
    some this worker lacks (it then asks for the whole ref)."""
    if ref.context_key is None:
        return _NO_CONTEXT
    with _CONTEXTS_LOCK:  # a dask worker runs chunks on several threads
        known = _CONTEXTS.get(ref.context_key)
        if known is not None:
            _CONTEXTS.move_to_end(ref.context_key)
            return known[0]
    if ref.context is None:
        return None
    import contextvars

    sent, kept = pickle.loads(ref.context)
    found, held = [], set()
    for module, name, data in sent:
        try:
            var = getattr(importlib.import_module(module), name)
            if isinstance(var, contextvars.ContextVar):
                found.append((var, pickle.loads(data)))
        except Exception:  # noqa: BLE001 - as the module has it here
            continue
    for module, name in kept:
        var = getattr(sys.modules.get(module), name, None)
        if isinstance(var, contextvars.ContextVar):
            held.add(var)
    context: Context = (found, frozenset(held))
    with _CONTEXTS_LOCK:
        _CONTEXTS[ref.context_key] = (context, len(ref.context))
        while len(_CONTEXTS) > 1 and (len(_CONTEXTS) > _MAX_CONTEXTS or sum(
                size for _, size in _CONTEXTS.values()) > _CONTEXT_BYTES):
            _CONTEXTS.popitem(last=False)
    return context


def _in_context(context: Context, run: Callable[[], _T]) -> _T:
    """``run()`` in a copy of this worker's context with the caller's variables set:
    what an item sets stays in its chunk (it leaked into every later map's items).
    A module's variable the worker had when it started (a forked worker has the
    caller's of that moment) is left out unless changed here since (an initializer's):
    the caller's of now is carried, or it has none (``VAR.reset(token)`` after the map
    that started the pool: the next maps' items read the old value)."""
    import contextvars

    pairs, held = context
    started = _START_CONTEXT.get("values")
    if started:
        ctx = contextvars.Context()
        for var, value in contextvars.copy_context().items():
            if var in held or not (started.get(var, _UNSET) is value
                                   and _context_var_home(var)):
                ctx.run(var.set, value)
    else:
        ctx = contextvars.copy_context()
    for var, value in pairs:
        ctx.run(var.set, value)
    return ctx.run(run)


# The context variables this worker had when it started (worker_init): {var: value}.
_START_CONTEXT: dict[str, dict[Any, Any]] = {}
_UNSET = object()


def _adopt_locale(locales: tuple[tuple[int, str], ...]) -> None:
    """The caller's C locale, category by category; one this machine lacks (a dask
    worker elsewhere) stays the worker's own."""
    import locale

    for category, name in locales:
        try:
            if locale.setlocale(category) != name:
                locale.setlocale(category, name)
        except (locale.Error, ValueError):
            continue


def _adopt_settings(settings: Settings) -> bool:
    """The caller's settings, set here; False when a lean ref's sys.argv is not known
    here (the caller then sends the whole ref)."""
    (limit, digits, dec, filters, environment, umask, zone, (digest, argv), locales,
     sock_timeout, numpy_errors) = settings
    if argv is None:
        argv = _ARGVS.get(digest)
        if argv is None:
            return False
        _ARGVS.move_to_end(digest)
    elif digest:
        _ARGVS[digest] = argv
        _ARGVS.move_to_end(digest)
        while len(_ARGVS) > _MAX_ARGVS:
            _ARGVS.popitem(last=False)
    if argv and tuple(getattr(sys, "argv", ())) != argv:
        sys.argv = list(argv)
    zone_changed = False
    for name, value in environment:  # the caller's; a worker's own (_ENV_OURS) not sent
        if os.environ.get(name) == value:
            continue
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value
        zone_changed = zone_changed or name == "TZ"
    if zone_changed or _time_zone() != zone:
        # The C library reads TZ at tzset() (and its first use): a caller that set TZ and
        # called time.tzset() between two maps had its items read the new zone in the
        # loop, the old one in warm workers (150 of 150 hours wrong). At each change of
        # TZ (another zone may have the same names and offsets, not the same rules),
        # and where the zone read differs from the caller's.
        time.tzset()
    if umask is not None:
        os.umask(umask)  # os.umask(0o077) between maps: workers made files 0o644
    if locales is not None and _locale_now() != locales:
        _adopt_locale(locales)
    if sock_timeout is not None:
        import socket

        if socket.getdefaulttimeout() != sock_timeout[0]:
            socket.setdefaulttimeout(sock_timeout[0])
    if numpy_errors is not None and _numpy_errors() != (
            None if "numpy" not in sys.modules and numpy_errors == _NUMPY_DEFAULT_ERRORS
            else numpy_errors):
        # (numpy is imported here for it only where the caller's differ from its
        # defaults: a template's worker would otherwise import it, ~0.1 s, for a
        # function that never uses it.)
        try:
            import numpy

            seterr = getattr(numpy, "seterr")  # noqa: B009 - (its stubs want literals)
            seterr(**dict(numpy_errors))
        except Exception:  # noqa: BLE001 - no numpy here (a dask worker's machine)
            pass
    if tuple(warnings.filters) != filters:
        # The caller's filters: under "error" (-W error, pytest's filterwarnings) the
        # loop raised at the item that warned, where workers went on. (Reset first: it
        # tells the per-module registries that the filters changed.)
        warnings.resetwarnings()
        kept: list[Any] = warnings.filters  # type: ignore[assignment]
        kept.extend(filters)
    if sys.getrecursionlimit() != limit:
        sys.setrecursionlimit(limit)
    if digits is not None and getattr(sys, "get_int_max_str_digits", lambda: digits)() != digits:
        sys.set_int_max_str_digits(digits)
    _set_decimal(dec)
    return True


def _set_decimal(dec: Optional[tuple[Any, ...]]) -> None:
    """The caller's decimal context (``_decimal_settings``) as this thread's."""
    if dec is None and "decimal" not in sys.modules:
        return
    import decimal

    if dec is None:  # an earlier map's caller had set one: back to the default
        dec = _decimal_settings(decimal.Context())
    if _decimal_settings(decimal.getcontext()) != dec:
        prec, rounding, emin, emax, capitals, clamp, traps = dec
        decimal.setcontext(decimal.Context(
            prec=prec, rounding=rounding, Emin=emin, Emax=emax, capitals=capitals,
            clamp=clamp, traps=[getattr(decimal, name) for name in traps]))


def _shared_settings(settings: Optional[Settings]) -> None:
    """On a dask worker (a process that serves others, on its own thread): of the
    caller's settings, the decimal context, set in the items' own context (copied per
    chunk: gone after it). Not the process-wide ones (environment, recursion limit,
    warnings filters, locale, umask, argv), which would stay set for the cluster's
    other tasks: those stay the worker's own (README, "Running on a dask cluster")."""
    if settings is not None:
        _set_decimal(settings[2])


def _decimal_settings(c: Any) -> tuple[Any, ...]:
    return (c.prec, c.rounding, c.Emin, c.Emax, c.capitals, c.clamp,
            tuple(sorted(k.__name__ for k, on in c.traps.items() if on)))


def _context() -> tuple[Optional[str], tuple[str, ...]]:
    try:
        cwd: Optional[str] = os.getcwd()
    except OSError:  # the caller's directory was removed: the workers keep theirs
        cwd = None
    return cwd, tuple(p for p in sys.path if isinstance(p, str))


def _code_that_runs(func: Callable[..., Any]) -> tuple[Optional[types.FunctionType],
                                                       Optional[type]]:
    """The plain function whose code runs, through partials, bound methods and our
    wrapper, or a callable object's ``__call__``; and the class of the object it is
    bound to, if any (its other methods may run too)."""
    from .fingerprint import unwrap

    owner: Optional[type] = None
    f: Any = func
    while True:  # the object a bound method or partial of one is bound to
        f = getattr(f, "__adaptive_exec_wrapped__", f)
        if isinstance(f, types.MethodType):
            owner = type(f.__self__)
            break
        if not isinstance(f, functools.partial):
            break
        f = f.func
    core: Any = _innermost(unwrap(func))
    if not isinstance(core, types.FunctionType):
        owner = type(core)
        core = vars(owner).get("__call__") or next(
            (vars(k)["__call__"] for k in owner.__mro__ if "__call__" in vars(k)), None)
    return (core if isinstance(core, types.FunctionType) else None), owner


def _patch_for(core: Optional[types.FunctionType], owner: Optional[type],
               per_process: frozenset[str] = frozenset()) -> Optional[bytes]:
    """The module globals ``core`` reads, pickled, when it travels by reference (a
    function that travels by value carries the globals it reads, cloudpickle's way);
    not those in ``per_process``, which each worker's initializer sets."""
    if core is None or not _importable(core):
        return None
    values: dict[str, Any] = {}
    for name, value in _globals_read(core, owner).items():
        if name in per_process:
            continue
        if _stateless(value):
            # Its class alone: the worker keeps its own object of that class (a sentinel
            # compared by identity), or gets one where it held another class's (a
            # stateless strategy object the caller swapped, STRATEGY = Slow()).
            try:
                dumps(_StatelessOf(type(value)))
            except Exception:  # a class that cannot travel: the worker keeps its own
                continue
            values[name] = _StatelessOf(type(value))
            continue
        try:
            dumps(value)
        except Exception as exc:  # a lock, a connection: the worker keeps its own
            if isinstance(value, (dict, list, set, tuple, collections.deque)):
                _warn_kept(core.__module__, name, value, exc)
            continue
        values[name] = value
    defaults = _mutable_defaults(core)
    if defaults is not None:
        values[DEFAULTS] = defaults
    # One pickle: a default that is also a global it reads (def f(x, rates=RATES))
    # stays one object in the worker, as in the caller.
    return dumps(values) if values else None


# The patch's entry for the function's own defaults that are mutable containers
# (``_mutable_defaults``); no global can have this name.
DEFAULTS = "\0defaults"


# (module, global) pairs whose kept value was said once in this process (_warn_kept).
_KEPT_SAID: set[tuple[str, str]] = set()


def _warn_kept(module: str, name: str, value: Any, exc: BaseException) -> None:
    """A container the function reads that cannot be pickled (a dict holding a lock
    beside data): workers read their own, as their import made it, so data the caller
    changes in it is not seen there (REG["scale"] = 5: 119 of 120 results the import's,
    silently, where the same function in the script said so and ran in the caller).
    Said once a process, for each such global."""
    if (module, name) in _KEPT_SAID:
        return
    _KEPT_SAID.add((module, name))
    warn_user(f"adaptive_exec: {module}.{name}, a {type(value).__name__} the function "
              f"reads, cannot be pickled ({type(exc).__name__}: {exc}): workers read "
              f"their own, as their import of {module} made it, and what you change in "
              "it is not seen there; pass what changes as an argument, or keep it apart "
              "from what cannot be pickled", UnpicklableWarning)


def _mutable_defaults(core: types.FunctionType) -> Optional[tuple[str, dict[int, Any],
                                                                  dict[str, Any], int]]:
    """The defaults of ``core`` that the caller may have changed since the worker's
    import made them: in place (``def convert(x, rates=RATES)``, then
    ``RATES["eur"] = 2.0``: workers kept the old rates), or rebound (``f.__defaults__
    = (9,)``: 149 of 150 results wrong; ``f.__defaults__ = ((3, 4),)``, a tuple: 150 of
    150); its qualified name, the positional and keyword-only defaults that are builtin
    data, by position and name, and how many positional defaults the caller's function
    has (they fill the last parameters: rebound to more or fewer than the worker's
    import made, position 0 named another parameter there). Not others: a sentinel
    must stay the worker's own object."""
    given = core.__defaults__ or ()
    positional = {i: v for i, v in enumerate(given) if _sent_default(v)}
    keyword = {k: v for k, v in (core.__kwdefaults__ or {}).items() if _sent_default(v)}
    if not (positional or keyword):
        return None
    try:
        dumps((positional, keyword))
    except Exception:  # noqa: BLE001 - holds what cannot travel: the worker keeps its own
        return None
    return core.__qualname__, positional, keyword, len(given)


def _sent_default(value: Any) -> bool:
    """A default that travels with the function taken by name: a builtin container (it
    may change in place), or a small value of builtin data (rebound defaults): a number,
    a short string, a tuple or frozenset of such (``shape=(1, 2)``, rebound: workers
    kept their import's); not a large string, bytes or tuple, pickled each map for a
    rebinding seldom made (a 100 MB one made a map 2.4x slower), nor a sentinel, which
    must stay the worker's own (nor a tuple holding one)."""
    if type(value) in (dict, list, set, bytearray):
        return True
    return _small_data(value, [SMALL_DEFAULT], 0)


def _small_data(value: Any, left: list[int], depth: int) -> bool:
    """Is ``value`` builtin data of at most ``left[0]`` elements and characters in all
    (shared by the parts of a tuple, nested at most 16 deep)?"""
    kind = type(value)
    if kind in (str, bytes):
        left[0] -= len(value)
    elif kind in (tuple, frozenset):
        left[0] -= len(value) + 1
        if left[0] < 0 or depth >= 16:
            return False
        return all(_small_data(v, left, depth + 1) for v in value)
    elif kind in (int, float, complex, bool, type(None)):
        left[0] -= 1
    else:
        return False
    return left[0] >= 0


SMALL_DEFAULT = 4096


def _set_defaults(module: str, entry: tuple[str, dict[int, Any], dict[str, Any], int]
                  ) -> None:
    """In a worker: the caller's mutable defaults set on the module's function."""
    qualname, positional, keyword, count = entry
    target: Any = sys.modules[module]
    for part in qualname.split("."):
        target = getattr(target, part, None)
    target = _innermost(getattr(target, "__adaptive_exec_wrapped__", target))
    if not isinstance(target, types.FunctionType):
        return
    if positional:
        now = list(target.__defaults__ or ())
        if count != len(now):
            # The caller rebound them to another count: they fill the last parameters,
            # so the caller's position i is the worker's i - count + len(now). Those not
            # sent (a sentinel) are the worker's own at that parameter, where it has one.
            rebuilt: list[Any] = []
            for i in range(count):
                j = i - count + len(now)
                if i in positional:
                    rebuilt.append(positional[i])
                elif 0 <= j < len(now):
                    rebuilt.append(now[j])
                else:  # a default the worker's function lacks and that was not sent
                    break
            else:
                target.__defaults__ = tuple(rebuilt)
        else:
            for i, value in positional.items():
                now[i] = value
            target.__defaults__ = tuple(now)
    if keyword and target.__kwdefaults__ is not None:
        target.__kwdefaults__ = {**target.__kwdefaults__, **keyword}


# What a function must not do on a thread of the caller's process, by module: calls
# the signal module lets only the main thread make ("signal only works in main thread
# of the main interpreter" in any other); and swaps of process-wide state, which
# threads running calls at once would make for each other (redirect_stdout: results
# mixed, and sys.stdout left set to an item's buffer after the map; the working
# directory). (A pool's worker runs items on its main thread, alone.)
_MAIN_THREAD_ONLY = frozenset({"signal", "alarm", "setitimer", "set_wakeup_fd",
                               "siginterrupt"})
_PROCESS_WIDE = {
    "signal": _MAIN_THREAD_ONLY,
    "contextlib": frozenset({"redirect_stdout", "redirect_stderr"}),
    "os": frozenset({"chdir", "fchdir", "umask"}),
    # Process-wide too, and swapped per call by functions that wait: the warnings
    # filters (catch_warnings on threads left an item's "ignore" in the caller's
    # filters after the map), the shared random generator (random.seed(x) per item:
    # every result wrong on threads), the C locale, the sockets' default timeout.
    "warnings": frozenset({"catch_warnings", "simplefilter", "filterwarnings",
                           "resetwarnings"}),
    "random": frozenset({"seed", "setstate"}),
    "locale": frozenset({"setlocale"}),
    "socket": frozenset({"setdefaulttimeout"}),
}
# The modules those live in, as their objects name it (os.chdir is posix's).
_WIDE_HOMES = {"signal": "signal", "_signal": "signal", "contextlib": "contextlib",
               "posix": "os", "nt": "os", "os": "os", "warnings": "warnings",
               "random": "random", "locale": "locale", "_locale": "locale",
               "socket": "socket", "_socket": "socket"}
# sys's streams, which ``sys.stdout = buffer`` swaps for the whole process.
_STREAMS = frozenset({"stdout", "stderr", "stdin"})


def needs_main_thread(func: Callable[..., Any]) -> bool:
    """Does ``func`` (or a function it calls, of its module or of another module of the
    user's, or a method of an object of the user's it names) set a signal handler or a
    timer, or swap process-wide state (``redirect_stdout``, ``sys.stdout = ...``,
    ``os.chdir``)? Such a function may wait (an alarm around a read is the classic
    guard) and was planned on threads, where its every item raised ValueError, or
    its results mixed; a guard in a helper module (``guarded.read_with_alarm``) or a
    module-level object's method (``GUARD.arm(5)``) was not seen."""
    core, owner = _code_that_runs(func)
    if core is None:
        return False
    todo: list[tuple[types.FunctionType, Optional[type]]] = [(core, owner)]
    seen: set[int] = set()
    while todo and len(seen) < _CALLS_READ_MAX:
        for f in _reached(*todo.pop()):
            if id(f.__code__) in seen:
                continue
            seen.add(id(f.__code__))
            if _needs_own_process(f):
                return True
            todo.extend((g, None) for g in _users_functions_called(f))
    return False


# The most functions needs_main_thread reads (a bound: each is scanned once, ~20 µs).
_CALLS_READ_MAX = 200


def _needs_own_process(f: types.FunctionType) -> bool:
    """Does ``f``'s own code call a main-thread-only or process-wide call of
    ``_PROCESS_WIDE``, or assign one of sys's streams?"""
    import dis

    for c in _code_objects(f.__code__):
        if not any(m in c.co_names for m in (*_PROCESS_WIDE, "sys")):
            continue
        before = ""  # signal.alarm(...), the module imported in the function too
        for ins in dis.get_instructions(c):
            if (ins.opname in _ATTRIBUTE_OPS
                    and ins.argval in _PROCESS_WIDE.get(before, frozenset())):
                return True
            if before == "sys" and ins.opname == "STORE_ATTR" and ins.argval in _STREAMS:
                return True
            before = str(ins.argval) if ins.opname.startswith("LOAD_") else ""
    names = f.__globals__
    for name, attrs in _name_chains(f.__code__):
        held = names.get(name)
        if isinstance(held, types.ModuleType):
            home = _WIDE_HOMES.get(held.__name__)
            if home is not None and attrs and attrs[0] in _PROCESS_WIDE[home]:
                return True
            continue
        home = _WIDE_HOMES.get(str(getattr(held, "__module__", "")))
        if home is not None and getattr(held, "__name__", None) in _PROCESS_WIDE[home]:
            return True  # from signal import alarm; from contextlib import redirect_stdout
    return False


def _users_functions_called(f: types.FunctionType) -> Iterator[types.FunctionType]:
    """The functions of the user's other modules that ``f`` names: imported by name
    (``from guarded import read``) or read off a module (``guarded.read``); and the
    methods it calls on an object of a class of the user's it names (``GUARD.arm``,
    a module-level instance, of any module)."""
    names = f.__globals__
    for name, attrs in _name_chains(f.__code__):
        held = names.get(name)
        rest = list(attrs)
        while rest and isinstance(held, types.ModuleType):
            held = getattr(held, rest.pop(0), None)
        if rest and not isinstance(held, (type, types.ModuleType, types.FunctionType)):
            method = _method_of(type(held), rest[0])
            if method is not None:
                yield method
            continue
        held = _innermost(getattr(held, "__adaptive_exec_wrapped__", held))
        if (isinstance(held, types.FunctionType) and held.__globals__ is not names
                and _users_module(sys.modules.get(held.__module__))):
            yield held


def _method_of(cls: type, name: str) -> Optional[types.FunctionType]:
    """The plain function ``name`` of a class of the user's (the script's too), as
    its MRO finds it; None for any other class (the standard library's, a package's)."""
    module = sys.modules.get(getattr(cls, "__module__", None) or "")
    if not (getattr(module, "__name__", None) == "__main__" or _users_module(module)):
        return None
    for klass in cls.__mro__:
        value = vars(klass).get(name)
        if value is not None:
            value = getattr(value, "__func__", value)  # a staticmethod's, classmethod's
            return value if isinstance(value, types.FunctionType) else None
    return None


# The size of an instance of a class statement's class (object, and a weak reference):
# one larger has fields of its own, in C.
_PLAIN_SIZE = type("_Plain", (), {}).__basicsize__
_HEAP_TYPE = 1 << 9  # Py_TPFLAGS_HEAPTYPE: a class made by a class statement
_OBJECT_SIZE = object.__basicsize__


def _stateless(value: Any) -> bool:
    """An object with no state of its own, as a sentinel is (``MISSING = object()``):
    nothing about it can have changed in the caller, and its copy is not the worker's
    own object, which the function compares by identity: sent, ``default is MISSING``
    turned False in the workers (a default holds the module's object from its import)."""
    cls = type(value)
    if cls is object:
        return True
    if cls.__basicsize__ > (_PLAIN_SIZE if cls.__flags__ & _HEAP_TYPE else _OBJECT_SIZE):
        # Fields of C's: a lock; a closure's cell, as small as a class statement's
        # instance, was taken for a sentinel (_home_of scanned every module for each
        # and kept it, with the 10 MB it captured, for ever). A type written in C with
        # no fields (a C extension's NoValue) can be one.
        return False
    if cls in _PLAIN_TYPES or isinstance(value, (type, types.FunctionType, enum.Enum)):
        return False
    if cls.__reduce_ex__ is not object.__reduce_ex__ or cls.__reduce__ is not object.__reduce__:
        return False
    if getattr(cls, "__getstate__", None) is not getattr(object, "__getstate__", None):
        return False
    if any(vars(k).get("__slots__") for k in cls.__mro__):
        return False
    return not getattr(value, "__dict__", None)


def function_ref(func: Callable[..., Any], per_process: frozenset[str] = frozenset(),
                 init: Optional[tuple[Callable[..., Any], tuple[Any, ...]]] = None,
                 ) -> FunctionRef:
    """Describe ``func`` as the caller has it now, so a worker can rebuild it; raises if
    it cannot be pickled. Called once per map: what changed since the last map (the
    function, a global it reads, an object it captures) changes the key.
    ``per_process``: globals each process sets for itself (``init``'s, an initializer
    and its args), never sent (``with_initializer``)."""
    cwd, path = _context()
    core, owner = _code_that_runs(func)
    patch = _patch_for(core, owner, per_process)
    patch_module = core.__module__ if patch is not None and core is not None else None
    attrs, attrs_digest = _attributes_patch(core, owner, _set_per_process(
        init[0], per_process) if init is not None else frozenset())
    registrations = {**_dispatch_registrations(func, core, owner),
                     **_builtins_read(core, owner)}
    if registrations:
        attrs = {**(attrs or {}), **registrations}
        attrs_digest += hashlib.sha1(b"".join(
            repr(k).encode() + v for k, v in sorted(registrations.items()))).digest()
    module = getattr(func, "__module__", None)
    qualname = getattr(func, "__qualname__", None)
    code = (f"{sys.flags.optimize}:{_code_digest(core, owner)}"
            if core is not None and _importable(core)
            and _compiled_plainly(core.__module__) else None)
    # Exact: the function under a decorator (``g.__wrapped__``), sent by name, was
    # rebuilt in workers as the decorated ``g`` (x100 in every result a worker made).
    if (isinstance(func, types.FunctionType) and module and qualname
            and _importable(func, exact=True)):
        # A function decorated with @parallelize is shadowed in its module by the
        # wrapper, so pickle-by-reference would fail and cloudpickle would copy the
        # code by value. The worker imports the wrapper and unwraps it instead.
        h = hashlib.sha1(f"{module}:{qualname}:{code}:".encode())
        if patch is not None:
            h.update(patch)
        if attrs is not None:
            h.update(b"attrs:" + attrs_digest)
        return FunctionRef(h.hexdigest(), module=module, qualname=qualname, patch=patch,
                           patch_module=patch_module, cwd=cwd, sys_path=path, attrs=attrs,
                           code=code, settings=caller_settings())
    # By value, with an initializer that sets globals or travels by value too (it may
    # fill a global dict of the script's, STATE["conn"] = ..., which the function reads):
    # rebuilt in the worker from one pickle, over one namespace that lacks the
    # per-process names, so the function reads what the initializer set there. Pickled
    # apart, each had a namespace of its own: every item read the caller's empty dict.
    bundled = init is not None and (bool(per_process) or not _importable(
        _code_that_runs(init[0])[0] or init[0]))
    if init is not None and bundled:
        func, initializer = _without_globals((func, init[0]), per_process)
        blob = cloudpickle_dumps((func, initializer, init[1]), sentinels_by_name=True)
    else:
        blob = cloudpickle_dumps(func, sentinels_by_name=True)
    h = hashlib.sha1(blob)
    h.update(f"code:{code}".encode())
    if patch is not None:
        h.update(patch)
    if attrs is not None:
        h.update(b"attrs:" + attrs_digest)
    return FunctionRef(h.hexdigest(), blob=blob, patch=patch, patch_module=patch_module,
                       cwd=cwd, sys_path=path, bundled=bundled, attrs=attrs, code=code,
                       settings=caller_settings())


def _enter_context(ref: FunctionRef) -> bool:
    """Adopt the caller's working directory, sys.path and interpreter settings, as a
    loop in the caller would see them; before anything is unpickled (an item's class
    may live on that path)."""
    if ref.settings is not None and ref.home is None and not _adopt_settings(ref.settings):
        return False
    if ref.sys_path and tuple(sys.path[: len(ref.sys_path)]) != ref.sys_path:
        theirs = set(ref.sys_path)
        sys.path[:] = list(ref.sys_path) + [p for p in sys.path if p not in theirs]
    if ref.cwd is not None:
        try:
            if os.getcwd() != ref.cwd:
                os.chdir(ref.cwd)
        except OSError:  # not reachable from here: the worker stays where it is
            pass
    return True


def _resolve(ref: FunctionRef) -> Optional[Callable[..., Any]]:
    """The function ``ref`` names, rebuilt once per key; None for a lean ref whose key
    this worker has not seen (the caller then sends the whole ref)."""
    func: Any
    entry = _FUNCTIONS.get(ref.key)
    if (entry is not None and ref.bundled and ref.init_key is not None
            and ref.init_key not in _INITIALIZERS):
        # Its initializer was let go (_MAX_INITIALIZERS): it comes only with the
        # function's own blob, so the function is rebuilt (a lean ref asks for it).
        del _FUNCTIONS[ref.key]
        entry = None
    if entry is not None:
        _FUNCTIONS.move_to_end(ref.key)
        func, _ = entry
    elif ref.lean:
        return None
    else:
        if ref.blob_at is not None:
            blob = _read_blob(*ref.blob_at)
            if blob is None:
                return None  # the caller then sends it inside the chunk
        else:
            blob = ref.blob

        def rebuild() -> Any:
            if blob is not None:
                return pickle.loads(blob)
            assert ref.module is not None and ref.qualname is not None
            target: Any = importlib.import_module(ref.module)
            for part in ref.qualname.split("."):
                target = getattr(target, part)
            return getattr(target, "__adaptive_exec_wrapped__", target)

        func = rebuild()
        if ref.bundled and ref.init_key is not None:
            # Rebuilt (first here, or again once let go): a namespace of its own, which
            # its initializer has not set yet (after 8 other initargs, a script's
            # function read no STATE: NameError).
            _IDENTITY.pop(ref.init_key, None)
        loaded: list[dict[str, Any]] = []

        def patch(again: bool = False) -> dict[str, Any]:
            # Unpickled once for the check and the function both: a global of 200 MB
            # the function reads was otherwise rebuilt twice in each worker. Again
            # after a reload: its objects of the module's classes are then the new ones.
            if again:
                loaded.clear()
            if not loaded:
                assert ref.patch is not None
                loaded.append(pickle.loads(ref.patch))
            return loaded[0]

        # In the caller's own process (a dask worker thread there): its modules are
        # the caller's, live, as a thread's loop would see them: nothing to set.
        at_home = ref.home is not None and ref.home == this_process()
        # Unpickled once, for the code check and the items both.
        attrs = (_WithAttributes(func[0] if ref.bundled else func, ref.key, ref.attrs)
                 if ref.attrs is not None and not at_home else None)
        if ref.code is not None and not at_home:
            if ref.bundled:
                func = (_current_code(func[0], ref, lambda: rebuild()[0], patch, attrs),
                        *func[1:])
            else:
                func = _current_code(func, ref, rebuild, patch, attrs)
        if ref.bundled:
            func, initializer, initargs = func
            if ref.init_key is not None:  # runs with the function's own namespace
                _keep_initializer(ref.init_key, (initializer, initargs))
        if ref.patch is not None and ref.patch_module is not None and not at_home:
            # Kept with the function: re-applied whenever another key of the same
            # module was applied in between.
            importlib.import_module(ref.patch_module)
            func = _Patched(func, ref.patch_module, ref.key, patch())
        if attrs is not None:
            attrs.func = func
            func = attrs
        size = ref.size() + (ref.blob_at[2] if ref.blob_at else 0)
        _FUNCTIONS[ref.key] = (func, size)
        while len(_FUNCTIONS) > _MAX_FUNCTIONS or (
                len(_FUNCTIONS) > 1 and sum(s for _, s in _FUNCTIONS.values())
                > _MAX_FUNCTION_BYTES):
            _FUNCTIONS.popitem(last=False)
        _allow_for_functions()
    if isinstance(func, (_Patched, _WithAttributes)):
        return func.enter()
    return func


async def forget_function(key: str) -> None:
    """On a dask worker, once a map has ended: let go of its function. A dask map's
    key is its own (a uuid: backends/dask.py), never asked for again, so its rebuilt
    function, with all it captured, only held the worker's memory (a closure over
    150 MB: 150 MB per worker after the map, up to _MAX_FUNCTION_BYTES of them).
    A coroutine: dask's ``Client.run(..., wait=False)`` takes only those."""
    _FUNCTIONS.pop(key, None)
    _CALLED.pop(key, None)


# Blobs at least this large are not sent down the pool's pipe with the chunks that need
# them, one copy per worker, each pickled again by loky and read through a pipe (measured
# here: 1.8-5.8 s per 500 MB); the caller writes them once into an anonymous memory file
# that its workers read (~0.1 s per 500 MB each).
BLOB_FILE_MIN_BYTES = 1 << 20


class BlobFile:
    """A blob in an anonymous memory file of the caller (Linux ``memfd``): its workers
    open it through ``/proc/<pid>/fd/<fd>``; it is freed when closed here (the map's end)
    and, by the kernel, when this process dies, whatever kills it."""

    def __init__(self, blob: bytes):
        self.fd = os.memfd_create("adaptive_exec-function", os.MFD_CLOEXEC)  # type: ignore[attr-defined]
        view = memoryview(blob)
        while view:
            view = view[os.write(self.fd, view):]
        self.at = (os.getpid(), self.fd, len(blob))

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    @staticmethod
    def available() -> bool:
        return hasattr(os, "memfd_create") and os.path.isdir("/proc/self/fd")


def _read_blob(pid: int, fd: int, size: int) -> Optional[bytes]:
    """The blob the caller left at ``fd``, or None when this worker cannot read it (on
    another machine, or not allowed to)."""
    try:
        with open(f"/proc/{pid}/fd/{fd}", "rb") as f:
            data = f.read(size)
    except OSError:
        return None
    return data if len(data) == size else None


class ItemClock:
    """When each chunk's items began, and in which worker process, written by that
    worker into an anonymous memory file of the caller (as ``BlobFile``): an item's
    ``timeout=`` counts from its start, not from when it was sent (the function it
    needs may still be on its way: a large one takes seconds to read and rebuild); and
    when a pool breaks, the chunk that was running in the worker that died is told from
    the others (another thread's map's crash named an item of this one). A slot per
    chunk in flight; ``time.monotonic()`` on both sides (one clock for every process of
    a machine)."""

    SLOTS = 1 << 16
    SLOT = struct.Struct("dq")  # when the items began, the worker's pid

    def __init__(self) -> None:
        import mmap

        size = self.SLOTS * self.SLOT.size
        self.fd = os.memfd_create("adaptive_exec-clock", os.MFD_CLOEXEC)  # type: ignore[attr-defined]
        os.ftruncate(self.fd, size)
        self.map = mmap.mmap(self.fd, size)
        self.pid = os.getpid()
        # The file's inode: a worker tells this clock from an earlier one whose
        # descriptor number this one reuses.
        self.ino = os.fstat(self.fd).st_ino
        self._next = 0
        self._lock = threading.Lock()  # one clock serves every map of this process

    def slot(self) -> tuple[int, int, int, int]:
        """A fresh slot (cleared), as a worker addresses it: (pid, fd, inode, slot)."""
        with self._lock:
            slot, self._next = self._next, (self._next + 1) % self.SLOTS
        self.SLOT.pack_into(self.map, slot * self.SLOT.size, 0.0, 0)
        return self.pid, self.fd, self.ino, slot

    def started(self, slot: int) -> Optional[float]:
        """When the item of ``slot`` began (monotonic seconds), or None if not yet."""
        value: float = self.SLOT.unpack_from(self.map, slot * self.SLOT.size)[0]
        return value if value > 0 else None

    def initializing(self, slot: int) -> Optional[float]:
        """When the worker that took the chunk of ``slot`` began running the map's
        initializer, which has not returned (noted as minus that time); else None."""
        value: float = self.SLOT.unpack_from(self.map, slot * self.SLOT.size)[0]
        return -value if value < 0 else None

    def ran_by(self, slot: int) -> Optional[int]:
        """The pid of the worker that began the chunk of ``slot``; None if none has."""
        pid: int = self.SLOT.unpack_from(self.map, slot * self.SLOT.size)[1]
        return pid or None

    def close(self) -> None:
        self.map.close()
        os.close(self.fd)


# In a worker: the callers' clocks it has opened, the last few (one per timed map).
_CLOCKS: collections.OrderedDict[tuple[int, int, int], Any] = collections.OrderedDict()


def _mark_started(pid: int, fd: int, ino: int, slot: int, began: bool = True,
                  initializing: bool = False) -> None:
    """In a worker: note that this worker took the chunk of ``slot``, and (``began``)
    that its items begin now, or (``initializing``) that the map's initializer begins
    now (best effort)."""
    import mmap

    try:
        clock = _CLOCKS.get((pid, fd, ino))
        if clock is None:
            with open(f"/proc/{pid}/fd/{fd}", "r+b") as f:
                if os.fstat(f.fileno()).st_ino != ino:
                    return  # not that clock any more (the map ended)
                clock = mmap.mmap(f.fileno(), ItemClock.SLOTS * ItemClock.SLOT.size)
            _CLOCKS[(pid, fd, ino)] = clock
            while len(_CLOCKS) > 4:
                _CLOCKS.popitem(last=False)[1].close()
        now = time.monotonic()
        ItemClock.SLOT.pack_into(clock, slot * ItemClock.SLOT.size,
                                 -now if initializing else now if began else 0.0,
                                 os.getpid())
    except (OSError, ValueError):  # the caller then counts from when it sent the item
        pass


_LOKY_LEAK_BASE: list[int] = []  # loky's own bound, read once


def _allow_for_functions() -> None:
    """In a loky worker: loky recycles a worker whose memory grew by more than a bound
    (300 MB) since its first task, so a function that captures a large object was sent,
    took the worker past the bound, lost with it, and sent again, for ever (measured:
    21 s for a 0.6 s loop over a bound method of an object of 500 MB). The bound is
    raised by what the functions kept here take: their bytes as they arrived, thrice
    (the bytes in transit, the rebuilt object, room for allocator slack). A function
    that leaks still gets its worker recycled."""
    executor_module = sys.modules.get("loky.process_executor")
    bound = getattr(executor_module, "_MAX_MEMORY_LEAK_SIZE", None)
    if not isinstance(bound, int):
        return
    if not _LOKY_LEAK_BASE:
        _LOKY_LEAK_BASE.append(bound)
    held = sum(s for _, s in _FUNCTIONS.values())
    executor_module._MAX_MEMORY_LEAK_SIZE = _LOKY_LEAK_BASE[0] + 3 * held  # type: ignore[union-attr]


@dataclass(frozen=True)
class _StatelessOf:
    """A global with no state (worker._stateless), sent as its class (_patch_for)."""
    cls: type


class _Patched:
    """A function importable by name, with the caller's values of the module globals
    it reads, set in this worker's module before it runs."""

    __slots__ = ("func", "module", "key", "values")

    def __init__(self, func: Callable[..., Any], module: str, key: str,
                 values: dict[str, Any]):
        self.func, self.module, self.key, self.values = func, module, key, values

    def enter(self) -> Callable[..., Any]:
        if _APPLIED.get(self.module) != self.key:
            namespace = sys.modules[self.module].__dict__
            changed: set[tuple[str, str]] = set()
            for name, value in self.values.items():
                if name == DEFAULTS:
                    _set_defaults(self.module, value)
                    continue
                if isinstance(value, _StatelessOf):
                    if type(namespace.get(name)) is value.cls:
                        continue  # its own object of that class: kept, identity too
                    value = object.__new__(value.cls)
                if not _same(namespace.get(name, _UNSET), value):
                    changed.add((self.module, name))
                namespace[name] = value
            _forget_cached({self.module}, changed)
            _APPLIED[self.module] = self.key
            for name in self.values:  # what _WithAttributes set there is now this key's
                _APPLIED[f"{self.module}.{name}"] = self.key
        return self.func


def _same(old: Any, new: Any) -> bool:
    """Is a value set in this worker before the same as the caller's now? Builtin data
    by its pickle (== took 0.0 for -0.0 and [1] for [1.0]: stale cached results);
    anything else only by identity (it may compare oddly, or at a cost)."""
    if old is new:
        return True
    if type(old) is not type(new) or type(new) not in _PLAIN_TYPES_COMPARED:
        return False
    try:
        return pickle.dumps(old, protocol=_PROTOCOL) == pickle.dumps(new, protocol=_PROTOCOL)
    except Exception:
        return False


_PLAIN_TYPES_COMPARED = (int, float, complex, bool, str, bytes, type(None), tuple, list,
                         dict, set, frozenset, bytearray)


def _forget_cached(modules: set[str], changed: set[tuple[str, str]]) -> None:
    """After the caller's new values of globals or attributes (``changed``: (module,
    name)) were set in this worker: the functions under functools.lru_cache (or cache)
    of ``modules``, at their top level or in their classes, that read one of them
    forget what they remember, made with the old values (``K = 7`` and
    ``cached.cache_clear()`` between two maps: warm workers answered from their
    caches, 149 of 150 results wrong). Only those: clearing every cache of the module
    at each change reloaded a cached model each map, 0.71 s a map where the loop took
    0.40."""
    if not changed:
        return
    for name in modules:
        module = sys.modules.get(name)
        if module is None:
            continue
        holders: list[Any] = [vars(module)]
        holders += [vars(v) for v in list(vars(module).values())
                    if isinstance(v, type) and v.__module__ == name]
        for namespace in holders:
            for value in list(namespace.values()):
                if not isinstance(value, functools._lru_cache_wrapper):  # type: ignore[attr-defined]
                    continue
                reads = _reads(_innermost(value))
                if reads is None or reads & changed:
                    value.cache_clear()


def _reads(func: Any) -> Optional[set[tuple[str, str]]]:
    """(module, name) of the globals and attributes ``func`` reads, as they travel;
    None where its code cannot be read (then it may read anything)."""
    if not isinstance(func, types.FunctionType):
        return None
    try:
        out = {(func.__module__, n) for n in _globals_read(func)}
        return out | set(_attributes_read(func))
    except Exception:
        return None


class _WithAttributes:
    """A function with the caller's values of the attributes of other modules it reads
    (``FunctionRef.attrs``), set in this worker before it runs: each once per key, again
    after another key's were set there (ours or a ``_Patched``'s: one table, by module
    and name)."""

    __slots__ = ("func", "key", "values")

    def __init__(self, func: Any, key: str, values: dict[tuple[str, str], bytes]):
        self.func, self.key = func, key
        self.values: dict[tuple[str, str], Any] = {}
        for where, data in values.items():
            try:
                self.values[where] = pickle.loads(data)
            except Exception:  # its class is not importable here: the worker keeps its own
                pass

    def enter(self) -> Callable[..., Any]:
        changed: set[tuple[str, str]] = set()
        for (module, name), value in self.values.items():
            if _APPLIED.get(f"{module}.{name}") == self.key:
                continue
            try:
                if not _same(_attribute_here(module, name), value):
                    changed.add((module, name))
                _set_attribute_here(module, name, value)
            except Exception:  # not importable here, or refused: the worker's own stays
                continue
            _APPLIED[f"{module}.{name}"] = self.key
            _APPLIED.pop(module, None)  # a _Patched of that module sets its values again
        if changed:
            # The caches of the modules changed, and of the function's own module, that
            # read what changed (a cached function reading settings.SCALE).
            home = getattr(self.func, "module", None) or getattr(self.func, "__module__", None)
            _forget_cached({m for m, _ in changed} | {str(home)}, changed)
        func = self.func
        return func.enter() if isinstance(func, _Patched) else func


@dataclass(frozen=True)
class ChunkResult:
    """A chunk's outcome: the results (pickled) of the items that ran, and the first
    failure, if any; items after a failure are not run, as in the loop."""

    results: Any  # the list; pickled (bytes) on its way back from a process
    n_done: int
    compute_s: float
    pid: int
    error: Any = None  # the exception; pickled (bytes) on its way back from a process
    error_index: Optional[int] = None
    error_tb: Optional[str] = None
    # "ran" | NEED_FUNCTION | FALLBACK. With FALLBACK, ``holes`` lists the offsets in the
    # chunk whose results could not be pickled (results holds None there), or is None
    # when nothing ran here (the function or the items could not be unpickled).
    status: str = "ran"
    holes: Optional[tuple[int, ...]] = None
    reason: Optional[str] = None  # why, for the caller's one warning
    function_bytes: int = 0  # what this worker read of a blob file to rebuild the function
    # The seconds of this process's first call of the function, when the chunk holds it
    # (its one-time set-up, if any, is in it: the caller tells it from the next calls).
    first_call_s: Optional[float] = None
    # The seconds its calling thread was runnable but kept off a CPU (by other processes,
    # or the function's own threads and the other workers', which compute_s leaves out).
    queued_s: float = 0.0
    # The warnings its items raised, as (text, category, file, line, (args, attributes))
    # (``warn_again``).
    warned: Optional[list[tuple[str, Any, str, int, Any]]] = None


# --- the initializer ---------------------------------------------------------------------

# initializer (module and name) -> (the key it last ran under, the process id it ran
# in). One entry per initializer, not per key: the same initializer with initargs A,
# then B, then A again runs again for the third map (a table per key skipped it, and
# the map read B's state). A forked worker inherits its parent's table: the pid tells
# that it has not run here yet.
_CURRENT: dict[str, tuple[str, int]] = {}
# initializer key -> its initializer's entry in _CURRENT.
_IDENTITY: dict[str, str] = {}
# initializer key -> (initializer, initargs), unpickled once per worker; the last
# _MAX_INITIALIZERS only (each map with other initargs added one: 2 MB of initargs per
# map grew each worker by ~1.8 MB per map, for as long as the pool lived).
_INITIALIZERS: collections.OrderedDict[str, tuple[Callable[..., Any], tuple[Any, ...]]] = \
    collections.OrderedDict()
_MAX_INITIALIZERS = 8


def _keep_initializer(key: str, found: tuple[Callable[..., Any], tuple[Any, ...]]) -> None:
    _INITIALIZERS[key] = found
    _INITIALIZERS.move_to_end(key)
    while len(_INITIALIZERS) > _MAX_INITIALIZERS:
        _INITIALIZERS.popitem(last=False)
_INIT_LOCK = threading.RLock()  # re-entrant: an initializer may itself map


def with_initializer(func: Callable[..., Any], initializer: Optional[Callable[..., Any]],
                     initargs: tuple[Any, ...]) -> FunctionRef:
    """``func``'s ref carrying the map's initializer (raises when either cannot be
    pickled). The globals the initializer assigns (``global conn; conn = ...``) are each
    process's own, as with concurrent.futures: the caller's values never travel, and a
    function sent by value shares its globals with the initializer in the worker, so it
    reads what the initializer set there. The key includes the initializer's: a worker
    that knows the function but has not run this initializer gets the whole ref."""
    if initializer is None:
        return function_ref(func)
    per_process = _globals_written(initializer)
    ref = function_ref(func, per_process, (initializer, initargs))
    if ref.bundled:  # the initializer is in the function's blob, and in its key
        return dataclasses.replace(ref, key=f"{ref.key}+init", init_key=ref.key)
    (initializer,) = _without_globals((initializer,), per_process)
    init = cloudpickle_dumps((initializer, initargs))
    init_key = hashlib.sha1(init).hexdigest()
    return dataclasses.replace(ref, key=f"{ref.key}+{init_key}", init=init,
                               init_key=init_key)


def _globals_written(initializer: Callable[..., Any]) -> frozenset[str]:
    """Names ``initializer`` assigns or deletes as globals (its nested code included)."""
    import dis

    core, _ = _code_that_runs(initializer)
    if core is None:
        return frozenset()
    return frozenset(ins.argval for c in _code_objects(core.__code__)
                     for ins in dis.get_instructions(c)
                     if ins.opname in ("STORE_GLOBAL", "DELETE_GLOBAL"))


def _without_globals(funcs: tuple[Any, ...], names: frozenset[str]) -> tuple[Any, ...]:
    """Copies of the functions among ``funcs`` that travel by value, whose globals are
    one namespace, that namespace less ``names``; anything else as it is (a function a
    worker imports runs in its module, where its initializer sets those names)."""
    shared: dict[int, dict[str, Any]] = {}
    out = []
    for f in funcs:
        if not isinstance(f, types.FunctionType) or _importable(f):
            out.append(f)
            continue
        g = shared.get(id(f.__globals__))
        if g is None:
            g = {k: v for k, v in f.__globals__.items() if k not in names}
            shared[id(f.__globals__)] = g
        copy = types.FunctionType(f.__code__, g, f.__name__, f.__defaults__, f.__closure__)
        copy.__kwdefaults__ = f.__kwdefaults__
        copy.__qualname__ = f.__qualname__
        copy.__module__ = f.__module__
        copy.__dict__.update(f.__dict__)
        out.append(copy)
    return tuple(out)


def _ran_last(key: str) -> bool:
    """Did this process run ``key``'s initializer last under ``key`` (its initargs)?"""
    identity = _IDENTITY.get(key)
    return identity is not None and _CURRENT.get(identity) == (key, os.getpid())


def initialize_here(initializer: Optional[Callable[..., Any]], initargs: tuple[Any, ...],
                    key: str, where: str = "the caller", own_namespace: bool = False) -> None:
    """Run ``initializer(*initargs)`` in this process unless the last time it ran here
    was under ``key``; raises InitializerError (its exception as the cause) when it
    raises. ``own_namespace``: this copy of it sets globals in a namespace of its own
    (bundled with one function, ``function_ref``): another function's copy, with the
    same initargs, is not the same one (alternating two functions ran it every map)."""
    if initializer is None or _ran_last(key):
        return
    with _INIT_LOCK:  # threads of one process (a dask worker's, the caller's) run it once
        if _ran_last(key):
            return
        core, _ = _code_that_runs(initializer)
        named = core if core is not None else initializer
        identity = (f"{getattr(named, '__module__', None)}."
                    f"{getattr(named, '__qualname__', type(named).__qualname__)}"
                    + (f"#{key}" if own_namespace else ""))
        try:
            initializer(*initargs)
        except BaseException as exc:
            if isinstance(exc, KeyboardInterrupt):
                raise
            name = getattr(initializer, "__qualname__", None) or repr(initializer)
            msg = (f"initializer {name}() raised {type(exc).__name__}: {safe_str(exc)} in "
                   f"{where}; no item ran there")
            raise InitializerError(msg) from exc
        _IDENTITY[key] = identity
        _CURRENT[identity] = (key, os.getpid())


def _initialize_worker(ref: FunctionRef) -> Optional[bool]:
    """In a worker, before a chunk: True when the map's initializer has run here (or
    there is none), None when this lean ref lacks it (the caller sends it whole); raises
    InitializerError."""
    key = ref.init_key
    if key is None or _ran_last(key):
        return True
    found = _INITIALIZERS.get(key)
    if found is None:
        if ref.init is None:
            return None
        found = pickle.loads(ref.init)
        _keep_initializer(key, found)
    # Bundled and by value: rebuilt over a namespace of this function's own. (One a
    # worker imports by name sets its module's globals, shared by every map.)
    own = ref.bundled and not _importable(_code_that_runs(found[0])[0] or found[0])
    initialize_here(found[0], found[1], key, f"worker process {os.getpid()}",
                    own_namespace=own)
    return True


# function key -> the process id that last called it here: a forked worker inherits the
# table, and the pid tells that this process has not called it yet.
_CALLED: dict[str, int] = {}


def run_chunk(ref: FunctionRef, start: int, payload: bytes, star: bool,
              clock: Optional[tuple[int, int, int, int]] = None) -> ChunkResult:
    """Worker side: run the items of one chunk in order; results go back pickled.
    ``clock``: where to note which worker took the chunk (first thing: a chunk no
    worker noted cannot have killed one) and when its items begin (``ItemClock``)."""
    pid = os.getpid()
    if clock is not None:
        _mark_started(*clock, began=False)
    if not _enter_context(ref):  # a lean ref's sys.argv this worker has not had
        return ChunkResult([], 0, 0.0, pid, status=NEED_FUNCTION)
    fetched = ref.blob_at[2] if ref.blob_at is not None and ref.key not in _FUNCTIONS else 0
    try:
        func = _resolve(ref)
    except Exception as exc:
        return ChunkResult([], 0, 0.0, pid, status=FALLBACK,
                           reason=f"the function cannot be rebuilt in a worker ({_safe(exc)})")
    try:
        context = _context_of(ref)
    except Exception as exc:
        return ChunkResult([], 0, 0.0, pid, status=FALLBACK,
                           reason=f"the caller's context variables cannot be rebuilt in a "
                                  f"worker ({_safe(exc)})")
    if func is None or context is None:
        return ChunkResult([], 0, 0.0, pid, status=NEED_FUNCTION)
    if clock is not None and ref.init_key is not None and not _ran_last(ref.init_key):
        # Its time is not the items': the caller gives it a limit of its own.
        _mark_started(*clock, began=False, initializing=True)
    try:
        if _initialize_worker(ref) is None:
            return ChunkResult([], 0, 0.0, pid, status=NEED_FUNCTION)
    except InitializerError as exc:
        # Not the items' failure: the map stops here, at this chunk's first item; the
        # initializer's traceback goes back as the cause.
        cause = exc.__cause__
        return ChunkResult(dumps([]), 0, 0.0, pid, error=_pickle_error(exc),
                           error_index=start,
                           error_tb=_remote_text(cause) if cause is not None else None)
    except Exception as exc:  # its pickle could not be loaded here
        return ChunkResult([], 0, 0.0, pid, status=FALLBACK,
                           reason=f"the initializer cannot be rebuilt in a worker "
                                  f"({_safe(exc)})")
    try:
        items = pickle.loads(payload)
    except Exception as exc:
        return ChunkResult([], 0, 0.0, pid, status=FALLBACK,
                           reason=f"items from index {start} cannot be unpickled in a "
                                  f"worker ({_safe(exc)})")
    if clock is not None:
        _mark_started(*clock)
    first = _CALLED.get(ref.key) != pid
    _CALLED[ref.key] = pid
    if _POOL_WORKER and threading.current_thread() is threading.main_thread():
        # The warnings the items raise go back to the caller, to be raised there in its
        # turn (the loop's are recorded by catch_warnings, pytest.warns): a worker
        # printed them on its own stderr. (Not on a thread of a process running
        # others, a dask worker's: catch_warnings is the whole process's.)
        with warnings.catch_warnings(record=True) as caught, _scripts_names(func):
            res = _in_context(context, lambda: run_items(func, start, items, star,
                                                         time_first=first))
        res = dataclasses.replace(res, function_bytes=fetched, warned=_warned(caught))
    else:
        # A dask worker's thread (one of several, maybe): the script's names too, not
        # in the caller's own process (an in-process cluster), whose __main__ is the
        # script itself (pickle.dumps(Point(x)) of the script's dataclass raised
        # PicklingError at its first item: "it's not the same object as __main__.Point",
        # or "attribute lookup Point on __main__ failed" on a worker of another machine).
        elsewhere = ref.home is None or ref.home != this_process()
        names = _scripts_names(func) if elsewhere else contextlib.nullcontext()
        settings = ref.settings if elsewhere and ref.home is not None else None

        def run() -> ChunkResult:
            _shared_settings(settings)
            return run_items(func, start, items, star, time_first=first)

        with names:
            res = dataclasses.replace(_in_context(context, run), function_bytes=fetched)
    if _POOL_WORKER:
        _flush_std_streams()
    error = None if res.error is None else _pickle_error(res.error)
    try:
        return dataclasses.replace(res, results=dumps_returned(res.results), error=error)
    except Exception:
        pass
    # Some results cannot cross: send the others, each on its own, and name the holes;
    # the caller runs those items itself (each ran here once already).
    parts: list[Optional[bytes]] = []
    holes: list[int] = []
    reason = None
    for offset, result in enumerate(res.results):
        try:
            parts.append(dumps_returned(result))
        except Exception as exc:
            parts.append(None)
            holes.append(offset)
            reason = reason or (f"the result of item {start + offset} cannot be pickled to "
                                f"return from a worker ({_safe(exc)})")
    return dataclasses.replace(res, results=parts, error=error, status=FALLBACK,
                               holes=tuple(holes), reason=reason)


@contextlib.contextmanager
def _scripts_names(func: Callable[..., Any]) -> Iterator[None]:
    """While a chunk of a function of the caller's script runs in a pool or dask worker, the
    worker's ``__main__`` holds that copy's classes and functions under their names,
    as the caller's script holds them: what the items pickle by reference there
    (``pickle.dumps(Result(x))`` of a dataclass of the script, a function of it given
    to a ``ProcessPoolExecutor`` or ``multiprocessing.Pool``, ``shelve``) is looked up
    as ``__main__.<name>``, which a worker's ``__main__`` lacked (template, exec) or
    held as another object (fork: its own copy): PicklingError where the loop ran.
    Restored after the chunk (the worker's ``__main__`` may be loky's, still running)."""
    core, owner = _code_that_runs(func)
    main = sys.modules.get("__main__")
    if core is None or main is None or getattr(core, "__module__", None) != "__main__" \
            or core.__globals__ is getattr(main, "__dict__", None):
        yield
        return
    ours: dict[str, Any] = {}
    candidates = list(core.__globals__.items()) + [(core.__name__, core)]
    if owner is not None:
        candidates.append((owner.__name__, owner))
    for name, value in candidates:
        if (isinstance(value, (type, types.FunctionType))
                and getattr(value, "__module__", None) == "__main__"
                and getattr(value, "__qualname__", None) == name):
            ours[name] = value
    space = vars(main)
    # Counted, under a lock: on a dask worker chunks run on several threads at once,
    # and the first to end restored the worker's names under the others.
    mine: list[str] = []
    with _MAIN_NAMES_LOCK:
        for name, value in ours.items():
            held = _MAIN_NAMES.get(name)
            if held is None:
                _MAIN_NAMES[name] = [value, 1, space.get(name, _MISSING)]
                space[name] = value
            elif held[0] is value:
                held[1] += 1
            else:
                continue  # another function's of the same name runs: its stays
            mine.append(name)
    try:
        yield
    finally:
        with _MAIN_NAMES_LOCK:
            for name in mine:
                held = _MAIN_NAMES[name]
                held[1] -= 1
                if held[1] == 0:
                    del _MAIN_NAMES[name]
                    if held[2] is _MISSING:
                        space.pop(name, None)
                    else:
                        space[name] = held[2]


# _scripts_names' table: name -> [the value set, chunks using it, what it replaced].
_MAIN_NAMES: dict[str, list[Any]] = {}
_MAIN_NAMES_LOCK = threading.Lock()
_MISSING = object()


def _flush_std_streams() -> None:
    """What the chunk's items printed, written out now: a worker's ``sys.stdout`` to a
    file or a pipe is block-buffered, and a worker is ended by SIGKILL (the pool's end at
    the caller's exit, a time-out, a crash elsewhere), which loses what it still holds:
    a script run as ``python script.py > log`` kept 10 of the 600 lines its items
    printed, where the loop writes them all. (An empty buffer's flush writes nothing.)"""
    for stream in (sys.stdout, sys.stderr):
        try:
            if stream is not None:
                stream.flush()
        except Exception:  # noqa: BLE001 - a closed or broken stream: the items' affair
            pass


def _warned(caught: Optional[list[warnings.WarningMessage]]
            ) -> Optional[list[tuple[str, Any, str, int, Any]]]:
    """The warnings a chunk's items raised, as (text, category, file, line, state):
    ``state`` is the message's args and attributes that pickle (the loop's
    ``w.message.code``), or None. One whose category cannot travel is left out."""
    out = []
    for w in caught or ():
        message = w.message
        state = None
        if isinstance(message, Warning):
            state = (tuple(a if _picklable(a) else repr(a) for a in message.args),
                     {k: v for k, v in getattr(message, "__dict__", {}).items()
                      if _picklable(v)})
        entry = (str(message), w.category, w.filename, w.lineno, state)
        try:
            dumps(entry)
        except Exception:  # noqa: BLE001 - a category that cannot travel: not this one
            continue
        out.append(entry)
    return out or None


def warn_again(warned: Optional[list[tuple[str, Any, str, int, Any]]]) -> None:
    """In the caller: a chunk's warnings, raised here in their order, under the
    caller's filters ("default" shows each place once, as the loop's would). The
    message is rebuilt as the worker had it, without calling its class (a category
    whose ``__init__`` takes other arguments raised TypeError here, and the chunk's
    items ran a second time in the caller)."""
    for text, category, filename, lineno, state in warned or ():
        registry = _REGISTRIES.setdefault(filename, {})
        message: Any = text
        if state is not None:
            try:
                message = _rebuilt_warning(category, *state)
            except Exception:  # noqa: BLE001 - its text, as before
                message = text
        base = next((k for k in category.__mro__
                     if getattr(builtins, k.__name__, None) is k), UserWarning)
        attempts = [(message, category)] if message is not text else []
        # Its text, and under the nearest builtin category where its own cannot be made
        # from a text: a message whose __str__ reads an attribute that did not travel
        # (a lock) raised here, and the chunk's items ran a second time in the caller.
        attempts += [(text, category), (text, base)]
        for what, cls in attempts:
            try:
                warnings.warn_explicit(what, cls, filename, lineno, registry=registry)
                break
            except Warning:
                raise  # the caller's filter says "error": raised as at the loop's item
            except Exception:  # noqa: BLE001 - the next way
                continue


def _rebuilt_warning(category: Any, args: tuple[Any, ...], attributes: dict[str, Any]
                     ) -> Warning:
    """The worker's warning, made again without its class's ``__init__``; nor its
    ``__new__`` where that one wants other arguments than the args it kept
    (``__new__(cls, text, code)`` with ``super().__init__(text)``: TypeError, the
    chunk's items ran again in the caller, with an UnpicklableWarning)."""
    base = next(k for k in category.__mro__ if getattr(builtins, k.__name__, None) is k)
    rebuilt: Any = None
    for make in (lambda: category.__new__(category, *args),
                 lambda: base.__new__(category, *args)):
        try:
            rebuilt = make()
            break
        except Exception:  # noqa: BLE001 - the next way
            continue
    if not isinstance(rebuilt, category):
        raise TypeError(f"{category!r} cannot be made again")
    rebuilt.args = args
    rebuilt.__dict__.update(attributes)
    return rebuilt  # type: ignore[no-any-return]


# file -> the once-per-place registry of the warnings raised again from it (warn_again).
_REGISTRIES: dict[str, dict[Any, Any]] = {}
# Set in our pools' workers (worker_init), where items run on the main thread alone.
_POOL_WORKER = False


class Measure(Protocol):
    """Watches each call of a measured loop (sampling.py): ``before`` reads its clocks
    last and ``after`` first, so that only the call itself is timed."""

    def before(self, item: Any) -> None: ...

    def after(self, item: Any, result: Any) -> bool:
        """True when enough was measured: the loop stops after this item."""


def call_each(func: Callable[..., Any], items: Iterable[Any], star: bool, start: int,
              out: list[Any], *, in_caller: bool, measure: Optional[Measure] = None,
              where: Optional[str] = None) -> Optional[BaseException]:
    """The loop, written once: ``func(*item)`` or ``func(item)`` for each item in order,
    appended to ``out``; the first exception stops it and is returned with its item's
    index attached. Any exception the function raises is the item's outcome,
    BaseExceptions too (SystemExit, GeneratorExit), raised in its turn as in the loop;
    except, ``in_caller``, a KeyboardInterrupt: there it is the user's Ctrl-C, and it
    leaves at once. (backends/serial.py keeps one specialisation of it, a bare
    comprehension, where nothing but speed matters.) With ``measure`` each call is
    watched, and the loop stops when it says so. ``where``: the worker it runs in, for
    the exception's note. The exception's traceback starts at the function's frame."""
    append = out.append
    try:
        if measure is not None:
            for item in items:
                measure.before(item)
                result = func(*item) if star else func(item)
                append(result)
                if measure.after(item, result):
                    break
        elif star:
            for args in items:
                append(func(*args))
        else:
            for item in items:
                append(func(item))
    except KeyboardInterrupt as exc:
        if in_caller:
            raise
        return attach_origin(exc, start + len(out), None, where)
    except BaseException as exc:
        if where is not None:
            from .backends import fdshed

            hint = fdshed.note(exc)
            where = where if hint is None else f"{where} ({hint})"
        return attach_origin(exc, start + len(out), None, where)
    return None


def runqueue_wait_s() -> float:
    """Seconds this thread has spent runnable but not running (Linux schedstat; 0 where
    it cannot be read): time the machine kept it off a CPU, not time its code took.
    Without it, CPU-bound code sampled on a loaded machine looked like I/O, and items in
    workers beside the caller's own (planner.caller_items) looked 1.5x slower than they
    are. ~11 us a read."""
    try:
        with open("/proc/thread-self/schedstat", "rb") as f:
            return int(f.read().split()[1]) / 1e9
    except (OSError, ValueError, IndexError):
        return 0.0


def run_items(func: Callable[..., Any], start: int, items: list[Any], star: bool,
              time_first: bool = False) -> ChunkResult:
    """Run one chunk's items in order (in a process worker or a thread); ``results`` is
    the list itself, and the first failure stops the chunk, as in the loop. A failure's
    traceback goes back as text (``error_tb``): the function's frames, not ours.
    ``time_first``: the first call is timed apart (``first_call_s``)."""
    out: list[Any] = []
    where = _where()
    first: Optional[float] = None
    queued0 = runqueue_wait_s()
    t0 = time.perf_counter()
    if time_first and items:
        error = call_each(func, items[:1], star, start, out, in_caller=False, where=where)
        first = max(0.0, time.perf_counter() - t0 - (runqueue_wait_s() - queued0))
        if error is None and len(items) > 1:
            # (call_each numbers an error by start + results so far: the same start.)
            error = call_each(func, itertools.islice(items, 1, None), star, start, out,
                              in_caller=False, where=where)
    else:
        error = call_each(func, items, star, start, out, in_caller=False, where=where)
    # The chunk's time, less its wait for a CPU: the items' cost, which the cache keeps.
    wall = time.perf_counter() - t0
    queued = min(wall, max(0.0, runqueue_wait_s() - queued0))
    compute = wall - queued
    if error is None:
        return ChunkResult(out, len(out), compute, os.getpid(), first_call_s=first,
                           queued_s=queued)
    return ChunkResult(
        results=out,
        n_done=len(out),
        compute_s=compute,
        queued_s=queued,
        pid=os.getpid(),
        error=error,
        error_index=start + len(out),
        error_tb=_remote_text(error),
        first_call_s=first,
    )


def loads_returned(data: bytes) -> Any:
    """``pickle.loads`` of what a worker sent back. A class of the caller's that travels
    by value (defined in the script, or in a function) comes back by value too, and
    cloudpickle, finding the caller's own class by its tracking id, set the worker's
    copy of its attributes on it: its methods became copies that read the globals as
    the worker had them (after one map of ``P`` results, the script's own
    ``P(1).scaled()`` read a global the script had changed since, at its old value). A
    class the caller has is kept as it has it, as a loop would leave it."""
    if b"_class_setstate" not in data:  # a scan: far cheaper than the unpickling
        return pickle.loads(data)
    return _KeepCallersClasses(io.BytesIO(data)).load()


class _KeepCallersClasses(pickle.Unpickler):
    """Unpickles with cloudpickle's class rebuilding watched: a class it finds already
    here (``_make_skeleton_class`` and ``_make_skeleton_enum`` return the one tracked
    under that id) is not given the pickled attributes (``_class_setstate``)."""

    def __init__(self, file: Any) -> None:
        super().__init__(file)
        self.found: list[type] = []

    def find_class(self, module: str, name: str) -> Any:
        got = super().find_class(module, name)
        if module.startswith("cloudpickle"):
            from cloudpickle import cloudpickle as cp

            if got is getattr(cp, "_class_setstate", None):
                return functools.partial(_setstate_unless_found, got, self.found)
            where = _tracker_arg(got)
            if where is not None:
                return functools.partial(_skeleton_noting_found, got, where, self.found)
        return got


@functools.cache
def _tracker_arg(make: Any) -> Optional[int]:
    """The position of ``class_tracker_id`` among the arguments of one of cloudpickle's
    class rebuilders; None for anything else."""
    from cloudpickle import cloudpickle as cp

    if make not in (getattr(cp, "_make_skeleton_class", None),
                    getattr(cp, "_make_skeleton_enum", None)):
        return None
    import inspect

    names = list(inspect.signature(make).parameters)
    return names.index("class_tracker_id") if "class_tracker_id" in names else None


def _skeleton_noting_found(make: Any, where: int, found: list[type], *args: Any) -> Any:
    from cloudpickle import cloudpickle as cp

    tracker_id = args[where] if where < len(args) else None
    had = cp._DYNAMIC_CLASS_TRACKER_BY_ID.get(tracker_id) if tracker_id is not None else None
    cls = make(*args)
    if had is not None and cls is had:
        found.append(cls)
    return cls


def _setstate_unless_found(setstate: Any, found: list[type], obj: Any, state: Any) -> Any:
    if any(obj is cls for cls in found):
        return obj
    return setstate(obj, state)


def _remote_text(error: BaseException) -> str:
    """The worker's traceback of ``error``, as the caller chains it (its cause): the
    function's frames, and its own cause or context; without our note of where it ran,
    which the caller's report shows once, under the exception itself."""
    notes = getattr(error, "__notes__", None)
    ours = notes.pop() if isinstance(notes, list) and notes and isinstance(notes[-1], str) \
        and notes[-1].startswith("adaptive_exec: raised while processing item") else None
    try:
        # TracebackException survives an exception whose __str__ raises.
        return "".join(traceback.format_exception(type(error), error, error.__traceback__))
    finally:
        if ours is not None:
            notes.append(ours)  # type: ignore[union-attr]


def _where() -> str:
    """This worker, as an exception's note names it: its process (a pool's worker runs
    items on its main thread), and its thread when that is not the main one (the
    threads backend, in the caller's process; a dask worker)."""
    pid = os.getpid()
    thread = threading.current_thread()
    if thread is threading.main_thread():
        return f"worker process {pid}"
    return f"thread {thread.name!r} of process {pid}"


def _safe(exc: BaseException) -> str:
    """``repr``-like text of an exception, even when its __str__ raises."""
    try:
        return f"{type(exc).__qualname__}: {exc}"
    except Exception:
        return f"{type(exc).__qualname__} (its message cannot be shown)"


def _pickle_error(exc: BaseException, depth: int = 0) -> bytes:
    """The exception, pickled so that the caller rebuilds it as faithfully as it can:
    as itself when it round-trips, else its class and state without calling __init__,
    else a RemoteError that keeps its type name and message (errors.reduce_exception);
    with its ``__cause__`` and ``__context__``, which pickle drops (``raise
    Wrapped(...) from err``: the loop's ``e.__cause__`` is the KeyError), a few deep."""
    try:
        data = dumps(exc)
        # An exception whose __init__ rejects its args fails here; one whose __init__
        # reworks them (formats a message) comes back different.
        if not same_exception(exc, pickle.loads(data)):
            data = _reduced_error(exc, depth)
    except Exception:
        data = _reduced_error(exc, depth)
    cause, context = exc.__cause__, exc.__context__
    if depth >= _CHAIN_DEPTH or (cause is None and context is None):
        return data
    try:
        return dumps(_Chained(
            data, _pickle_error(cause, depth + 1) if cause is not None else None,
            _pickle_error(context, depth + 1)
            if context is not None and context is not cause else None,
            context is not None and context is cause, exc.__suppress_context__))
    except Exception:  # noqa: BLE001 - the exception itself still travels
        return data


def _reduced_error(exc: BaseException, depth: int) -> bytes:
    """``reduce_exception``'s record, pickled; an exception group's members each go
    through ``_pickle_error`` on their own (``_Group``): as its args, one member that
    did not survive pickle (an ``__init__`` that formats its message, a lock) had made
    the whole group a plain RemoteError, which ``except ExceptionGroup`` and
    ``except*`` did not catch, with its members lost."""
    group_class = getattr(builtins, "BaseExceptionGroup", None)  # Python 3.11+
    if group_class is not None and isinstance(exc, group_class):
        try:
            record = reduce_exception(exc)
            record = dataclasses.replace(
                record, args=(exc.message,),  # type: ignore[attr-defined]
                fields={k: v for k, v in record.fields.items()
                        if k not in ("message", "exceptions")})
            return dumps(_Group(dumps(record), tuple(
                _pickle_error(member, depth)
                for member in exc.exceptions)))  # type: ignore[attr-defined]
        except Exception:  # noqa: BLE001 - the group as any other exception
            pass
    return dumps(reduce_exception(exc))


@dataclass(frozen=True)
class _Group:
    """An exception group that does not survive pickle's round trip: its own record
    (``ExceptionState``, its message alone as args) and each member's pickle."""

    body: bytes
    members: tuple[bytes, ...]


# How many links of an exception's chain (causes, contexts) travel back with it.
_CHAIN_DEPTH = 4


@dataclass(frozen=True)
class _Chained:
    """A pickled exception with its pickled cause and context (``_pickle_error``)."""

    body: bytes
    cause: Optional[bytes]
    context: Optional[bytes]
    context_is_cause: bool  # raise X from err inside ``except ... as err``
    suppress_context: bool


def decode(res: ChunkResult) -> tuple[list[Any], Optional[BaseException]]:
    """Caller side of run_chunk: the chunk's results and its exception, unpickled;
    its warnings raised here. With holes (results that could not be pickled) the list
    holds None there."""
    if res.warned:
        warn_again(res.warned)
    if res.status == FALLBACK and res.holes is not None:
        results = [None if part is None else loads_returned(part) for part in res.results]
    else:
        results = loads_returned(res.results)
    if res.error_index is None:
        return results, None
    return results, _load_error(res.error)


def _load_error(data: bytes) -> BaseException:
    try:
        loaded = loads_returned(data)
    except Exception as exc:
        from .errors import RemoteError

        return RemoteError(f"an exception that cannot be unpickled here ({_safe(exc)})")
    if isinstance(loaded, _Chained):
        error = _load_error(loaded.body)
        cause = _load_error(loaded.cause) if loaded.cause is not None else None
        context = cause if loaded.context_is_cause else (
            _load_error(loaded.context) if loaded.context is not None else None)
        set_on(error, "__cause__", cause)
        set_on(error, "__context__", context)
        set_on(error, "__suppress_context__", loaded.suppress_context)
        return error
    if isinstance(loaded, _Group):
        record = loads_returned(loaded.body)
        members = [_load_error(member) for member in loaded.members]
        return rebuild_exception(dataclasses.replace(
            record, args=(*record.args[:1], members)))
    if isinstance(loaded, BaseException):
        return loaded
    return rebuild_exception(loaded)


def run_here(func: Callable[..., Any], items: list[Any], start: int, star: bool,
             ) -> tuple[list[Any], Optional[BaseException]]:
    """In the caller: run ``items`` in order; (results, the exception that stopped them,
    index attached)."""
    out: list[Any] = []
    return out, call_each(func, items, star, start, out, in_caller=True)


# --- a pool worker's start (backends/loky.py's initializer; here, so that a worker, and the
# template that forks workers, import this module and not the caller's side) ---------------

# How often a worker checks that its parent is alive: the bound on how long workers
# outlive a killed parent (the lifecycle issue asks for 2 s). A check is one getppid()
# call on a thread that sleeps otherwise: at 10 per second, nothing measurable.
PARENT_POLL_S = 0.1
# A worker's exit status when it left because its parent was gone: nobody waits for it
# (the parent is dead); distinct from loky's own exits, for whoever traces one.
ORPHAN_EXIT_CODE = 75


def worker_init(parent_pid: int, env: dict[str, str],
                start_method: Optional[str] = None) -> None:
    """Worker initializer: the environment a worker runs with, and a watch that ends it
    as soon as the process that started the pool is gone.

    ``env`` is set here because only loky's own start applies it before the interpreter
    starts; a forked worker gets it now (numpy, if the caller imported it, is already
    configured: such a caller runs BLAS threads, so its workers come from the template).

    Workers otherwise wait for work until loky's idle time-out, minutes after a parent killed
    by SIGKILL or SIGTERM (no atexit runs then). A daemon thread watches: the worker's
    parent process (``parent_pid``: the caller, or the template that forked it) and,
    where multiprocessing gives one, the sentinel pipe whose other end only the caller
    holds (a template's worker has the template as parent, which outlives the caller).

    Not PR_SET_PDEATHSIG: Linux sends it when the *thread* that forked the worker ends,
    and ours are often started from short-lived threads (the pool started ahead on a
    helper thread, a user's thread that maps once): it would kill a healthy pool.
    A worker stuck in C code that holds the GIL notices only when that call returns.
    """
    global _POOL_WORKER
    import contextvars

    os.environ.update(env)
    _START_CONTEXT["values"] = dict(contextvars.copy_context().items())  # _in_context
    _faulthandler_without_stderr()
    if os.getppid() != parent_pid:  # the parent died while this worker was starting
        os._exit(ORPHAN_EXIT_CODE)
    _POOL_WORKER = True
    import signal

    # Ctrl-C reaches the whole process group; what it means is the caller's to say:
    # its KeyboardInterrupt ends the workers, and a handler of the user's that goes on
    # lets them finish. A template's or loky's worker raised KeyboardInterrupt in the
    # function instead, taken as the item's own, and the map died though the user's
    # handler had said to go on (a forked worker already ignored it). A handler, not
    # SIG_IGN: processes the function starts get the default back when they exec.
    signal.signal(signal.SIGINT, _ctrl_c_is_the_callers)
    # The script's own handlers are the caller's: a forked worker kept them, and a
    # SIGTERM to the process group (systemd, a container's stop) ran the caller's
    # handler in a worker too (its pid file removed, a supervisor told "stopping").
    # Those a module set when imported stay, as a worker that imports it has them (a
    # library's SIGALRM handler, reset, let its own alarm kill the worker).
    for sig in signal.valid_signals():
        if sig == signal.SIGINT:
            continue
        try:
            handler = signal.getsignal(sig)
            if callable(handler) and getattr(handler, "__module__", None) in (
                    "__main__", "__mp_main__"):
                signal.signal(sig, signal.SIG_DFL)
        except (OSError, ValueError):  # SIGKILL, SIGSTOP, numbers Python cannot set
            pass
    import multiprocessing

    # multiprocessing made the start method that started this worker (forkserver for
    # the template's, loky's own for exec) its default here: a multiprocessing.Pool()
    # an item makes ran its function in fresh processes without the script's
    # functions (the pool's workers died on AttributeError and were restarted for
    # ever) or state. The caller's default (None: the platform's) is the loop's.
    try:
        multiprocessing.set_start_method(start_method, force=True)
    except (ValueError, RuntimeError):
        pass
    parent = multiprocessing.parent_process()
    sentinel = getattr(parent, "sentinel", None) if parent is not None else None
    threading.Thread(target=_exit_when_orphaned, args=(parent_pid, sentinel),
                     name="adaptive_exec-parent-watch", daemon=True).start()


def _faulthandler_without_stderr() -> None:
    """loky's worker enables ``faulthandler`` on ``sys.stderr`` after our initializer;
    where there is none to write to (a caller started with its descriptors 0-2 closed,
    a daemon's, ``pythonw``: ``sys.stderr`` is None in a forked worker), that raised
    RuntimeError and every worker exited at once: WorkerCrashedError where the loop ran.
    Such a worker's fatal errors go nowhere, as the caller's would."""
    import faulthandler

    if "PYTHONFAULTHANDLER" in os.environ or faulthandler.is_enabled():
        return
    try:
        fd = sys.stderr.fileno()  # type: ignore[union-attr]
        if fd >= 0:
            return
    except Exception:  # noqa: BLE001 - None, or a stream with no descriptor
        pass
    try:
        _NO_STDERR.append(open(os.devnull, "w"))  # noqa: SIM115 - kept for the process
        faulthandler.enable(_NO_STDERR[-1])
    except Exception:  # noqa: BLE001 - then loky's own attempt decides
        pass


_NO_STDERR: list[Any] = []


def _ctrl_c_is_the_callers(signum: int, frame: Any) -> None:
    """A worker's SIGINT handler: nothing (see worker_init)."""


def _exit_when_orphaned(parent_pid: int, sentinel: Optional[int]) -> None:
    from multiprocessing.connection import wait

    while True:
        if sentinel is None:
            time.sleep(PARENT_POLL_S)
        elif wait([sentinel], PARENT_POLL_S):
            os._exit(ORPHAN_EXIT_CODE)  # EOF: the caller is gone
        if os.getppid() != parent_pid:
            os._exit(ORPHAN_EXIT_CODE)


# --- tasks that measure the pool (module-level: they pickle by reference) ---------------

def noop(x: int) -> int:
    return x


def ping(delay: float) -> int:
    """A start-up probe's task (backends/loky.StartupProbe). A short sleep keeps one
    worker from answering every ping, so that all workers must be up before every ping
    is answered."""
    time.sleep(delay)
    return os.getpid()


def bytes_of(n: int) -> bytes:
    return bytes(n)


def stamped_bytes(n: int) -> tuple[float, bytes]:
    """``n`` bytes and when they existed (monotonic: one clock for every process on
    Linux), for the time of their way back to the caller (loky.OverheadProbe)."""
    payload = bytes(n)
    return time.monotonic(), payload


def reduce_exception(exc: BaseException) -> ExceptionState:
    """In the worker: the parts of ``exc`` that can travel, for an exception that does
    not survive pickle's round trip (errors.rebuild_exception is the caller's side)."""
    import builtins

    cls = type(exc)
    try:
        data = dumps(cls)
        pickle.loads(data)  # a class that pickles but cannot be rebuilt stays behind
        cls_blob: Optional[bytes] = data
    except Exception:
        cls_blob = None
    args = tuple(a if _picklable(a) else repr(a) for a in exc.args)
    state = {k: v for k, v in getattr(exc, "__dict__", {}).items() if _picklable(v)}
    # None is what a rebuilt exception reads already; set, it would show (OSError's
    # filename2 printed "-> None").
    fields = {k: v for k, v in builtin_fields(exc).items()
              if v is not None and _picklable(v)}
    base = next(k for k in cls.__mro__ if getattr(builtins, k.__name__, None) is k)
    return ExceptionState(cls_blob, args, state, f"{cls.__module__}.{cls.__qualname__}",
                          safe_str(exc), base.__name__, fields)


def _picklable(value: Any) -> bool:
    try:
        pickle.dumps(value, protocol=_PROTOCOL)
        return True
    except Exception:
        return False
