"""The column kernels: blocks of short (few classes) or strided (K-dim, Fortran-ordered 2-D) rows,
each step run across the block's rows so the loops vectorise. The layout, the modes and the formulas
are described in `_kernels`."""
from __future__ import annotations

import numpy as np

from numba.extending import register_jitable

from ._jit import jit
from ._math import (as_2d, as_compute, cap_slope, capped, compute_zero, empty, exp_nonpos, exp_nonpos2, exp_summand,
                    exp_summand2, load, log, max_skipnan, col_run, rows_flat, run_view, shuffle_classes,
                    shuffle_max_classes, span, store, transpose_group, untranspose_group)
from ._rows import (BACKWARD, FORWARD, FUSED, index_grad_scale, index_loss, prob_grad_scale, prob_loss,
                    row_is_top1)

# -- column blocks: many short or strided rows at once -------------------------------------------------
# A K-dim row is strided by S, and a row of a few classes is too short to fill a vector register: the
# row kernels then run element by element and pay a scalar log per row. The column kernels take a block
# of `nb` rows as a (C, nb) array whose class rows are contiguous -- K-dim input already is one, rows
# `X[n*C + c, s0:s0+nb]` of its (N*C, S) view; short 2-D rows are transposed into an L1-sized scratch
# -- and run each step across the block, so the loops over rows vectorise: max, exp-sum, log, gradient.
# A block is named by `(X, i0, s0, nb)`: class `c` of the block's rows is `X[i0 + c, s0:s0 + nb]`.

COLUMN_BLOCK_ELEMENTS = 4096  # C * nb of a transposed 2-D block: it and its gradient scratch fit in L1
# C * nb of a K-dim block, read in place: its C class rows are S elements apart (1 MB for 512 x 512
# float32), so each block is C separate memory streams, and long runs keep the hardware prefetcher
# ahead: 1024 elements instead of ~200 (S5, 21 classes, Zen 3: forward 63-76 -> 53-61 ms, fused
# 110-125 -> 85-94 ms at 2 threads), then 3120 instead of 1024 (Zen 4, 2 threads: S5 forward
# 18.4-19.6 -> 17.3-17.7 ms, fused 29.6-30.3 -> 28.5-28.8; float64 4 x 21 x 512 x 512 16.9 ->
# 16.1 and 26.9 -> 25.8 ms). A float32 block and the fused call's exponentials take 512 KB, within
# the 1-2 MB L2 of the Zen 4 and Xeon machines (the transposed 2-D blocks measured no better, or
# worse, larger)
STRIDED_BLOCK_ELEMENTS = 65536
MAX_BLOCK_ROWS = 1024  # nb of a 2-D block ...
MAX_STRIDED_BLOCK_ROWS = 4096  # ... and of a K-dim one
TRANSPOSE_ROWS = 8  # rows a 2-D block is transposed in at a time (see _transpose_in) ...
TRANSPOSE_ROWS_FEW = 32  # ... and for at most TRANSPOSE_FEW_CLASSES classes
TRANSPOSE_FEW_CLASSES = 12
TRANSPOSE_OUT_ROW_BYTES = 48  # rows at least this long are transposed back row by row (_transpose_out)


# `register_jitable`: plain Python when the API layer calls it (nothing to compile), compiled only
# when a kernel calls it.
@register_jitable
def column_block_rows(C, S):
    """Rows per block of `(N, C, S)` logits: `COLUMN_BLOCK_ELEMENTS / C` for 2-D input (`S == 1`),
    at most `MAX_BLOCK_ROWS`, and `STRIDED_BLOCK_ELEMENTS / C` for K-dim, at most
    `MAX_STRIDED_BLOCK_ROWS`; rounded down to a multiple of 16, at least 16. Fixed by the shape
    alone, so block sums do not depend on the thread count."""
    if S == 1:
        nb, most = COLUMN_BLOCK_ELEMENTS // max(C, 1), MAX_BLOCK_ROWS
    else:
        nb, most = STRIDED_BLOCK_ELEMENTS // max(C, 1), MAX_STRIDED_BLOCK_ROWS
    return max(16, min(most, nb - nb % 16))


MAX_CLASSES_PER_PASS = 4


@jit(inline=True)
def cols_running_max(X, i0, s0, nb, C, m, cap):
    """`m_b = max_c capped(x_cb)` (NaN skipped, as in `row_max`), over the classes in order, four
    classes per pass over the block's rows: a pass loads and stores the running maximum once for
    four class runs (K-dim: the maximum's step 0.32-0.34 -> 0.22-0.24 ns per logit on 8 x 21 x 512
    x 512 float32 at one thread, Zen 4). Each `m_b` is the same chain of maxima as one class at a
    time, so the same bits. By `max_skipnan`, not `m[b] = v if v > m[b] else m[b]`: LLVM turns a
    select between a new value and the one loaded from the same address into a masked store,
    microcoded on AMD (0.8 ns per element, against 0.14, on a cached block)."""
    for b in range(nb):
        m[b] = -as_compute(np.inf, m)
    whole = C - C % MAX_CLASSES_PER_PASS
    for c in range(0, whole, MAX_CLASSES_PER_PASS):
        x0, x1 = run_view(X, i0 + c, s0, nb), run_view(X, i0 + c + 1, s0, nb)
        x2, x3 = run_view(X, i0 + c + 2, s0, nb), run_view(X, i0 + c + 3, s0, nb)
        for b in range(nb):
            v = max_skipnan(max_skipnan(m[b], capped(load(x0[b]), cap)), capped(load(x1[b]), cap))
            m[b] = max_skipnan(max_skipnan(v, capped(load(x2[b]), cap)), capped(load(x3[b]), cap))
    for c in range(whole, C):
        xr = run_view(X, i0 + c, s0, nb)
        for b in range(nb):
            m[b] = max_skipnan(m[b], capped(load(xr[b]), cap))


@jit(inline=True)
def cols_max(X, i0, s0, nb, C, m, cap):
    """`m_b = max_c x_cb` (`cols_running_max`), then soft-capped."""
    cols_running_max(X, i0, s0, nb, C, m, None)
    for b in range(nb):
        m[b] = capped(m[b], cap)


@jit(inline=True)
def shifted_exp_pair(xr, xr1, b, mb, cap):
    """`(v, v1, exp(v), exp(v1))` with `v = x_b - m_b` of two class runs `xr`, `xr1` of a block
    (capped logits): two classes per pass, their exps interleaved (`exp_nonpos2`), because a loop
    of one exp per row vector is latency-bound (LLVM vectorises a loop that is not a reduction one
    vector per iteration, and reloads the exp's constants and the row sums per class)."""
    v = capped(load(xr[b]), cap) - mb
    v1 = capped(load(xr1[b]), cap) - mb
    e, e1 = exp_nonpos2(v, v1)
    return v, v1, e, e1


@jit()
def cols_sums(X, T, i0, s0, nb, C, m, s, a, d, w, t_scale, t_shift, cap, need_exp, exps):
    """Per row `b` of the block: `s = sum_c exp(x_c - m)`, `a = sum_c w_c t~_c` and
    `d = sum_c w_c t~_c (x_c - m)`, with `t~ = t*t_scale + t_shift` for probability targets `T` and
    `t~ = 1` for class-index targets (`T` None; `a` is then left alone). Without `need_exp`
    (probability targets only), only `a`. Each `exp(x_cb - m_b)` is kept in the compute-type
    scratch `exps[c, b]` for `cols_grad_from_exp` (a store to L1, cheaper than a second exp)."""
    for b in range(nb):
        s[b] = 0
        d[b] = 0
        if T is not None:
            a[b] = 0
    if T is None:
        # two classes per pass (`shifted_exp_pair`); the sums keep their order
        # (`(s + e_c) + e_c+1`), so the bits are those of one class at a time
        for c in range(0, C - 1, 2):
            xr, xr1 = run_view(X, i0 + c, s0, nb), run_view(X, i0 + c + 1, s0, nb)
            wc, wc1 = w[c], w[c + 1]
            er, er1 = exps[c], exps[c + 1]
            for b in range(nb):
                v, v1, e, e1 = shifted_exp_pair(xr, xr1, b, m[b], cap)
                s[b] = (s[b] + e) + e1
                d[b] = (d[b] + wc * v) + wc1 * v1
                er[b] = e
                er1[b] = e1
        if C % 2:  # the last class of an odd count
            c = C - 1
            xr = run_view(X, i0 + c, s0, nb)
            wc = w[c]
            er = exps[c]
            for b in range(nb):
                v = capped(load(xr[b]), cap) - m[b]
                e = exp_nonpos(v)
                s[b] += e
                d[b] += wc * v
                er[b] = e
        return
    for c in range(C):
        xr = run_view(X, i0 + c, s0, nb)
        wc = w[c]
        er = exps[c]
        tr = run_view(T, i0 + c, s0, nb)
        if need_exp:
            for b in range(nb):
                v = capped(load(xr[b]), cap) - m[b]
                wt = wc * (tr[b] * t_scale + t_shift)
                e = exp_nonpos(v)
                s[b] += e
                a[b] += wt
                d[b] += wt * v
                er[b] = e
        else:
            for b in range(nb):
                a[b] += wc * (tr[b] * t_scale + t_shift)


@jit()
def cols_sumexp(X, i0, s0, nb, C, m, s, cap, j0, t0, m_next):
    """`s_b = sum_c exp(x_cb - m_b)` alone: `cols_sums` for a forward with class-index targets and no
    label smoothing, which needs neither the kept exponentials nor `d` (their stores and sums were
    a third of the forward's exp-sum). By `exp_summand` (one multiply fewer than `exp_nonpos`), four
    classes per pass (one load and store of each row's sum per four class runs), summed in class
    order: the same bits as `cols_sums`' `s`, since the terms the two exps round differently are
    below `exp(lo_normal)` and are absorbed by the 1 of the row's maximum. 10 float32 classes, one
    thread, Zen 4: the exp-sum step 0.38-0.41 -> 0.22 ns per logit (`benchmarks/pass_profile.py
    --columns-only`).

    And the same loop takes `m_next_b`, the uncapped maximum of the `nb` rows of the block at
    `(j0, t0)`: a kernel passes the next K-dim block, whose reads from memory then overlap this
    block's exps (8 x 21 x 512 x 512 float32, one thread: the maximum and exp-sum steps 0.37 ->
    0.31 ns per logit), or the block itself. Its maxima are `cols_running_max`'s but for the sign
    of a zero maximum, which changes no loss, lse or top-1.

    One loop, whose last group of fewer than four classes reads its first class again for the
    rest and adds 0 for them (a max taken twice is the same max): 21 classes, 24 exps per row. With
    loops of its own for the last pair and odd class, the K-dim forward was 5% faster and the
    column kernel's first call 7% slower (`benchmarks/compile_pairs.py`, both orders)."""
    z = compute_zero(s)
    for b in range(nb):
        s[b] = 0
        m_next[b] = -as_compute(np.inf, m_next)
    for c in range(0, C, 4):  # a last group of fewer than 4 reads its first class again, adding 0 for it
        k1, k2, k3 = c + 1 < C, c + 2 < C, c + 3 < C
        c1, c2, c3 = c + 1 if k1 else c, c + 2 if k2 else c, c + 3 if k3 else c
        xr, xr1 = run_view(X, i0 + c, s0, nb), run_view(X, i0 + c1, s0, nb)
        xr2, xr3 = run_view(X, i0 + c2, s0, nb), run_view(X, i0 + c3, s0, nb)
        yr, yr1 = run_view(X, j0 + c, t0, nb), run_view(X, j0 + c1, t0, nb)
        yr2, yr3 = run_view(X, j0 + c2, t0, nb), run_view(X, j0 + c3, t0, nb)
        for b in range(nb):
            mb = m[b]
            e, e1 = exp_summand2(capped(load(xr[b]), cap) - mb, capped(load(xr1[b]), cap) - mb)
            e2, e3 = exp_summand2(capped(load(xr2[b]), cap) - mb, capped(load(xr3[b]), cap) - mb)
            s[b] = (((s[b] + e) + (e1 if k1 else z)) + (e2 if k2 else z)) + (e3 if k3 else z)
            v = max_skipnan(max_skipnan(m_next[b], load(yr[b])), load(yr1[b]))
            m_next[b] = max_skipnan(max_skipnan(v, load(yr2[b])), load(yr3[b]))


@jit(inline=True)
def cols_log(s, ls, nb):
    for b in range(nb):
        ls[b] = log(s[b])


@jit()
def cols_grad(X, T, i0, s0, nb, C, m, ls, coef, tcoef, yv, term, w, t_scale, t_shift, cap, G, gi0, gs0):
    """`G[gi0 + c, gs0 + b] = (exp((x_cb - m_b) - ls_b) coef_b - w_c tcoef_b t~_cb) dx_cb` (`t~ = 1`
    for class-index targets, `T` None), minus `term_b dx_cb` in each row's target class `c = yv_b`
    for class-index targets: the gradient's `-(1 - eps) w_y g` folded into the pass over every
    class, a compare and a select per element, where a separate scattered store per row cost 2.2
    ns (K-dim fused, Zen 4); an ignored row has `term = 0` (and `yv = 0`), and `q - 0` is `q`,
    -0.0 and NaN included. `G` must not be `X` (the kernels pass a scratch block then): LLVM's
    runtime alias check would send an aliased loop to its scalar version."""
    for c in range(C):
        xr = run_view(X, i0 + c, s0, nb)
        gr = run_view(G, gi0 + c, gs0, nb)
        wc = w[c]
        if T is None:
            for b in range(nb):
                v = capped(load(xr[b]), cap)
                p = exp_nonpos((v - m[b]) - ls[b])
                q = p * coef[b] - wc * tcoef[b]
                store(gr, b, (q - term[b] if yv[b] == c else q) * cap_slope(v, cap))
        else:
            tr = run_view(T, i0 + c, s0, nb)
            for b in range(nb):
                v = capped(load(xr[b]), cap)
                p = exp_nonpos((v - m[b]) - ls[b])
                store(gr, b, (p * coef[b] - wc * tcoef[b] * (tr[b] * t_scale + t_shift))
                      * cap_slope(v, cap))


@jit(inline=True)
def cols_grad_from_exp(exps, T, i0, s0, nb, C, scale, tcoef, yv, term, w, t_scale, t_shift, G, gi0, gs0):
    """`cols_grad` from the exponentials kept by `cols_sums` (fused call, no soft-cap):
    `G[gi0 + c, gs0 + b] = exps[c, b] scale_b - w_c tcoef_b t~_cb` with `scale_b = coef_b / s_b`
    (`exps/s` is within 2 ulp of `exp((x - m) - ls)`), minus the true-class term as in
    `cols_grad`."""
    for c in range(C):
        er = exps[c]
        gr = run_view(G, gi0 + c, gs0, nb)
        wc = w[c]
        if T is None:
            for b in range(nb):
                q = er[b] * scale[b] - wc * tcoef[b]
                store(gr, b, q - term[b] if yv[b] == c else q)
        else:
            tr = run_view(T, i0 + c, s0, nb)
            for b in range(nb):
                store(gr, b, er[b] * scale[b] - wc * tcoef[b] * (tr[b] * t_scale + t_shift))


@jit(inline=True)
def cols_target_rows(target, r0, nb, ignore_index, w, w_uniform, yv, ok, wy):
    """Each row's target: `ok` (not ignored), `yv` (the class, 0 when ignored) and `wy` its weight
    (0 when ignored). With `w_uniform` (every class weight equal to `w[0]`, as without class
    weights) one loop that vectorises; otherwise the weights' gather is a second, scalar loop
    (1.16 -> 0.69 ns per row with the logits' gather, on a cached 400 x 10 block, Zen 4)."""
    tv = span(target, r0, nb)
    w0 = w[0] if w_uniform else compute_zero(w)
    for b in range(nb):
        y = tv[b]
        valid = y != ignore_index
        yv[b] = y if valid else 0
        ok[b] = valid
        wy[b] = w0 if valid else compute_zero(w)
    if not w_uniform:
        for b in range(nb):
            wy[b] = w[yv[b]] if ok[b] else compute_zero(w)


def transpose_variant(dtype, C: int, S: int):
    """The column kernels' `in_registers` argument: True when 2-D blocks (`S == 1`) of `C` classes
    of this storage dtype are transposed in registers (`_math.transpose_group`), else None -- a
    type of its own, so that the kernel variant for every other shape (10 float32 classes, K-dim)
    holds none of the shuffle code and compiles as fast as before it."""
    return True if S == 1 and C <= shuffle_max_classes(dtype) else None


def uniform_weights(w) -> bool:
    """Whether every class weight equals the first (no class weights, or all the same): the
    kernels' `w_uniform` argument, worked out in Python (nothing to compile)."""
    return bool(w.shape[0] == 0 or (w == w[0]).all())


@jit(inline=True)
def cols_target_logits(X, i0, s0, nb, yv, cap, xy):
    """Each row's (capped) target logit `xy`, gathered row by row. Run it once the block has been
    read by a pass over its classes: K-dim class runs are `S` apart in memory, and a gather from a
    block not yet in cache misses on nearly every row (before this order, 27-35% of a K-dim
    backward pass in `perf`)."""
    for b in range(nb):
        xy[b] = capped(load(X[i0 + yv[b], s0 + b]), cap)


@jit(inline=True)
def _transpose_groups(flat, nb, C, dst, rows):
    """`dst[c, b] = flat[b*C + c]` for the block's rows in whole groups of `rows` (a constant:
    the loop over a group's rows is unrolled); returns the rows done."""
    whole = nb - nb % rows
    for b0 in range(0, whole, rows):
        for c in range(C):
            dr = dst[c]
            for k in range(rows):
                dr[b0 + k] = flat[(b0 + k) * C + c]
    return whole


@jit(inline=True)
def _transpose_in(X, n0, nb, C, dst, in_registers):
    # rows in groups, each group's C columns in turn: the block's lines are read front to back,
    # which its first read from memory needs (column by column over the whole block measured 25%
    # slower from memory, the same from L2); flat indices with a loop-invariant stride (2-D
    # indexing `X[n0 + b, c]` measured 25% slower on the whole fused call). Groups of
    # TRANSPOSE_ROWS_FEW rows for few classes, whose groups of TRANSPOSE_ROWS span too few cache
    # lines to keep enough reads from memory in flight. Up to `shuffle_classes`' count, in the
    # kernel variant `in_registers` (see `transpose_variant`), groups of rows are transposed in
    # registers instead (`_math.transpose_group`)
    flat = rows_flat(X, n0, nb)
    lanes, most = shuffle_classes(X, in_registers)
    if most > 0 and C <= most:  # (`most` is a constant: 0 drops the branch from the compiled code)
        whole = nb - nb % lanes
        for b0 in range(0, whole, lanes):
            transpose_group(flat, b0 * C, C, dst, b0)
    elif C <= TRANSPOSE_FEW_CLASSES:
        whole = _transpose_groups(flat, nb, C, dst, TRANSPOSE_ROWS_FEW)
    else:
        whole = _transpose_groups(flat, nb, C, dst, TRANSPOSE_ROWS)
    for c in range(C):
        dr = dst[c]
        for b in range(whole, nb):
            dr[b] = flat[b * C + c]


@jit(inline=True)
def _transpose_out(src, n0, nb, C, X, in_registers):
    # rows of at least TRANSPOSE_OUT_ROW_BYTES row by row (each row's bytes stored in turn), shorter
    # ones column by column: 1M rows from L1 to memory, Zen 4, ns per logit, column-wise against
    # row-wise: float32 C=5 0.30/0.49, C=13 0.41/0.37, C=21 0.56/0.29, C=40 0.66/0.28; float64
    # C=13 1.01/0.72; 16-bit C=13 0.23/0.33, C=40 0.36/0.23 (grouping rows as `_transpose_in`
    # does measured no better, with five times the code). Up to `shuffle_classes`' count, groups
    # of rows in registers (`_math.untranspose_group`), the rest as above
    flat = rows_flat(X, n0, nb)
    lanes, most = shuffle_classes(X, in_registers)
    if most > 0 and C <= most:  # (`most` is a constant: 0 drops the branch from the compiled code)
        whole = nb - nb % lanes
        for b0 in range(0, whole, lanes):
            untranspose_group(src, b0, C, flat, b0 * C)
        for b in range(whole, nb):
            for c in range(C):
                flat[b * C + c] = src[c, b]
    elif C * X.itemsize >= TRANSPOSE_OUT_ROW_BYTES:
        for b in range(nb):
            for c in range(C):
                flat[b * C + c] = src[c, b]
    else:
        for c in range(C):
            sr = src[c]
            for b in range(nb):
                flat[b * C + c] = sr[b]


@jit(inline=True)
def _copy_out(src, i0, s0, nb, C, X):
    for c in range(C):
        xr = run_view(X, i0 + c, s0, nb)
        sr = src[c]
        for b in range(nb):
            xr[b] = sr[b]


@jit()
def _block_source(X, x_block, S, n, nb, C, in_registers):
    """The array a block's class rows are read from: `X` itself (K-dim), or for 2-D input the
    block's rows `n .. n+nb` transposed into the scratch `x_block`."""
    if S == 1:
        _transpose_in(X, n, nb, C, x_block, in_registers)
        return x_block
    return X


@jit()
def _block_write_grad(grad_block, grad_view, S, scratch_grad, n, i0, s0, nb, C, in_registers):
    """Move a block's gradient from the scratch `grad_block` to the gradient `grad_view`
    (transposed back for 2-D input; copied for K-dim written in place); nothing when it was
    written to `grad_view` directly."""
    if S == 1:
        _transpose_out(grad_block, n, nb, C, grad_view, in_registers)
    elif scratch_grad:
        _copy_out(grad_block, i0, s0, nb, C, grad_view)


@jit(inline=True)
def column_views(a, S):
    """`a` (N, C, S) as the 2-D C-contiguous array the blocks index: (N, C) when `S == 1` (rows
    are transposed into scratch) and (N*C, S) otherwise."""
    if S == 1:
        return as_2d(a, a.shape[0], a.shape[1] * a.shape[2])
    return as_2d(a, a.shape[0] * a.shape[1], a.shape[2])


def column_view(a):
    """`column_views` from Python (a view, nothing compiled): the kernels take it as an argument."""
    N, C, S = a.shape
    return a.reshape((N, C * S) if S == 1 else (N * C, S))


@jit(inline=True)
def column_block(blk, N, C, S, nbmax):
    """Block `blk` as `(n, i0, s0, nb, r0)`: sample `n`, first class row `i0` and position
    `s0` in the (N*C, S) view (`i0 = s0 = 0` for a transposed scratch), rows and first flat row."""
    if S == 1:  # (conditionals, not min(): one builtin fewer to compile)
        n0 = blk * nbmax
        return n0, 0, 0, nbmax if N - n0 > nbmax else N - n0, n0
    per_n = (S + nbmax - 1) // nbmax
    n = blk // per_n
    s0 = (blk - n * per_n) * nbmax
    return n, n * C, s0, nbmax if S - s0 > nbmax else S - s0, n * S + s0


@jit(inline=True)
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
    out = empty(column_count(N, S, nbmax), np.float64)
    for blk in range(out.shape[0]):
        _, _, _, nb, r0 = column_block(blk, N, 0, S, nbmax)  # C only offsets i0, unused here
        out[blk] = sum_in_order(span(loss, r0, nb))
    return out


@register_jitable
def column_count(N, S, nbmax):
    if S == 1:
        return (N + nbmax - 1) // nbmax
    return N * ((S + nbmax - 1) // nbmax)


@jit(inline=True)
def _load_saved(row_max, row_logsum, r0, nb, m, ls):
    """BACKWARD: the block's saved row max and log-sum into `m` and `ls`."""
    mv, lv = span(row_max, r0, nb), span(row_logsum, r0, nb)  # (indices from 0: see `_math.span`)
    for b in range(nb):
        m[b] = mv[b]
        ls[b] = lv[b]


@jit()
def cols_block_grad(src, T, exps, i0, s0, nb, C, m, ls, s, coef, tcoef, yv, term, w, t_scale, t_shift, cap,
                    mode, G, gi0, gs0):
    """Write a block's gradient into `G` (for class-index targets, `T` None, with the true-class
    term `term` in each row's class `yv`): from the exponentials kept in `exps` by the sum pass
    when the call is FUSED without soft-cap (`s` then becomes the per-row scale `coef / s`), else
    by `cols_grad`."""
    if mode == FUSED and cap is None:
        for b in range(nb):
            s[b] = coef[b] / s[b]
        cols_grad_from_exp(exps, T, i0, s0, nb, C, s, tcoef, yv, term, w, t_scale, t_shift, G, gi0, gs0)
    else:
        cols_grad(src, T, i0, s0, nb, C, m, ls, coef, tcoef, yv, term, w, t_scale, t_shift, cap, G, gi0, gs0)


@jit(inline=True)
def _block_values(a, r0, nb, per_row, out):
    """`out[b] = a[r0 + b]` for a per-row `a` (upstream gradient or sample weight), else `a[0]`:
    the block's row factors in scratch, so that the loops over rows that use them have no
    per-row choice between the two and vectorise (2 float32 classes, 4M rows, one thread, Zen 4:
    a forward's block steps 27.4 ms with the choice in its loss loop, 18.0 without)."""
    if per_row:
        av = span(a, r0, nb)  # (indices from 0: see `_math.span`)
        for b in range(nb):
            out[b] = av[b]
    else:
        a0 = a[0]
        for b in range(nb):
            out[b] = a0


@jit(python_callable=True)
def index_cols_kernel(lo, hi, X, N, C, S, nbmax, in_registers, target, w, w_uniform, wsum, ignore_index, eps, z, cap,
                      mode, in_place, g, sw, row_max, row_logsum, loss, top1, grad_view, rows_out):
    """`index_kernel` over the column blocks `[lo, hi)` (of `column_count`) of `(N, C, S)`
    logits seen as the 2-D array `X`: `(N, C)` when `S == 1` (rows are transposed into scratch),
    `(N*C, S)` otherwise; `grad_view` is the gradient seen the same way ((1, 1) and unused in FORWARD
    mode). `nbmax = column_block_rows(C, S)`, `in_registers = transpose_variant(...)`, `w_uniform =
    uniform_weights(w)`. Other arguments and results as in `index_kernel`.

    `rows_out=False` (forward for a 'sum'/'mean' caller) writes no per-row output: `loss` is
    then `(column_count(...),)` and receives each block's float64 loss sum, `row_max,
    row_logsum, top1` are untouched. Per-row outputs of many short rows cost as much memory
    traffic as the logits; blocks depend on `C` only, so the partial sums do not depend on the
    thread count."""
    R = N * S
    eps_c = eps / C
    per_row_g = g.shape[0] == R
    per_row_sw = sw.shape[0] == R
    scratch_grad = mode != FORWARD and (S == 1 or in_place)
    # scratch by `_math.empty`: nothing of NumPy's np.empty to compile per shape and dtype
    x_block = empty((C, nbmax if S == 1 else 0), X.dtype)
    grad_block = empty((C, nbmax if scratch_grad else 0), X.dtype)
    exps = empty((C, nbmax), w.dtype)
    m, s, d, ls = (empty(nbmax, w.dtype), empty(nbmax, w.dtype), empty(nbmax, w.dtype),
                   empty(nbmax, w.dtype))
    xy, wy, coef, tcoef, term = (empty(nbmax, w.dtype), empty(nbmax, w.dtype), empty(nbmax, w.dtype),
                                 empty(nbmax, w.dtype), empty(nbmax, w.dtype))
    yv = empty(nbmax, np.int32)  # as wide as the float32 lanes its compares select in
    ok = empty(nbmax, np.bool_)
    lrow, gf, swf = empty(nbmax, np.float64), empty(nbmax, np.float64), empty(nbmax, np.float64)
    m_next = empty(nbmax, w.dtype)
    ahead = False  # whether `m_next` holds this block's maximum, taken by the block before's exp-sum
    for blk in range(lo, hi):
        n, i0, s0, nb, r0 = column_block(blk, N, C, S, nbmax)
        src = _block_source(X, x_block, S, n, nb, C, in_registers)
        _block_values(sw, r0, nb, per_row_sw, swf)
        if mode != BACKWARD:
            if ahead:
                for b in range(nb):
                    m[b] = capped(m_next[b], cap)
            else:
                cols_max(src, i0, s0, nb, C, m, cap)
            if mode == FORWARD and eps_c == 0:  # (`d` then unused: `index_loss` reads it with smoothing only)
                # the next K-dim block's maximum in this block's exp-sum if it has as many rows (a
                # transposed 2-D block, or a next block of another length, passes the block itself)
                j0, t0, ahead = i0, s0, False
                if S > 1 and blk + 1 < hi:
                    _, i1, s1, nb1, _ = column_block(blk + 1, N, C, S, nbmax)
                    if nb1 == nb:
                        j0, t0, ahead = i1, s1, True
                cols_sumexp(src, i0, s0, nb, C, m, s, cap, j0, t0, m_next)
            else:
                cols_sums(src, None, i0, s0, nb, C, m, s, s, d, w, 1, 0, cap, True, exps)
            cols_log(s, ls, nb)
        else:
            _load_saved(row_max, row_logsum, r0, nb, m, ls)
        cols_target_rows(target, r0, nb, ignore_index, w, w_uniform, yv, ok, wy)
        if mode != BACKWARD:
            cols_target_logits(src, i0, s0, nb, yv, cap, xy)  # the block is in cache: max and sums read it
            lb = span(loss, r0, nb) if rows_out else span(lrow, 0, nb)
            for b in range(nb):  # one store per row, no conditional one (a masked store, see cols_max)
                lr = index_loss(m[b], ls[b], xy[b], d[b], wy[b], wsum, eps, eps_c, z) * swf[b]
                lb[b] = lr if ok[b] else 0.0
            if not rows_out:
                loss[blk] = sum_in_order(lb)
            else:
                out_m, out_ls, out_top1 = span(row_max, r0, nb), span(row_logsum, r0, nb), span(top1, r0, nb)
                for b in range(nb):
                    out_m[b] = m[b]
                    out_ls[b] = ls[b]
                    out_top1[b] = ok[b] & (xy[b] >= m[b]) & (ls[b] == ls[b])  # (lse NaN: not top-1)
                for b in range(nb):  # ties for the maximum go to the lowest class
                    if out_top1[b] and yv[b] > 0:
                        y = np.int64(yv[b])
                        out_top1[b] = row_is_top1(col_run(src, i0, s0 + b, y + 1), y, xy[b], m[b], cap)
        if mode == FORWARD:
            continue
        _block_values(g, r0, nb, per_row_g, gf)
        for b in range(nb):
            gv = gf[b] * swf[b] if ok[b] else 0.0
            coef[b] = as_compute(gv * index_grad_scale(m[b], ls[b], wy[b], wsum, eps, eps_c, z), X)
            tcoef[b] = as_compute(gv * eps_c, X)
            term[b] = as_compute(gv * (1.0 - eps) * np.float64(wy[b]), X)  # as in index_row
        dst, gi0, gs0 = (grad_block, 0, 0) if scratch_grad else (grad_view, i0, s0)
        cols_block_grad(src, None, exps, i0, s0, nb, C, m, ls, s, coef, tcoef, yv, term, w, 1, 0, cap, mode,
                        dst, gi0, gs0)
        _block_write_grad(grad_block, grad_view, S, scratch_grad, n, i0, s0, nb, C, in_registers)


@jit(python_callable=True)
def prob_cols_kernel(lo, hi, X, N, C, S, nbmax, in_registers, T, w, t_scale, t_shift, z, cap, mode, in_place, g,
                     sw, row_max,
                     row_logsum, loss, grad_view, rows_out):
    """`prob_kernel` over the column blocks `[lo, hi)`, the probability targets `T` seen as `X`
    is (other arguments as in `index_cols_kernel`)."""
    R = N * S
    per_row_g = g.shape[0] == R
    per_row_sw = sw.shape[0] == R
    scratch_grad = mode != FORWARD and (S == 1 or in_place)
    x_block = empty((C, nbmax if S == 1 else 0), X.dtype)
    t_block = empty((C, nbmax if S == 1 else 0), T.dtype)
    grad_block = empty((C, nbmax if scratch_grad else 0), X.dtype)
    exps = empty((C, nbmax), w.dtype)
    rows = empty((7, nbmax), w.dtype)
    m, s, a, d, ls, coef, gcoef = rows[0], rows[1], rows[2], rows[3], rows[4], rows[5], rows[6]
    lrow, gf, swf = empty(nbmax, np.float64), empty(nbmax, np.float64), empty(nbmax, np.float64)
    no_class = empty(0, np.int32)  # (probability targets have no true-class term)
    for blk in range(lo, hi):
        n, i0, s0, nb, r0 = column_block(blk, N, C, S, nbmax)
        src = _block_source(X, x_block, S, n, nb, C, in_registers)
        tsrc = _block_source(T, t_block, S, n, nb, C, in_registers)
        _block_values(sw, r0, nb, per_row_sw, swf)
        if mode != BACKWARD:
            cols_max(src, i0, s0, nb, C, m, cap)
            cols_sums(src, tsrc, i0, s0, nb, C, m, s, a, d, w, t_scale, t_shift, cap, True, exps)
            cols_log(s, ls, nb)
            lb = span(loss, r0, nb) if rows_out else span(lrow, 0, nb)
            for b in range(nb):
                lb[b] = prob_loss(m[b], ls[b], a[b], d[b], z) * swf[b]
            if not rows_out:
                loss[blk] = sum_in_order(lb)
            else:
                out_m, out_ls = span(row_max, r0, nb), span(row_logsum, r0, nb)
                for b in range(nb):
                    out_m[b] = m[b]
                    out_ls[b] = ls[b]
        else:
            _load_saved(row_max, row_logsum, r0, nb, m, ls)
            cols_sums(src, tsrc, i0, s0, nb, C, m, s, a, d, w, t_scale, t_shift, cap, False, exps)
        if mode == FORWARD:
            continue
        _block_values(g, r0, nb, per_row_g, gf)
        for b in range(nb):
            gv = gf[b] * swf[b]
            coef[b] = as_compute(gv * prob_grad_scale(m[b], ls[b], a[b], z), X)
            gcoef[b] = as_compute(gv, X)
        dst, gi0, gs0 = (grad_block, 0, 0) if scratch_grad else (grad_view, i0, s0)
        cols_block_grad(src, tsrc, exps, i0, s0, nb, C, m, ls, s, coef, gcoef, no_class, coef, w, t_scale,
                        t_shift, cap, mode, dst, gi0, gs0)
        _block_write_grad(grad_block, grad_view, S, scratch_grad, n, i0, s0, nb, C, in_registers)
