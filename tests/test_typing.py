"""Types flow to the user's code: mypy --strict, run on a user's script outside this
repository (as after an install: the package found through site-packages, py.typed),
sees the function's signature and result type, and reports wrong uses."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import textwrap

import pytest

pytest.importorskip("mypy", reason="mypy is in the 'dev' extra")

USER_SCRIPT = textwrap.dedent('''
    from typing import Iterator
    from adaptive_exec import adaptive_map, parallelize


    @parallelize
    def square(x: int) -> int:
        return x * x


    @parallelize(max_workers=2)
    def power(x: int, p: int = 2) -> float:
        return float(x ** p)


    def plain(x: int) -> bytes:
        return bytes(x)


    class Model:
        @parallelize
        def score(self, x: int) -> str:
            return str(x)


    reveal_type(square(3))  # R:int
    reveal_type(square.map([1, 2]))  # R:list[int]
    reveal_type(square.imap([1, 2]))  # R:Iterator[int]
    reveal_type(square.imap_unordered([1, 2]))  # R:Iterator[int]
    reveal_type(power.starmap([(1, 2)]))  # R:list[float]
    reveal_type(adaptive_map(square, [1, 2]))  # R:list[int]
    reveal_type(adaptive_map(lambda x: str(x), [1, 2]))  # R:list[str]
    reveal_type(Model().score(1))  # R:str
    reveal_type(Model().score.map([1]))  # R:list[str]
    it: Iterator[int] = square.imap([1])
    reveal_type(parallelize(plain, max_workers=2).map([1]))  # R:list[bytes]
    p2 = parallelize(plain, initializer=print, initargs=(1,))
    reveal_type(p2(1))  # R:bytes

    a: list[str] = square.map([1, 2])  # E
    b: int = power(2)  # E
    square("x")  # E
    adaptive_map(power, range(5), p=3)  # E
    Model().score("x")  # E
    parallelize(max_workers="2")  # E
    parallelize(plain, max_workers=2)("x")  # E
    parallelize(plain, p=3)  # E
''')


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _installed_python(tmp_path):
    """A bare environment holding a normal (non-editable) install of this package, from
    a wheel built here: what `pip install adaptive_exec` gives a user."""
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w",
                    str(tmp_path / "wheel"), ROOT], check=True, timeout=300)
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True,
                   timeout=120)
    python = str(venv / "bin" / "python")
    wheel = next((tmp_path / "wheel").glob("adaptive_exec-*.whl"))
    subprocess.run([sys.executable, "-m", "pip", "--python", python, "install", "-q",
                    "--no-deps", str(wheel)], check=True, timeout=300)
    return python


@pytest.mark.timeout(600)
@pytest.mark.parametrize("install", ["development", "normal"])
def test_mypy_strict_sees_the_types_and_reports_wrong_uses(tmp_path, install):
    """development: this environment (the README's editable install); normal: a wheel
    installed into a fresh environment."""
    if install == "normal" and sys.platform == "win32":
        pytest.skip("the bare environment's layout is POSIX's here")
    python = sys.executable if install == "development" else _installed_python(tmp_path)
    script = tmp_path / "user_script.py"
    script.write_text(USER_SCRIPT)
    run = subprocess.run(
        [sys.executable, "-m", "mypy", "--strict", "--no-error-summary",
         "--python-executable", python,
         "--cache-dir", str(tmp_path / "cache"), str(script)],
        cwd=tmp_path, capture_output=True, text=True, timeout=300)
    out = run.stdout + run.stderr
    assert "import-not-found" not in out and "Cannot find implementation" not in out, out
    lines = USER_SCRIPT.splitlines()
    revealed = dict(re.findall(r":(\d+): note: Revealed type is \"([^\"]+)\"", out))
    errors = {int(n) for n in re.findall(r":(\d+): error:", out)}
    for number, line in enumerate(lines, start=1):
        if "# R:" in line:
            expected = line.split("# R:")[1].strip()
            got = revealed.get(str(number), "")
            # mypy writes typing.Iterator[int] and builtins.list[int] depending on version
            assert got.replace("typing.", "").replace("builtins.", "") == expected, (
                line, got, out)
        elif line.endswith("# E"):
            assert number in errors, (line, out)
        else:
            assert number not in errors, (line, out)
