"""Functions the tests send to worker processes (module-level: importable there)."""

from __future__ import annotations

import errno
import os
import sys
import time


def spin(seconds: float) -> None:
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        pass


def burn(seconds: float) -> None:
    """``seconds`` of this thread's CPU: a one-time set-up (an import, a table built) is
    CPU work, which a busy core stretches in wall time but not in CPU (spin, which
    counts wall time, was measured as 0.22 s of a 0.5 s set-up beside a busy core: the
    time it waited for a CPU is not the function's)."""
    end = time.thread_time() + seconds
    while time.thread_time() < end:
        pass


def square(x):
    return x * x


def add(a, b):
    return a + b


def frozen_here(_: object) -> tuple[int, int]:
    """This process's pid and how many objects its garbage collector leaves out (frozen
    before the fork that made it: starts.gc_frozen)."""
    import gc

    spin(0.02)  # worth a pool
    return os.getpid(), gc.get_freeze_count()


def heavy(x):
    spin(0.02)
    return x * 3


def tiny(x):
    # About a microsecond of pure Python.
    total = 0
    for i in range(12):
        total += (x ^ i) & 7
    return total


def record_call(path: str, x: int, seconds: float = 0.0) -> int:
    """Append one line per call to ``path``: counts executions across processes."""
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    try:
        os.write(fd, b"%d %d\n" % (x, os.getpid()))
    finally:
        os.close(fd)
    if seconds:
        spin(seconds)
    return x * 2


def fail_on(x, bad=frozenset()):
    if x in bad:
        raise ValueError(f"bad item {x}")
    return x


class CustomError(Exception):
    def __init__(self, code, detail):
        super().__init__(code, detail)
        self.code = code
        self.detail = detail


def raise_custom(x, at=7):
    if x == at:
        raise CustomError(42, "seven")
    return x


def worker_pid(_x):
    spin(0.002)
    return os.getpid()


def nested_map(x):
    # Runs in a worker: the inner map must stay serial there.
    from adaptive_exec import parallelize

    spin(0.025)  # so that sampling stops after one item and the rest goes to workers
    inner = parallelize(square, backend="loky")
    return sum(inner.map(range(x))), inner.last_report.plan.mode, os.getpid()


def die_on(x, at=50):
    if x == at:
        os._exit(3)
    spin(0.001)
    return x


def sleepy(x):
    time.sleep(0.01)
    return x + 1


_HASHED = None


def hash_in_two_threads(x):
    # hashlib releases the GIL on large buffers: two threads really use two CPUs,
    # like BLAS does.
    import hashlib
    import threading

    global _HASHED
    if _HASHED is None:
        _HASHED = bytes(32 << 20)
    data = _HASHED
    out = []
    threads = [threading.Thread(target=lambda: out.append(hashlib.sha256(data).digest()))
               for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return x


_SPUN = bytes(1 << 16)


def blas_like(size, capped=True):
    """A stand-in for a BLAS call on ``size`` bytes: the work on the calling thread,
    beside it as many threads as OMP_NUM_THREADS says less one, which spin until it is
    done (OpenBLAS's wait so). In the caller (3 threads by default) it looks like more
    than two CPUs' work (threads_cpu ~1-2, ~0.7 beside a busy core); in one of our
    workers (OMP_NUM_THREADS=1) it runs alone, no slower. Not
    ``capped``: it spins two threads wherever it runs, as a function's own thread pool
    does (our workers cap BLAS, not those)."""
    import hashlib
    import threading

    global _HASHED
    if _HASHED is None:
        _HASHED = bytes(32 << 20)
    done = threading.Event()

    def spin():
        while not done.is_set():
            hashlib.sha256(_SPUN).digest()  # releases the GIL: a CPU of its own

    spinners = [threading.Thread(target=spin)
                for _ in range(int(os.environ.get("OMP_NUM_THREADS") or 3) - 1
                               if capped else 2)]
    for t in spinners:
        t.start()
    try:
        hashlib.sha256(memoryview(_HASHED)[:size]).digest()
    finally:
        done.set()
        for t in spinners:
            t.join()
    return size * 3


def in_worker() -> bool:
    return os.environ.get("ADAPTIVE_EXEC_IN_WORKER") == "1"


def faulty(x, crash=frozenset(), raise_on=frozenset(), how="exit", cost=0.0):
    """Crash the worker process on items in ``crash`` (never the caller: there it would
    take the test down), raise on those in ``raise_on``; spend ``cost`` seconds."""
    if cost:
        spin(cost)
    if x in crash and in_worker():
        if how == "exit":
            os._exit(13)
        if how == "kill":
            import signal

            os.kill(os.getpid(), signal.SIGKILL)
        if how == "segfault":
            import ctypes

            ctypes.string_at(0)
    if x in raise_on:
        raise ValueError(f"raised on {x}")
    return x * 10


def hang_on(x, at=5, seconds=60.0, pidfile=None):
    if x == at:
        if pidfile:
            with open(pidfile, "w") as f:
                f.write(str(os.getpid()))
        time.sleep(seconds)
    return x


def thread_caps(_x):
    spin(0.02)
    return {k: os.environ.get(k) for k in
            ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS",
             "ADAPTIVE_EXEC_IN_WORKER")}, os.getpid()


def outcome(run, items, catch=Exception):
    """What iterating ``run(items)`` gives: (results before any error, (type, item_index))."""
    out = []
    try:
        for r in run(items):
            out.append(r)
    except catch as exc:
        return out, (type(exc), getattr(exc, "item_index", None))
    return out, None


# --- issue 10: what a warm worker must not keep stale ------------------------------

SCALE = 3


def _offset(x):
    return x + OFFSET


OFFSET = 0


def scaled(x):
    # Reads a module global, and one through a helper of the same module.
    spin(0.001)
    return x * SCALE + _offset(0)


def slow_then_fail(x, slow_at=2, fail_fast_at=8, exc="ValueError"):
    """Item ``slow_at`` fails late; item ``fail_fast_at`` fails at once with ``exc``:
    the loop raises the first one, whatever the order they finish in."""
    if x == slow_at:
        spin(0.4)
        raise ValueError(f"slow failure at {x}")
    if x == fail_fast_at:
        raise {"ValueError": ValueError("fast"), "SystemExit": SystemExit(3),
               "KeyboardInterrupt": KeyboardInterrupt(), "GeneratorExit": GeneratorExit(),
               "BadStr": BadStr()}[exc]
    spin(0.002)
    return x


class BadStr(Exception):
    def __str__(self):
        raise RuntimeError("this __str__ raises")


def raise_base(x, at=5, exc="SystemExit"):
    spin(0.002)
    if x == at:
        raise {"SystemExit": SystemExit(3), "KeyboardInterrupt": KeyboardInterrupt(),
               "GeneratorExit": GeneratorExit(), "BadStr": BadStr()}[exc]
    return x


class NeedsArgs(ValueError):
    """Required __init__ arguments it does not pass on: pickle cannot rebuild it."""

    def __init__(self, code, detail):
        super().__init__(f"{code}: {detail}")
        self.code = code
        self.detail = detail


class HoldsLock(KeyError):
    def __init__(self, msg):
        super().__init__(msg)
        import threading

        self.lock = threading.Lock()
        self.note = "kept"


def raise_rich(x, at=4, kind="needs_args"):
    spin(0.002)
    if x == at:
        if kind == "needs_args":
            raise NeedsArgs(7, "detail")
        if kind == "lock":
            raise HoldsLock("with a lock")
        if kind == "unpicklable_class":
            import threading

            # A class that cannot travel at all: not importable, and its body holds a lock.
            cls = type("Unsendable", (ValueError,), {"guard": threading.Lock()})
            raise cls("cannot travel")
    return x


def lock_after(x, at=30):
    """Results from item ``at`` on cannot be pickled (the sampled ones can)."""
    spin(0.002)
    if x >= at:
        import threading

        return threading.Lock()
    return x


class FailsInWorker:
    """Pickles anywhere; unpickles only outside a worker."""

    def __init__(self, v):
        self.v = v

    def __setstate__(self, state):
        if in_worker():
            raise RuntimeError("cannot be unpickled in a worker")
        self.__dict__.update(state)


def value_of(obj):
    spin(0.002)
    return obj.v * 2


def read_relative(x, name="data.txt"):
    spin(0.002)
    with open(name) as f:
        return f.read().strip() + str(x)


def cwd_of(_x):
    spin(0.002)
    return os.getcwd()


class Weak:
    """A result that can be watched with a weak reference."""

    def __init__(self, v):
        self.v = v


def make_weak(x):
    return Weak(x)


LIVE = [0, 0]  # [alive now, most alive at once] of Counted in this process


class Counted:
    def __init__(self, v):
        self.v = v
        LIVE[0] += 1
        LIVE[1] = max(LIVE[1], LIVE[0])

    def __reduce__(self):
        return (Counted, (self.v,))

    def __del__(self):
        LIVE[0] -= 1


def make_counted(x):
    return Counted(b"x" * 1000)


class Scaler:
    def __init__(self, extra):
        self.extra = extra

    def apply(self, x):
        spin(0.001)
        return x * SCALE + self.extra

    def __call__(self, x):
        return self.apply(x)


def _rebuilt_slowly(seconds):
    time.sleep(seconds)
    return SlowToRebuild(seconds)


class SlowToRebuild:
    """An object that takes ``seconds`` to unpickle: a function bound to it reaches a
    worker that late, as one capturing a large object does."""

    def __init__(self, seconds):
        self.seconds = seconds

    def __reduce__(self):
        return (_rebuilt_slowly, (self.seconds,))

    def work(self, x):
        time.sleep(0.05)
        return x * 2


def sleepy_or_fast(slow, x):
    """Item 3 sleeps 30 s, the others 0.05 s; ``slow`` makes the function slow to arrive."""
    time.sleep(30 if x == 3 else 0.05)
    return x


# --- initializer= (tests/test_initializer.py) ---------------------------------------------

_INIT_STATE = None


def init_state(path, value):
    """An initializer: sets this process's state and notes (pid, value) in ``path``."""
    global _INIT_STATE
    _INIT_STATE = value
    with open(path, "a") as f:
        f.write(f"{os.getpid()} {value}\n")


def read_state(x, cost=0.0):
    """(x, this process's initializer state, pid)."""
    if cost:
        spin(cost)
    return x, _INIT_STATE, os.getpid()


def init_fails(where="worker"):
    """An initializer that raises: in worker processes only, or everywhere."""
    if where == "always" or in_worker():
        raise ValueError(f"cannot set up ({where})")


def init_hangs(pidfile):
    """An initializer that never returns in a worker: notes its pid in ``pidfile``."""
    if in_worker():
        with open(pidfile, "a") as f:
            f.write(f"{os.getpid()}\n")
        time.sleep(600)


# --- how many calls run at once (tests of max_workers) -----------------------------------

_running = [0, 0]  # calls running now, the most seen at once (in this process)
_running_lock = __import__("threading").Lock()


def waiting_counted(x, seconds=0.01):
    """Sleeps (a function that waits); counts how many of its calls overlap here."""
    with _running_lock:
        _running[0] += 1
        _running[1] = max(_running[1], _running[0])
    try:
        time.sleep(seconds)
    finally:
        with _running_lock:
            _running[0] -= 1
    return x + 1


def most_at_once(reset=False):
    """The most overlapping calls of ``waiting_counted`` seen in this process."""
    with _running_lock:
        out = _running[1]
        if reset:
            _running[1] = 0
        return out


def interval_logged(x, path, seconds=0.05):
    """Sleeps; appends 'start end' (monotonic, machine-wide on Linux) to ``path``."""
    t0 = time.monotonic()
    time.sleep(seconds)
    with open(path, "a") as f:
        f.write(f"{t0} {time.monotonic()}\n")
    return x


def most_overlapping(path):
    """The most intervals of ``path`` (interval_logged) that overlapped at one instant."""
    with open(path) as f:
        spans = [tuple(map(float, line.split())) for line in f]
    events = sorted([(a, 1) for a, _ in spans] + [(b, -1) for _, b in spans])
    now = best = 0
    for _, step in events:
        now += step
        best = max(best, now)
    return best


_ONE_AT_A_TIME = __import__("threading").Lock()


def one_at_a_time(x, seconds=0.002):
    """Waits (sleeps) while holding a lock every call shares: it looks like waiting,
    yet threads cannot overlap it."""
    with _ONE_AT_A_TIME:
        time.sleep(seconds)
    return x


def init_pid_state():
    """An initializer whose state is the process's own: its pid."""
    global _INIT_STATE
    _INIT_STATE = os.getpid()


def spin_logged(x, path, seconds=0.5):
    """Keeps a CPU busy ``seconds``; appends 'x pid start end' (monotonic, machine-wide on
    Linux) to ``path``; returns 2x."""
    t0 = time.monotonic()
    spin(seconds)
    with open(path, "a") as f:
        f.write(f"{x} {os.getpid()} {t0} {time.monotonic()}\n")
    return 2 * x


def spin_costed(x, path, costs):
    """spin_logged for ``costs[x]`` seconds: item costs of any shape."""
    return spin_logged(x, path, costs[x])


_FAT = b"x" * 200_000


def fat_result(_x):
    """0.1 ms of work and a 200 KB result (the same object: no memory grows)."""
    spin(0.0001)
    return _FAT


def burn_logged(x, path, seconds=0.5):
    """spin_logged, but ``seconds`` of this thread's CPU: beside other busy processes on
    too few cores the call takes longer, as real work does."""
    t0 = time.monotonic()
    burn(seconds)
    with open(path, "a") as f:
        f.write(f"{x} {os.getpid()} {t0} {time.monotonic()}\n")
    return 2 * x


def burn_costed(x, path, costs):
    """burn_logged for ``costs[x]`` seconds of CPU: item costs of any shape."""
    return burn_logged(x, path, costs[x])


_READ_ONCE: dict = {}


def drop_from_page_cache(path):
    """Clean pages of ``path`` leave the page cache: the next read waits on the disk
    (where the file system has one: a tmpfs keeps them)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def reads_once_then_burns(x, path, seconds=0.02):
    """The first call in a process reads ``path`` through (a library's pages, a file read
    once); every call then burns ``seconds`` of CPU. Returns x + 1."""
    if path not in _READ_ONCE:
        with open(path, "rb", buffering=0) as f:
            while f.read(1 << 20):
                pass
        _READ_ONCE[path] = True
    burn(seconds)
    return x + 1


def read_spin_log(path):
    """{item: (pid, start, end)} from spin_logged's file."""
    out = {}
    with open(path) as f:
        for line in f:
            x, pid, a, b = line.split()
            out[int(x)] = (int(pid), float(a), float(b))
    return out


_TABLE: dict = {}


def lazy_table(x, setup=0.3, cost=0.005):
    """Builds a table on its first call in each process (``setup`` seconds of this
    thread's CPU, as an import or a model load would), then costs ``cost`` per item."""
    if "built" not in _TABLE:
        burn(setup)
        _TABLE["built"] = os.getpid()
    spin(cost)
    return x + 1


def forget_table():
    _TABLE.clear()


class Halt(BaseException):
    """A user's BaseException: an item's outcome like any error (worker.call_each)."""


def lazy_logged(x, path, setup=0.4, cost=0.0005, raise_on=frozenset(), halt_on=frozenset(),
                dear_from=None, dear_cost=0.0, caller=None, worker_setup=None):
    """lazy_table's shape (its own table), logged as spin_logged's; raises ValueError on
    the items in ``raise_on``, Halt on those in ``halt_on``; from item ``dear_from`` on,
    an item costs ``dear_cost``. A process other than ``caller`` (a pid) builds its table
    in ``worker_setup`` seconds, when given."""
    t0 = time.monotonic()
    if "logged" not in _TABLE:
        elsewhere = worker_setup is not None and os.getpid() != caller
        burn(worker_setup if elsewhere else setup)
        _TABLE["logged"] = os.getpid()
    spin(dear_cost if dear_from is not None and x >= dear_from else cost)
    with open(path, "a") as f:
        f.write(f"{x} {os.getpid()} {t0} {time.monotonic()}\n")
    if x in raise_on:
        raise ValueError(f"raised on {x}")
    if x in halt_on:
        raise Halt(f"halted on {x}")
    return x + 1


def worker_children():
    """This process's children that are workers (psutil.Process list): not the helpers
    that live as long as it does (resource trackers, the template of backends/starts.py)."""
    import psutil

    from adaptive_exec.backends import starts

    template = starts.template_pid()  # spawned (its command names starts.py) or forked
    out = []
    for c in psutil.Process().children(recursive=True):
        try:
            cmd = " ".join(c.cmdline())
        except psutil.NoSuchProcess:
            continue
        if c.pid != template and "resource_tracker" not in cmd \
                and "adaptive_exec.backends.starts" not in cmd:
            out.append(c)
    return out


def communicate_or_dump(proc, timeout, what="the child"):
    """proc.communicate(timeout): (out, err). A child that hangs is sent SIGABRT first,
    so that (run with PYTHONFAULTHANDLER=1) it prints every thread's stack, and the test
    fails with it."""
    import signal
    import subprocess

    import pytest

    try:
        return proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGABRT)
        out, err = proc.communicate(timeout=10)
        pytest.fail(f"{what} hung:\n{err[-8000:]}")


_FIRST_SLOW: dict = {}


def slow_first_call(x, first=0.15, cost=0.001):
    """The first call in each process spins ``first`` seconds, the others ``cost``."""
    if "done" not in _FIRST_SLOW:
        _FIRST_SLOW["done"] = True
        spin(first)
    else:
        spin(cost)
    return 3 * x


def forget_first_call():
    _FIRST_SLOW.clear()


def wait_in_select(x):
    """Waits as a function blocked on a socket does (select, no descriptor ready)."""
    import select

    select.select([], [], [], 0.01)
    return x + 1


def wait_for_a_child(x):
    """Waits for a child process to end (wait4)."""
    import subprocess

    subprocess.run(["sleep", "0.02"], check=True)
    return x + 1


def wait_on_a_queue(x):
    """Waits on a lock (a queue nobody fills; its get times out)."""
    import queue

    try:
        queue.Queue().get(timeout=0.01)
    except queue.Empty:
        pass
    return x + 1


def crunch(x, seconds=0.1):
    """Pure-Python computation for about ``seconds`` of this thread's CPU."""
    end = time.thread_time() + seconds
    n = 0
    while time.thread_time() < end:
        n += sum(i * i for i in range(100))
    return x + 1


def large_once(x, marker, size=64 << 20):
    """Returns x after 2 ms, except the first time an item from 10 on runs in a worker:
    that worker writes its pid into ``marker`` and returns ``size`` bytes (a 64 MB
    result is written into the pipe in one call that lasts while the parent reads it)."""
    from adaptive_exec.system import in_worker

    spin(0.002)
    if x < 10 or not in_worker():
        return x
    try:
        with open(marker, "x") as f:  # one worker alone, even where two race for it
            f.write(str(os.getpid()))
    except FileExistsError:
        return x
    return bytes(size)


def costed_pid(x, costs):
    """``costs[x]`` seconds of spinning, unlogged (cheap items stay cheap); returns
    (2x, the pid that ran it)."""
    spin(costs[x])
    return 2 * x, os.getpid()


def first_even(xs):
    """next() over the evens of ``xs``: StopIteration where there is none."""
    return next(x for x in xs if x % 2 == 0)


def kind_of(x, seconds=0.002):
    """``seconds`` of CPU, then the name of ``x``'s type (any item will do)."""
    spin(seconds)
    return type(x).__name__


def _frozen_error():
    import dataclasses

    @dataclasses.dataclass(frozen=True)
    class FrozenError(Exception):
        """A frozen dataclass exception: its __setattr__ refuses every attribute."""
        code: int

    FrozenError.__qualname__ = "FrozenError"
    return FrozenError


FrozenError = _frozen_error()


def raise_frozen(x, at, cost=0.0):
    """x, after spinning ``cost`` s; FrozenError(x) at item ``at``."""
    spin(cost)
    if x == at:
        raise FrozenError(x)
    return x


def _on_alarm(signum, frame):
    raise TimeoutError("too slow")


def guarded_sleep(x, seconds=0.02):
    """A read guarded by an alarm, the classic way: only the main thread may set one."""
    import signal

    old = signal.signal(signal.SIGALRM, _on_alarm)
    signal.alarm(5)
    try:
        time.sleep(seconds)
        return 2 * x
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


class RowError(Exception):
    """An exception with an ``item_index`` field of the user's own (a row id)."""

    def __init__(self, msg, item_index):
        super().__init__(msg, item_index)
        self.item_index = item_index


def raise_row_error(x, at):
    if x == at:
        raise RowError("bad row", item_index=1000 + x)
    return x


def init_fails_in(pid):
    """An initializer that raises in process ``pid`` only (the caller, in tests)."""
    if os.getpid() == pid:
        raise RuntimeError("cannot set up here")


class FieldError(ValueError):
    """Formats its message from its argument: pickle calls it again with the message."""

    def __init__(self, field):
        super().__init__(f"invalid field {field!r}")
        self.field = field


class RecordNotFound(OSError):
    """An OSError with an __init__ of its own: errno, strerror and filename live in C."""

    def __init__(self, path):
        super().__init__(errno.ENOENT, "no such record", path)


def raise_reworked(x, kind, at=5):
    """Raises, at item ``at``, an exception whose pickle round trip does not give it
    back as it was."""
    if x == at:
        if kind == "formats":
            raise FieldError("age")
        if kind == "oserror":
            raise RecordNotFound(f"/records/{x}")
        if kind == "exit":
            sys.exit(3)
        if kind == "decode":
            b"ab\xff".decode()
        if kind == "group":
            raise ExceptionGroup("two failed", [ValueError(x), KeyError("k")])  # noqa: F821
        if kind == "lambda_arg":
            raise ValueError(lambda: x)
        raise AttributeError("no such attribute", name="colour", obj=(x, "row"))
    return x


def depth(n):
    """Recurses n frames deep (past the default recursion limit of 1000 for n > ~990)."""
    return 0 if n == 0 else 1 + depth(n - 1)


def deep(n):
    spin(0.002)
    return depth(n)


def digits_and_seventh(x, big=True):
    """Needs the caller's int_max_str_digits (10**5000 has 5001) and decimal context."""
    import decimal

    spin(0.001)
    return (len(str(10 ** (5000 + x))) if big else 0,
            str(decimal.Decimal(x + 150) / decimal.Decimal(7)))


def raise_chained(x, how, at=700):
    """At item ``at``: a ValueError raised while handling a KeyError, with ``from``
    (its cause) or without (its context)."""
    if x == at:
        try:
            {}["missing"]
        except KeyError as err:
            if how == "from":
                raise ValueError(f"bad {x}") from err
            raise ValueError(f"bad {x}")  # noqa: B904 - the implicit chain is the point
    return x


class AttrDict(dict):
    """A config read by attribute; a missing one raises KeyError, not AttributeError."""

    def __getattr__(self, key):
        return self[key]


def scaled_by(cfg):
    def scaled(x):
        spin(0.001)
        return x * cfg.scale

    return scaled


class Table:
    """A large captured object (weakly referenceable, to see that it is let go)."""

    def __init__(self, size):
        self.data = bytearray(size)


def reads_table(table):
    def width(x):
        spin(0.001)
        return x + len(table.data)

    return width


def set_arg(arg):
    global ARG
    ARG = arg


def initializers_kept(_x):
    """In a worker: how many initializers it keeps."""
    from adaptive_exec import worker

    spin(0.001)
    return len(worker._INITIALIZERS)


def own_handlers(_x):
    """In a worker: which of SIGTERM and SIGUSR1 have a Python function as handler."""
    import signal

    spin(0.001)
    return [s.name for s in (signal.SIGTERM, signal.SIGUSR1) if callable(signal.getsignal(s))]


def library_handler(signum, frame):
    """A signal handler of a module's (a library sets it when imported)."""


def warns_at(x, at=(700, 850)):
    """Warns (DeprecationWarning) at the items of ``at``."""
    import warnings

    if x in at:
        warnings.warn(f"old api at {x}", DeprecationWarning, stacklevel=1)
    return x


CRAWL = [0]


def crawl(x):
    """Appends to the list it is mapped over (CRAWL), up to 30 items: a crawler."""
    if len(CRAWL) < 30:
        CRAWL.append(x + 1)
    return x


HEAVY_CRAWL = [0]


def heavy_crawl(x):
    """A crawler whose items are worth a pool (5 ms each): each of the first 60 adds
    two to the list it is mapped over (HEAVY_CRAWL), 121 items in all."""
    spin(0.005)
    if x < 60:
        HEAVY_CRAWL.append(2 * x + 1)
        HEAVY_CRAWL.append(2 * x + 2)
    return x


INPLACE_CRAWL = [0]


def inplace_crawl(x):
    """heavy_crawl's twin that grows its queue with ``+=``."""
    global INPLACE_CRAWL
    spin(0.005)
    if x < 60:
        INPLACE_CRAWL += [2 * x + 1, 2 * x + 2]
    return x


SCORES = list(range(1, 41))


def share_of_best(x):
    """Reads the list it is mapped over (its best score), never grows it: 5 ms each."""
    spin(0.005)
    return x / max(SCORES)


class NamesLikeOurs:
    """A callable whose attributes bear the names of ParallelFunction's own (a model's
    ``self._options``, a lookup table called ``self.map``)."""

    def __init__(self, factor):
        self._options = {"factor": factor}
        self.map = {"a": 1}
        self.plan = "nightly"

    def __call__(self, x):
        return x * self._options["factor"] + self.map["a"]


def warn_on(x, every=10, cost=0.0005):
    import warnings

    spin(cost)
    if x % every == 0:
        warnings.warn(f"odd item {x}", UserWarning, stacklevel=1)
    return x


def _rate_var():
    import contextvars

    return contextvars.ContextVar("aex_rate", default=1)


RATE = _rate_var()  # a module's context variable (a request's currency, a tenant)
HELD = _rate_var()  # one that may hold what cannot be pickled


def priced(x):
    spin(0.002)
    return x * RATE.get()


def env_of(x, name="AEX_MODE"):
    spin(0.001)
    return os.environ.get(name)


def hour_and_mode(x, folder, instant=1_700_000_000):
    """The local hour of a fixed instant, and the mode a new file gets here."""
    import stat

    spin(0.001)
    path = os.path.join(folder, f"{os.getpid()}-{x}")
    with open(path, "w"):
        pass
    try:
        return time.localtime(instant).tm_hour, stat.S_IMODE(os.stat(path).st_mode)
    finally:
        os.unlink(path)


def view_kind(buf):
    spin(0.001)
    return type(buf).__name__, bytes(buf[:2])


def as_view(i):
    spin(0.001)
    return memoryview(bytes([i % 256]) * 4)


def first_line(src):
    spin(0.001)
    return type(src).__name__, src.readline()


def say(x, cost=0.002):
    spin(cost)
    print(f"said-{x}", flush=True)
    return x


MISSING = object()  # a module's sentinel, held in a context variable
OPTION = _rate_var()


def option_is_missing(x):
    spin(0.002)
    return OPTION.get() is MISSING


def sets_rate(x):
    spin(0.002)
    RATE.set(100)  # in its own chunk's context: the next map's items do not see it
    return x


def held_kind(x):
    spin(0.002)
    return type(HELD.get()).__name__


def drawn(x, spin=0.0):
    """x plus a draw from the shared random generator, after ``spin`` seconds of CPU."""
    import random

    if spin:
        burn(spin)
    return x + random.random()


def locale_and_timeout(x):
    """This process's C locale (character type, numbers), its character set, and the
    sockets' default timeout."""
    import locale
    import socket

    spin(0.001)
    return (locale.setlocale(locale.LC_CTYPE), locale.setlocale(locale.LC_NUMERIC),
            locale.nl_langinfo(locale.CODESET), socket.getdefaulttimeout())


def overflows_from(x, start=50):
    """numpy's float64 overflow from item ``start`` on: inf, a warning or
    FloatingPointError, as ``np.seterr`` says."""
    import numpy as np

    spin(0.001)
    return float(np.float64(1e308) * (10.0 if x >= start else 1.0))


def pid_and_numpy(x):
    """This process's pid, and whether numpy is imported in it."""
    spin(0.001)
    return os.getpid(), "numpy" in sys.modules


def spin_fail_on(x, bad=frozenset()):
    """5 ms of CPU, then ValueError on the items in ``bad``."""
    spin(0.005)
    if x in bad:
        raise ValueError(f"bad item {x}")
    return x


# A first call that waits for the items behind it to reach workers gives up after this
# long: a hang bound only, far beyond any start of loky's pool seen under load (~0.3 s
# quiet; seconds beside the CI's suites, on the exec path with workers slowed 1.5 s).
WORKERS_BEGAN_WITHIN_S = 30.0


def outlasting_the_start(x, func, began, caller, **kwargs):
    """``func(x, **kwargs)``; in a process other than ``caller`` (a pid: a worker) it
    first appends a line to the file ``began``. The caller's item 0, the first call,
    first keeps its CPU busy until that file exists, that is until an item behind it
    has begun in a worker (at most WORKERS_BEGAN_WITHIN_S): a long first call, whatever
    loky's start takes on this path and under this load (a fixed length assumed the
    workers up within it: under load they were not, and nothing went ahead). Busy, not
    asleep: a call that sleeps reads as one that waits, which threads serve, and
    nothing is sent ahead of it."""
    if os.getpid() != caller:
        with open(began, "a") as f:
            f.write(f"{x} {os.getpid()}\n")
    elif x == 0:
        end = time.perf_counter() + WORKERS_BEGAN_WITHIN_S
        while not os.path.exists(began) and time.perf_counter() < end:
            spin(0.002)
    return func(x, **kwargs)
