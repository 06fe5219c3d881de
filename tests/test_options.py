"""The keyword-only options beyond PyTorch (z_loss, softcap, sample_weight, normalizer,
return_stats) against the independent reference and, when installed, torch autograd of the composed
formula."""
from __future__ import annotations

import itertools

import numpy as np
import pytest

import numbaxent as nx
from naive import naive_cross_entropy
from test_core_parity import assert_close

GRID = list(itertools.product([np.float64, np.float32], [(6, 7), (3, 7, 2)], [False, True],
                              ["none", "mean", "sum"], [0.0, 0.1], [0.0, 0.02], [None, 2.5],
                              [False, True], [None, 9.0]))
GRID = [g for g in GRID if g[-1] is None or g[3] == "mean"]  # normalizer is a 'mean' option


def _problem(dtype, shape, soft, use_sw, seed):
    rng = np.random.default_rng(seed)
    x = (rng.standard_normal(shape) * 3).astype(dtype)
    lshape = (shape[0],) + shape[2:]
    if soft:
        t = rng.random(shape).astype(dtype)
    else:
        t = rng.integers(0, shape[1], lshape)
        t.reshape(-1)[1] = -100
    sw = rng.uniform(0.2, 2.0, lshape) if use_sw else None
    w = rng.uniform(0.3, 2.0, shape[1]).astype(dtype)
    return x, t, sw, w, lshape, rng


@pytest.mark.parametrize("dtype,shape,soft,reduction,eps,z,cap,use_sw,norm", GRID)
def test_options_match_reference(dtype, shape, soft, reduction, eps, z, cap, use_sw, norm,
                                 each_kernel_path):
    x, t, sw, w, lshape, rng = _problem(dtype, shape, soft, use_sw, len(GRID))
    go = rng.standard_normal(lshape) if reduction == "none" else 0.8
    kw = dict(weight=w, reduction=reduction, label_smoothing=eps, z_loss=z, softcap=cap,
              sample_weight=sw, normalizer=norm)
    ref = naive_cross_entropy(x.astype(np.float64), t, grad_output=go, **kw)
    loss, grad = nx.cross_entropy_with_grad(x, t, grad_output=go, **kw)
    assert_close(loss, ref[0], dtype)
    assert_close(grad, ref[1], dtype)
    crit = nx.CrossEntropyLoss(weight=w, reduction=reduction, label_smoothing=eps, z_loss=z,
                               softcap=cap)
    assert_close(crit(x, t, sample_weight=sw, normalizer=norm), ref[0], dtype)
    assert_close(crit.backward(go), ref[1], dtype)


def test_options_match_torch_autograd():
    torch = pytest.importorskip("torch", reason="PyTorch not installed")
    F = torch.nn.functional
    rng = np.random.default_rng(0)
    x = rng.standard_normal((9, 6)) * 4
    t = rng.integers(0, 6, 9)
    t[2] = -100
    sw = rng.uniform(0.5, 1.5, 9)
    for z, cap, norm in itertools.product([0.0, 0.01], [None, 3.0], [None, 20.0]):
        xt = torch.tensor(x, requires_grad=True)
        xc = cap * torch.tanh(xt / cap) if cap else xt
        tt = torch.tensor(t)
        valid = (tt != -100).double()
        le = (F.cross_entropy(xc, tt, reduction="none", label_smoothing=0.1)
              + z * torch.logsumexp(xc, 1) ** 2 * valid) * torch.tensor(sw)
        den = norm if norm is not None else (torch.tensor(sw) * valid).sum()
        (le.sum() / den).backward()
        loss, grad = nx.cross_entropy_with_grad(x, t, label_smoothing=0.1, z_loss=z, softcap=cap,
                                                sample_weight=sw, normalizer=norm)
        assert_close(loss, (le.sum() / den).detach().numpy(), np.float64)
        assert_close(grad, xt.grad.numpy(), np.float64)


def test_normalizer_gives_full_batch_gradient_by_accumulation():
    rng = np.random.default_rng(1)
    x = rng.standard_normal((12, 5))
    t = rng.integers(0, 5, 12)
    t[[1, 7]] = -100
    full_loss, full_grad = nx.cross_entropy_with_grad(x, t, label_smoothing=0.2)
    total = np.count_nonzero(t != -100)
    parts = [nx.cross_entropy_with_grad(x[s], t[s], label_smoothing=0.2, normalizer=total)
             for s in (slice(0, 5), slice(5, 12))]
    assert_close(sum(p[0] for p in parts), full_loss, np.float64)
    assert_close(np.concatenate([p[1] for p in parts]), full_grad, np.float64)


def test_return_stats(each_kernel_path):
    rng = np.random.default_rng(2)
    x = rng.standard_normal((40, 7)).astype(np.float32)
    x[0] = [1, 5, 5, 0, 0, 0, 0]  # a tie: the lowest index wins
    t = rng.integers(0, 7, 40)
    t[0] = 2
    t[3] = -100
    loss, st = nx.cross_entropy(x, t, return_stats=True)
    x64 = x.astype(np.float64)
    m = x64.max(1)
    lse = m + np.log(np.exp(x64 - m[:, None]).sum(1))
    np.testing.assert_allclose(st.lse, lse, rtol=1e-6)
    expected = (np.argmax(x, axis=1) == t) & (t != -100)
    np.testing.assert_array_equal(st.top1, expected)
    assert not st.top1[0]
    assert st.accuracy == pytest.approx(expected.sum() / 39)
    loss2, grad, st2 = nx.cross_entropy_with_grad(x, t, return_stats=True)
    np.testing.assert_array_equal(st2.top1, st.top1)
    crit = nx.CrossEntropyLoss()
    crit(x, t)
    assert crit.stats.accuracy == st.accuracy
