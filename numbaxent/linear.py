"""Fused linear + cross-entropy for training a language model's output layer on the CPU.

`loss = cross_entropy(hidden @ weight.T + bias, target, ...)` and its gradients with respect to
`hidden`, `weight` and `bias`, without ever holding the `(tokens, vocab)` logits: rows are
processed in chunks; one chunk's logits are formed with BLAS into a reused buffer, turned into their
gradient in place by numbaxent's fused kernel, and immediately consumed by the two gradient products
(`grad_hidden[chunk] = G @ weight`, `grad_weight += G.T @ hidden[chunk]`). Rows whose target is
`ignore_index` are skipped entirely: no matrix-product work for padding.

Chunk size (`chunk_size=None`): as many rows as fit a logits buffer of
`LOGITS_BUDGET_BYTES` (32 MiB: `rows = 32 MiB / (vocab * itemsize)`), rounded down to a
multiple of 16 and kept between 16 and 4096 rows — large enough for BLAS to run at full speed, small
enough that the extra memory is a few tens of MB whatever the number of tokens. `grad_weight` is
accumulated by BLAS itself (`beta = 1`, through NumPy's bundled OpenBLAS) where NumPy's BLAS is
reachable, else in vocabulary blocks of `VOCAB_BLOCK` rows through a small temporary, so no
`(vocab, hidden)` temporary is allocated either way. The shapes handed to BLAS are chosen by
measurement (see `_grad_hidden`).

Semantics are the core's (PyTorch's) for every option; `class_weight` is `cross_entropy`'s
`weight`. One deliberate difference: since ignored rows are skipped, a NaN or inf in an ignored
row's hidden state reaches no gradient (in PyTorch's unfused path it makes `grad_weight` NaN).

Precision: float32 and float64 inputs are computed in their own dtype. float16 and bfloat16
(`ml_dtypes`) `hidden` and `weight` are computed in float32, as the core computes half logits:
`weight` (and `bias`) are converted to float32 once per call, `hidden` one chunk at a time,
and the gradients are accumulated in float32 and returned in the inputs' dtypes (the loss too, as
the core returns it; `Stats.lse` stays float32, as the core's).
"""
from __future__ import annotations

import ctypes
import functools
import math

import numpy as np

from . import _api, _prepare

__all__ = ["linear_cross_entropy", "linear_cross_entropy_with_grad", "chunk_rows"]

LOGITS_BUDGET_BYTES = 32 * 2**20
VOCAB_BLOCK = 2048


def chunk_rows(vocab: int, itemsize: int, n_rows: int) -> int:
    """The default chunk size (rows) for a vocabulary of `vocab` classes."""
    rows = LOGITS_BUDGET_BYTES // max(1, vocab * itemsize)
    rows = max(16, min(4096, rows // 16 * 16))
    return max(1, min(rows, n_rows))


def _numpy_blas_symbol(name: str):
    """The function `name` of the BLAS bundled with NumPy's PyPI wheels (OpenBLAS, `scipy_`-prefixed
    ILP64 symbols), found through NumPy's extension module, whose symbol scope includes that
    library; None on other NumPy builds."""
    try:
        from numpy._core import _multiarray_umath

        return getattr(ctypes.CDLL(_multiarray_umath.__file__), name)
    except (ImportError, OSError, AttributeError):
        return None


@functools.lru_cache(maxsize=None)
def _cblas_gemm(dtype: np.dtype):
    """NumPy's own BLAS `cblas_?gemm` for float32/float64 through ctypes, or None.

    NumPy's PyPI wheels bundle OpenBLAS with ILP64 symbols (`scipy_cblas_sgemm64_`,
    `scipy_cblas_dgemm64_`: 64-bit integer arguments, so the names fix the calling convention;
    `_numpy_blas_symbol`). Used only for what `np.matmul` cannot do, accumulating (`beta = 1`)
    into `grad_weight`; elsewhere (other NumPy builds) None, and the caller accumulates through a
    temporary.
    """
    name = {"float32": "scipy_cblas_sgemm64_", "float64": "scipy_cblas_dgemm64_"}.get(
        np.dtype(dtype).name)
    fn = None if name is None else _numpy_blas_symbol(name)
    if fn is None:
        return None
    real = ctypes.c_float if np.dtype(dtype) == np.float32 else ctypes.c_double
    i64, ptr = ctypes.c_int64, ctypes.c_void_p
    fn.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int, i64, i64, i64, real, ptr, i64, ptr,
                   i64, real, ptr, i64]
    fn.restype = None
    return fn


_ROW_MAJOR, _NO_TRANS, _TRANS = 101, 111, 112  # CBLAS enum values


def _blas_threads():
    """The thread count of NumPy's bundled OpenBLAS (`scipy_openblas_get_num_threads64_`), or
    None when that library is not reachable."""
    fn = _numpy_blas_symbol("scipy_openblas_get_num_threads64_")
    if fn is None:
        return None
    fn.argtypes, fn.restype = [], ctypes.c_int
    return int(fn())


def _rows_unit(a) -> bool:
    """A 2-D array BLAS can read as row-major: unit column stride, rows at a positive stride."""
    return (a.ndim == 2 and a.strides[1] == a.itemsize and a.strides[0] >= a.shape[1] * a.itemsize
            and a.strides[0] % a.itemsize == 0)


def _accumulate_grad_weight(gw, G, hc, scratch: dict):
    """`gw += G.T @ hc` (G the chunk's logit gradient (m, V), hc its hidden rows (m, H)).

    With NumPy's BLAS reachable, GEMMs with `beta = 1` (one per vocabulary block of `VOCAB_BLOCK`
    rows) accumulate straight into `gw`: no temporary and no extra pass over the (V, H) gradient
    per chunk (that pass, single-threaded in NumPy, cost about a third of a GEMM's CPU time at 256
    rows: 5.4 s against 4.0 s over 4096 rows, 2 threads). Otherwise the product is
    formed by vocabulary blocks of `VOCAB_BLOCK` rows in a temporary (`scratch['tmp']`, made on
    first use and reused by the later chunks) and added.
    """
    gemm = _cblas_gemm(gw.dtype)
    if (gemm is not None and G.dtype == hc.dtype == gw.dtype and gw.flags.c_contiguous
            and _rows_unit(G) and _rows_unit(hc)):
        m, V = G.shape
        H = hc.shape[1]
        isz = gw.itemsize
        # row-major C (vb, H) += A^T B, A = G[:, block] (m, vb), B = hc (m, H), by vocabulary
        # blocks: one call over all V rows makes OpenBLAS touch a packing buffer ~20 MB larger
        # (measured: 64 MB extra peak against 42 MB for the step), for no measurable speed
        for v0 in range(0, V, VOCAB_BLOCK):
            vb = min(V, v0 + VOCAB_BLOCK) - v0
            gemm(_ROW_MAJOR, _TRANS, _NO_TRANS, vb, H, m, 1.0, G.ctypes.data + v0 * isz,
                 G.strides[0] // isz, hc.ctypes.data, hc.strides[0] // isz, 1.0,
                 gw.ctypes.data + v0 * H * isz, H)
        return
    V = G.shape[1]
    tmp = scratch.get("tmp")
    if tmp is None:
        tmp = scratch["tmp"] = np.empty((min(VOCAB_BLOCK, V), hc.shape[1]), dtype=gw.dtype)
    for v0 in range(0, V, VOCAB_BLOCK):
        v1 = min(V, v0 + VOCAB_BLOCK)
        blk = tmp[: v1 - v0]
        np.matmul(G[:, v0:v1].T, hc, out=blk)
        gw[v0:v1] += blk


def _grad_hidden(G, wc, tbuf, transposed: bool):
    """`G @ wc` (m, H); with `transposed`, the transpose of a C-contiguous (H, m) product in `tbuf`.

    Multi-threaded, BLAS is handed `wc.T @ G.T` (M = H, N = m) rather than `G @ wc` (M = m): for a
    chunk of a few hundred rows against K = V, OpenBLAS at 2 threads spent about twice the CPU time
    on the latter (1024 x 32000 weight, 256-row chunks, over 4096 rows: 9.7 s against 5.0 s; 128
    rows: 25 s against 4.8 s). At one thread the direct product is the faster (4.1 s against 4.8 s),
    so `transposed` follows the BLAS thread count.
    """
    if not transposed:
        return np.matmul(G, wc, out=tbuf[: G.shape[0] * wc.shape[1]].reshape(G.shape[0], -1))
    m, H = G.shape[0], wc.shape[1]
    out = tbuf[: H * m].reshape(H, m)
    np.matmul(wc.T, G.T, out=out)
    return out.T


def _check(hidden, weight, target, bias, chunk_size):
    """`(hidden, weight, target, bias)` as arrays (hidden and weight in the machine's byte order,
    bias in the compute dtype), or a TypeError/ValueError; the loss options are `_prepare`'s."""
    h = _prepare.native_byte_order(_prepare.as_array(hidden, "hidden"))
    w = _prepare.native_byte_order(_prepare.as_array(weight, "weight"))
    if not (h.dtype.name == "bfloat16" or h.dtype in (np.float16, np.float32, np.float64)):
        raise TypeError(f"hidden must be float16, bfloat16, float32 or float64, got {h.dtype}")
    if w.dtype != h.dtype:
        raise TypeError(f"weight must have hidden's dtype {h.dtype}, got {w.dtype}")
    if h.ndim < 1 or w.ndim != 2 or w.shape[1] != h.shape[-1]:
        raise ValueError(f"expected hidden (..., H) and weight (V, H) with the same H, got hidden "
                         f"{h.shape} and weight {w.shape}")
    t = _prepare.as_array(target, "target")
    if t.shape != h.shape[:-1]:
        raise ValueError(f"target must have hidden's leading shape {h.shape[:-1]}, got {t.shape}")
    if t.dtype.kind not in "iu":
        raise TypeError(f"target must hold integer class indices, got {t.dtype}")
    b = None
    if bias is not None:
        b = np.ascontiguousarray(_prepare.as_array(bias, "bias"), dtype=_compute(h.dtype))
        if b.shape != (w.shape[0],):
            raise ValueError(f"bias must have shape ({w.shape[0]},), got {b.shape}")
    if chunk_size is not None and (not isinstance(chunk_size, (int, np.integer)) or chunk_size < 1):
        raise ValueError(f"chunk_size must be a positive integer or None, got {chunk_size!r}")
    return h, w, t, b


def _compute(dtype) -> np.dtype:
    """The dtype the logits are formed in: float32 for float16/bfloat16, else `dtype`."""
    return np.dtype(np.float32) if np.dtype(dtype).itemsize == 2 else np.dtype(dtype)


def _chunked_linear_cross_entropy(hidden, weight, target, bias, ignore_index, reduction,
                                  label_smoothing, class_weight, z_loss, softcap, sample_weight,
                                  normalizer, chunk_size, grad_output, want_grad, return_stats):
    """Both public functions: the checks, then the loss (and with `want_grad` the gradients) chunk
    by chunk over the kept rows."""
    reduction = _prepare.check_reduction(reduction)
    h, w, t, b = _check(hidden, weight, target, bias, chunk_size)
    lead = t.shape
    H, V = h.shape[-1], w.shape[0]
    h2 = h.reshape(-1, H)
    n = h2.shape[0]
    cd = _compute(h.dtype)
    half = cd != h.dtype  # half inputs: float32 weight copy, hidden converted chunk by chunk
    wc = np.asarray(w, dtype=cd) if half else w
    # the core's own checks; the global 'mean' denominator comes from all targets at once
    eps = _prepare.check_label_smoothing(label_smoothing)
    ignore_index = _prepare.check_ignore_index(ignore_index)
    z = _prepare.check_z_loss(z_loss)
    cap = _prepare.check_softcap(softcap)
    norm = _prepare.check_normalizer(normalizer, reduction)
    cw = _prepare.class_weights(class_weight, V, cd)
    sw_all = _prepare.sample_weights(sample_weight, lead)
    tgt, denom, n_valid = _prepare.index_targets(t, cw, sw_all, ignore_index, V)
    denom = denom if norm is None else norm
    # PyTorch's rule for a weighted 'mean' whose total weight is exactly 0, as in the core
    zero_weight = _api.zero_weight_mean(reduction, denom, n_valid)
    sw = sw_all if sample_weight is not None else None
    kept = np.flatnonzero(tgt != ignore_index)
    contiguous = kept.size == n  # no ignored rows: chunks are plain slices

    # the core's upstream-gradient check; (n,) per-row multipliers, or (1,) for every row
    go = _prepare.upstream_gradient(grad_output, reduction, lead)
    if reduction == "mean" and not zero_weight:  # that case: zero_weight_grad on each chunk
        with np.errstate(divide="ignore", invalid="ignore"):
            go = go / np.float64(denom)
    s_nll = 0.0  # with smoothing, a zero-weight 'mean' needs the loss without it apart

    rows_loss = np.zeros(n)
    lse = np.full(n, np.nan, dtype=cd) if return_stats else None
    top1 = np.zeros(n, dtype=bool) if return_stats else None
    # gradients accumulate in the compute dtype (float32 for half inputs), cast once at the end
    gh = (np.zeros_like(h2) if not half else np.zeros(h2.shape, dtype=h.dtype)) \
        if want_grad else None
    gw = np.zeros(w.shape, dtype=cd) if want_grad else None
    gb = (np.zeros(V, dtype=cd) if bias is not None else None) if want_grad else None

    step = chunk_size or chunk_rows(V, cd.itemsize, max(1, kept.size))
    rows_max = min(step, max(1, kept.size))
    buf = np.empty((rows_max, V), dtype=cd)
    hbuf = np.empty((rows_max, H), dtype=cd) if half else None
    wt = wc.T
    scratch = {}  # grad_weight's temporary, when BLAS cannot accumulate into it
    ghT = np.empty(rows_max * H, dtype=cd) if want_grad else None  # grad_hidden rows
    transposed = (_blas_threads() or 2) > 1  # see _grad_hidden
    for start in range(0, kept.size, step):
        if contiguous:
            rows = slice(start, min(start + step, n))
            hc = h2[rows]
        else:
            rows = kept[start:start + step]
            hc = h2[rows]
        m = hc.shape[0]
        if half:  # this chunk's rows in float32 (never the whole array)
            hbuf[:m] = hc
            hc = hbuf[:m]
        logits = buf[:m]
        np.matmul(hc, wt, out=logits)
        if b is not None:
            logits += b
        tc = tgt[rows]
        kw = dict(weight=cw if class_weight is not None else None, ignore_index=ignore_index,
                  reduction="none", label_smoothing=eps, z_loss=z, softcap=cap,
                  sample_weight=None if sw is None else sw[rows], return_stats=return_stats)
        if zero_weight and eps > 0.0:  # before the fused pass overwrites the logits
            nll = _api.cross_entropy(logits, tc, **{**kw, "label_smoothing": 0.0,
                                                    "return_stats": False})
            s_nll += float(np.sum(nll, dtype=np.float64))
        if want_grad:
            res = _api.cross_entropy_with_grad(logits, tc, out=logits, **kw,
                                               grad_output=go if go.shape[0] == 1 else go[rows])
            G = logits  # now the gradient of the chunk's logits
            if zero_weight:
                _api.zero_weight_grad(G, tc, ignore_index, eps)
            # grad_hidden rows: G @ W; grad_weight: += G.T @ h. A non-finite gradient (a zero total
            # weight, NaN logits) propagates without NumPy's floating-point warnings, as PyTorch's
            # and the core's kernels give it
            with np.errstate(invalid="ignore", over="ignore"):
                gh[rows] = _grad_hidden(G, wc, ghT, transposed)
                _accumulate_grad_weight(gw, G, hc, scratch)
                if gb is not None:
                    gb += G.sum(axis=0)
            loss_c = res[0]
        else:
            res = _api.cross_entropy(logits, tc, **kw)
            loss_c = res[0] if return_stats else res
        if return_stats:
            st = res[-1]
            lse[rows] = st.lse
            top1[rows] = st.top1
        rows_loss[rows] = loss_c

    if reduction == "none":
        loss = rows_loss.astype(h.dtype).reshape(lead)
    else:
        total = float(np.sum(rows_loss))
        if reduction == "sum":
            value = total
        elif zero_weight:
            value = _api.zero_weight_loss(total, eps, V, s_nll)
        else:
            with np.errstate(divide="ignore", invalid="ignore"):
                value = total / np.float64(denom)
        loss = np.asarray(value, dtype=np.float64).astype(h.dtype)[()]
    out = [loss]
    if want_grad:
        out += [gh.reshape(h.shape), gw.astype(h.dtype, copy=False),
                None if gb is None else gb.astype(h.dtype, copy=False)]
    if return_stats:
        acc = float(np.count_nonzero(top1)) / n_valid if n_valid else float("nan")
        out.append(_api.Stats(lse.reshape(lead), top1.reshape(lead), acc))
    return out[0] if len(out) == 1 else tuple(out)


def linear_cross_entropy(hidden, weight, target, bias=None, *, ignore_index: int = -100,
                         reduction: str = "mean", label_smoothing: float = 0.0, class_weight=None,
                         z_loss: float = 0.0, softcap=None, sample_weight=None, normalizer=None,
                         chunk_size=None, return_stats: bool = False):
    r"""Cross-entropy of the logits `hidden @ weight.T + bias`, without forming them all.

    Equal to [`cross_entropy`][numbaxent.cross_entropy]`(hidden @ weight.T + bias, target,
    weight=class_weight, ...)`, except
    that rows whose target is `ignore_index` are skipped: their hidden states are never read, so
    a NaN or inf there does not reach the gradients (PyTorch's unfused path forms those rows'
    logits and its `grad_weight` becomes NaN; a documented deliberate difference, see the
    [semantics page](semantics.md)). The loss is the same either way. Rows are processed in chunks
    whose logits are formed with BLAS into one reused buffer, so memory stays a few tens of MB
    whatever the number of tokens.

    Parameters
    ----------
    hidden : ndarray
        Activations of shape (N, H) or (..., H): float16, bfloat16 (`ml_dtypes`), float32 or
        float64 (half precision is computed in float32, its gradients accumulated in float32).
    weight : ndarray
        Output projection of shape (V, H), of `hidden`'s dtype.
    target : array_like of int
        Class indices of `hidden`'s leading shape, (N,) or (...); `ignore_index` rows are skipped.
    bias : ndarray, optional
        Output bias of shape (V,).
    ignore_index : int
        Keyword-only; as in [`cross_entropy`][numbaxent.cross_entropy].
    reduction : {'mean', 'sum', 'none'}
        Keyword-only; as in [`cross_entropy`][numbaxent.cross_entropy].
    label_smoothing : float
        Keyword-only; as in [`cross_entropy`][numbaxent.cross_entropy].
    class_weight : array_like, optional
        Keyword-only. Per-class weights of shape (V,): [`cross_entropy`][numbaxent.cross_entropy]'s
        `weight`.
    z_loss : float
        Keyword-only; as in [`cross_entropy`][numbaxent.cross_entropy].
    softcap : float, optional
        Keyword-only; as in [`cross_entropy`][numbaxent.cross_entropy].
    sample_weight : array_like, optional
        Keyword-only; as in [`cross_entropy`][numbaxent.cross_entropy] (of `target`'s shape).
    normalizer : float, optional
        Keyword-only; as in [`cross_entropy`][numbaxent.cross_entropy].
    chunk_size : int, optional
        Keyword-only. Rows per chunk; by default as many as fit a 32 MiB logits buffer, rounded
        down to a multiple of 16 and kept between 16 and 4096.
    return_stats : bool
        Keyword-only; as in [`cross_entropy`][numbaxent.cross_entropy].

    Returns
    -------
    loss : numpy scalar or ndarray
        A scalar, or an array of `target`'s shape for `reduction='none'`.
    stats : Stats
        Only with `return_stats=True` (`lse` is NaN on skipped, ignored rows).
    """
    return _chunked_linear_cross_entropy(
        hidden, weight, target, bias, ignore_index, reduction, label_smoothing, class_weight,
        z_loss, softcap, sample_weight, normalizer, chunk_size, grad_output=None, want_grad=False,
        return_stats=return_stats)


def linear_cross_entropy_with_grad(hidden, weight, target, bias=None, *, ignore_index: int = -100,
                                   reduction: str = "mean", label_smoothing: float = 0.0,
                                   class_weight=None, z_loss: float = 0.0, softcap=None,
                                   sample_weight=None, normalizer=None, chunk_size=None,
                                   grad_output=None, return_stats: bool = False):
    r"""Loss and the gradients of `sum(grad_output * loss)` w.r.t. `hidden`, `weight`, `bias`.

    With $G$ the gradient of the loss with respect to the logits $X = H W^\top + b$ (computed chunk
    by chunk, in place over the chunk's logits, as
    [`cross_entropy_with_grad`][numbaxent.cross_entropy_with_grad] gives it):

    $$
    \frac{\partial}{\partial H} = G W, \qquad \frac{\partial}{\partial W} = G^\top H, \qquad
    \frac{\partial}{\partial b} = \textstyle\sum_i G_{i,:}.
    $$

    Parameters
    ----------
    hidden : ndarray
        As in [`linear_cross_entropy`][numbaxent.linear_cross_entropy].
    weight : ndarray
        As in [`linear_cross_entropy`][numbaxent.linear_cross_entropy].
    target : array_like of int
        As in [`linear_cross_entropy`][numbaxent.linear_cross_entropy].
    bias : ndarray, optional
        As in [`linear_cross_entropy`][numbaxent.linear_cross_entropy].
    ignore_index : int
        Keyword-only; as in [`linear_cross_entropy`][numbaxent.linear_cross_entropy].
    reduction : {'mean', 'sum', 'none'}
        Keyword-only; as in [`linear_cross_entropy`][numbaxent.linear_cross_entropy].
    label_smoothing : float
        Keyword-only; as in [`linear_cross_entropy`][numbaxent.linear_cross_entropy].
    class_weight : array_like, optional
        Keyword-only; as in [`linear_cross_entropy`][numbaxent.linear_cross_entropy].
    z_loss : float
        Keyword-only; as in [`linear_cross_entropy`][numbaxent.linear_cross_entropy].
    softcap : float, optional
        Keyword-only; as in [`linear_cross_entropy`][numbaxent.linear_cross_entropy].
    sample_weight : array_like, optional
        Keyword-only; as in [`linear_cross_entropy`][numbaxent.linear_cross_entropy].
    normalizer : float, optional
        Keyword-only; as in [`linear_cross_entropy`][numbaxent.linear_cross_entropy].
    chunk_size : int, optional
        Keyword-only; as in [`linear_cross_entropy`][numbaxent.linear_cross_entropy].
    grad_output : float or array_like, optional
        Keyword-only. Upstream gradient: a real scalar for `'mean'`/`'sum'`, an array
        broadcastable to `target`'s shape for `'none'`, checked as by
        [`cross_entropy_with_grad`][numbaxent.cross_entropy_with_grad]. Defaults to 1.
    return_stats : bool
        Keyword-only; as in [`linear_cross_entropy`][numbaxent.linear_cross_entropy].

    Returns
    -------
    loss : numpy scalar or ndarray
        As [`linear_cross_entropy`][numbaxent.linear_cross_entropy] returns it.
    grad_hidden : ndarray
        Of `hidden`'s shape and dtype.
    grad_weight : ndarray
        Of `weight`'s shape and dtype.
    grad_bias : ndarray or None
        Of shape (V,) in `hidden`'s dtype, or None when `bias` is None.
    stats : Stats
        Only with `return_stats=True`.
    """
    return _chunked_linear_cross_entropy(
        hidden, weight, target, bias, ignore_index, reduction, label_smoothing, class_weight,
        z_loss, softcap, sample_weight, normalizer, chunk_size, grad_output=grad_output,
        want_grad=True, return_stats=return_stats)
