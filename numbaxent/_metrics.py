"""One-pass evaluation kernel: every per-row metric while the row is in cache for its log-sum-exp.

Layout and dtypes are those of `numbaxent._kernels`: logits `x` are a C-contiguous `(N, C, S)`
storage array (16-bit storage for float16/bfloat16, computed in float32), targets are flat int64 class
indices over the `N*S` rows, `w` are the class weights in the compute type.

For each non-ignored row the logits are read from memory once; the passes below run over the row
while it is in cache (as the core forward does), rows split across threads (`_parallel.run_tasks`):

1. `m = max_c x_c`, taken as the core's row kernels take it: in the sum pass over the row before
   (on its own for a range's first row and after an ignored row);
2. `_rows.row_eval_sums`, one fused loop: `s = sum_c e_c` with `e_c = exp(x_c - m)`,
   `h = sum_c e_c (x_c - m)` (entropy) and `d = sum_c w_c (x_c - m)` (label smoothing, only
   when `eps > 0`), and the next row's maximum; a long float32/float64 row by chunks, each chunk
   shifted by its own maximum, as the core's forward sums it (`_rows.chunked_row_pass`, `rescaled_entropy`);
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

The row kernel (`metrics_rows`, C > `COLUMN_MAX_C` on 2-D input) writes one record per row
(O(rows) memory, no O(rows x classes) temporaries); `metrics_reduce` then folds the records into
per-class, per-bin and top-k totals **serially in row order** (the caller sums the scalar columns
with NumPy's pairwise float64 sum). With many classes a row's work dwarfs its record.

Few classes and K-dim input take `metrics_cols`: the same computation over the core's column
blocks (vectorised across rows), as the core's forward does, with no per-row record: each block is
folded at once into per-task integer tallies and per-group float sums (see the section below), which
`tallies_into_state` adds to the evaluator's state. Either way every result is independent of
the number of threads. Ignored rows are not read at all.
"""
from __future__ import annotations

import math

import numpy as np

from ._jit import jit
from ._columns import (_block_source, cols_log, cols_running_max, cols_target_logits, cols_target_rows,
                       column_block, column_block_rows, column_count, column_views, shifted_exp_pair)
from ._rows import (H_FLOOR, ahead_bits, chunk_bits, chunk_scratch, chunk_weight_sums, eval_row_pass, max_start,
                    next_row_max_skipnan, rescaled_sums, row_eval_sums, row_is_top1)
from ._math import (as_2d, as_compute, borrowed, borrowed_row, capped, clear, compute_scratch, empty, exp_nonpos,
                    load, max_int, min_int, run_view, span)

__all__ = ["metrics_rows", "metrics_cols", "tallies_into_state", "metrics_reduce", "IGNORED"]

IGNORED = -1  # rank recorded for ignored rows


# -- row primitives ----------------------------------------------------------------------------------
# Inlined into `eval_row` at the Numba IR level, as the core's row primitives are into theirs: each
# compiled on its own cost 0.2-0.6 s of the evaluator's first call (5.1-5.7 s -> 3.7-5.3 s, six
# alternated pairs); the long-row `update` time measured the same (1.15-1.16 x the forward against
# 1.16-1.19). The sums (`_rows.row_eval_sums`) sit with the core's row primitives, which sum a long
# row in chunks for both (`_rows.chunked_row_pass`).
BLOCK = 512  # elements per step of the compare-only scans below (vectorised inside a step)


@jit(inline=True)
def row_count_greater(row, xy, cap, limit):
    """`#{c : x_c > x_y}`, or any value >= `limit` once the count reaches `limit` (the scan
    stops there: only ranks below `kmax` matter). NaN entries are not greater."""
    C = row.shape[0]
    n = 0
    for j0 in range(0, C, BLOCK):
        blk = span(row, j0, min_int(BLOCK, C - j0))  # a view: the inner loop indexes from 0 and vectorises
        k = np.int32(0)
        for j in range(blk.shape[0]):
            k += np.int32(1) if capped(load(blk[j]), cap) > xy else np.int32(0)
        n += k
        if n >= limit:
            break
    return n


@jit(inline=True)
def row_ties_before(row, y, xy, cap):
    """`#{c < y : x_c == x_y}`: the ties that a stable sort puts ahead of the target."""
    n = np.int32(0)
    for j in range(y):
        n += np.int32(1) if capped(load(row[j]), cap) == xy else np.int32(0)
    return n


@jit(inline=True)
def row_first_equal(row, m, cap):
    """The lowest `c` with `x_c == m` (`C` if none: an all-NaN row): a vectorised index-minimum
    over steps of `BLOCK` elements, stopping in the first step that holds one."""
    C = row.shape[0]
    for j0 in range(0, C, BLOCK):
        blk = span(row, j0, min_int(BLOCK, C - j0))
        none = np.int32(blk.shape[0])
        f = none
        for j in range(blk.shape[0]):
            f = min_int(f, np.int32(j) if capped(load(blk[j]), cap) == m else none)
        if f < none:
            return j0 + f
    return C


@jit(inline=True)
def row_nan_target_rank(row, y, cap):
    """Rank of a NaN target logit in a stable `argsort(-x)`: after every non-NaN entry and after
    the NaN entries of lower index."""
    n = 0
    for j in range(row.shape[0]):
        v = capped(load(row[j]), cap)
        if v == v or j < y:
            n += 1
    return n


@jit(inline=True)
def rescaled_entropy(parts, m):
    """`h = sum_c exp(delta_c) (h_c + s_c delta_c)`: the entropy sum `sum e (x - m)` of a row summed
    in chunks (`_rows.chunked_row_pass`: `s_c` in `parts[0]`, `h_c = sum exp(x - m_c) (x - m_c)` in
    `parts[2]`, `delta_c = m_c - m`), a chunk of `-inf` logits adding 0 (`0 log 0 = 0`)."""
    mf = np.float64(m)
    h = 0.0
    for c in range(parts.shape[1]):
        delta = np.float64(parts[3, c]) - mf
        if delta > -np.inf:
            h += math.exp(delta) * (parts[2, c] + parts[0, c] * delta)
        elif delta != delta:
            h += delta
    return h


@jit()
def eval_row(row, nxt, y, k, w, wsum, wchunk, eps, eps_c, cap, kmax, parts, single, chunked):
    """All metrics of one non-ignored row: `(loss, nll, entropy, confidence, rank, pred, k_next)`,
    the floats in float64, `rank` capped at `kmax`. `k`: the bits of the row's first paired chunk
    (the whole row's when it is one chunk), from the pass over the row before it or taken on its
    own; `k_next` those of `nxt`. `single, chunked`: `_rows.chunk_variant` (a row summed whole,
    `row_eval_sums`, or in chunks, `_rows.chunked_row_pass`; `wchunk` and `parts` as in the core's
    `index_row`)."""
    smooth = eps_c > 0
    if single is not None:
        m = next_row_max_skipnan(k, row, cap)
        s, h, d, k_next = row_eval_sums(row, m, w, cap, smooth, nxt)
    if chunked is not None:
        rk, k_next = eval_row_pass(row, nxt, k, parts, w, w, 0.0, 0.0, cap, smooth)
        m = next_row_max_skipnan(rk, row, cap)
        s64, d64 = rescaled_sums(parts, m, wchunk)
        s, d, h = as_compute(s64, row), as_compute(d64, row), as_compute(rescaled_entropy(parts, m), row)
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
    rank = min_int(np.int64(rank), np.int64(kmax))
    if rank == 0:
        pred = y
    else:
        pred = row_first_equal(row, m, cap)
        if pred == row.shape[0]:
            pred = 0  # all-NaN row: a stable argsort of -x starts with index 0
    return loss, nll, ent, conf, rank, pred, k_next


# -- kernels -----------------------------------------------------------------------------------------
@jit(python_callable=True)
def metrics_rows(lo, hi, x, single, chunked, target, w, wsum, ignore_index, eps, cap, kmax, loss, nll, ent, conf,
                 rank, pred):
    """Per-row metrics of `x` (N, C, 1) against `target` (N,) for rows `[lo, hi)` (dealt to
    threads by `_parallel.run_tasks`); contiguous rows only, as the core's row kernels (K-dim
    input and few classes take `metrics_cols`). `single, chunked`: `_rows.chunk_variant` of a
    FORWARD pass (long float32/float64 rows are summed in chunks, as the core's forward sums them).

    Writes, for every row `r`: `loss[r]` (the cross-entropy term, 0 when ignored), `nll[r]`,
    `ent[r]`, `conf[r]` (0 when ignored), `rank[r]` (`min(rank, kmax)`, `IGNORED` when
    ignored) and `pred[r]` (argmax, lowest index among ties). Targets must already be validated.
    """
    N, C, S = x.shape
    x2 = as_2d(x, N, C * S)
    eps_c = eps / C
    if single is not None:
        parts, wchunk = as_2d(loss, 1, 1), loss  # (placeholders, as in the core)
    if chunked is not None:
        layout, parts = chunk_scratch(x2)
        wchunk = chunk_weight_sums(w, layout)
    wb = borrowed(w)
    k = max_start(x)
    known = False  # whether k is row r's, taken in the pass over row r - 1
    for r in range(lo, hi):
        y = target[r]
        if y == ignore_index:
            _ignored(r, loss, nll, ent, conf, rank, pred)
            known = False
            continue
        if not known:
            if single is not None:
                k = chunk_bits(borrowed_row(x2, r))
            if chunked is not None:
                k = ahead_bits(borrowed_row(x2, r), layout)
        # an ignored row is never read: its maximum is not taken ahead either
        ahead = r + 1 < hi and target[r + 1] != ignore_index
        lr, nr, er, cr, kr, pr, k = eval_row(borrowed_row(x2, r), borrowed_row(x2, r + 1 if ahead else r), y, k, wb,
                                             wsum, wchunk, eps, eps_c, cap, kmax, parts, single, chunked)
        known = ahead
        loss[r] = lr
        nll[r] = nr
        ent[r] = er
        conf[r] = cr
        rank[r] = kr
        pred[r] = pr


@jit(inline=True)
def _ignored(r, loss, nll, ent, conf, rank, pred):
    loss[r] = 0.0
    nll[r] = 0.0
    ent[r] = 0.0
    conf[r] = 0.0
    rank[r] = IGNORED
    pred[r] = -1


# -- column blocks (few classes, K-dim), as the core's column kernels ---------------------------------
# The column kernel keeps no per-row record: each block's rows are folded at once into small partial
# totals: integer tallies per task (summed exactly afterwards, in any order) and float sums per
# *group* of blocks (laid out as the evaluator's float state, `Evaluator._float_slices`). Groups
# depend on the class and bin counts only, and their sums are added in group order afterwards, so
# every figure is independent of the number of threads.
#
# A row costs a few scattered increments. To keep them few, the integer figures are tallied in a form
# with one increment each: the (target, prediction) pair (the confusion matrix, from which the
# per-class counts, hits and predictions follow), the rank (top-k hits are sums over it), and the
# pair (rank, calibration bin) (top-k hits, bin counts and hits follow; NaN confidences go to an
# extra bin: the non-finite rows).

F_LOSS, F_NLL, F_ENT = 0, 2, 3  # state floats: [loss, weight, nll, entropy] + cls_loss[C] + bin_conf[B]
F_CLS = 4


@jit(python_callable=True)
def tally_layout(C, B, kmax, pairs):
    """A task's tally: `(classes, length)`. `[0, classes)`: rows by rank `r` (capped at
    `kmax`) and calibration bin `j` (`B` for a NaN confidence), at `r (B + 1) + j`; without
    `pairs` (no C x C tally), `classes + [0, C)`: rows by target class, `+ [C, 2C)`: top-1
    hits by target class, `+ [2C, 3C)`: rows by predicted class."""
    classes = (kmax + 1) * (B + 1)
    return classes, classes + (0 if pairs else 3 * C)


@jit()
def cols_eval_sums(X, i0, s0, nb, C, m, w, cap, smooth, s, h, d):
    """Per row `b` of a block: `row_eval_sums` across the block (`d` only when
    `smooth`; the loop is written twice, as there, so that neither pays for the other). Two classes
    per pass (`numbaxent._columns.shifted_exp_pair`, as the core's `cols_sums`), the sums in class
    order, so the same bits as one class at a time."""
    floor = as_compute(H_FLOOR, s)
    for b in range(nb):
        s[b] = 0
        h[b] = 0
        d[b] = 0
    c0 = C % 2  # an odd count's first class alone, then pairs
    if c0:
        xr = run_view(X, i0, s0, nb)
        wc = w[0]
        for b in range(nb):
            v = capped(load(xr[b]), cap) - m[b]
            e = exp_nonpos(v)
            s[b] += e
            h[b] += _entropy_term(e, v, floor)
            d[b] += wc * v
    for c in range(c0, C, 2):
        xr, xr1 = run_view(X, i0 + c, s0, nb), run_view(X, i0 + c + 1, s0, nb)
        wc, wc1 = w[c], w[c + 1]
        if smooth:
            for b in range(nb):
                v, v1, e, e1 = shifted_exp_pair(xr, xr1, b, m[b], cap)
                s[b] = (s[b] + e) + e1
                h[b] = (h[b] + _entropy_term(e, v, floor)) + _entropy_term(e1, v1, floor)
                d[b] = (d[b] + wc * v) + wc1 * v1
        else:
            for b in range(nb):
                v, v1, e, e1 = shifted_exp_pair(xr, xr1, b, m[b], cap)
                s[b] = (s[b] + e) + e1
                h[b] = (h[b] + _entropy_term(e, v, floor)) + _entropy_term(e1, v1, floor)


@jit(inline=True)
def _entropy_term(e, v, floor):
    """`e (x - m)` with `x - m` clamped to `floor`: 0, not NaN, for a `-inf` logit."""
    return e * (v if v > floor else floor)


@jit()
def cols_max_rank(X, i0, s0, nb, C, xy, yv, cap, count, m, first, gt):
    """Two compare-only passes over a block, the row's target logit `xy` gathered between them
    (`cols_target_logits`: a gather before the block is in cache misses on K-dim rows): `m` (the
    row maximum, NaN skipped, of the capped logits), `first` (the first index of the maximum, i.e.
    the lowest `c` with `x_c > ` every earlier entry; `C` when no entry exceeds `-inf`) and, when
    `count`, `gt = #{c : x_c > x_y} + #{c < y : x_c == x_y}`, the target's rank in a stable
    `argsort(-x)` (for a non-NaN `x_y`)."""
    zero, none = np.int32(0), np.int32(C)
    low = -as_compute(np.inf, m)
    for b in range(nb):
        first[b] = none
        gt[b] = 0
    cols_running_max(X, i0, s0, nb, C, m, cap)
    cols_target_logits(X, i0, s0, nb, yv, cap, xy)
    # `first` as the least `c` with `x_c == m > -inf`, by a min over the (cached) block: tracked
    # as `first[b] = c if v > m[b] else first[b]` in the maximum's pass, LLVM made it a masked
    # store, microcoded on AMD (see _columns.cols_max). Four classes per pass (`first` and `gt`
    # loaded and stored once per four class runs: the step 0.47 -> 0.41 ns per logit on 8 x 21 x
    # 256 x 256, one thread, Zen 4); a last group of fewer reads its first class again, which
    # changes no minimum and adds 0 to `gt`. The two loops repeat their four `_rank_terms` on
    # purpose: helpers for the group's terms and for its runs cost the column evaluator's first
    # call 8% and the core's 3% (`benchmarks/compile_pairs.py`, both orders)
    for c in range(0, C, 4):
        k1, k2, k3 = c + 1 < C, c + 2 < C, c + 3 < C
        c1, c2, c3 = c + 1 if k1 else c, c + 2 if k2 else c, c + 3 if k3 else c
        xr, xr1 = run_view(X, i0 + c, s0, nb), run_view(X, i0 + c1, s0, nb)
        xr2, xr3 = run_view(X, i0 + c2, s0, nb), run_view(X, i0 + c3, s0, nb)
        q0, q1, q2, q3 = np.int32(c), np.int32(c1), np.int32(c2), np.int32(c3)
        if count:
            for b in range(nb):  # '&'/'|', not 'and'/'or': no branches, so the loop vectorises
                mb, xb, yb = m[b], xy[b], yv[b]
                f0, g0 = _rank_terms(capped(load(xr[b]), cap), q0, mb, xb, yb, low, none)
                f1, g1 = _rank_terms(capped(load(xr1[b]), cap), q1, mb, xb, yb, low, none)
                f2, g2 = _rank_terms(capped(load(xr2[b]), cap), q2, mb, xb, yb, low, none)
                f3, g3 = _rank_terms(capped(load(xr3[b]), cap), q3, mb, xb, yb, low, none)
                first[b] = min_int(min_int(first[b], f0), min_int(min_int(f1, f2), f3))
                gt[b] += (g0 + (g1 if k1 else zero)) + ((g2 if k2 else zero) + (g3 if k3 else zero))
        else:
            for b in range(nb):
                mb, xb, yb = m[b], xy[b], yv[b]
                f0, _ = _rank_terms(capped(load(xr[b]), cap), q0, mb, xb, yb, low, none)
                f1, _ = _rank_terms(capped(load(xr1[b]), cap), q1, mb, xb, yb, low, none)
                f2, _ = _rank_terms(capped(load(xr2[b]), cap), q2, mb, xb, yb, low, none)
                f3, _ = _rank_terms(capped(load(xr3[b]), cap), q3, mb, xb, yb, low, none)
                first[b] = min_int(min_int(first[b], f0), min_int(min_int(f1, f2), f3))


@jit(inline=True)
def _rank_terms(v, c, mb, xb, yb, low, none):
    """Class `c`'s terms of `cols_max_rank`: `c` if it holds the row's maximum `mb` (above `-inf`)
    else `none`, for the first maximum's min; 1 if it ranks before the target (`x_c > x_y`, or
    equal and `c < y`) else 0, for the target's rank."""
    f = c if (v == mb) & (v > low) else none
    g = np.int32(1) if (v > xb) | ((v == xb) & (c < yb)) else np.int32(0)
    return f, g


@jit()
def cols_rare_rows(X, i0, s0, nb, C, m, xy, yv, ok, cap, first, gt):
    """The rows `cols_max_rank` does not settle, scalar (rare): a NaN target logit (its rank
    as `row_nan_target_rank`) and a row with no entry above `-inf` (`first`: the lowest
    `c` with `x_c == m`, `C` for an all-NaN row)."""
    rare = np.int32(0)
    for b in range(nb):  # vectorised: most blocks have none
        rare += np.int32(1) if ok[b] & ((xy[b] != xy[b]) | (first[b] == C)) else np.int32(0)
    if rare == 0:
        return
    for b in range(nb):
        if not ok[b]:
            continue
        if xy[b] != xy[b]:
            n = 0
            for c in range(C):
                v = capped(load(X[i0 + c, s0 + b]), cap)
                if v == v or c < yv[b]:
                    n += 1
            gt[b] = n
        if first[b] == C:
            for c in range(C):
                if capped(load(X[i0 + c, s0 + b]), cap) == m[b]:
                    first[b] = c
                    break


@jit()
def cols_fold(nb, C, B, kmax, eps, eps_c, wsum, m, s, h, d, ls, xy, yv, wy, ok, first, gt, tally,
              pairs, fp, loss, conf, pred, cell, jbin):
    """Fold a block's rows into this task's `tally` (see `tally_layout`) and `pairs` (its
    C x C (target, prediction) tally, or a (0, 0) array) and into this group's float sums `fp`.
    `loss, conf, pred, cell, jbin` are length-`nb` scratch. Formulas as `eval_row`, except
    that the entropy takes the row's `ls = log s` in the compute type."""
    classes, _ = tally_layout(C, B, kmax, pairs.shape[0] > 0)
    sl = 0.0
    sn = 0.0
    se = 0.0
    # the per-row figures as selects, not branches, so that this loop vectorises
    for b in range(nb):
        v = ok[b]
        lsb = np.float64(ls[b])
        nr = (np.float64(m[b]) - np.float64(xy[b])) + lsb
        smooth = eps_c * (np.float64(wsum) * lsb - np.float64(d[b]))
        lr = (1.0 - eps) * np.float64(wy[b]) * nr + (smooth if eps_c > 0 else 0.0)
        p = 1.0 / np.float64(s[b])
        loss[b] = lr
        conf[b] = p
        sl += lr if v else 0.0
        sn += nr if v else 0.0
        se += (lsb - np.float64(h[b]) * p) if v else 0.0
        # top-1 alone (kmax 1): the target is the first maximum; a NaN target's rank is in gt
        k = gt[b] if (kmax > 1) | (xy[b] != xy[b]) else np.int32(first[b] != yv[b])
        k = min_int(k, np.int32(kmax))
        f = first[b] if first[b] < C else np.int32(0)  # all-NaN row: index 0
        pred[b] = np.int32(yv[b]) if k == 0 else f
        pb = p * B if p == p else 0.0
        j = min_int(max_int(np.int32(math.ceil(pb) - 1), np.int32(0)), np.int32(B - 1))
        j = j if p == p else np.int32(B)
        jbin[b] = j
        cell[b] = k * np.int32(B + 1) + j
    fp[F_LOSS] += sl
    fp[F_NLL] += sn
    fp[F_ENT] += se
    f_bin = F_CLS + C
    for b in range(nb):
        if not ok[b]:
            continue
        y = yv[b]
        q = pred[b]
        if pairs.shape[0] > 0:
            pairs[y, q] += 1
        else:
            tally[classes + y] += 1
            tally[classes + C + y] += np.int64(q == y)
            tally[classes + 2 * C + q] += 1
        tally[cell[b]] += 1
        fp[F_CLS + y] += loss[b]
        j = jbin[b]
        if j < B:
            fp[f_bin + j] += conf[b]


@jit(python_callable=True)
def metrics_cols(lo, hi, ntasks, group_blocks, x, in_registers, target, w, w_uniform, wsum, ignore_index, eps, cap,
                 kmax, tally, pairs, fp):
    """Every metric of `x` (N, C, S) against `target` (N*S,) for tasks `[lo, hi)` of
    `ntasks` (dealt to threads by `_parallel.run_tasks`), over the core's column blocks (K-dim
    rows read in place, short 2-D rows transposed into an L1 scratch), every step vectorised across
    the block's rows.

    The `ngroups = fp.shape[0]` groups of `group_blocks` consecutive blocks are split into
    `ntasks` contiguous ranges. Task `t` zeroes and fills `tally[t]` (counts, see
    `tally_layout`) and `pairs[t]` (C x C: rows by target and predicted class; `pairs` is
    `(ntasks, 0, 0)` to tally the classes in `tally` instead); group `g` zeroes and fills
    `fp[g]` (the evaluator's float state layout: loss, nll and entropy sums, per-class loss and
    per-bin confidence sums; the weight sum is left 0). `kmax = min(max(topk), C)`: ranks are
    only resolved below it. Targets must already be validated. `in_registers` as in
    `_columns.index_cols_kernel`.
    """
    N, C, S = x.shape
    B = fp.shape[1] - F_CLS - C
    X = column_views(x, S)
    nbmax = column_block_rows(C, S)
    nblocks = column_count(N, S, nbmax)
    ngroups = fp.shape[0]
    eps_c = eps / C
    XT = empty((C, nbmax if S == 1 else 0), x.dtype)
    m = compute_scratch(nbmax, x)
    s = compute_scratch(nbmax, x)
    h = compute_scratch(nbmax, x)
    d = compute_scratch(nbmax, x)
    ls = compute_scratch(nbmax, x)
    xy = compute_scratch(nbmax, x)
    wy = compute_scratch(nbmax, x)
    yv = empty(nbmax, np.int32)  # int32 lanes, as wide as the float32 compares they meet (as the core's)
    ok = empty(nbmax, np.bool_)
    first = empty(nbmax, np.int32)  # int32 lanes: as wide as the float32 compares that feed them
    gt = empty(nbmax, np.int32)
    loss = empty(nbmax, np.float64)
    conf = empty(nbmax, np.float64)
    pred = empty(nbmax, np.int32)
    cell = empty(nbmax, np.int32)
    jbin = empty(nbmax, np.int32)
    for t in range(lo, hi):
        clear(tally[t])
        clear(pairs[t])
        for g in range(ngroups * t // ntasks, ngroups * (t + 1) // ntasks):
            fpg = fp[g]
            clear(fpg)
            for blk in range(g * group_blocks, min_int((g + 1) * group_blocks, nblocks)):
                n, i0, s0, nb, r0 = column_block(blk, N, C, S, nbmax)
                src = _block_source(X, XT, S, n, nb, C, in_registers)
                cols_target_rows(target, r0, nb, ignore_index, w, w_uniform, yv, ok, wy)
                cols_max_rank(src, i0, s0, nb, C, xy, yv, cap, kmax > 1, m, first, gt)
                cols_rare_rows(src, i0, s0, nb, C, m, xy, yv, ok, cap, first, gt)
                cols_eval_sums(src, i0, s0, nb, C, m, w, cap, eps_c > 0, s, h, d)
                cols_log(s, ls, nb)
                cols_fold(nb, C, B, kmax, eps, eps_c, wsum, m, s, h, d, ls, xy, yv, wy, ok, first,
                          gt, tally[t], pairs[t], fp[g], loss, conf, pred, cell, jbin)


@jit(python_callable=True)
def tallies_into_state(tally, pairs, fp, ks, kmax, B, ints, cm, chunk):
    """After `metrics_cols`: add the tasks' `tally` and `pairs` to the evaluator's integer
    state `ints` (the layout of `Evaluator._int_slices`: `[n_seen, n_ignored, n_valid,
    n_nonfinite, rows] + topk[K] + cls_count[C] + cls_correct[C] + cls_pred[C] + bin_count[B] +
    bin_correct[B]`; only n_nonfinite and the arrays are added here) and the pairs to `cm` when
    it is C x C (the confusion matrix; else (0, 0)), and write the groups' float sums `fp`, added
    in group order, to `chunk`. One compiled call: a chunk of a few rows costs microseconds."""
    T = tally.shape[0]
    C = (ints.shape[0] - 5 - ks.shape[0] - 2 * B) // 3
    K = ks.shape[0]
    o_cnt = 5 + K
    o_cor, o_pred, o_bin = o_cnt + C, o_cnt + 2 * C, o_cnt + 3 * C
    o_bcor = o_bin + B
    classes, _ = tally_layout(C, B, kmax, pairs.shape[1] > 0)
    total = empty(tally.shape[1], np.int64)
    clear(total)
    for t in range(T):
        for i in range(tally.shape[1]):
            total[i] += tally[t, i]
    below = 0  # rows of rank < r, for r = 1, 2, ...
    hits = empty(kmax + 2, np.int64)
    clear(hits)
    for r in range(kmax + 1):
        for j in range(B + 1):
            n = total[r * (B + 1) + j]
            below += n
            if j == B:
                ints[3] += n
            else:
                ints[o_bin + j] += n
                if r == 0:
                    ints[o_bcor + j] += n
        hits[r + 1] = below
    for i in range(K):
        ints[5 + i] += hits[min_int(ks[i], kmax + 1)]
    if pairs.shape[1] > 0:
        for t in range(T):
            for y in range(C):
                for q in range(C):
                    n = pairs[t, y, q]
                    ints[o_cnt + y] += n
                    ints[o_pred + q] += n
                    if q == y:
                        ints[o_cor + y] += n
                    if cm.shape[0] > 0:
                        cm[y, q] += n
    else:
        for c in range(C):
            ints[o_cnt + c] += total[classes + c]
            ints[o_cor + c] += total[classes + C + c]
            ints[o_pred + c] += total[classes + 2 * C + c]
    for i in range(chunk.shape[0]):
        chunk[i] = 0.0
    for g in range(fp.shape[0]):
        for i in range(chunk.shape[0]):
            chunk[i] += fp[g, i]


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
        b = math.ceil(p * B) - 1  # (an int already: no int() to compile)
        if b < 0:
            b = 0
        elif b >= B:
            b = B - 1
        bin_count[b] += 1
        bin_conf[b] += p
        if correct:
            bin_correct[b] += 1
    return n_valid, n_unbinned
