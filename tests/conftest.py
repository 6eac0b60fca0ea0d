from __future__ import annotations

import faulthandler
import os
import signal
import threading

import forced_runs
import psutil
import pytest

from adaptive_exec import cache
from adaptive_exec.backends import loky as loky_backend
from adaptive_exec.backends import starts


def _our_workers() -> list[psutil.Process]:
    out = []
    for child in psutil.Process().children(recursive=True):
        try:
            cmd = " ".join(child.cmdline())
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
        # Helpers that live as long as this process does, by design: loky's and
        # multiprocessing's resource trackers, and the template that forks workers
        # (backends/starts.py); ended at the session's end below.
        if "resource_tracker" in cmd or "adaptive_exec.backends.starts" in cmd:
            continue
        out.append(child)
    return out


@pytest.fixture(autouse=True, scope="session")
def _end_template():
    """The template process, if a test started one, ends with the session."""
    yield
    pid = starts.template_pid()
    starts.template().stop()
    if pid is not None:
        assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == "zombie"


@pytest.fixture(autouse=True, scope="session")
def _private_cache_dir(tmp_path_factory):
    """No test writes into the user's real cache; child and worker processes inherit it."""
    old = os.environ.get(cache.ENV_DIR)
    os.environ[cache.ENV_DIR] = str(tmp_path_factory.mktemp("aex-cache"))
    yield
    if old is None:
        os.environ.pop(cache.ENV_DIR, None)
    else:
        os.environ[cache.ENV_DIR] = old


@pytest.fixture(autouse=True)
def _signals_as_found():
    """Each test leaves Ctrl-C as it found it: delivered (not blocked in the main
    thread's mask, which every process started later inherits, exec or not) and handled
    by the same handler. A child started with SIGINT blocked never sees Ctrl-C."""
    main = threading.current_thread() is threading.main_thread()
    before = (signal.pthread_sigmask(signal.SIG_BLOCK, []) if main else None,
              signal.getsignal(signal.SIGINT), _sigint_ignored())
    yield
    after = (signal.pthread_sigmask(signal.SIG_BLOCK, []) if main else None,
             signal.getsignal(signal.SIGINT), _sigint_ignored())
    assert after == before, ("the test changed SIGINT's mask, handler or disposition: "
                             f"{before} -> {after}")


def _sigint_ignored() -> bool:
    """SIGINT ignored by the process at the OS level (SIG_IGN set by C code, which Python's
    getsignal does not see); inherited by every process started later."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("SigIgn:"):
                    return bool(int(line.split()[1], 16) & (1 << (signal.SIGINT - 1)))
    except OSError:
        pass
    return False


@pytest.fixture(autouse=True)
def _fresh_memory():
    """Each test plans from its own measurements, not a previous test's."""
    cache.clear()
    yield
    cache.clear()


@pytest.fixture(autouse=True, scope="module")
def _end_pool():
    """Every worker process a test module starts is ended by it."""
    yield
    loky_backend.shutdown()
    left = _our_workers()
    gone, alive = psutil.wait_procs(left, timeout=10)
    for p in alive:
        p.kill()
    assert not alive, f"worker processes survived the module: {[p.pid for p in alive]}"


# After the last test, the process must exit: one that waits on more than this (an exit
# hook joining a thread or a child that never ends: seen once in ~10 runs of
# test_faults.py; one cause found since, loky's manager thread reading for ever the
# rest of a result whose worker we killed, test_lifecycle.py::
# test_ctrl_c_while_workers_send_large_results_leaves_no_thread_and_the_process_exits)
# prints every thread's stack and exits 1, rather than holding CI until its own limit.
EXIT_DEADLINE_S = 60


@pytest.hookimpl(trylast=True)
def pytest_unconfigure(config):
    faulthandler.dump_traceback_later(EXIT_DEADLINE_S, exit=True)


FORCED_TEST = "test_the_fault_and_lifecycle_suites_pass_on_each_forced_path"
_forced: forced_runs.Runs | None = None  # the forced-path runs going on beside this session


def pytest_collection_modifyitems(config, items):
    """Outside a forced-path run, the test that waits for those runs goes last, so that
    the rest of the suite runs beside them (tests/forced_runs.py).

    Inside a forced-path run (the fault and lifecycle suites again, with
    ADAPTIVE_EXEC_START set), the tests that already name their start path (parametrized
    by ``path``, each running every path itself) are not run again: they would repeat
    what the default run did, a third of CI's time."""
    if not os.environ.get(starts.ENV_START):
        items.sort(key=lambda item: item.originalname == FORCED_TEST)  # stable: the rest
        return
    keep, skipped = [], []
    for item in items:
        callspec = getattr(item, "callspec", None)
        names_its_path = callspec is not None and callspec.params.get("path") in starts.PATHS
        (skipped if names_its_path else keep).append(item)
    if skipped:
        config.hook.pytest_deselected(items=skipped)
        items[:] = keep


def pytest_collection_finish(session):
    global _forced
    if os.environ.get(starts.ENV_START) or session.config.option.collectonly:
        return
    if any(item.originalname == FORCED_TEST for item in session.items):
        _forced = forced_runs.start(os.path.dirname(os.path.dirname(__file__)))


def pytest_sessionfinish(session):
    if _forced is not None:
        _forced.stop()  # runs the session left before waiting for them do not go on


@pytest.fixture
def forced_path_runs() -> forced_runs.Runs:
    """The forced-path runs started with this session (pytest_collection_finish)."""
    assert _forced is not None, "the forced-path runs were not started with the session"
    return _forced
