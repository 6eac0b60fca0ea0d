"""The benchmark suite keeps working: a one-workload smoke of ``python -m benchmarks``, and
the checks it relies on (expected results, WRONG/FAIL/TIMEOUT reporting).  No timing is
asserted: CI machines are too noisy for that, and the suite itself reports the figures."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from benchmarks import harness, reaction, report, workloads
from benchmarks.load import BusyCore

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.timeout(300)
def test_quick_smoke_writes_checked_results(tmp_path: Path) -> None:
    out = tmp_path / "bench"
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks", "--quick", "--only", "tiny", "--repeats", "1",
         "--runners", "serial,adaptive_cold", "--out", str(out)],
        cwd=ROOT, capture_output=True, text=True, timeout=280,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    results = json.loads((out / "results.json").read_text())
    (tiny,) = results["workloads"]
    statuses = {entry["name"]: entry["status"] for entry in tiny["runners"]}
    assert set(statuses) == {"serial", "adaptive_cold"}
    assert not {s for s in statuses.values() if s in ("WRONG", "FAIL")}, statuses
    assert (out / "results.md").exists() and (out / "results.txt").exists()
    assert "tiny" in proc.stdout  # the table


def _needs(workload: str) -> None:
    # numpy is in the `bench` extra, not in `dev`, which is all CI installs.
    if workload == "numpy":
        pytest.importorskip("numpy")


# How many items of each workload to run for real: enough to see the values vary,
# few enough to stay quick (few_heavy, two_heavy, memory_heavy and few_waits cost 0.3-0.5 s
# an item).
_SAMPLE = {"few_heavy": 1, "two_heavy": 1, "memory_heavy": 1, "few_waits": 1}


@pytest.mark.timeout(60)
@pytest.mark.parametrize("name", list(workloads.WORKLOADS))
def test_expected_results_are_the_loops(name: str) -> None:
    _needs(name)
    workload = workloads.get(name)
    items = workload.items(quick=True)[: _SAMPLE.get(name, 3)]
    task = workload.load_task()
    assert workload.check(items, [task(x) for x in items]) is None


@pytest.mark.parametrize("name", list(workloads.WORKLOADS))
def test_wrong_results_are_caught(name: str) -> None:
    _needs(name)
    workload = workloads.get(name)
    items = workload.items(quick=True)[:3]
    expected = workload.expected(items)
    assert workload.check(items, expected) is None
    assert workload.check(items, expected[:-1]) is not None  # an item dropped
    assert workload.check(items, expected[::-1]) is not None  # reordered
    assert workload.check(items, [expected[0]] * 3) is not None  # repeated


def test_skewed_costs_have_cv_2_and_come_last() -> None:
    costs = [c for _, c in workloads.get("skewed").items(quick=False)]
    mean = sum(costs) / len(costs)
    cv = (sum((c - mean) ** 2 for c in costs) / len(costs)) ** 0.5 / mean
    assert cv == pytest.approx(2.0, rel=0.01)
    assert mean == pytest.approx(1e-3)
    assert costs == sorted(costs)


@pytest.mark.timeout(60)
def test_timeout_and_crash_are_reported(tmp_path: Path) -> None:
    base = {"workload": "few_heavy", "n_items": 3, "name": "x"}
    timed_out = harness.run_child({**base, "runner": "serial"}, 0.2, tmp_path)
    assert timed_out["status"] == "TIMEOUT"
    crashed = harness.run_child({**base, "runner": "fork", "workers": 0, "chunksize": 1},
                                30, tmp_path)
    assert crashed["status"] == "FAIL" and "ValueError" in crashed["message"]


@pytest.mark.timeout(300)
def test_loaded_scenario_and_reaction_smoke(tmp_path: Path) -> None:
    out = tmp_path / "bench"
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks", "--quick", "--only", "heavy@loaded,reaction",
         "--repeats", "1", "--runners", "serial,adaptive_cold", "--out", str(out)],
        cwd=ROOT, capture_output=True, text=True, timeout=280,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    results = json.loads((out / "results.json").read_text())
    (loaded,) = results["workloads"]
    assert loaded["name"] == "heavy@loaded" and loaded["loaded"] is True
    statuses = {entry["name"]: entry["status"] for entry in loaded["runners"]}
    assert statuses == {"serial": "ok", "adaptive_cold": "ok"}, statuses
    (run,) = results["reaction"]["runs"]
    assert run["status"] == "ok", run.get("message")
    assert run["details"]["timeline"] and run["details"]["load_on"] is not None
    assert "Reaction to a load change" in proc.stdout


def test_busy_core_spins_until_stopped() -> None:
    busy = BusyCore(max_s=30)
    busy.start()
    try:
        assert busy.proc is not None
        pid = busy.proc.pid
        time.sleep(0.3)
        assert psutil.Process(pid).cpu_times().user > 0.1
    finally:
        busy.stop()
    assert not psutil.pid_exists(pid)  # killed and reaped
    assert busy.start() is None  # one object, one load: a late timer starts nothing


def test_reaction_delays_from_a_timeline() -> None:
    details = {"mode": "parallel", "n_workers": 2, "offset_s": 0.1, "load_on": 1.1,
               "load_off": 2.6,  # 1.0 and 2.5 on the timeline's clock
               "timeline": [[0.0, 2], [1.4, 1], [2.9, 2], [3.6, 1], [3.7, 0]]}
    found = reaction.delays(details)
    assert found["drop_s"] == pytest.approx(0.4) and found["rise_s"] == pytest.approx(0.4)
    never = reaction.delays({**details, "timeline": [[0.0, 2], [3.6, 1], [3.7, 0]]})
    assert never["drop_s"] is None and never["rise_s"] is None and never["note"]


# --------------------------------------------------------------------------- peers not installed


def _shadow_joblib(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, body: str) -> None:
    """A ``joblib`` module ahead of any installed one, in the children's PYTHONPATH (the
    harness passes it on) and in this process's path (so that the harness's look-up
    finds a joblib and starts the child: what the child's import does decides)."""
    shadow = tmp_path / "shadow"
    shadow.mkdir()
    (shadow / "joblib.py").write_text(body)
    monkeypatch.setenv("PYTHONPATH", str(shadow))
    monkeypatch.syspath_prepend(str(shadow))


def _suite_with_joblib(tmp_path: Path) -> dict:
    options = harness.Options(quick=True, workloads=["tiny"], repeats=1,
                              runners=["serial", "adaptive_cold", "joblib"])
    results = harness.run_suite(options)
    report.write_all(results, tmp_path / "bench")  # every file, the chart if it can
    return results


def _joblib_goal(results: dict) -> dict:
    (goal,) = [g for g in report.evaluate_goals(results) if "joblib" in g["goal"]]
    return goal


@pytest.mark.timeout(300)
def test_peer_not_installed_is_na_and_its_goal_not_measured(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # What Python raises for `import joblib` when joblib is not installed.
    _shadow_joblib(tmp_path, monkeypatch,
                   "raise ModuleNotFoundError(\"No module named 'joblib'\", name='joblib')\n")
    results = _suite_with_joblib(tmp_path)
    (tiny,) = results["workloads"]
    statuses = {e["name"]: e["status"] for e in tiny["runners"]}
    assert statuses == {"serial": "ok", "adaptive_cold": "ok", "joblib": "n/a"}, statuses
    text, markdown = report.render_text(results), report.render_markdown(results)
    for shown in (text, markdown, (tmp_path / "bench" / "results.md").read_text()):
        assert "n/a (pip install joblib)" in shown
        assert "FAIL" not in shown
    goal = _joblib_goal(results)
    assert goal["verdict"] == "not measured (needs: pip install joblib)", goal
    assert goal["met"] is None and goal["needs"] == ["joblib"]
    assert "[NOT MEASURED (needs: pip install joblib)] adaptive_cold ahead of joblib" in text
    assert "**not measured (needs: pip install joblib)**: adaptive_cold ahead of joblib" \
        in markdown
    saved = json.loads((tmp_path / "bench" / "results.json").read_text())
    assert _joblib_goal(saved)["verdict"] == goal["verdict"]


def test_missing_package_found_before_the_child_starts(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from benchmarks import runners

    assert runners.not_installed(["json", "aex_no_such_module"]) == ["aex_no_such_module"]
    monkeypatch.setitem(runners.RUNNER_NEEDS, "joblib", ("aex_no_such_module",))
    outcome = harness.run_child({"workload": "tiny", "n_items": 10, "runner": "joblib",
                                 "name": "joblib"}, 30, tmp_path)
    assert outcome["status"] == "n/a" and outcome["missing"] == ["aex_no_such_module"]
    assert list(tmp_path.iterdir()) == []  # no child was started: no spec file written


@pytest.mark.timeout(300)
def test_goal_over_zero_comparisons_is_not_met(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # joblib is there but broken: a real failure (FAIL, not n/a), and no time to compare
    # adaptive_cold with on any workload: the goal rests on zero comparisons.
    _shadow_joblib(tmp_path, monkeypatch, "raise RuntimeError('this joblib is broken')\n")
    results = _suite_with_joblib(tmp_path)
    (tiny,) = results["workloads"]
    joblib = next(e for e in tiny["runners"] if e["name"] == "joblib")
    assert joblib["status"] == "FAIL" and "this joblib is broken" in joblib["message"]
    assert "n/a" not in report.render_text(results)
    goal = _joblib_goal(results)
    assert goal["met"] is not True and goal["verdict"] == "not measured", goal
    assert "ahead on 0/0" in goal["value"] and "joblib FAIL" in goal["value"]
    # Any goal over no comparison at all.
    empty = report._goal("a goal", report.Compared(), 1.0)
    assert empty["met"] is None and report._verdict(empty) == "not measured"


@pytest.mark.timeout(180)
def test_the_fixed_cost_figure_runs_and_checks_its_results() -> None:
    # benchmarks.fixed_cost compares each map's results with the loop's (WRONG exits 1).
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.fixed_cost", "--pairs", "2", "--fresh", "1"],
        cwd=ROOT, capture_output=True, text=True, timeout=170,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr[-2000:]
    assert "identity" in proc.stdout and "a cache hit planned:" in proc.stdout
