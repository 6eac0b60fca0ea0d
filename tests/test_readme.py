"""Every Python example of the README runs as pasted, in a fresh process, and finishes;
every public name's help() documents every option."""

from __future__ import annotations

import os
import pydoc
import re
import subprocess
import sys

import pytest

import adaptive_exec
from adaptive_exec.api import OPTION_NAMES

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXAMPLE_TIMEOUT_S = 180  # the examples take ~1-5 s; this only tells a hang from a slow box


def _examples() -> list[tuple[int, str]]:
    with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as f:
        text = f.read()
    out = []
    for match in re.finditer(r"^```python\n(.*?)^```", text, flags=re.S | re.M):
        line = text.count("\n", 0, match.start()) + 1
        out.append((line, match.group(1)))
    return out


EXAMPLES = _examples()


def test_the_readme_has_examples():
    assert len(EXAMPLES) >= 2


@pytest.mark.timeout(EXAMPLE_TIMEOUT_S + 30)
@pytest.mark.parametrize("line, code", EXAMPLES, ids=[f"line{n}" for n, _ in EXAMPLES])
def test_each_readme_example_runs_as_pasted(tmp_path, line, code):
    if "distributed" in code:
        pytest.importorskip("distributed", reason="the dask extra")
    script = tmp_path / "example.py"
    script.write_text(code)
    env = {**os.environ, "ADAPTIVE_EXEC_CACHE_DIR": str(tmp_path / "cache")}
    run = subprocess.run([sys.executable, str(script)], cwd=tmp_path, env=env,
                         capture_output=True, text=True, timeout=EXAMPLE_TIMEOUT_S)
    assert run.returncode == 0, f"README line {line}:\n{run.stdout}\n{run.stderr}"
    assert "Traceback" not in run.stderr, run.stderr


@pytest.mark.parametrize("name", ["parallelize", "adaptive_map", "ParallelFunction"])
def test_help_documents_every_option(name):
    text = pydoc.render_doc(getattr(adaptive_exec, name), renderer=pydoc.plaintext)
    for option in OPTION_NAMES:
        # Named in the signature and explained in the text ("option: ..." or "option, ...").
        assert re.search(rf"\b{option}\b[^\n]*[:,] ", text.split("Options", 1)[-1]), (
            name, option)
