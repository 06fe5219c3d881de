"""The vectorisable math primitives (numbaxent._math) against NumPy's long-double results."""
from __future__ import annotations

import numba
import numpy as np
import pytest

from numbaxent._math import exp, exp_nonpos, log


@numba.njit(fastmath={"reassoc", "contract"}, error_model="numpy")
def _apply(a, which, out):
    # the kernels' fast-math flags, in a loop (so the vectorised code path is what is tested)
    for i in range(a.shape[0]):
        if which == 0:
            out[i] = exp(a[i])
        elif which == 1:
            out[i] = exp_nonpos(a[i])
        else:
            out[i] = log(a[i])


def _ulp_error(actual, x, fn, dtype):
    ref = fn(x.astype(np.longdouble))
    spacing = np.spacing(np.abs(ref.astype(dtype))).astype(np.longdouble)
    spacing = np.maximum(spacing, np.finfo(dtype).smallest_subnormal)
    return np.abs(actual.astype(np.longdouble) - ref) / spacing


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_exp_and_exp_nonpos(dtype):
    rng = np.random.default_rng(0)
    lo = -110.0 if dtype == np.float32 else -760.0
    hi = 88.0 if dtype == np.float32 else 709.0
    x = np.concatenate([rng.uniform(lo, 0, 20000), -np.exp(rng.uniform(-30, 3, 2000))]).astype(dtype)
    e1 = np.empty_like(x)
    e2 = np.empty_like(x)
    _apply(x, 0, e1)
    _apply(x, 1, e2)
    np.testing.assert_array_equal(e1, e2)  # the cheaper scaling gives the same results
    assert _ulp_error(e2, x, np.exp, dtype).max() <= 1.0  # subnormal results included
    xp = rng.uniform(0, hi, 5000).astype(dtype)
    ep = np.empty_like(xp)
    _apply(xp, 0, ep)
    assert _ulp_error(ep, xp, np.exp, dtype).max() <= 1.0
    special = np.array([0.0, -0.0, -np.inf, np.nan, lo * 2], dtype=dtype)
    out = np.empty_like(special)
    _apply(special, 1, out)
    np.testing.assert_array_equal(out, [1.0, 1.0, 0.0, np.nan, 0.0])


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_log(dtype):
    rng = np.random.default_rng(1)
    big = 80.0 if dtype == np.float32 else 700.0
    x = np.concatenate([rng.uniform(1.0, 1e6, 20000), np.exp(rng.uniform(-big, big, 20000)),
                        [1.0, 2.0, np.sqrt(2.0)]]).astype(dtype)
    out = np.empty_like(x)
    _apply(x, 2, out)
    err = _ulp_error(out, x, np.log, dtype)
    err = err[x != 1.0]  # log(1) = 0 exactly: checked below
    assert err.max() <= 3.0
    special = np.array([1.0, np.inf, np.nan], dtype=dtype)
    res = np.empty_like(special)
    _apply(special, 2, res)
    np.testing.assert_array_equal(res, [0.0, np.inf, np.nan])
