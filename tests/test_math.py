"""The vectorisable math primitives (numbaxent._math) against NumPy's long-double results."""
from __future__ import annotations

import numba
import numpy as np
import pytest

from numbaxent._math import (as_2d, as_compute, clear, col_run, compute_scratch, empty, exp, exp_nonpos, exp_nonpos2,
                             exp_nonpos_bits, exp_summand, exp_summand2, exp_summand_bits, from_storage_bits, load, log,
                             max_int, max_skipnan, min_int, rows_flat, run_view, span, storage_bits, store)
from numbaxent._rows import bits_max_min, max_start, next_row_max


@numba.njit(fastmath={"reassoc", "contract"}, error_model="numpy")
def _apply(a, which, out):
    # the kernels' fast-math flags, in a loop (so the vectorised code path is what is tested)
    for i in range(a.shape[0]):
        if which == 0:
            out[i] = exp(a[i])
        elif which == 1:
            out[i] = exp_nonpos(a[i])
        elif which == 3:
            out[i] = exp_summand(a[i])
        elif which == 4:
            out[i] = exp_summand_bits(a[i])
        elif which == 5:
            out[i] = exp_nonpos_bits(a[i])
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


@numba.njit(fastmath={"reassoc", "contract"}, error_model="numpy")
def _row_sums(x):
    # each row's sum of exp_nonpos and of exp_summand, as the row kernels sum them (reassociated)
    s1 = np.zeros(x.shape[0], x.dtype)
    s2 = np.zeros(x.shape[0], x.dtype)
    for r in range(x.shape[0]):
        a = x.dtype.type(0)
        b = x.dtype.type(0)
        for j in range(x.shape[1]):
            a += exp_nonpos(x[r, j])
        for j in range(x.shape[1]):
            b += exp_summand(x[r, j])
        s1[r] = a
        s2[r] = b
    return s1, s2


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_exp_summand_is_exp_nonpos_where_normal_and_a_row_sum_cannot_tell(dtype):
    """`exp_summand` (the forward's exp-sum) gives `exp_nonpos`'s bits down to a few times the
    smallest normal number, a normal number below that further down (where `exp_nonpos` gives
    subnormals and 0), and the same row sums when every row holds a 0 (its maximum), whatever the
    terms far below."""
    rng = np.random.default_rng(3)
    lo = -110.0 if dtype == np.float32 else -760.0
    x = np.concatenate([rng.uniform(lo, 0, 20000), -np.exp(rng.uniform(-30, 3, 2000)),
                        [0.0, -0.0, -np.inf, np.nan, lo * 2]]).astype(dtype)
    e_nonpos, e_sum = np.empty_like(x), np.empty_like(x)
    _apply(x, 1, e_nonpos)
    _apply(x, 3, e_sum)
    tiny = np.finfo(dtype).tiny
    normal = e_nonpos >= 4 * tiny
    low = ~normal & ~np.isnan(x)
    assert normal.sum() > 15000 and low.sum() > 1000
    np.testing.assert_array_equal(e_sum[normal], e_nonpos[normal])
    assert np.all((e_sum[low] >= tiny) & (e_sum[low] <= 4 * tiny))
    assert np.isnan(e_sum[np.isnan(x)]).all()
    # rows of a 0 and terms from just below 0 to far below the normal range
    rows = np.concatenate([rng.uniform(lo * 1.5, 0, (300, 257)),
                           -rng.exponential(rng.uniform(1, 200, (300, 1)), (300, 257))]).astype(dtype)
    rows[np.arange(rows.shape[0]), rng.integers(0, rows.shape[1], rows.shape[0])] = 0
    rows[::7, 5] = -np.inf
    s1, s2 = _row_sums(rows)
    assert s1.tobytes() == s2.tobytes()


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("plain, bits", [(3, 4), (1, 5)], ids=["exp_summand", "exp_nonpos"])
def test_bits_variants_give_the_same_bits_for_every_number(dtype, plain, bits):
    """`exp_summand_bits` and `exp_nonpos_bits` (their power of two added to the exponent's bits)
    give `exp_summand`'s and `exp_nonpos`'s bits for every input but NaN: dense samples down past
    the clamp (`exp_nonpos`'s subnormal and zero results included), both zeros, -inf. For NaN they
    may give any value (the row kernels tell NaN rows apart on their own:
    `_math.summand_and_probe`)."""
    rng = np.random.default_rng(5)
    lo = -110.0 if dtype == np.float32 else -760.0
    x = np.concatenate([rng.uniform(lo, 0, 40000), -np.exp(rng.uniform(-40, 3, 4000)),
                        [0.0, -0.0, -np.inf, lo * 2, np.finfo(dtype).min]]).astype(dtype)
    e_plain, e_bits = np.empty_like(x), np.empty_like(x)
    _apply(x, plain, e_plain)
    _apply(x, bits, e_bits)
    if plain == 1:
        assert (e_plain < np.finfo(dtype).tiny).sum() > 1000  # the subnormal range and 0 are covered
    assert e_bits.tobytes() == e_plain.tobytes()


@numba.njit(fastmath={"reassoc", "contract"}, error_model="numpy")
def _apply_pairs(a, b, out_a, out_b, summand):
    for i in range(a.shape[0]):
        if summand:
            out_a[i], out_b[i] = exp_summand2(a[i], b[i])
        else:
            out_a[i], out_b[i] = exp_nonpos2(a[i], b[i])


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("summand", [False, True], ids=["exp_nonpos2", "exp_summand2"])
def test_paired_exps_are_the_single_ones_bit_for_bit(dtype, summand):
    """`exp_nonpos2` and `exp_summand2` (two evaluations interleaved) give `exp_nonpos`'s and
    `exp_summand`'s bits for each argument, NaN and the clamps included."""
    rng = np.random.default_rng(2)
    lo = -110.0 if dtype == np.float32 else -760.0
    special = np.array([0.0, -0.0, -np.inf, np.nan, lo * 2, lo], dtype=dtype)
    a = np.concatenate([rng.uniform(lo, 0, 3001), -np.exp(rng.uniform(-30, 3, 500)), special]).astype(dtype)
    b = rng.permutation(a)
    pa, pb, ra, rb = (np.empty_like(a) for _ in range(4))
    _apply_pairs(a, b, pa, pb, summand)
    _apply(a, 3 if summand else 1, ra)
    _apply(b, 3 if summand else 1, rb)
    assert pa.tobytes() == ra.tobytes() and pb.tobytes() == rb.tobytes()
    if not summand:
        assert _ulp_error(pa[np.isfinite(a)], a[np.isfinite(a)], np.exp, dtype).max() <= 1.0


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


@numba.njit(fastmath={"reassoc", "contract"}, error_model="numpy")
def _reduce_max(a):
    m = as_compute(-np.inf, a)
    for i in range(a.shape[0]):
        m = max_skipnan(m, a[i])
    return m


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_max_skipnan_skips_nan_as_the_row_maximum_needs(dtype):
    rng = np.random.default_rng(2)
    for n in (1, 7, 8, 33, 1000, 1003):  # vector bodies and scalar tails
        a = rng.standard_normal(n).astype(dtype)
        if n > 1:
            a[rng.choice(n - 1, size=min(3, n - 1), replace=False) + 1] = np.nan  # a[0] stays a number
        assert _reduce_max(a) == np.nanmax(a)
    a = np.array([1.0, -np.inf, np.inf, np.nan], dtype=dtype)
    assert _reduce_max(a) == np.inf


@numba.njit(error_model="numpy")
def _pairwise_min(a, b, out):
    for i in range(a.shape[0]):
        out[i] = min_int(a[i], b[i])


def test_min_int():
    rng = np.random.default_rng(3)
    a = rng.integers(-2**31, 2**31 - 1, 1000, dtype=np.int64).astype(np.int32)
    b = rng.integers(-2**31, 2**31 - 1, 1000, dtype=np.int64).astype(np.int32)
    out = np.empty_like(a)
    _pairwise_min(a, b, out)
    np.testing.assert_array_equal(out, np.minimum(a, b))


@numba.njit(error_model="numpy")
def _store_all(v, out):
    for i in range(v.shape[0]):
        store(out, i, v[i])


def test_half_precision_stores_round_as_numpy_and_ml_dtypes():
    # every float32 pattern class: normals, subnormals, ties in the dropped bits, overflow, inf, NaN
    rng = np.random.default_rng(4)
    bits = rng.integers(0, 2**32, 200000, dtype=np.uint64).astype(np.uint32)
    ties = (rng.integers(0, 2**16, 2000, dtype=np.uint64).astype(np.uint32) << 16) | 0x8000
    v = np.concatenate([bits.view(np.float32), ties.view(np.float32),
                        np.array([0.0, -0.0, np.inf, -np.inf, np.nan, 3.4e38, 65504.0, 65520.0,
                                  6e-8, 1e-45], np.float32)])
    with np.errstate(over="ignore"):
        expected_f16 = v.astype(np.float16)
    got = np.empty(v.shape, np.uint16)
    _store_all(v, got)
    ok = ~np.isnan(v)
    np.testing.assert_array_equal(got[ok], expected_f16.view(np.uint16)[ok])
    assert np.isnan(got.view(np.float16)[~ok]).all()
    ml_dtypes = pytest.importorskip("ml_dtypes")
    with np.errstate(invalid="ignore"):  # (ml_dtypes warns on the NaN inputs)
        expected_bf16 = v.astype(ml_dtypes.bfloat16)
    got = np.empty(v.shape, np.int16)
    _store_all(v, got)
    np.testing.assert_array_equal(got[ok], expected_bf16.view(np.int16)[ok])
    assert np.isnan(got.view(ml_dtypes.bfloat16).astype(np.float32)[~ok]).all()


@numba.njit
def _views(x2, x3, n0, nb, rows, cols):
    flat = rows_flat(x2, n0, nb)
    flat[0] = 99  # a view: the write reaches x2
    return flat, as_2d(x3, rows, cols)


@pytest.mark.parametrize("dtype", [np.float32, np.float64, np.uint16])
def test_rows_flat_and_as_2d_are_views_as_numpy_reshape_gives(dtype):
    x2 = np.arange(7 * 5).astype(dtype).reshape(7, 5)
    x3 = np.arange(4 * 3 * 6).astype(dtype).reshape(4, 3, 6)
    want_flat = x2[2:5].reshape(15).copy()
    want_flat[0] = 99
    flat, two = _views(x2, x3, 2, 3, 12, 6)
    np.testing.assert_array_equal(flat, want_flat)
    assert flat.flags.c_contiguous and flat.shape == (15,)
    assert x2[2, 0] == want_flat[0] and np.shares_memory(flat, x2)
    np.testing.assert_array_equal(two, x3.reshape(12, 6))
    assert two.strides == x3.reshape(12, 6).strides and np.shares_memory(two, x3)
    _, two = _views(x2, x3, 0, 7, 4, 18)
    np.testing.assert_array_equal(two, x3.reshape(4, 18))
    # a read-only input stays read-only
    x3.flags.writeable = False
    _, two = _views(x2, x3, 0, 1, 72, 1)
    assert not two.flags.writeable
    np.testing.assert_array_equal(two[:, 0], x3.reshape(-1))


@numba.njit(error_model="numpy")
def _lines(X, i, s0, n):
    a, b, c = run_view(X, i, s0, n), col_run(X, s0, i, n), span(X[i], s0, n)
    if n:  # views: written through to X
        a[0] = 200
        b[n - 1] = 201
    return a, b, c


@pytest.mark.parametrize("dtype", [np.float32, np.float64, np.uint16])
def test_line_views_are_the_views_numpy_basic_indexing_gives(dtype):
    """`_math.run_view(X, i, s0, n)` is `X[i, s0:s0 + n]`, `col_run(X, i0, j, n)` is
    `X[i0:i0 + n, j]` and `span(a, s0, n)` is `a[s0:s0 + n]` (indices in range): the same
    elements and strides, sharing the array's memory, for a C-contiguous array and strided ones."""
    base = np.arange(12 * 12).astype(dtype).reshape(12, 12)
    for X in (base, base[1:12:2, 2:11], base.T):
        k = min(X.shape)
        for i, s0, n in ((0, 0, k), (k - 1, 2, 3), (1, k - 1, 1), (2, 1, 0)):
            a, b, c = _lines(X, i, s0, n)
            np.testing.assert_array_equal(a, X[i, s0:s0 + n])
            np.testing.assert_array_equal(b, X[s0:s0 + n, i])
            np.testing.assert_array_equal(c, X[i, s0:s0 + n])
            assert a.strides == X[i, s0:s0 + n].strides and b.strides == X[s0:s0 + n, i].strides
            if n:
                assert X[i, s0] == 200 and X[s0 + n - 1, i] == 201
                assert all(np.shares_memory(v, X) for v in (a, b, c))


@numba.njit(error_model="numpy")
def _clear_row(a, i):
    clear(a[i])


@pytest.mark.parametrize("dtype", [np.int64, np.int32, np.float64, np.float32])
def test_clear_zeroes_exactly_the_array_it_is_given(dtype):
    """`_math.clear(a)` is `a[...] = 0` for a C-contiguous array: every element of the view is 0
    and nothing around it changes."""
    for shape in ((4, 7), (3, 2, 5), (2, 0)):
        a = np.arange(1, 1 + np.prod(shape)).astype(dtype).reshape(shape) * dtype(3) - dtype(100)
        want = a.copy()
        want[1] = 0
        _clear_row(a, 1)
        np.testing.assert_array_equal(a, want)


@numba.njit(error_model="numpy")
def _allocations(x, n, m):
    a = empty(n, np.int64)
    b = empty((m, n), x.dtype)
    c = empty((0, n), np.bool_)
    d = compute_scratch((n, m), x)
    e = compute_scratch(np.int32(n), x)
    for i in range(n):  # every element is writable memory of the array's own
        a[i] = i
        e[i] = i
        for j in range(m):
            b[j, i] = x[0]
            d[i, j] = x[0]
    return a, b, c, d, e


@pytest.mark.parametrize("dtype", [np.float32, np.float64, np.uint16])
def test_empty_and_compute_scratch_allocate_as_np_empty(dtype):
    """`_math.empty` (`np.empty` for the kernels' scratch) and `compute_scratch`: new C-contiguous
    arrays of the shape and dtype asked for (the compute type of the logits' storage for
    `compute_scratch`: float64 for float64, float32 for 16-bit storage), each its own memory."""
    x = np.ones(3, dtype)
    compute = np.float64 if dtype == np.float64 else np.float32
    for n, m in ((5, 3), (1, 1), (0, 4)):
        a, b, c, d, e = _allocations(x, n, m)
        for arr, shape, dt in ((a, (n,), np.int64), (b, (m, n), dtype), (c, (0, n), np.bool_),
                               (d, (n, m), compute), (e, (n,), compute)):
            assert arr.shape == shape and arr.dtype == dt and arr.flags.c_contiguous
            assert arr.flags.owndata or arr.base is not None  # a NumPy array over its own buffer
        np.testing.assert_array_equal(a, np.arange(n))
        np.testing.assert_array_equal(e, np.arange(n, dtype=compute))
        assert (b == x[0]).all() and (d == x[0]).all()
        assert not any(np.shares_memory(p, q) for i, p in enumerate((a, b, d, e))
                       for q in (a, b, d, e)[i + 1:])


@numba.njit(error_model="numpy")
def _bits(a, bits, back):
    for i in range(a.shape[0]):
        bits[i] = storage_bits(a[i])
        back[i] = from_storage_bits(bits[i], a)


@numba.njit(error_model="numpy")
def _max_by_bits(a):
    # as the row kernels take the next row's maximum in their sum loop
    k = max_start(a)
    for i in range(a.shape[0]):
        k = bits_max_min(k[0], k[1], a[i])
    return next_row_max(k, a, None)


@numba.njit(fastmath={"reassoc", "contract"}, error_model="numpy")
def _reduce_loaded_max(a):
    m = as_compute(-np.inf, a)
    for i in range(a.shape[0]):
        m = max_skipnan(m, load(a[i]))
    return m


def _storage_of(name):
    """(the logical dtype, its storage dtype in the kernels, its finfo) for a dtype name."""
    if name == "bfloat16":
        ml_dtypes = pytest.importorskip("ml_dtypes")
        return np.dtype(ml_dtypes.bfloat16), np.int16, ml_dtypes.finfo(ml_dtypes.bfloat16)
    dt = np.dtype(name)
    return dt, (np.uint16 if dt == np.float16 else dt), np.finfo(dt)


@pytest.mark.parametrize("name", ["float32", "float64", "float16", "bfloat16"])
def test_maximum_by_bits_is_the_float_maximum(name):
    """The row kernels take the next row's maximum from the largest and smallest of its stored
    elements' bits (`_rows.max_start`, `bits_max_min`, `next_row_max`; float16 and bfloat16 as
    int16, not widened): that must be the float maximum for every row -- signed zeros (+0.0 above
    -0.0), subnormals, infinities, rows of one sign or both, negative NaNs skipped (a row of them
    gives -inf, the start), a positive NaN giving NaN -- and `from_storage_bits` must give the
    element `storage_bits` came from, widened exactly as `load` widens it."""
    dtype, storage, info = _storage_of(name)
    compute = np.float64 if dtype == np.float64 else np.float32
    special = [-np.inf, -float(info.max), -1.5, -float(info.tiny), -float(info.smallest_subnormal), -0.0,
               0.0, float(info.smallest_subnormal), float(info.tiny), 1.0, float(info.max), np.inf]
    rng = np.random.default_rng(3)
    scale = 10.0 ** rng.integers(-30, 30, 500) if dtype.itemsize > 2 else 2.0 ** rng.integers(-20, 16, 500)
    with np.errstate(over="ignore"):
        values = np.concatenate([rng.standard_normal(500) * scale, special]).astype(dtype)
    logical = values.astype(compute)  # exact: every 16-bit value is a float32

    def stored(v):
        return np.ascontiguousarray(v).view(storage)

    ity = np.int64 if dtype == np.float64 else np.int32 if dtype == np.float32 else np.int16
    bits, back = np.empty(values.shape, ity), np.empty(values.shape, compute)
    _bits(stored(values), bits, back)
    assert bits.tobytes() == values.tobytes() and back.tobytes() == logical.tobytes()
    neg_nan = np.array([-np.nan], compute).astype(dtype)
    assert np.signbit(neg_nan.astype(compute)[0])
    rows = [values, values[logical < 0], values[logical > 0], values[logical <= 0]]
    rows += [np.array(r, compute).astype(dtype) for r in
             ([-0.0, -1.0], [-0.0, 0.0], [0.0, -0.0], [-0.0], [-np.inf], [-np.inf, -np.inf])]
    rows += [np.concatenate([neg_nan, values[logical < 0]]), np.concatenate([neg_nan, neg_nan])]
    rows += [rng.permutation(values)[:n] for n in (1, 2, 7, 33)]
    rows += [rng.permutation(values[logical < 0])[:n] for n in (1, 5, 40)]
    for row in rows:
        # the float maximum from -inf, NaN skipped, +0.0 above -0.0 (max_skipnan keeps whichever
        # zero came first; either gives the same exps)
        kept = [v for v in row.astype(compute).tolist() if v == v] + [-np.inf]
        expected = np.asarray(max(kept, key=lambda v: (v, not np.signbit(v))), compute)
        got = _max_by_bits(stored(row))
        assert np.asarray(got, compute).tobytes() == expected.tobytes(), row
        assert got == _reduce_loaded_max(stored(row))
    assert np.isnan(_max_by_bits(stored(np.array([1.0, np.nan, -2.0], compute).astype(dtype))))



@numba.njit(error_model="numpy")
def _pairwise_max(a, b, out):
    for i in range(a.shape[0]):
        out[i] = max_int(a[i], b[i])


@pytest.mark.parametrize("ity", [np.int32, np.int64])
def test_max_int(ity):
    rng = np.random.default_rng(4)
    info = np.iinfo(ity)
    a = rng.integers(info.min, info.max, 1000, dtype=ity)
    b = rng.integers(info.min, info.max, 1000, dtype=ity)
    out = np.empty_like(a)
    _pairwise_max(a, b, out)
    np.testing.assert_array_equal(out, np.maximum(a, b))


@pytest.mark.parametrize("fmt", ["_F64", "_F32"])
def test_exp_coefficients_are_what_the_fit_script_gives(capsys, fmt):
    """`_math._F64.q` and `_F32.q` must be the output of `benchmarks/exp_fit.py` (the
    coefficients' source; float32's are rounded to float32 where the IR is emitted)."""
    pytest.importorskip("mpmath")
    import importlib.util
    import pathlib

    from numbaxent import _math

    path = pathlib.Path(__file__).resolve().parents[1] / "benchmarks" / "exp_fit.py"
    spec = importlib.util.spec_from_file_location("exp_fit", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    q = getattr(_math, fmt).q
    assert mod.main(["--degree", str(len(q) - 1)]) == 0
    printed = capsys.readouterr().out.splitlines()[0]
    assert eval(printed) == q  # a tuple of float reprs
