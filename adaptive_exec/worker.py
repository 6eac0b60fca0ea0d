"""What runs in a worker process, and the wire format of a chunk.

A chunk travels as bytes we pickled ourselves, not as objects handed to loky: a
pickling failure is then ours to see (and to answer with a serial fallback), and the
bytes moved are counted. The function is pickled once per map and unpickled once per
worker (``_FUNCTIONS``), not once per chunk.
"""

from __future__ import annotations

import dataclasses
import importlib
import os
import pickle
import sys
import time
import traceback
from dataclasses import dataclass
from typing import Any, Callable, Optional

from .errors import RemoteError, ResultPicklingError

_PROTOCOL = pickle.HIGHEST_PROTOCOL
_FUNCTIONS: dict[str, Callable[..., Any]] = {}  # in a worker: unpickled functions by key
_MAX_FUNCTIONS = 16


def dumps(obj: Any) -> bytes:
    """Pickle with the standard pickler (fast, C), falling back to cloudpickle for
    lambdas, closures and classes defined in ``__main__``."""
    try:
        return pickle.dumps(obj, protocol=_PROTOCOL)
    except Exception:
        import cloudpickle

        return cloudpickle.dumps(obj, protocol=_PROTOCOL)


@dataclass(frozen=True)
class FunctionRef:
    """A function as it travels: by reference to a module attribute, or as a blob."""

    key: str  # the function's fingerprint plus a per-object tag
    module: Optional[str] = None
    qualname: Optional[str] = None
    blob: Optional[bytes] = None


def function_ref(func: Callable[..., Any], key: str) -> FunctionRef:
    """Describe ``func`` so a worker can rebuild it; raises if it cannot be pickled."""
    module = getattr(func, "__module__", None)
    qualname = getattr(func, "__qualname__", None)
    if module and qualname and module != "__main__" and "<" not in qualname:
        # A function decorated with @parallelize is shadowed in its module by the
        # wrapper, so pickle-by-reference would fail and cloudpickle would copy the
        # code by value. The worker can import the wrapper and unwrap it instead.
        try:
            target: Any = sys.modules[module]
            for part in qualname.split("."):
                target = getattr(target, part)
            if getattr(target, "__adaptive_exec_wrapped__", None) is func or target is func:
                return FunctionRef(key, module=module, qualname=qualname)
        except (KeyError, AttributeError):
            pass
    import cloudpickle

    return FunctionRef(key, blob=cloudpickle.dumps(func, protocol=_PROTOCOL))


def _resolve(ref: FunctionRef) -> Callable[..., Any]:
    func = _FUNCTIONS.get(ref.key)
    if func is not None:
        return func
    if ref.blob is not None:
        func = pickle.loads(ref.blob)
    else:
        assert ref.module is not None and ref.qualname is not None
        target: Any = importlib.import_module(ref.module)
        for part in ref.qualname.split("."):
            target = getattr(target, part)
        func = getattr(target, "__adaptive_exec_wrapped__", target)
    if len(_FUNCTIONS) >= _MAX_FUNCTIONS:
        _FUNCTIONS.clear()
    _FUNCTIONS[ref.key] = func
    return func


@dataclass(frozen=True)
class ChunkResult:
    """A chunk's outcome: the results (pickled) of the items that ran, and the first
    failure, if any; items after a failure are not run, as in the loop."""

    results: Any  # the list; pickled (bytes) on its way back from a process
    n_done: int
    compute_s: float
    pid: int
    error: Any = None  # the exception; pickled (bytes, or None if it cannot be) from a process
    error_index: Optional[int] = None
    error_tb: Optional[str] = None
    error_repr: Optional[str] = None  # when the exception itself cannot be pickled


def _pickle_error(exc: BaseException) -> Optional[bytes]:
    try:
        data = dumps(exc)
        pickle.loads(data)  # an exception whose __init__ rejects its args fails here
        return data
    except Exception:
        return None


def run_chunk(ref: FunctionRef, start: int, payload: bytes, star: bool) -> ChunkResult:
    """Worker side: run the items of one chunk in order; results go back pickled."""
    res = run_items(_resolve(ref), start, pickle.loads(payload), star)
    try:
        data = dumps(res.results)
    except Exception as exc:
        msg = (
            f"the results of items {start}..{start + res.n_done - 1} cannot be pickled to "
            f"return from the worker ({exc}); use backend='serial' for this function"
        )
        raise ResultPicklingError(msg) from None
    error = _pickle_error(res.error) if res.error is not None else None
    return dataclasses.replace(res, results=data, error=error)


def run_items(func: Callable[..., Any], start: int, items: list[Any], star: bool) -> ChunkResult:
    """Run one chunk's items in order (in a process worker or a thread); ``results`` is
    the list itself, and the first failure stops the chunk, as in the loop."""
    out: list[Any] = []
    t0 = time.perf_counter()
    for offset, item in enumerate(items):
        try:
            out.append(func(*item) if star else func(item))
        except Exception as exc:
            compute = time.perf_counter() - t0
            return ChunkResult(
                results=out,
                n_done=len(out),
                compute_s=compute,
                pid=os.getpid(),
                error=exc,
                error_index=start + offset,
                error_tb="".join(traceback.format_exception(type(exc), exc, exc.__traceback__)),
                error_repr=f"{type(exc).__qualname__}: {exc}",
            )
    return ChunkResult(out, len(out), time.perf_counter() - t0, os.getpid())


def decode(res: ChunkResult) -> tuple[list[Any], Optional[BaseException]]:
    """Caller side of run_chunk: the chunk's results and its exception, unpickled (an
    exception that could not be pickled comes back as a RemoteError with its text)."""
    results = pickle.loads(res.results)
    if res.error_index is None:
        return results, None
    if res.error is not None:
        return results, pickle.loads(res.error)
    return results, RemoteError(f"{res.error_repr} (the exception could not be pickled)")
