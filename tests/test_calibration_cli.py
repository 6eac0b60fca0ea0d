from __future__ import annotations

import subprocess
import sys

from adaptive_exec import calibrate, calibration


def test_calibrate_measures_a_real_pool():
    c = calibrate(2)
    assert c.measured and c.source.endswith("overheads measured")
    assert c.worker_startup_s > 0 and c.task_overhead_s > 0 and c.byte_cost_s > 0
    # What the next plan reads for the path these workers took: this measurement.
    assert calibration.get(c.start_path) == c
    assert c.start_path in ("fork", "template", "exec")


def test_calibrate_refuses_a_pool_larger_than_the_usable_cpus():
    import pytest

    from adaptive_exec.system import usable_cpus

    for bad in (0, usable_cpus() + 1, 100_000, 1.5, True):
        with pytest.raises(ValueError, match="n_workers must be an integer from 1 to"):
            calibrate(bad)


def test_cli_calibrate_and_demo_run():
    out = subprocess.run([sys.executable, "-m", "adaptive_exec", "calibrate"],
                         capture_output=True, text=True, timeout=120, check=True).stdout
    assert "per-task overhead" in out
    demo = subprocess.run([sys.executable, "-m", "adaptive_exec", "demo", "--scale", "0.1"],
                          capture_output=True, text=True, timeout=300)
    assert demo.returncode == 0, demo.stderr
    for name in ("tiny", "heavy", "skewed"):
        assert f"== {name}" in demo.stdout
    assert "RESULTS DIFFER" not in demo.stdout and "why:" in demo.stdout


def test_the_stored_calibration_says_which_start_up_was_measured(tmp_path):
    """calibrate() on the fork path measures the fork path's start-up; the stored row of
    loky's own start (exec) keeps its default, and says so, instead of a default
    labelled as measured (a review saw 200 ms 'measured' beside a 21 ms fork start)."""
    import json
    import os

    env = {**os.environ, "ADAPTIVE_EXEC_CACHE_DIR": str(tmp_path), "ADAPTIVE_EXEC_START": "fork"}
    code = ("import json; from adaptive_exec import calibrate; c = calibrate(); "
            "print(json.dumps(c.to_dict()))")
    measured = json.loads(subprocess.run([sys.executable, "-c", code], env=env, check=True,
                                         capture_output=True, text=True, timeout=120
                                         ).stdout.strip().splitlines()[-1])
    assert measured["start_path"] == "fork" and measured["source"].startswith("measured")
    stats = json.loads(subprocess.run(
        [sys.executable, "-m", "adaptive_exec", "cache", "stats", "--json"], env=env,
        check=True, capture_output=True, text=True, timeout=60).stdout)
    assert stats["startup_by_path"]["fork"]["worker_startup_s"] == measured["worker_startup_s"]
    main = stats["calibration"]
    assert main["start_path"] == "exec"
    assert main["source"] == "defaults for start-up, overheads measured", main
    assert main["task_overhead_s"] == measured["task_overhead_s"]
