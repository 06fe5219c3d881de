"""A slow, obviously-correct float64 NumPy reference for cross-entropy and its gradient.

Written straight from the specification (shared/semantics/pytorch-cross-entropy.md), one row at a
time with explicit log-softmax, independently of numbaxent's kernels (it imports nothing from
numbaxent). Used as the expected value in the parity tests, together with golden files produced by
PyTorch itself (tests/make_golden.py).
"""
from __future__ import annotations

import numpy as np


def _log_softmax(row: np.ndarray) -> np.ndarray:
    # CPU log_softmax: x - max - log(sum(exp(x - max))): NaN for all -inf, any +inf or any NaN
    with np.errstate(invalid="ignore", over="ignore", divide="ignore"):
        m = np.max(row) if row.size else -np.inf
        if np.isnan(row).any():
            return np.full_like(row, np.nan)
        shifted = row - m
        return shifted - np.log(np.sum(np.exp(shifted)))


def naive_cross_entropy(x, target, weight=None, ignore_index=-100, reduction="mean",
                        label_smoothing=0.0, grad_output=None, z_loss=0.0, softcap=None,
                        sample_weight=None, normalizer=None):
    """Loss and d(sum(grad_output * loss))/dx in float64, PyTorch's semantics.

    ``x``: (C,), (N, C) or (N, C, d...). ``target``: integer class indices of the loss's shape, or
    probabilities of x's shape. Returns (loss, grad): loss is a float64 scalar for mean/sum, an array
    of the loss's shape for none.
    """
    x = np.asarray(x, dtype=np.float64)
    t = np.asarray(target)
    unbatched = x.ndim == 1
    if unbatched:
        x = x[None]
        t = t[None] if t.shape != (x.shape[1],) else t[None]
    soft = t.shape == x.shape
    n, c = x.shape[:2]
    spatial = x.shape[2:]
    # rows: (N*S, C) with row r = (n, s)
    xr = np.moveaxis(x, 1, -1).reshape(-1, c)
    tr = np.moveaxis(t, 1, -1).reshape(-1, c).astype(np.float64) if soft else t.reshape(-1)
    w = np.ones(c) if weight is None else np.asarray(weight, dtype=np.float64)
    eps = float(label_smoothing)
    R = xr.shape[0]
    sw = np.ones(R) if sample_weight is None else np.asarray(sample_weight, np.float64).reshape(-1)

    losses = np.zeros(R)
    # G[r, c] = d loss_r / d z_rc where z are the (capped) logits, and a per-row gradient via softmax
    dz = np.zeros((R, c))
    valid = np.ones(R, dtype=bool)
    denom = 0.0
    for r in range(R):
        z = xr[r] if softcap is None else softcap * np.tanh(xr[r] / softcap)
        logp = _log_softmax(z)
        with np.errstate(invalid="ignore", over="ignore"):
            p = np.exp(logp)
            lse = (z - logp)[0] if c else -np.inf
        if soft:
            tt = tr[r] * (1 - eps) + eps / c if eps > 0 else tr[r]
            with np.errstate(invalid="ignore"):
                l_r = -np.sum(logp * tt * w)
            G = -(w * tt)  # dL/dlogp
            denom += sw[r]
        else:
            y = int(tr[r])
            if y == ignore_index:
                valid[r] = False
                # an ignored row still backpropagates p * 0 (NaN if its log-softmax is NaN)
                with np.errstate(invalid="ignore"):
                    dz[r] = p * 0.0 - 0.0
                continue
            if not 0 <= y < c:
                raise IndexError(f"Target {y} is out of bounds.")
            G = np.zeros(c)
            G[y] -= (1 - eps) * w[y]
            with np.errstate(invalid="ignore"):
                l_r = -(1 - eps) * w[y] * logp[y]
                if eps > 0:
                    l_r += -(eps / c) * np.sum(w * logp)
                    G -= (eps / c) * w
            denom += w[y] * sw[r]
        with np.errstate(invalid="ignore", over="ignore"):
            if z_loss:
                l_r = l_r + z_loss * lse * lse
            # log_softmax backward: G - p * sum(G); z-loss: 2 z lse p
            gz = G - p * np.sum(G)
            if z_loss:
                gz = gz + 2 * z_loss * lse * p
            if softcap is not None:
                gz = gz * (1 - np.tanh(xr[r] / softcap) ** 2)
        losses[r] = l_r * sw[r]
        dz[r] = gz * sw[r]

    loss_shape = spatial and (n,) + spatial or (n,)
    if unbatched:
        loss_shape = ()
    if soft and sample_weight is None:
        denom = float(R)
    if normalizer is not None:
        denom = float(normalizer)
    with np.errstate(invalid="ignore", divide="ignore"):
        if reduction == "none":
            loss = losses.reshape(loss_shape)
            go = np.ones(R) if grad_output is None else np.broadcast_to(
                np.asarray(grad_output, np.float64), loss_shape).reshape(-1)
        elif reduction == "sum":
            loss = np.sum(losses)
            go = np.full(R, 1.0 if grad_output is None else float(grad_output))
        else:
            loss = np.sum(losses) / np.float64(denom)
            go = np.full(R, np.float64(1.0 if grad_output is None else grad_output) / np.float64(denom))
        go = np.where(valid, go, 0.0)  # ignored rows: gradient p*0, already in dz
        grad_rows = np.where(valid[:, None], dz * go[:, None], dz)
    grad = np.moveaxis(grad_rows.reshape((n,) + spatial + (c,)), -1, 1)
    if unbatched:
        grad = grad[0]
    return loss, grad


def naive_target_grad(x, target, weight=None, reduction="mean", label_smoothing=0.0,
                      grad_output=None, softcap=None, sample_weight=None, normalizer=None):
    """d(sum(grad_output * loss))/d target for probability targets, in float64, one row at a time.

    Per row r: ``loss_r = -s_r sum_c w_c t~_rc logp_rc`` with ``t~ = (1-eps) t + eps/C``, so
    ``d loss_r / d t_rc = -s_r (1-eps) w_c logp_rc`` (the z-loss has no target in it); the upstream
    factor is grad_output (divided by the 'mean' denominator: rows, sum of sample weights, or the
    normalizer)."""
    x = np.asarray(x, dtype=np.float64)
    t = np.asarray(target, dtype=np.float64)
    assert t.shape == x.shape, "probability targets only"
    unbatched = x.ndim == 1
    if unbatched:
        x, t = x[None], t[None]
    n, c = x.shape[:2]
    spatial = x.shape[2:]
    xr = np.moveaxis(x, 1, -1).reshape(-1, c)
    R = xr.shape[0]
    w = np.ones(c) if weight is None else np.asarray(weight, dtype=np.float64)
    sw = np.ones(R) if sample_weight is None else np.asarray(sample_weight, np.float64).reshape(-1)
    eps = float(label_smoothing)
    if reduction == "none":
        loss_shape = () if unbatched else (n,) + spatial
        go = np.ones(R) if grad_output is None else np.broadcast_to(
            np.asarray(grad_output, np.float64), loss_shape).reshape(-1)
    else:
        go = np.full(R, 1.0 if grad_output is None else float(grad_output))
        if reduction == "mean":
            denom = float(normalizer) if normalizer is not None else (
                float(R) if sample_weight is None else float(np.sum(sw)))
            with np.errstate(divide="ignore", invalid="ignore"):
                go = go / np.float64(denom)
    out = np.zeros((R, c))
    for r in range(R):
        z = xr[r] if softcap is None else softcap * np.tanh(xr[r] / softcap)
        logp = _log_softmax(z)
        with np.errstate(invalid="ignore", over="ignore"):
            out[r] = -go[r] * sw[r] * (1.0 - eps) * w * logp
    grad = np.moveaxis(out.reshape((n,) + spatial + (c,)), -1, 1)
    return grad[0] if unbatched else grad


def numeric_grad(f, x, h=1e-6):
    """Central finite differences of the scalar function ``f`` at ``x``, element by element."""
    g = np.zeros_like(x)
    for i in np.ndindex(x.shape):
        xp, xm = x.copy(), x.copy()
        xp[i] += h
        xm[i] -= h
        g[i] = (f(xp) - f(xm)) / (2 * h)
    return g
