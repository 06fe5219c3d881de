"""Validation and canonical views: the one place every entry point checks its arguments.

Contract. `prepare(input, target, ...)` checks every argument as PyTorch's `cross_entropy` does
(with the documented deliberate differences: idiomatic exception classes, any integer target dtype,
NaN or negative smoothing refused), and returns a `Prepared`: the logits as a C-contiguous
`(N, C, S)` storage view `x3` (a copy only when the layout requires it; 2-D Fortran-ordered input is
seen as `(1, C, N)`; byte-swapped input is first copied to the machine's order; float16 and
bfloat16 are viewed as 2-byte integers that the kernels widen), the flat int64 class targets or the
probabilities in `x3`'s layout, the class weights in the compute dtype, and the `'mean'`
denominator. The smaller checks (`check_reduction`, `check_label_smoothing`, `as_array`,
`class_weights`, `upstream_gradient`, ...) are for entry points with their own shapes (the LM head, the evaluator, Dask,
the torch drop-in), so that an argument means and fails the same everywhere.

Nothing here computes a loss; everything is O(rows) or cheaper. The kernels are imported on first
use (`index_targets` validates targets with one).
"""
from __future__ import annotations

import math
import operator
import warnings
from dataclasses import dataclass

import numpy as np

FLOAT_ITEMSIZES = {2: np.float16, 4: np.float32, 8: np.float64}


def kernels():
    """The kernels module, imported on first use (which imports Numba and selects the threading
    layer), so that `import numbaxent` compiles nothing."""
    from . import _kernels as k

    return k


# -- options -----------------------------------------------------------------------------------------
def legacy_reduction(size_average, reduce) -> str:
    """PyTorch's mapping of the deprecated `size_average`/`reduce` pair to a `reduction`."""
    size_average = True if size_average is None else bool(size_average)
    reduce = True if reduce is None else bool(reduce)
    if size_average and reduce:
        ret = "mean"
    elif reduce:
        ret = "sum"
    else:
        ret = "none"
    warnings.warn(
        f"size_average and reduce args will be deprecated, please use reduction='{ret}' instead.",
        UserWarning,
        stacklevel=3,
    )
    return ret


def check_reduction(reduction) -> str:
    if reduction == "elementwise_mean":
        warnings.warn(
            "reduction='elementwise_mean' is deprecated. Please use reduction='mean' instead.",
            UserWarning,
            stacklevel=4,
        )
        return "mean"
    if not isinstance(reduction, str) or reduction not in ("none", "mean", "sum"):
        raise ValueError(f"{reduction} is not a valid value for reduction")
    return reduction


def check_label_smoothing(label_smoothing) -> float:
    try:
        eps = float(label_smoothing)
    except (TypeError, ValueError):
        raise TypeError(
            f"label_smoothing must be a real number, got {type(label_smoothing).__name__}"
        ) from None
    if not (0.0 <= eps <= 1.0):  # also rejects NaN (PyTorch silently treats NaN and eps < 0 as 0)
        raise ValueError(f"label_smoothing must be between 0.0 and 1.0. Got: {eps:g}")
    return eps


def check_z_loss(z_loss) -> float:
    z = check_real(z_loss, "z_loss")
    if not (z >= 0.0 and math.isfinite(z)):
        raise ValueError(f"z_loss must be a finite number >= 0, got {z_loss!r}")
    return z


def check_softcap(softcap):
    if softcap is None:
        return None
    c = check_real(softcap, "softcap")
    if not (c > 0.0 and math.isfinite(c)):
        raise ValueError(f"softcap must be None or a finite number > 0, got {softcap!r}")
    return c


def check_real(value, name: str) -> float:
    if isinstance(value, (bool, np.bool_)):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__}")
    try:
        return float(value)
    except (TypeError, ValueError):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__}") from None


def check_ignore_index(ignore_index) -> int:
    try:
        return operator.index(ignore_index)
    except TypeError:
        raise TypeError(
            f"ignore_index must be an integer, got {type(ignore_index).__name__}"
        ) from None


# -- arrays ------------------------------------------------------------------------------------------
def as_array(a, name: str) -> np.ndarray:
    if isinstance(a, np.ndarray):
        return a
    try:
        return np.asarray(a)
    except Exception as exc:  # ragged lists and the like
        raise TypeError(f"{name} could not be converted to an array: {exc}") from None


def native_byte_order(a: np.ndarray) -> np.ndarray:
    """`a` itself, or a copy in the machine's byte order when it is byte-swapped (`>f4` on a
    little-endian machine): the kernels read raw machine words. Integer targets and weights are
    converted by the casts that canonicalise them anyway."""
    return a if a.dtype.isnative else a.astype(a.dtype.newbyteorder("="))


def logits_dtype(x: np.ndarray):
    """(storage dtype for the kernels, compute dtype) for a logits array, or TypeError."""
    dt = x.dtype
    if dt.name == "bfloat16":  # ml_dtypes
        return np.dtype(np.int16), np.dtype(np.float32)
    if dt.kind == "f" and dt.itemsize in FLOAT_ITEMSIZES:
        if dt.itemsize == 2:
            return np.dtype(np.uint16), np.dtype(np.float32)
        return dt, dt
    raise TypeError(
        f"cross_entropy: expected floating point input (float16, bfloat16, float32 or float64), "
        f"got {dt}"
    )


@dataclass
class Prepared:
    """Canonical views and constants for one call (see `_kernels` for the layout)."""

    x: np.ndarray  # the user's logits as an array (its dtype, its shape)
    x3: np.ndarray  # (N, C, S) C-contiguous storage view (a copy only if the layout required it)
    transposed: bool  # 2-D Fortran-ordered input seen as (1, C, N)
    compute: np.dtype
    C: int
    rows: int
    loss_shape: tuple
    soft: bool
    target: np.ndarray  # int64 (rows,) or compute-dtype probabilities in x3's layout
    w: np.ndarray  # (C,) compute dtype
    wsum: float
    denom: float  # 'mean' denominator
    ignore_index: int
    eps: float
    reduction: str
    z: float = 0.0
    cap: float | None = None
    sw: np.ndarray | None = None  # float64 (rows,) sample weights, or (1,) ones
    target_dtype: np.dtype | None = None  # the user's target dtype (the target gradient's dtype)
    n_valid: int = 0  # rows whose class target is not ignore_index (all rows for probabilities)


def canonical_view(a: np.ndarray, transposed: bool, shape3: tuple) -> np.ndarray | None:
    """`a` (input-shaped) as a C-contiguous (N, C, S) view, or None if that needs a copy."""
    v = a.T if transposed else a
    if not v.flags.c_contiguous:
        return None
    return v.reshape(shape3)


def check_normalizer(normalizer, reduction: str):
    if normalizer is None:
        return None
    if reduction != "mean":
        raise ValueError(f"normalizer replaces the 'mean' denominator; it cannot be used with "
                         f"reduction='{reduction}'")
    norm = check_real(normalizer, "normalizer")
    if not (norm > 0.0 and math.isfinite(norm)):
        raise ValueError(f"normalizer must be a finite number > 0, got {normalizer!r}")
    return norm


def is_real(dtype: np.dtype) -> bool:
    """Whether an array of this dtype holds real numbers: integers, floats, or ml_dtypes' bfloat16
    (NumPy's kind 'V', so not found by kind alone: a bfloat16 loss's upstream gradient is one)."""
    return dtype.kind in "iuf" or dtype.name == "bfloat16"


def class_weights(weight, C: int, compute) -> np.ndarray:
    """The (C,) class weights in the compute dtype (ones for None), or a ValueError/TypeError."""
    if weight is None:
        return np.ones(C, dtype=compute)
    wa = as_array(weight, "weight")
    if not is_real(wa.dtype):
        raise TypeError(f"weight must be a real array, got dtype {wa.dtype}")
    if wa.ndim != 1 or wa.shape[0] != C:
        raise ValueError(
            f"weight tensor should be defined either for all {C} classes or no classes but got "
            f"weight tensor of shape: {list(wa.shape)}"
        )
    return writable(np.ascontiguousarray(wa, dtype=compute))


def writable(a: np.ndarray) -> np.ndarray:
    """`a`, or a copy when it is read-only: Numba types a read-only array apart from a writable
    one, so a read-only class weight or upstream gradient (a user's frozen array, or a
    `broadcast_to` view) would compile one more variant of every kernel. For the small per-class and
    per-row float64 arrays only (never the logits)."""
    return a if a.flags.writeable else a.copy()


def sample_weights(sample_weight, loss_shape: tuple, transposed: bool = False) -> np.ndarray:
    """Per-element weights as float64 over the rows (flat), or ones(1) for None."""
    if sample_weight is None:
        return np.ones(1)
    swa = as_array(sample_weight, "sample_weight")
    if not is_real(swa.dtype):
        raise TypeError(f"sample_weight must be a real array, got dtype {swa.dtype}")
    if swa.shape != loss_shape:
        raise ValueError(f"sample_weight must have the shape of the per-element loss "
                         f"{loss_shape}, got {swa.shape}")
    swa = swa.T if transposed else swa
    sw = np.ascontiguousarray(swa, dtype=np.float64).reshape(-1)
    return sw.copy() if sw.shape[0] == 1 else writable(sw)


def upstream_gradient(grad_output, reduction: str, loss_shape: tuple) -> np.ndarray:
    """The upstream gradient `g` of `sum(g * loss)`, checked, as float64 per-row multipliers:
    `(rows,)` in the loss's row-major order, or `(1,)` when one number serves every row (a
    reduced loss, or None: 1). For `'none'` it must broadcast to `loss_shape`; for `'mean'` and
    `'sum'` it must be one real number. Not yet divided by the `'mean'` denominator (the caller
    knows whether that denominator is zero)."""
    if reduction == "none":
        if grad_output is None:
            return np.ones(1)
        go = as_array(grad_output, "grad_output")
        if not is_real(go.dtype):
            raise TypeError(f"grad_output must be a real array, got dtype {go.dtype}")
        try:
            go = np.broadcast_to(go, loss_shape)
        except ValueError:
            raise ValueError(
                f"grad_output of shape {go.shape} does not match the loss's shape {loss_shape}"
            ) from None
        g = np.ascontiguousarray(go, dtype=np.float64).reshape(-1)
        return writable(g) if g.shape[0] != 1 else g.copy()
    if grad_output is None:
        return np.ones(1)
    go = as_array(grad_output, "grad_output")
    if go.size != 1 or not is_real(go.dtype):
        raise ValueError(
            f"grad_output for reduction='{reduction}' must be a real scalar, got an array of "
            f"shape {go.shape} and dtype {go.dtype}"
        )
    return np.array([float(go.reshape(()))])


def index_targets(t: np.ndarray, w: np.ndarray, sw: np.ndarray, ignore_index: int, C: int):
    """`(targets, W, n_valid)`: flat int64 class targets, validated, the 'mean' denominator
    `W = sum sw * w[y]` over kept elements and their count; IndexError naming the first target out
    of range."""
    if t.dtype == np.uint64 and t.size and int(t.max()) > np.iinfo(np.int64).max:
        bad = t.reshape(-1)[np.argmax(t.reshape(-1) > np.iinfo(np.int64).max)]
        raise IndexError(f"Target {int(bad)} is out of bounds.")
    tgt = np.ascontiguousarray(t.reshape(-1), dtype=np.int64)
    from ._parallel import run_tasks
    from ._targets import merge_target_blocks, target_check

    blocks, args = target_check(tgt, w, sw, ignore_index, C)
    # a target costs about what 8 logits of a pass cost: the threshold for threads is in logits
    run_tasks(kernels().check_target_blocks, blocks, 8 * tgt.shape[0], *args)
    first_bad, denom, n_valid = merge_target_blocks(*args[-3:])
    if first_bad >= 0:
        raise IndexError(f"Target {int(tgt[first_bad])} is out of bounds.")
    return tgt, denom, int(n_valid)


def prepare(input, target, weight, ignore_index, reduction, label_smoothing, z_loss=0.0,
             softcap=None, sample_weight=None, normalizer=None) -> Prepared:
    reduction = check_reduction(reduction)
    eps = check_label_smoothing(label_smoothing)
    ignore_index = check_ignore_index(ignore_index)
    z = check_z_loss(z_loss)
    cap = check_softcap(softcap)
    norm = check_normalizer(normalizer, reduction)
    x = native_byte_order(as_array(input, "input"))
    storage, compute = logits_dtype(x)
    if x.ndim == 0:
        raise ValueError("input must have a class dimension: expected shape (C,), (N, C) or "
                         "(N, C, d1, ..., dk), got a 0-d array")
    t = as_array(target, "target")
    C = x.shape[0] if x.ndim == 1 else x.shape[1]
    N = 1 if x.ndim == 1 else x.shape[0]
    S = math.prod(x.shape[2:])

    soft = t.shape == x.shape
    if soft:
        if t.dtype.kind != "f" and t.dtype.name != "bfloat16":
            raise TypeError(
                f"Expected floating point type for target with class probabilities, got {t.dtype}"
            )
        if ignore_index >= 0:
            raise ValueError(
                f"ignore_index is not supported for floating point target (got ignore_index="
                f"{ignore_index})"
            )
        loss_shape = () if x.ndim == 1 else (N,) + x.shape[2:]
    else:
        if x.ndim == 1:
            if t.ndim != 0:
                raise ValueError(
                    f"For unbatched (1-D) input, target must be a 0-d class index, got target of "
                    f"shape {t.shape}"
                )
            loss_shape = ()
        else:
            tb = t.shape[0] if t.ndim > 0 else 0
            if tb != N:
                raise ValueError(
                    f"Expected input batch_size ({N}) to match target batch_size ({tb})."
                )
            expect = (N,) + x.shape[2:]
            if t.shape != expect:
                raise ValueError(
                    f"Expected target size {list(expect)}, got {list(t.shape)} (input shape "
                    f"{list(x.shape)})"
                )
            loss_shape = expect
        if t.dtype.kind not in "iu":
            raise TypeError(
                f"expected target dtype to be an integer type (class indices) or a floating type "
                f"of input's shape {x.shape} (class probabilities), but got {t.dtype} of shape "
                f"{t.shape}"
            )

    w = class_weights(weight, C, compute)
    wsum = float(np.sum(w, dtype=np.float64))

    # logits: 2-D Fortran-ordered input is read as (1, C, N) without a copy
    transposed = x.ndim == 2 and not x.flags.c_contiguous and x.flags.f_contiguous
    shape3 = (1, C, N) if transposed else (N, C, S)
    xs = x.view(storage) if storage != x.dtype else x
    x3 = canonical_view(xs, transposed, shape3)
    if x3 is None:
        x3 = np.ascontiguousarray(xs).reshape(shape3)
    rows = math.prod(loss_shape)

    sw = sample_weights(sample_weight, loss_shape, transposed)

    if soft:
        ta = t.astype(compute, copy=False)
        tt = ta.T if transposed else ta
        tgt = np.ascontiguousarray(tt).reshape(shape3)
        denom = float(rows) if sample_weight is None else float(np.sum(sw))
        n_valid = rows
        if C == 0:  # PyTorch divides by input.numel() / C = 0 / 0: 'mean' is NaN
            denom = 0.0
    else:
        tgt, denom, n_valid = index_targets(t, w, sw, ignore_index, C)
    if normalizer is not None:
        denom = norm
    return Prepared(x, x3, transposed, compute, C, rows, loss_shape, soft, tgt, w, wsum,
                    float(denom), ignore_index, eps, reduction, z, cap, sw, t.dtype, n_valid)
