"""Edges: zero total weights, zero classes, byte order, one loss whatever the entry point, thread-count
invariance on every kernel path, the bounded workspace, and the LM head's ignored rows.

Expected values come from PyTorch (live, when installed; the golden file otherwise covers the same
zero-weight cases, see tests/make_golden.py) and from the float64 reference in tests/naive.py.
"""
from __future__ import annotations

import zlib

import numpy as np
import pytest

import numbaxent as nx
from conftest import kernel_path
from naive import naive_cross_entropy
from test_core_parity import assert_close


def stable_rng(*params) -> np.random.Generator:
    """A generator seeded from the parameters' text (``hash`` of a tuple with strings changes from
    one process to the next; crc32 does not)."""
    return np.random.default_rng(zlib.crc32(repr(params).encode()))


def nan_with_payload(dtype, payload: int, negative: bool = False):
    """A quiet NaN of `dtype` whose low mantissa bits hold `payload` (NumPy's `np.nan` has none): the
    kernels' exps take their power of two from such bits, so each NaN path must not depend on them."""
    info = np.finfo(dtype)
    ut = np.dtype(f"u{np.dtype(dtype).itemsize}")
    bits = (((1 << info.nexp) - 1) << info.nmant) | (1 << (info.nmant - 1)) | payload
    if negative:
        bits |= 1 << (info.bits - 1)
    return np.array(bits, ut).view(dtype)[()]


# -- zero total weight, zero classes (live PyTorch) --------------------------------------------------
W0_WEIGHTS = {"zero": [0.0, 0.0, 0.0, 0.0], "cancel": [1.0, -0.5, 0.0, 2.0],
              "zero_at_targets": [0.0, 1.0, 0.0, 3.0]}


def _w0_problem(wtag, layout, dtype):
    rng = stable_rng("w0", wtag, layout, dtype)
    if layout == "1d":
        x, t = rng.standard_normal(4), np.array(2)  # class 2 weighs 0 in every set
    elif layout == "kdim":
        x = rng.standard_normal((2, 4, 3))
        t = np.array([[0, 1, 2], [1, 2, 2]]) if wtag == "cancel" else np.array([[0, 2, 2],
                                                                               [2, 0, 0]])
    else:
        x = rng.standard_normal((5, 4)) * 2
        t = np.array([0, 1, 2, 1, 2]) if wtag == "cancel" else np.array([0, 2, 2, 0, 2])
        if layout == "2d_ignored":
            t[2] = -100
    return x.astype(dtype), t, np.array(W0_WEIGHTS[wtag], dtype)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("wtag", sorted(W0_WEIGHTS))
@pytest.mark.parametrize("layout", ["1d", "2d", "2d_ignored", "kdim"])
def test_zero_total_weight_matches_torch(dtype, wtag, layout):
    """'mean' with W = sum w[y] = 0: PyTorch divides its NLL and smoothing terms by W separately
    (NaN when their signs differ) and its gradient is NaN at the target, or everywhere with
    smoothing; ignored rows stay 0. Every entry point, both kernel paths, upstream 1, 0, -2."""
    torch = pytest.importorskip("torch")
    x, t, w = _w0_problem(wtag, layout, dtype)
    for eps in (0.0, 0.1, 1.0):
        for go in (1.0, 0.0, -2.0):
            xt = torch.tensor(x, requires_grad=True)
            ref = torch.nn.functional.cross_entropy(xt, torch.tensor(t), weight=torch.tensor(w),
                                                    label_smoothing=eps)
            (ref * go).backward()
            ref_loss, ref_grad = ref.detach().numpy(), xt.grad.numpy()
            for path in ("rows", "columns"):
                with kernel_path(path):
                    kw = dict(weight=w, label_smoothing=eps)
                    loss, grad = nx.cross_entropy_with_grad(x, t, grad_output=go, **kw)
                    assert_close(loss, ref_loss, dtype)
                    assert_close(grad, ref_grad, dtype)
                    assert_close(nx.cross_entropy(x, t, **kw), ref_loss, dtype)
                    crit = nx.CrossEntropyLoss(**kw)
                    assert_close(crit(x, t), ref_loss, dtype)
                    assert_close(crit.backward(go), ref_grad, dtype)


def test_zero_total_weight_torch_dropin():
    torch = pytest.importorskip("torch")
    import numbaxent.torch as nxt

    x, t, w = _w0_problem("cancel", "2d_ignored", np.float64)
    for eps in (0.0, 0.1):
        a = torch.tensor(x, requires_grad=True)
        b = torch.tensor(x, requires_grad=True)
        la = torch.nn.functional.cross_entropy(a, torch.tensor(t), weight=torch.tensor(w),
                                               label_smoothing=eps)
        lb = nxt.cross_entropy(b, torch.tensor(t), weight=torch.tensor(w), label_smoothing=eps)
        la.backward()
        lb.backward()
        assert_close(lb.detach().numpy(), la.detach().numpy(), np.float64)
        assert_close(b.grad.numpy(), a.grad.numpy(), np.float64)


@pytest.mark.parametrize("shape", [(3, 0), (2, 0, 3)])
def test_probability_targets_over_zero_classes(shape):
    torch = pytest.importorskip("torch")
    for dtype in (np.float32, np.float64):
        x = np.zeros(shape, dtype)
        for reduction in ("none", "mean", "sum"):
            ref = torch.nn.functional.cross_entropy(torch.tensor(x), torch.tensor(x),
                                                    reduction=reduction).numpy()
            assert_close(nx.cross_entropy(x, x, reduction=reduction), ref, dtype)
    assert np.isnan(nx.cross_entropy(np.zeros(shape), np.zeros(shape)))


# -- byte order ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("code", ["f2", "f4", "f8"])
def test_byte_swapped_logits_give_the_native_result(code):
    rng = stable_rng("byteorder", code)
    x = (rng.standard_normal((6, 5)) * 2).astype(code)
    t = np.array([0, 1, 2, 3, 4, -100])
    swapped = x.astype(x.dtype.newbyteorder())
    assert not swapped.dtype.isnative
    kw = dict(label_smoothing=0.1, weight=rng.uniform(0.5, 2, 5))
    loss, grad = nx.cross_entropy_with_grad(x, t, **kw)
    crit = nx.CrossEntropyLoss(**kw)
    crit(x, t)
    grad_b = crit.backward()  # a separate backward pass: equal to the fused one up to rounding
    for xs, xn in ((swapped, x), (np.asfortranarray(swapped), np.asfortranarray(x))):
        loss_s, grad_s = nx.cross_entropy_with_grad(xs, t, **kw)
        assert loss_s.tobytes() == nx.cross_entropy_with_grad(xn, t, **kw)[0].tobytes()
        np.testing.assert_array_equal(grad_s, nx.cross_entropy_with_grad(xn, t, **kw)[1])
        assert nx.cross_entropy(xs, t, **kw) == nx.cross_entropy(xn, t, **kw)
        crit = nx.CrossEntropyLoss(**kw)
        assert crit(xs, t) == nx.cross_entropy(xn, t, **kw)
        if xs is swapped:
            np.testing.assert_array_equal(crit.backward(), grad_b)
    # a byte-swapped out= (as a byte-swapped input's own dtype), also in place
    out = np.empty_like(swapped)
    nx.cross_entropy_with_grad(swapped, t, out=out, **kw)
    np.testing.assert_array_equal(out, grad)
    xi = swapped.copy()
    nx.cross_entropy_with_grad(xi, t, out=xi, **kw)
    np.testing.assert_array_equal(xi, grad)
    # K-dim and probability targets in either byte order
    xk = rng.standard_normal((2, 5, 3, 4)).astype(code)
    pk = rng.dirichlet(np.ones(5), (2, 3, 4)).transpose(0, 3, 1, 2).astype(code)
    ref = nx.cross_entropy_with_grad(xk, pk)
    got = nx.cross_entropy_with_grad(xk.astype(xk.dtype.newbyteorder()),
                                     pk.astype(pk.dtype.newbyteorder()))
    assert got[0] == ref[0]
    np.testing.assert_array_equal(got[1], ref[1])
    # the evaluator
    ev, ev_s = nx.Evaluator(5), nx.Evaluator(5)
    ev.update(x, t)
    ev_s.update(swapped, t.astype(">i8"))
    assert ev_s.result().to_dict() == ev.result().to_dict()


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_byte_swapped_inputs_to_the_lm_head(dtype):
    rng = stable_rng("byteorder-linear", np.dtype(dtype).name)
    h = rng.standard_normal((7, 6)).astype(dtype)
    w = rng.standard_normal((9, 6)).astype(dtype)
    t = rng.integers(0, 9, 7)
    ref = nx.linear_cross_entropy_with_grad(h, w, t, label_smoothing=0.1)
    got = nx.linear_cross_entropy_with_grad(h.astype(h.dtype.newbyteorder()),
                                            w.astype(w.dtype.newbyteorder()), t,
                                            label_smoothing=0.1)
    assert got[0] == ref[0]
    for a, b in zip(got[1:], ref[1:]):
        if b is not None:
            np.testing.assert_array_equal(a, b)


# -- one loss whatever the entry point -----------------------------------------------------------------
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("shape", [(300, 7), (64, 40), (50, 60), (5, 6, 40), (3, 9, 5, 4)])
def test_every_entry_point_gives_the_same_bits(dtype, shape):
    """cross_entropy ('sum', 'mean'), cross_entropy_with_grad, CrossEntropyLoss, return_stats and
    the torch drop-in reduce the same per-row losses in the same order."""
    rng = stable_rng("bits", np.dtype(dtype).name, shape)
    x = (rng.standard_normal(shape) * 3).astype(dtype)
    t = rng.integers(0, shape[1], (shape[0],) + shape[2:])
    t.reshape(-1)[::7] = -100
    try:
        import torch
        import numbaxent.torch as nxt
    except ImportError:
        torch = None
    for reduction in ("sum", "mean"):
        for eps in (0.0, 0.1):
            kw = dict(reduction=reduction, label_smoothing=eps,
                      weight=rng.uniform(0.5, 2, shape[1]).astype(dtype))
            values = [nx.cross_entropy(x, t, **kw),
                      nx.cross_entropy_with_grad(x, t, **kw)[0],
                      nx.CrossEntropyLoss(**kw)(x, t),
                      nx.cross_entropy(x, t, return_stats=True, **kw)[0],
                      nx.cross_entropy_with_grad(x, t, return_stats=True, **kw)[0]]
            if torch is not None:
                tw = dict(kw, weight=torch.tensor(kw["weight"]))
                values.append(nxt.cross_entropy(torch.tensor(x), torch.tensor(t), **tw).numpy())
            bits = {np.asarray(v, dtype).tobytes() for v in values}
            assert len(bits) == 1, (reduction, eps, [float(v) for v in values])


# -- thread-count invariance on every kernel path ------------------------------------------------------
@pytest.fixture
def forced_threads(monkeypatch):
    """Deal every call to ``n`` threads however small it is, and record the ranges each kernel got
    (so the test can see that the work really was split)."""
    from numbaxent import _kernels, _parallel

    calls = []

    def wrap(name):
        kernel = getattr(_kernels, name)

        def recorded(lo, hi, *args):
            calls.append((name, lo, hi))
            return kernel(lo, hi, *args)

        monkeypatch.setattr(_kernels, name, recorded)

    for name in ("index_kernel", "prob_kernel", "index_cols_kernel", "prob_cols_kernel"):
        wrap(name)
    monkeypatch.setattr(_parallel, "MIN_PARALLEL_ELEMENTS", 0)

    def use(n):
        monkeypatch.setattr(_parallel, "num_threads", lambda: n)
        calls.clear()

    return use, calls


@pytest.mark.parametrize("case", ["rows", "rows-soft", "columns", "columns-soft", "kdim",
                                  "fortran"])
def test_results_do_not_depend_on_the_thread_count(forced_threads, case):
    use, calls = forced_threads
    rng = stable_rng("threads", case)
    # enough column blocks to be dealt to three threads (672 rows each for C = 6; Fortran-ordered
    # input is K-dim (1, C, N), whose blocks are longer)
    from numbaxent import _kernels
    shape = {"kdim": (3, 6, 50), "fortran": (3 * _kernels.column_block_rows(6, 2) + 5, 6)}.get(
        case, (97, 50) if case.startswith("rows") else (2100, 6))
    x = rng.standard_normal(shape).astype(np.float32)
    if case == "fortran":
        x = np.asfortranarray(x)
    soft = case.endswith("soft")
    t = (rng.random(shape).astype(np.float32) if soft
         else rng.integers(0, shape[1], (shape[0],) + shape[2:]))
    path = "rows" if case.startswith("rows") else None
    kw = dict(label_smoothing=0.1, weight=rng.uniform(0.5, 2, shape[1]).astype(np.float32))
    results = {}
    with kernel_path(path):
        for n in (1, 2, 3):
            use(n)
            r = []
            for reduction in ("none", "sum", "mean"):
                r.append(nx.cross_entropy(x, t, reduction=reduction, **kw))
                r.extend(nx.cross_entropy_with_grad(x, t, reduction=reduction, **kw))
                crit = nx.CrossEntropyLoss(reduction=reduction, **kw)
                r.append(crit(x, t))
                r.append(crit.backward())
            results[n] = r
            splits = {(lo, hi) for _, lo, hi in calls}
            assert len(splits) == n, splits  # each call really was dealt to n ranges
    for n in (2, 3):
        for a, b in zip(results[n], results[1]):
            assert np.asarray(a).tobytes() == np.asarray(b).tobytes()
    # and the values are right
    ref_loss, ref_grad = naive_cross_entropy(np.asarray(x, np.float64), t, **kw)
    *_, loss, grad, _, _ = results[2]  # the last reduction's ('mean') cross_entropy_with_grad
    assert_close(loss, ref_loss, np.float32)
    assert_close(grad, ref_grad, np.float32)


# -- the target check: blocks of targets, dealt to threads ------------------------------------------
@pytest.mark.parametrize("weights", ["none", "class", "sample", "equal"])
@pytest.mark.parametrize("ignore_index", [-100, 3])
def test_target_check_over_blocks(forced_threads, weights, ignore_index):
    """`_prepare.index_targets` checks targets in fixed blocks (`_targets.TARGET_BLOCK`) dealt to
    threads, the evaluator's `check_targets` on one thread: the first bad target, the 'mean'
    denominator and the count of valid targets are those of a NumPy reference, whatever the
    thread count (the denominator to the bit) and whichever the entry point."""
    from numbaxent import _parallel, _prepare, _targets

    use, _ = forced_threads
    rng = stable_rng("targets", weights, ignore_index)
    C, n = 7, 3 * _targets.TARGET_BLOCK + 1234  # four blocks, the last one short
    t = rng.integers(0, C, n)
    t[rng.random(n) < 0.1] = ignore_index
    w = (rng.uniform(0.5, 2, C) if weights == "class" else np.full(C, 0.3 if weights == "equal"
                                                                     else 1.0)).astype(np.float32)
    sw = rng.uniform(0, 1, n) if weights == "sample" else np.ones(1)
    keep = t != ignore_index
    ref_w = np.sum(w[t[keep]].astype(np.float64) * (sw[keep] if weights == "sample" else 1.0))
    calls = []
    kernel = _prepare.kernels().check_target_blocks

    def recorded(lo, hi, *args):
        calls.append((lo, hi))
        return kernel(lo, hi, *args)

    got = {}
    for threads in (1, 2, 3):
        use(threads)
        calls.clear()
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(_prepare.kernels(), "check_target_blocks", recorded)
            _, denom, n_valid = _prepare.index_targets(t, w, sw, ignore_index, C)
        assert len(calls) == threads  # really dealt to that many threads
        assert n_valid == np.count_nonzero(keep)
        np.testing.assert_allclose(denom, ref_w, rtol=1e-12)
        if weights == "none":
            assert denom == np.count_nonzero(keep)
        got[threads] = denom
    assert got[1] == got[2] == got[3]
    assert _targets.check_targets(t, w, sw, ignore_index, C) == (-1, got[1], n_valid)
    # bad targets in the second and fourth blocks: the first one is named
    for first in (_targets.TARGET_BLOCK + 17, n - 1):
        bad = t.copy()
        bad[first] = C + 5
        bad[-1] = -7
        assert _targets.check_targets(bad, w, sw, ignore_index, C)[0] == first
        use(2)
        with pytest.raises(IndexError, match=f"Target {C + 5 if first < n - 1 else -7} is out"):
            _prepare.index_targets(bad, w, sw, ignore_index, C)
    assert _parallel.MIN_PARALLEL_ELEMENTS == 0  # (the fixture lets every call use threads)


# -- each row's maximum, taken in the sum pass over the row before it ---------------------------------
@pytest.mark.parametrize("cap", [None, 3.0])
@pytest.mark.parametrize("soft", [False, True])
@pytest.mark.parametrize("dtype", [np.float32, np.float64, np.float16])
def test_row_maxima_taken_a_row_ahead(forced_threads, dtype, soft, cap):
    """The row kernels find a row's maximum while they sum the exps of the row before it (an
    integer maximum and minimum of the floats' bits, `_rows.next_row_max`). Special values sit
    in the first and last rows of the thread ranges (12 rows: 4 per range at 3 threads, 6 at 2)
    and in between: NaN of either sign,
    rows of -inf, of negative NaNs only, of signed zeros, of negative logits only, +inf; NaNs with
    and without payload bits. Every result equals the float64 reference's (NaN patterns
    included) and does not depend on the split."""
    use, calls = forced_threads
    rng = stable_rng("ahead", dtype, soft, cap)
    C = 40
    x = rng.standard_normal((12, C))
    neg_nan = np.copysign(np.nan, -1.0)
    x[0, 5] = np.nan
    x[1, :] = -np.inf
    x[2, 7] = neg_nan
    x[3, :] = -0.0
    x[3, 4] = 0.0
    x[4, 9] = np.inf
    x[5, :] = neg_nan
    x[6, 3], x[6, 4] = np.nan, -np.inf
    x[7, 1] = 1e3
    x[8] = -np.abs(x[8]) - 1.0  # every logit negative
    x[11, 0] = np.nan
    x = x.astype(dtype)
    x[0, 5] = nan_with_payload(dtype, 0x155)
    x[2, 7] = nan_with_payload(dtype, 0x2A3, negative=True)
    x[6, 3] = nan_with_payload(dtype, 1)
    assert np.signbit(x[5, 0]) and np.isnan(x[5, 0]) and np.isnan(x[[0, 2, 6], [5, 7, 3]]).all()
    t = rng.random((12, C)).astype(dtype) if soft else rng.integers(0, C, 12)
    kw = dict(softcap=cap, label_smoothing=0.1)
    results = {}
    with kernel_path("rows"):
        for n in (1, 2, 3):
            use(n)
            r = [nx.cross_entropy(x, t, reduction="none", **kw)]
            r.extend(nx.cross_entropy_with_grad(x, t, reduction="sum", **kw))
            r.extend(nx.cross_entropy_with_grad(x, t, reduction="none", softcap=cap))  # (no smoothing)
            crit = nx.CrossEntropyLoss(reduction="none", **kw)
            r.append(crit(x, t))
            r.append(crit.backward(np.ones(12)))
            results[n] = r
            assert len({(lo, hi) for _, lo, hi in calls}) == n
    for n in (2, 3):
        for a, b in zip(results[n], results[1]):
            assert np.asarray(a).tobytes() == np.asarray(b).tobytes()
    xd = np.asarray(x, np.float64)
    ref_none, ref_grad = naive_cross_entropy(xd, t, reduction="none", **kw)
    ref_sum, ref_grad_sum = naive_cross_entropy(xd, t, reduction="sum", **kw)
    loss_none, loss_sum, grad_sum, loss_plain, grad_plain, loss_crit, grad_crit = results[2]
    ref_plain, ref_grad_plain = naive_cross_entropy(xd, t, reduction="none", softcap=cap)
    assert_close(loss_plain, ref_plain, dtype)
    assert_close(grad_plain, ref_grad_plain, dtype)
    assert_close(loss_none, ref_none, dtype)
    assert_close(loss_crit, ref_none, dtype)
    assert_close(grad_crit, ref_grad, dtype)
    assert_close(loss_sum, ref_sum, dtype)
    assert_close(grad_sum, ref_grad_sum, dtype)
    if not soft and cap is None:  # top-1 (ties to the lowest class), never where the lse is NaN
        with kernel_path("rows"):
            _, st = nx.cross_entropy(x, t, reduction="none", return_stats=True)
        with np.errstate(invalid="ignore"):
            m = xd.max(1, keepdims=True)
            lse = m[:, 0] + np.log(np.exp(xd - m).sum(1))
        np.testing.assert_array_equal(st.top1, (np.argmax(xd, 1) == t) & ~np.isnan(lse))
        assert_close(st.lse, lse, dtype)


# -- long rows, summed in chunks (a forward pass: `_rows.chunked_row_pass`) -------------------------
def _long_rows(dtype, ragged, rng):
    """12 rows of more than two chunks: `C = 3 chunks + 37` (a ragged first chunk of 37) or exactly
    3 chunks, with special values placed chunk by chunk (a row's maximum in its first or last
    chunk, chunks and rows of -inf, +inf, NaN of either sign, logits whose exps overflow unshifted,
    chunks far below the row's maximum)."""
    from numbaxent import _rows

    ch = _rows.ROW_CHUNK_BYTES // np.dtype(dtype).itemsize
    head = 37 if ragged else ch
    C = head + 2 * ch
    starts = [0, head, head + ch]  # chunk starts
    x = rng.standard_normal((12, C))
    x[1, :] = -np.inf
    x[1, -1] = 0.5  # one finite logit, in the last chunk
    x[2, starts[1]:starts[2]] = -np.inf  # a middle chunk of -inf
    x[3] -= 200.0
    x[3, 5] = 50.0  # the maximum in the first chunk, every other chunk far below it
    x[4, starts[2] + 3] = np.inf
    x[5, starts[1] + 7] = np.nan
    x[6, starts[2] - 1] = np.copysign(np.nan, -1.0)
    x[7, :] = -np.inf
    x[8] += 80.0  # exp(80) overflows float32: only shifted sums stay finite
    x[9, -1] = 12.0  # the maximum at the very end
    x[10, :head] = -np.inf  # the first chunk all -inf
    x[11] = -np.abs(x[11]) - 1.0
    x = x.astype(dtype)
    x[5, starts[1] + 9] = nan_with_payload(dtype, 0x1F1)
    x[6, starts[2] - 1] = nan_with_payload(dtype, 3, negative=True)  # (the row's only NaN)
    return x, C


@pytest.mark.parametrize("eps", [0.0, 0.1])
@pytest.mark.parametrize("cap", [None, 30.0])
@pytest.mark.parametrize("soft", [False, True])
@pytest.mark.parametrize("ragged", [True, False])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])  # (16-bit logits are not summed in chunks)
def test_long_rows_summed_in_chunks(forced_threads, monkeypatch, dtype, ragged, soft, cap, eps):
    """The forward pass over rows longer than two chunks shifts each chunk's exponentials by the
    chunk's own maximum and brings the sums to the row's maximum at the end (`_rows.chunked_row_pass`,
    `rescaled_sums`). Every loss, log-sum-exp, top-1 and the gradient of a backward pass from the
    saved maxima and log-sums equal the float64 reference (NaN and infinity patterns included),
    whatever the number of threads (each range's first row is read on its own). Label smoothing and
    soft-capping, which the API leaves to the whole-row pass (`chunk_variant`), are forced
    through the chunks here: the kernels take them."""
    from numbaxent import _kernels, _rows

    monkeypatch.setattr(_kernels, "chunk_variant", lambda dtype, C, mode, *options: _rows.chunk_variant(dtype, C, mode))

    use, calls = forced_threads
    rng = stable_rng("chunks", dtype, ragged, soft, cap, eps)
    x, C = _long_rows(dtype, ragged, rng)
    assert _rows.chunk_variant(dtype, C, _rows.FORWARD) == (None, True)
    assert _rows.chunk_variant(dtype, C, _rows.FORWARD, eps=0.1) == (True, None)
    assert _rows.chunk_variant(dtype, C, _rows.FORWARD, soft=True, eps=0.1) == (None, True)
    assert _rows.chunk_variant(dtype, C, _rows.FORWARD, cap=30.0) == (True, None)
    assert _rows.chunk_variant(dtype, C, _rows.FUSED) == (True, None)
    w = rng.uniform(0.5, 2.0, C)
    p = rng.random((12, C))
    t = (p / p.sum(1, keepdims=True)).astype(dtype) if soft else rng.integers(0, C, 12)  # (float16 losses stay finite)
    kw = dict(softcap=cap, label_smoothing=eps, weight=w)
    results = {}
    for n in (1, 2, 3):
        use(n)
        loss, st = nx.cross_entropy(x, t, reduction="none", return_stats=True, **kw)
        crit = nx.CrossEntropyLoss(reduction="none", **kw)
        r = [loss, st.lse, crit(x, t), crit.backward(np.ones(12))]
        if not soft:
            r.append(st.top1)
        results[n] = r
        assert len({(lo, hi) for _, lo, hi in calls}) >= n
    for n in (2, 3):
        for a, b in zip(results[n], results[1]):
            assert np.asarray(a).tobytes() == np.asarray(b).tobytes()
    xd = np.asarray(x, np.float64)
    ref, ref_grad = naive_cross_entropy(xd, t, reduction="none", **kw)
    loss, lse, loss_crit, grad_crit = results[1][:4]
    assert_close(loss, ref, dtype)
    assert_close(loss_crit, ref, dtype)
    assert_close(grad_crit, ref_grad, dtype)
    xc = np.tanh(xd / cap) * cap if cap else xd
    with np.errstate(invalid="ignore", over="ignore"):
        m = np.max(xc, 1, keepdims=True)
        ref_lse = m[:, 0] + np.log(np.exp(xc - m).sum(1))
    assert_close(lse, ref_lse, dtype)
    if not soft:
        np.testing.assert_array_equal(results[1][4], (np.argmax(xc, 1) == t) & ~np.isnan(ref_lse))


@pytest.mark.smoke  # (the chunked variant also on the lower-bound numba/llvmlite pins)
def test_which_forward_passes_go_by_chunks(monkeypatch):
    """The API sums long rows in chunks for the FORWARD pass of plain or weighted class-index targets
    and of probability targets, not with label smoothing on class indices or soft-capping, nor for
    the fused and backward passes or 16-bit logits (`_rows.chunk_variant`); the chunked losses match
    the float64 reference."""
    from numbaxent import _kernels, _rows

    seen = []

    def record(dtype, C, mode, *options):
        seen.append(_rows.chunk_variant(dtype, C, mode, *options) == (None, True))
        return _rows.chunk_variant(dtype, C, mode, *options)

    monkeypatch.setattr(_kernels, "chunk_variant", record)
    rng = stable_rng("which chunks")
    x = rng.standard_normal((4, 5000)).astype(np.float32)
    t = rng.integers(0, 5000, 4)
    p = rng.random((4, 5000)).astype(np.float32)
    calls = [lambda: nx.cross_entropy(x, t), lambda: nx.cross_entropy(x, t, weight=np.ones(5000)),
             lambda: nx.cross_entropy(x, p, label_smoothing=0.1), lambda: nx.cross_entropy(x, t, label_smoothing=0.1),
             lambda: nx.cross_entropy(x, t, softcap=30.0), lambda: nx.cross_entropy_with_grad(x, t),
             lambda: nx.cross_entropy(x.astype(np.float16), t), lambda: nx.cross_entropy(x[:, :3000], t % 3000)]
    results = [call() for call in calls]
    assert seen == [True, True, True, False, False, False, False, False]
    xd = x.astype(np.float64)
    assert_close(results[0], naive_cross_entropy(xd, t)[0], np.float32)
    assert_close(results[2], naive_cross_entropy(xd, p, label_smoothing=0.1)[0], np.float32)


# -- the workspace ---------------------------------------------------------------------------------------
def test_workspace_is_bounded(monkeypatch):
    from numbaxent import _api

    monkeypatch.setattr(_api, "WORKSPACE_MAX_BYTES", 4096)
    rng = stable_rng("workspace")
    for rows in (10, 100, 1000, 100):  # 1000 rows need ~17 KB: fresh arrays, not the workspace
        x = rng.standard_normal((rows, 5)).astype(np.float32)
        t = rng.integers(0, 5, rows)
        loss = nx.cross_entropy(x, t, reduction="sum")
        assert_close(loss, naive_cross_entropy(x.astype(np.float64), t, reduction="sum")[0],
                     np.float32)
        buf = getattr(_api._workspace, "buf", None)
        assert buf is None or buf.nbytes <= 4096


# -- the LM head: ignored rows are skipped (a documented difference) ---------------------------------
def test_lm_head_ignored_rows_never_reach_the_gradients():
    rng = stable_rng("lm-head-ignored")
    h = rng.standard_normal((6, 4))
    w = rng.standard_normal((7, 4))
    b = rng.standard_normal(7)
    t = np.array([1, -100, 3, 0, -100, 6])
    h_bad = h.copy()
    h_bad[1] = np.nan
    h_bad[4, 0] = np.inf
    kept = t != -100
    loss, gh, gw, gb = nx.linear_cross_entropy_with_grad(h_bad, w, t, b, label_smoothing=0.1)
    # the batch without the ignored rows, by the independent reference
    ref_loss, ref_glogits = naive_cross_entropy(h[kept] @ w.T + b, t[kept], label_smoothing=0.1)
    assert_close(loss, ref_loss, np.float64)
    assert_close(gw, ref_glogits.T @ h[kept], np.float64)
    assert_close(gb, ref_glogits.sum(0), np.float64)
    assert_close(gh[kept], ref_glogits @ w, np.float64)
    assert np.all(gh[~kept] == 0)
    torch = pytest.importorskip("torch")
    # PyTorch's unfused path, for the record: the same loss, an all-NaN grad_weight
    ht = torch.tensor(h_bad, requires_grad=True)
    wt = torch.tensor(w, requires_grad=True)
    lt = torch.nn.functional.cross_entropy(ht @ wt.T + torch.tensor(b), torch.tensor(t),
                                           label_smoothing=0.1)
    lt.backward()
    assert_close(loss, lt.detach().numpy(), np.float64)
    assert np.isnan(wt.grad.numpy()).all()


def test_read_only_small_arrays_reuse_the_writable_kernels():
    """A read-only grad_output, class weight or sample weight (a frozen array, a broadcast view)
    gives the same result as a writable one and reaches the kernels as a writable array: Numba
    would otherwise compile another variant of the kernel for it."""
    from numbaxent import _kernels

    rng = np.random.default_rng(11)
    x = rng.standard_normal((16, 60)).astype(np.float32)
    t = rng.integers(0, 60, 16)
    go, w, sw = rng.random(16), rng.uniform(0.5, 2, 60).astype(np.float32), rng.random(16)
    frozen = [a.copy() for a in (go, w, sw)]
    for a in frozen:
        a.flags.writeable = False
    ref = nx.cross_entropy_with_grad(x, t, weight=w, reduction="none", grad_output=go,
                                     sample_weight=sw)
    got = nx.cross_entropy_with_grad(x, t, weight=frozen[1], reduction="none",
                                     grad_output=frozen[0], sample_weight=frozen[2])
    np.testing.assert_array_equal(ref[0], got[0])
    np.testing.assert_array_equal(ref[1], got[1])
    from numba import types

    for sig in _kernels.index_kernel.signatures:
        assert not any(isinstance(a, types.Array) and not a.mutable for a in sig), sig
