"""numbaxent.evaluate.Evaluator: every metric against an independent float64 NumPy reference (written
here, never taken from numbaxent), the loss against the core ``cross_entropy`` (and PyTorch when it
is installed), top-k with ties, non-finite rows, chunking/merge invariance (hypothesis), thread-count
determinism and the errors of ``update``/``merge``.
"""
from __future__ import annotations

import math
import os
import pickle
import subprocess
import sys

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import numbaxent as nx
from numbaxent.evaluate import EvalResult, Evaluator


# -- the reference ---------------------------------------------------------------------------------------
def reference(x, t, C, weight=None, ignore_index=-100, eps=0.0, topk=(1, 5), bins=15):
    """Every Evaluator figure in float64 NumPy. ``x`` is (R, C) with any float dtype (upcast exactly),
    ``t`` (R,). Class weights are rounded to the logits' compute dtype first, as PyTorch (and the core)
    use them in the input's dtype. Ties in top-k: a stable argsort of -x (lower class index first)."""
    compute = np.float64 if x.dtype == np.float64 else np.float32
    x = x.astype(np.float64)
    t = np.asarray(t).astype(np.int64)
    w = np.ones(C) if weight is None else np.asarray(weight).astype(compute).astype(np.float64)
    valid = t != ignore_index
    xv, tv = x[valid], t[valid]
    n = len(tv)
    rows = np.arange(n)
    with np.errstate(all="ignore"):
        m = np.max(np.where(np.isnan(xv), -np.inf, xv), axis=1, keepdims=True) if n else \
            np.zeros((0, 1))
        logp = xv - m - np.log(np.sum(np.exp(xv - m), axis=1, keepdims=True))
        nll = -logp[rows, tv]
        smooth = -np.sum(w * logp, axis=1)
        loss = (1 - eps) * w[tv] * nll + (eps / C) * smooth if eps > 0 else w[tv] * nll
        p = np.exp(logp)
        ent = -np.sum(np.where(p > 0, p * logp, 0.0), axis=1)
        conf = np.max(p, axis=1) if n else np.zeros(0)
        nan_row = np.isnan(logp).any(axis=1)  # a NaN softmax (NaN or +inf logit, all -inf)
        conf = np.where(nan_row, np.nan, conf)
        ent = np.where(nan_row, np.nan, ent)
    order = np.argsort(-xv, axis=1, kind="stable")
    rank = np.argmax(order == tv[:, None], axis=1) if n else np.zeros(0, int)
    pred = order[:, 0] if n else np.zeros(0, int)
    correct = rank == 0
    W = float(np.sum(w[tv]))
    loss_sum = float(np.sum(loss))
    finite = ~np.isnan(conf)
    cb = conf[finite]
    b = np.clip(np.ceil(cb * bins).astype(np.int64) - 1, 0, bins - 1)
    bcount = np.bincount(b, minlength=bins)
    bconf = np.bincount(b, weights=cb, minlength=bins)
    bcorrect = np.bincount(b, weights=correct[finite], minlength=bins)
    with np.errstate(all="ignore"):
        gaps = np.abs(bcorrect - bconf)
        count = np.bincount(tv, minlength=C)
        cls_loss = np.bincount(tv, weights=loss, minlength=C)
        cls_correct = np.bincount(tv, weights=correct, minlength=C)
        predicted = np.bincount(pred, minlength=C)
        present = count > 0
        return dict(
            loss=loss_sum / W if W != 0 or loss_sum != 0 else float("nan"),
            loss_sum=loss_sum, weight_sum=W,
            nll=float(np.mean(nll)) if n else float("nan"),
            perplexity=float(np.exp(np.mean(nll))) if n else float("nan"),
            accuracy={k: float(np.mean(rank < k)) if n else float("nan") for k in topk},
            entropy=float(np.mean(ent)) if n else float("nan"),
            confidence=float(np.sum(cb) / len(cb)) if len(cb) else float("nan"),
            ece=float(np.sum(gaps) / len(cb)) if len(cb) else float("nan"),
            mce=float(np.max(gaps[bcount > 0] / bcount[bcount > 0])) if len(cb) else float("nan"),
            calibration=dict(count=bcount, confidence=bconf / bcount, accuracy=bcorrect / bcount),
            per_class=dict(count=count, loss_sum=cls_loss, loss=cls_loss / (count * w),
                           accuracy=cls_correct / count, predicted=predicted,
                           precision=cls_correct / predicted),
            balanced_accuracy=float(np.mean(cls_correct[present] / count[present]))
            if present.any() else float("nan"),
            n_seen=len(t), n_ignored=int(np.sum(~valid)), n_valid=n,
            n_nonfinite=int(np.sum(~finite)),
        )


def assert_matches(res: EvalResult, ref: dict, rtol: float, exact_bins: bool = True):
    def close(a, b, what):
        np.testing.assert_allclose(np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64),
                                   rtol=rtol, atol=rtol * 1e-3, equal_nan=True, err_msg=what)

    for key in ("loss", "loss_sum", "weight_sum", "nll", "perplexity", "entropy", "confidence",
                "balanced_accuracy"):
        close(getattr(res, key), ref[key], key)
    assert res.accuracy.keys() == ref["accuracy"].keys()
    for k in ref["accuracy"]:
        close(res.accuracy[k], ref["accuracy"][k], f"accuracy@{k}")
    for key in ("n_seen", "n_ignored", "n_valid", "n_nonfinite"):
        assert getattr(res, key) == ref[key], key
    for key in ("count", "predicted"):
        np.testing.assert_array_equal(res.per_class[key], ref["per_class"][key], err_msg=key)
    for key in ("loss_sum", "loss", "accuracy", "precision"):
        close(res.per_class[key], ref["per_class"][key], f"per_class.{key}")
    if exact_bins:
        np.testing.assert_array_equal(res.calibration["count"], ref["calibration"]["count"])
        for key in ("confidence", "accuracy"):
            close(res.calibration[key], ref["calibration"][key], f"calibration.{key}")
        close(res.ece, ref["ece"], "ece")
        close(res.mce, ref["mce"], "mce")
    else:  # float32 confidences may sit on the other side of a bin edge than float64 ones
        assert abs(res.ece - ref["ece"]) < 1e-4


def data(n=300, C=11, dtype=np.float64, seed=0, ignore_frac=0.1, scale=2.0):
    rng = np.random.default_rng(seed)
    x = (scale * rng.standard_normal((n, C))).astype(dtype)
    t = rng.integers(0, C, n)
    t[rng.random(n) < ignore_frac] = -100
    return x, t


# -- every metric against the reference ----------------------------------------------------------------
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("eps", [0.0, 0.1])
def test_every_metric_matches_numpy_reference(dtype, weighted, eps, each_kernel_path):
    C = 11
    x, t = data(C=C, dtype=dtype, seed=int(weighted) + 2 * int(eps > 0))
    weight = np.linspace(0.3, 2.0, C) if weighted else None
    ev = Evaluator(C, weight=weight, label_smoothing=eps, topk=(1, 3, 5), calibration_bins=10)
    res = ev.update(x, t).result()
    ref = reference(x, t, C, weight, -100, eps, (1, 3, 5), 10)
    assert_matches(res, ref, rtol=1e-12 if dtype == np.float64 else 2e-5,
                   exact_bins=dtype == np.float64)


@pytest.mark.parametrize("ragged", [True, False])
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_long_rows_summed_in_chunks_match_the_reference(dtype, ragged, monkeypatch):
    """Rows longer than two chunks are summed chunk by chunk (`_rows.chunked_row_pass`), each chunk shifted
    by its own maximum, the sums (and the entropy's) brought to the row's maximum at the end: every
    metric matches the reference, with special values placed chunk by chunk (`test_edges._long_rows`),
    ignored rows between them (the row after one reads its first chunk on its own), 1 or 2 threads."""
    import numba

    from numbaxent import _kernels, _parallel, _rows
    from test_edges import _long_rows

    # label smoothing is left to the whole-row pass by the evaluator (`chunk_variant`);
    # forced through the chunks here, which take it
    monkeypatch.setattr(_kernels, "chunk_variant", lambda dtype, C, mode, *options: _rows.chunk_variant(dtype, C, mode))

    rng = np.random.default_rng(7)
    x, C = _long_rows(dtype, ragged, rng)
    x = np.concatenate([x, (2 * rng.standard_normal((8, C))).astype(dtype)])
    t = rng.integers(0, C, len(x))
    t[[2, 13]] = -100
    t[9] = C - 1  # the row whose maximum is its last logit: its target is top-1
    assert _rows.chunk_variant(dtype, C, _rows.FORWARD) == (None, True)
    weight = np.linspace(0.5, 2.0, C)
    old, floor = numba.get_num_threads(), _parallel.MIN_PARALLEL_ELEMENTS
    results = []
    try:
        _parallel.MIN_PARALLEL_ELEMENTS = 0
        for n in (1, 2):
            numba.set_num_threads(n)
            ev = Evaluator(C, weight=weight, label_smoothing=0.1, topk=(1, 5), calibration_bins=10)
            results.append(ev.update(x, t).result())
    finally:
        numba.set_num_threads(old)
        _parallel.MIN_PARALLEL_ELEMENTS = floor
    assert results[0].to_dict() == results[1].to_dict()
    rtol = 1e-12 if dtype == np.float64 else 2e-5
    ref = reference(x, t, C, weight, -100, 0.1, (1, 5), 10)
    assert_matches(results[0], ref, rtol=rtol, exact_bins=dtype == np.float64)
    # the rows whose softmax is finite alone (a NaN row makes the means NaN, entropy among them)
    xd = x.astype(np.float64)
    finite = ~(np.isnan(xd).any(1) | np.isposinf(xd).any(1) | np.isneginf(xd).all(1))
    assert finite.sum() == len(x) - 4
    ev = Evaluator(C, weight=weight, label_smoothing=0.1, topk=(1, 5), calibration_bins=10)
    res = ev.update(x[finite], t[finite]).result()
    assert math.isfinite(res.entropy)  # (the loss is +inf: -inf logits with label smoothing)
    assert_matches(res, reference(x[finite], t[finite], C, weight, -100, 0.1, (1, 5), 10), rtol=rtol,
                   exact_bins=dtype == np.float64)


def test_in_range_ignore_index_and_topk_beyond_classes(each_kernel_path):
    C = 6
    x, t = data(n=200, C=C, seed=3, ignore_frac=0.0)
    ev = Evaluator(C, ignore_index=2, topk=(2, 1, 6, 9), calibration_bins=4)
    res = ev.update(x, t).result()
    assert list(res.accuracy) == [1, 2, 6, 9]
    assert res.accuracy[6] == res.accuracy[9] == 1.0
    assert_matches(res, reference(x, t, C, None, 2, 0.0, (1, 2, 6, 9), 4), rtol=1e-12)
    assert res.per_class["count"][2] == 0 and res.n_ignored == int(np.sum(t == 2))


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("eps,weighted", [(0.0, False), (0.1, True), (1.0, True)])
def test_loss_equals_core_cross_entropy(dtype, eps, weighted):
    C = 9
    x, t = data(n=257, C=C, dtype=dtype, seed=5)
    weight = np.linspace(0.5, 1.5, C).astype(dtype) if weighted else None
    res = Evaluator(C, weight=weight, label_smoothing=eps).update(x, t).result()
    rtol = 1e-12 if dtype == np.float64 else 1e-6
    for reduction, got in (("mean", res.loss), ("sum", res.loss_sum)):
        core = nx.cross_entropy(x, t, weight=weight, label_smoothing=eps, reduction=reduction)
        np.testing.assert_allclose(got, float(core), rtol=rtol)


def test_loss_equals_torch_when_installed():
    torch = pytest.importorskip("torch")
    C = 7
    x, t = data(n=128, C=C, seed=11)
    weight = np.linspace(0.2, 3.0, C)
    res = Evaluator(C, weight=weight, label_smoothing=0.2, ignore_index=-100).update(x, t).result()
    expect = torch.nn.functional.cross_entropy(torch.from_numpy(x), torch.from_numpy(t),
                                               weight=torch.from_numpy(weight),
                                               label_smoothing=0.2)
    np.testing.assert_allclose(res.loss, expect.item(), rtol=1e-12)


@pytest.mark.smoke
def test_all_ignored_gives_torch_nan_mean():
    x, _ = data(n=5, C=4)
    res = Evaluator(4).update(x, np.full(5, -100)).result()
    assert math.isnan(res.loss) and res.loss_sum == 0.0 and res.n_ignored == 5 and res.n_valid == 0
    assert math.isnan(res.accuracy[1]) and math.isnan(res.ece)


# -- top-k ties and non-finite logits -----------------------------------------------------------------
def test_topk_ties_follow_a_stable_argsort_of_minus_logits(each_kernel_path):
    x = np.array([
        [1.0, 1.0, 1.0, 0.0],    # target 2 tied with 0 and 1: rank 2
        [1.0, 1.0, 1.0, 0.0],    # target 0: rank 0 (lowest index wins a tie)
        [0.0, 2.0, 2.0, 2.0],    # target 3: rank 2; predicted 1
        [5.0, 5.0, 5.0, 5.0],    # all equal, target 3: rank 3
        [-0.0, 0.0, -1.0, 0.0],  # -0.0 == 0.0: target 1 ranks behind class 0
        [np.inf, 1.0, np.inf, 0.0],  # two +inf, target 2: rank 1 (softmax is NaN)
        [1.0, np.nan, 3.0, 2.0],     # NaN logit goes last: target 0 rank 2
        [np.nan, 1.0, np.nan, 0.0],  # NaN target logit: after the non-NaN ones and the NaN before
        [np.nan] * 4,                # all NaN, target 2: rank 2; predicted 0
        [-np.inf, 0.0, 1.0, 1.0],    # -inf elsewhere, target 3: rank 1
    ])
    t = np.array([2, 0, 3, 3, 1, 2, 0, 2, 2, 3])
    ks = (1, 2, 3, 4)
    res = Evaluator(4, topk=ks).update(x, t).result()
    ranks = np.array([2, 0, 2, 3, 1, 1, 2, 3, 2, 1])
    order = np.argsort(-x, axis=1, kind="stable")
    np.testing.assert_array_equal(np.argmax(order == t[:, None], axis=1), ranks)  # the rule itself
    for k in ks:
        assert res.accuracy[k] == np.mean(ranks < k), k
    np.testing.assert_array_equal(res.per_class["predicted"], np.bincount(order[:, 0], minlength=4))
    ref = reference(x, t, 4, topk=ks)
    assert_matches(res, ref, rtol=1e-12)


@pytest.mark.parametrize("cap", [None, 4.0])
def test_predicted_class_and_entropy_on_rows_longer_than_a_scan_block(cap):
    # the row kernel scans for the maximum's first index one 512-element block at a time (rows of
    # 1300 classes span three blocks), takes each row's maximum in the pass over the row before it,
    # and sums the entropy a second time, clamped, when a -inf logit made it NaN.
    rng = np.random.default_rng(11)
    C = 1300
    x = rng.standard_normal((9, C))
    x[0, [700, 1200]] = 40.0         # tie across blocks: the first wins
    x[1, [100, 1100]] = 40.0
    x[2, 1299] = 40.0                # the maximum in the last, short block
    x[3, 20], x[3, 1290] = 150.0, 200.0  # both saturate to the cap (4 tanh(37.5) == 4.0)
    x[4, [3, 900]] = -np.inf         # -inf logits: 0 log 0 = 0 in the entropy
    x[5, :] = -np.inf
    x[5, [600, 601]] = 1.0
    x[6, 800] = np.nan               # NaN skipped by the maximum, the softmax NaN
    x[7, :] = np.nan                 # all NaN: predicted 0
    x[8, 513] = np.inf
    t = np.array([1200, 100, 5, 1290, 7, 601, 800, 2, 513])
    res = Evaluator(C, topk=(1, 3), confusion=True)._update(x, t, cap).result()
    z = x if cap is None else cap * np.tanh(x / cap)
    np.testing.assert_array_equal(
        res.per_class["predicted"],
        np.bincount(np.argsort(-z, axis=1, kind="stable")[:, 0], minlength=C))
    ref = reference(z, t, C, topk=(1, 3))
    assert_matches(res, ref, rtol=1e-12)
    # the rows with -inf logits alone: a finite entropy (NaN rows above make the total NaN)
    sub = Evaluator(C, topk=(1, 3))._update(x[4:6], t[4:6], cap).result()
    assert np.isfinite(sub.entropy)
    assert_matches(sub, reference(z[4:6], t[4:6], C, topk=(1, 3)), rtol=1e-12)


def test_top1_alone_and_the_predicted_class_follow_the_same_rule(each_kernel_path):
    # with topk=(1,) no rank beyond 1 is counted: top-1 and the prediction come from the first
    # maximum, except for a NaN target logit (ranked after the non-NaN entries) and rows whose
    # entries are all -inf or NaN
    x = np.array([
        [1.0, 1.0, 1.0, 0.0],           # target 0 wins the tie
        [1.0, 1.0, 1.0, 0.0],           # target 1 loses it; predicted 0
        [np.nan] * 4,                   # all NaN, target 0: rank 0 (predicted 0)
        [np.nan] * 4,                   # all NaN, target 1: rank 1
        [np.nan, -np.inf, -np.inf, np.nan],  # target 1: rank 0, the first -inf is the maximum
        [np.nan, -np.inf, -np.inf, np.nan],  # target 2: rank 1; predicted 1
        [np.nan, 1.0, 3.0, 3.0],        # target 3: predicted 2
        [np.nan, np.nan, 2.0, 1.0],     # NaN target logit 0 ... rank 2
    ])
    t = np.array([0, 1, 0, 1, 1, 2, 3, 0])
    order = np.argsort(-x, axis=1, kind="stable")
    ranks = np.argmax(order == t[:, None], axis=1)
    np.testing.assert_array_equal(ranks, [0, 1, 0, 1, 0, 1, 1, 2])  # the rule itself
    for ks in ((1,), (1, 2, 3)):
        res = Evaluator(4, topk=ks, confusion=True).update(x, t).result()
        for k in ks:
            assert res.accuracy[k] == np.mean(ranks < k), (ks, k)
        np.testing.assert_array_equal(res.per_class["predicted"],
                                      np.bincount(order[:, 0], minlength=4))
        m = np.zeros((4, 4), dtype=np.int64)
        np.add.at(m, (t, order[:, 0]), 1)
        np.testing.assert_array_equal(res.confusion, m)
        np.testing.assert_array_equal(
            res.per_class["accuracy"] * res.per_class["count"],
            np.bincount(t, weights=ranks == 0, minlength=4))


def test_nonfinite_rows_follow_pytorch_and_stay_out_of_calibration(each_kernel_path):
    x = np.array([[-np.inf, 0.0, 1.0], [-np.inf, 0.0, 1.0], [np.nan, 0.0, 1.0], [1.0, 2.0, 3.0],
                  [-np.inf, -np.inf, -np.inf], [2.0, 1.0, 0.0]])
    t = np.array([1, 0, 1, 2, -100, 0])
    ev = Evaluator(3, topk=(1, 2))
    res = ev.update(x[[0, 3, 4, 5]], t[[0, 3, 4, 5]]).result()  # finite losses
    assert_matches(res, reference(x[[0, 3, 4, 5]], t[[0, 3, 4, 5]], 3, topk=(1, 2)), rtol=1e-12)
    assert res.n_nonfinite == 0 and res.n_ignored == 1
    res = Evaluator(3, topk=(1, 2)).update(x, t).result()
    assert math.isnan(res.loss) and res.n_nonfinite == 1  # the NaN row
    assert res.calibration["count"].sum() == res.n_valid - 1
    res = Evaluator(3).update(x[:2], t[:2]).result()
    assert res.loss == np.inf  # -inf at the target
    ls = Evaluator(3, label_smoothing=0.1).update(x[:1], t[:1]).result()
    assert ls.loss == np.inf  # smoothing sees the -inf logit, as PyTorch's does
    assert np.isfinite(res.entropy)  # 0 log 0 = 0


@pytest.mark.parametrize("C, eps", [(4, 0.0), (5, 0.1)])
def test_kdim_over_several_blocks_a_sample(C, eps):
    """K-dim logits over several column blocks a sample and a shorter last one: ties for the
    maximum (the predicted class and ranks), rows with -inf entries and rows of negative logits
    only, the maximum in the last class, an even and an odd class count, with and without label
    smoothing, against the reference; NaN rows counted as non-finite wherever they sit."""
    from numbaxent import _kernels

    nb = _kernels.column_block_rows(C, 2)
    S = 2 * nb + 37
    rng = np.random.default_rng(C)
    x = np.round(2 * rng.standard_normal((2, C, S)))  # integers: many ties
    x[0, 0, nb + 5 : nb + 40] = -np.inf if eps == 0 else -60.0  # in the second block
    # (-inf only without smoothing, which sees it: a loss of inf, as PyTorch's)
    x[1, :, 2 * nb + 3] = -np.abs(x[1, :, 2 * nb + 3]) - 1.0
    x[1, C - 1, nb + 9] = 9.0  # the maximum in the last class
    t = rng.integers(0, C, (2, S))
    t[:, ::11] = -100
    t[0, nb + 5 : nb + 40] = 1  # (not the -inf class: finite losses)
    flat_x = np.moveaxis(x, 1, -1).reshape(-1, C)
    res = Evaluator(C, label_smoothing=eps, topk=(1, 2)).update(x, t).result()
    ref = reference(flat_x, t.reshape(-1), C, eps=eps, topk=(1, 2))
    assert_matches(res, ref, rtol=1e-12)
    xn = x.copy()
    xn[0, 2, nb + 50] = xn[1, 1, 7] = xn[1, 0, nb + 1] = np.nan
    assert Evaluator(C).update(xn, t).result().n_nonfinite == sum(t.reshape(-1)[i] != -100 for i in
                                                                   (nb + 50, S + 7, S + nb + 1))


# -- layouts and dtypes --------------------------------------------------------------------------------
def test_kdim_fortran_and_unbatched_inputs():
    rng = np.random.default_rng(7)
    x = rng.standard_normal((6, 5, 3, 2))
    t = rng.integers(0, 5, (6, 3, 2))
    t[0, 1, 1] = -100
    flat_x = np.moveaxis(x, 1, -1).reshape(-1, 5)
    res = Evaluator(5, topk=(1, 2)).update(x, t).result()
    assert_matches(res, reference(flat_x, t.reshape(-1), 5, topk=(1, 2)), rtol=1e-12)
    x2 = rng.standard_normal((40, 5))
    t2 = rng.integers(0, 5, 40)
    res = Evaluator(5, topk=(1, 2)).update(np.asfortranarray(x2), t2).result()
    assert_matches(res, reference(x2, t2, 5, topk=(1, 2)), rtol=1e-12)
    res = Evaluator(5, topk=(1, 2)).update(x2[::2, ::-1], t2[::2]).result()  # strided view
    assert_matches(res, reference(x2[::2, ::-1], t2[::2], 5, topk=(1, 2)), rtol=1e-12)
    res = Evaluator(5).update(x2[3], np.int64(t2[3])).result()  # (C,) with a 0-d target
    assert_matches(res, reference(x2[3:4], t2[3:4], 5), rtol=1e-12)


def test_half_precision_and_other_integer_targets():
    x, t = data(n=200, C=8, dtype=np.float32, seed=9, ignore_frac=0.0)
    x16 = x.astype(np.float16)
    res = Evaluator(8, topk=(1, 3)).update(x16, t.astype(np.uint8)).result()
    assert_matches(res, reference(x16, t, 8, topk=(1, 3)), rtol=2e-5, exact_bins=False)
    big = x.astype(">f8")  # non-native byte order
    res = Evaluator(8, topk=(1, 3)).update(big, t.astype(np.int16)).result()
    assert_matches(res, reference(x.astype(np.float64), t, 8, topk=(1, 3)), rtol=1e-12)


def test_bfloat16_when_available():
    ml_dtypes = pytest.importorskip("ml_dtypes")
    x, t = data(n=64, C=8, dtype=np.float32, seed=10, ignore_frac=0.0)
    xb = x.astype(ml_dtypes.bfloat16)
    res = Evaluator(8, topk=(1, 3)).update(xb, t).result()
    assert_matches(res, reference(xb.astype(np.float32), t, 8, topk=(1, 3)), rtol=2e-5,
                   exact_bins=False)


# -- invariance ------------------------------------------------------------------------------------------
FLOAT_FIELDS = ("loss", "loss_sum", "weight_sum", "nll", "perplexity", "entropy", "confidence",
                "ece", "mce", "balanced_accuracy")


def assert_same(a: EvalResult, b: EvalResult, rtol=1e-12):
    for key in FLOAT_FIELDS:
        np.testing.assert_allclose(getattr(a, key), getattr(b, key), rtol=rtol, atol=0,
                                   equal_nan=True, err_msg=key)
    assert a.accuracy == b.accuracy
    for key in ("n_seen", "n_ignored", "n_valid", "n_nonfinite"):
        assert getattr(a, key) == getattr(b, key)
    for key in ("count", "predicted"):
        np.testing.assert_array_equal(a.per_class[key], b.per_class[key])
    np.testing.assert_allclose(a.per_class["loss_sum"], b.per_class["loss_sum"], rtol=rtol,
                               atol=0)
    np.testing.assert_array_equal(a.calibration["count"], b.calibration["count"])
    np.testing.assert_allclose(a.calibration["confidence"], b.calibration["confidence"],
                               rtol=rtol, atol=0, equal_nan=True)


X_INV, T_INV = data(n=400, C=13, dtype=np.float32, seed=21, ignore_frac=0.15, scale=4.0)
W_INV = np.linspace(0.1, 3.0, 13)


def _make():
    return Evaluator(13, weight=W_INV, label_smoothing=0.05, topk=(1, 2, 5), calibration_bins=7)


WHOLE_INV = _make().update(X_INV, T_INV).result()


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(cuts=st.lists(st.integers(0, 400), max_size=12), data_=st.data())
def test_any_chunking_and_merge_order_gives_the_same_result(cuts, data_):
    bounds = [0] + sorted(cuts) + [400]
    parts = []
    for a, b in zip(bounds[:-1], bounds[1:]):
        ev = _make()
        # a part may itself be fed in several updates
        mid = data_.draw(st.integers(a, b))
        ev.update(X_INV[a:mid], T_INV[a:mid]).update(X_INV[mid:b], T_INV[mid:b])
        parts.append(ev)
    # merge in a random order and a random tree shape
    order = data_.draw(st.permutations(range(len(parts))))
    pool = [parts[i] for i in order]
    while len(pool) > 1:
        i = data_.draw(st.integers(0, len(pool) - 2))
        a, b = pool[i], pool.pop(i + 1)
        pool[i] = (a.copy().merge(b) if data_.draw(st.booleans()) else b.copy().merge(a))
    assert_same(pool[0].result(), WHOLE_INV)


@pytest.mark.parametrize("shape", [(3000, 50), (20000, 8), (4, 3, 50, 300), (1, 300, 1, 1500)])
def test_results_do_not_depend_on_the_thread_count(shape):
    # each shape above the size that runs threads (_parallel.MIN_PARALLEL_ELEMENTS): the row path
    # (C > COLUMN_MAX_C), the column path on 2-D and K-dim logits, and K-dim with many classes
    # (several blocks a group, classes tallied without the C x C pairs)
    import numba

    from numbaxent import _kernels, _parallel

    rng = np.random.default_rng(4)
    C = shape[1]
    x = (2 * rng.standard_normal(shape)).astype(np.float32)
    assert x.size >= _parallel.MIN_PARALLEL_ELEMENTS
    assert (len(shape) == 2 and C > _kernels.COLUMN_MAX_C) == (shape == (3000, 50))
    t = rng.integers(0, C, (shape[0],) + shape[2:])
    t.reshape(-1)[::7] = -100
    old = numba.get_num_threads()
    try:
        results = []
        for n in sorted({1, 2, numba.config.NUMBA_NUM_THREADS}):
            numba.set_num_threads(n)
            ev = Evaluator(C, label_smoothing=0.1, topk=(1, 2, 5), confusion=True)
            results.append(ev.update(x, t).result().to_dict())
    finally:
        numba.set_num_threads(old)
    assert len(results) > 1 and all(r == results[0] for r in results)  # bit for bit
    flat_x = np.moveaxis(x, 1, -1).reshape(-1, C)  # the figures themselves, against the reference
    res = Evaluator(C, label_smoothing=0.1, topk=(1, 2, 5)).update(x, t).result()
    assert_matches(res, reference(flat_x, t.reshape(-1), C, eps=0.1, topk=(1, 2, 5)), rtol=2e-5,
                   exact_bins=False)


def test_state_is_small_and_pickles():
    C = 50
    ev = Evaluator(C, topk=(1, 5))
    size0 = len(pickle.dumps(ev))
    x, t = data(n=5000, C=C, seed=2)
    ev.update(x, t)
    size1 = len(pickle.dumps(ev))
    assert size1 == size0 < 8 * (8 * C + 200)  # O(C + bins), not O(rows)
    back = pickle.loads(pickle.dumps(ev))
    assert back.result().to_dict() == ev.result().to_dict()
    assert back.compatible(ev)


def test_empty_updates_and_reset():
    ev = Evaluator(4)
    ev.update(np.zeros((0, 4), np.float32), np.zeros(0, np.int64))
    assert ev.n_seen == 0 and math.isnan(ev.result().loss)
    x, t = data(n=10, C=4)
    ev.update(x, t)
    assert ev.n_seen == 10
    ev.reset()
    assert ev.n_seen == 0


def test_result_to_dict_is_json_ready():
    import json

    x, t = data(n=30, C=5, seed=8)
    d = Evaluator(5, calibration_bins=40).update(x, t).result().to_dict()
    text = json.dumps(d, allow_nan=False)  # NaN (empty bins) became null
    assert json.loads(text)["n_seen"] == 30


# -- errors ----------------------------------------------------------------------------------------------
def test_update_rejects_incompatible_input_clearly_and_changes_nothing():
    x, t = data(n=10, C=4)
    ev = Evaluator(4).update(x, t)
    before = ev.result().to_dict()
    with pytest.raises(ValueError, match=r"5 classes.*num_classes=4"):
        ev.update(np.zeros((3, 5)), np.zeros(3, int))
    with pytest.raises(TypeError, match="floating point"):
        ev.update(np.zeros((3, 4), dtype=np.int32), np.zeros(3, int))
    with pytest.raises(TypeError, match="integer class indices"):
        ev.update(np.zeros((3, 4)), np.zeros(3))
    with pytest.raises(ValueError, match=r"targets of shape \(3,\), got targets of shape \(2,\)"):
        ev.update(np.zeros((3, 4)), np.zeros(2, int))
    bad = np.array([0, 1, 2, 3, 4, 0])
    with pytest.raises(IndexError, match=r"target 4 at row 14 is out of range"):
        ev.update(np.zeros((6, 4)), bad)  # row counted over everything seen (10 before)
    with pytest.raises(IndexError, match=r"target -1 at row \(11, 2\)"):
        ev.update(np.zeros((2, 4, 3)), np.array([[0, 0, 0], [0, 0, -1]]))
    with pytest.raises(ValueError, match="class dimension"):
        ev.update(np.float64(1.0), np.int64(0))
    assert ev.result().to_dict() == before


def test_constructor_and_merge_errors():
    with pytest.raises(ValueError):
        Evaluator(0)
    with pytest.raises(TypeError):
        Evaluator(2.5)
    with pytest.raises(ValueError, match="topk"):
        Evaluator(3, topk=(0, 1))
    with pytest.raises(ValueError, match="calibration_bins"):
        Evaluator(3, calibration_bins=0)
    with pytest.raises(ValueError, match=r"shape \(3,\)"):
        Evaluator(3, weight=[1.0, 2.0])
    with pytest.raises(ValueError, match="label_smoothing"):
        Evaluator(3, label_smoothing=1.5)
    a = Evaluator(3)
    with pytest.raises(ValueError, match="different configurations"):
        a.merge(Evaluator(3, topk=(1,)))
    with pytest.raises(ValueError, match="different configurations"):
        a.merge(Evaluator(3, weight=[1, 2, 3]))
    with pytest.raises(TypeError):
        a.merge("state")


def test_importing_the_evaluator_does_not_import_numba():
    code = ("import sys, numbaxent.evaluate as e; e.Evaluator(3, topk=(1, 2)); "
            "print('numba' in sys.modules, 'dask' in sys.modules)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["False", "False"]


def test_warmup_variants_run():
    from numbaxent.evaluate import warmup_variants

    labels = []
    for label, run in warmup_variants():
        run()
        labels.append(label)
    assert len(labels) == 3


# -- confusion matrix and IoU ------------------------------------------------------------------------------
def confusion_reference(x, t, C, ignore_index=-100):
    """(confusion, iou, mean_iou) by counting, row by row. ``x`` is (R, C) with finite logits; the
    prediction is the first index of the row maximum (``np.argmax``: ties go to the lowest index).
    IoU is computed from sets of rows (|target c and predicted c| / |target c or predicted c|), not
    from the matrix."""
    x = np.asarray(x, dtype=np.float64)
    t = np.asarray(t).reshape(-1)
    pred = np.array([int(np.argmax(row)) for row in x], dtype=np.int64)
    m = np.zeros((C, C), dtype=np.int64)
    for ti, pi in zip(t, pred):
        if ti != ignore_index:
            m[ti, pi] += 1
    valid = t != ignore_index
    iou = np.full(C, np.nan)
    for c in range(C):
        union = np.sum(valid & ((t == c) | (pred == c)))
        if union:
            iou[c] = np.sum(valid & (t == c) & (pred == c)) / union
    present = ~np.isnan(iou)
    return m, iou, float(np.mean(iou[present])) if present.any() else float("nan")


def assert_confusion(res: EvalResult, ref):
    m, iou, mean_iou = ref
    assert res.confusion.dtype == np.int64
    np.testing.assert_array_equal(res.confusion, m)
    np.testing.assert_allclose(res.iou, iou, rtol=1e-15, equal_nan=True)
    np.testing.assert_allclose(res.mean_iou, mean_iou, rtol=1e-15, equal_nan=True)


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_confusion_and_iou_match_the_reference(dtype):
    C = 6
    x, t = data(n=400, C=C, dtype=dtype, seed=30, ignore_frac=0.2)
    x[:40] = np.round(x[:40])  # ties between classes: the lowest index is the prediction
    x[40:45] = 0.0  # all tied: predicted 0
    t[t == 5] = 4  # class 5 is never a target (still predicted: its union is not empty)
    res = Evaluator(C, confusion=True, weight=np.arange(1.0, C + 1)).update(x, t).result()
    assert_confusion(res, confusion_reference(x, t, C))
    assert res.confusion.sum() == res.n_valid
    np.testing.assert_array_equal(res.confusion.sum(axis=1), res.per_class["count"])
    np.testing.assert_array_equal(res.confusion.sum(axis=0), res.per_class["predicted"])


def test_confusion_for_kdim_logits_and_classes_with_an_empty_union():
    rng = np.random.default_rng(31)
    C = 5
    x = rng.standard_normal((3, C, 4, 6)).astype(np.float32)
    x[:, 4] -= 10.0  # class 4 is never predicted
    t = rng.integers(0, 3, (3, 4, 6))  # ... nor a target: its IoU is NaN, out of the mean
    t[1, 2, :] = 7  # an in-range ignore index
    res = Evaluator(C, ignore_index=7, confusion=True).update(x, t).result()
    flat_x = np.moveaxis(x, 1, -1).reshape(-1, C)
    ref = confusion_reference(flat_x, t.reshape(-1), C, ignore_index=7)
    assert np.isnan(ref[1][4]) and np.isnan(res.iou[4])
    assert_confusion(res, ref)
    assert "mean IoU" in res.format() and "IoU" in res.format(per_class=True)
    d = res.to_dict()
    assert d["confusion"] == ref[0].tolist() and d["iou"][4] is None
    assert "confusion" not in Evaluator(C, ignore_index=7).update(x, t).result().to_dict()


def test_confusion_is_the_same_whatever_the_chunking_and_merge_order():
    C = 7
    x, t = data(n=300, C=C, seed=32)
    whole = Evaluator(C, confusion=True).update(x, t).result()
    parts = [Evaluator(C, confusion=True).update(x[a:b], t[a:b])
             for a, b in ((0, 1), (1, 150), (150, 151), (151, 300))]
    merged = parts[3].copy().merge(parts[1]).merge(parts[0]).merge(parts[2]).result()
    np.testing.assert_array_equal(merged.confusion, whole.confusion)
    np.testing.assert_array_equal(merged.iou, whole.iou)
    assert_confusion(whole, confusion_reference(x, t, C))
    # a few rows for many classes (the sparse update path) and one big chunk (the dense one)
    C = 300
    x, t = data(n=50, C=C, seed=33)
    ev = Evaluator(C, confusion=True)
    for a in range(0, 50, 7):
        ev.update(x[a:a + 7], t[a:a + 7])
    assert_confusion(ev.result(), confusion_reference(x, t, C))


def test_confusion_refuses_a_matrix_too_large_for_memory():
    from numbaxent.evaluate import MAX_CONFUSION_BYTES

    too_many = math.isqrt(MAX_CONFUSION_BYTES // 8) + 1
    with pytest.raises(ValueError, match=rf"confusion=True needs a {too_many} x {too_many} int64 "
                                         r"matrix .* more than the 1 GiB limit"):
        Evaluator(too_many, confusion=True)
    Evaluator(too_many)  # fine without the matrix
    with pytest.raises(TypeError, match="confusion must be True or False"):
        Evaluator(3, confusion="yes")
    with pytest.raises(ValueError, match=r"different configurations \(confusion: True vs False\)"):
        Evaluator(3, confusion=True).merge(Evaluator(3))


def test_pickles_from_before_the_confusion_matrix_still_load():
    ev = Evaluator(4).update(*data(n=20, C=4))
    del ev.__dict__["confusion"], ev.__dict__["_cm"]  # the state as an older version pickled it
    back = pickle.loads(pickle.dumps(ev))
    assert back.confusion is False and back.result().confusion is None
    assert back.copy().merge(Evaluator(4).update(*data(n=5, C=4))).n_seen == 25


# -- save / load ------------------------------------------------------------------------------------------
def _saved(tmp_path, **kw):
    x, t = data(n=120, C=5, seed=40)
    t[t == -100] = kw.get("ignore_index", -100)
    ev = Evaluator(5, **kw).update(x, t)
    path = tmp_path / "state.npz"
    ev.save(path)
    return ev, path


@pytest.mark.parametrize("kw", [dict(), dict(weight=np.linspace(0.5, 2, 5).astype(np.float32),
                                            ignore_index=3, label_smoothing=0.15, topk=(1, 2, 4),
                                            calibration_bins=9, confusion=True)])
def test_save_and_load_round_trip_every_setting_and_the_state(tmp_path, kw):
    ev, path = _saved(tmp_path, **kw)
    back = Evaluator.load(path)
    for name in Evaluator._SETTINGS:
        assert getattr(back, name) == getattr(ev, name), name
    assert back.compatible(ev) and ev.compatible(back)
    if "weight" in kw:
        assert back._weight_src.dtype == np.float32
        np.testing.assert_array_equal(back._weight_src, kw["weight"])
    assert back.result().to_dict() == ev.result().to_dict()
    # a loaded state keeps going: update and merge as the original would
    x, t = data(n=30, C=5, seed=41)
    t[t == -100] = ev.ignore_index
    assert back.update(x, t).result().to_dict() == ev.copy().update(x, t).result().to_dict()
    assert not list(tmp_path.glob(".tmp-*"))  # the temporary file was renamed into place


def test_loading_reads_no_pickle_and_executes_nothing(tmp_path):
    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):  # unpickling this calls open(marker, "w"): it creates the file
            return (open, (str(marker), "w"))

    ev, path = _saved(tmp_path)
    members = dict(np.load(path, allow_pickle=False))
    for name in ("format", "ints"):  # the first member read, and one read after the settings
        evil = dict(members)
        evil[name] = np.array([Payload()], dtype=object)
        bad = tmp_path / f"evil-{name}.npz"
        np.savez(bad, **evil)
        with pytest.raises(ValueError, match=rf"evil-{name}.npz: not a numbaxent evaluator "
                                             rf"state \(member '{name}' is unreadable"):
            Evaluator.load(bad)
        assert not marker.exists()
    # the payload is live: the same member loaded with pickle allowed does run it
    np.load(tmp_path / "evil-ints.npz", allow_pickle=True)["ints"]
    assert marker.exists()
    marker.unlink()
    np.save(tmp_path / "evil.npy", np.array([Payload()], dtype=object), allow_pickle=True)
    os.replace(tmp_path / "evil.npy", tmp_path / "evil-npy.npz")  # a pickled .npy named .npz
    with pytest.raises(ValueError, match="a single .npy array"):
        Evaluator.load(tmp_path / "evil-npy.npz")
    with open(tmp_path / "raw.npz", "wb") as f:
        pickle.dump(Payload(), f)  # a bare pickle
    with pytest.raises(ValueError, match=r"not a \.npz \(zip\) file"):
        Evaluator.load(tmp_path / "raw.npz")
    assert not marker.exists()


def _rewrite(path, dst, **changes):
    members = dict(np.load(path, allow_pickle=False))
    members.update(changes)
    for k in [k for k, v in changes.items() if v is None]:
        del members[k]
    np.savez(dst, **members)
    return dst


def test_load_rejects_corrupt_truncated_foreign_and_future_files(tmp_path):
    ev, path = _saved(tmp_path, confusion=True)
    raw = path.read_bytes()
    cases = {}
    (tmp_path / "empty.npz").write_bytes(b"")
    cases["empty.npz"] = r"not a numbaxent evaluator state \(an empty file\)"
    (tmp_path / "trunc.npz").write_bytes(raw[: len(raw) // 2])
    cases["trunc.npz"] = r"not a numbaxent evaluator state \(cannot read it as .npz"
    import zipfile

    info = zipfile.ZipFile(path).getinfo("ints.npy")
    flipped = bytearray(raw)  # a byte of the compressed data of 'ints': a CRC or zlib error
    n_name, n_extra = np.frombuffer(raw, np.uint16, 2, info.header_offset + 26)  # local header
    flipped[info.header_offset + 30 + int(n_name) + int(n_extra) + 20] ^= 0xFF
    (tmp_path / "flipped.npz").write_bytes(bytes(flipped))
    cases["flipped.npz"] = r"not a numbaxent evaluator state"
    np.savez(tmp_path / "foreign.npz", logits=np.zeros((2, 3)))
    cases["foreign.npz"] = r"foreign.npz: not a numbaxent evaluator state \(no 'format' member\)"
    _rewrite(path, tmp_path / "other.npz", format=np.array("something.else"))
    cases["other.npz"] = r"its format is 'something.else'"
    _rewrite(path, tmp_path / "v2.npz", version=np.array(2))
    cases["v2.npz"] = r"v2.npz: evaluator state format version 2 is not supported \(this " \
                      r"numbaxent reads version 1\)"
    _rewrite(path, tmp_path / "short.npz", ints=np.zeros(3, dtype=np.int64))
    cases["short.npz"] = r"corrupt evaluator state \(member 'ints' has shape \(3,\)"
    _rewrite(path, tmp_path / "nomatrix.npz", matrix=None)
    cases["nomatrix.npz"] = r"no 'matrix' member"
    _rewrite(path, tmp_path / "floatints.npz", ints=ev._ints.astype(np.float64))
    cases["floatints.npz"] = r"member 'ints' has dtype float64"
    counts = ev._ints.copy()
    counts[0] += 1  # n_seen != n_ignored + n_valid
    _rewrite(path, tmp_path / "counts.npz", ints=counts)
    cases["counts.npz"] = r"corrupt evaluator state \(inconsistent counts\)"
    _rewrite(path, tmp_path / "matrixsum.npz", matrix=ev._cm * 2)
    cases["matrixsum.npz"] = r"inconsistent counts"
    _rewrite(path, tmp_path / "smoothing.npz", label_smoothing=np.array(2.0))
    cases["smoothing.npz"] = r"invalid evaluator settings \(label_smoothing must be between"
    _rewrite(path, tmp_path / "huge.npz", num_classes=np.array(10**9))  # checked, not allocated
    cases["huge.npz"] = r"corrupt evaluator state \(member 'ints' has shape \(\d+,\), its " \
                        r"settings need \(3000000\d+,\)\)"
    np.save(tmp_path / "array.npy", np.zeros(3))
    cases["array.npy"] = r"a single .npy array, not a .npz state file"
    for name, pattern in cases.items():
        with pytest.raises(ValueError, match=pattern) as info:
            Evaluator.load(tmp_path / name)
        assert str(tmp_path / name) in str(info.value) and "\n" not in str(info.value), name
    with pytest.raises(FileNotFoundError, match="nope.npz: no such file"):
        Evaluator.load(tmp_path / "nope.npz")


def test_merge_errors_name_every_differing_setting():
    a = Evaluator(4, topk=(1, 2), label_smoothing=0.1, weight=[1, 2, 3, 4])
    with pytest.raises(ValueError, match=r"different configurations \(label_smoothing: 0.1 vs 0.0; "
                                         r"topk: \(1, 2\) vs \(1, 5\); weight: set vs None\)"):
        a.merge(Evaluator(4))
    with pytest.raises(ValueError, match=r"\(weight: different values\)"):
        a.merge(Evaluator(4, topk=(1, 2), label_smoothing=0.1, weight=[1, 2, 3, 5]))
    with pytest.raises(ValueError, match=r"\(num_classes: 4 vs 5; weight: set vs None\)"):
        a.merge(Evaluator(5, topk=(1, 2), label_smoothing=0.1))


@pytest.mark.parametrize("shape", [(600, 50), (900, 8), (30, 3, 5, 7)])
def test_update_chunks_pipeline_equals_one_update_per_chunk(shape, monkeypatch):
    # update_chunks cuts each chunk into one piece per thread, computed as the threads free up and
    # folded in row order: the row path, the column path, K-dim; pieces forced on these small arrays
    import numba

    from numbaxent import _parallel

    if numba.config.NUMBA_NUM_THREADS < 2:
        pytest.skip("needs 2 Numba threads")
    monkeypatch.setattr(_parallel, "MIN_PARALLEL_ELEMENTS", 64)
    rng = np.random.default_rng(9)
    C = shape[1]
    x = (3 * rng.standard_normal(shape)).astype(np.float32)
    t = rng.integers(0, C, (shape[0],) + shape[2:])
    t.reshape(-1)[::5] = -100
    cuts = [0, 1, 2, 40, 41, 150, shape[0] // 2, shape[0]]  # a 1-row chunk is evaluated in place
    cuts = sorted({min(c, shape[0]) for c in cuts})
    chunks = [(x[a:b], t[a:b]) for a, b in zip(cuts[:-1], cuts[1:])]
    old = numba.get_num_threads()
    try:
        numba.set_num_threads(2)
        seen = []
        piped = Evaluator(C, label_smoothing=0.1, topk=(1, 3), confusion=True).update_chunks(
            iter(chunks), callback=seen.append).result()
    finally:
        numba.set_num_threads(old)
    assert seen == [b - a for a, b in zip(cuts[:-1], cuts[1:])]
    one_by_one = Evaluator(C, label_smoothing=0.1, topk=(1, 3), confusion=True)
    for xc, tc in chunks:
        one_by_one.update(xc, tc)
    assert_same(piped, one_by_one.result())
    np.testing.assert_array_equal(piped.confusion, one_by_one.result().confusion)
    flat_x = np.moveaxis(x, 1, -1).reshape(-1, C)
    assert_matches(piped, reference(flat_x, t.reshape(-1), C, eps=0.1, topk=(1, 3)), rtol=2e-5,
                   exact_bins=False)


def test_update_chunks_stops_at_the_first_bad_chunk(monkeypatch):
    import numba

    from numbaxent import _parallel

    if numba.config.NUMBA_NUM_THREADS < 2:
        pytest.skip("needs 2 Numba threads")
    monkeypatch.setattr(_parallel, "MIN_PARALLEL_ELEMENTS", 64)
    x, t = data(n=400, C=60, dtype=np.float32, seed=3)
    bad = t.copy()
    bad[270] = 60  # in the third chunk, in its second piece (the first piece is not added)
    chunks = [(x[a:b], bad[a:b]) for a, b in ((0, 100), (100, 200), (200, 300), (300, 400))]
    old = numba.get_num_threads()
    try:
        numba.set_num_threads(2)
        ev = Evaluator(60)
        with pytest.raises(IndexError, match="target 60 at row 270 is out of range"):
            ev.update_chunks(chunks)
    finally:
        numba.set_num_threads(old)
    # the chunks before the bad one were added, nothing of it or after it
    assert_same(ev.result(), Evaluator(60).update(x[:200], t[:200]).result())
    # a chunk of the wrong shape, and an iterable that fails, likewise
    for third in ((x[200:300, :59], t[200:300]), RuntimeError("disk gone")):
        def gen():
            yield from chunks[:2]
            if isinstance(third, Exception):
                raise third
            yield third
            yield chunks[3]
        old = numba.get_num_threads()
        try:
            numba.set_num_threads(2)
            ev = Evaluator(60)
            with pytest.raises((ValueError, RuntimeError), match="59 classes|disk gone"):
                ev.update_chunks(gen())
        finally:
            numba.set_num_threads(old)
        assert_same(ev.result(), Evaluator(60).update(x[:200], t[:200]).result())
