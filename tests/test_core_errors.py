"""Every bad input raises the documented exception class with a message naming the bad value, and a
failed call modifies nothing."""
from __future__ import annotations

import warnings

import numpy as np
import pytest

import numbaxent as nx

X = np.arange(12, dtype=np.float64).reshape(4, 3) / 7
T = np.array([0, 2, 1, -100])


@pytest.mark.parametrize("kwargs,target,exc,match", [
    (dict(reduction="avg"), T, ValueError, "avg is not a valid value for reduction"),
    (dict(label_smoothing=1.5), T, ValueError, "between 0.0 and 1.0. Got: 1.5"),
    (dict(label_smoothing=-0.1), T, ValueError, "Got: -0.1"),
    (dict(label_smoothing=float("nan")), T, ValueError, "Got: nan"),
    (dict(label_smoothing="x"), T, TypeError, "label_smoothing"),
    (dict(ignore_index=1.5), T, TypeError, "ignore_index"),
    (dict(weight=np.ones(4)), T, ValueError, r"all 3 classes.*\[4\]"),
    (dict(weight=np.ones((1, 3))), T, ValueError, r"\[1, 3\]"),
    (dict(weight=np.ones(3, complex)), T, TypeError, "weight"),
    ({}, np.array([0, 3, 1, 1]), IndexError, "Target 3 is out of bounds"),
    ({}, np.array([0, -1, 1, 1]), IndexError, "Target -1 is out of bounds"),
    ({}, np.array([0, 1, 2]), ValueError, r"batch_size \(4\) to match target batch_size \(3\)"),
    ({}, np.array(1), ValueError, r"target batch_size \(0\)"),
    ({}, np.zeros(4, np.float32), TypeError, "integer type"),
    ({}, np.zeros((4, 3), np.int64), TypeError, "Expected floating point type for target"),
    ({}, np.zeros((4, 1)), ValueError, "target"),
    (dict(ignore_index=0), np.full((4, 3), 1 / 3), ValueError, "ignore_index is not supported"),
    (dict(z_loss=-1.0), T, ValueError, "z_loss"),
    (dict(softcap=0.0), T, ValueError, "softcap"),
    (dict(normalizer=4.0, reduction="sum"), T, ValueError, "normalizer"),
    (dict(normalizer=0.0), T, ValueError, "normalizer"),
    (dict(sample_weight=np.ones(3)), T, ValueError, "sample_weight"),
])
def test_bad_arguments(kwargs, target, exc, match):
    x = X.copy()
    with pytest.raises(exc, match=match):
        nx.cross_entropy(x, target, **kwargs)
    with pytest.raises(exc, match=match):
        nx.cross_entropy_with_grad(x, target, out=x, **kwargs)
    np.testing.assert_array_equal(x, X)  # a failed in-place call modifies nothing


@pytest.mark.parametrize("x,exc,match", [
    (np.arange(12).reshape(4, 3), TypeError, "floating point input.*int64"),
    (np.ones((4, 3), complex), TypeError, "complex"),
    (np.ones((4, 3), bool), TypeError, "bool"),
    (np.array(1.0), ValueError, "0-d"),
    ([[1.0, 2.0], [3.0]], TypeError, "could not be converted"),
])
def test_bad_logits(x, exc, match):
    with pytest.raises(exc, match=match):
        nx.cross_entropy(x, T)


def test_shape_errors_for_k_dim_and_unbatched():
    x = np.zeros((2, 3, 5))
    with pytest.raises(ValueError, match=r"Expected target size \[2, 5\], got \[2, 4\]"):
        nx.cross_entropy(x, np.zeros((2, 4), np.int64))
    with pytest.raises(ValueError, match="unbatched"):
        nx.cross_entropy(np.zeros(3), np.array([1]))  # PyTorch's forward accepts this; backward fails


def test_out_argument_checked():
    with pytest.raises(ValueError, match="out must have input's shape"):
        nx.cross_entropy_with_grad(X, T, out=np.empty((3, 4)))
    with pytest.raises(ValueError, match="dtype"):
        nx.cross_entropy_with_grad(X, T, out=np.empty((4, 3), np.float32))
    with pytest.raises(TypeError, match="out must be a numpy.ndarray"):
        nx.cross_entropy_with_grad(X, T, out=[[0.0] * 3] * 4)
    ro = np.empty_like(X)
    ro.flags.writeable = False
    with pytest.raises(ValueError, match="read-only"):
        nx.cross_entropy_with_grad(X, T, out=ro)


def test_grad_output_checked():
    with pytest.raises(ValueError, match="must be a real scalar"):
        nx.cross_entropy_with_grad(X, T, grad_output=np.ones(4))
    with pytest.raises(ValueError, match="does not match the loss's shape"):
        nx.cross_entropy_with_grad(X, T, reduction="none", grad_output=np.ones(3))


def test_bfloat16_weights_and_gradients_are_real_arrays():
    """ml_dtypes' bfloat16 (NumPy kind 'V') is taken wherever a real array is -- the upstream
    gradient of a bfloat16 loss is one -- as the values it holds; complex is still refused."""
    bf16 = pytest.importorskip("ml_dtypes").bfloat16
    go = np.array([0.5, -2.0, 1.25, 3.0])  # values bfloat16 holds exactly
    sw = np.array([1.0, 0.25, 2.0, 0.5])
    w = np.array([0.5, 1.0, 1.5])
    for reduction, g in (("none", go), ("sum", go[:1]), ("mean", np.float64(1.5))):
        want = nx.cross_entropy_with_grad(X, T, w, reduction=reduction, grad_output=g, sample_weight=sw)
        got = nx.cross_entropy_with_grad(X, T, w.astype(bf16), reduction=reduction, grad_output=g.astype(bf16),
                                         sample_weight=sw.astype(bf16))
        for a, b in zip(want, got):
            assert a.tobytes() == b.tobytes(), reduction
    for kw in (dict(grad_output=np.ones(4, complex), reduction="none"), dict(sample_weight=np.ones(4, complex))):
        with pytest.raises(TypeError, match="must be a real array"):
            nx.cross_entropy_with_grad(X, T, **kw)


def test_uint64_target_beyond_int64_is_out_of_bounds():
    t = np.array([0, 1, 2**64 - 100, 0], dtype=np.uint64)  # would wrap to -100 if cast blindly
    with pytest.raises(IndexError, match=str(2**64 - 100)):
        nx.cross_entropy(X, t)


def test_backward_before_forward():
    with pytest.raises(ValueError, match="before forward"):
        nx.CrossEntropyLoss().backward()


def test_legacy_reduction_mapping_and_warnings():
    table = {(None, False): "none", (False, None): "sum", (True, True): "mean",
             (False, True): "sum", (True, False): "none", (None, None): "mean"}
    for (sa, rd), expected in table.items():
        if sa is None and rd is None:
            with warnings.catch_warnings():
                warnings.simplefilter("error")
                assert nx.CrossEntropyLoss().reduction == "mean"
            continue
        with pytest.warns(UserWarning, match=f"reduction='{expected}'"):
            crit = nx.CrossEntropyLoss(size_average=sa, reduce=rd, reduction="sum")
        assert crit.reduction == expected
    with pytest.warns(UserWarning, match="elementwise_mean"):
        loss = nx.cross_entropy(X, T, reduction="elementwise_mean")
    assert loss == nx.cross_entropy(X, T, reduction="mean")
