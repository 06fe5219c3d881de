"""Public API: the loss functions and `CrossEntropyLoss`, their reductions and dispatch to the kernels
(argument checks and canonical views are `_prepare`'s).

Nothing here computes a loss; everything here is O(rows) or cheaper. The kernels (`_kernels`) are
imported on first use, so `import numbaxent` compiles nothing and does not even import Numba.
"""
from __future__ import annotations

import threading
from dataclasses import replace
from typing import NamedTuple

import numpy as np

from ._prepare import (Prepared, as_array, canonical_view, check_ignore_index, check_label_smoothing,
                       check_reduction, check_softcap, check_z_loss, kernels, legacy_reduction,
                       prepare, upstream_gradient)

__all__ = ["cross_entropy", "cross_entropy_with_grad", "CrossEntropyLoss", "Stats"]

def _scalar(value: float, dtype: np.dtype):
    return np.asarray(value, dtype=np.float64).astype(dtype)[()]


def zero_weight_mean(reduction: str, denom: float, n_valid: int) -> bool:
    """Whether a class-index `'mean'` has a denominator `W = sum w[y]` over kept elements of
    exactly 0 (zero weights, or negative weights that cancel) while some element is kept. PyTorch
    then divides its two terms by zero separately, and its gradient is not the limit of the
    regular formula: see `zero_weight_loss` and `zero_weight_grad`. Shared with the LM head."""
    return reduction == "mean" and denom == 0.0 and n_valid > 0


def _zero_weight_mean(p: Prepared) -> bool:
    return not p.soft and zero_weight_mean(p.reduction, p.denom, p.n_valid)


def _nll_total(p: Prepared) -> float:
    """The weighted NLL sum alone (a forward pass without smoothing), for `zero_weight_loss`.
    Run it before a pass that overwrites the logits (`out=input`)."""
    loss, _, _, _, blocks = kernel_pass(replace(p, eps=0.0), kernels().FORWARD, np.ones(1),
                                       np.empty((1, 1, 1), dtype=p.x3.dtype), keep_rows=False)
    return loss_total(p, loss, blocks)


def zero_weight_loss(total: float, eps: float, C: int, s_nll=None) -> float:
    """PyTorch's `(1-eps) * (S_nll / W) + (eps / C) * (S_smooth / W)` for `W == 0`, from the sum
    `total` of the per-element losses: each quotient is +-inf or NaN by its own sign, so the terms
    can give NaN (opposite signs) where one division of their sum would give an infinity. `S_nll`
    (needed only when `eps > 0`) is the sum of the same losses without smoothing, from a second
    forward pass (this case is degenerate, not hot)."""
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        if eps == 0.0:
            return float(np.float64(total) / 0.0)
        s_smooth = (total - (1.0 - eps) * s_nll) * C / eps
        return float((1.0 - eps) * (np.float64(s_nll) / 0.0)
                     + (eps / C) * (np.float64(s_smooth) / 0.0))


def zero_weight_grad(grad: np.ndarray, target: np.ndarray, ignore_index: int, eps: float):
    """PyTorch's gradient of a zero-denominator `'mean'` (see `zero_weight_mean`), in place, from
    the gradient the kernels wrote with the undivided upstream gradient (`'sum'`'s): kept rows are
    scaled by `1/W = inf` and then, as autograd's `g - p * sum(g)` gives, NaN at the target
    (`inf - inf`) or, with smoothing, everywhere (the smoothing gradient `-w_c / W` has
    infinities of both signs, or `0/0`). Ignored rows keep their zeros. `grad` is a view with the
    classes last, `(..., C)`; `target` holds the class indices, of shape `(...)`."""
    kept = np.nonzero(target != ignore_index)
    with np.errstate(invalid="ignore", over="ignore"):
        if eps > 0.0:
            grad[kept] = np.nan
        else:
            grad[kept] = grad[kept] * np.inf
            grad[kept + (target[kept],)] = np.nan


def _zero_weight_grad(p: Prepared, grad: np.ndarray):
    """`zero_weight_grad` on the user-facing gradient array of the core's entry points."""
    gm = grad[None] if grad.ndim == 1 else np.moveaxis(grad, 1, -1)  # (..., C) view, class last
    zero_weight_grad(gm, p.target.reshape(p.loss_shape or (1,)), p.ignore_index, p.eps)


def loss_total(p: Prepared, loss: np.ndarray, blocks: bool) -> float:
    """Sum of the float64 losses of a pass in a fixed order, the same whatever produced them:
    the column kernels' per-block sums (`blocks`) are added as they are; per-row losses on the
    column path are first summed per block exactly as the kernels do (so every entry point gives
    the same bits); row-path losses are summed pairwise. Independent of the thread count."""
    if not blocks and p.rows and p.C and use_columns(p.x3.shape):
        k = kernels()
        N, C, S = p.x3.shape
        loss = k.block_sums(loss, N, S, k.column_block_rows(C, S))
    return float(np.sum(loss))


def reduce_losses(p: Prepared, loss: np.ndarray, blocks: bool = False, s_nll=None):
    """Apply the reduction to the float64 losses of a pass (per row, or per column block when
    `blocks`), in a fixed order (thread-count independent). `s_nll`: see
    `zero_weight_loss` (computed here when None and needed, from the logits)."""
    if p.reduction == "none":
        return loss.astype(p.x.dtype).reshape(p.loss_shape)
    total = loss_total(p, loss, blocks)
    if p.reduction == "sum":
        return _scalar(total, p.x.dtype)
    if _zero_weight_mean(p):
        if p.eps > 0.0 and s_nll is None:
            s_nll = _nll_total(p)
        return _scalar(zero_weight_loss(total, p.eps, p.C, s_nll), p.x.dtype)
    with np.errstate(divide="ignore", invalid="ignore"):
        return _scalar(np.float64(total) / np.float64(p.denom), p.x.dtype)


def _upstream(p: Prepared, grad_output) -> np.ndarray:
    """Per-row multipliers `g` (float64; one element when the same for every row), divided by the
    `'mean'` denominator (except when it is zero: `zero_weight_grad` then scales the gradient)."""
    g = upstream_gradient(grad_output, p.reduction, p.loss_shape)
    if p.reduction == "mean" and not _zero_weight_mean(p):
        with np.errstate(divide="ignore", invalid="ignore"):
            g = g / np.float64(p.denom)
    return g


def _grad_target(p: Prepared, out):
    """(user-facing gradient array, its (N, C, S) storage view, copy-back target or None)."""
    x = p.x
    if out is None:
        order = "F" if p.transposed else "C"
        grad = np.empty(x.shape, dtype=x.dtype, order=order)
        g3 = canonical_view(grad.view(p.x3.dtype), p.transposed, p.x3.shape)
        return grad, g3, None
    if not isinstance(out, np.ndarray):
        raise TypeError(f"out must be a numpy.ndarray, got {type(out).__name__}")
    if out.shape != x.shape or out.dtype.newbyteorder("=") != x.dtype:
        raise ValueError(
            f"out must have input's shape {x.shape} and dtype {x.dtype}, got shape {out.shape} "
            f"and dtype {out.dtype}"
        )
    if not out.flags.writeable:
        raise ValueError("out is read-only")
    # a byte-swapped `out` (`>f4`, as a byte-swapped input's) is written through a temporary
    g3 = (canonical_view(out.view(p.x3.dtype), p.transposed, p.x3.shape)
          if out.dtype.isnative else None)
    same = (g3 is not None and g3.ctypes.data == p.x3.ctypes.data
            and g3.strides == p.x3.strides)
    if g3 is None or (not same and np.may_share_memory(out, p.x3)):
        # no direct view, or a partial overlap with the logits: go through a temporary
        tmp = np.empty(p.x3.shape, dtype=p.x3.dtype)
        return out, tmp, tmp
    return out, g3, None


def _run_kernel(p: Prepared, mode: int, g: np.ndarray, row_max: np.ndarray, row_logsum: np.ndarray,
         loss: np.ndarray, top1: np.ndarray, grad3: np.ndarray, rows_out: bool = True):
    """One kernel pass over the canonical views. `rows_out=False` (forward on the column path
    only): `loss` receives per-block sums and `row_max, row_logsum, top1` nothing."""
    k = kernels()
    from ._parallel import run_tasks

    columns = use_columns(p.x3.shape)
    assert columns or rows_out
    N, C, S = p.x3.shape
    # flags the kernels would otherwise infer (each inference is more code to compile)
    in_place = grad3.ctypes.data == p.x3.ctypes.data and grad3.shape == p.x3.shape
    # 16-bit gradients keep the exponentials in a scratch row, not in the gradient: in place too
    keep_exp = (mode == k.FUSED and p.cap is None
                and (not in_place or p.x3.dtype not in (np.float32, np.float64)))
    if columns:
        nbmax = k.column_block_rows(C, S)
        count = k.column_count(N, S, nbmax)
        head = (k.column_view(p.x3), N, C, S, nbmax, k.transpose_variant(p.x3.dtype, C, S))
        grad2 = k.column_view(grad3)
    else:
        count = p.rows
        head = (p.x3.reshape(N, C),) + k.chunk_variant(p.x3.dtype, C, mode, p.soft, p.eps, p.cap)
        grad2 = grad3.reshape(grad3.shape[0], -1)
    if p.soft:
        # the smoothed target t~ = t * t_scale + t_shift
        t_scale, t_shift = (1.0 - p.eps, p.eps / p.C) if p.eps > 0 else (1.0, 0.0)
        t_scale, t_shift = p.compute.type(t_scale), p.compute.type(t_shift)
        t = k.column_view(p.target) if columns else p.target.reshape(N, C)
        args = head + (t, p.w, t_scale, t_shift, p.z, p.cap, mode)
        kernel = k.prob_cols_kernel if columns else k.prob_kernel
        tail = (row_max, row_logsum, loss, grad2)
        top1[:] = False
    else:
        args = head + (p.target, p.w) + ((k.uniform_weights(p.w),) if columns else ()) \
            + (p.wsum, p.ignore_index, p.eps, p.z, p.cap, mode)
        kernel = k.index_cols_kernel if columns else k.index_kernel
        tail = (row_max, row_logsum, loss, top1, grad2)
    args += ((in_place,) if columns else (keep_exp, in_place)) + (g, p.sw) + tail
    if columns:
        args += (rows_out,)
    run_tasks(kernel, count, p.x3.size, *args)


def use_columns(shape3: tuple) -> bool:
    """Whether the column kernels take these (N, C, S) logits: rows too short to vectorise (few
    classes) or strided (K-dim, and 2-D Fortran-ordered input seen as (1, C, N)): the row kernels
    take contiguous rows only. A module-level threshold, so tests can force either path for 2-D."""
    _, C, S = shape3
    return S > 1 or C <= kernels().COLUMN_MAX_C


def _empty_or_classless(p: Prepared) -> bool:
    return p.rows == 0 or p.C == 0


class Stats(NamedTuple):
    r"""By-products of a forward pass, computed while each row was in cache (no second pass).

    Attributes
    ----------
    lse : ndarray
        Per-element log-sum-exp of the (soft-capped) logits, $\operatorname{lse}(x_i) =
        \log \sum_c e^{x_{i,c}}$: the loss's shape, in the compute dtype.
    top1 : ndarray of bool
        Of the loss's shape: whether the target class is the argmax of the logits (ties go to the
        lowest class index; False for ignored elements, for rows whose log-sum-exp is NaN (a NaN or
        +inf logit), and for probability targets).
    accuracy : float
        Mean of `top1` over the non-ignored elements (NaN if none, or for probability targets).
    """

    lse: np.ndarray
    top1: np.ndarray
    accuracy: float


def _stats(p: Prepared, lse: np.ndarray, top1: np.ndarray) -> Stats:
    if p.soft or p.rows == 0:
        acc = float("nan")
    else:
        acc = float(np.count_nonzero(top1)) / p.n_valid if p.n_valid else float("nan")
    return Stats(lse.reshape(p.loss_shape), top1.reshape(p.loss_shape), acc)


_workspace = threading.local()
WORKSPACE_MAX_BYTES = 64 << 20  # per thread; larger calls get fresh arrays, freed after the call


def _row_buffers(rows: int, compute: np.dtype, keep_rows: bool):
    """(row_max, row_logsum, loss, top1) arrays of `rows` elements. Unless `keep_rows`, they are
    views of this thread's workspace, valid until its next call: fresh arrays of many short rows cost more in page
    faults (the kernel is their first toucher) than the kernel's whole pass. The workspace never
    exceeds `WORKSPACE_MAX_BYTES` (enough for ~3.9M float32 rows), so a process that once
    saw a huge batch does not keep its memory; past that, fresh arrays (whose page faults are then
    small next to the pass)."""
    need = rows * (2 * compute.itemsize + 8 + 1)
    if keep_rows or need > WORKSPACE_MAX_BYTES:
        return (np.empty(rows, compute), np.empty(rows, compute), np.empty(rows, np.float64),
                np.zeros(rows, np.bool_))
    buf = getattr(_workspace, "buf", None)
    if buf is None or buf.nbytes < need or buf.nbytes > WORKSPACE_MAX_BYTES:
        grown = 2 * (0 if buf is None else buf.nbytes)
        buf = _workspace.buf = np.empty(min(max(need, grown), WORKSPACE_MAX_BYTES), np.uint8)
    loss = buf[:rows * 8].view(np.float64)
    o = rows * 8
    row_max = buf[o:o + rows * compute.itemsize].view(compute)
    o += rows * compute.itemsize
    row_logsum = buf[o:o + rows * compute.itemsize].view(compute)
    o += rows * compute.itemsize
    top1 = buf[o:o + rows].view(np.bool_)
    return row_max, row_logsum, loss, top1


def kernel_pass(p: Prepared, mode: int, g: np.ndarray, grad3: np.ndarray,
                keep_rows: bool = True):
    """Run FORWARD or FUSED over all rows: `(loss, row_max, row_logsum, top1, blocks)`: float64
    losses, row max, log-sum of the shifted exponentials (the log-sum-exp is `max + logsum`), top1, and
    whether `loss` holds the column kernels' per-block sums instead of per-row losses (only for a
    reduced loss without `keep_rows`; give both to `reduce_losses`). `keep_rows=False`: the
    arrays are a per-thread workspace, for callers that only reduce them before the next call."""
    row_max, row_logsum, loss, top1 = _row_buffers(p.rows, np.dtype(p.compute), keep_rows)
    if _empty_or_classless(p):
        # C == 0: PyTorch gives -0. per soft-target row (an empty sum); class targets are all ignored
        row_max[:] = -np.inf
        row_logsum[:] = 0.0
        top1[:] = False
        loss[:] = -0.0 if p.soft else 0.0
        return loss, row_max, row_logsum, top1, False
    blocks = not keep_rows and p.reduction != "none" and use_columns(p.x3.shape)
    if blocks:
        # only the total is wanted: the column kernels return per-block sums (no per-row output)
        k = kernels()
        N, C, S = p.x3.shape
        loss = loss[:k.column_count(N, S, k.column_block_rows(C, S))]
    _run_kernel(p, mode, g, row_max, row_logsum, loss, top1, grad3, rows_out=not blocks)
    return loss, row_max, row_logsum, top1, blocks


def _pass(p: Prepared, mode: int, g: np.ndarray, grad3: np.ndarray, keep_rows: bool = True):
    """Run FORWARD or FUSED over all rows: `(loss, lse, top1, blocks)`; lse is None unless
    `keep_rows` (see `kernel_pass`)."""
    loss, row_max, row_logsum, top1, blocks = kernel_pass(p, mode, g, grad3, keep_rows)
    return loss, (row_max + row_logsum if keep_rows else None), top1, blocks


def _from_canonical(tmp3: np.ndarray, p: Prepared) -> np.ndarray:
    """A canonical (N, C, S) storage array seen with the user's dtype and shape."""
    v = tmp3.view(p.x.dtype)
    return v.reshape(p.C, -1).T if p.transposed else v.reshape(p.x.shape)


def _check_target_grad(p: Prepared, target_grad: bool):
    if target_grad and not p.soft:
        raise ValueError(
            "target_grad=True needs class-probability targets (a floating target of input's shape "
            f"{p.x.shape}); class-index targets have no gradient"
        )


def _target_gradient(p: Prepared, g: np.ndarray, row_max: np.ndarray,
                     row_logsum: np.ndarray) -> np.ndarray:
    r"""Gradient of `sum(grad_output * loss)` with respect to a probability target, from the row
    statistics of a pass (no second softmax):

    $$
    \frac{\partial}{\partial t_{ic}} = -g_i\, s_i\, w_c\, (1-\varepsilon)\,
        (z_{ic} - m_i - \ell_i),
    $$

    with $z$ the (soft-capped) logits, $m_i$ the row maximum `row_max` and
    $\ell_i$ the log of the shifted exponential sum `row_logsum` (so $z - (m + \ell)$ is the
    log-softmax, NaN in the same rows as PyTorch's), $s_i$ the sample weight and $g_i$
    the upstream gradient (already divided by the `'mean'` denominator). The z-loss does not
    depend on the target. Vectorised NumPy in the compute dtype: the subtraction writes a new
    array, one in-place multiply scales it (two with per-row factors; soft-capping adds its own);
    the result has the target's dtype and `input`'s shape (and layout)."""
    x = p.x
    cls = 0 if x.ndim == 1 else 1

    def per_row(v):  # (rows,) or (1,) in the loss's row-major order, broadcast along the class axis
        v = v.reshape(()) if v.shape[0] == 1 else v.reshape(p.loss_shape)
        return np.expand_dims(v, cls) if v.ndim else v

    shape_c = [1] * x.ndim
    shape_c[cls] = p.C
    coef = -(g * p.sw) * (1.0 - p.eps)  # float64 (rows,) or (1,)
    # per-class factor w_c, with the upstream factor folded in when it is one number ('mean'/'sum'
    # without sample weights): then only two passes over the N x C result (subtract, multiply)
    scale = p.w if coef.shape[0] != 1 else p.w * p.compute.type(coef[0])
    lse = per_row((row_max + row_logsum).astype(p.compute, copy=False))
    with np.errstate(invalid="ignore", over="ignore"):
        if p.cap is None:
            gt = np.subtract(x, lse, dtype=p.compute)  # log_softmax(x) = x - lse, a new array
        else:  # as the kernels: cap * tanh(x / cap)
            gt = np.array(x, dtype=p.compute)
            gt /= p.cap
            np.tanh(gt, out=gt)
            gt *= p.cap
            gt -= lse
        gt *= scale.reshape(shape_c)
        if coef.shape[0] != 1:
            gt *= per_row(coef.astype(p.compute))
    return gt.astype(p.target_dtype, copy=False)


def backward_pass(p: Prepared, row_max: np.ndarray, row_logsum: np.ndarray, grad_output=None, out=None,
              input_grad: bool = True, target_grad: bool = False):
    """(grad_input or None, grad_target or None) from a forward's row statistics: one BACKWARD
    pass over the logits for the input, one NumPy pass for a probability target."""
    _check_target_grad(p, target_grad)
    g = _upstream(p, grad_output)
    # the target gradient first: `out=input` overwrites the logits it reads
    grad_t = _target_gradient(p, g, row_max, row_logsum) if target_grad else None
    if not input_grad:
        return None, grad_t
    grad, g3, copy_back = _grad_target(p, out)
    if not _empty_or_classless(p):
        _run_kernel(p, kernels().BACKWARD, g, row_max, row_logsum, np.empty(1),
                    np.empty(1, dtype=np.bool_),
                    g3)
        if copy_back is not None:
            np.copyto(grad, _from_canonical(copy_back, p))
        if _zero_weight_mean(p):
            _zero_weight_grad(p, grad)
    return grad, grad_t


# -- public functions --------------------------------------------------------------------------------
def cross_entropy(input, target, weight=None, ignore_index: int = -100, reduction: str = "mean",
                  label_smoothing: float = 0.0, *, z_loss: float = 0.0, softcap=None,
                  sample_weight=None, normalizer=None, return_stats: bool = False):
    r"""Cross-entropy between logits and targets, exactly as `torch.nn.functional.cross_entropy`.

    For class-index targets $y$ and class weights $w$ (ones by default),

    $$
    \ell_i = v_i\Big[(1-\varepsilon)\,w_{y_i}\,(\operatorname{lse}(x_i) - x_{i,y_i})
             + \frac{\varepsilon}{C}\sum_c w_c\,(\operatorname{lse}(x_i) - x_{i,c})\Big],
    $$

    with $v_i = [y_i \ne \text{ignore\_index}]$ and $\varepsilon$ the label smoothing; `'mean'`
    divides $\sum_i \ell_i$ by $\sum_i v_i w_{y_i}$. For class-probability targets $t$ (same
    shape as `input`), $\ell_i = -\sum_c w_c \tilde t_{i,c} \log\operatorname{softmax}(x_i)_c$
    with $\tilde t = (1-\varepsilon) t + \varepsilon / C$, and `'mean'` divides by the number of
    rows. The [semantics page](semantics.md) lists every case, PyTorch's edge cases included.

    Parameters
    ----------
    input : array_like
        Logits of shape (C,), (N, C) or (N, C, d1, ..., dk): float16, bfloat16 (`ml_dtypes`),
        float32 or float64. Read in place when its layout allows (C-contiguous, or Fortran-ordered
        2-D).
    target : array_like
        Class indices of any integer dtype, shape (), (N,) or (N, d1, ..., dk); or class
        probabilities (floating) of `input`'s shape.
    weight : array_like, optional
        Per-class weights $w$, shape (C,), cast to the input's compute dtype.
    ignore_index : int
        Class-index targets equal to this contribute nothing and are not counted by `'mean'`.
        Must be negative for probability targets.
    reduction : {'mean', 'sum', 'none'}
        `'none'`: one loss per element; `'sum'`: their sum; `'mean'`: their sum over the
        denominator above.
    label_smoothing : float
        $\varepsilon$ in [0, 1]: the target mixed with the uniform distribution over the C classes.
    z_loss : float
        Keyword-only. Adds $z \operatorname{lse}(x_i)^2$ (with $z$ = `z_loss`) to every
        non-ignored element's loss (PaLM's auxiliary loss), reduced like the main loss. Default 0
        (off).
    softcap : float, optional
        Keyword-only. Soft-caps the logits to $s \tanh(x / s)$ (with $s$ = `softcap`) before the
        softmax (Gemma 2); the gradient includes the tanh. Default None (off).
    sample_weight : array_like, optional
        Keyword-only, of the loss's shape. Multiplies each element's loss; under `'mean'` the
        denominator becomes `sum(sample_weight * weight[target])` over kept elements
        (`sum(sample_weight)` for probability targets).
    normalizer : float, optional
        Keyword-only. Replaces the `'mean'` denominator (for example the global token count of a
        batch split into micro-batches, so that accumulated gradients equal the full batch's).
    return_stats : bool
        Keyword-only. Also return a [`Stats`][numbaxent.Stats] (per-element log-sum-exp, top-1
        correctness, accuracy).

    Returns
    -------
    loss : numpy scalar or ndarray
        A scalar for `'mean'` and `'sum'`, an array of the target's shape for `'none'`; in
        `input`'s dtype.
    stats : Stats
        Only with `return_stats=True`.

    Raises
    ------
    TypeError
        Non-floating logits, non-integer class targets, integer probability targets.
    ValueError
        Mismatched shapes, a bad weight, reduction or label_smoothing.
    IndexError
        A class target outside `[0, C)` that is not `ignore_index` (the message names it).
    """
    p = prepare(input, target, weight, ignore_index, reduction, label_smoothing, z_loss, softcap,
                 sample_weight, normalizer)
    loss_rows, lse, top1, blocks = _pass(p, kernels().FORWARD, np.ones(1),
                                         np.empty((1, 1, 1), dtype=p.x3.dtype),
                                         keep_rows=return_stats)
    loss = reduce_losses(p, loss_rows, blocks)
    return (loss, _stats(p, lse, top1)) if return_stats else loss


def cross_entropy_with_grad(input, target, weight=None, ignore_index: int = -100,
                            reduction: str = "mean", label_smoothing: float = 0.0,
                            grad_output=None, out=None, *, z_loss: float = 0.0, softcap=None,
                            sample_weight=None, normalizer=None, return_stats: bool = False,
                            target_grad: bool = False):
    r"""Loss and its gradient with respect to `input` in one fused pass over the logits.

    `grad_input` is the gradient of $\sum_i g_i \ell_i$ (upstream gradient $g$ = `grad_output`,
    losses $\ell$ as in [`cross_entropy`][numbaxent.cross_entropy]) with respect to the logits $x$:
    with $p_i = \operatorname{softmax}(x_i)$,

    $$
    \frac{\partial}{\partial x_{ij}} = g_i\,(p_{ij}\,a_i - b_{ij}),
    $$

    where for class-index targets
    $a_i = v_i[(1-\varepsilon) w_{y_i} + \frac{\varepsilon}{C}\sum_c w_c]$ and
    $b_{ij} = v_i[(1-\varepsilon) w_{y_i}[j=y_i] + \frac{\varepsilon}{C} w_j]$, and for
    probability targets $a_i = \sum_c w_c\tilde t_{ic}$, $b_{ij} = w_j \tilde t_{ij}$. A z-loss
    $\zeta$ adds $2\zeta\, v_i \operatorname{lse}(x_i)\, p_{ij}$ inside the parentheses; under a
    soft-cap $c$ the softmax is that of $z = c \tanh(x / c)$ and the result is multiplied by
    $1 - \tanh^2(x_{ij} / c)$; a sample weight $s_i$ multiplies $g_i$.

    With `target_grad=True` (probability targets only) it also returns the gradient with respect
    to the target, as PyTorch's autograd gives it for a target that requires grad:

    $$
    \frac{\partial}{\partial t_{ic}} = -g_i\, s_i\, w_c\, (1-\varepsilon)\,
        \log\operatorname{softmax}(z_i)_c,
    $$

    where $z$ are the logits (soft-capped when `softcap` is given), $s_i$ the
    `sample_weight` (1 by default), $\varepsilon$ the label smoothing, and $g_i$ the
    upstream gradient, divided by the `'mean'` denominator under `'mean'`. `z_loss` does not
    depend on the target. The log-softmax comes from the row statistics of the same pass (the row
    maximum and log-sum): vectorised NumPy over the logits, no second softmax.

    Parameters
    ----------
    input : array_like
        As in [`cross_entropy`][numbaxent.cross_entropy].
    target : array_like
        As in [`cross_entropy`][numbaxent.cross_entropy].
    weight : array_like, optional
        As in [`cross_entropy`][numbaxent.cross_entropy].
    ignore_index : int
        As in [`cross_entropy`][numbaxent.cross_entropy].
    reduction : {'mean', 'sum', 'none'}
        As in [`cross_entropy`][numbaxent.cross_entropy].
    label_smoothing : float
        As in [`cross_entropy`][numbaxent.cross_entropy].
    grad_output : float or array_like, optional
        Upstream gradient $g$: a scalar for `'mean'`/`'sum'`, an array broadcastable to the loss's
        shape for `'none'`. Defaults to 1.
    out : ndarray, optional
        Receives the gradient; must have `input`'s shape and dtype. `out=input` overwrites the
        logits with their gradient and allocates no N×C array.
    z_loss : float
        Keyword-only; as in [`cross_entropy`][numbaxent.cross_entropy].
    softcap : float, optional
        Keyword-only; as in [`cross_entropy`][numbaxent.cross_entropy].
    sample_weight : array_like, optional
        Keyword-only; as in [`cross_entropy`][numbaxent.cross_entropy].
    normalizer : float, optional
        Keyword-only; as in [`cross_entropy`][numbaxent.cross_entropy].
    return_stats : bool
        Keyword-only; as in [`cross_entropy`][numbaxent.cross_entropy].
    target_grad : bool
        Keyword-only. Also return the gradient with respect to a class-probability `target`
        (formula above). A `ValueError` for class-index targets.

    Returns
    -------
    loss : numpy scalar or ndarray
        As [`cross_entropy`][numbaxent.cross_entropy] returns it.
    grad_input : ndarray
        Of `input`'s shape and dtype (`out` when given).
    grad_target : ndarray
        Of `input`'s shape and the target's dtype. Only with `target_grad=True`.
    stats : Stats
        Only with `return_stats=True`.
    """
    p = prepare(input, target, weight, ignore_index, reduction, label_smoothing, z_loss, softcap,
                 sample_weight, normalizer)
    _check_target_grad(p, target_grad)
    k = kernels()
    g = _upstream(p, grad_output)
    # a zero-denominator 'mean' needs the NLL sum apart, read before out=input overwrites the logits
    s_nll = _nll_total(p) if _zero_weight_mean(p) and p.eps > 0 else None
    if target_grad and out is not None and np.may_share_memory(out, p.x):
        # the fused pass would overwrite the logits the target gradient reads: forward pass, then
        # the target gradient, then the backward pass into `out` (no N x C copy)
        loss_rows, row_max, row_logsum, top1, blocks = kernel_pass(p, k.FORWARD, g,
                                                      np.empty((1, 1, 1), p.x3.dtype))
        grad, grad_t = backward_pass(p, row_max, row_logsum, grad_output, out, target_grad=True)
    else:
        grad, g3, copy_back = _grad_target(p, out)
        # target_grad reads the per-row statistics: keep them (the column kernels otherwise write
        # only block sums for a reduced loss)
        loss_rows, row_max, row_logsum, top1, blocks = kernel_pass(p, k.FUSED, g, g3,
                                                      keep_rows=return_stats or target_grad)
        if copy_back is not None:
            np.copyto(grad, _from_canonical(copy_back, p))
        if _zero_weight_mean(p):
            _zero_weight_grad(p, grad)
        grad_t = _target_gradient(p, g, row_max, row_logsum) if target_grad else None
    res = (reduce_losses(p, loss_rows, blocks, s_nll), grad) + ((grad_t,) if target_grad else ())
    return res + (_stats(p, row_max + row_logsum, top1),) if return_stats else res


class CrossEntropyLoss:
    """Stateful criterion with `torch.nn.CrossEntropyLoss`'s constructor.

    [`forward`][numbaxent.CrossEntropyLoss.forward] (or calling the object) computes the loss and
    keeps the per-row log-sum-exp (as the row max and the log of the shifted sum: O(rows) memory)
    and a reference to the logits; [`backward`][numbaxent.CrossEntropyLoss.backward] then writes the
    gradient in a single read of the logits, without recomputing the softmax statistics. The logits
    must not be modified between `forward` and `backward`. `z_loss` and `softcap` (keyword-only)
    are as in [`cross_entropy`][numbaxent.cross_entropy]; `sample_weight` and `normalizer` vary per
    batch and are given to `forward`. After `forward`, `stats` holds the batch's
    [`Stats`][numbaxent.Stats].
    """

    def __init__(self, weight=None, size_average=None, ignore_index: int = -100, reduce=None,
                 reduction: str = "mean", label_smoothing: float = 0.0, *, z_loss: float = 0.0,
                 softcap=None):
        if size_average is not None or reduce is not None:
            reduction = legacy_reduction(size_average, reduce)
        self.reduction = check_reduction(reduction)
        self.label_smoothing = check_label_smoothing(label_smoothing)
        self.ignore_index = check_ignore_index(ignore_index)
        self.z_loss = check_z_loss(z_loss)
        self.softcap = check_softcap(softcap)
        self.weight = None if weight is None else as_array(weight, "weight")
        self.stats = None
        self._saved = None

    def __repr__(self):
        return (f"CrossEntropyLoss(reduction={self.reduction!r}, ignore_index={self.ignore_index}, "
                f"label_smoothing={self.label_smoothing}, "
                f"weight={'None' if self.weight is None else 'set'})")

    def forward(self, input, target, *, sample_weight=None, normalizer=None):
        """Loss of `input` against `target` (see [`cross_entropy`][numbaxent.cross_entropy]);
        saves what [`backward`][numbaxent.CrossEntropyLoss.backward] needs (the per-row log-sum-exp
        and a reference to `input`)."""
        p = prepare(input, target, self.weight, self.ignore_index, self.reduction,
                     self.label_smoothing, self.z_loss, self.softcap, sample_weight, normalizer)
        loss_rows, row_max, row_logsum, top1, blocks = kernel_pass(p, kernels().FORWARD, np.ones(1),
                                                      np.empty((1, 1, 1), dtype=p.x3.dtype))
        self._saved = (p, row_max, row_logsum)
        self.stats = _stats(p, row_max + row_logsum, top1)
        return reduce_losses(p, loss_rows, blocks)

    __call__ = forward

    def backward(self, grad_output=None, out=None, *, target_grad: bool = False):
        """Gradient of `sum(grad_output * loss)` w.r.t. the last `forward`'s input.

        `out` may be given as in [`cross_entropy_with_grad`][numbaxent.cross_entropy_with_grad]
        (`out=input` is in place). `target_grad=True` (probability targets) returns
        `(grad_input, grad_target)`, the target's gradient as in
        [`cross_entropy_with_grad`][numbaxent.cross_entropy_with_grad].
        """
        if self._saved is None:
            raise ValueError("backward() called before forward()")
        p, row_max, row_logsum = self._saved
        grad, grad_t = backward_pass(p, row_max, row_logsum, grad_output, out, target_grad=target_grad)
        return (grad, grad_t) if target_grad else grad
