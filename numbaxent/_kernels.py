"""Fused cross-entropy kernels over canonical array views.

Canonical layout: logits `x` are a C-contiguous `(N, C, S)` array (`S = d1*...*dk`, 1 for 2-D
input), so "row" `r = n*S + s` is the class vector `x[n, :, s]`: contiguous when `S == 1` (the row
kernels), strided by `S` otherwise (the column kernels: K-dim input is read in its native layout,
never transposed into a copy). Targets
are flat over rows: int64 class indices of length `N*S`, or probabilities in `x`'s layout.

Every kernel runs in one of three modes over each row, sharing the same row code:

- `FORWARD`: `m = max_c x_c`, `s = sum_c exp(x_c - m)`, `ls = log s` and the row's loss
  (`lse = m + ls`; `m` and `ls` are kept apart, see `row_grad_index`); a long float32/float64 row
  is summed by chunks, each shifted by its own maximum (`_rows.chunked_row_pass`, a kernel variant
  of its own: `_rows.chunk_variant`);
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

Modules: `_rows` (row primitives, the per-row formulas, the row kernels), `_columns` (the column
kernels), `_targets` (the target check). This module gathers them for the API layer and holds the
dispatch threshold between rows and columns.
"""
from __future__ import annotations

from ._columns import (COLUMN_BLOCK_ELEMENTS, block_sums, cols_log, cols_max,
                       column_block, column_block_rows, column_count, column_view, column_views,
                       index_cols_kernel, prob_cols_kernel, sum_in_order, transpose_variant, uniform_weights,
                       _block_source)
from ._rows import (BACKWARD, FORWARD, FUSED, GRAD_BLOCK, chunk_variant, index_kernel,
                    prob_kernel, row_is_top1, row_max, row_sumexp, row_sumexp_wdot)
from ._targets import check_target_blocks, check_targets

__all__ = ["FORWARD", "FUSED", "BACKWARD", "COLUMN_MAX_C", "COLUMN_BLOCK_ELEMENTS", "GRAD_BLOCK",
           "chunk_variant", "index_kernel", "prob_kernel", "index_cols_kernel", "prob_cols_kernel",
           "check_targets", "check_target_blocks", "block_sums", "sum_in_order", "column_count", "column_block",
           "column_block_rows", "column_view", "column_views", "cols_log", "cols_max",
           "row_is_top1", "row_max", "row_sumexp", "row_sumexp_wdot", "transpose_variant", "uniform_weights",
           "_block_source"]

COLUMN_MAX_C = 40  # 2-D input with at most this many classes takes the column kernels (measured crossover)
# K-dim input always does (its rows are strided; see index_kernel)
