"""What this machine offers now: usable CPUs and available memory.

Cheap reads only (affinity and cgroup files are a few microseconds); psutil is imported
lazily, because a map that stays serial should not pay for it.
"""

from __future__ import annotations

import math
import numbers
import operator
import os
import sys
import threading
import time
from dataclasses import dataclass
from typing import Callable, Iterable, Optional, Union

ENV_MAX_WORKERS = "ADAPTIVE_EXEC_MAX_WORKERS"
ENV_DISABLE = "ADAPTIVE_EXEC_DISABLE"
# Set in our worker processes (loky's ``env``): a map inside a worker runs serially.
ENV_IN_WORKER = "ADAPTIVE_EXEC_IN_WORKER"


@dataclass(frozen=True)
class SystemSnapshot:
    usable_cpus: int  # after affinity, quota and ceilings; not yet after load
    available_memory: Optional[int]  # bytes a map may use; None when not read
    others_load: float = 0.0  # CPUs kept busy by other processes
    worker_memory: Optional[int] = None  # resident bytes of one idle worker, when measured
    # The user's ceiling on workers of any kind (max_workers=, $ADAPTIVE_EXEC_MAX_WORKERS);
    # threads, which are not bounded by the CPUs, are bounded by it.
    max_workers: Optional[int] = None


# The cgroup quota, read at most this often: it is a few files to open (~30 µs), read
# by every plan and re-plan, and a container's quota does not change map by map.
CGROUP_TTL_S = 1.0
_cgroup_read: tuple[float, Optional[float]] = (-math.inf, None)  # (when, quota)


def _cgroup_cpu_limit() -> Optional[float]:
    """CPUs allowed by a cgroup quota, read again after CGROUP_TTL_S."""
    global _cgroup_read
    when, quota = _cgroup_read
    now = time.monotonic()
    if now - when >= CGROUP_TTL_S:
        quota = _read_cgroup_cpu_limit()
        _cgroup_read = (now, quota)
    return quota


def _read_cgroup_cpu_limit() -> Optional[float]:
    """CPUs allowed by a cgroup quota (v2 ``cpu.max``, else v1 cfs), or None when unlimited."""
    # Read as bytes: a text file's first open in a process looks up its encoding, which
    # a fresh process's first map paid (~0.03 ms).
    try:
        with open("/sys/fs/cgroup/cpu.max", "rb") as f:
            quota, period = f.read().split()[:2]
        if quota != b"max":
            return int(quota) / int(period)
        return None
    except (OSError, ValueError):
        pass
    try:
        with open("/sys/fs/cgroup/cpu/cpu.cfs_quota_us", "rb") as f:
            quota_us = int(f.read())
        with open("/sys/fs/cgroup/cpu/cpu.cfs_period_us", "rb") as f:
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
    ceiling = worker_ceiling(max_workers)
    if ceiling is not None:
        n = min(n, ceiling)
    return max(1, n)


def worker_ceiling(max_workers: Optional[int] = None) -> Optional[int]:
    """The most workers of any kind the user allows: the option, the env ceiling."""
    values = [v for v in (env_max_workers(), max_workers) if v is not None]
    return min(values) if values else None


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
    try:
        return int(psutil.virtual_memory().available)
    except OSError:  # /proc/meminfo cannot be opened either (no descriptor left)
        return None


_FLAG_OFF = ("", "0", "false", "no", "off")
_FLAG_ON = ("1", "true", "yes", "on")


def env_flag(name: str) -> bool:
    """An on/off environment variable: 1/true/yes/on (any non-zero integer too) or
    0/false/no/off (or unset); a ValueError naming it for anything else. (Only "" and
    "0" were off: ADAPTIVE_EXEC_PROGRESS=false drew a bar.)"""
    text = os.environ.get(name, "").strip().lower()
    if text in _FLAG_OFF:
        return False
    if text in _FLAG_ON:
        return True
    try:
        return int(text) != 0
    except ValueError:
        msg = (f"{name} must be 1 (or true, yes, on) or 0 (or false, no, off), "
               f"got {os.environ.get(name)!r}")
        raise ValueError(msg) from None


def disabled() -> bool:
    return env_flag(ENV_DISABLE)


def in_worker() -> bool:
    return os.environ.get(ENV_IN_WORKER) == "1"


def shutting_down() -> bool:
    """Is the interpreter ending: its main thread has returned (an atexit handler runs,
    or a thread that outlived it), or finalization began? No pool can start then: loky
    takes no work once the main thread has ended, and a pool started from an atexit
    handler was never ended (its workers waited for the caller, the caller for them).
    (CPython sets threading._SHUTTING_DOWN, and loky its _global_shutdown, before the
    main thread is marked stopped.)"""
    if (sys.is_finalizing() or getattr(threading, "_SHUTTING_DOWN", False)
            or not threading.main_thread().is_alive()):
        return True
    loky = sys.modules.get("loky.process_executor")
    return bool(getattr(loky, "_global_shutdown", False))



# The GIL's switch interval while threads of ours must work beside a call that computes
# in the caller: each of their system calls hands the GIL back, and taking it again from
# a computing thread waits a whole interval (5 ms by default). The sampling watch looks
# at the caller's call (its first decision came ~30-45 ms into a long call at 5 ms, ~5 ms
# at 0.5 ms); a cold pool is started by our thread and loky's while the caller runs items
# (small@threaded: the workers' first items 95-130 ms after the call at 5 ms, 84-87 ms).
SWITCH_INTERVAL_S = 0.0005
_switch_lock = threading.Lock()
_switch_users = 0
_switch_before = 0.0


def fast_switching(on: bool) -> None:
    """Hold the switch interval at SWITCH_INTERVAL_S (``on``) until every holder has let
    go (``not on``), then restore what it was (holders in several threads overlap)."""
    global _switch_users, _switch_before
    with _switch_lock:
        if on:
            if _switch_users == 0:
                _switch_before = sys.getswitchinterval()
                sys.setswitchinterval(min(_switch_before, SWITCH_INTERVAL_S))
            _switch_users += 1
        elif _switch_users > 0:  # (a holder interrupted before it held lets go too)
            _switch_users -= 1
            if _switch_users == 0:
                sys.setswitchinterval(_switch_before)


def _after_fork_in_child() -> None:
    # No holder came along with the fork; the lock may have been held by one.
    global _switch_lock, _switch_users
    _switch_lock = threading.Lock()
    if _switch_users:
        sys.setswitchinterval(_switch_before)
    _switch_users = 0


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


def snapshot(
    max_workers: Optional[int] = None,
    with_memory: bool = True,
    max_memory: Optional[int] = None,
    others_load: Optional[float] = None,
    worker_memory: Optional[int] = None,
) -> SystemSnapshot:
    room: Optional[float] = None
    if with_memory:
        room = _faked("room")
        if room is None:
            room = memory_room(max_memory)
    load = _faked("others")
    if load is None:
        load = others_load or 0.0
    return SystemSnapshot(
        usable_cpus=usable_cpus(max_workers),
        available_memory=None if room is None else int(room),
        others_load=load,
        worker_memory=worker_memory,
        max_workers=worker_ceiling(max_workers),
    )


# --- memory inside containers, and a ceiling set by the user --------------------------

ENV_MAX_MEMORY = "ADAPTIVE_EXEC_MAX_MEMORY"
_UNITS = {"": 1, "B": 1, "K": 1 << 10, "KB": 1 << 10, "M": 1 << 20, "MB": 1 << 20,
          "G": 1 << 30, "GB": 1 << 30, "T": 1 << 40, "TB": 1 << 40}


def parse_bytes(value: object, what: str) -> int:
    """``2147483648``, ``2e9``, ``"2GB"``, ``"512M"`` -> bytes; a clear error for
    anything else. (A float such as 2e9 was refused, though "2e9" was taken.)"""
    if isinstance(value, numbers.Integral) and not isinstance(value, bool):
        if operator.index(value) > 0:  # numpy's int64 too
            return operator.index(value)
    elif isinstance(value, numbers.Real) and not isinstance(value, bool):
        try:
            real = float(value)  # numpy's float32 too
        except OverflowError:
            real = math.inf
        if math.isfinite(real) and real >= 1:
            return int(real)
    if isinstance(value, str):
        text = value.strip().upper().replace(" ", "").replace("IB", "B")
        number = text.rstrip("KMGTB")
        unit = text[len(number):]
        try:
            amount = float(number)
        except ValueError:
            amount = -1.0
        if amount > 0 and math.isfinite(amount * _UNITS.get(unit, 1)) and unit in _UNITS \
                and amount * _UNITS[unit] >= 1:
            return int(amount * _UNITS[unit])
    msg = (f"{what} must be a positive, finite number of bytes or a size like '2GB' "
           f"(None: no ceiling), got {value!r}")
    raise ValueError(msg)


def env_max_memory() -> Optional[int]:
    """The ceiling in $ADAPTIVE_EXEC_MAX_MEMORY, or None; a ValueError naming the variable
    when it is set to something that is not a size (checked before any item runs)."""
    text = os.environ.get(ENV_MAX_MEMORY, "").strip()
    return parse_bytes(text, ENV_MAX_MEMORY) if text else None


def _read_int(path: str) -> Optional[int]:
    try:
        with open(path) as f:
            text = f.read().strip()
        return None if text == "max" else int(text)
    except (OSError, ValueError):
        return None


def cgroup_memory_room() -> Optional[int]:
    """Bytes left under this process's cgroup memory limit (v2, else v1), or None."""
    limit = _read_int("/sys/fs/cgroup/memory.max")
    usage = _read_int("/sys/fs/cgroup/memory.current")
    if limit is None:
        limit = _read_int("/sys/fs/cgroup/memory/memory.limit_in_bytes")
        usage = _read_int("/sys/fs/cgroup/memory/memory.usage_in_bytes")
        if limit is not None and limit >= 1 << 60:  # v1 spells "no limit" as a huge number
            limit = None
    if limit is None or usage is None:
        return None
    return max(0, limit - usage)


def memory_room(max_memory: Optional[int] = None) -> Optional[int]:
    """What a map may still use: available memory, inside the cgroup limit, under the
    user's ceiling (option, else ADAPTIVE_EXEC_MAX_MEMORY) minus what our processes hold."""
    room = available_memory()
    cgroup = cgroup_memory_room()
    if cgroup is not None:
        room = cgroup if room is None else min(room, cgroup)
    if max_memory is None:
        max_memory = env_max_memory()
    if max_memory is not None:
        ceiling = max(0, max_memory - _our_rss())
        room = ceiling if room is None else min(room, ceiling)
    return room


def _our_rss() -> int:
    """Resident bytes of this process and its children (our workers among them)."""
    try:
        import psutil

        me = psutil.Process()
        total = me.memory_info().rss
        for child in me.children(recursive=True):
            try:
                total += child.memory_info().rss
            except psutil.Error:
                pass
        return int(total)
    except Exception:
        return 0


# --- CPU used by other processes ------------------------------------------------------


def _system_busy_s() -> Optional[float]:
    """CPU seconds all CPUs have spent not idle since boot (Linux /proc/stat, else psutil)."""
    try:
        with open("/proc/stat", "rb") as f:
            fields = f.readline().split()[1:]
        ticks = [int(x) for x in fields]
        # user nice system idle iowait irq softirq steal [guest guest_nice]: guests are
        # already counted in user and nice.
        busy = sum(ticks[:8]) - ticks[3] - ticks[4]
        return busy / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        pass
    try:
        import psutil

        t = psutil.cpu_times()
        return float(sum(t)) - t.idle - getattr(t, "iowait", 0.0)
    except Exception:
        return None


def process_rss(pid: int) -> Optional[int]:
    """Resident bytes of process ``pid`` (Linux /proc, else psutil; None when gone)."""
    try:
        with open(f"/proc/{pid}/statm", "rb") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        pass
    try:
        import psutil

        return int(psutil.Process(pid).memory_info().rss)
    except Exception:
        return None


def _process_cpu_s(pid: int) -> float:
    """CPU seconds of process ``pid`` (Linux /proc, else psutil; 0 when it is gone)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            # The command name (field 2) may hold spaces: count fields after its ')'.
            fields = f.read().rsplit(b")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        pass
    try:
        import psutil

        c = psutil.Process(pid).cpu_times()
        return float(c.user + c.system)
    except Exception:
        return 0.0


MIN_LOAD_WINDOW_S = 0.1
# Under that window, runnable threads are read at the start and at this many instants
# this far apart at the plan (~4 ms, paid only by a map that may use a pool).
INSTANT_READINGS = 4
INSTANT_SPACING_S = 0.001
# CPUs with at least this much load from others count as taken: a busy process sharing
# two cores with our two workers gets ~0.67 of one; tick noise over 0.3 s is ~0.03.
BUSY_CPU = 0.5


def busy_cpus(others_load: float) -> int:
    return math.floor(others_load + 1 - BUSY_CPU)


def _runnable_now() -> Optional[int]:
    """Threads on a CPU or waiting for one at this instant, machine-wide (Linux
    /proc/stat's procs_running; None elsewhere)."""
    try:
        with open("/proc/stat", "rb") as f:
            for line in f:
                if line.startswith(b"procs_running "):
                    return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        pass
    return None


def _runnable_threads(pid: Union[int, str]) -> int:
    """Threads of process ``pid`` ("self": this one) that are runnable now (state R)."""
    count = 0
    try:
        tids = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return 0
    for tid in tids:
        try:
            with open(f"/proc/{pid}/task/{tid}/stat", "rb") as f:
                if f.read().rsplit(b")", 1)[1].split()[0] == b"R":
                    count += 1
        except (OSError, IndexError):
            pass
    return count


class LoadProbe:
    """How many CPUs other processes keep busy, between two readings.

    Everything is load but this process and the worker processes we started: a busy
    process the user launched counts, our own pool does not. ``pids`` gives our
    workers' process ids at each reading.

    Over a window too short for the kernel's CPU counters (a map whose sampling took a
    few ms), what runs at the window's two ends tells instead: a process that keeps a
    CPU busy is runnable at both instants, a passing one seldom is.
    """

    def __init__(self, pids: Optional[Callable[[], Iterable[int]]] = None):
        self.pids = pids or (lambda: ())
        self._last = self._read()
        self._runnable_at_start = self._others_runnable()

    def _others_runnable(self) -> Optional[int]:
        # The machine-wide count is one instant and ours another: a worker that became
        # runnable just after the count, subtracted from it, hid a busy process (a
        # template's workers starting: 4 runnable counted, 2 + 2 of ours read just
        # after). Ours are counted on both sides of it and the fewer subtracted.
        before = self._ours_runnable()
        total = _runnable_now()
        if total is None:
            return None
        return max(0, total - min(before, self._ours_runnable()))

    def _ours_runnable(self) -> int:
        return _runnable_threads("self") + sum(_runnable_threads(p) for p in self.pids())

    def _ours_s(self) -> float:
        t = os.times()
        return t.user + t.system + sum(_process_cpu_s(pid) for pid in self.pids())

    def _read(self) -> tuple[float, Optional[float], float]:
        return time.perf_counter(), _system_busy_s(), self._ours_s()

    def others(self, min_window_s: float = MIN_LOAD_WINDOW_S) -> Optional[float]:
        """CPUs busy with other processes since the last reading (None: unknown).
        Under ``min_window_s`` the CPU counters cannot tell (the kernel counts in ticks
        of 10 ms, so over 20 ms one tick is half a CPU): the other processes' threads
        runnable at both ends of the window are the reading then, and the window keeps
        growing until the next call."""
        now = self._read()
        (t0, busy0, ours0), (t1, busy1, ours1) = self._last, now
        if busy0 is None or busy1 is None or t1 - t0 < min_window_s:
            return self._instant()
        self._last = now
        # A worker that exited between readings takes its CPU with it: never below 0.
        return max(0.0, ((busy1 - busy0) - (ours1 - ours0)) / (t1 - t0))

    def _instant(self) -> Optional[float]:
        """Other processes' runnable threads at the start and at a few instants now,
        the fewest (None where it cannot be read): what keeps CPUs busy throughout, not
        what passed by (measured here on a quiet machine: one reading now besides the
        start's saw a CPU busy in ~1 plan of 3; a busy process is seen at every one)."""
        fewest = self._runnable_at_start
        for i in range(INSTANT_READINGS):
            if fewest is None or fewest == 0:
                break
            if i:
                time.sleep(INSTANT_SPACING_S)
            now = self._others_runnable()
            fewest = None if now is None else min(fewest, now)
        return None if fewest is None or self._last[1] is None else float(fewest)


def live_readings(probe: LoadProbe, max_memory: Optional[int]) -> tuple[float, Optional[float]]:
    """(CPUs other processes keep busy since the last reading, the memory room now), for
    the monitor of a running map."""
    others = _faked("others")
    if others is None:
        others = probe.others(min_window_s=0.0) or 0.0
    room = _faked("room")
    if room is None:
        room = memory_room(max_memory)
    return others, room


# The one test seam in production code: when set, replaces the readings of other
# processes' CPU load and of the memory room, in ``snapshot`` and ``live_readings``
# alone (each test of the same behaviour also runs once on the real machine).
_fake: dict[str, Optional[float]] = {}


def fake_readings(others: Optional[float] = None, room: Optional[float] = None) -> None:
    _fake.clear()
    if others is not None:
        _fake["others"] = others
    if room is not None:
        _fake["room"] = room


def _faked(name: str) -> Optional[float]:
    return _fake.get(name)


# --- what a thread waits on ----------------------------------------------------------------

# Linux system calls in which a thread waits for something outside the CPU, by what they
# wait for. futex is not among them: it is the GIL as often as a lock (see ThreadWaits).
_SLEEP, _NET, _CHILDREN, _IO = "sleeping", "sockets or pipes (poll)", "child processes", "io"
DISK = "the disk"  # uninterruptible sleep: a read, a page fault served from the disk
_SYSCALLS = {
    "x86_64": {0: _IO, 1: _IO, 17: _IO, 19: _IO, 20: _IO, 35: _SLEEP, 230: _SLEEP,
               7: _NET, 23: _NET, 232: _NET, 270: _NET, 271: _NET, 281: _NET, 441: _NET,
               42: _NET, 43: _NET, 288: _NET, 44: _NET, 45: _NET, 46: _NET, 47: _NET,
               299: _NET, 61: _CHILDREN, 247: _CHILDREN},
    "aarch64": {63: _IO, 64: _IO, 65: _IO, 66: _IO, 67: _IO, 101: _SLEEP, 115: _SLEEP,
                72: _NET, 73: _NET, 22: _NET, 441: _NET, 202: _NET, 203: _NET, 242: _NET,
                206: _NET, 207: _NET, 211: _NET, 212: _NET, 243: _NET,
                260: _CHILDREN, 95: _CHILDREN},
}.get(os.uname().machine if hasattr(os, "uname") else "")
# Python files whose frames wait on a lock when their thread sleeps in futex.
_LOCK_FILES = ("threading.py", "queue.py", "synchronize.py", os.path.join("futures", "_base.py"))


class ThreadWaits:
    """What a thread is seen waiting on, looked at now and then from another thread:
    sleeping, sockets or pipes, child processes, the disk, a lock, or nothing (it
    computes). Its CPU share alone confused waiting with computing: a thread waits for
    the GIL too, and for a CPU on a busy machine (issue 14: files hashed from the page
    cache were "48% CPU, mostly waits", and threads ran them 2.5x slower than the loop).

    Linux only (``/proc/self/task/<tid>/syscall``): elsewhere, or where that file cannot
    be read, ``share()`` is None and the plan goes by the CPU share.
    """

    MIN_LOOKS = 5  # fewer looks tell nothing (3 sleeping calls were seen 0 of 3 asleep)

    def __init__(self, tid: Optional[int], ident: Optional[int] = None):
        self.tid = tid if _SYSCALLS is not None else None
        self.ident = ident  # the thread's Python ident: its frames tell a lock wait
        self.looks = 0
        self.waits: dict[str, int] = {}

    def look(self) -> None:
        """One look (~20 µs): what the thread does at this instant."""
        if self.tid is None:
            return
        what = self._now()
        if what is None:
            self.tid = None  # unreadable here: no more looks
            return
        self.looks += 1
        if what:
            self.waits[what] = self.waits.get(what, 0) + 1

    def mark(self) -> tuple[int, dict[str, int]]:
        """What was seen so far, for share() and mostly() to leave out (``since``)."""
        return self.looks, dict(self.waits)

    def share(self, since: Optional[tuple[int, dict[str, int]]] = None) -> Optional[float]:
        """The share of looks that found it waiting (after the mark ``since``); None
        with too few looks."""
        looks, waits = self._after(since)
        if looks < self.MIN_LOOKS:
            return None
        return sum(waits.values()) / looks

    def mostly(self, since: Optional[tuple[int, dict[str, int]]] = None) -> Optional[str]:
        """What it waited on most (after the mark ``since``), or None."""
        _, waits = self._after(since)
        waits = {k: n for k, n in waits.items() if n > 0}
        return max(waits, key=lambda k: waits[k]) if waits else None

    def _after(self, since: Optional[tuple[int, dict[str, int]]]
               ) -> tuple[int, dict[str, int]]:
        if since is None:
            return self.looks, self.waits
        looks, waits = since
        return self.looks - looks, {k: n - waits.get(k, 0) for k, n in self.waits.items()}

    def _now(self) -> Optional[str]:
        """"" when it computes (or waits for the GIL), what it waits on, None: unreadable."""
        base = f"/proc/self/task/{self.tid}/"
        try:
            with open(base + "stat", "rb") as f:
                state = f.read().rsplit(b")", 1)[1].split()[0]
            if state == b"R":
                return ""  # on a CPU, or waiting for one: computing
            if state == b"D":
                return DISK
            with open(base + "syscall", "rb") as f:
                fields = f.read().split()
        except (OSError, IndexError):
            return None
        if not fields or not fields[0].lstrip(b"-").isdigit():
            return ""  # "running": it left the call meanwhile
        kind = _SYSCALLS.get(int(fields[0])) if _SYSCALLS else None
        if kind == _IO and len(fields) > 1:
            try:
                target = os.readlink(f"/proc/self/fd/{int(fields[1], 16)}")
            except (OSError, ValueError):
                return ""
            if target.startswith("socket:"):
                return "sockets"
            return "pipes" if target.startswith("pipe:") else ""
        if kind is None:
            return self._lock_wait()
        return kind

    def _lock_wait(self) -> str:
        """A thread asleep in another call (futex mostly): a lock when its Python frame
        is in the standard library's locking code (a Queue, an Event, a Future), else
        the GIL or something unnamed, which counts as computing."""
        import sys

        frame = sys._current_frames().get(self.ident) if self.ident is not None else None
        if frame is not None and frame.f_code.co_filename.endswith(_LOCK_FILES):
            return "locks"
        return ""
