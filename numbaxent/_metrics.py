"""One-pass evaluation kernel: every per-row metric while the row is in cache for its log-sum-exp.

Layout and dtypes are those of :mod:`numbaxent._kernels`: logits ``x`` are a C-contiguous ``(N, C, S)``
storage array (16-bit storage for float16/bfloat16, computed in float32), targets are flat int64 class
indices over the ``N*S`` rows, ``w`` are the class weights in the compute type.

For each non-ignored row the logits are read from memory once; the passes below run over the row
while it is in cache (as the core forward does), rows split across threads (``_parallel.run_tasks``):

1. :func:`~numbaxent._kernels.row_max` (the core's primitive): ``m = max_c x_c``;
2. :func:`row_eval_sums`, one fused loop: ``s = sum_c e_c`` with ``e_c = exp(x_c - m)``,
   ``h = sum_c e_c (x_c - m)`` (entropy) and ``d = sum_c w_c (x_c - m)`` (label smoothing, only
   when ``eps > 0``);
3. compare-only loops, when needed: :func:`~numbaxent._kernels.row_is_top1` (the core's), the
   count of logits above the target's (top-k, only when ``kmax > 1`` and the target is not top-1)
   and the first index attaining ``m`` (the predicted class, only when it is not the target).

From these, with ``ls = log s``:

- loss ``(1-eps) w_y (m - x_y + ls) + (eps/C) (sum(w) ls - d)`` (the core's formula, float64);
- plain NLL ``m - x_y + ls`` (for the perplexity);
- entropy ``H = ls - h / s`` (``-sum p log p``, with ``0 log 0 = 0``);
- confidence ``max_c p_c = 1 / s``;
- rank of the target in a *stable* ``np.argsort(-x)`` (ties: lower class index first; NaN logits
  last). Only ranks below ``kmax`` matter (top-k for k <= kmax), so the stored rank is
  ``min(rank, kmax)`` and the tie count over ``c < y`` runs only when ``#{x_c > x_y} < kmax``;
- predicted class: the first index of the row's maximum (NaN entries skipped; 0 for an all-NaN
  row), as ``np.argsort(-x, kind="stable")[0]`` gives.

The row kernel writes one record per row (O(rows) memory, no O(rows x classes) temporaries);
:func:`metrics_reduce` then folds the records into per-class, per-bin and top-k totals **serially in
row order** (the caller sums the scalar columns with NumPy's pairwise float64 sum), so every result
is independent of the number of threads. Ignored rows are not read at all.
"""
from __future__ import annotations

import math

import numpy as np

from ._jit import jit
from ._kernels import row_is_top1, row_max
from ._math import capped, compute_zero, exp, load

__all__ = ["metrics_rows", "metrics_reduce", "IGNORED"]

IGNORED = -1  # rank recorded for ignored rows


# -- row primitives ----------------------------------------------------------------------------------
@jit()
def row_eval_sums(row, m, w, cap, smooth):
    """``(s, h, d)`` in one loop: ``s = sum e_c``, ``h = sum e_c (x_c - m)`` (``0 log 0 = 0``: terms
    with ``e_c = 0`` are left out, which also keeps ``-inf`` logits out) and, when ``smooth``,
    ``d = sum w_c (x_c - m)`` (0 otherwise). The counts of :func:`row_count_greater` and
    :func:`row_first_equal` are separate loops on purpose: an integer reduction in this loop halves
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
    """``#{c : x_c > x_y}``, or any value >= ``limit`` once the count reaches ``limit`` (the scan
    stops there: only ranks below ``kmax`` matter). NaN entries are not greater."""
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
    """``#{c < y : x_c == x_y}``: the ties that a stable sort puts ahead of the target."""
    n = np.int32(0)
    for j in range(y):
        n += np.int32(1) if capped(load(row[j]), cap) == xy else np.int32(0)
    return n


@jit()
def row_first_equal(row, m, cap):
    """The lowest ``c`` with ``x_c == m`` (``C`` if none: an all-NaN row): a vectorised
    index-minimum over steps of ``BLOCK`` elements, stopping in the first step that holds one."""
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
    """Rank of a NaN target logit in a stable ``argsort(-x)``: after every non-NaN entry and after
    the NaN entries of lower index."""
    n = 0
    for j in range(row.shape[0]):
        v = capped(load(row[j]), cap)
        if v == v or j < y:
            n += 1
    return n


@jit()
def eval_row(row, y, w, wsum, eps, eps_c, cap, kmax):
    """All metrics of one non-ignored row: ``(loss, nll, entropy, confidence, rank, pred)``, the
    floats in float64, ``rank`` capped at ``kmax``."""
    m = row_max(row, cap)
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
    """Per-row metrics of ``x`` (N, C, S) against ``target`` (N*S,) for rows ``[lo, hi)`` (dealt to
    threads by ``_parallel.run_tasks``).

    Writes, for every row ``r``: ``loss[r]`` (the cross-entropy term, 0 when ignored), ``nll[r]``,
    ``ent[r]``, ``conf[r]`` (0 when ignored), ``rank[r]`` (``min(rank, kmax)``, ``IGNORED`` when
    ignored) and ``pred[r]`` (argmax, lowest index among ties). Targets must already be validated.
    """
    N, C, S = x.shape
    x2 = x.reshape((N, C * S))
    eps_c = eps / C
    for r in range(lo, hi):
        y = target[r]
        if y == ignore_index:
            loss[r] = 0.0
            nll[r] = 0.0
            ent[r] = 0.0
            conf[r] = 0.0
            rank[r] = IGNORED
            pred[r] = -1
            continue
        n = r // S
        if S == 1:
            lr, nr, er, cr, kr, pr = eval_row(x2[n], y, w, wsum, eps, eps_c, cap, kmax)
        else:
            lr, nr, er, cr, kr, pr = eval_row(x[n, :, r - n * S], y, w, wsum, eps, eps_c, cap,
                                              kmax)
        loss[r] = lr
        nll[r] = nr
        ent[r] = er
        conf[r] = cr
        rank[r] = kr
        pred[r] = pr


@jit(python_callable=True)
def metrics_reduce(target, rank, pred, loss, conf, ks, cls_count, cls_correct, cls_pred, cls_loss,
                   topk_correct, bin_count, bin_conf, bin_correct):
    """Fold per-row records into the (zeroed, chunk-local) totals, serially in row order.

    ``ks`` are the k of top-k (int64); rows with a NaN confidence go to no calibration bin.
    Confidence ``p`` falls in bin ``b = ceil(p * B) - 1`` (clipped to ``[0, B)``), i.e. bins are
    ``((b)/B, (b+1)/B]``. Returns the number of non-ignored rows and of rows left out of the bins.
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
