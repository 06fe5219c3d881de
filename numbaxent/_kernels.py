"""Fused cross-entropy kernels over canonical array views.

Canonical layout: logits ``x`` are a C-contiguous ``(N, C, S)`` array (``S = d1*...*dk``, 1 for 2-D
input), so "row" ``r = n*S + s`` is the class vector ``x[n, :, s]``: contiguous when ``S == 1``, strided
by ``S`` otherwise (K-dim input is read in its native layout, never transposed into a copy). Targets
are flat over rows: int64 class indices of length ``N*S``, or probabilities in ``x``'s layout.

Every kernel runs in one of three modes over each row, sharing the same row code:

- ``FORWARD``: ``m = max_c x_c``, ``s = sum_c exp(x_c - m)``, ``ls = log s`` and the row's loss
  (``lse = m + ls``; ``m`` and ``ls`` are kept apart, see :func:`row_grad_index`);
- ``FUSED``: the forward, then the gradient row written once while the row is still in cache;
- ``BACKWARD``: the gradient row from the saved ``m, ls`` (one read of ``x``, one write of the
  gradient).

With ``p = exp(x - lse)`` the gradient of ``g_r * loss_r`` is ``g_r * (p_j * a_r - b_rj)`` where, for
class-index targets, ``a = (1-eps) w_y + (eps/C) sum_c w_c`` and ``b_j = (eps/C) w_j + (1-eps) w_y [j=y]``,
and for probability targets ``a = sum_c w_c t~_c`` and ``b_j = w_j t~_j``, ``t~ = (1-eps) t + eps/C``.
Ignored rows have ``g = a = b = 0``, so their gradient is ``p * 0``: zero, or NaN when the row's
log-softmax is NaN, exactly as PyTorch's autograd gives.

Options beyond PyTorch's (all off by default): ``cap`` soft-caps the logits, ``x -> cap*tanh(x/cap)``,
before everything (the gradient is multiplied by ``1 - (x'/cap)^2``; ``cap=None`` compiles the plain
path); ``z`` adds the z-loss ``z * lse^2`` to every valid row (``a += 2 z lse``); per-row sample weights
multiply ``g`` and the row's loss.

Per-row losses are written in float64; the API layer reduces them in a fixed order, so results do not
depend on the number of threads.
"""
from __future__ import annotations

import math

import numpy as np
from numba import prange

from ._jit import jit
from ._math import cap_slope, capped, compute_scratch, compute_zero, exp, like, load, store

FORWARD, FUSED, BACKWARD = 0, 1, 2


# -- row primitives ----------------------------------------------------------------------------------
# ``cap`` is None (plain logits) or the soft-cap value; every primitive reads ``capped(load(row[j]), cap)``.

@jit()
def row_max(row, cap):
    """``max_c x_c`` in the compute type (NaN entries are skipped here; they reach the result through
    ``row_sumexp``, where ``x - m`` is NaN). Soft-capping is monotone, so the cap is applied once, to
    the raw maximum, instead of to every element."""
    m = -like(np.inf, row)
    for j in range(row.shape[0]):
        v = load(row[j])
        if v > m:
            m = v
    return capped(m, cap)


@jit()
def row_sumexp(row, m, cap):
    """``sum_c exp(x_c - m)``."""
    s = compute_zero(row)
    for j in range(row.shape[0]):
        s += exp(capped(load(row[j]), cap) - m)
    return s


@jit()
def row_sumexp_wdot(row, m, w, cap):
    """``(sum_c exp(x_c - m), sum_c w_c (x_c - m))``: the second sum gives the label-smoothing term
    ``sum_c w_c (lse - x_c)`` without cancellation (every ``x_c - m <= 0``)."""
    s = compute_zero(row)
    d = compute_zero(row)
    for j in range(row.shape[0]):
        v = capped(load(row[j]), cap) - m
        s += exp(v)
        d += w[j] * v
    return s, d


@jit()
def row_soft_sums(row, trow, m, w, keep, add, cap, need_exp):
    """For probability targets ``t~ = t*keep + add``: ``(sum exp(x - m), sum w t~, sum w t~ (x - m))``
    (only the middle sum when ``need_exp`` is false)."""
    s = compute_zero(row)
    a = compute_zero(row)
    d = compute_zero(row)
    if need_exp:
        for j in range(row.shape[0]):
            v = capped(load(row[j]), cap) - m
            wt = w[j] * (trow[j] * keep + add)
            s += exp(v)
            a += wt
            d += wt * v
    else:
        for j in range(row.shape[0]):
            a += w[j] * (trow[j] * keep + add)
    return s, a, d


@jit()
def row_is_top1(row, y, xy, m, cap):
    """Whether class ``y`` (logit ``xy``) is the row's argmax, ties going to the lowest index."""
    if not xy >= m:
        return False
    for j in range(y):  # rare: only reached when x_y is the maximum
        if capped(load(row[j]), cap) == m:
            return False
    return True


GRAD_BLOCK = 512  # elements per block of the in-place gradient writers (a 2-4 KB scratch, in L1)


@jit()
def _same_memory(a, b):
    return a.ctypes.data == b.ctypes.data


@jit()
def _copy_block(buf, grow, j0, n):
    for k in range(n):
        store(grow, j0 + k, buf[k])


@jit()
def row_grad_index(row, grow, m, ls, coef, w, wcoef, cap):
    """``grow_j = (p_j * coef - w_j * wcoef) * dx_j`` with ``p_j = exp((x_j - m) - ls)``.

    ``(x - m) - ls`` is PyTorch's order: rounding ``lse = m + ls`` first would cost a confident
    row's target probability its last digits (``ls`` below ``ulp(m)``). When ``grow`` is ``row``
    itself (``out=input``), blocks go through a small scratch array: LLVM's runtime alias check
    sends a loop that reads and writes the same array to its scalar version (3x to 5x slower,
    measured)."""
    n = row.shape[0]
    if not _same_memory(row, grow):
        for j in range(n):
            v = capped(load(row[j]), cap)
            store(grow, j, (exp((v - m) - ls) * coef - w[j] * wcoef) * cap_slope(v, cap))
        return
    buf = compute_scratch(row, min(n, GRAD_BLOCK))
    for j0 in range(0, n, GRAD_BLOCK):
        nb = min(n - j0, GRAD_BLOCK)
        src = row[j0:j0 + nb]
        wb = w[j0:j0 + nb]
        for k in range(nb):
            v = capped(load(src[k]), cap)
            buf[k] = (exp((v - m) - ls) * coef - wb[k] * wcoef) * cap_slope(v, cap)
        _copy_block(buf, grow, j0, nb)


@jit()
def row_grad_soft(row, trow, grow, m, ls, coef, w, g, keep, add, cap):
    """``grow_j = (exp((x_j - m) - ls) * coef - g w_j t~_j) * dx_j``, in place as in
    :func:`row_grad_index`."""
    n = row.shape[0]
    if not _same_memory(row, grow):
        for j in range(n):
            v = capped(load(row[j]), cap)
            store(grow, j, (exp((v - m) - ls) * coef - g * w[j] * (trow[j] * keep + add))
                  * cap_slope(v, cap))
        return
    buf = compute_scratch(row, min(n, GRAD_BLOCK))
    for j0 in range(0, n, GRAD_BLOCK):
        nb = min(n - j0, GRAD_BLOCK)
        src = row[j0:j0 + nb]
        wb = w[j0:j0 + nb]
        tb = trow[j0:j0 + nb]
        for k in range(nb):
            v = capped(load(src[k]), cap)
            buf[k] = (exp((v - m) - ls) * coef - g * wb[k] * (tb[k] * keep + add)) \
                * cap_slope(v, cap)
        _copy_block(buf, grow, j0, nb)


# -- one row, every mode -----------------------------------------------------------------------------
@jit()
def index_row(row, grow, y, valid, w, wsum, eps, eps_c, z, cap, mode, g, m, ls):
    """One row with a class-index target: returns ``(loss, m, ls, top1)``, the loss in float64
    (before the sample weight, which is folded into ``g`` and applied by the caller to the loss),
    ``m`` the row's max and ``ls = log sum exp(x - m)`` (so ``lse = m + ls``), and writes the
    gradient row in FUSED/BACKWARD mode. ``m`` and ``ls`` are inputs in BACKWARD mode only."""
    loss = 0.0
    top1 = False
    if mode != BACKWARD:
        m = row_max(row, cap)
        if eps_c > 0 and valid:
            s, d = row_sumexp_wdot(row, m, w, cap)
        else:
            s = row_sumexp(row, m, cap)
            d = compute_zero(row)
        ls = math.log(s)
        if valid:
            xy = capped(load(row[y]), cap)
            nll = (np.float64(m) - np.float64(xy)) + np.float64(ls)
            loss = (1.0 - eps) * np.float64(w[y]) * nll
            if eps_c > 0:
                loss += eps_c * (np.float64(wsum) * np.float64(ls) - np.float64(d))
            if z != 0:
                loss += z * (np.float64(m) + np.float64(ls)) ** 2
            top1 = row_is_top1(row, y, xy, m, cap)
    if mode != FORWARD:
        if valid:
            gv = g
            wy = np.float64(w[y])
            xy = capped(load(row[y]), cap)  # read before the row may be overwritten (out=input)
        else:
            gv = 0.0
            wy = 0.0
            xy = compute_zero(row)
        a = (1.0 - eps) * wy + eps_c * np.float64(wsum)
        if z != 0:
            a += 2.0 * z * (np.float64(m) + np.float64(ls))
        coef = like(gv * a, row)
        wcoef = like(gv * eps_c, row)
        row_grad_index(row, grow, m, ls, coef, w, wcoef, cap)
        if valid:  # the true-class term, in the compute type before the single rounding to storage
            gy = exp((xy - m) - ls) * coef - w[y] * wcoef - like(gv * (1.0 - eps) * wy, row)
            store(grow, y, gy * cap_slope(xy, cap))
    return loss, m, ls, top1


@jit()
def prob_row(row, trow, grow, w, keep, add, z, cap, mode, g, m, ls):
    """One row with a probability target ``t~ = t*keep + add``: returns ``(loss, m, ls)``."""
    loss = 0.0
    if mode != BACKWARD:
        m = row_max(row, cap)
        s, a, d = row_soft_sums(row, trow, m, w, keep, add, cap, True)
        ls = math.log(s)
        loss = np.float64(ls) * np.float64(a) - np.float64(d)
        if z != 0:
            loss += z * (np.float64(m) + np.float64(ls)) ** 2
    else:
        s, a, d = row_soft_sums(row, trow, m, w, keep, add, cap, False)
    if mode != FORWARD:
        coef = g * np.float64(a)
        if z != 0:
            coef += g * 2.0 * z * (np.float64(m) + np.float64(ls))
        row_grad_soft(row, trow, grow, m, ls, like(coef, row), w, like(g, row), keep, add, cap)
    return loss, m, ls


# -- parallel kernels --------------------------------------------------------------------------------
@jit(parallel=True)
def index_kernel(x, target, w, wsum, ignore_index, eps, z, cap, mode, g, sw, mx, lsx, loss, top1,
                 grad):
    """Cross-entropy with class-index targets over all rows of ``x`` (N, C, S).

    Parameters
    ----------
    x : (N, C, S) logits, C-contiguous (float32/float64, or 16-bit storage of float16/bfloat16)
    target : (N*S,) int64 class indices, already validated (in range or equal to ``ignore_index``)
    w : (C,) class weights in the compute type (ones when the user gave none); ``wsum = sum(w)``
    eps : label smoothing; ``z`` : z-loss coefficient; ``cap`` : soft-cap value or None
    mode : FORWARD, FUSED or BACKWARD
    g : upstream gradient per row (N*S,) float64, or (1,) for the same value on every row
    sw : per-row sample weights (N*S,) float64, or (1,) for none
    mx, lsx : (N*S,) row max ``m`` and ``log sum exp(x - m)`` (the log-sum-exp is their sum),
        written (FORWARD, FUSED) or read (BACKWARD)
    loss : (N*S,) float64, receives ``sw_r * l_r``; top1 : (N*S,) bool, argmax == target (FORWARD, FUSED)
    grad : gradient, same shape and dtype as ``x`` (may be ``x`` itself); unused in FORWARD mode
    """
    N, C, S = x.shape
    R = N * S
    x2 = x.reshape((N, C * S))
    g2 = grad.reshape((grad.shape[0], grad.shape[1] * grad.shape[2]))
    eps_c = eps / C
    per_row_g = g.shape[0] == R
    per_row_sw = sw.shape[0] == R
    for r in prange(R):
        n = r // S
        s = r - n * S
        y = target[r]
        valid = y != ignore_index
        swr = sw[r] if per_row_sw else sw[0]
        gr = (g[r] if per_row_g else g[0]) * swr
        gn = n if mode != FORWARD else 0
        if S == 1:
            lr, mr, lsr, tr = index_row(x2[n], g2[gn], y, valid, w, wsum, eps, eps_c, z, cap, mode,
                                        gr, mx[r], lsx[r])
        else:
            gs = s if mode != FORWARD else 0
            lr, mr, lsr, tr = index_row(x[n, :, s], grad[gn, :, gs], y, valid, w, wsum, eps, eps_c,
                                        z, cap, mode, gr, mx[r], lsx[r])
        if mode != BACKWARD:
            loss[r] = lr * swr if valid else 0.0
            mx[r] = mr
            lsx[r] = lsr
            top1[r] = tr


@jit(parallel=True)
def prob_kernel(x, t, w, keep, add, z, cap, mode, g, sw, mx, lsx, loss, grad):
    """Cross-entropy with probability targets ``t`` (same layout as ``x``, in the compute type).

    ``t~ = t*keep + add`` (``keep = 1 - eps``, ``add = eps/C``; 1 and 0 without smoothing). Other
    arguments as in :func:`index_kernel`.
    """
    N, C, S = x.shape
    R = N * S
    x2 = x.reshape((N, C * S))
    t2 = t.reshape((N, C * S))
    g2 = grad.reshape((grad.shape[0], grad.shape[1] * grad.shape[2]))
    per_row_g = g.shape[0] == R
    per_row_sw = sw.shape[0] == R
    for r in prange(R):
        n = r // S
        s = r - n * S
        swr = sw[r] if per_row_sw else sw[0]
        gr = (g[r] if per_row_g else g[0]) * swr
        gn = n if mode != FORWARD else 0
        if S == 1:
            lr, mr, lsr = prob_row(x2[n], t2[n], g2[gn], w, keep, add, z, cap, mode, gr, mx[r],
                                   lsx[r])
        else:
            gs = s if mode != FORWARD else 0
            lr, mr, lsr = prob_row(x[n, :, s], t[n, :, s], grad[gn, :, gs], w, keep, add, z, cap,
                                   mode, gr, mx[r], lsx[r])
        if mode != BACKWARD:
            loss[r] = lr * swr
            mx[r] = mr
            lsx[r] = lsr


@jit()
def check_targets(target, w, sw, ignore_index, C):
    """Validate class-index targets and total their weights in one serial pass.

    Returns ``(first_bad, W, n_valid)``: the flat position of the first target that is neither
    ``ignore_index`` nor in ``[0, C)`` (-1 if none), ``W = sum_{valid r} sw_r w[y_r]`` in float64 (the
    'mean' denominator; ``sw`` is (R,) or (1,) for all ones) and the number of valid targets.
    """
    total = 0.0
    n_valid = 0
    per_row_sw = sw.shape[0] == target.shape[0]
    for r in range(target.shape[0]):
        y = target[r]
        if y == ignore_index:
            continue
        if y < 0 or y >= C:
            return r, total, n_valid
        total += np.float64(w[y]) * (sw[r] if per_row_sw else sw[0])
        n_valid += 1
    return -1, total, n_valid
