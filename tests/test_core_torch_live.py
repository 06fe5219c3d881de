"""Live parity against PyTorch when it is importable (CI installs torch==2.13.0 CPU)."""
from __future__ import annotations

import numpy as np
import pytest

import numbaxent as nx
from conftest import stable_seed
from test_core_parity import assert_close

# -- live PyTorch ---------------------------------------------------------------------------------------
torch = pytest.importorskip("torch", reason="PyTorch not installed: live parity tests skipped "
                                               "(the golden-file tests still check torch parity)")


def _torch_ce(x, t, go=None, **kw):
    xt = torch.tensor(x, requires_grad=True)
    w = kw.pop("weight", None)
    loss = torch.nn.functional.cross_entropy(xt, torch.tensor(t),
                                             weight=None if w is None else torch.tensor(w), **kw)
    g = torch.ones_like(loss) if go is None else torch.tensor(go, dtype=loss.dtype)
    (loss * g).sum().backward()
    return loss.detach().numpy(), xt.grad.numpy()


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("shape", [(11,), (13, 11), (3, 11, 7), (2, 11, 3, 4)])
@pytest.mark.parametrize("soft", [False, True])
def test_live_torch(dtype, shape, soft):
    rng = np.random.default_rng(stable_seed(shape, soft, np.dtype(dtype).name))
    x = (rng.standard_normal(shape) * 4).astype(dtype)
    c = 11
    w = rng.uniform(0.1, 2, c).astype(dtype)
    if soft:
        t = rng.random(shape).astype(dtype)
    else:
        tshape = () if len(shape) == 1 else (shape[0],) + shape[2:]
        t = rng.integers(0, c, tshape)
        if len(shape) > 1:
            t = np.where(rng.random(tshape) < 0.2, -100, t)
    for reduction in ("none", "mean", "sum"):
        for eps in (0.0, 0.3):
            kw = dict(weight=w, reduction=reduction, label_smoothing=eps)
            ref = _torch_ce(x, t, **kw)
            loss, grad = nx.cross_entropy_with_grad(x, t, **kw)
            assert_close(loss, ref[0], dtype)
            assert_close(grad, ref[1], dtype)


def test_live_torch_legacy_arguments_and_module():
    rng = np.random.default_rng(9)
    x = rng.standard_normal((6, 4))
    t = rng.integers(0, 4, 6)
    for sa, rd in [(None, False), (False, None), (True, True), (False, True)]:
        with pytest.warns(UserWarning, match="size_average and reduce"):
            tm = torch.nn.CrossEntropyLoss(size_average=sa, reduce=rd)
        with pytest.warns(UserWarning, match="size_average and reduce"):
            crit = nx.CrossEntropyLoss(size_average=sa, reduce=rd)
        assert crit.reduction == tm.reduction
        xt = torch.tensor(x, requires_grad=True)
        lt = tm(xt, torch.tensor(t))
        lt.sum().backward()
        assert_close(crit(x, t), lt.detach().numpy(), np.float64)
        assert_close(crit.backward(np.ones(np.shape(lt.detach().numpy()))
                                   if crit.reduction == "none" else None),
                     xt.grad.numpy(), np.float64)
