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
