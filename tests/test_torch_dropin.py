"""numbaxent.torch against torch.nn.functional.cross_entropy: values, .grad, and a training loop."""
from __future__ import annotations

import itertools
import zlib

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="PyTorch not installed: the drop-in needs it")
import torch.nn.functional as F  # noqa: E402

import numbaxent.torch as nt  # noqa: E402
from conftest import stable_seed  # noqa: E402
from test_core_parity import assert_close, tolerance  # noqa: E402

TOL = {torch.float64: dict(rtol=tolerance(np.float64), atol=tolerance(np.float64)),
       torch.float32: dict(rtol=tolerance(np.float32), atol=tolerance(np.float32))}


def both(x, t, go=None, **kw):
    """(loss, input grad) of each implementation; a floating (probability) target requires grad
    too and its gradient is compared here."""
    out = []
    for fn in (nt.cross_entropy, F.cross_entropy):
        xi = x.detach().clone().requires_grad_()
        ti = t.detach().clone().requires_grad_(t.is_floating_point())
        loss = fn(xi, ti, **kw)
        (loss * (torch.ones_like(loss) if go is None else go)).sum().backward()
        out.append((loss.detach(), xi.grad, ti.grad))
    (_, _, gt1), (_, _, gt2) = out
    if t.is_floating_point():
        assert gt1.dtype == gt2.dtype and gt1.shape == gt2.shape
        dt = x.dtype if x.dtype in TOL else torch.float32
        tol = TOL[dt] if x.dtype in TOL else dict(rtol=2e-2, atol=2e-2)
        torch.testing.assert_close(gt1.to(dt), gt2.to(dt), equal_nan=True, **tol)
    return [o[:2] for o in out]


@pytest.mark.parametrize("dtype,shape,soft,reduction,eps,use_w", list(itertools.product(
    [torch.float32, torch.float64], [(6,), (8, 6), (3, 6, 4), (2, 6, 2, 3)], [False, True],
    ["none", "mean", "sum"], [0.0, 0.1], [False, True])))
def test_values_and_grads_match_torch(dtype, shape, soft, reduction, eps, use_w):
    g = torch.Generator().manual_seed(stable_seed(shape, soft, reduction, eps, use_w))
    x = torch.randn(shape, generator=g, dtype=dtype) * 3
    if soft:
        t = torch.rand(shape, generator=g, dtype=dtype)
    else:
        tshape = () if len(shape) == 1 else (shape[0],) + shape[2:]
        t = torch.randint(0, 6, tshape, generator=g)
        if len(shape) > 1:
            t[(torch.rand(tshape, generator=g) < 0.2)] = -100
    w = torch.rand(6, generator=g, dtype=dtype) + 0.2 if use_w else None
    (l1, g1), (l2, g2) = both(x, t, weight=w, reduction=reduction, label_smoothing=eps)
    assert l1.dtype == l2.dtype and l1.shape == l2.shape and g1.dtype == g2.dtype
    torch.testing.assert_close(l1, l2, equal_nan=True, **TOL[dtype])
    torch.testing.assert_close(g1, g2, equal_nan=True, **TOL[dtype])


def test_module_and_legacy_arguments():
    x = torch.randn(5, 4, dtype=torch.float64)
    t = torch.tensor([0, 1, 2, 3, -100])
    for kw, tt in ((dict(), t), (dict(reduction="sum", label_smoothing=0.2), t),
                   (dict(ignore_index=1), torch.tensor([0, 1, 2, 3, 1]))):
        a, b = nt.CrossEntropyLoss(**kw), torch.nn.CrossEntropyLoss(**kw)
        torch.testing.assert_close(a(x, tt), b(x, tt))
    with pytest.warns(UserWarning, match="size_average"):
        a = nt.CrossEntropyLoss(reduce=False)
    assert a(x, t).shape == (5,)


def test_training_loop_follows_the_same_loss_curve():
    def run(criterion):
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(10, 32), torch.nn.ReLU(),
                                    torch.nn.Linear(32, 5))
        opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        g = torch.Generator().manual_seed(1)
        xs = torch.randn(20, 16, 10, generator=g)
        ys = torch.randint(0, 5, (20, 16), generator=g)
        curve = []
        for x, y in zip(xs, ys):
            opt.zero_grad()
            loss = criterion(model(x), y)
            loss.backward()
            opt.step()
            curve.append(loss.item())
        return np.array(curve)

    ours = run(nt.CrossEntropyLoss(label_smoothing=0.1))
    theirs = run(torch.nn.CrossEntropyLoss(label_smoothing=0.1))
    assert ours[-1] < ours[0]
    np.testing.assert_allclose(ours, theirs, rtol=1e-5, atol=1e-6)


def test_z_loss_and_softcap_pass_through():
    x = torch.randn(6, 5, dtype=torch.float64, requires_grad=True)
    t = torch.randint(0, 5, (6,))
    loss = nt.cross_entropy(x, t, z_loss=0.01, softcap=3.0)
    loss.backward()
    x2 = x.detach().clone().requires_grad_()
    xc = 3.0 * torch.tanh(x2 / 3.0)
    ref = F.cross_entropy(xc, t) + 0.01 * (torch.logsumexp(xc, 1) ** 2).mean()
    ref.backward()
    torch.testing.assert_close(loss, ref)
    torch.testing.assert_close(x.grad, x2.grad)


def test_errors():
    x = torch.randn(3, 4, requires_grad=True)
    t = torch.tensor([0, 1, 2])
    with pytest.raises(ValueError, match="CPU tensors only"):
        nt.cross_entropy(torch.empty(3, 4, device="meta"), t)
    with pytest.raises(TypeError, match="floating point"):
        nt.cross_entropy(torch.ones(3, 4, dtype=torch.int64), t)
    with pytest.raises(IndexError, match="Target 7 is out of bounds"):
        nt.cross_entropy(x, torch.tensor([0, 7, 1]))
    with pytest.raises(ValueError, match="gradient with respect to weight"):
        nt.cross_entropy(x, t, weight=torch.ones(4, requires_grad=True))


def test_bfloat16_and_half():
    pytest.importorskip("ml_dtypes")
    x = torch.randn(16, 9)
    t = torch.randint(0, 9, (16,))
    for dt in (torch.bfloat16, torch.float16):
        (l1, g1), (l2, g2) = both(x.to(dt), t, reduction="sum")
        assert l1.dtype == dt and g1.dtype == dt
        name = str(dt).split(".")[1]  # both round once to the half type: a few of its eps
        assert_close(l1.float().numpy(), l2.float().numpy(), name)
        assert_close(g1.float().numpy(), g2.float().numpy(), name)


def test_bfloat16_and_half_probability_targets():
    pytest.importorskip("ml_dtypes")
    g = torch.Generator().manual_seed(3)
    x = torch.randn(6, 5, generator=g)
    t = torch.rand(6, 5, generator=g)
    for dt in (torch.bfloat16, torch.float16):
        (l1, g1), (l2, g2) = both(x.to(dt), t.to(dt), reduction="sum")  # compares target grads
        assert_close(g1.float().numpy(), g2.float().numpy(), str(dt).split(".")[1])


def test_in_place_modification_is_detected():
    g = torch.Generator().manual_seed(4)
    w = torch.randn(4, 5, generator=g, dtype=torch.float64, requires_grad=True)
    h = w * 2  # a non-leaf: PyTorch allows in-place changes, and must then refuse the backward
    loss = nt.cross_entropy(h, torch.tensor([0, 1, 2, 3]))
    with torch.no_grad():
        h.add_(1.0)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()
    t = torch.rand(4, 5, generator=g, dtype=torch.float64, requires_grad=True)
    tt = t * 1.0
    loss = nt.cross_entropy(w, tt)
    with torch.no_grad():
        tt.mul_(2.0)  # the probability target is saved as well
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()


def test_retain_graph_backward_twice():
    g = torch.Generator().manual_seed(5)
    x = torch.randn(4, 5, generator=g, dtype=torch.float64, requires_grad=True)
    t = torch.rand(4, 5, generator=g, dtype=torch.float64, requires_grad=True)
    loss = nt.cross_entropy(x, t, label_smoothing=0.1)
    a = torch.autograd.grad(loss, (x, t), retain_graph=True)
    b = torch.autograd.grad(loss, (x, t))
    ref = torch.autograd.grad(F.cross_entropy(x, t, label_smoothing=0.1), (x, t))
    for u, v, r in zip(a, b, ref):
        torch.testing.assert_close(u, r, **TOL[torch.float64])
        torch.testing.assert_close(v, r, **TOL[torch.float64])


def _first_and_second(fn, x, t, go, vs, **kw):
    """Gradients (create_graph=True) of sum(go * loss) w.r.t. (x[, t]) and the gradient of
    sum_k <grad_k, v_k> w.r.t. the same inputs and go (Hessian-vector products)."""
    xi = x.detach().clone().requires_grad_()
    ti = t.detach().clone().requires_grad_(t.is_floating_point())
    gi = go.detach().clone().requires_grad_()
    ins = (xi, ti) if t.is_floating_point() else (xi,)
    first = torch.autograd.grad(fn(xi, ti, **kw), ins, gi, create_graph=True)
    second = torch.autograd.grad(sum((a * v).sum() for a, v in zip(first, vs)), ins + (gi,),
                                 allow_unused=True)
    return first, second


@pytest.mark.parametrize("shape,soft,reduction,eps,use_w", list(itertools.product(
    [(6,), (5, 6), (3, 6, 2)], [False, True], ["none", "mean", "sum"], [0.0, 0.2],
    [False, True])))
def test_double_backward_matches_torch(shape, soft, reduction, eps, use_w):
    seed = zlib.crc32(repr((shape, soft, reduction, eps, use_w)).encode())  # same on every run
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g, dtype=torch.float64) * 2
    if soft:
        t = torch.rand(shape, generator=g, dtype=torch.float64)
    else:
        tshape = () if len(shape) == 1 else (shape[0],) + shape[2:]
        t = torch.randint(0, 6, tshape, generator=g)
        if len(shape) > 1:
            t.view(-1)[0] = -100
    w = torch.rand(6, generator=g, dtype=torch.float64) + 0.2 if use_w else None
    lshape = () if reduction != "none" or len(shape) == 1 else (shape[0],) + shape[2:]
    go = torch.rand(lshape, generator=g, dtype=torch.float64) + 0.5
    vs = [torch.randn(shape, generator=g, dtype=torch.float64) for _ in range(2 if soft else 1)]
    kw = dict(weight=w, reduction=reduction, label_smoothing=eps)
    ours = _first_and_second(nt.cross_entropy, x, t, go, vs, **kw)
    theirs = _first_and_second(F.cross_entropy, x, t, go, vs, **kw)
    for a, b in zip(ours[0] + ours[1], theirs[0] + theirs[1]):
        torch.testing.assert_close(a, b, **TOL[torch.float64])


def test_double_backward_z_loss_and_softcap():
    g = torch.Generator().manual_seed(6)
    x = torch.randn(6, 5, generator=g, dtype=torch.float64) * 3
    t = torch.randint(0, 5, (6,), generator=g)
    t[1] = -100
    go = torch.tensor(0.7, dtype=torch.float64)
    vs = [torch.randn(6, 5, generator=g, dtype=torch.float64)]

    def composed(xi, ti):  # the same loss from PyTorch operations
        xc = 3.0 * torch.tanh(xi / 3.0)
        keep = ti != -100
        z_term = (torch.logsumexp(xc, 1)[keep] ** 2).sum() / keep.sum()
        return F.cross_entropy(xc, ti) + 0.01 * z_term

    ours = _first_and_second(nt.cross_entropy, x, t, go, vs, z_loss=0.01, softcap=3.0)
    theirs = _first_and_second(composed, x, t, go, vs)
    for a, b in zip(ours[0] + ours[1], theirs[0] + theirs[1]):
        torch.testing.assert_close(a, b, **TOL[torch.float64])
