from __future__ import annotations

import functools
import subprocess
import sys
import textwrap

from adaptive_exec.fingerprint import fingerprint, function_complexity


def make(src: str):
    ns: dict = {}
    exec(textwrap.dedent(src), ns)
    return ns["f"]


def key(src: str) -> str:
    return fingerprint(make(src))


def test_one_constant_changes_the_key():
    assert key("def f(x): return x * 2") != key("def f(x): return x * 3")


def test_same_code_same_key_and_names_matter():
    assert key("def f(x): return x * 2") == key("def f(x): return x * 2")
    assert key("def f(x): return abs(x)") != key("def f(x): return len(x)")


def test_defaults_and_nested_code_count():
    assert fingerprint(make("def f(x, k=2): return x * k")) != fingerprint(
        make("def f(x, k=3): return x * k"))
    a = make("def f(x):\n    g = lambda y: y + 1\n    return g(x)")
    b = make("def f(x):\n    g = lambda y: y + 2\n    return g(x)")
    assert fingerprint(a) != fingerprint(b)


def test_closures_over_different_values_differ():
    def outer(k):
        def f(x):
            return x * k
        return f

    assert fingerprint(outer(2)) != fingerprint(outer(3))
    assert fingerprint(outer(2)) == fingerprint(outer(2))


def test_builtins_partials_and_bound_methods():
    assert fingerprint(abs) != fingerprint(len)
    assert fingerprint(functools.partial(pow, 2)) != fingerprint(functools.partial(pow, 3))

    class C:
        def __init__(self, k):
            self.k = k

        def m(self, x):
            return x * self.k

    assert fingerprint(C(1).m) != fingerprint(C(2).m)
    assert fingerprint(C(1).m) == fingerprint(C(1).m)


def test_stable_across_processes():
    code = (
        "from adaptive_exec.fingerprint import fingerprint;"
        "from aex_helpers import square; print(fingerprint(square))"
    )
    import os

    here = os.path.dirname(__file__)
    runs = {
        subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                       cwd=here, timeout=60, check=True).stdout.strip()
        for _ in range(2)
    }
    import aex_helpers

    assert runs == {fingerprint(aex_helpers.square)}


def test_complexity_includes_nested_code():
    flat = make("def f(x): return x")
    nested = make(
        "def f(x):\n    def g(y):\n        return [z * 2 for z in range(y)]\n    return g(x)"
    )
    assert 0 < function_complexity(flat) < function_complexity(nested)
    assert function_complexity(len) == 0
