"""Function identity and complexity.

The fingerprint is deterministic text (a hash), stable across processes, that changes
whenever behaviour can change: the bytecode, the constants (so ``x * 2`` and ``x * 3``
differ: the seed hashed only ``co_code`` and collided there), the names it uses, nested
code objects, defaults, and the values a closure captured. The cache keys on it.
"""

from __future__ import annotations

import functools
import hashlib
import pickle
import types
from typing import Any, Callable, Iterator

_MAX_CAPTURED_BYTES = 1 << 16  # captured values larger than this are identified by type only


def unwrap(func: Callable[..., Any]) -> Callable[..., Any]:
    """The callable whose code runs: through our own wrapper, partials and bound methods."""
    seen = 0
    while seen < 16:
        seen += 1
        inner = getattr(func, "__adaptive_exec_wrapped__", None)
        if inner is not None:
            func = inner
            continue
        if isinstance(func, functools.partial):
            func = func.func
            continue
        if isinstance(func, types.MethodType):
            func = func.__func__
            continue
        break
    return func


def _code_objects(code: types.CodeType) -> Iterator[types.CodeType]:
    yield code
    for const in code.co_consts:
        if isinstance(const, types.CodeType):
            yield from _code_objects(const)


def function_complexity(func: Callable[..., Any]) -> int:
    """Bytecode size in bytes, nested functions, lambdas and comprehensions included."""
    code = getattr(unwrap(func), "__code__", None)
    if code is None:
        return 0
    return sum(len(c.co_code) for c in _code_objects(code))


def _stable_repr(value: Any) -> bytes:
    """Bytes that identify a captured value across processes, cheaply."""
    if isinstance(value, (types.FunctionType, types.BuiltinFunctionType, type, types.ModuleType)):
        return f"{type(value).__name__}:{getattr(value, '__module__', '')}." \
               f"{getattr(value, '__qualname__', getattr(value, '__name__', ''))}".encode()
    try:
        data = pickle.dumps(value, protocol=4)
    except Exception:
        # An instance of a local class, say: its attributes still tell instances apart.
        state = getattr(value, "__dict__", None)
        if isinstance(state, dict) and state is not value:
            return f"{type(value).__qualname__}:".encode() + _stable_repr(state)
        return f"unpicklable:{type(value).__qualname__}".encode()
    if len(data) > _MAX_CAPTURED_BYTES:
        # Hashing a large captured array on every map would cost more than it tells.
        return f"large:{type(value).__qualname__}:{len(data)}".encode()
    return data


def feed_code(h: hashlib._Hash, code: types.CodeType) -> None:
    """Feed what the code does (and its nested code) into ``h``."""
    for c in _code_objects(code):
        h.update(c.co_code)
        h.update(repr(c.co_names).encode())
        h.update(repr(c.co_varnames).encode())
        for const in c.co_consts:
            if not isinstance(const, types.CodeType):
                h.update(_stable_const(const).encode())


def _stable_const(const: Any) -> str:
    """A constant's text, the same in every process: a frozenset's (``x in {"a", "b"}``)
    repr follows the string hash seed, which differs between interpreters (a worker's
    digest then differed from its caller's, and a fresh process's fingerprint from the
    last one's)."""
    if isinstance(const, frozenset):
        return "frozenset({" + ", ".join(sorted(map(_stable_const, const))) + "})"
    if isinstance(const, tuple):  # as repr writes it: the same text for the rest
        parts = [_stable_const(c) for c in const]
        return "(" + ", ".join(parts) + ("," if len(parts) == 1 else "") + ")"
    return repr(const)


def fingerprint(func: Callable[..., Any]) -> str:
    """A hex digest that identifies what ``func`` does (see the module docstring)."""
    h = hashlib.sha256()
    partial_args: list[Any] = []
    f = func
    # Partials and bound methods are part of behaviour: their bound values count.
    while True:
        inner = getattr(f, "__adaptive_exec_wrapped__", None)
        if inner is not None:
            f = inner
        elif isinstance(f, functools.partial):
            partial_args.extend(f.args)
            partial_args.extend(sorted(f.keywords.items()))
            f = f.func
        elif isinstance(f, types.MethodType):
            partial_args.append(f.__self__)
            f = f.__func__
        else:
            break
    module = getattr(f, "__module__", None) or ""
    qualname = getattr(f, "__qualname__", None) or type(f).__qualname__
    h.update(f"{module}:{qualname}".encode())
    code = getattr(f, "__code__", None)
    if code is not None:
        feed_code(h, code)
        h.update(_stable_repr(getattr(f, "__defaults__", None)))
        h.update(_stable_repr(getattr(f, "__kwdefaults__", None)))
        for cell in getattr(f, "__closure__", None) or ():
            try:
                h.update(_stable_repr(cell.cell_contents))
            except ValueError:  # an empty cell
                h.update(b"<empty>")
    elif not isinstance(f, (types.BuiltinFunctionType, type)):
        # A callable instance: its class's __call__ code is what runs.
        call = next((k.__dict__["__call__"] for k in type(f).__mro__ if "__call__" in k.__dict__),
                    None)
        code = getattr(call, "__code__", None)
        if code is not None:
            feed_code(h, code)
    for bound in partial_args:
        h.update(_stable_repr(bound))
    return h.hexdigest()[:32]


def describe(func: Callable[..., Any]) -> tuple[str, str]:
    """(module, qualified name) of the callable that runs, for humans and the cache."""
    f = unwrap(func)
    module = getattr(f, "__module__", None) or ""
    qualname = getattr(f, "__qualname__", None) or type(f).__qualname__
    return module, qualname
