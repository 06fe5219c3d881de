"""Fused linear + cross-entropy against an independent reference (float64 NumPy products and the
float64 cross-entropy of tests/naive.py, never numbaxent's own core) and against torch autograd when
installed."""
from __future__ import annotations

import itertools
import warnings

import numpy as np
import pytest

import numbaxent as nx
from numbaxent.linear import chunk_rows
from naive import naive_cross_entropy
from test_core_parity import assert_close

N, H, V = 37, 16, 50


def _problem(dtype, bias, seed, all_ignored_head=False):
    rng = np.random.default_rng(seed)
    h = rng.standard_normal((N, H)).astype(dtype)
    w = (rng.standard_normal((V, H)) * 0.3).astype(dtype)
    b = rng.standard_normal(V).astype(dtype) if bias else None
    t = rng.integers(0, V, N)
    t[[3, 10, 11]] = -100
    if all_ignored_head:
        t[:10] = -100  # whole chunks of ignored rows
    return h, w, b, t, rng


OPTS = [dict(), dict(label_smoothing=0.1), dict(class_weight="w"), dict(z_loss=0.01, softcap=4.0),
        dict(sample_weight="sw"), dict(normalizer=25.0)]


@pytest.mark.parametrize("dtype,reduction,bias,opts,chunk", [
    case for case in itertools.product([np.float64, np.float32], ["mean", "sum", "none"],
                                       [True, False], range(len(OPTS)), [None, 5, 8, 37, 100])
    if "normalizer" not in OPTS[case[3]] or case[1] == "mean"])  # normalizer: a 'mean' option
def test_matches_unfused(dtype, reduction, bias, opts, chunk):
    opts = dict(OPTS[opts])
    h, w, b, t, rng = _problem(dtype, bias, 7, all_ignored_head=chunk == 5)
    if opts.get("class_weight") == "w":
        opts["class_weight"] = rng.uniform(0.5, 2.0, V).astype(dtype)
    if opts.get("sample_weight") == "sw":
        opts["sample_weight"] = rng.uniform(0.5, 2.0, N)
    go = rng.standard_normal(N) if reduction == "none" else 1.3
    loss, gh, gw, gb = nx.linear_cross_entropy_with_grad(h, w, t, b, reduction=reduction,
                                                         chunk_size=chunk, grad_output=go, **opts)
    # the reference: float64 logits in full, the float64 naive cross-entropy and its dL/dlogits
    h64, w64 = h.astype(np.float64), w.astype(np.float64)
    logits = h64 @ w64.T + (b.astype(np.float64) if bias else 0)
    ref_kw = {("weight" if k == "class_weight" else k): v for k, v in opts.items()}
    ref_loss, G = naive_cross_entropy(logits, t, reduction=reduction, grad_output=go, **ref_kw)
    assert_close(loss, ref_loss, dtype)
    # the products accumulate over H (and N for grad_weight) in the input's precision
    units = 256 if dtype == np.float64 else 64
    assert_close(gh, G @ w64, dtype, units)
    assert_close(gw, G.T @ h64, dtype, units)
    if bias:
        assert_close(gb, G.sum(0), dtype, units)
    else:
        assert gb is None
    assert_close(nx.linear_cross_entropy(h, w, t, b, reduction=reduction, chunk_size=chunk,
                                         **opts), ref_loss, dtype)


def test_matches_torch_autograd():
    torch = pytest.importorskip("torch", reason="PyTorch not installed")
    F = torch.nn.functional
    h, w, b, t, rng = _problem(np.float64, True, 3)
    cw = rng.uniform(0.5, 2.0, V)
    for z, cap in ((0.0, None), (0.01, 3.0)):
        ht, wt, bt = (torch.tensor(a, requires_grad=True) for a in (h, w, b))
        logits = ht @ wt.T + bt
        lc = cap * torch.tanh(logits / cap) if cap else logits
        tt = torch.tensor(t)
        valid = (tt != -100).double()
        le = F.cross_entropy(lc, tt, weight=torch.tensor(cw), reduction="none",
                             label_smoothing=0.1) + z * torch.logsumexp(lc, 1) ** 2 * valid
        loss_t = le.sum() / (torch.tensor(cw)[tt.clamp(min=0)] * valid).sum()
        loss_t.backward()
        loss, gh, gw, gb = nx.linear_cross_entropy_with_grad(
            h, w, t, b, class_weight=cw, label_smoothing=0.1, z_loss=z, softcap=cap, chunk_size=6)
        assert_close(loss, loss_t.detach().numpy(), np.float64)
        for ours, theirs in ((gh, ht), (gw, wt), (gb, bt)):
            assert_close(ours, theirs.grad.numpy(), np.float64)


def test_leading_dims_all_ignored_and_stats():
    h, w, b, t, rng = _problem(np.float32, False, 5)
    h3, t3 = h[:36].reshape(4, 9, H), t[:36].reshape(4, 9)
    loss, gh, gw, gb = nx.linear_cross_entropy_with_grad(h3, w, t3, chunk_size=7)
    ref_loss, G = naive_cross_entropy(h[:36].astype(np.float64) @ w.T.astype(np.float64), t[:36])
    assert gh.shape == h3.shape
    assert_close(loss, ref_loss, np.float32)
    assert_close(gh.reshape(36, H), G @ w.astype(np.float64), np.float32)
    # every target ignored: mean is NaN, gradients are zero
    loss, gh, gw, gb = nx.linear_cross_entropy_with_grad(h, w, np.full(N, -100))
    assert np.isnan(loss) and not gh.any() and not gw.any()
    # stats: lse and top-1 from the same pass (NaN lse on skipped rows)
    loss, st = nx.linear_cross_entropy(h, w, t, return_stats=True, chunk_size=8)
    logits = h.astype(np.float64) @ w.T.astype(np.float64)
    m = logits.max(1)
    lse = m + np.log(np.exp(logits - m[:, None]).sum(1))
    kept = t != -100
    np.testing.assert_allclose(st.lse[kept], lse[kept], rtol=1e-5)
    assert np.isnan(st.lse[~kept]).all()
    np.testing.assert_array_equal(st.top1, (logits.argmax(1) == t) & kept)


def test_errors_and_chunk_rule():
    h, w, b, t, _ = _problem(np.float32, True, 1)
    with pytest.raises(TypeError, match="weight must have hidden's dtype"):
        nx.linear_cross_entropy(h, w.astype(np.float64), t)
    with pytest.raises(ValueError, match="same H"):
        nx.linear_cross_entropy(h, w[:, :5], t)
    with pytest.raises(ValueError, match="target must have"):
        nx.linear_cross_entropy(h, w, t[:5])
    with pytest.raises(IndexError, match="Target 50 is out of bounds"):
        nx.linear_cross_entropy(h, w, np.r_[t[:-1], 50])
    with pytest.raises(ValueError, match="chunk_size"):
        nx.linear_cross_entropy(h, w, t, chunk_size=0)
    assert chunk_rows(32000, 4, 4096) == 256
    assert chunk_rows(1000, 4, 10) == 10
    assert chunk_rows(10**7, 4, 4096) == 16


# -- upstream gradient and reduction, against live PyTorch ---------------------------------------
def _torch_linear_ce(h, w, b, t, reduction, grad_output=None, **opts):
    """PyTorch's unfused reference: `F.cross_entropy(h @ w.T + b, t, ...)` and the autograd
    gradients of `sum(grad_output * loss)` (grad_output=None: 1) w.r.t. h, w and b, as float64."""
    torch = pytest.importorskip("torch", reason="PyTorch not installed")
    ht, wt, bt = (None if a is None else torch.tensor(a, requires_grad=True) for a in (h, w, b))
    logits = ht @ wt.T + (0 if bt is None else bt)
    kw = {("weight" if k == "class_weight" else k): (torch.tensor(v) if k == "class_weight" else v)
          for k, v in opts.items()}
    loss = torch.nn.functional.cross_entropy(logits, torch.tensor(t), reduction=reduction, **kw)
    gout = None if grad_output is None else torch.tensor(grad_output, dtype=loss.dtype)
    loss.backward(gradient=gout)
    return (loss.detach().numpy(),) + tuple(None if a is None else a.grad.numpy()
                                            for a in (ht, wt, bt))


def _assert_matches_torch(ours, theirs):
    assert len(ours) == len(theirs)
    for a, e in zip(ours, theirs):
        if e is None:
            assert a is None
        else:
            assert_close(a, e, np.float64)


@pytest.mark.parametrize("reduction,grad_output", [
    ("mean", 0.0), ("mean", -2.0), ("sum", -2.0), ("sum", 0.0), ("mean", np.float32(-2.0)),
    ("mean", np.array(-2.0)), ("none", 0.0), ("none", -2.0), ("none", "per-row")])
def test_grad_output_values_match_torch(reduction, grad_output):
    h, w, b, t, rng = _problem(np.float64, True, 11)
    if isinstance(grad_output, str):
        grad_output = rng.standard_normal(N)
        grad_output[[0, 5]] = [0.0, -2.0]
    # torch's backward takes a gradient of the loss's shape: broadcast the scalar for 'none'
    g_torch = np.broadcast_to(np.float64(grad_output), (N,) if reduction == "none" else ())
    expected = _torch_linear_ce(h, w, b, t, reduction, g_torch, label_smoothing=0.1)
    for chunk in (None, 6):
        ours = nx.linear_cross_entropy_with_grad(h, w, t, b, reduction=reduction,
                                                 grad_output=grad_output, label_smoothing=0.1,
                                                 chunk_size=chunk)
        _assert_matches_torch(ours, expected)


def test_grad_output_per_row_leading_dims_match_torch():
    h, w, b, t, rng = _problem(np.float64, False, 12)
    h3, t3 = h[:36].reshape(4, 9, H), t[:36].reshape(4, 9)
    g = rng.standard_normal((4, 9))
    loss_t, gh_t, gw_t, _ = _torch_linear_ce(h[:36], w, None, t[:36], "none", g.reshape(-1))
    loss, gh, gw, gb = nx.linear_cross_entropy_with_grad(h3, w, t3, reduction="none",
                                                         grad_output=g, chunk_size=5)
    assert gb is None
    _assert_matches_torch((loss.reshape(-1), gh.reshape(36, H), gw), (loss_t, gh_t, gw_t))
    # a (9,) upstream gradient broadcasts over the leading dimension, as in the core
    loss, gh, gw, _ = nx.linear_cross_entropy_with_grad(h3, w, t3, reduction="none",
                                                        grad_output=g[0], chunk_size=5)
    _, gh_t, gw_t, _ = _torch_linear_ce(h[:36], w, None, t[:36], "none",
                                        np.broadcast_to(g[0], (4, 9)).reshape(-1))
    _assert_matches_torch((gh.reshape(36, H), gw), (gh_t, gw_t))


def _error(fn, *args, **kw):
    with pytest.raises(Exception) as info:
        fn(*args, **kw)
    return type(info.value), str(info.value)


@pytest.mark.parametrize("reduction,grad_output", [
    ("mean", np.ones(4)), ("sum", [1.0, 2.0]), ("mean", np.ones((1, 1)) * np.array([[1.0, 2.0]])),
    ("none", np.ones(3)), ("none", np.ones((2, N))), ("mean", np.array(1 + 2j)),
    ("none", np.array(["a"] * N))])
def test_bad_grad_output_is_refused_as_by_the_core(reduction, grad_output):
    torch = pytest.importorskip("torch", reason="PyTorch not installed")
    h, w, b, t, _ = _problem(np.float64, True, 13)
    ga = np.asarray(grad_output)
    if ga.dtype.kind in "iuf":  # PyTorch refuses a real upstream gradient not of the loss's shape
        logits = torch.tensor(h @ w.T, requires_grad=True)
        loss = torch.nn.functional.cross_entropy(logits, torch.tensor(t), reduction=reduction)
        with pytest.raises(RuntimeError, match="shape"):
            loss.backward(gradient=torch.tensor(ga.astype(np.float64)))
    # ours: the core's own exception and message (the message names the reduction or the shapes)
    core = _error(nx.cross_entropy_with_grad, h @ w.T + b, t, reduction=reduction,
                  grad_output=grad_output)
    assert core[0] in (TypeError, ValueError)
    assert _error(nx.linear_cross_entropy_with_grad, h, w, t, b, reduction=reduction,
                  grad_output=grad_output) == core


def _zero_total_weight_targets(seed):
    """Targets, class weights: every kept target's class weight is 0, or weights +-1.5 on two
    classes that each appear equally often among the kept targets (they cancel exactly)."""
    rng = np.random.default_rng(seed)
    t = rng.integers(0, V, N)
    t[[3, 10, 11]] = -100
    zero = rng.uniform(0.5, 2.0, V)
    zero[np.unique(t[t >= 0])] = 0.0
    t2 = np.where(np.arange(N) % 2 == 0, 7, 9)
    t2[[3, 10, 11, 12, 36]] = -100  # 16 rows of each class stay
    cancel = rng.uniform(0.5, 2.0, V)
    cancel[[7, 9]] = [1.5, -1.5]
    flipped = cancel.copy()  # a negative NLL sum next to a positive smoothing sum: NaN, not -inf
    flipped[[7, 9]] = [-1.5, 1.5]
    return [(t, zero), (t2, cancel), (t2, flipped)]


@pytest.mark.parametrize("eps", [0.0, 0.1])
@pytest.mark.parametrize("case", [0, 1, 2])
def test_weighted_mean_with_zero_total_weight_matches_torch(eps, case):
    h, w, b, _, _ = _problem(np.float64, True, 14)
    t, cw = _zero_total_weight_targets(15)[case]
    expected = _torch_linear_ce(h, w, b, t, "mean", class_weight=cw, label_smoothing=eps)
    # the gradient is NaN or infinite in every kept row: make sure the reference is degenerate
    assert not np.isfinite(expected[1][t != -100]).any()
    for chunk in (None, 5):
        with warnings.catch_warnings():  # NaN and inf as PyTorch gives them, without NumPy's warnings
            warnings.simplefilter("error", RuntimeWarning)
            ours = nx.linear_cross_entropy_with_grad(h, w, t, b, class_weight=cw, label_smoothing=eps,
                                                     chunk_size=chunk)
        _assert_matches_torch(ours, expected)
        assert_close(nx.linear_cross_entropy(h, w, t, b, class_weight=cw, label_smoothing=eps,
                                             chunk_size=chunk), expected[0], np.float64)
    # upstream gradient 0: 0 * inf is NaN in PyTorch too
    expected = _torch_linear_ce(h, w, b, t, "mean", 0.0, class_weight=cw, label_smoothing=eps)
    _assert_matches_torch(nx.linear_cross_entropy_with_grad(
        h, w, t, b, class_weight=cw, label_smoothing=eps, grad_output=0.0, chunk_size=5), expected)
