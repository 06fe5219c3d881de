"""One-pass evaluation kernel: every per-row metric while the row is in cache for its log-sum-exp.

Layout and dtypes are those of `numbaxent._kernels`: logits `x` are a C-contiguous `(N, C, S)`
storage array (16-bit storage for float16/bfloat16, computed in float32), targets are flat int64 class
indices over the `N*S` rows, `w` are the class weights in the compute type.

For each non-ignored row the logits are read from memory once; the passes below run over the row
while it is in cache (as the core forward does), rows split across threads (`_parallel.run_tasks`):

1. `numbaxent._kernels.row_max_lanes` (the core's primitive): `m = max_c x_c`;
2. `row_eval_sums`, one fused loop: `s = sum_c e_c` with `e_c = exp(x_c - m)`,
   `h = sum_c e_c (x_c - m)` (entropy) and `d = sum_c w_c (x_c - m)` (label smoothing, only
   when `eps > 0`);
3. compare-only loops, when needed: `numbaxent._kernels.row_is_top1` (the core's), the
   count of logits above the target's (top-k, only when `kmax > 1` and the target is not top-1)
   and the first index attaining `m` (the predicted class, only when it is not the target).

From these, with `ls = log s`:

- loss `(1-eps) w_y (m - x_y + ls) + (eps/C) (sum(w) ls - d)` (the core's formula, float64);
- plain NLL `m - x_y + ls` (for the perplexity);
- entropy `H = ls - h / s` (`-sum p log p`, with `0 log 0 = 0`);
- confidence `max_c p_c = 1 / s`;
- rank of the target in a *stable* `np.argsort(-x)` (ties: lower class index first; NaN logits
  last). Only ranks below `kmax` matter (top-k for k <= kmax), so the stored rank is
  `min(rank, kmax)` and the tie count over `c < y` runs only when `#{x_c > x_y} < kmax`;
- predicted class: the first index of the row's maximum (NaN entries skipped; 0 for an all-NaN
  row), as `np.argsort(-x, kind="stable")[0]` gives.

Few classes and K-dim input take `metrics_cols` instead, the same computation over the core's
column blocks (vectorised across rows), as the core's forward does. The row kernel writes one record per row (O(rows) memory, no O(rows x classes) temporaries);
`metrics_reduce` then folds the records into per-class, per-bin and top-k totals **serially in
row order** (the caller sums the scalar columns with NumPy's pairwise float64 sum), so every result
is independent of the number of threads. Ignored rows are not read at all.
"""
from __future__ import annotations

import math

import numpy as np

from ._jit import jit
from ._kernels import (MAX_LANES, cols_log, cols_max, cols_targets, column_block, column_block_rows,
                       column_views, row_is_top1, row_max_lanes, _block_source)
from ._math import capped, compute_scratch, compute_zero, exp, exp_nonpos, load, log

__all__ = ["metrics_rows", "metrics_cols", "metrics_reduce", "IGNORED"]

IGNORED = -1  # rank recorded for ignored rows


# -- row primitives ----------------------------------------------------------------------------------
@jit()
def row_eval_sums(row, m, w, cap, smooth):
    """`(s, h, d)` in one loop: `s = sum e_c`, `h = sum e_c (x_c - m)` (`0 log 0 = 0`: terms
    with `e_c = 0` are left out, which also keeps `-inf` logits out) and, when `smooth`,
    `d = sum w_c (x_c - m)` (0 otherwise). The counts of `row_count_greater` and
    `row_first_equal` are separate loops on purpose: an integer reduction in this loop halves
    its vector width (measured: +40% time), as a separate compare-only loop over the cached row it
    costs ~4% (less with the early exits of both)."""
    s = compute_zero(row)
    h = compute_zero(row)
    d = compute_zero(row)
    zero = compute_zero(row)
    if smooth:
        for j in range(row.shape[0]):
            v = capped(load(row[j]), cap) - m
            e = exp(v)
            s += e
            h += e * v if e > zero else zero
            d += w[j] * v
    else:
        for j in range(row.shape[0]):
            v = capped(load(row[j]), cap) - m
            e = exp(v)
            s += e
            h += e * v if e > zero else zero
    return s, h, d


BLOCK = 512  # elements per step of the compare-only scans below (vectorised inside a step)


@jit()
def row_count_greater(row, xy, cap, limit):
    """`#{c : x_c > x_y}`, or any value >= `limit` once the count reaches `limit` (the scan
    stops there: only ranks below `kmax` matter). NaN entries are not greater."""
    C = row.shape[0]
    n = 0
    for j0 in range(0, C, BLOCK):
        blk = row[j0:min(j0 + BLOCK, C)]  # a view: the inner loop indexes from 0 and vectorises
        k = np.int32(0)
        for j in range(blk.shape[0]):
            k += np.int32(1) if capped(load(blk[j]), cap) > xy else np.int32(0)
        n += k
        if n >= limit:
            break
    return n


@jit()
def row_ties_before(row, y, xy, cap):
    """`#{c < y : x_c == x_y}`: the ties that a stable sort puts ahead of the target."""
    n = np.int32(0)
    for j in range(y):
        n += np.int32(1) if capped(load(row[j]), cap) == xy else np.int32(0)
    return n


@jit()
def row_first_equal(row, m, cap):
    """The lowest `c` with `x_c == m` (`C` if none: an all-NaN row): a vectorised
    index-minimum over steps of `BLOCK` elements, stopping in the first step that holds one."""
    C = row.shape[0]
    for j0 in range(0, C, BLOCK):
        blk = row[j0:min(j0 + BLOCK, C)]
        none = np.int32(blk.shape[0])
        f = none
        for j in range(blk.shape[0]):
            f = min(f, np.int32(j) if capped(load(blk[j]), cap) == m else none)
        if f < none:
            return j0 + f
    return C


@jit()
def row_nan_target_rank(row, y, cap):
    """Rank of a NaN target logit in a stable `argsort(-x)`: after every non-NaN entry and after
    the NaN entries of lower index."""
    n = 0
    for j in range(row.shape[0]):
        v = capped(load(row[j]), cap)
        if v == v or j < y:
            n += 1
    return n


@jit()
def eval_row(row, y, w, wsum, eps, eps_c, cap, kmax, lanes):
    """All metrics of one non-ignored row: `(loss, nll, entropy, confidence, rank, pred)`, the
    floats in float64, `rank` capped at `kmax`; `lanes` is the row maximum's scratch."""
    m = row_max_lanes(row, cap, lanes)
    s, h, d = row_eval_sums(row, m, w, cap, eps_c > 0)
    xy = capped(load(row[y]), cap)
    ls = math.log(s)
    nll = (np.float64(m) - np.float64(xy)) + np.float64(ls)
    loss = (1.0 - eps) * np.float64(w[y]) * nll
    if eps_c > 0:
        loss += eps_c * (np.float64(wsum) * np.float64(ls) - np.float64(d))
    s64 = np.float64(s)
    ent = math.log(s64) - np.float64(h) / s64
    conf = 1.0 / s64
    # rank of y in a stable argsort(-x); only min(rank, kmax) is needed
    if xy != xy:
        rank = row_nan_target_rank(row, y, cap)
    elif row_is_top1(row, y, xy, m, cap):
        rank = 0
    elif kmax <= 1:
        rank = 1
    else:
        gt = 0 if xy >= m else row_count_greater(row, xy, cap, kmax)
        rank = gt + row_ties_before(row, y, xy, cap) if gt < kmax else gt
    rank = min(rank, kmax)
    if rank == 0:
        pred = y
    else:
        pred = row_first_equal(row, m, cap)
        if pred == row.shape[0]:
            pred = 0  # all-NaN row: a stable argsort of -x starts with index 0
    return loss, nll, ent, conf, rank, pred


# -- kernels -----------------------------------------------------------------------------------------
@jit(python_callable=True)
def metrics_rows(lo, hi, x, target, w, wsum, ignore_index, eps, cap, kmax, loss, nll, ent, conf,
                 rank, pred):
    """Per-row metrics of `x` (N, C, 1) against `target` (N,) for rows `[lo, hi)` (dealt to
    threads by `_parallel.run_tasks`); contiguous rows only, as the core's row kernels (K-dim
    input and few classes take `metrics_cols`).

    Writes, for every row `r`: `loss[r]` (the cross-entropy term, 0 when ignored), `nll[r]`,
    `ent[r]`, `conf[r]` (0 when ignored), `rank[r]` (`min(rank, kmax)`, `IGNORED` when
    ignored) and `pred[r]` (argmax, lowest index among ties). Targets must already be validated.
    """
    N, C, S = x.shape
    x2 = x.reshape((N, C * S))
    eps_c = eps / C
    lanes = compute_scratch(x, MAX_LANES)
    for r in range(lo, hi):
        y = target[r]
        if y == ignore_index:
            _ignored(r, loss, nll, ent, conf, rank, pred)
            continue
        lr, nr, er, cr, kr, pr = eval_row(x2[r], y, w, wsum, eps, eps_c, cap, kmax, lanes)
        loss[r] = lr
        nll[r] = nr
        ent[r] = er
        conf[r] = cr
        rank[r] = kr
        pred[r] = pr


@jit()
def _ignored(r, loss, nll, ent, conf, rank, pred):
    loss[r] = 0.0
    nll[r] = 0.0
    ent[r] = 0.0
    conf[r] = 0.0
    rank[r] = IGNORED
    pred[r] = -1


# -- column blocks (few classes, K-dim), as the core's column kernels ---------------------------------
@jit()
def cols_eval_sums(X, i0, s0, nb, C, m, w, cap, s, h, d):
    """Per row `b` of a block: `row_eval_sums` across the block (`d` always summed)."""
    zero = compute_zero(s)
    for b in range(nb):
        s[b] = 0
        h[b] = 0
        d[b] = 0
    for c in range(C):
        xr = X[i0 + c, s0:s0 + nb]
        wc = w[c]
        for b in range(nb):
            v = capped(load(xr[b]), cap) - m[b]
            e = exp_nonpos(v)
            s[b] += e
            h[b] += e * v if e > zero else zero
            d[b] += wc * v


@jit()
def cols_ranks(X, i0, s0, nb, C, m, xy, yv, cap, gt, ties, nan_rank, first):
    """Per row `b`: `gt = #{c : x_c > x_y}`, `ties = #{c < y : x_c == x_y}`, `nan_rank` (the
    rank of a NaN target, as `row_nan_target_rank`) and `first`, the lowest `c` with
    `x_c == m` (`C` if none). Compare-only, integer lanes across the block's rows."""
    for b in range(nb):
        gt[b] = 0
        ties[b] = 0
        nan_rank[b] = 0
        first[b] = C
    for c in range(C):
        xr = X[i0 + c, s0:s0 + nb]
        c32 = np.int32(c)
        one, zero = np.int32(1), np.int32(0)
        for b in range(nb):  # '&'/'|', not 'and'/'or': no branches, so the loop vectorises
            v = capped(load(xr[b]), cap)
            gt[b] += one if v > xy[b] else zero
            ties[b] += one if (v == xy[b]) & (c < yv[b]) else zero
            nan_rank[b] += one if (v == v) | (c < yv[b]) else zero
            first[b] = c32 if (first[b] == C) & (v == m[b]) else first[b]


@jit(python_callable=True)
def metrics_cols(lo, hi, x, target, w, wsum, ignore_index, eps, cap, kmax, loss, nll, ent, conf,
                 rank, pred):
    """`metrics_rows` over the column blocks `[lo, hi)` of `x` (N, C, S) (the core's
    blocks: K-dim rows read in place, short 2-D rows transposed into an L1 scratch), every step
    vectorised across the block's rows. Same outputs, same formulas."""
    N, C, S = x.shape
    X = column_views(x, S)
    nbmax = column_block_rows(C)
    eps_c = eps / C
    XT = np.empty((C, nbmax if S == 1 else 0), x.dtype)
    m = compute_scratch(x, nbmax)
    s = compute_scratch(x, nbmax)
    h = compute_scratch(x, nbmax)
    d = compute_scratch(x, nbmax)
    ls = compute_scratch(x, nbmax)
    xy = compute_scratch(x, nbmax)
    wy = compute_scratch(x, nbmax)
    yv = np.empty(nbmax, np.int64)
    ok = np.empty(nbmax, np.bool_)
    gt = np.empty(nbmax, np.int32)  # int32 lanes: as wide as the float32 compares that feed them
    ties = np.empty(nbmax, np.int32)
    nan_rank = np.empty(nbmax, np.int32)
    first = np.empty(nbmax, np.int32)
    for blk in range(lo, hi):
        n, i0, s0, nb, r0 = column_block(blk, N, C, S, nbmax)
        src = _block_source(X, XT, S, n, nb, C)
        cols_max(src, i0, s0, nb, C, m, cap)
        cols_eval_sums(src, i0, s0, nb, C, m, w, cap, s, h, d)
        cols_log(s, ls, nb)
        cols_targets(src, i0, s0, nb, target, r0, ignore_index, w, cap, yv, ok, xy, wy)
        cols_ranks(src, i0, s0, nb, C, m, xy, yv, cap, gt, ties, nan_rank, first)
        # the per-row results as selects, not branches, so that these loops vectorise too
        for b in range(nb):
            r = r0 + b
            s64 = np.float64(s[b])
            nr = (np.float64(m[b]) - np.float64(xy[b])) + np.float64(ls[b])
            smooth = eps_c * (np.float64(wsum) * np.float64(ls[b]) - np.float64(d[b]))
            lr = (1.0 - eps) * np.float64(wy[b]) * nr + (smooth if eps_c > 0 else 0.0)
            loss[r] = lr if ok[b] else 0.0
            nll[r] = nr if ok[b] else 0.0
            ent[r] = (log(s64) - np.float64(h[b]) / s64) if ok[b] else 0.0
            conf[r] = (1.0 / s64) if ok[b] else 0.0
        for b in range(nb):
            r = r0 + b
            k = gt[b] + ties[b] if gt[b] < kmax else gt[b]
            k = 1 if kmax <= 1 else k
            k = 0 if (xy[b] >= m[b]) & (ties[b] == 0) else k
            k = nan_rank[b] if xy[b] != xy[b] else k
            k = min(k, kmax)
            rank[r] = k if ok[b] else IGNORED
            p = first[b] if first[b] < C else 0
            p = yv[b] if k == 0 else p
            pred[r] = p if ok[b] else -1


@jit(python_callable=True)
def metrics_reduce(target, rank, pred, loss, conf, ks, cls_count, cls_correct, cls_pred, cls_loss,
                   topk_correct, bin_count, bin_conf, bin_correct):
    """Fold per-row records into the (zeroed, chunk-local) totals, serially in row order.

    `ks` are the k of top-k (int64); rows with a NaN confidence go to no calibration bin.
    Confidence `p` falls in bin `b = ceil(p * B) - 1` (clipped to `[0, B)`), i.e. bins are
    `((b)/B, (b+1)/B]`. Returns the number of non-ignored rows and of rows left out of the bins.
    """
    B = bin_count.shape[0]
    n_valid = 0
    n_unbinned = 0
    for r in range(target.shape[0]):
        k = rank[r]
        if k == IGNORED:
            continue
        n_valid += 1
        y = target[r]
        cls_count[y] += 1
        cls_loss[y] += loss[r]
        cls_pred[pred[r]] += 1
        correct = k == 0
        if correct:
            cls_correct[y] += 1
        for i in range(ks.shape[0]):
            if k < ks[i]:
                topk_correct[i] += 1
        p = conf[r]
        if p != p:
            n_unbinned += 1
            continue
        b = int(math.ceil(p * B)) - 1
        if b < 0:
            b = 0
        elif b >= B:
            b = B - 1
        bin_count[b] += 1
        bin_conf[b] += p
        if correct:
            bin_correct[b] += 1
    return n_valid, n_unbinned
