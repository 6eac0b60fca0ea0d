"""adaptive_exec: parallel map that decides from measurements, not guesses.

    from adaptive_exec import parallelize, adaptive_map

Nothing is started at import: no pool, no thread, no file, no calibration. The public
names are loaded on first use (PEP 562), so that a worker process, which imports only
``adaptive_exec.worker``, does not pay for the planner and the API at start-up
(measured: ~35 ms of the ~120 ms a loky worker takes to boot here).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

_EXPORTS = {
    "AdaptiveExecError": "errors",
    "CacheWarning": "errors",
    "ClusterError": "errors",
    "InitializerError": "errors",
    "ItemTimeoutError": "errors",
    "MissingDependencyError": "errors",
    "Calibration": "records",
    "ParallelFunction": "api",
    "Plan": "records",
    "RemoteError": "errors",
    "ResultPicklingError": "errors",
    "RunReport": "records",
    "UnpicklableWarning": "errors",
    "WorkerCrashedError": "errors",
    "adaptive_map": "api",
    "calibrate": "api",
    "parallelize": "api",
}

__all__ = [
    "AdaptiveExecError",
    "CacheWarning",
    "Calibration",
    "ClusterError",
    "InitializerError",
    "ItemTimeoutError",
    "MissingDependencyError",
    "ParallelFunction",
    "Plan",
    "RemoteError",
    "ResultPicklingError",
    "RunReport",
    "UnpicklableWarning",
    "WorkerCrashedError",
    "adaptive_map",
    "calibrate",
    "parallelize",
]
assert sorted(__all__) == sorted(_EXPORTS)

if TYPE_CHECKING:
    from .api import ParallelFunction, adaptive_map, calibrate, parallelize
    from .errors import (
        AdaptiveExecError,
        CacheWarning,
        ClusterError,
        InitializerError,
        ItemTimeoutError,
        MissingDependencyError,
        RemoteError,
        ResultPicklingError,
        UnpicklableWarning,
        WorkerCrashedError,
    )
    from .records import Calibration, Plan, RunReport


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        msg = f"module 'adaptive_exec' has no attribute {name!r}"
        raise AttributeError(msg)
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
