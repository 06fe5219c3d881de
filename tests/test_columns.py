"""The column kernels (few classes, K-dim input) against the independent reference, at block
boundaries, in every layout and mode they take; and the dispatch between row and column kernels."""
from __future__ import annotations

import numpy as np
import pytest

import numbaxent as nx
from conftest import kernel_path
from naive import naive_cross_entropy
from numbaxent import _kernels as k
from test_core_parity import assert_close

NB3 = k.column_block_rows(3, 1)  # rows per 2-D block for C=3
NBK3 = k.column_block_rows(3, 2)  # positions per K-dim block for C=3
NBK5 = k.column_block_rows(5, 2)


def _case(shape, dtype, soft, seed=0, ignore=True):
    rng = np.random.default_rng(seed)
    x = (rng.standard_normal(shape) * 4).astype(dtype)
    tshape = (shape[0],) + shape[2:]
    if soft:
        t = rng.random(shape).astype(dtype)
    else:
        t = rng.integers(0, shape[1], tshape)
        if ignore:
            t[rng.random(tshape) < 0.2] = -100
    return x, t, rng


# shapes: one partial block, several blocks with a ragged last one, K-dim with S below/above a block
SHAPES = [(5, 3), (NB3 * 3 + 7, 3), (2 * NB3 + 1, 40), (3, 4, 17), (2, 3, 5, NBK3 // 2 + 3),
          (2, 1, 33), (4, 40, 9, 3)]


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("soft", [False, True])
@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
def test_column_kernels_match_reference(shape, dtype, soft, reduction):
    x, t, rng = _case(shape, dtype, soft)
    w = rng.uniform(0.3, 2.0, shape[1]).astype(dtype)
    kw = dict(weight=w, reduction=reduction, label_smoothing=0.1)
    go = rng.standard_normal(np.shape(naive_cross_entropy(x, t, reduction="none")[0])) \
        if reduction == "none" else 1.3
    ref_loss, ref_grad = naive_cross_entropy(x.astype(np.float64), t, grad_output=go, **kw)
    with kernel_path("columns"):
        assert_close(nx.cross_entropy(x, t, **kw), ref_loss, dtype)
        loss, grad = nx.cross_entropy_with_grad(x, t, grad_output=go, **kw)
        assert_close(loss, ref_loss, dtype)
        assert_close(grad, ref_grad, dtype)
        crit = nx.CrossEntropyLoss(**kw)
        assert_close(crit(x, t), ref_loss, dtype)
        assert_close(crit.backward(go), ref_grad, dtype)
        # in place: the logits become their gradient
        xi = x.copy()
        _, gi = nx.cross_entropy_with_grad(xi, t, grad_output=go, out=xi, **kw)
        assert gi is xi
        assert_close(xi, ref_grad, dtype)


@pytest.mark.parametrize("path", ["rows", "columns"])
def test_fortran_ordered_few_classes(path):
    x, t, _ = _case((NB3 + 5, 3), np.float32, False)
    xf = np.asfortranarray(x)
    ref_loss, ref_grad = naive_cross_entropy(x.astype(np.float64), t, reduction="sum")
    with kernel_path(path):
        loss, grad = nx.cross_entropy_with_grad(xf, t, reduction="sum")
        lo2, g2 = nx.cross_entropy_with_grad(xf, t, reduction="sum", out=xf)
    assert_close(loss, ref_loss, np.float32)
    assert_close(grad, ref_grad, np.float32)
    assert g2 is xf
    assert_close(xf, ref_grad, np.float32)


@pytest.mark.parametrize("shape", [(NB3 + 9, 3), (2, 3, 40)])
def test_stats_and_ties_in_column_blocks(shape):
    x, t, _ = _case(shape, np.float32, False)
    x = np.round(x)  # many ties for the maximum
    with kernel_path("columns"):
        _, st = nx.cross_entropy(x, t, return_stats=True)
    xm = np.moveaxis(x, 1, -1).astype(np.float64)
    expected = (np.argmax(xm, axis=-1) == t) & (t != -100)
    np.testing.assert_array_equal(st.top1, expected)
    m = xm.max(-1)
    np.testing.assert_allclose(st.lse, m + np.log(np.exp(xm - m[..., None]).sum(-1)), rtol=1e-6,
                               atol=2e-6)


def test_nan_and_inf_rows_in_column_blocks():
    x, t, _ = _case((NB3 + 3, 4), np.float64, False, ignore=False)
    x[1, 2] = np.nan
    x[2, :] = -np.inf
    x[3, 0] = np.inf
    t[4] = -100
    x[4, 1] = np.nan  # an ignored row with NaN: loss 0, gradient NaN (PyTorch's autograd)
    ref_loss, ref_grad = naive_cross_entropy(x, t, reduction="none")
    with kernel_path("columns"):
        loss, grad = nx.cross_entropy_with_grad(x, t, reduction="none")
        total = nx.cross_entropy(x, t, reduction="sum")
    assert_close(loss, ref_loss, np.float64)
    assert_close(grad, ref_grad, np.float64)
    assert np.isnan(total) == np.isnan(np.sum(ref_loss))


@pytest.mark.parametrize("dtype", [np.float64, np.float32, np.float16])
@pytest.mark.parametrize("shape", [(NB3 + 7, 3), (NB3 + 5, 10), (2 * NB3, 4), (2, 7, 5, 9), (2, 5, 2 * NBK5 + 100)])
@pytest.mark.parametrize("softcap", [None, 30.0])
def test_forward_sums_as_the_fused_call(dtype, shape, softcap):
    """A forward with class-index targets and no label smoothing sums only the exponentials
    (`cols_sumexp`, by `exp_summand`, four classes per pass and the rest after), and takes the
    next K-dim block's maximum in the same loops when it has as many positions (K-dim: blocks of
    one length and of another, the last of each sample): its losses, maxima and lse are the
    fused call's (`cols_max`, `cols_sums` by `exp_nonpos`) bit for bit, with terms between the
    exp's clamp and the smallest normal result (where the two exps round differently), subnormal
    logits, infinities and NaN in the rows, and both match the reference."""
    rng = np.random.default_rng(21)
    x = (rng.standard_normal(shape) * 4).astype(np.float64)
    xr = np.moveaxis(x, 1, -1).reshape(-1, shape[1])  # a view: rows of classes whatever the layout
    far = -720.0 if dtype == np.float64 else -95.0  # below exp's normal range, above its clamp
    rows = np.arange(0, xr.shape[0], 3)
    xr[rows, rng.integers(0, shape[1], rows.size)] = xr[rows].max(axis=1) + far
    xr[1::5, 0] = -np.inf
    xr[2] = -np.inf  # every logit -inf: NaN
    xr[4, 1] = np.nan
    xr[6, -1] = np.inf
    x = x.astype(dtype)
    np.moveaxis(x, 1, -1).reshape(-1, shape[1])[7::11, 1] = np.finfo(dtype).smallest_subnormal
    t = rng.integers(0, shape[1], (shape[0],) + shape[2:])
    t.reshape(-1)[::9] = -100
    kw = dict(reduction="none", softcap=softcap,
              weight=rng.uniform(0.5, 2, shape[1]).astype(dtype) if shape[1] == 10 else None)
    ref_loss, _ = naive_cross_entropy(x.astype(np.float64), t, **kw)
    with kernel_path("columns"):
        loss, stats = nx.cross_entropy(x, t, return_stats=True, **kw)
        fused, fused_stats = nx.cross_entropy_with_grad(x, t, return_stats=True, **kw)[0::2]
    np.testing.assert_array_equal(loss, fused)
    np.testing.assert_array_equal(stats.lse, fused_stats.lse)
    np.testing.assert_array_equal(stats.top1, fused_stats.top1)
    assert_close(loss, ref_loss, dtype)


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_half_storage_in_column_blocks(dtype):
    if dtype == "bfloat16":
        ml_dtypes = pytest.importorskip("ml_dtypes")
        dt = np.dtype(ml_dtypes.bfloat16)
    else:
        dt = np.dtype(np.float16)
    x, t, _ = _case((NB3 + 3, 5), np.float32, False)
    xh = x.astype(dt)
    ref_loss, ref_grad = naive_cross_entropy(xh.astype(np.float64), t, reduction="mean")
    with kernel_path("columns"):
        loss, grad = nx.cross_entropy_with_grad(xh, t)
    assert grad.dtype == dt
    assert_close(loss, ref_loss, dt)  # float32 rounded once to the half type: within its eps
    assert_close(grad, ref_grad, dt)


def test_dispatch_thresholds():
    from numbaxent._api import use_columns

    assert use_columns((100, k.COLUMN_MAX_C, 1))
    assert not use_columns((100, k.COLUMN_MAX_C + 1, 1))
    assert use_columns((2, 1000, 2))  # K-dim rows are strided: always the column kernels
    assert use_columns((1, 1000, 7))  # 2-D Fortran-ordered input seen as (1, C, N)


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_long_rows_with_nan_and_inf_in_row_kernels(dtype):
    # long rows (more than one vector register's worth, and an odd tail for the vectorised max), with
    # NaN and infinities in the middle and the tail
    C = 549
    x, t, _ = _case((6, C), dtype, False, seed=3, ignore=False)
    x[0, 5] = np.nan
    x[1, C - 3] = np.nan  # in the tail
    x[2, :] = -np.inf
    x[3, 300] = np.inf
    x[4, C - 1] = 1000.0  # the maximum in the last element: a wrong max would overflow exp
    t[5] = -100
    ref_loss, ref_grad = naive_cross_entropy(x.astype(np.float64), t, reduction="none")
    with kernel_path("rows"):
        loss, grad = nx.cross_entropy_with_grad(x, t, reduction="none")
        xi = x.copy()
        nx.cross_entropy_with_grad(xi, t, reduction="none", out=xi)
        _, st = nx.cross_entropy(x, t, reduction="none", return_stats=True)
    assert_close(loss, ref_loss, dtype)
    assert_close(grad, ref_grad, dtype)
    assert_close(xi, ref_grad, dtype)
    assert st.top1[4] == (t[4] == C - 1)


@pytest.fixture(scope="module")
def transpose_roundtrip():
    """A Numba driver of the 2-D blocks' transpositions: rows `n0 .. n0+nb` of `X` into the
    (C, nb) scratch `cols`, then back into the rows of `back`."""
    import numba

    from numbaxent import _columns

    @numba.njit
    def run(X, n0, nb, cols, back, in_registers):
        C = X.shape[1]
        _columns._transpose_in(X, n0, nb, C, cols, in_registers)
        _columns._transpose_out(cols, n0, nb, C, back, in_registers)
    return run


@pytest.mark.smoke  # (LLVM IR of numbaxent's own: also on the lower-bound numba/llvmlite pins)
@pytest.mark.parametrize("dtype", ["float32", "float64", "uint16", "int16"])  # (the 16-bit storage types)
def test_in_register_transposition_is_numpys(transpose_roundtrip, dtype):
    """`_math.transpose_group` / `untranspose_group` (whole groups of rows) and the element loops
    (the ragged rest) against NumPy's transpose, for every class count they take, at an offset."""
    from numbaxent import _math

    most = _math.shuffle_max_classes(dtype)
    assert most > 0
    rng = np.random.default_rng(most)
    for C in range(1, most + 1):
        X = rng.integers(0, 2**15, (70, C)).astype(dtype)
        for n0, nb in ((0, 64), (3, 61), (5, 7)):
            cols = np.full((C, 67), 7, dtype)
            back = np.full_like(X, 9)
            transpose_roundtrip(X, n0, nb, cols, back, True)
            np.testing.assert_array_equal(cols[:, :nb], X[n0:n0 + nb].T, err_msg=f"C={C} n0={n0}")
            assert (cols[:, nb:] == 7).all()
            np.testing.assert_array_equal(back[n0:n0 + nb], X[n0:n0 + nb], err_msg=f"C={C} n0={n0}")
            assert (back[:n0] == 9).all() and (back[n0 + nb:] == 9).all()
