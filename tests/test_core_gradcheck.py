"""Central finite differences (float64) of sum(grad_output * loss) against the analytic gradient, for
every option of the core API, including z_loss, softcap and sample_weight."""
from __future__ import annotations

import itertools

import numpy as np
import pytest

import numbaxent as nx
from conftest import stable_seed
from naive import numeric_grad




GRID = list(itertools.product(
    [(3, 4), (2, 4, 3)],          # batched, K-dim
    [False, True],                # probability targets
    ["none", "mean", "sum"],
    [0.0, 0.2],                   # label smoothing
    [False, True],                # class weight
    [(0.0, None), (0.05, 2.0)],   # (z_loss, softcap)
    [False, True],                # sample_weight
))


# the smoke subset (pytest -m smoke): every option on
SMOKE = [((3, 4), False, "mean", 0.2, True, (0.05, 2.0), True)]


@pytest.mark.parametrize("shape,soft,reduction,eps,use_w,zc,use_sw",
                         [pytest.param(*g, marks=pytest.mark.smoke if g in SMOKE else ())
                          for g in GRID])
def test_finite_differences(shape, soft, reduction, eps, use_w, zc, use_sw):
    rng = np.random.default_rng(stable_seed(shape, soft, reduction, eps, use_w, zc, use_sw))
    c = shape[1]
    x = rng.standard_normal(shape) * 1.5
    loss_shape = (shape[0],) + shape[2:]
    if soft:
        t = rng.random(shape)
    else:
        t = rng.integers(0, c, loss_shape)
        t.reshape(-1)[0] = -100  # one ignored element
    kw = dict(weight=rng.uniform(0.3, 2.0, c) if use_w else None, reduction=reduction,
              label_smoothing=eps, z_loss=zc[0], softcap=zc[1],
              sample_weight=rng.uniform(0.5, 1.5, loss_shape) if use_sw else None)
    go = rng.standard_normal(loss_shape) if reduction == "none" else 1.3

    def f(z):
        return float(np.sum(go * nx.cross_entropy(z, t, **kw)))

    _, grad = nx.cross_entropy_with_grad(x, t, grad_output=go, **kw)
    np.testing.assert_allclose(grad, numeric_grad(f, x), rtol=1e-6, atol=1e-8)
