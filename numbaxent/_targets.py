"""The target check: range validation and the `'mean'` denominator, in fixed blocks of targets.

The blocks are fixed by the number of targets alone, and their partial sums are added in block
order, so the denominator has the same bits whichever threads checked which blocks: the API layer
deals the blocks to threads (`_prepare.index_targets`), the evaluator checks them on the calling
thread (`check_targets`).
"""
from __future__ import annotations

import numpy as np

from ._columns import uniform_weights
from ._jit import jit
from ._math import span

TARGET_BLOCK = 1 << 15  # targets per block: 256 KB of int64, many blocks per thread


@jit(python_callable=True)
def check_target_blocks(lo, hi, target, w, sw, uniform, ignore_index, C, first_bad, totals, counts):
    """Blocks `[lo, hi)` of `TARGET_BLOCK` targets: per block `b`, `first_bad[b]` the flat
    position of its first target that is neither `ignore_index` nor in `[0, C)` (-1 if none),
    `totals[b] = sum_{valid r} sw_r w[y_r]` in float64 and `counts[b]` its valid targets.

    With one weight for every class and every row (`uniform`: no class or sample weights,
    `w[y] sw = u`), a block's targets are counted by a loop of integer compares that vectorises,
    and its total is `counts[b] * u`: no per-target float64 addition, whose latency bound the
    serial check to about 1.1 ns per target. Weighted targets, and a block with a bad target (to
    find it), take the serial loop. The arguments after `lo, hi` come from `target_check`."""
    n = target.shape[0]
    per_row_sw = sw.shape[0] == n
    u = np.float64(w[0]) * sw[0] if C > 0 and sw.shape[0] > 0 else 0.0
    ignore_in_range = ignore_index >= 0 and ignore_index < C
    for blk in range(lo, hi):
        r0 = blk * TARGET_BLOCK
        r1 = r0 + TARGET_BLOCK if n - r0 > TARGET_BLOCK else n  # (not min(): one builtin fewer to compile)
        first = -1
        bad = 0
        tv = span(target, r0, r1 - r0)  # (indices from 0: see `_math.span`)
        if uniform:
            inside = 0
            ignored = 0
            for i in range(r1 - r0):  # two compares a target (`0 <= y < C` as one unsigned)
                y = tv[i]
                inside += np.uint64(y) < np.uint64(C)
                ignored += y == ignore_index
            if ignore_in_range:
                kept, bad = inside - ignored, (r1 - r0) - inside
            else:
                kept, bad = inside, (r1 - r0) - inside - ignored
            total = kept * u
        if bad or not uniform:
            # one target at a time, leaving at the first bad one (written branch-free, LLVM
            # vectorises this loop with gathers: 2.4 against 1.2 ns per target on a Zen 4)
            kept = 0
            total = 0.0
            for i in range(r1 - r0):
                y = tv[i]
                if y == ignore_index:
                    continue
                if y < 0 or y >= C:
                    first = r0 + i
                    break
                kept += 1
                total += np.float64(w[y]) * (sw[r0 + i] if per_row_sw else sw[0])
        first_bad[blk] = first
        totals[blk] = total
        counts[blk] = kept


def target_check(target, w, sw, ignore_index, C):
    """`(blocks, args)`: the number of blocks of `target` and the arguments of
    `check_target_blocks` after `lo, hi`, its result arrays `(first_bad, totals, counts)` last
    (`args[-3:]`, for `merge_target_blocks`)."""
    k = (target.shape[0] + TARGET_BLOCK - 1) // TARGET_BLOCK
    uniform = sw.shape[0] != target.shape[0] and uniform_weights(w)
    return k, (target, w, sw, uniform, ignore_index, C,
               np.empty(k, np.int64), np.empty(k, np.float64), np.empty(k, np.int64))


def merge_target_blocks(first_bad, totals, counts):
    """`(first_bad, W, n_valid)` of all targets from their blocks': the first bad position, and
    the blocks' totals added left to right (`np.cumsum` adds in order, unlike `np.sum`)."""
    bad = first_bad[first_bad >= 0]
    total = float(np.cumsum(totals)[-1]) if totals.shape[0] else 0.0
    return (int(bad[0]) if bad.shape[0] else -1), total, int(counts.sum())


def check_targets(target, w, sw, ignore_index, C):
    """Validate class-index targets and total their weights, on the calling thread.

    Returns `(first_bad, W, n_valid)`: the flat position of the first target that is neither
    `ignore_index` nor in `[0, C)` (-1 if none), `W = sum_{valid r} sw_r w[y_r]` in float64 (the
    'mean' denominator; `sw` is (R,) or (1,) for all ones) and the number of valid targets. The
    same figures as the API layer's threaded check (`_prepare.index_targets`).
    """
    blocks, args = target_check(target, w, sw, ignore_index, C)
    check_target_blocks(0, blocks, *args)
    return merge_target_blocks(*args[-3:])
