"""adaptive_exec: parallel map that decides from measurements, not guesses.

    from adaptive_exec import parallelize, adaptive_map

Nothing is started at import: no pool, no thread, no file, no calibration.
"""

from .api import ParallelFunction, RunReport, adaptive_map, parallelize
from .calibration import Calibration, calibrate
from .errors import (
    AdaptiveExecError,
    RemoteError,
    ResultPicklingError,
    UnpicklableWarning,
    WorkerCrashedError,
)
from .planner import Plan

__version__ = "0.1.0"

__all__ = [
    "AdaptiveExecError",
    "Calibration",
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
