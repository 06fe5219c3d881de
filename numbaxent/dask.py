"""Cross-entropy and evaluation of `dask.array` logits, on any Dask scheduler.

`pip install 'numbaxent[dask]'`. Every block (a range of rows with all classes) is turned into a
small `numbaxent.evaluate.Evaluator` state (or a loss partial sum) by a task, and the
states are combined by a tree reduction with a fixed shape (`split_every` children per node, in
block order), so the result does not depend on the scheduler, the number of workers or the order in
which tasks finish. Logits chunked along the class axis (or along trailing spatial axes) are
rechunked to whole rows first; targets are rechunked to match the logits' row chunks.

This module imports Dask; the rest of numbaxent never does.
"""
from __future__ import annotations

import os

import dask
import dask.array as da
import numpy as np
from dask.delayed import delayed

from .evaluate import Evaluator, _two_sum_into

__all__ = ["cross_entropy", "evaluate", "evaluate_hidden", "evaluation_graph", "from_npy"]


# -- inputs --------------------------------------------------------------------------------------------
def _as_dask(a, name: str, chunk_rows=None):
    if isinstance(a, da.Array):
        return a
    arr = np.asarray(a)
    if arr.ndim == 0:
        return da.from_array(arr)
    chunks = (chunk_rows or max(1, arr.shape[0]),) + arr.shape[1:]
    return da.from_array(arr, chunks=chunks, name=f"numbaxent-{name}-" + dask.base.tokenize(arr))


def _align(logits, target, chunk_rows=None, what="logits"):
    """(logits chunked along rows only, targets): the targets are a Dask array with the logits' row
    chunks, or a NumPy array when they were given as one (each block's slice then travels inside
    its block's task). `what="hidden"`: hidden states (N, H) instead of logits."""
    x = _as_dask(logits, what, chunk_rows)
    if what == "hidden" and x.ndim != 2:
        raise ValueError(f"hidden must have shape (N, H), got {x.shape}")
    if x.ndim < 2:
        raise ValueError(f"logits must have shape (N, C) or (N, C, d1, ..., dk), got {x.shape}")
    rest = {i: -1 for i in range(1, x.ndim)}
    if chunk_rows is not None:
        rest[0] = chunk_rows
    if any(len(c) > 1 for c in x.chunks[1:]) or chunk_rows is not None:
        x = x.rechunk(rest)
    t = target if isinstance(target, da.Array) else np.asarray(target)
    expect = (x.shape[0],) + x.shape[2:]
    if t.shape != x.shape and t.shape != expect:
        if t.ndim >= 1 and t.shape[0] != x.shape[0]:
            raise ValueError(f"{what} have {x.shape[0]} rows but targets have {t.shape[0]}")
        raise ValueError(f"{what} of shape {x.shape} need targets of shape {expect}, got {t.shape}")
    if isinstance(t, da.Array):
        t = t.rechunk(x.chunks if t.shape == x.shape
                      else (x.chunks[0],) + tuple((n,) for n in t.shape[1:]))
    return x, t


def _call_block(xb, tb, rows, block_fn=None, kw=None):
    """One row block: `block_fn(xb, tb, first_row, **kw)` in a 1x...x1 object array."""
    out = np.empty((1,) * xb.ndim, dtype=object)
    out.reshape(-1)[0] = block_fn(xb, tb, rows[0].start, **kw)
    return out


def _unwrap(part):
    return part.reshape(-1)[0] if isinstance(part, np.ndarray) and part.dtype == object else part


def _per_block(x, t, func, name: str, **kw):
    """`[Delayed(func(x_block, t_block, first_row, **kw))]` over the row blocks, one task per
    block and nothing else: the layer that produces a block (a `from_npy`/`from_array`/Zarr
    read) is fused into this Blockwise layer, and NumPy targets travel as each task's own slice, so
    a block is read by the task that uses it, never moves between workers, and the scheduler has
    one task per block to place (plus the reduction tree)."""
    from dask.layers import ArraySliceDep, ArrayValuesDep

    xi = tuple(range(x.ndim))
    if isinstance(t, da.Array):
        targs = (t, xi if t.shape == x.shape else (0,) + xi[2:])
        tkey = t.name
    else:  # one literal slice per block, embedded in that block's task
        bounds = np.cumsum((0,) + x.chunks[0])
        values = {(i,): t[a:b] for i, (a, b) in enumerate(zip(bounds[:-1], bounds[1:]))}
        targs = (ArrayValuesDep((x.chunks[0],), values), (0,))
        tkey = dask.base.tokenize(t)
    token = dask.base.tokenize(x.name, tkey, func, kw)
    out = da.blockwise(_call_block, xi, x, xi, *targs, ArraySliceDep((x.chunks[0],)), (0,),
                       block_fn=func, kw=kw, adjust_chunks={i: 1 for i in xi[1:]},
                       dtype=object, meta=np.empty((0,) * x.ndim, dtype=object),
                       concatenate=False, align_arrays=False, name=f"{name}-{token}")
    # Blockwise fusion only: low-level linear fusion would add an alias task per block
    with dask.config.set({"optimization.fuse.active": False}):
        return out.to_delayed(optimize_graph=True).ravel().tolist()


def _tree(parts, combine, split_every: int, name: str):
    """Reduce `parts` with `combine(*group)` in a fixed tree (groups in index order)."""
    if split_every < 2:
        raise ValueError(f"split_every must be >= 2, got {split_every}")
    level = 0
    while len(parts) > 1:
        parts = [delayed(combine, pure=True)(*parts[i:i + split_every],
                                             dask_key_name=f"{name}-{level}-{i // split_every}")
                 for i in range(0, len(parts), split_every)]
        level += 1
    return parts[0]


class _numba_threads:
    """Run a block with `n` Numba threads (restored afterwards; the setting is per thread).

    `n=None`: inside a `distributed` worker, one thread per task (Dask's workers are the
    parallelism; Numba's pool on top would oversubscribe the cores); elsewhere Numba's default (the
    local threaded scheduler shares one TBB pool between its tasks)."""

    def __init__(self, n):
        self.n = n
        self.old = None

    def __enter__(self):
        n = self.n
        if n is None:
            try:
                from distributed import get_worker

                get_worker()
                n = 1
            except (ImportError, ValueError):
                return self
        import numba

        from . import _jit  # noqa: F401  (threading layer chosen before the pool starts)

        self.old = numba.get_num_threads()
        numba.set_num_threads(max(1, min(int(n), numba.config.NUMBA_NUM_THREADS)))
        return self

    def __exit__(self, *exc):
        if self.old is not None:
            import numba

            numba.set_num_threads(self.old)
        return False


# -- evaluate ------------------------------------------------------------------------------------------
def _block_state(xb, tb, row0: int, config: dict, threads, head=None):
    ev = Evaluator(**config)
    ev._row_offset = row0  # so an out-of-range target is reported with its global row
    with _numba_threads(threads):
        if head is None:
            ev.update(xb, tb)
        else:  # hidden states: the block's logits are formed chunk by chunk in the task
            w = head["weight"]
            w = w.whole() if hasattr(w, "whole") else w  # a file spec: mapped by the worker
            ev.update_hidden(xb, w, tb, head["bias"], head["softcap"], head["chunk_size"])
    ev._row_offset = 0
    return ev


def _check_head(weight, bias, softcap, chunk_size, hidden_dtype, H: int) -> dict:
    """The output layer for the hidden-state blocks, checked once here (not in every task), with
    NumPy arrays converted once to the dtype the blocks compute in."""
    from . import _prepare
    from .evaluate import _is_float, hidden_compute_dtype

    spec = hasattr(weight, "whole")  # a RawArray from the CLI: each task maps the file itself
    w = weight if spec else _prepare.as_array(weight, "weight")
    if not _is_float(np.dtype(w.dtype)):
        raise TypeError(f"weight must be float16, bfloat16, float32 or float64, got {w.dtype}")
    if len(w.shape) != 2 or w.shape[1] != H:
        raise ValueError(f"hidden size mismatch: hidden has H={H}, weight has shape "
                         f"{tuple(w.shape)} (expected (V, {H}))")
    compute = hidden_compute_dtype(hidden_dtype, w.dtype)
    if not spec and w.dtype != compute:
        w = np.asarray(w, dtype=compute)
    V = int(w.shape[0])
    if bias is not None:
        b = _prepare.as_array(bias, "bias")
        if b.shape != (V,):
            raise ValueError(f"bias must have shape ({V},) (one per class), got shape {b.shape}")
        bias = np.asarray(b, dtype=compute)
    return dict(weight=w, bias=bias, softcap=_prepare.check_softcap(softcap), chunk_size=chunk_size)


def _merge_states(*states):
    out = _unwrap(states[0]).copy()
    for s in states[1:]:
        out.merge(_unwrap(s))
    return out


def evaluation_graph(logits, target, num_classes=None, weight=None, ignore_index: int = -100,
                     label_smoothing: float = 0.0, topk=(1, 5), calibration_bins: int = 15,
                     confusion: bool = False, *, split_every: int = 8, threads=None,
                     chunk_rows=None, head=None):
    """The graph behind [`evaluate`][numbaxent.dask.evaluate] and
    [`evaluate_hidden`][numbaxent.dask.evaluate_hidden]: `(blocks, root)` where `blocks` is a list
    of `(rows, Delayed[Evaluator])` per block and `root` the merged `Delayed[Evaluator]`. The
    arguments are [`evaluate`][numbaxent.dask.evaluate]'s; with
    `head=dict(weight=, bias=, softcap=, chunk_size=)`, `logits` are hidden states (N, H) and each
    block is scored by [`Evaluator.update_hidden`][numbaxent.evaluate.Evaluator.update_hidden]."""
    x, t = _align(logits, target, chunk_rows, "logits" if head is None else "hidden")
    if head is None:
        C = x.shape[1]
    else:
        if not (x.dtype.kind == "f" or x.dtype.name == "bfloat16"):
            raise TypeError(f"hidden must be floating point, got {x.dtype}")
        head = _check_head(head["weight"], head.get("bias"), head.get("softcap"),
                           head.get("chunk_size"), x.dtype, x.shape[1])
        C = int(head["weight"].shape[0])
    if num_classes is not None and num_classes != C:
        raise ValueError(f"{'logits' if head is None else 'weight'} have {C} classes, "
                         f"num_classes={num_classes}")
    proto = Evaluator(C, weight=weight, ignore_index=ignore_index, label_smoothing=label_smoothing,
                      topk=topk, calibration_bins=calibration_bins, confusion=confusion)
    if not (x.dtype.kind == "f" or x.dtype.name == "bfloat16"):
        raise TypeError(f"logits must be floating point, got {x.dtype}")
    if t.dtype.kind not in "iu":
        raise TypeError(f"targets must be integer class indices, got {t.dtype}")
    config = dict(num_classes=C, weight=proto.weight, ignore_index=proto.ignore_index,
                  label_smoothing=proto.label_smoothing, topk=proto.topk,
                  calibration_bins=proto.calibration_bins, confusion=proto.confusion)
    if weight is not None:
        config["weight"] = proto._weight_src
    token = dask.base.tokenize(x.name, t.name if isinstance(t, da.Array) else t, config, threads,
                               split_every, head)
    parts = _per_block(x, t, _block_state, "numbaxent-block", config=config, threads=threads,
                       head=head)
    blocks = list(zip(x.chunks[0], parts))
    if not parts:  # no rows
        root = delayed(proto.copy, pure=True)(dask_key_name=f"numbaxent-empty-{token}")
    else:
        root = _tree(parts, _merge_states, split_every, f"numbaxent-merge-{token}")
        if len(parts) == 1:
            root = delayed(_unwrap, pure=True)(root, dask_key_name=f"numbaxent-one-{token}")
    return blocks, root


def evaluate(logits, target, num_classes=None, weight=None, ignore_index: int = -100,
             label_smoothing: float = 0.0, topk=(1, 5), calibration_bins: int = 15,
             confusion: bool = False, *, split_every: int = 8, threads=None, chunk_rows=None,
             compute: bool = True, scheduler=None):
    """Evaluate `dask.array` logits (N, C[, d1..dk]) against targets (N[, d1..dk]).

    The result equals `Evaluator(...).update(all logits, all targets).result()` to ~1e-15 relative,
    whatever the chunking, scheduler and worker count.

    Parameters
    ----------
    logits : dask.array.Array or array_like
        Logits (N, C[, d1..dk]). NumPy inputs are wrapped (`chunk_rows` rows per block); logits are
        rechunked to whole rows when their class axis is chunked.
    target : dask.array.Array or array_like
        Class indices (N[, d1..dk]), rechunked to the logits' row chunks.
    num_classes : int, optional
        Checked against `logits.shape[1]` when given.
    weight : array_like, optional
        As in [`Evaluator`][numbaxent.evaluate.Evaluator].
    ignore_index : int
        As in [`Evaluator`][numbaxent.evaluate.Evaluator].
    label_smoothing : float
        As in [`Evaluator`][numbaxent.evaluate.Evaluator].
    topk : int or sequence of int
        As in [`Evaluator`][numbaxent.evaluate.Evaluator].
    calibration_bins : int
        As in [`Evaluator`][numbaxent.evaluate.Evaluator].
    confusion : bool
        As in [`Evaluator`][numbaxent.evaluate.Evaluator]: every block keeps its own C x C
        confusion matrix and the tree adds them up (exact integer counts), so the result's
        `confusion`, `iou` and `mean_iou` equal the in-memory evaluator's.
    split_every : int
        Keyword-only. Fan-in of the tree reduction of block states.
    threads : int, optional
        Keyword-only. Numba threads per task. Default: 1 on `distributed` workers, Numba's default
        otherwise.
    chunk_rows : int, optional
        Keyword-only. Rechunk the rows to this many per block.
    compute : bool
        Keyword-only. Return the [`EvalResult`][numbaxent.evaluate.EvalResult] (default), or a
        `Delayed` of the merged [`Evaluator`][numbaxent.evaluate.Evaluator] (`compute=False`).
    scheduler : optional
        Keyword-only. Passed to `dask.compute` (default: the active `distributed.Client`, else
        Dask's default).
    """
    _, root = evaluation_graph(logits, target, num_classes, weight, ignore_index, label_smoothing,
                               topk, calibration_bins, confusion, split_every=split_every,
                               threads=threads, chunk_rows=chunk_rows)
    if not compute:
        return root
    (ev,) = dask.compute(root, scheduler=scheduler)
    return ev.result()


def evaluate_hidden(hidden, weight, target, bias=None, *, softcap=None, class_weight=None,
                    ignore_index: int = -100, label_smoothing: float = 0.0, topk=(1, 5),
                    calibration_bins: int = 15, confusion: bool = False, chunk_size=None,
                    split_every: int = 8, threads=None, chunk_rows=None, compute: bool = True,
                    scheduler=None):
    r"""[`evaluate`][numbaxent.dask.evaluate] of the logits `hidden @ weight.T + bias`, never
    stored: each block of hidden states (N, H) is scored by
    [`Evaluator.update_hidden`][numbaxent.evaluate.Evaluator.update_hidden] in its task (logits
    formed `chunk_size` rows at a time, 64 MiB by default).

    The result equals `evaluate(hidden @ weight.T + bias, target, ...)` within the rounding of
    the matrix product, whatever the chunking and scheduler.

    Parameters
    ----------
    hidden : dask.array.Array or array_like
        Hidden states (N, H): float16, bfloat16, float32 or float64; rechunked to whole rows when H
        is chunked.
    weight : ndarray
        The output layer (V, H), a NumPy array: it travels with the graph, converted once to the
        compute dtype (float64 if either input is float64, else float32).
    target : dask.array.Array or array_like of int
        Class indices (N,).
    bias : array_like, optional
        Output bias (V,).
    softcap : float, optional
        Keyword-only. Score $s \tanh(x / s)$ of the logits $x$ (with $s$ = `softcap`).
    class_weight : array_like, optional
        Keyword-only. [`evaluate`][numbaxent.dask.evaluate]'s `weight` (per-class loss weights).
    ignore_index : int
        Keyword-only; as in [`evaluate`][numbaxent.dask.evaluate].
    label_smoothing : float
        Keyword-only; as in [`evaluate`][numbaxent.dask.evaluate].
    topk : int or sequence of int
        Keyword-only; as in [`evaluate`][numbaxent.dask.evaluate].
    calibration_bins : int
        Keyword-only; as in [`evaluate`][numbaxent.dask.evaluate].
    confusion : bool
        Keyword-only; as in [`evaluate`][numbaxent.dask.evaluate].
    chunk_size : int, optional
        Keyword-only. Rows per logits chunk inside a task
        ([`Evaluator.update_hidden`][numbaxent.evaluate.Evaluator.update_hidden]'s).
    split_every : int
        Keyword-only; as in [`evaluate`][numbaxent.dask.evaluate].
    threads : int, optional
        Keyword-only; as in [`evaluate`][numbaxent.dask.evaluate].
    chunk_rows : int, optional
        Keyword-only; as in [`evaluate`][numbaxent.dask.evaluate].
    compute : bool
        Keyword-only; as in [`evaluate`][numbaxent.dask.evaluate].
    scheduler : optional
        Keyword-only; as in [`evaluate`][numbaxent.dask.evaluate].
    """
    _, root = evaluation_graph(hidden, target, None, class_weight, ignore_index, label_smoothing,
                               topk, calibration_bins, confusion, split_every=split_every,
                               threads=threads, chunk_rows=chunk_rows,
                               head=dict(weight=weight, bias=bias, softcap=softcap,
                                         chunk_size=chunk_size))
    if not compute:
        return root
    (ev,) = dask.compute(root, scheduler=scheduler)
    return ev.result()


# -- cross_entropy -------------------------------------------------------------------------------------
def _block_sum(xb, tb, _first_row, weight, ignore_index, eps, threads):
    # `_first_row` (every `_per_block` function's third argument): a sum needs no global row
    from . import _api, _prepare

    with _numba_threads(threads):
        p = _prepare.prepare(xb, tb, weight, ignore_index, "sum", eps)
        loss, _, _, _, blocks = _api.kernel_pass(p, _prepare.kernels().FORWARD, np.ones(1),
                                                 np.empty((1, 1, 1), dtype=p.x3.dtype),
                                                 keep_rows=False)
        total = _api.loss_total(p, loss, blocks)
    # [sum, its error term, denominator, its error term]
    return np.array([total, 0.0, p.denom, 0.0])


def _sum_partials(*parts):
    parts = [_unwrap(p) for p in parts]
    hi = np.array([parts[0][0], parts[0][2]])
    lo = np.array([parts[0][1], parts[0][3]])
    for p in parts[1:]:
        _two_sum_into(hi, lo, np.array([p[0], p[2]]), np.array([p[1], p[3]]))
    return np.array([hi[0], lo[0], hi[1], lo[1]])


def _finish(part, reduction, dtype):
    part = _unwrap(part)
    total = part[0] + part[1]
    if reduction == "sum":
        value = total
    else:
        with np.errstate(divide="ignore", invalid="ignore"):
            value = np.float64(total) / np.float64(part[2] + part[3])
    return np.asarray(value, dtype=np.float64).astype(dtype)


def _block_none(xb, tb, weight, ignore_index, eps, threads):
    from . import _api

    with _numba_threads(threads):
        return _api.cross_entropy(xb, tb, weight, ignore_index, "none", eps)[:, None]


def cross_entropy(logits, target, weight=None, ignore_index: int = -100, reduction: str = "mean",
                  label_smoothing: float = 0.0, *, split_every: int = 8, threads=None,
                  chunk_rows=None):
    """[`numbaxent.cross_entropy`][numbaxent.cross_entropy] of `dask.array` inputs, lazily.

    For `'mean'` and `'sum'`, per-block float64 partial sums and `'mean'` denominators are combined
    by a fixed tree with a two-sum error term, then divided once: PyTorch's weighted mean over all
    rows. Call `.compute()` on the result.

    Parameters
    ----------
    logits : dask.array.Array or array_like
        Logits (N, C[, d1..dk]), rechunked to whole rows when the class axis is chunked.
    target : dask.array.Array or array_like
        Class-index targets (N[, d1..dk]) or probability targets of the logits' shape.
    weight : array_like, optional
        As in [`numbaxent.cross_entropy`][numbaxent.cross_entropy].
    ignore_index : int
        As in [`numbaxent.cross_entropy`][numbaxent.cross_entropy].
    reduction : {'mean', 'sum', 'none'}
        As in [`numbaxent.cross_entropy`][numbaxent.cross_entropy].
    label_smoothing : float
        As in [`numbaxent.cross_entropy`][numbaxent.cross_entropy].
    split_every : int
        Keyword-only; as in [`evaluate`][numbaxent.dask.evaluate].
    threads : int, optional
        Keyword-only; as in [`evaluate`][numbaxent.dask.evaluate].
    chunk_rows : int, optional
        Keyword-only; as in [`evaluate`][numbaxent.dask.evaluate].

    Returns
    -------
    dask.array.Array
        A 0-d array for `'mean'` and `'sum'`, per-element losses for `'none'`; in the logits'
        dtype.
    """
    from . import _prepare

    reduction = _prepare.check_reduction(reduction)
    eps = _prepare.check_label_smoothing(label_smoothing)
    ignore_index = _prepare.check_ignore_index(ignore_index)
    x, t = _align(logits, target, chunk_rows)
    if weight is not None:
        weight = np.asarray(weight)
    if reduction == "none":
        if not isinstance(t, da.Array):
            t = da.from_array(t, chunks=x.chunks if t.shape == x.shape
                              else (x.chunks[0],) + t.shape[1:])
        xi = tuple(range(x.ndim))
        ti = xi if t.shape == x.shape else (0,) + xi[2:]
        # the class axis is kept with length 1 (no contraction, so no copy of the block), then
        # dropped by a slice
        out = da.blockwise(_block_none, xi, x, xi, t, ti, weight=weight,
                           ignore_index=ignore_index, eps=eps, threads=threads,
                           adjust_chunks={1: 1}, dtype=x.dtype, concatenate=False)
        return out[:, 0]
    token = dask.base.tokenize(x.name, t.name if isinstance(t, da.Array) else t, weight,
                               ignore_index, eps, reduction)
    parts = _per_block(x, t, _block_sum, "numbaxent-ce", weight=weight,
                       ignore_index=ignore_index, eps=eps, threads=threads)
    if not parts:
        parts = [delayed(np.zeros, pure=True)(4)]
    root = _tree(parts, _sum_partials, split_every, f"numbaxent-ce-merge-{token}")
    out = delayed(_finish, pure=True)(root, reduction, x.dtype,
                                      dask_key_name=f"numbaxent-ce-final-{token}")
    return da.from_delayed(out, shape=(), dtype=x.dtype)


# -- files ---------------------------------------------------------------------------------------------
def _read_block(spec, slices):
    return spec.rows(slices[0].start, slices[0].stop)


def _from_raw(spec, rows: int):
    """A Dask array whose blocks memory-map rows of `spec` (a `RawArray`) in the task that
    reads them (a Blockwise "data producer" layer, as `from_array`'s, so it fuses with its
    consumer)."""
    from dask.blockwise import blockwise as core_blockwise
    from dask.highlevelgraph import HighLevelGraph
    from dask.layers import ArraySliceDep

    n = spec.shape[0] if spec.shape else 0
    if n == 0 or not spec.shape:
        return da.from_array(np.asarray(spec.whole()), chunks=-1)
    chunks = da.core.normalize_chunks((rows,) + tuple(spec.shape[1:]), spec.shape)
    name = "numbaxent-raw-" + dask.base.tokenize(spec, os.path.getmtime(spec.path), rows)
    ind = tuple(range(len(spec.shape)))
    layer = core_blockwise(_read_block, name, ind, spec, None, ArraySliceDep(chunks), ind,
                           numblocks={}, _data_producer=True)
    graph = HighLevelGraph.from_collections(name, layer, dependencies=())
    return da.Array(graph, name, chunks, dtype=spec.dtype,
                    meta=np.empty((0,) * len(spec.shape), dtype=spec.dtype))


def from_npy(path, chunk_rows: int | None = None, *, chunk_bytes: int = 128 << 20):
    """A Dask array over a `.npy` file (or `file.npz:member` stored uncompressed) whose blocks
    are memory-mapped **by the task that uses them** (on a cluster: by the worker, from a shared
    file system), so no data goes through the scheduler or the client.

    Parameters
    ----------
    path : str or os.PathLike
        A `.npy` file, or `file.npz:member` for a member stored uncompressed.
    chunk_rows : int, optional
        Rows per block (default: about `chunk_bytes` per block).
    chunk_bytes : int
        Keyword-only. Target block size when `chunk_rows` is not given (128 MiB).
    """
    from .io import open_array

    spec = open_array(os.fspath(path), raw_only=True)
    row_bytes = max(1, spec.row_bytes)
    return _from_raw(spec, chunk_rows or max(1, chunk_bytes // row_bytes))
