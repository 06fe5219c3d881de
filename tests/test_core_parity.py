"""numbaxent vs PyTorch (golden file and live) and vs the independent float64 reference (tests/naive.py).

Tolerances come from the dtype: ``|actual - expected| <= k * eps * (|expected| + scale)`` with
``eps`` the dtype's machine epsilon, ``scale`` the largest finite ``|expected|`` of the array (at
least 1) and ``k`` in :data:`EPS_UNITS` (PyTorch and numbaxent sum in different orders; the largest
differences measured against PyTorch 2.13 were about 50 eps for float64, 4 for float32 and 2 for the
half types, whose results are rounded once from float32). NaN positions, and the positions and
signs of infinities, must match exactly.
"""
from __future__ import annotations

import json
import os

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import numbaxent as nx
from conftest import kernel_path
from naive import naive_cross_entropy

GOLDEN = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "golden_torch.npz")
EPS_UNITS = {"float64": 256, "float32": 32, "float16": 4, "bfloat16": 4}
EPS = {"float64": float(np.finfo(np.float64).eps), "float32": float(np.finfo(np.float32).eps),
       "float16": float(np.finfo(np.float16).eps), "bfloat16": 2.0 ** -7}


def dtype_name(dtype) -> str:
    return dtype if isinstance(dtype, str) else np.dtype(dtype).name


def tolerance(dtype) -> float:
    """``k * eps`` for a dtype (a NumPy dtype, or a name such as 'bfloat16')."""
    name = dtype_name(dtype)
    return EPS_UNITS[name] * EPS[name]


def assert_close(actual, expected, dtype, units=None):
    """Equal NaN and infinity patterns; finite values within the dtype's tolerance (``units`` eps
    instead of :data:`EPS_UNITS` when given)."""
    actual = np.asarray(actual, dtype=np.float64)
    expected = np.asarray(expected, dtype=np.float64)
    assert actual.shape == expected.shape
    np.testing.assert_array_equal(np.isnan(actual), np.isnan(expected))
    np.testing.assert_array_equal(np.isposinf(actual), np.isposinf(expected))
    np.testing.assert_array_equal(np.isneginf(actual), np.isneginf(expected))
    finite = np.isfinite(expected)
    if not finite.any():
        return
    tol = tolerance(dtype) if units is None else units * EPS[dtype_name(dtype)]
    scale = max(1.0, float(np.abs(expected[finite]).max()))
    np.testing.assert_allclose(actual[finite], expected[finite], rtol=tol, atol=tol * scale)


def _golden():
    data = np.load(GOLDEN)
    meta = json.loads(str(data["index"]))
    out = []
    # the smoke subset (pytest -m smoke): a weighted, smoothed mean case per dtype and target kind,
    # 2-D (run through both kernel paths), and a float32 class-index K-dim one
    smoke = set()
    for i, opts in enumerate(meta["cases"]):
        case = {k.split("/", 1)[1]: data[k] for k in data.files if k.startswith(f"{i}/")}
        key = (opts["dtype"], case["t"].shape == case["x"].shape, case["x"].ndim)
        marks = ()
        if (opts["tag"] == "grid" and opts["reduction"] == "mean" and opts["label_smoothing"] == 0.1
                and "weight" in case and (key[2] == 2 or key == ("float32", False, 3))
                and key not in smoke):
            smoke.add(key)
            marks = pytest.mark.smoke
        out.append(pytest.param(opts, case, marks=marks,
                                id=f"{i}-{opts['tag']}-{opts['dtype']}-{opts['reduction']}"))
    return out


GOLDEN_CASES = _golden()


def _as_case_dtype(a, dtype):
    """Golden arrays in the case's dtype (bfloat16 is stored as the float32 values it holds)."""
    if a is None or dtype != "bfloat16" or a.dtype.kind != "f":
        return a
    ml_dtypes = pytest.importorskip("ml_dtypes", reason="bfloat16 needs ml_dtypes")
    return a.astype(ml_dtypes.bfloat16)


@pytest.mark.parametrize("opts,case", GOLDEN_CASES)
def test_matches_torch_golden(opts, case):
    """PyTorch's values through every entry point and, for 2-D input, through both kernel paths
    (rows, columns), Fortran-ordered and in place (``out=input``); K-dim and unbatched inputs take
    their own path. The golden file has C = 5 (column kernels), C = 50 (row kernels) and K-dim
    cases with 4 and 20 positions."""
    dtype = opts["dtype"]
    x = _as_case_dtype(case["x"], dtype)
    t = _as_case_dtype(case["t"], dtype)
    kw = dict(weight=_as_case_dtype(case.get("weight"), dtype), ignore_index=opts["ignore_index"],
              reduction=opts["reduction"], label_smoothing=opts["label_smoothing"])
    go = case["grad_output"]
    go = go if opts["reduction"] == "none" else go[()]
    paths = ("rows", "columns") if x.ndim == 2 else (None,)
    for path in paths:
        with kernel_path(path):
            loss, grad = nx.cross_entropy_with_grad(x, t, grad_output=go, **kw)
            assert np.asarray(loss).dtype == x.dtype and grad.dtype == x.dtype
            assert np.shape(loss) == case["loss"].shape and grad.shape == x.shape
            assert_close(loss, case["loss"], dtype)
            assert_close(grad, case["grad"], dtype)
            assert_close(nx.cross_entropy(x, t, **kw), case["loss"], dtype)
            crit = nx.CrossEntropyLoss(**kw)
            assert_close(crit(x, t), case["loss"], dtype)
            assert_close(crit.backward(go), case["grad"], dtype)
            xi = x.copy()
            loss_i, _ = nx.cross_entropy_with_grad(xi, t, grad_output=go, out=xi, **kw)
            assert_close(loss_i, case["loss"], dtype)
            assert_close(xi, case["grad"], dtype)
    if x.ndim == 2:  # Fortran-ordered 2-D input is read as (1, C, N) by the column kernels
        xf = np.asfortranarray(x)
        loss, grad = nx.cross_entropy_with_grad(xf, t, grad_output=go, **kw)
        assert grad.flags.f_contiguous
        assert_close(loss, case["loss"], dtype)
        assert_close(grad, case["grad"], dtype)


# -- against the independent reference, on generated cases ---------------------------------------------
@st.composite
def problems(draw):
    dtype = draw(st.sampled_from([np.float64, np.float32]))
    c = draw(st.integers(1, 9))
    rank = draw(st.sampled_from([1, 2, 3, 4]))
    n = draw(st.integers(0, 6)) if rank > 1 else None
    spatial = tuple(draw(st.lists(st.integers(1, 3), min_size=rank - 2, max_size=rank - 2))) \
        if rank > 2 else ()
    shape = (c,) if rank == 1 else (n, c) + spatial
    seed = draw(st.integers(0, 2**32 - 1))
    rng = np.random.default_rng(seed)
    x = (rng.standard_normal(shape) * draw(st.sampled_from([0.5, 3.0, 30.0]))).astype(dtype)
    soft = draw(st.booleans())
    if soft:
        t = rng.random(shape).astype(dtype)
        ignore_index = -100
    else:
        tshape = () if rank == 1 else (n,) + spatial
        ignore_index = draw(st.sampled_from([-100, 0, c]))
        tdtype = np.dtype(draw(st.sampled_from([np.int64, np.int32, np.int8, np.uint8, np.int16])))
        if ignore_index < 0 and tdtype.kind == "u":  # -100 is not representable
            tdtype = np.dtype(np.int64)
        t = rng.integers(0, c, tshape)
        if rank > 1:
            t = np.where(rng.random(tshape) < 0.3, ignore_index, t)
        t = t.astype(tdtype)
    weight = rng.uniform(0.1, 3.0, c).astype(dtype) if draw(st.booleans()) else None
    reduction = draw(st.sampled_from(["none", "mean", "sum"]))
    eps = draw(st.sampled_from([0.0, 0.05, 0.5, 1.0]))
    return x, t, dict(weight=weight, ignore_index=ignore_index, reduction=reduction,
                      label_smoothing=eps)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(problems(), st.sampled_from([None, "rows", "columns"]))
def test_matches_naive_reference(problem, path):
    x, t, kw = problem
    rng = np.random.default_rng(0)
    loss_shape = np.shape(naive_cross_entropy(x, t, **{**kw, "reduction": "none"})[0])
    go = rng.standard_normal(loss_shape) if kw["reduction"] == "none" else 1.7
    ref_loss, ref_grad = naive_cross_entropy(x, t, grad_output=go, **kw)
    with kernel_path(path):
        loss, grad = nx.cross_entropy_with_grad(x, t, grad_output=go, **kw)
    # the reference is float64 throughout; a float32 run is compared at float32 tolerance
    assert_close(loss, ref_loss, x.dtype)
    assert_close(grad, ref_grad, x.dtype)


# -- layouts, input kinds, dtypes ----------------------------------------------------------------------
@pytest.fixture
def batch():
    rng = np.random.default_rng(5)
    x = rng.standard_normal((7, 6)) * 2
    t = rng.integers(0, 6, 7)
    t[2] = -100
    return x, t


def test_fortran_ordered_and_strided_inputs(batch):
    x, t = batch
    ref = naive_cross_entropy(x, t, reduction="none", label_smoothing=0.1)
    for xv in (np.asfortranarray(x), np.repeat(x, 2, axis=1)[:, ::2], x[::-1][::-1]):
        loss, grad = nx.cross_entropy_with_grad(xv, t, reduction="none", label_smoothing=0.1)
        assert_close(loss, ref[0], np.float64)
        assert_close(grad, ref[1], np.float64)
    # K-dim, non-contiguous
    rng = np.random.default_rng(1)
    x4 = rng.standard_normal((2, 4, 3, 5)).transpose(0, 1, 3, 2)
    t4 = rng.integers(0, 4, (2, 5, 3))
    ref4 = naive_cross_entropy(x4, t4)
    loss, grad = nx.cross_entropy_with_grad(x4, t4)
    assert_close(loss, ref4[0], np.float64)
    assert_close(grad, ref4[1], np.float64)


def test_lists_and_memmaps(batch, tmp_path):
    x, t = batch
    ref = naive_cross_entropy(x, t)
    assert_close(nx.cross_entropy(x.tolist(), t.tolist()), ref[0], np.float64)
    path = tmp_path / "x.npy"
    np.save(path, x)
    mm = np.load(path, mmap_mode="r")
    loss, grad = nx.cross_entropy_with_grad(mm, t)
    assert_close(loss, ref[0], np.float64)
    assert_close(grad, ref[1], np.float64)


@pytest.mark.parametrize("tdtype", [np.int8, np.int16, np.int32, np.int64, np.uint8, np.uint16,
                                    np.uint32, np.uint64])
def test_any_integer_target_dtype(tdtype):
    rng = np.random.default_rng(2)
    x = rng.standard_normal((9, 5))
    t = rng.integers(0, 5, 9)
    ref = naive_cross_entropy(x, t, ignore_index=3)
    loss, grad = nx.cross_entropy_with_grad(x, t.astype(tdtype), ignore_index=3)
    assert_close(loss, ref[0], np.float64)
    assert_close(grad, ref[1], np.float64)
    # K-dim too (PyTorch rejects uint8 there; numbaxent accepts every integer dtype on every rank)
    x3 = rng.standard_normal((2, 5, 3))
    t3 = rng.integers(0, 5, (2, 3))
    assert_close(nx.cross_entropy(x3, t3.astype(tdtype)), naive_cross_entropy(x3, t3)[0],
                 np.float64)


def test_out_and_in_place(batch):
    x, t = batch
    ref = naive_cross_entropy(x, t, label_smoothing=0.2)
    out = np.full_like(x, 7.0)
    loss, grad = nx.cross_entropy_with_grad(x, t, label_smoothing=0.2, out=out)
    assert grad is out
    assert_close(grad, ref[1], np.float64)
    xi = x.copy()
    loss, grad = nx.cross_entropy_with_grad(xi, t, label_smoothing=0.2, out=xi)
    assert grad is xi
    assert_close(loss, ref[0], np.float64)
    assert_close(xi, ref[1], np.float64)
    # in place on a Fortran-ordered array, and on a K-dim array
    xf = np.asfortranarray(x)
    nx.cross_entropy_with_grad(xf, t, label_smoothing=0.2, out=xf)
    assert_close(xf, ref[1], np.float64)
    rng = np.random.default_rng(3)
    x3 = rng.standard_normal((2, 4, 5))
    t3 = rng.integers(0, 4, (2, 5))
    ref3 = naive_cross_entropy(x3, t3, reduction="sum")
    nx.cross_entropy_with_grad(x3, t3, reduction="sum", out=x3)
    assert_close(x3, ref3[1], np.float64)
    # CrossEntropyLoss.backward in place
    xc = x.copy()
    crit = nx.CrossEntropyLoss(label_smoothing=0.2)
    assert_close(crit(xc, t), ref[0], np.float64)
    crit.backward(out=xc)
    assert_close(xc, ref[1], np.float64)


def test_result_types_and_shapes():
    x = np.zeros((3, 4), np.float32)
    t = np.array([0, 1, 2])
    for red in ("mean", "sum"):
        loss = nx.cross_entropy(x, t, reduction=red)
        assert isinstance(loss, np.floating) and loss.dtype == np.float32 and np.ndim(loss) == 0
    loss = nx.cross_entropy(x, t, reduction="none")
    assert isinstance(loss, np.ndarray) and loss.shape == (3,) and loss.dtype == np.float32
    assert nx.cross_entropy(np.zeros(4), np.array(1), reduction="none").shape == ()


def test_float16_is_float32_rounded_once():
    rng = np.random.default_rng(4)
    x = rng.standard_normal((30, 8)).astype(np.float16)
    t = rng.integers(0, 8, 30)
    ref_loss, ref_grad = naive_cross_entropy(x.astype(np.float64), t, reduction="none")
    loss, grad = nx.cross_entropy_with_grad(x, t, reduction="none")
    assert loss.dtype == np.float16 and grad.dtype == np.float16
    assert_close(loss, ref_loss, np.float16)
    assert_close(grad, ref_grad, np.float16)
    # the true-class term is formed in float32 before rounding: a confident row keeps its gradient
    xc = np.array([[12.0, 0.0, 0.0]], np.float16)
    _, g = nx.cross_entropy_with_grad(xc, np.array([0]), reduction="sum")
    p = np.exp(-12.0) / (1 + 2 * np.exp(-12.0))
    # p_y - 1 = -1.2e-5 carries float32's absolute error (~1e-7), not float16's p_y == 1 -> 0
    assert g[0, 0] != 0 and abs(float(g[0, 0]) - (-2 * p)) < 2 * np.finfo(np.float32).eps


@pytest.mark.parametrize("dtype", [np.float64, np.float32, np.float16])
@pytest.mark.parametrize("soft", [False, True])
def test_in_place_on_long_rows_matches_reference(dtype, soft):
    # rows longer than the in-place writers' block (512), with a partial last block
    rng = np.random.default_rng(11)
    x = (rng.standard_normal((5, 1300)) * 3).astype(dtype)
    t = rng.random((5, 1300)).astype(dtype) if soft else rng.integers(0, 1300, 5)
    kw = dict(label_smoothing=0.1, weight=rng.uniform(0.5, 2, 1300), reduction="sum")
    ref_loss, ref_grad = naive_cross_entropy(x.astype(np.float64), t, **kw)
    xi = x.copy()
    loss, grad = nx.cross_entropy_with_grad(xi, t, out=xi, **kw)
    _, grad_out = nx.cross_entropy_with_grad(x, t, **kw)
    if dtype == np.float16:  # both recompute exp in the gradient pass: bit for bit
        np.testing.assert_array_equal(xi, grad_out)
    else:  # out of place keeps exp(x - m) from the sum pass: equal to rounding
        assert_close(xi, grad_out, dtype)
    if dtype == np.float16:
        assert_close(xi, ref_grad, np.float16)
    else:
        assert_close(loss, ref_loss, dtype)
        assert_close(xi, ref_grad, dtype)
