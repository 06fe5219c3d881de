"""numbaxent.torch against torch.nn.functional.cross_entropy: values, .grad, and a training loop."""
from __future__ import annotations

import itertools

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="PyTorch not installed: the drop-in needs it")
import torch.nn.functional as F  # noqa: E402

import numbaxent.torch as nt  # noqa: E402

TOL = {torch.float64: dict(rtol=1e-10, atol=1e-12), torch.float32: dict(rtol=2e-5, atol=2e-6)}


def both(x, t, go=None, **kw):
    out = []
    for fn in (nt.cross_entropy, F.cross_entropy):
        xi = x.detach().clone().requires_grad_()
        loss = fn(xi, t, **kw)
        (loss * (torch.ones_like(loss) if go is None else go)).sum().backward()
        out.append((loss.detach(), xi.grad))
    return out


@pytest.mark.parametrize("dtype,shape,soft,reduction,eps,use_w", list(itertools.product(
    [torch.float32, torch.float64], [(6,), (8, 6), (3, 6, 4), (2, 6, 2, 3)], [False, True],
    ["none", "mean", "sum"], [0.0, 0.1], [False, True])))
def test_values_and_grads_match_torch(dtype, shape, soft, reduction, eps, use_w):
    g = torch.Generator().manual_seed(hash((shape, soft, reduction, eps, use_w)) % 2**31)
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
    loss = nt.cross_entropy(x, t)
    with pytest.raises(RuntimeError, match="does not support double backward"):
        torch.autograd.grad(loss, x, create_graph=True)
    (g,) = torch.autograd.grad(nt.cross_entropy(x, t), x)  # a plain backward still works
    assert g.shape == x.shape


def test_bfloat16_and_half():
    pytest.importorskip("ml_dtypes")
    x = torch.randn(16, 9)
    t = torch.randint(0, 9, (16,))
    for dt in (torch.bfloat16, torch.float16):
        (l1, g1), (l2, g2) = both(x.to(dt), t, reduction="sum")
        assert l1.dtype == dt and g1.dtype == dt
        torch.testing.assert_close(l1.float(), l2.float(), rtol=1e-2, atol=1e-2)
        torch.testing.assert_close(g1.float(), g2.float(), rtol=2e-2, atol=1e-2)
