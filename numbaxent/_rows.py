"""The row kernels: one contiguous row of logits at a time (2-D input with more than
`_kernels.COLUMN_MAX_C` classes), the row primitives they are built from, and the per-row loss and
gradient formulas that the column kernels share. The layout, the modes and the formulas are
described in `_kernels`."""
from __future__ import annotations

import math

import numpy as np

from ._jit import jit
from ._math import (as_2d, as_compute, borrowed, borrowed_row, cap_slope, capped, compute_zero, empty, exp_nonpos,
                    exp_stash, from_storage_bits, load, max_int, max_skipnan, min_int, nan_if_probed,
                    nonpos_and_probe, one_like, span, stash_in_grad, storage_bits, store, stored_bits,
                    summand_and_probe)

FORWARD, FUSED, BACKWARD = 0, 1, 2


# -- row primitives ----------------------------------------------------------------------------------
# `cap` is None (plain logits) or the soft-cap value; every primitive reads `capped(load(row[j]), cap)`.

@jit(inline=True)
def row_max(row, cap):
    """`max_c x_c` in the compute type (NaN entries are skipped here; they reach the result through
    `row_sumexp`, where `x - m` is NaN). Soft-capping is monotone, so the cap is applied once, to
    the raw maximum, instead of to every element. `max_skipnan` makes the loop a packed reduction."""
    m = -as_compute(np.inf, row)
    for j in range(row.shape[0]):
        m = max_skipnan(m, load(row[j]))
    return capped(m, cap)


@jit(inline=True)
def max_start(row):
    """The start `(hi, lo)` of a row maximum taken by bits (`_math.storage_bits`, `bits_max_min`):
    the smallest integer (-0.0's bits) and -inf's bits, as stored in `row`'s dtype."""
    return stored_bits(-as_compute(0.0, row), row), stored_bits(-as_compute(np.inf, row), row)


@jit(inline=True)
def bits_max_min(hi, lo, v):
    """`(max(hi, bits(v)), min(lo, bits(v)))` for a stored element `v` (not widened: a 16-bit
    element's bits are compared as int16): one element of a maximum taken by bits."""
    b = storage_bits(v)
    return max_int(hi, b), min_int(lo, b)


@jit(inline=True)
def next_row_max(k, row, cap):
    """`row_max(nxt, cap)` from `k = (hi, lo)`, the largest and smallest bits of the row `nxt`
    that a sum pass over the row before it took (see `row_sumexp` and the comment above
    `_math.storage_bits`): the float of `hi` if it is non-negative, else of `lo`, in the compute
    type of `row` (any row of the same dtype as `nxt`). A negative NaN is
    skipped as `row_max` skips it; a positive NaN's bits are above every other, so the maximum is
    then NaN instead of the largest other logit, which changes nothing: such a row's exp-sum, and
    so its lse, loss and gradient, are NaN either way (and it is not top-1)."""
    hi, lo = k
    return capped(from_storage_bits(hi if hi >= 0 else lo, row), cap)


@jit(inline=True)
def next_row_max_skipnan(k, nxt, cap):
    """`next_row_max`, a positive NaN skipped as `row_max` skips it (the row is read again then):
    for the evaluator, whose rank and predicted class of a row with NaN logits need the largest
    other logit."""
    if k[0] > stored_bits(as_compute(np.inf, nxt), nxt):
        return row_max(nxt, cap)
    return next_row_max(k, nxt, cap)


@jit(inline=True)
def row_sumexp(row, m, cap, stash, keep_exp, nxt):
    """`(sum_c exp(x_c - m), k)` with `k` the largest and smallest bits of the row `nxt` (as long
    as `row`; `next_row_max` turns them into `nxt`'s maximum). Why the next row's maximum here: the sum
    is compute-bound and the maximum pass memory-bound, and in one loop the next row's reads
    overlap this row's exps (a kernel passes the row after `row`, or `row` itself for its last).
    With `keep_exp` each `exp(x_c - m)` is also written to `stash` (the gradient row, never `row`
    itself). See `row_grad_from_exp`. A flag rather than `stash=None`: one compiled function
    instead of two. The loop is written twice on purpose: LLVM's default pipeline does not unswitch
    a loop on a flag that guards a store, and a masked store would slow the hot loop. The loop
    that keeps no exponential takes `exp_summand`: one multiply fewer per element, the same sum
    (the row's maximum contributes exp(0) = 1; float32 exp-sum 0.197 -> 0.186 ns per logit on a
    Zen 4); for float32/float64 logits `exp_summand_bits`, one multiply fewer again for the same
    bits, with a sum of `x - m` to tell NaN rows (`summand_and_probe`): the float64 65536 x 1000
    forward 26.0-28.9 -> 23.7-24.9 ms at two threads, float32 9.5-10.0 -> 9.2-10.0 (Zen 4, the
    fastest calls of alternated rounds). The loop that keeps them does the same with
    `exp_nonpos_bits` (`nonpos_and_probe`; fused calls 5-7% faster)."""
    s = compute_zero(row)
    hi, lo = max_start(row)
    q = compute_zero(row)  # the NaN probes' sum (`summand_and_probe`)
    if keep_exp:
        for j in range(row.shape[0]):
            e, qj = nonpos_and_probe(capped(load(row[j]), cap) - m, row)
            s += e
            q += qj
            stash[j] = e
            hi, lo = bits_max_min(hi, lo, nxt[j])
    else:
        for j in range(row.shape[0]):
            e, qj = summand_and_probe(capped(load(row[j]), cap) - m, row)
            s += e
            q += qj
            hi, lo = bits_max_min(hi, lo, nxt[j])
    s = nan_if_probed(s, q)
    return s, (hi, lo)


@jit(inline=True)
def row_sumexp_wdot(row, m, w, cap, stash, keep_exp, nxt):
    """`(sum_c exp(x_c - m), sum_c w_c (x_c - m), k)`: the second sum gives the label-smoothing
    term `sum_c w_c (lse - x_c)` without cancellation (every `x_c - m <= 0`). `stash`,
    `keep_exp`, `nxt` and `k` as in `row_sumexp`."""
    s = compute_zero(row)
    d = compute_zero(row)
    hi, lo = max_start(row)
    q = compute_zero(row)  # the NaN probes' sum (`summand_and_probe`)
    if keep_exp:  # two loops, as in row_sumexp
        for j in range(row.shape[0]):
            v = capped(load(row[j]), cap) - m
            e, qj = nonpos_and_probe(v, row)
            s += e
            q += qj
            d += w[j] * v
            stash[j] = e
            hi, lo = bits_max_min(hi, lo, nxt[j])
    else:
        for j in range(row.shape[0]):
            v = capped(load(row[j]), cap) - m
            e, qj = summand_and_probe(v, row)
            s += e
            q += qj
            d += w[j] * v
            hi, lo = bits_max_min(hi, lo, nxt[j])
    s = nan_if_probed(s, q)
    return s, d, (hi, lo)


@jit(inline=True)
def row_grad_from_exp(grow, stash, scale, w, wcoef):
    """`grow_j = e_j * scale - w_j * wcoef` where `stash` holds `e_j = exp(x_j - m)` from the
    sum pass (`exp_stash`: `grow` itself for float32/float64 gradients) and `scale = coef / s`: the
    fused call's gradient without a second exp per element (`p_j = e_j / s` is within 2 ulp of
    `exp((x_j - m) - ls)`). Not with soft-capping (whose slope needs `x_j`)."""
    if stash_in_grad(grow):
        for j in range(grow.shape[0]):  # indexed through `grow` alone: no runtime alias check
            grow[j] = grow[j] * scale - w[j] * wcoef
    else:
        for j in range(grow.shape[0]):
            store(grow, j, stash[j] * scale - w[j] * wcoef)


@jit(inline=True)
def row_soft_sums(row, trow, m, w, t_scale, t_shift, cap, stash, keep_exp, nxt):
    """For probability targets `t~ = t*t_scale + t_shift`: `(sum exp(x - m), sum w t~, sum w t~ (x - m),
    k)`. `stash`, `keep_exp`, `nxt` and `k` as in `row_sumexp`."""
    s = compute_zero(row)
    a = compute_zero(row)
    d = compute_zero(row)
    hi, lo = max_start(row)
    q = compute_zero(row)  # the NaN probes' sum (`summand_and_probe`)
    if keep_exp:  # two loops, as in row_sumexp
        for j in range(row.shape[0]):
            v = capped(load(row[j]), cap) - m
            wt = w[j] * (trow[j] * t_scale + t_shift)
            e, qj = nonpos_and_probe(v, row)
            s += e
            q += qj
            a += wt
            d += wt * v
            stash[j] = e
            hi, lo = bits_max_min(hi, lo, nxt[j])
    else:
        for j in range(row.shape[0]):
            v = capped(load(row[j]), cap) - m
            wt = w[j] * (trow[j] * t_scale + t_shift)
            e, qj = summand_and_probe(v, row)
            s += e
            q += qj
            a += wt
            d += wt * v
            hi, lo = bits_max_min(hi, lo, nxt[j])
    s = nan_if_probed(s, q)
    return s, a, d, (hi, lo)


# The evaluator's sums (`_metrics.eval_row`), here with the core's because both take them by chunks
# on long rows (`chunked_row_pass`). The entropy sums' floor for `x_c - m`: exp of it is 0 in float32 and
# float64 (which underflow below -104 and -746), so clamping there changes no term but turns
# `0 * -inf` (NaN) into 0.
H_FLOOR = -1.0e4


@jit(inline=True)
def row_eval_sums(row, m, w, cap, smooth, nxt):
    """`(s, h, d, k)` in one loop: `s = sum e_c`, `h = sum e_c (x_c - m)`, when `smooth`
    `d = sum w_c (x_c - m)` (0 otherwise), and `k` the largest and smallest bits of the row `nxt` (as in
    `row_sumexp`: its read overlaps this row's exps). `h` is one fused multiply-add per
    element; a `-inf` logit (`e_c = 0`, `x_c - m = -inf`) makes it `0 * -inf = NaN` there, and
    only then (`h` NaN while `s` is not) is `h` summed again with `x_c - m` clamped to `H_FLOOR`,
    far below where `e_c` underflows to 0, so that such a logit adds 0 (`0 log 0 = 0`). The clamp
    in the main loop cost 4-5% of a long row's evaluation (measured). The counts of
    `row_count_greater` and `row_first_equal` are separate loops on purpose: an integer reduction
    in this loop halves its vector width (measured: +40% time; the 32-bit keys of a float32 row
    keep its width)."""
    s = compute_zero(row)
    h = compute_zero(row)
    d = compute_zero(row)
    hi, lo = max_start(row)
    if smooth:
        for j in range(row.shape[0]):
            v = capped(load(row[j]), cap) - m
            e = exp_nonpos(v)  # v <= 0 (or NaN): m is the maximum
            s += e
            h += e * v
            d += w[j] * v
            hi, lo = bits_max_min(hi, lo, nxt[j])
    else:
        for j in range(row.shape[0]):
            v = capped(load(row[j]), cap) - m
            e = exp_nonpos(v)
            s += e
            h += e * v
            hi, lo = bits_max_min(hi, lo, nxt[j])
    if h != h and s == s:  # a -inf logit (rare): the clamped sum
        floor = as_compute(H_FLOOR, row)
        h = compute_zero(row)
        for j in range(row.shape[0]):
            v = capped(load(row[j]), cap) - m
            h += exp_nonpos(v) * (v if v > floor else floor)
    return s, h, d, (hi, lo)


# -- the sum pass over a row, by chunks ---------------------------------------------------------------
# A row's maximum is taken ahead, in the loop that sums the exponentials of what comes before it:
# one loop reads the next data from memory while computing on data in cache. For a row of up to
# `2 * ROW_CHUNK_BYTES` that is the whole next row, read while this row is summed. A longer row goes in
# chunks of `ROW_CHUNK_BYTES` (a multiple of 64 elements: no loop remainders), each chunk's exponentials
# shifted by its own maximum, taken in the loop over the chunk before it (the row's last chunk takes
# the next row's first chunk's): the second read comes from L1, not L2. Taking a whole long row's
# maximum ahead cost 0.34-0.36 ns per float32 logit at one thread from memory against 0.25-0.27 by
# chunks, and 22.7-24.7 ms against 16.2-17.1 ms for 4096 x 32000 at two threads, where one read takes
# 16.1-16.6 ms (Zen 4; `benchmarks/row_stream_profile.py`). A ragged part (`C mod chunk`) is the row's
# first chunk, summed on its own. The chunks' sums are rescaled to the row's maximum once the row is
# done (`rescaled_sums`). Only FORWARD passes go by chunks (`chunk_variant`).
ROW_CHUNK_BYTES = 6144  # twice in L1; not a multiple of 4 KB (two reads 4 KB apart conflict: +10%)


def chunk_variant(dtype, C: int, mode: int, soft: bool = False, eps: float = 0.0, cap=None):
    """The row kernels' `(single, chunked)` arguments: `(None, True)` for a FORWARD pass over rows of
    `C` float32/float64 elements longer than `2 * ROW_CHUNK_BYTES` (summed in chunks,
    `chunked_row_pass`) of probability targets (`soft`), or of class indices without label smoothing
    (`eps` 0), not soft-capped (`cap` None); else `(True, None)`. Two flags, each None in the kernel variant
    that lacks its code (Numba prunes a branch on `arg is not None` only where `arg` is None), so
    each variant compiles one path. Where the chunks do not pay (4096 x 32000, 2 threads, Zen 4,
    whole row -> chunks, alternated runs): the fused pass, which keeps a long row's
    exponentials for its gradient (0.276 -> 0.274 ns per logit, and twice the compile time);
    16-bit logits, bound by their conversion and the exp (16.3-16.8 -> 16.9-17.9 ms); and
    class-index targets with label smoothing (29.0 -> 30.1-30.6 ms) and
    soft-capping (43.5 -> 48.8-49.3 ms), whose heavier loops are bound by their arithmetic. Plain
    targets, class weights and probability targets gain (22.2-22.4 -> 18.9-19.8 ms; probability
    targets 1024 rows 9.6-10.0 -> 9.2-9.7 ms)."""
    size = np.dtype(dtype).itemsize
    long = C * size > 2 * ROW_CHUNK_BYTES and size >= 4
    plain = cap is None and (soft or eps == 0)
    return (None, True) if long and plain and mode == FORWARD else (True, None)


@jit(inline=True)
def chunk_layout(C, row):
    """`(nch, ch, first)`: the chunk count, the length of every chunk but the first, and the
    first's (`C - (nch - 1) ch`, in `(0, ch]`). One chunk (`ch = first = C`) for a row of up to
    `2 * ROW_CHUNK_BYTES`."""
    ch = ROW_CHUNK_BYTES // row.itemsize
    if C <= 2 * ch:
        return 1, C, C
    nch = (C + ch - 1) // ch
    return nch, ch, C - (nch - 1) * ch


@jit(inline=True)
def chunk_bits(part):
    """`(hi, lo)` of `part` as a sum pass takes them (`row_sumexp`), on its own."""
    hi, lo = max_start(part)
    for j in range(part.shape[0]):
        hi, lo = bits_max_min(hi, lo, part[j])
    return hi, lo


@jit(inline=True)
def ahead_bits(row, layout):
    """The bits of `row`'s first paired chunk (chunk 1 after a ragged chunk 0, else chunk 0): what
    the pass over the row before it returns (`chunked_row_pass`), taken on its own for a range's first row."""
    nch, ch, first = layout
    return chunk_bits(span(row, first if first != ch else 0, ch))


@jit(inline=True)
def chunk_shift(mk, row):
    """The shift of a chunk whose maximum is `mk`: `mk`, or `+inf` for a chunk of `-inf` logits
    (whose exponentials are then 0, not `exp(-inf - -inf) = NaN`; see `rescaled_sums`)."""
    return mk if mk > -as_compute(np.inf, row) else as_compute(np.inf, row)


@jit(inline=True)
def index_chunk_sums(cur, ahead, shift, w, t, t_scale, t_shift, cap, smooth):
    """`(sum e, sum w (x - shift) (0 unless `smooth`), 0, k)` over a chunk (`row_sumexp_wdot`)."""
    if smooth:
        s, d, k = row_sumexp_wdot(cur, shift, w, cap, cur, False, ahead)
    else:
        s, k = row_sumexp(cur, shift, cap, cur, False, ahead)
        d = compute_zero(cur)
    return s, d, compute_zero(cur), k


@jit(inline=True)
def soft_chunk_sums(cur, ahead, shift, w, t, t_scale, t_shift, cap, smooth):
    """`(sum e, sum w t~ (x - shift), sum w t~, k)` over a chunk (`row_soft_sums`)."""
    s, a, d, k = row_soft_sums(cur, t, shift, w, t_scale, t_shift, cap, cur, False, ahead)
    return s, d, a, k


@jit(inline=True)
def eval_chunk_sums(cur, ahead, shift, w, t, t_scale, t_shift, cap, smooth):
    """`(sum e, sum w (x - shift) (0 unless `smooth`), sum e (x - shift), k)` over a chunk
    (`row_eval_sums`)."""
    s, h, d, k = row_eval_sums(cur, shift, w, cap, smooth, ahead)
    return s, d, h, k


def chunked_row_pass(chunk_sums):
    """The pass over a long row by chunks around `chunk_sums`, one of the three above: a function
    of its own per kind (compiled only into the kernels that use it, with no branch for the other
    kinds' sums)."""
    @jit()
    def row_pass(row, nxt, k, parts, w, t, t_scale, t_shift, cap, smooth):
        """The sums of `row`, `k` the bits of its first paired chunk (`ahead_bits`): per chunk `c`
        `chunk_sums`'s three float64 sums into `parts[0:3, c]` and the chunk's maximum `m_c` into
        `parts[3, c]`, each chunk's sums shifted by its maximum. Returns `(row_bits, next_bits)`:
        the whole row's `(hi, lo)` (`next_row_max`) and those of `nxt`'s first paired chunk (`nxt`:
        the next row, or `row` itself for a range's last row). `t`: the probability targets' row, or
        unused. Only in the kernel variants for long rows (`chunk_variant`)."""
        nch, ch, first = chunk_layout(row.shape[0], row)
        ragged = first != ch  # then chunk 0 is summed on its own (two short loops), and chunk 1 is paired
        rk = k
        for c in range(nch):
            c0 = 0 if c == 0 else first + (c - 1) * ch
            n = first if c == 0 else ch
            if c == 0 and ragged:
                kc = chunk_bits(span(row, 0, n))
                rk = (max_int(rk[0], kc[0]), min_int(rk[1], kc[1]))
                src, n0 = row, 0
            else:
                kc = k
                src, n0 = (row, c0 + n) if c + 1 < nch else (nxt, first if ragged else 0)
            mk = next_row_max(kc, row, cap)
            p0, p1, p2, kn = chunk_sums(span(row, c0, n), span(src, n0, n), chunk_shift(mk, row), span(w, c0, n),
                                        span(t, c0, n), t_scale, t_shift, cap, smooth)
            parts[0, c], parts[1, c], parts[2, c], parts[3, c] = p0, p1, p2, mk
            if not (c == 0 and ragged):
                k = kn
                if c + 1 < nch:
                    rk = (max_int(rk[0], kn[0]), min_int(rk[1], kn[1]))
        return rk, k
    return row_pass


index_row_pass = chunked_row_pass(index_chunk_sums)
soft_row_pass = chunked_row_pass(soft_chunk_sums)
eval_row_pass = chunked_row_pass(eval_chunk_sums)


@jit(inline=True)
def rescaled_sums(parts, m, coef):
    """`(s, d)` of a row from its chunks' `(s_c, d_c)` (`parts[0], parts[1]`, float64), brought from
    each chunk's shift `m_c` (`parts[3]`) to the row's maximum `m`:

        s = sum_c exp(delta_c) s_c,   d = sum_c (d_c + a_c delta_c),   delta_c = m_c - m <= 0

    with `s_c = sum exp(x - m_c)`, `d_c = sum a_j (x_j - m_c)` and `a_c = coef[c]` the sum of the
    `a_j` over chunk `c`. A chunk of `-inf` logits (`m_c = -inf`, shifted by `+inf`: its `s_c` is
    finite, its `d_c` `-inf`) adds 0 to `s` and keeps `d` at `-inf`, as a whole-row shift does; with
    `m = -inf` (a row of `-inf`) or NaN, `s` is NaN. A scalar loop (its `exp` call): no vector code to
    compile for a few chunks."""
    mf = np.float64(m)
    s = 0.0
    d = 0.0
    for c in range(parts.shape[1]):
        delta = np.float64(parts[3, c]) - mf
        s += math.exp(delta) * parts[0, c]
        d += parts[1, c] + (coef[c] * delta if delta < 0 else 0.0)
    return s, d


@jit(inline=True)
def chunk_weight_sums(w, layout):
    """`W_c`, the sum of the class weights over chunk `c` (float64), for label smoothing's
    `rescaled_sums`."""
    nch, ch, first = layout
    out = empty(nch, np.float64)
    for c in range(nch):
        part = span(w, 0 if c == 0 else first + (c - 1) * ch, first if c == 0 else ch)
        a = 0.0
        for j in range(part.shape[0]):
            a += np.float64(part[j])
        out[c] = a
    return out


@jit(inline=True)
def row_grad_soft_from_exp(grow, stash, trow, scale, w, g, t_scale, t_shift):
    """`row_grad_from_exp` for probability targets: `grow_j = e_j scale - g w_j t~_j`."""
    if stash_in_grad(grow):
        for j in range(grow.shape[0]):
            grow[j] = grow[j] * scale - g * w[j] * (trow[j] * t_scale + t_shift)
    else:
        for j in range(grow.shape[0]):
            store(grow, j, stash[j] * scale - g * w[j] * (trow[j] * t_scale + t_shift))


@jit(inline=True)
def row_is_top1(row, y, xy, m, cap):
    """Whether class `y` (logit `xy`) is the row's argmax, ties going to the lowest index."""
    if not xy >= m:
        return False
    for j in range(y):  # rare: only reached when x_y is the maximum
        if capped(load(row[j]), cap) == m:
            return False
    return True


GRAD_BLOCK = 512  # elements per block of the in-place gradient writers (a 2-4 KB scratch, in L1)
@jit(inline=True)
def row_scratch(C, keep_exp, grad, like):
    """The row kernels' compute-type scratch (`like`'s dtype): `GRAD_BLOCK` elements (the in-place
    gradient writers' blocks), or a whole row's when the fused call keeps its exponentials outside a
    16-bit gradient (`exp_stash`)."""
    n = C if keep_exp and not stash_in_grad(grad) and C > GRAD_BLOCK else GRAD_BLOCK
    return empty(n, like.dtype)


@jit(inline=True)
def row_grad_index(row, grow, m, ls, coef, w, wcoef, cap, in_place, buf):
    """`grow_j = (p_j * coef - w_j * wcoef) * dx_j` with `p_j = exp((x_j - m) - ls)`.

    `(x - m) - ls` is PyTorch's order: rounding `lse = m + ls` first would cost a confident
    row's target probability its last digits (`ls` below `ulp(m)`). When `grow` is `row`
    itself (`in_place`, i.e. `out=input`), blocks go through the scratch `buf` (`GRAD_BLOCK`
    long): LLVM's runtime alias check sends a loop that reads and writes the same array to its
    scalar version (3x to 5x slower, measured)."""
    n = row.shape[0]
    if not in_place:
        for j in range(n):
            v = capped(load(row[j]), cap)
            store(grow, j, (exp_nonpos((v - m) - ls) * coef - w[j] * wcoef) * cap_slope(v, cap))
        return
    for j0 in range(0, n, GRAD_BLOCK):
        nb = n - j0 if n - j0 < GRAD_BLOCK else GRAD_BLOCK
        rv, wv, gv = span(row, j0, nb), span(w, j0, nb), span(grow, j0, nb)  # (see `_math.span`)
        for k in range(nb):
            v = capped(load(rv[k]), cap)
            buf[k] = (exp_nonpos((v - m) - ls) * coef - wv[k] * wcoef) * cap_slope(v, cap)
        for k in range(nb):
            store(gv, k, buf[k])


@jit(inline=True)
def row_grad_soft(row, trow, grow, m, ls, coef, w, g, t_scale, t_shift, cap, in_place, buf):
    """`grow_j = (exp((x_j - m) - ls) * coef - g w_j t~_j) * dx_j`, in place as in
    `row_grad_index`."""
    n = row.shape[0]
    if not in_place:
        for j in range(n):
            v = capped(load(row[j]), cap)
            store(grow, j, (exp_nonpos((v - m) - ls) * coef - g * w[j] * (trow[j] * t_scale + t_shift))
                  * cap_slope(v, cap))
        return
    for j0 in range(0, n, GRAD_BLOCK):
        nb = n - j0 if n - j0 < GRAD_BLOCK else GRAD_BLOCK
        rv, wv, gv, tv = span(row, j0, nb), span(w, j0, nb), span(grow, j0, nb), span(trow, j0, nb)
        for k in range(nb):
            v = capped(load(rv[k]), cap)
            buf[k] = (exp_nonpos((v - m) - ls) * coef
                      - g * wv[k] * (tv[k] * t_scale + t_shift)) * cap_slope(v, cap)
        for k in range(nb):
            store(gv, k, buf[k])


# -- per-row formulas shared by the row and column kernels -------------------------------------------
# Optional terms are added through a select, not an `if`: both sides are computed and one is kept, so
# the column kernels' loops over a block's rows vectorise (with the `if`s LLVM left them scalar: 6.6
# ns per row of 10 classes). The select also keeps a term that is off from leaking a NaN (`0 * inf`).
@jit(inline=True)
def index_loss(m, ls, xy, d, wy, wsum, eps, eps_c, z):
    """Loss of a valid row in float64: `(1-eps) w_y (lse - x_y) + (eps/C) (W lse - sum_c w_c x_c)
    + z lse^2` with `lse = m + ls`, `W = sum_c w_c` and `d = sum_c w_c (x_c - m)`."""
    loss = (1.0 - eps) * np.float64(wy) * ((np.float64(m) - np.float64(xy)) + np.float64(ls))
    smooth = eps_c * (np.float64(wsum) * np.float64(ls) - np.float64(d))
    lse = np.float64(m) + np.float64(ls)
    zterm = z * (lse * lse)  # not `** 2`: Numba compiles a general integer power for it
    loss = loss + smooth if eps_c > 0 else loss  # (not `loss + 0.0`, which would turn -0.0 into +0.0)
    return loss + zterm if z != 0 else loss


@jit(inline=True)
def index_grad_scale(m, ls, wy, wsum, eps, eps_c, z):
    """`a` of the module docstring: `(1-eps) w_y + (eps/C) W + 2 z lse`."""
    a = (1.0 - eps) * wy + eps_c * np.float64(wsum)
    zterm = 2.0 * z * (np.float64(m) + np.float64(ls))
    return a + zterm if z != 0 else a


@jit(inline=True)
def prob_loss(m, ls, a, d, z):
    """Loss of a probability-target row: `lse sum_c w_c t~_c - sum_c w_c t~_c x_c + z lse^2` written
    as `ls a - d + z lse^2` with `a = sum w t~` and `d = sum w t~ (x - m)`."""
    lse = np.float64(m) + np.float64(ls)
    zterm = z * (lse * lse)
    loss = np.float64(ls) * np.float64(a) - np.float64(d)
    return loss + zterm if z != 0 else loss


@jit(inline=True)
def prob_grad_scale(m, ls, a, z):
    """`a + 2 z lse` for probability targets."""
    zterm = 2.0 * z * (np.float64(m) + np.float64(ls))
    return np.float64(a) + zterm if z != 0 else np.float64(a)


# -- one row, every mode -----------------------------------------------------------------------------
@jit()
def index_row(row, nxt, grow, y, valid, w, wsum, wchunk, eps, eps_c, z, cap, mode, keep_exp, in_place, g, k,
              m, ls, scratch, parts, single, chunked):
    """One row with a class-index target: returns `(loss, m, ls, top1, k_next)`, the loss in float64
    (before the sample weight, which is folded into `g` and applied by the caller to the loss), the
    row's maximum `m`, `ls = log sum exp(x - m)` (so `lse = m + ls`) and `k_next` the bits of the
    first paired chunk of the row `nxt` (`chunked_row_pass`; FORWARD/FUSED), and writes the gradient row in
    FUSED/BACKWARD mode. `k`: the bits of this row's first paired chunk (from the row before, or
    `ahead_bits`); `m` and `ls` are inputs in BACKWARD mode only. `wchunk`: the class weights' sums
    per chunk (`chunk_weight_sums`, for label smoothing); `single, chunked`: `chunk_variant`.
    `keep_exp` and `in_place` as in `index_kernel`; `scratch`: compute-type elements, `GRAD_BLOCK`
    or, with `keep_exp` and a 16-bit gradient, the row's length (`row_scratch`); `parts`: the scratch
    of `chunked_row_pass` (`chunk_scratch`)."""
    loss = 0.0
    top1 = False
    stash = exp_stash(grow, scratch)
    xy = compute_zero(row)
    s = one_like(xy)
    k_next = k
    if mode != BACKWARD:
        if valid:  # before the gradient pass, which may overwrite the row (out=input)
            xy = capped(load(row[y]), cap)
        smooth = eps_c > 0 and valid
        if single is not None:  # the row as one chunk, shifted by its maximum
            m = next_row_max(k, row, cap)
            if smooth:
                s, d, k_next = row_sumexp_wdot(row, m, w, cap, stash, keep_exp, nxt)
            else:
                s, k_next = row_sumexp(row, m, cap, stash, keep_exp, nxt)
                d = compute_zero(row)
        if chunked is not None:
            rk, k_next = index_row_pass(row, nxt, k, parts, w, w, 0.0, 0.0, cap, smooth)
            m = next_row_max(rk, row, cap)
            s64, d64 = rescaled_sums(parts, m, wchunk)
            s, d = as_compute(s64, row), as_compute(d64, row)
        ls = math.log(s)
        top1 = valid and row_is_top1(row, y, xy, m, cap) and ls == ls  # not where the lse is NaN
        if valid:
            loss = index_loss(m, ls, xy, d, w[y], wsum, eps, eps_c, z)
    if single is not None and mode != FORWARD:  # (the chunked variant is for FORWARD only)
        if valid:
            gv = g
            wy = np.float64(w[y])
            xy = capped(load(row[y]), cap) if mode == BACKWARD else xy
        else:
            gv = 0.0
            wy = 0.0
        coef = as_compute(gv * index_grad_scale(m, ls, wy, wsum, eps, eps_c, z), row)
        wcoef = as_compute(gv * eps_c, row)
        if keep_exp:
            row_grad_from_exp(grow, stash, coef / s, w, wcoef)
        else:
            row_grad_index(row, grow, m, ls, coef, w, wcoef, cap, in_place, scratch)
        if valid:  # the true-class term, in the compute type before the single rounding to storage
            if keep_exp:
                gy = (load(grow[y]) if stash_in_grad(grow) else stash[y] * (coef / s) - w[y] * wcoef) \
                    - as_compute(gv * (1.0 - eps) * wy, row)
            else:
                gy = exp_nonpos((xy - m) - ls) * coef - w[y] * wcoef \
                    - as_compute(gv * (1.0 - eps) * wy, row)
            store(grow, y, gy * cap_slope(xy, cap))
    return loss, m, ls, top1, k_next


@jit()
def prob_row(row, nxt, trow, grow, w, t_scale, t_shift, z, cap, mode, keep_exp, in_place, g, k, m, ls,
             scratch, parts, single, chunked):
    """One row with a probability target `t~ = t*t_scale + t_shift`: returns `(loss, m, ls, k_next)`.
    The rest as in `index_row`."""
    loss = 0.0
    stash = exp_stash(grow, scratch)
    k_next = k
    s = one_like(compute_zero(row))
    if mode != BACKWARD:
        if single is not None:  # the row as one chunk, shifted by its maximum
            m = next_row_max(k, row, cap)
            s, a, d, k_next = row_soft_sums(row, trow, m, w, t_scale, t_shift, cap, stash, keep_exp, nxt)
        if chunked is not None:
            rk, k_next = soft_row_pass(row, nxt, k, parts, w, trow, t_scale, t_shift, cap, True)
            m = next_row_max(rk, row, cap)
            s64, d64 = rescaled_sums(parts, m, parts[2])
            s, d = as_compute(s64, row), as_compute(d64, row)
            a = compute_zero(row)
            for c in range(parts.shape[1]):
                a += as_compute(parts[2, c], row)
        ls = math.log(s)
        loss = prob_loss(m, ls, a, d, z)
    else:
        a = soft_weight_sum(trow, w, t_scale, t_shift)
    if single is not None and mode != FORWARD:  # (the chunked variant is for FORWARD only)
        coef = as_compute(g * prob_grad_scale(m, ls, a, z), row)
        if keep_exp:  # as in index_row
            row_grad_soft_from_exp(grow, stash, trow, coef / s, w, as_compute(g, row), t_scale, t_shift)
        else:
            row_grad_soft(row, trow, grow, m, ls, coef, w, as_compute(g, row), t_scale, t_shift, cap, in_place,
                          scratch)
    return loss, m, ls, k_next


@jit(inline=True)
def soft_weight_sum(trow, w, t_scale, t_shift):
    """`sum w t~` (BACKWARD mode, where no sum pass gives it)."""
    a = compute_zero(trow)
    for j in range(trow.shape[0]):
        a += w[j] * (trow[j] * t_scale + t_shift)
    return a


# -- kernels: serial over a range of rows, dealt to threads by `_parallel` -----------------------------
# Each kernel variant (`chunk_variant`) holds the code of one path only: Numba prunes a branch on
# `arg is not None` in the function whose argument `arg` is (not in helpers inlined into it).
@jit(inline=True)
def first_row_bits(x, lo, hi, mode):
    """The bits of row `lo` (rows of one chunk), the only row a kernel's range reads on its own:
    every later row's come from the sum pass over the row before it (`row_sumexp`). Unused in
    BACKWARD mode."""
    n = x.shape[1] if mode != BACKWARD and lo < hi else 0  # (0: the start of a maximum, not read)
    return chunk_bits(span(borrowed_row(x, lo if lo < hi else 0), 0, n))


@jit(inline=True)
def chunk_scratch(x):
    """`(layout, parts)` of the chunked variant for the rows of the 2-D `x`: `chunk_layout` and the
    scratch of `chunked_row_pass` (4 float64 per chunk)."""
    layout = chunk_layout(x.shape[1], x)
    return layout, empty((4, layout[0]), np.float64)


@jit(inline=True)
def first_paired_bits(x, lo, hi, layout):
    """The bits of row `lo`'s first paired chunk (`ahead_bits`), the only one the chunked variant's
    range reads on its own: every later one's come from the pass over the chunk before it."""
    return ahead_bits(borrowed_row(x, lo), layout) if lo < hi else max_start(x)


@jit(python_callable=True)
def index_kernel(lo, hi, x, single, chunked, target, w, wsum, ignore_index, eps, z, cap, mode, keep_exp, in_place,
                 g, sw, row_max, row_logsum, loss, top1, grad):
    """Cross-entropy with class-index targets over the rows `[lo, hi)` of `x` (N, C), one
    contiguous row per sample (1-D and 2-D input; K-dim input always takes `index_cols_kernel`, so
    the row code is compiled for contiguous rows only: a strided variant would double its compile
    time).

    Parameters
    ----------
    lo, hi : the rows `[lo, hi)` this call works on (`_parallel.run_tasks` deals them to threads)
    x : (N, C) logits, C-contiguous (float32/float64, or 16-bit storage of float16/bfloat16)
    single, chunked : `chunk_variant`: whether rows are summed in chunks (`chunked_row_pass`)
    target : (N,) int64 class indices, already validated (in range or equal to `ignore_index`)
    w : (C,) class weights in the compute type (ones when the user gave none); `wsum = sum(w)`
    eps : label smoothing; `z` : z-loss coefficient; `cap` : soft-cap value or None
    mode : FORWARD, FUSED or BACKWARD
    keep_exp : (FUSED only) keep each `exp(x - m)` between the sum and the gradient passes instead
        of computing it twice (`exp_stash`): in the gradient row for a float32/float64 gradient that
        is not the logits, in a row-long compute-type scratch for a float16/bfloat16 gradient (in
        place too); never with soft-cap (whose slope needs `x`). The API layer decides.
    in_place : `grad` is `x` itself (`out=input`)
    g : upstream gradient per row (N,) float64, or (1,) for the same value on every row
    sw : per-row sample weights (N,) float64, or (1,) for none
    row_max, row_logsum : (N,) row max `m` and `log sum exp(x - m)` (the log-sum-exp is their sum),
        written (FORWARD, FUSED) or read (BACKWARD)
    loss : (N,) float64, receives `sw_r * l_r`; top1 : (N,) bool, argmax == target (FORWARD, FUSED)
    grad : (N, C) gradient, dtype of `x` (may be `x` itself); (1, C) and unused in FORWARD mode
    """
    R, C = x.shape
    eps_c = eps / C
    per_row_g = g.shape[0] == R
    per_row_sw = sw.shape[0] == R
    scratch = row_scratch(C, keep_exp, grad, w)  # w is in the compute type
    if single is not None:
        k, parts, wchunk = first_row_bits(x, lo, hi, mode), as_2d(loss, 1, 1), loss  # (unused: placeholders)
    if chunked is not None:
        layout, parts = chunk_scratch(x)
        k, wchunk = first_paired_bits(x, lo, hi, layout), chunk_weight_sums(w, layout)
    wb = borrowed(w)
    for r in range(lo, hi):
        y = target[r]
        valid = y != ignore_index
        swr = sw[r] if per_row_sw else sw[0]
        gr = (g[r] if per_row_g else g[0]) * swr
        lr, mr, lsr, tr, k = index_row(borrowed_row(x, r), borrowed_row(x, r + 1 if r + 1 < hi else r),
                                       borrowed_row(grad, r if mode != FORWARD else 0), y, valid, wb, wsum, wchunk,
                                       eps, eps_c, z, cap, mode, keep_exp, in_place, gr, k, row_max[r],
                                       row_logsum[r], scratch, parts, single, chunked)
        if mode != BACKWARD:
            loss[r] = lr * swr if valid else 0.0
            row_max[r] = mr
            row_logsum[r] = lsr
            top1[r] = tr


@jit(python_callable=True)
def prob_kernel(lo, hi, x, single, chunked, t, w, t_scale, t_shift, z, cap, mode, keep_exp, in_place, g, sw,
                row_max, row_logsum, loss, grad):
    """Cross-entropy with probability targets `t` ((N, C), in the compute type) over the rows
    `[lo, hi)` of `x`.

    `t~ = t*t_scale + t_shift` (`t_scale = 1 - eps`, `t_shift = eps/C`; 1 and 0 without
    smoothing). Other arguments as in `index_kernel`.
    """
    R, C = x.shape
    per_row_g = g.shape[0] == R
    per_row_sw = sw.shape[0] == R
    scratch = row_scratch(C, keep_exp, grad, w)
    if single is not None:
        k, parts = first_row_bits(x, lo, hi, mode), as_2d(loss, 1, 1)  # (unused: a placeholder)
    if chunked is not None:
        layout, parts = chunk_scratch(x)
        k = first_paired_bits(x, lo, hi, layout)
    wb = borrowed(w)
    for r in range(lo, hi):
        swr = sw[r] if per_row_sw else sw[0]
        gr = (g[r] if per_row_g else g[0]) * swr
        lr, mr, lsr, k = prob_row(borrowed_row(x, r), borrowed_row(x, r + 1 if r + 1 < hi else r),
                                  borrowed_row(t, r), borrowed_row(grad, r if mode != FORWARD else 0), wb, t_scale,
                                  t_shift, z, cap, mode, keep_exp, in_place, gr, k, row_max[r], row_logsum[r],
                                  scratch, parts, single, chunked)
        if mode != BACKWARD:
            loss[r] = lr * swr
            row_max[r] = mr
            row_logsum[r] = lsr
