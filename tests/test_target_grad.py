"""cross_entropy_with_grad(..., target_grad=True): the gradient with respect to a probability
target, against the independent float64 reference (tests/naive.py: naive_target_grad) and against
central finite differences of numbaxent's own loss in float64."""
from __future__ import annotations

import itertools
import zlib

import numpy as np
import pytest

import numbaxent as nx
from naive import naive_cross_entropy, naive_target_grad, numeric_grad
from test_core_parity import assert_close

SHAPES = [(6,), (5, 6), (3, 6, 4), (2, 6, 2, 3)]
# option sets: plain; weight + smoothing; softcap + z-loss; sample weight; everything at once
OPTIONS = ["plain", "weight_eps", "cap_z", "sample_weight", "all"]
# Tolerances: the shared dtype-epsilon rule of test_core_parity.assert_close (float16 is computed
# in float32 and rounded once).


def _problem(dtype, shape, reduction, option, seed):
    rng = np.random.default_rng(seed)
    C = shape[0] if len(shape) == 1 else shape[1]
    lshape = () if len(shape) == 1 else (shape[0],) + shape[2:]
    x = (rng.standard_normal(shape) * 3).astype(dtype)
    t = rng.random(shape).astype(dtype)
    kw = dict(reduction=reduction)
    if option in ("weight_eps", "all"):
        kw.update(weight=rng.uniform(0.3, 2.0, C).astype(dtype), label_smoothing=0.2)
    if option in ("cap_z", "all"):
        kw.update(softcap=2.5, z_loss=0.01)
    if option in ("sample_weight", "all"):
        kw.update(sample_weight=rng.uniform(0.2, 2.0, lshape))
    if option == "all":
        go = rng.standard_normal(lshape) if reduction == "none" else 0.7
    else:
        go = None
    return x, t, kw, go


def _ref_kwargs(kw):
    return {k: v for k, v in kw.items() if k != "z_loss"}  # the z-loss has no target in it


@pytest.mark.parametrize("dtype,shape,reduction,option", list(itertools.product(
    [np.float64, np.float32, np.float16], SHAPES, ["none", "mean", "sum"], OPTIONS)))
def test_matches_reference(dtype, shape, reduction, option):
    seed = zlib.crc32(repr((shape, reduction, option)).encode())  # same data on every run
    x, t, kw, go = _problem(dtype, shape, reduction, option, seed)
    loss, grad, grad_t = nx.cross_entropy_with_grad(x, t, grad_output=go, target_grad=True, **kw)
    assert grad_t.dtype == t.dtype and grad_t.shape == t.shape
    expect = naive_target_grad(x, t, grad_output=go, **_ref_kwargs(kw))
    assert_close(grad_t, expect, dtype)
    # the other outputs are unchanged by the option
    ref_loss, ref_grad = naive_cross_entropy(x, t, grad_output=go, **kw)
    assert_close(loss, ref_loss, dtype)
    assert_close(grad, ref_grad, dtype)


@pytest.mark.parametrize("path", ["rows", "columns"])
@pytest.mark.parametrize("shape", [(7, 5), (3, 5, 6)])
def test_both_kernel_paths(path, shape):
    from conftest import kernel_path

    x, t, kw, go = _problem(np.float32, shape, "mean", "all", 3)
    with kernel_path(path):
        _, _, grad_t = nx.cross_entropy_with_grad(x, t, grad_output=go, target_grad=True, **kw)
    assert_close(grad_t, naive_target_grad(x, t, grad_output=go, **_ref_kwargs(kw)), np.float32)


@pytest.mark.parametrize("shape,reduction,option", list(itertools.product(
    [(6,), (4, 6), (2, 6, 3)], ["none", "mean", "sum"], OPTIONS)))
def test_finite_differences(shape, reduction, option):
    x, t, kw, go = _problem(np.float64, shape, reduction, option, 11)
    _, _, grad_t = nx.cross_entropy_with_grad(x, t, grad_output=go, target_grad=True, **kw)
    gw = 1.0 if go is None else np.asarray(go)

    def objective(tt):
        return float(np.sum(gw * nx.cross_entropy(x, tt, **kw)))

    fd = numeric_grad(objective, t)
    # the loss is linear in t: central differences (step 1e-6) are exact up to rounding of the loss (~1e-15/1e-6)
    np.testing.assert_allclose(grad_t, fd, rtol=1e-7, atol=1e-8)


def test_normalizer_and_mixed_target_dtype():
    rng = np.random.default_rng(5)
    x = rng.standard_normal((4, 5)).astype(np.float32)
    t = rng.random((4, 5))  # float64 target for float32 logits: the gradient is float64
    _, _, grad_t = nx.cross_entropy_with_grad(x, t, normalizer=10.0, target_grad=True)
    assert grad_t.dtype == np.float64
    assert_close(grad_t, naive_target_grad(x, t, normalizer=10.0), np.float32)


def test_bfloat16():
    ml_dtypes = pytest.importorskip("ml_dtypes")
    rng = np.random.default_rng(6)
    x = rng.standard_normal((4, 5)).astype(ml_dtypes.bfloat16)
    t = rng.random((4, 5)).astype(ml_dtypes.bfloat16)
    _, _, grad_t = nx.cross_entropy_with_grad(x, t, reduction="sum", target_grad=True)
    assert grad_t.dtype == t.dtype
    expect = naive_target_grad(x.astype(np.float64), t.astype(np.float64), reduction="sum")
    assert_close(grad_t, expect, t.dtype)


def test_fortran_ordered_and_in_place():
    rng = np.random.default_rng(7)
    x = np.asfortranarray(rng.standard_normal((6, 4)))
    t = np.asfortranarray(rng.random((6, 4)))
    expect_t = naive_target_grad(x, t, label_smoothing=0.1)
    expect_x = naive_cross_entropy(x, t, label_smoothing=0.1)[1]
    _, grad, grad_t = nx.cross_entropy_with_grad(x, t, label_smoothing=0.1, target_grad=True)
    assert_close(grad_t, expect_t, np.float64)
    # out=input overwrites the logits with their gradient; the target gradient must still see them
    xc = np.ascontiguousarray(x)
    _, grad, grad_t = nx.cross_entropy_with_grad(xc, t, label_smoothing=0.1, out=xc,
                                                 target_grad=True)
    assert grad is xc
    assert_close(grad, expect_x, np.float64)
    assert_close(grad_t, expect_t, np.float64)


def test_non_finite_logits():
    x = np.array([[0.0, -np.inf, 1.0], [np.nan, 0.0, 1.0], [-np.inf, -np.inf, -np.inf],
                  [np.inf, 0.0, 1.0]])
    t = np.full((4, 3), 0.25)
    _, _, grad_t = nx.cross_entropy_with_grad(x, t, reduction="sum", target_grad=True)
    expect = naive_target_grad(x, t, reduction="sum")
    assert np.isposinf(grad_t[0, 1])  # -logp = +inf at a -inf logit
    assert np.isnan(grad_t[1:]).all()  # NaN, all -inf and +inf rows: log_softmax is NaN
    assert_close(grad_t, expect, np.float64)


def test_empty_and_stats_order():
    x = np.zeros((0, 4), np.float32)
    loss, grad, grad_t = nx.cross_entropy_with_grad(x, x.copy(), reduction="sum", target_grad=True)
    assert grad_t.shape == (0, 4) and grad_t.dtype == np.float32
    rng = np.random.default_rng(8)
    x = rng.standard_normal((3, 4))
    t = rng.random((3, 4))
    res = nx.cross_entropy_with_grad(x, t, target_grad=True, return_stats=True)
    assert len(res) == 4 and isinstance(res[3], nx.Stats)
    assert_close(res[2], naive_target_grad(x, t), np.float64)


def test_loss_object_backward():
    rng = np.random.default_rng(9)
    x = rng.standard_normal((3, 5, 2))
    t = rng.random((3, 5, 2))
    w = rng.uniform(0.5, 1.5, 5)
    crit = nx.CrossEntropyLoss(weight=w, reduction="sum", label_smoothing=0.3)
    crit(x, t)
    grad, grad_t = crit.backward(2.0, target_grad=True)
    assert_close(grad, naive_cross_entropy(x, t, w, reduction="sum", label_smoothing=0.3,
                                           grad_output=2.0)[1], np.float64)
    assert_close(grad_t, naive_target_grad(x, t, w, reduction="sum", label_smoothing=0.3,
                                           grad_output=2.0), np.float64)


def test_class_index_target_is_an_error():
    x = np.zeros((3, 4))
    with pytest.raises(ValueError, match="class-probability targets"):
        nx.cross_entropy_with_grad(x, np.array([0, 1, 2]), target_grad=True)
    crit = nx.CrossEntropyLoss()
    crit(x, np.array([0, 1, 2]))
    with pytest.raises(ValueError, match="class-probability targets"):
        crit.backward(target_grad=True)
