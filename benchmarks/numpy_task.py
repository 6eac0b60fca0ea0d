"""The numpy workload's task, apart so that only this workload imports numpy.

Each item is 10 products of 300x300 matrices (~5 ms with OpenBLAS on 2 threads): BLAS
work that already uses every core, so process workers that each start a full set of BLAS
threads oversubscribe the machine unless someone caps them.  The result, the sum of the
entries of A**11, is also ``ones @ A**11 @ ones``, which 11 matrix-vector products give
in O(n^2): that is how the loop's results are checked cheaply.
"""

from __future__ import annotations

import numpy as np

_N = 300
_PRODUCTS = 10
_base: np.ndarray | None = None


def _base_matrix() -> np.ndarray:
    # Built once per process from a fixed seed: random draws cost ~1 ms, as much as
    # two products, and this workload is meant to be BLAS time.
    global _base
    if _base is None:
        rng = np.random.default_rng(20240601)
        _base = rng.standard_normal((_N, _N)) / np.sqrt(_N)  # spectral radius ~1
    return _base


def _matrix(seed: int) -> np.ndarray:
    a = _base_matrix().copy()
    a[np.diag_indices(_N)] += 0.001 * (seed % 100)
    return a


def matrix_power_sum(seed: int) -> float:
    a = _matrix(seed)
    power = a
    for _ in range(_PRODUCTS):
        power = a @ power
    return float(power.sum())


def expected(seed: int) -> float:
    a = _matrix(seed)
    v = np.ones(_N)
    for _ in range(_PRODUCTS + 1):
        v = a @ v
    return float(v.sum())
