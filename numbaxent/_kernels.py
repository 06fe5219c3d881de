"""Fused cross-entropy kernels over canonical array views.

Canonical layout: logits `x` are a C-contiguous `(N, C, S)` array (`S = d1*...*dk`, 1 for 2-D
input), so "row" `r = n*S + s` is the class vector `x[n, :, s]`: contiguous when `S == 1` (the row
kernels), strided by `S` otherwise (the column kernels: K-dim input is read in its native layout,
never transposed into a copy). Targets
are flat over rows: int64 class indices of length `N*S`, or probabilities in `x`'s layout.

Every kernel runs in one of three modes over each row, sharing the same row code:

- `FORWARD`: `m = max_c x_c`, `s = sum_c exp(x_c - m)`, `ls = log s` and the row's loss
  (`lse = m + ls`; `m` and `ls` are kept apart, see `row_grad_index`);
- `FUSED`: the forward, then the gradient row written once while the row is still in cache;
- `BACKWARD`: the gradient row from the saved `m, ls` (one read of `x`, one write of the
  gradient).

With `p = exp(x - lse)` the gradient of `g_r * loss_r` is `g_r * (p_j * a_r - b_rj)` where, for
class-index targets, `a = (1-eps) w_y + (eps/C) sum_c w_c` and `b_j = (eps/C) w_j + (1-eps) w_y [j=y]`,
and for probability targets `a = sum_c w_c t~_c` and `b_j = w_j t~_j`, `t~ = (1-eps) t + eps/C`.
Ignored rows have `g = a = b = 0`, so their gradient is `p * 0`: zero, or NaN when the row's
log-softmax is NaN, exactly as PyTorch's autograd gives.

Options beyond PyTorch's (all off by default): `cap` soft-caps the logits, `x -> cap*tanh(x/cap)`,
before everything (the gradient is multiplied by `1 - (x'/cap)^2`; `cap=None` compiles the plain
path); `z` adds the z-loss `z * lse^2` to every valid row (`a += 2 z lse`); per-row sample weights
multiply `g` and the row's loss.

Per-row losses are written in float64; the API layer reduces them in a fixed order, so results do not
depend on the number of threads.
"""
from __future__ import annotations

import math

import numpy as np

from ._jit import jit
from ._math import (cap_slope, capped, compute_scratch, compute_zero, exact_storage, exp_nonpos, like,
                    load, log, one_like, store)

FORWARD, FUSED, BACKWARD = 0, 1, 2


MAX_LANES = 256  # running maxima of row_max_lanes (1-2 KB, in L1)


# -- row primitives ----------------------------------------------------------------------------------
# `cap` is None (plain logits) or the soft-cap value; every primitive reads `capped(load(row[j]), cap)`.

@jit()
def row_max_lanes(row, cap, lanes):
    """`max_c x_c` in the compute type (NaN entries are skipped here; they reach the result through
    `row_sumexp`, where `x - m` is NaN). Soft-capping is monotone, so the cap is applied once, to
    the raw maximum, instead of to every element. `lanes`: a (MAX_LANES,) compute-type scratch."""
    n = row.shape[0]
    if n <= MAX_LANES:
        m = -like(np.inf, row)
        for j in range(n):
            v = load(row[j])
            m = v if v > m else m
        return capped(m, cap)
    # LLVM will not vectorise `m = v if v > m else m` as a reduction (without 'nnan' it may not
    # reorder it): one element per compare-select latency. An array of MAX_LANES running maxima,
    # updated element-wise block by block (a loop LLVM does vectorise), then merged, is ~5x faster.
    # NaN never enters a lane.
    for k in range(MAX_LANES):  # a loop, not `lanes[:] = ...`: slice assignment is slow to compile
        lanes[k] = -like(np.inf, row)
    for j0 in range(0, n, MAX_LANES):
        blk = row[j0:j0 + MAX_LANES]
        for k in range(blk.shape[0]):
            v = load(blk[k])
            lanes[k] = v if v > lanes[k] else lanes[k]
    h = MAX_LANES // 2
    while h >= 8:  # fold in halves (vectorised), not one lane after the other (a latency chain)
        for k in range(h):
            lanes[k] = lanes[k + h] if lanes[k + h] > lanes[k] else lanes[k]
        h //= 2
    m = -like(np.inf, row)
    for k in range(8):
        m = lanes[k] if lanes[k] > m else m
    return capped(m, cap)


@jit()
def row_sumexp(row, m, cap, stash, keep_exp):
    """`sum_c exp(x_c - m)`; with `keep_exp` each `exp(x_c - m)` is also written to `stash`
    (the gradient row, never `row` itself). See `row_grad_from_exp`. A flag rather than
    `stash=None`: one compiled function instead of two. The loop is written twice on purpose:
    LLVM's default pipeline does not unswitch a loop on a flag that guards a store, and a masked
    store would slow the hot loop."""
    s = compute_zero(row)
    if keep_exp:
        for j in range(row.shape[0]):
            e = exp_nonpos(capped(load(row[j]), cap) - m)
            s += e
            stash[j] = e
    else:
        for j in range(row.shape[0]):
            s += exp_nonpos(capped(load(row[j]), cap) - m)
    return s


@jit()
def row_sumexp_wdot(row, m, w, cap, stash, keep_exp):
    """`(sum_c exp(x_c - m), sum_c w_c (x_c - m))`: the second sum gives the label-smoothing term
    `sum_c w_c (lse - x_c)` without cancellation (every `x_c - m <= 0`). `stash` and
    `keep_exp` as in `row_sumexp`."""
    s = compute_zero(row)
    d = compute_zero(row)
    if keep_exp:  # two loops, as in row_sumexp
        for j in range(row.shape[0]):
            v = capped(load(row[j]), cap) - m
            e = exp_nonpos(v)
            s += e
            d += w[j] * v
            stash[j] = e
    else:
        for j in range(row.shape[0]):
            v = capped(load(row[j]), cap) - m
            s += exp_nonpos(v)
            d += w[j] * v
    return s, d


@jit()
def row_grad_from_exp(grow, scale, w, wcoef):
    """`grow_j = e_j * scale - w_j * wcoef` where `grow` holds `e_j = exp(x_j - m)` from the
    sum pass and `scale = coef / s`: the fused call's gradient without a second exp per element
    (`p_j = e_j / s` is within 2 ulp of `exp((x_j - m) - ls)`). Only for float32/float64
    gradients, without soft-capping (whose slope needs `x_j`)."""
    for j in range(grow.shape[0]):
        grow[j] = grow[j] * scale - w[j] * wcoef


@jit()
def row_soft_sums(row, trow, m, w, keep, add, cap, need_exp, stash, keep_exp):
    """For probability targets `t~ = t*keep + add`: `(sum exp(x - m), sum w t~, sum w t~ (x - m))`
    (only the middle sum when `need_exp` is false). `stash`, `keep_exp` as in
    `row_sumexp`."""
    s = compute_zero(row)
    a = compute_zero(row)
    d = compute_zero(row)
    if need_exp and keep_exp:  # two loops, as in row_sumexp
        for j in range(row.shape[0]):
            v = capped(load(row[j]), cap) - m
            wt = w[j] * (trow[j] * keep + add)
            e = exp_nonpos(v)
            s += e
            a += wt
            d += wt * v
            stash[j] = e
    elif need_exp:
        for j in range(row.shape[0]):
            v = capped(load(row[j]), cap) - m
            wt = w[j] * (trow[j] * keep + add)
            s += exp_nonpos(v)
            a += wt
            d += wt * v
    else:
        for j in range(row.shape[0]):
            a += w[j] * (trow[j] * keep + add)
    return s, a, d


@jit()
def row_grad_soft_from_exp(grow, trow, scale, w, g, keep, add):
    """`row_grad_from_exp` for probability targets: `grow_j = e_j scale - g w_j t~_j`."""
    for j in range(grow.shape[0]):
        grow[j] = grow[j] * scale - g * w[j] * (trow[j] * keep + add)


@jit()
def row_is_top1(row, y, xy, m, cap):
    """Whether class `y` (logit `xy`) is the row's argmax, ties going to the lowest index."""
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
    """`grow_j = (p_j * coef - w_j * wcoef) * dx_j` with `p_j = exp((x_j - m) - ls)`.

    `(x - m) - ls` is PyTorch's order: rounding `lse = m + ls` first would cost a confident
    row's target probability its last digits (`ls` below `ulp(m)`). When `grow` is `row`
    itself (`out=input`), blocks go through a small scratch array: LLVM's runtime alias check
    sends a loop that reads and writes the same array to its scalar version (3x to 5x slower,
    measured)."""
    n = row.shape[0]
    if not _same_memory(row, grow):
        for j in range(n):
            v = capped(load(row[j]), cap)
            store(grow, j, (exp_nonpos((v - m) - ls) * coef - w[j] * wcoef) * cap_slope(v, cap))
        return
    buf = compute_scratch(row, min(n, GRAD_BLOCK))
    for j0 in range(0, n, GRAD_BLOCK):
        nb = min(n - j0, GRAD_BLOCK)
        src = row[j0:j0 + nb]
        wb = w[j0:j0 + nb]
        for k in range(nb):
            v = capped(load(src[k]), cap)
            buf[k] = (exp_nonpos((v - m) - ls) * coef - wb[k] * wcoef) * cap_slope(v, cap)
        _copy_block(buf, grow, j0, nb)


@jit()
def row_grad_soft(row, trow, grow, m, ls, coef, w, g, keep, add, cap):
    """`grow_j = (exp((x_j - m) - ls) * coef - g w_j t~_j) * dx_j`, in place as in
    `row_grad_index`."""
    n = row.shape[0]
    if not _same_memory(row, grow):
        for j in range(n):
            v = capped(load(row[j]), cap)
            store(grow, j, (exp_nonpos((v - m) - ls) * coef - g * w[j] * (trow[j] * keep + add))
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
            buf[k] = (exp_nonpos((v - m) - ls) * coef - g * wb[k] * (tb[k] * keep + add)) \
                * cap_slope(v, cap)
        _copy_block(buf, grow, j0, nb)


@jit()
def keeps_exp(row, grow, cap, mode):
    """Whether the fused call keeps `exp(x - m)` in the gradient row between its sum and gradient
    passes instead of computing it twice: for a float32/float64 gradient that is not the logits
    (`out=input` takes the two-exp path: a loop writing the array it reads would be run scalar by
    LLVM's overlap check), without soft-cap (whose slope needs `x`)."""
    if mode != FUSED or cap is not None or not exact_storage(row):
        return False
    return not _same_memory(row, grow)


# -- per-row formulas shared by the row and column kernels -------------------------------------------
@jit()
def index_loss(m, ls, xy, d, wy, wsum, eps, eps_c, z):
    """Loss of a valid row in float64: `(1-eps) w_y (lse - x_y) + (eps/C) (W lse - sum_c w_c x_c)
    + z lse^2` with `lse = m + ls`, `W = sum_c w_c` and `d = sum_c w_c (x_c - m)`."""
    loss = (1.0 - eps) * np.float64(wy) * ((np.float64(m) - np.float64(xy)) + np.float64(ls))
    if eps_c > 0:
        loss += eps_c * (np.float64(wsum) * np.float64(ls) - np.float64(d))
    if z != 0:
        loss += z * (np.float64(m) + np.float64(ls)) ** 2
    return loss


@jit()
def index_grad_scale(m, ls, wy, wsum, eps, eps_c, z):
    """`a` of the module docstring: `(1-eps) w_y + (eps/C) W + 2 z lse`."""
    a = (1.0 - eps) * wy + eps_c * np.float64(wsum)
    if z != 0:
        a += 2.0 * z * (np.float64(m) + np.float64(ls))
    return a


@jit()
def prob_loss(m, ls, a, d, z):
    """Loss of a probability-target row: `lse sum_c w_c t~_c - sum_c w_c t~_c x_c + z lse^2` written
    as `ls a - d + z lse^2` with `a = sum w t~` and `d = sum w t~ (x - m)`."""
    loss = np.float64(ls) * np.float64(a) - np.float64(d)
    if z != 0:
        loss += z * (np.float64(m) + np.float64(ls)) ** 2
    return loss


@jit()
def prob_grad_scale(m, ls, a, z):
    """`a + 2 z lse` for probability targets."""
    c = np.float64(a)
    if z != 0:
        c += 2.0 * z * (np.float64(m) + np.float64(ls))
    return c


# -- one row, every mode -----------------------------------------------------------------------------
@jit()
def index_row(row, grow, y, valid, w, wsum, eps, eps_c, z, cap, mode, g, m, ls, lanes):
    """One row with a class-index target: returns `(loss, m, ls, top1)`, the loss in float64
    (before the sample weight, which is folded into `g` and applied by the caller to the loss),
    `m` the row's max and `ls = log sum exp(x - m)` (so `lse = m + ls`), and writes the
    gradient row in FUSED/BACKWARD mode. `m` and `ls` are inputs in BACKWARD mode only."""
    loss = 0.0
    top1 = False
    keep_exp = keeps_exp(row, grow, cap, mode)
    xy = compute_zero(row)
    s = one_like(xy)
    if mode != BACKWARD:
        m = row_max_lanes(row, cap, lanes)
        if valid:  # before the sum pass, which may overwrite the row (out=input)
            xy = capped(load(row[y]), cap)
            top1 = row_is_top1(row, y, xy, m, cap)
        if eps_c > 0 and valid:
            s, d = row_sumexp_wdot(row, m, w, cap, grow, keep_exp)
        else:
            s = row_sumexp(row, m, cap, grow, keep_exp)
            d = compute_zero(row)
        ls = math.log(s)
        if valid:
            loss = index_loss(m, ls, xy, d, w[y], wsum, eps, eps_c, z)
    if mode != FORWARD:
        if valid:
            gv = g
            wy = np.float64(w[y])
            xy = capped(load(row[y]), cap) if mode == BACKWARD else xy
        else:
            gv = 0.0
            wy = 0.0
        coef = like(gv * index_grad_scale(m, ls, wy, wsum, eps, eps_c, z), row)
        wcoef = like(gv * eps_c, row)
        if keep_exp:
            row_grad_from_exp(grow, coef / s, w, wcoef)
        else:
            row_grad_index(row, grow, m, ls, coef, w, wcoef, cap)
        if valid:  # the true-class term, in the compute type before the single rounding to storage
            if keep_exp:
                gy = load(grow[y]) - like(gv * (1.0 - eps) * wy, row)
            else:
                gy = exp_nonpos((xy - m) - ls) * coef - w[y] * wcoef \
                    - like(gv * (1.0 - eps) * wy, row)
            store(grow, y, gy * cap_slope(xy, cap))
    return loss, m, ls, top1


@jit()
def prob_row(row, trow, grow, w, keep, add, z, cap, mode, g, m, ls, lanes):
    """One row with a probability target `t~ = t*keep + add`: returns `(loss, m, ls)`."""
    loss = 0.0
    keep_exp = keeps_exp(row, grow, cap, mode)
    if mode != BACKWARD:
        m = row_max_lanes(row, cap, lanes)
        s, a, d = row_soft_sums(row, trow, m, w, keep, add, cap, True, grow, keep_exp)
        ls = math.log(s)
        loss = prob_loss(m, ls, a, d, z)
    else:
        s, a, d = row_soft_sums(row, trow, m, w, keep, add, cap, False, grow, False)
    if mode != FORWARD:
        coef = like(g * prob_grad_scale(m, ls, a, z), row)
        if keep_exp:  # as in index_row
            row_grad_soft_from_exp(grow, trow, coef / s, w, like(g, row), keep, add)
        else:
            row_grad_soft(row, trow, grow, m, ls, coef, w, like(g, row), keep, add, cap)
    return loss, m, ls


# -- parallel kernels --------------------------------------------------------------------------------
@jit(python_callable=True)
def index_kernel(lo, hi, x, target, w, wsum, ignore_index, eps, z, cap, mode, g, sw, mx, lsx, loss,
                 top1, grad):
    """Cross-entropy with class-index targets over all rows of `x` (N, C, 1), one contiguous row
    per sample (1-D and 2-D input; K-dim input always takes `index_cols_kernel`, so the row code
    is compiled for contiguous rows only: a strided variant would double its compile time).

    Parameters
    ----------
    lo, hi : the rows `[lo, hi)` this call works on (`_parallel.run_tasks` deals them to threads)
    x : (N, C, 1) logits, C-contiguous (float32/float64, or 16-bit storage of float16/bfloat16)
    target : (N,) int64 class indices, already validated (in range or equal to `ignore_index`)
    w : (C,) class weights in the compute type (ones when the user gave none); `wsum = sum(w)`
    eps : label smoothing; `z` : z-loss coefficient; `cap` : soft-cap value or None
    mode : FORWARD, FUSED or BACKWARD
    g : upstream gradient per row (N,) float64, or (1,) for the same value on every row
    sw : per-row sample weights (N,) float64, or (1,) for none
    mx, lsx : (N,) row max `m` and `log sum exp(x - m)` (the log-sum-exp is their sum),
        written (FORWARD, FUSED) or read (BACKWARD)
    loss : (N,) float64, receives `sw_r * l_r`; top1 : (N,) bool, argmax == target (FORWARD, FUSED)
    grad : gradient, same shape and dtype as `x` (may be `x` itself); unused in FORWARD mode
    """
    N, C, S = x.shape
    R = N * S
    x2 = x.reshape((N, C * S))
    g2 = grad.reshape((grad.shape[0], grad.shape[1] * grad.shape[2]))
    eps_c = eps / C
    per_row_g = g.shape[0] == R
    per_row_sw = sw.shape[0] == R
    lanes = compute_scratch(x, MAX_LANES)
    for r in range(lo, hi):
        y = target[r]
        valid = y != ignore_index
        swr = sw[r] if per_row_sw else sw[0]
        gr = (g[r] if per_row_g else g[0]) * swr
        gn = r if mode != FORWARD else 0
        lr, mr, lsr, tr = index_row(x2[r], g2[gn], y, valid, w, wsum, eps, eps_c, z, cap, mode, gr,
                                    mx[r], lsx[r], lanes)
        if mode != BACKWARD:
            loss[r] = lr * swr if valid else 0.0
            mx[r] = mr
            lsx[r] = lsr
            top1[r] = tr


@jit(python_callable=True)
def prob_kernel(lo, hi, x, t, w, keep, add, z, cap, mode, g, sw, mx, lsx, loss, grad):
    """Cross-entropy with probability targets `t` (same layout as `x`, in the compute type).

    `t~ = t*keep + add` (`keep = 1 - eps`, `add = eps/C`; 1 and 0 without smoothing). Other
    arguments as in `index_kernel`.
    """
    N, C, S = x.shape
    R = N * S
    x2 = x.reshape((N, C * S))
    t2 = t.reshape((N, C * S))
    g2 = grad.reshape((grad.shape[0], grad.shape[1] * grad.shape[2]))
    per_row_g = g.shape[0] == R
    per_row_sw = sw.shape[0] == R
    lanes = compute_scratch(x, MAX_LANES)
    for r in range(lo, hi):
        swr = sw[r] if per_row_sw else sw[0]
        gr = (g[r] if per_row_g else g[0]) * swr
        gn = r if mode != FORWARD else 0
        lr, mr, lsr = prob_row(x2[r], t2[r], g2[gn], w, keep, add, z, cap, mode, gr, mx[r], lsx[r],
                               lanes)
        if mode != BACKWARD:
            loss[r] = lr * swr
            mx[r] = mr
            lsx[r] = lsr


# -- column blocks: many short or strided rows at once -------------------------------------------------
# A K-dim row is strided by S, and a row of a few classes is too short to fill a vector register: the
# row kernels then run element by element and pay a scalar log per row. The column kernels take a block
# of `nb` rows as a (C, nb) array whose class rows are contiguous -- K-dim input already is one, rows
# `X[n*C + c, s0:s0+nb]` of its (N*C, S) view; short 2-D rows are transposed into an L1-sized scratch
# -- and run each step across the block, so the loops over rows vectorise: max, exp-sum, log, gradient.
# A block is named by `(X, i0, s0, nb)`: class `c` of the block's rows is `X[i0 + c, s0:s0 + nb]`.

COLUMN_MAX_C = 40  # 2-D input with at most this many classes takes the column kernels (measured crossover)
# K-dim input always does (its rows are strided; see index_kernel)
COLUMN_BLOCK_ELEMENTS = 4096  # C * nb: a block and its gradient scratch fit in L1


@jit(python_callable=True)
def column_block_rows(C):
    """Rows per block: `COLUMN_BLOCK_ELEMENTS / C` rounded down to a multiple of 16, in [16, 1024]."""
    nb = COLUMN_BLOCK_ELEMENTS // max(C, 1)
    return max(16, min(1024, nb - nb % 16))


@jit()
def cols_max(X, i0, s0, nb, C, m, cap):
    """`m_b = max_c x_cb` (NaN skipped, as in `row_max_lanes`), then soft-capped."""
    for b in range(nb):
        m[b] = -like(np.inf, m)
    for c in range(C):
        xr = X[i0 + c, s0:s0 + nb]
        for b in range(nb):
            v = load(xr[b])
            m[b] = v if v > m[b] else m[b]
    for b in range(nb):
        m[b] = capped(m[b], cap)


@jit()
def cols_sums(X, T, i0, s0, nb, C, m, s, a, d, w, keep, add, cap, need_exp, E):
    """Per row `b` of the block: `s = sum_c exp(x_c - m)`, `a = sum_c w_c t~_c` and
    `d = sum_c w_c t~_c (x_c - m)`, with `t~ = t*keep + add` for probability targets `T` and
    `t~ = 1` for class-index targets (`T` None; `a` is then left alone). Without `need_exp`
    (probability targets only), only `a`. Each `exp(x_cb - m_b)` is kept in the compute-type scratch `E[c, b]` for
    `cols_grad_from_exp` (a store to L1, cheaper than a second exp)."""
    for b in range(nb):
        s[b] = 0
        d[b] = 0
        if T is not None:
            a[b] = 0
    for c in range(C):
        xr = X[i0 + c, s0:s0 + nb]
        wc = w[c]
        er = E[c]
        if T is None:
            for b in range(nb):
                v = capped(load(xr[b]), cap) - m[b]
                e = exp_nonpos(v)
                s[b] += e
                d[b] += wc * v
                er[b] = e
        else:
            tr = T[i0 + c, s0:s0 + nb]
            if need_exp:
                for b in range(nb):
                    v = capped(load(xr[b]), cap) - m[b]
                    wt = wc * (tr[b] * keep + add)
                    e = exp_nonpos(v)
                    s[b] += e
                    a[b] += wt
                    d[b] += wt * v
                    er[b] = e
            else:
                for b in range(nb):
                    a[b] += wc * (tr[b] * keep + add)


@jit()
def cols_log(s, ls, nb):
    for b in range(nb):
        ls[b] = log(s[b])


@jit()
def cols_grad(X, T, i0, s0, nb, C, m, ls, coef, tcoef, w, keep, add, cap, G, gi0, gs0):
    """`G[gi0 + c, gs0 + b] = (exp((x_cb - m_b) - ls_b) coef_b - w_c tcoef_b t~_cb) dx_cb` (`t~ = 1`
    for class-index targets, `T` None). `G` must not be `X` (the kernels pass a scratch block
    then): LLVM's runtime alias check would send an aliased loop to its scalar version."""
    for c in range(C):
        xr = X[i0 + c, s0:s0 + nb]
        gr = G[gi0 + c, gs0:gs0 + nb]
        wc = w[c]
        if T is None:
            for b in range(nb):
                v = capped(load(xr[b]), cap)
                p = exp_nonpos((v - m[b]) - ls[b])
                store(gr, b, (p * coef[b] - wc * tcoef[b]) * cap_slope(v, cap))
        else:
            tr = T[i0 + c, s0:s0 + nb]
            for b in range(nb):
                v = capped(load(xr[b]), cap)
                p = exp_nonpos((v - m[b]) - ls[b])
                store(gr, b, (p * coef[b] - wc * tcoef[b] * (tr[b] * keep + add)) * cap_slope(v, cap))


@jit()
def cols_grad_from_exp(E, T, i0, s0, nb, C, scale, tcoef, w, keep, add, G, gi0, gs0):
    """`cols_grad` from the exponentials kept by `cols_sums` (fused call, no soft-cap):
    `G[gi0 + c, gs0 + b] = E[c, b] scale_b - w_c tcoef_b t~_cb` with `scale_b = coef_b / s_b`
    (`E/s` is within 2 ulp of `exp((x - m) - ls)`)."""
    for c in range(C):
        er = E[c]
        gr = G[gi0 + c, gs0:gs0 + nb]
        wc = w[c]
        if T is None:
            for b in range(nb):
                store(gr, b, er[b] * scale[b] - wc * tcoef[b])
        else:
            tr = T[i0 + c, s0:s0 + nb]
            for b in range(nb):
                store(gr, b, er[b] * scale[b] - wc * tcoef[b] * (tr[b] * keep + add))


@jit()
def cols_targets(X, i0, s0, nb, target, r0, ignore_index, w, cap, yv, ok, xy, wy):
    """Gather each row's target: `ok` (not ignored), `yv` (the class, 0 when ignored), `xy` its
    (capped) logit and `wy` its weight (0 when ignored). The one scalar loop of a block."""
    for b in range(nb):
        y = target[r0 + b]
        valid = y != ignore_index
        yc = y if valid else 0
        yv[b] = yc
        ok[b] = valid
        xy[b] = capped(load(X[i0 + yc, s0 + b]), cap)
        wy[b] = w[yc] if valid else compute_zero(w)


@jit()
def _transpose_in(X, n0, nb, C, dst):
    # flat indices with a loop-invariant stride: the inner loop compiles to gathers
    flat = X[n0:n0 + nb].reshape(nb * C)
    for c in range(C):
        dr = dst[c]
        for b in range(nb):
            dr[b] = flat[b * C + c]


@jit()
def _transpose_out(src, n0, nb, C, X):
    flat = X[n0:n0 + nb].reshape(nb * C)
    for c in range(C):
        sr = src[c]
        for b in range(nb):
            flat[b * C + c] = sr[b]


@jit()
def _copy_out(src, i0, s0, nb, C, X):
    for c in range(C):
        xr = X[i0 + c, s0:s0 + nb]
        sr = src[c]
        for b in range(nb):
            xr[b] = sr[b]


@jit()
def _block_source(X, XT, S, n, nb, C):
    """The array a block's class rows are read from: `X` itself (K-dim), or for 2-D input the
    block's rows `n .. n+nb` transposed into the scratch `XT`."""
    if S == 1:
        _transpose_in(X, n, nb, C, XT)
        return XT
    return X


@jit()
def _block_write_grad(GT, GX, S, scratch_grad, n, i0, s0, nb, C):
    """Move a block's gradient from the scratch `GT` to the gradient `GX` (transposed back for
    2-D input; copied for K-dim written in place); nothing when it was written to `GX` directly."""
    if S == 1:
        _transpose_out(GT, n, nb, C, GX)
    elif scratch_grad:
        _copy_out(GT, i0, s0, nb, C, GX)


@jit()
def column_views(a, S):
    """`a` (N, C, S) as the 2-D C-contiguous array the blocks index: (N, C) when `S == 1` (rows
    are transposed into scratch) and (N*C, S) otherwise."""
    if S == 1:
        return a.reshape((a.shape[0], a.shape[1] * a.shape[2]))
    return a.reshape((a.shape[0] * a.shape[1], a.shape[2]))


@jit()
def column_block(blk, N, C, S, nbmax):
    """Block `blk` as `(n, i0, s0, nb, r0)`: sample `n`, first class row `i0` and position
    `s0` in the (N*C, S) view (`i0 = s0 = 0` for a transposed scratch), rows and first flat row."""
    if S == 1:
        n0 = blk * nbmax
        nb = min(nbmax, N - n0)
        return n0, 0, 0, nb, n0
    per_n = (S + nbmax - 1) // nbmax
    n = blk // per_n
    s0 = (blk - n * per_n) * nbmax
    return n, n * C, s0, min(nbmax, S - s0), n * S + s0


@jit()
def sum_in_order(a):
    """`a[0] + a[1] + ...` from 0.0, left to right: the column kernels' per-block loss sums, and
    `block_sums`, must round the same way."""
    total = 0.0
    for i in range(a.shape[0]):
        total += a[i]
    return total


@jit(python_callable=True)
def block_sums(loss, N, S, nbmax):
    """Per-block sums of per-row float64 losses, each block summed as the column kernels sum it
    when they write no per-row output: so a reduced loss has the same bits whether a caller asked
    for per-row losses or not."""
    out = np.empty(column_count(N, S, nbmax), np.float64)
    for blk in range(out.shape[0]):
        _, _, _, nb, r0 = column_block(blk, N, 0, S, nbmax)  # C only offsets i0, unused here
        out[blk] = sum_in_order(loss[r0:r0 + nb])
    return out


@jit(python_callable=True)
def column_count(N, S, nbmax):
    if S == 1:
        return (N + nbmax - 1) // nbmax
    return N * ((S + nbmax - 1) // nbmax)


@jit()
def _load_saved(mx, lsx, r0, nb, m, ls):
    """BACKWARD: the block's saved row max and log-sum into `m` and `ls`."""
    for b in range(nb):
        m[b] = mx[r0 + b]
        ls[b] = lsx[r0 + b]


@jit()
def cols_block_grad(src, T, E, i0, s0, nb, C, m, ls, s, coef, tcoef, w, keep, add, cap, mode, G,
                    gi0, gs0):
    """Write a block's gradient (without the class-index true-class term) into `G`: from the
    exponentials kept in `E` by the sum pass when the call is FUSED without soft-cap (`s` then
    becomes the per-row scale `coef / s`), else by `cols_grad`. Returns whether `E` was
    used."""
    if mode == FUSED and cap is None:
        for b in range(nb):
            s[b] = coef[b] / s[b]
        cols_grad_from_exp(E, T, i0, s0, nb, C, s, tcoef, w, keep, add, G, gi0, gs0)
        return True
    cols_grad(src, T, i0, s0, nb, C, m, ls, coef, tcoef, w, keep, add, cap, G, gi0, gs0)
    return False


@jit()
def _row_factor(g, sw, r, per_row_g, per_row_sw):
    """`g_r * sw_r`: upstream gradient times sample weight (each (R,) or a single shared value)."""
    return (g[r] if per_row_g else g[0]) * (sw[r] if per_row_sw else sw[0])


@jit(python_callable=True)
def index_cols_kernel(lo, hi, x, target, w, wsum, ignore_index, eps, z, cap, mode, g, sw, mx, lsx,
                      loss, top1, grad, rows_out):
    """`index_kernel` over the column blocks `[lo, hi)` (of `column_count`; other
    arguments and results the same).

    `rows_out=False` (forward for a 'sum'/'mean' caller) writes no per-row output: `loss` is
    then `(column_count(...),)` and receives each block's float64 loss sum, `mx, lsx, top1` are
    untouched. Per-row outputs of many short rows cost as much memory traffic as the logits; blocks
    depend on `C` only, so the partial sums do not depend on the thread count."""
    N, C, S = x.shape
    R = N * S
    X = column_views(x, S)
    GX = column_views(grad, grad.shape[2])
    nbmax = column_block_rows(C)
    eps_c = eps / C
    per_row_g = g.shape[0] == R
    per_row_sw = sw.shape[0] == R
    scratch_grad = mode != FORWARD and (S == 1 or _same_memory(x, grad))
    XT = np.empty((C, nbmax if S == 1 else 0), x.dtype)
    GT = np.empty((C, nbmax if scratch_grad else 0), x.dtype)
    E = compute_scratch(x, C * nbmax).reshape((C, nbmax))
    m = compute_scratch(x, nbmax)
    s = compute_scratch(x, nbmax)
    d = compute_scratch(x, nbmax)
    ls = compute_scratch(x, nbmax)
    xy = compute_scratch(x, nbmax)
    wy = compute_scratch(x, nbmax)
    coef = compute_scratch(x, nbmax)
    tcoef = compute_scratch(x, nbmax)
    yv = np.empty(nbmax, np.int64)
    ok = np.empty(nbmax, np.bool_)
    lrow = np.empty(nbmax if not rows_out else 0, np.float64)
    for blk in range(lo, hi):
        n, i0, s0, nb, r0 = column_block(blk, N, C, S, nbmax)
        src = _block_source(X, XT, S, n, nb, C)
        if mode != BACKWARD:
            cols_max(src, i0, s0, nb, C, m, cap)
            cols_sums(src, None, i0, s0, nb, C, m, s, s, d, w, 1, 0, cap, True, E)
            cols_log(s, ls, nb)
        else:
            _load_saved(mx, lsx, r0, nb, m, ls)
        cols_targets(src, i0, s0, nb, target, r0, ignore_index, w, cap, yv, ok, xy, wy)
        if mode != BACKWARD:
            lb = loss[r0:r0 + nb] if rows_out else lrow[:nb]
            for b in range(nb):
                lb[b] = index_loss(m[b], ls[b], xy[b], d[b], wy[b], wsum, eps, eps_c, z)
            if per_row_sw:
                for b in range(nb):
                    lb[b] *= sw[r0 + b]
            elif sw[0] != 1:
                for b in range(nb):
                    lb[b] *= sw[0]
            for b in range(nb):
                if not ok[b]:
                    lb[b] = 0.0
            if not rows_out:
                loss[blk] = sum_in_order(lb)
            else:
                for b in range(nb):
                    r = r0 + b
                    mx[r] = m[b]
                    lsx[r] = ls[b]
                    top1[r] = ok[b] & (xy[b] >= m[b])
                for b in range(nb):  # ties for the maximum go to the lowest class
                    if top1[r0 + b] and yv[b] > 0:
                        top1[r0 + b] = row_is_top1(src[i0:i0 + yv[b] + 1, s0 + b], yv[b],
                                                   xy[b], m[b], cap)
        if mode == FORWARD:
            continue
        for b in range(nb):
            gv = _row_factor(g, sw, r0 + b, per_row_g, per_row_sw) if ok[b] else 0.0
            coef[b] = like(gv * index_grad_scale(m[b], ls[b], wy[b], wsum, eps, eps_c, z), x)
            tcoef[b] = like(gv * eps_c, x)
        dst, gi0, gs0 = (GT, 0, 0) if scratch_grad else (GX, i0, s0)
        from_exp = cols_block_grad(src, None, E, i0, s0, nb, C, m, ls, s, coef, tcoef, w, 1, 0,
                                   cap, mode, dst, gi0, gs0)
        for b in range(nb):  # the true-class term, as in index_row
            if ok[b]:
                term = like(_row_factor(g, sw, r0 + b, per_row_g, per_row_sw) * (1.0 - eps)
                            * np.float64(wy[b]), x)
                if from_exp:
                    gy = E[yv[b], b] * s[b] - wy[b] * tcoef[b] - term
                else:
                    gy = exp_nonpos((xy[b] - m[b]) - ls[b]) * coef[b] - wy[b] * tcoef[b] - term
                store(dst[gi0 + yv[b]], gs0 + b, gy * cap_slope(xy[b], cap))
        _block_write_grad(GT, GX, S, scratch_grad, n, i0, s0, nb, C)


@jit(python_callable=True)
def prob_cols_kernel(lo, hi, x, t, w, keep, add, z, cap, mode, g, sw, mx, lsx, loss, grad, rows_out):
    """`prob_kernel` over the column blocks `[lo, hi)` (`rows_out` as in
    `index_cols_kernel`)."""
    N, C, S = x.shape
    R = N * S
    X = column_views(x, S)
    TX = column_views(t, S)
    GX = column_views(grad, grad.shape[2])
    nbmax = column_block_rows(C)
    per_row_g = g.shape[0] == R
    per_row_sw = sw.shape[0] == R
    scratch_grad = mode != FORWARD and (S == 1 or _same_memory(x, grad))
    XT = np.empty((C, nbmax if S == 1 else 0), x.dtype)
    TT = np.empty((C, nbmax if S == 1 else 0), t.dtype)
    GT = np.empty((C, nbmax if scratch_grad else 0), x.dtype)
    E = compute_scratch(x, C * nbmax).reshape((C, nbmax))
    m = compute_scratch(x, nbmax)
    s = compute_scratch(x, nbmax)
    a = compute_scratch(x, nbmax)
    d = compute_scratch(x, nbmax)
    ls = compute_scratch(x, nbmax)
    coef = compute_scratch(x, nbmax)
    gcoef = compute_scratch(x, nbmax)
    for blk in range(lo, hi):
        n, i0, s0, nb, r0 = column_block(blk, N, C, S, nbmax)
        src = _block_source(X, XT, S, n, nb, C)
        tsrc = _block_source(TX, TT, S, n, nb, C)
        if mode != BACKWARD:
            cols_max(src, i0, s0, nb, C, m, cap)
            cols_sums(src, tsrc, i0, s0, nb, C, m, s, a, d, w, keep, add, cap, True, E)
            cols_log(s, ls, nb)
            total = 0.0
            for b in range(nb):
                r = r0 + b
                lb = prob_loss(m[b], ls[b], a[b], d[b], z) * (sw[r] if per_row_sw else sw[0])
                if rows_out:
                    mx[r] = m[b]
                    lsx[r] = ls[b]
                    loss[r] = lb
                else:
                    total += lb
            if not rows_out:
                loss[blk] = total
        else:
            _load_saved(mx, lsx, r0, nb, m, ls)
            cols_sums(src, tsrc, i0, s0, nb, C, m, s, a, d, w, keep, add, cap, False, E)
        if mode == FORWARD:
            continue
        for b in range(nb):
            gv = _row_factor(g, sw, r0 + b, per_row_g, per_row_sw)
            coef[b] = like(gv * prob_grad_scale(m[b], ls[b], a[b], z), x)
            gcoef[b] = like(gv, x)
        dst, gi0, gs0 = (GT, 0, 0) if scratch_grad else (GX, i0, s0)
        cols_block_grad(src, tsrc, E, i0, s0, nb, C, m, ls, s, coef, gcoef, w, keep, add, cap,
                        mode, dst, gi0, gs0)
        _block_write_grad(GT, GX, S, scratch_grad, n, i0, s0, nb, C)


@jit(python_callable=True)
def check_targets(target, w, sw, ignore_index, C):
    """Validate class-index targets and total their weights in one serial pass.

    Returns `(first_bad, W, n_valid)`: the flat position of the first target that is neither
    `ignore_index` nor in `[0, C)` (-1 if none), `W = sum_{valid r} sw_r w[y_r]` in float64 (the
    'mean' denominator; `sw` is (R,) or (1,) for all ones) and the number of valid targets.
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
