"""map/imap/starmap equal the loop, on real worker processes (hypothesis)."""

from __future__ import annotations

import collections
import functools

import aex_helpers as h
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from adaptive_exec import adaptive_map, parallelize

SETTINGS = settings(
    max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)

# Values a user's function may return: ints, strings, None, nested containers.
values = st.recursive(
    st.none() | st.integers() | st.text(max_size=5) | st.floats(allow_nan=False),
    lambda inner: st.lists(inner, max_size=3) | st.tuples(inner, inner)
    | st.dictionaries(st.text(max_size=3), inner, max_size=3),
    max_leaves=8,
)


def to_value(table, x):
    return table[x % len(table)]


def loop_outcome(func, items):
    out = []
    for i, x in enumerate(items):
        try:
            out.append(func(x))
        except Exception as exc:
            return out, (type(exc), i)
    return out, None


ours_outcome = h.outcome


backends = pytest.mark.parametrize("backend", ["loky", "auto", "serial"])


@backends
@SETTINGS
@given(
    n=st.integers(0, 60),
    table=st.lists(values, min_size=1, max_size=8),
    chunksize=st.integers(1, 7),
)
def test_map_and_imap_equal_the_loop(backend, n, table, chunksize):
    func = functools.partial(to_value, table)
    items = list(range(n))
    expected = [func(x) for x in items]
    pf = parallelize(func, backend=backend, chunksize=chunksize)
    assert pf.map(items) == expected
    assert list(pf.imap(iter(items))) == expected
    unordered = list(pf.imap_unordered(items))
    key = repr
    assert collections.Counter(map(key, unordered)) == collections.Counter(map(key, expected))


@backends
@SETTINGS
@given(
    n=st.integers(0, 50),
    bad=st.frozensets(st.integers(0, 49), max_size=4),
    chunksize=st.integers(1, 6),
)
def test_raising_items_behave_as_in_the_loop(backend, n, bad, chunksize):
    func = functools.partial(h.fail_on, bad=bad)
    items = list(range(n))
    expected = loop_outcome(func, items)
    pf = parallelize(func, backend=backend, chunksize=chunksize)
    assert ours_outcome(pf.imap, items) == expected
    got = ours_outcome(lambda xs: iter(pf.map(xs)), items)
    assert got[1] == expected[1]
    if expected[1] is None:
        assert got[0] == expected[0]


@backends
@SETTINGS
@given(pairs=st.lists(st.tuples(st.integers(), st.integers()), max_size=40),
       chunksize=st.integers(1, 5))
def test_starmap_equals_the_loop(backend, pairs, chunksize):
    pf = parallelize(h.add, backend=backend, chunksize=chunksize)
    assert pf.starmap(pairs) == [a + b for a, b in pairs]


def test_lambdas_and_closures_run_in_workers():
    k = 7
    got = adaptive_map(lambda x: (x * k, h.worker_pid(x)), range(40), backend="loky", chunksize=2)
    assert [g[0] for g in got] == [x * 7 for x in range(40)]
    import os

    assert {g[1] for g in got} - {os.getpid()}, "no item ran in a worker process"


def test_generators_are_consumed_lazily_and_fully():
    read = []

    def gen():
        for i in range(10_000):
            read.append(i)
            yield i

    pf = parallelize(h.square, backend="loky", chunksize=10)
    it = pf.imap(gen())
    first = [next(it) for _ in range(5)]
    assert first == [0, 1, 4, 9, 16]
    # Bounded read-ahead: a few chunks in flight, not the whole stream.
    assert len(read) < 2_000, len(read)
    assert list(it) == [x * x for x in range(5, 10_000)]
    # Sampled items were put back in front of the rest: the full result, in order.
    assert pf.map(gen()) == [x * x for x in range(10_000)]
