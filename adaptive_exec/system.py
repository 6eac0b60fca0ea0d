"""What this machine offers now: usable CPUs and available memory.

Cheap reads only (affinity and cgroup files are a few microseconds); psutil is imported
lazily, because a map that stays serial should not pay for it.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Optional

ENV_MAX_WORKERS = "ADAPTIVE_EXEC_MAX_WORKERS"
ENV_DISABLE = "ADAPTIVE_EXEC_DISABLE"
# Set in our worker processes (loky's ``env``): a map inside a worker runs serially.
ENV_IN_WORKER = "ADAPTIVE_EXEC_IN_WORKER"


@dataclass(frozen=True)
class SystemSnapshot:
    usable_cpus: int
    available_memory: Optional[int]  # bytes; None when not read


def _cgroup_cpu_limit() -> Optional[float]:
    """CPUs allowed by a cgroup quota (v2 ``cpu.max``, else v1 cfs), or None when unlimited."""
    try:
        with open("/sys/fs/cgroup/cpu.max") as f:
            quota, period = f.read().split()[:2]
        if quota != "max":
            return int(quota) / int(period)
        return None
    except (OSError, ValueError):
        pass
    try:
        with open("/sys/fs/cgroup/cpu/cpu.cfs_quota_us") as f:
            quota_us = int(f.read())
        with open("/sys/fs/cgroup/cpu/cpu.cfs_period_us") as f:
            period_us = int(f.read())
        if quota_us > 0 and period_us > 0:
            return quota_us / period_us
    except (OSError, ValueError):
        pass
    return None


def env_max_workers() -> Optional[int]:
    raw = os.environ.get(ENV_MAX_WORKERS, "").strip()
    if not raw:
        return None
    try:
        value = int(raw)
    except ValueError:
        msg = f"{ENV_MAX_WORKERS} must be a positive integer, got {raw!r}"
        raise ValueError(msg) from None
    if value < 1:
        msg = f"{ENV_MAX_WORKERS} must be a positive integer, got {raw!r}"
        raise ValueError(msg)
    return value


def usable_cpus(max_workers: Optional[int] = None) -> int:
    """CPUs this process may use: affinity, cgroup quota, the env ceiling, the option."""
    try:
        n = len(os.sched_getaffinity(0))
    except AttributeError:  # macOS, Windows
        n = os.cpu_count() or 1
    quota = _cgroup_cpu_limit()
    if quota is not None:
        n = min(n, max(1, math.floor(quota)))
    ceiling = env_max_workers()
    if ceiling is not None:
        n = min(n, ceiling)
    if max_workers is not None:
        n = min(n, max_workers)
    return max(1, n)


def _meminfo_available() -> Optional[int]:
    # Linux: one small file read, where importing psutil costs ~18 ms (measured here).
    try:
        with open("/proc/meminfo", "rb") as f:
            for line in f:
                if line.startswith(b"MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def available_memory() -> Optional[int]:
    value = _meminfo_available()
    if value is not None:
        return value
    try:
        import psutil
    except ImportError:  # pragma: no cover - psutil is a dependency
        return None
    return int(psutil.virtual_memory().available)


def disabled() -> bool:
    return os.environ.get(ENV_DISABLE, "").strip() not in ("", "0")


def in_worker() -> bool:
    return os.environ.get(ENV_IN_WORKER) == "1"


def snapshot(max_workers: Optional[int] = None, with_memory: bool = True) -> SystemSnapshot:
    return SystemSnapshot(
        usable_cpus=usable_cpus(max_workers),
        available_memory=available_memory() if with_memory else None,
    )
