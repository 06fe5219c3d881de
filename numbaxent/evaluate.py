"""Streaming, mergeable evaluation of logits against class-index targets.

`Evaluator` consumes logits in chunks of rows (`update`), keeps a small state (O(classes +
calibration bins) numbers, independent of how many rows it has seen), merges with other evaluators
(`merge`: several processes, Dask blocks) and reports loss, perplexity, top-k accuracy, entropy,
calibration and per-class figures (`result`). Each chunk is read once: the one-pass kernel of
`numbaxent._metrics` computes every per-row figure while the row is in cache.

With `confusion=True` it also keeps the C x C confusion matrix (segmentation metrics: per-class
IoU and mean IoU). `Evaluator.save` / `Evaluator.load` write and read the state as a
`.npz` file without pickle (array jobs save partial states, `numbaxent merge` combines them).

Importing this module imports NumPy only; the kernels are loaded on the first `update`.
"""
from __future__ import annotations

import math
import operator
import os
import tempfile
import zipfile
import zlib
from dataclasses import dataclass, field

import numpy as np

from . import _api, _prepare

__all__ = ["Evaluator", "EvalResult", "STATE_FORMAT", "STATE_VERSION", "MAX_CONFUSION_BYTES",
           "HIDDEN_CHUNK_BYTES", "hidden_chunk_rows", "hidden_compute_dtype"]

STATE_FORMAT = "numbaxent.Evaluator"  # the `format` member of a state file
STATE_VERSION = 1  # the `version` member; load refuses any other
MAX_CONFUSION_BYTES = 1 << 30  # a C x C int64 confusion matrix above this is refused (C > 11585)
HIDDEN_CHUNK_BYTES = 64 << 20  # default logits buffer of Evaluator.update_hidden


def _is_float(dt) -> bool:
    """float16, bfloat16 (ml_dtypes), float32 or float64, in any byte order."""
    return dt.name == "bfloat16" or (dt.kind == "f" and dt.itemsize in (2, 4, 8))


def hidden_compute_dtype(*dtypes) -> np.dtype:
    """The dtype `Evaluator.update_hidden` forms logits in: float64 when any of `dtypes`
    is float64, else float32 (float16 and bfloat16 are computed in float32, as the core does)."""
    wide = any(np.dtype(d).kind == "f" and np.dtype(d).itemsize == 8 for d in dtypes)
    return np.dtype(np.float64 if wide else np.float32)


def hidden_chunk_rows(vocab: int, itemsize: int, budget: int | None = None) -> int:
    """Default rows per chunk of `Evaluator.update_hidden`: as many as fit `budget`
    (default `HIDDEN_CHUNK_BYTES`) of `vocab`-wide logits, at least 1."""
    budget = HIDDEN_CHUNK_BYTES if budget is None else budget
    return max(1, budget // max(1, vocab * itemsize))


def _two_sum_into(hi: np.ndarray, lo: np.ndarray, b_hi, b_lo) -> None:
    """`hi + lo += b_hi + b_lo` with the rounding error of the main addition kept in `lo`
    (Knuth's two-sum), so a total does not depend on the order in which partial sums arrive."""
    s = hi + b_hi
    bp = s - hi
    with np.errstate(invalid="ignore"):
        err = (hi - (s - bp)) + (b_hi - bp)
    err = np.where(np.isfinite(s), err, 0.0)  # inf/NaN totals carry no error term
    hi[...] = s
    lo += err + b_lo


def _quiet_divide(num, den):
    """`num / den` in float64 without NumPy's warnings: NaN for 0/0 (a mean over nothing)."""
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.float64(num) / np.float64(den)


@dataclass
class EvalResult:
    r"""What [`Evaluator.result`][numbaxent.evaluate.Evaluator.result] reports. Means are over the
    non-ignored targets.

    Attributes
    ----------
    loss : float
        Exactly `torch.nn.functional.cross_entropy(..., reduction="mean")` over every row seen:
        `loss_sum / weight_sum` (NaN when every target was ignored, as in PyTorch).
    loss_sum : float
        `reduction="sum"`.
    weight_sum : float
        The `'mean'` denominator $\sum_i w_{y_i}$ over non-ignored targets (their count without
        `weight`).
    nll : float
        Mean negative log-likelihood $-\log \operatorname{softmax}(x_i)_{y_i}$, unweighted and
        unsmoothed.
    perplexity : float
        $\exp(\text{nll})$.
    accuracy : dict[int, float]
        `{k: fraction of targets ranked < k}`; the rank is the target's position in a stable
        `np.argsort(-logits)` (ties: lower class index first; NaN logits last).
    entropy : float
        Mean predictive entropy $-\sum_c p_c \log p_c$ (nats).
    confidence : float
        Mean probability of the predicted class (over the rows with a finite softmax).
    ece : float
        Expected calibration error over `calibration_bins` = $B$ equal-width bins
        $(b/B, (b+1)/B]$ of the confidence: the bins' gaps between top-1 accuracy and mean
        confidence, weighted by their share of the rows.
    mce : float
        Maximum calibration error: the largest of those gaps over the non-empty bins.
    calibration : dict
        Per bin: `edges` (B+1), `count`, `confidence` (mean) and `accuracy`.
    per_class : dict
        Per target class (arrays of length C): `count`, `loss_sum`, `loss` (the `'mean'`
        over that class's rows, $\text{loss\_sum} / (\text{count} \cdot w_c)$), `accuracy` (top-1 recall),
        `predicted` (how often the class was the argmax), `precision`.
    balanced_accuracy : float
        Mean of the per-class top-1 recall over the classes that occur.
    n_seen : int
        Targets seen.
    n_ignored : int
        Targets equal to `ignore_index`.
    n_valid : int
        The rest: `n_seen - n_ignored`.
    n_nonfinite : int
        Non-ignored rows whose softmax is NaN (a NaN or `+inf` logit, or all `-inf`): they are in
        the loss (which is then NaN, as in PyTorch) but in no calibration bin.
    confusion : ndarray of int64, shape (C, C), or None
        Only with `Evaluator(..., confusion=True)`: `confusion[i, j]` counts the non-ignored
        targets of class `i` whose predicted class (the argmax, ties to the lowest index) is `j`.
    iou : ndarray of float64, shape (C,), or None
        Per-class intersection over union of the confusion matrix $M$,
        $M_{cc} / (\sum_j M_{cj} + \sum_i M_{ic} - M_{cc})$ (NaN for a class that is neither a
        target nor predicted: its union is empty).
    mean_iou : float or None
        Mean of `iou` over the classes whose union is non-empty (NaN when there are none).
    """

    loss: float
    loss_sum: float
    weight_sum: float
    nll: float
    perplexity: float
    accuracy: dict
    entropy: float
    confidence: float
    ece: float
    mce: float
    calibration: dict = field(repr=False)
    per_class: dict = field(repr=False)
    balanced_accuracy: float
    n_seen: int
    n_ignored: int
    n_valid: int
    n_nonfinite: int
    confusion: np.ndarray | None = field(default=None, repr=False)
    iou: np.ndarray | None = field(default=None, repr=False)
    mean_iou: float | None = None

    _CONFUSION_FIELDS = ("confusion", "iou", "mean_iou")

    def to_dict(self) -> dict:
        """Plain Python types (lists for arrays, None for NaN/inf), ready for `json.dumps`.
        `confusion` (a list of rows), `iou` and `mean_iou` are present only when the
        evaluator kept a confusion matrix."""

        def clean(v):
            if isinstance(v, dict):
                return {str(k): clean(x) for k, x in v.items()}
            if isinstance(v, np.ndarray):
                if v.dtype.kind in "iub":
                    return v.tolist()
                if v.ndim != 1:
                    return [clean(row) for row in v]
                out = v.astype(np.float64).tolist()
                if not np.isfinite(v).all():
                    out = [x if math.isfinite(x) else None for x in out]
                return out
            if isinstance(v, (list, tuple)):
                return [clean(x) for x in v]
            if isinstance(v, (np.integer, int)) and not isinstance(v, bool):
                return int(v)
            if isinstance(v, (np.floating, float)):
                return float(v) if math.isfinite(v) else None
            return v

        skip = self._CONFUSION_FIELDS if self.confusion is None else ()
        return {k: clean(getattr(self, k)) for k in self.__dataclass_fields__ if k not in skip}

    def format(self, per_class: bool = False, max_classes: int | None = None) -> str:
        """A readable table (what `numbaxent eval` prints)."""
        def f(v, spec=".6g"):
            return "nan" if v is None or (isinstance(v, float) and math.isnan(v)) else format(v, spec)

        rows = [
            ("loss (mean)", f(self.loss)),
            ("loss (sum)", f(self.loss_sum)),
            ("nll", f(self.nll)),
            ("perplexity", f(self.perplexity)),
        ]
        rows += [(f"accuracy@{k}", f(v, ".4%") if not math.isnan(v) else "nan")
                 for k, v in self.accuracy.items()]
        rows += [
            ("balanced accuracy", f(self.balanced_accuracy, ".4%")
             if not math.isnan(self.balanced_accuracy) else "nan"),
            ("mean entropy", f(self.entropy)),
            ("mean confidence", f(self.confidence)),
            (f"ECE ({len(self.calibration['count'])} bins)", f(self.ece)),
            ("MCE", f(self.mce)),
        ]
        if self.confusion is not None:
            rows.append(("mean IoU", f(self.mean_iou) if self.mean_iou is not None else "nan"))
        rows += [
            ("targets seen", str(self.n_seen)),
            ("ignored", str(self.n_ignored)),
            ("evaluated", str(self.n_valid)),
        ]
        if self.n_nonfinite:
            rows.append(("non-finite rows", str(self.n_nonfinite)))
        width = max(len(r[0]) for r in rows)
        lines = [f"{name:<{width}}  {value}" for name, value in rows]
        if per_class:
            pc = self.per_class
            C = len(pc["count"])
            shown = range(C) if max_classes is None else range(min(C, max_classes))
            iou = self.iou
            lines += ["", f"{'class':>7} {'count':>10} {'loss':>11} {'accuracy':>9} "
                          f"{'precision':>9} {'predicted':>10}" + ("" if iou is None else
                                                                   f" {'IoU':>7}")]
            for c in shown:
                lines.append(
                    f"{c:>7} {int(pc['count'][c]):>10} {f(float(pc['loss'][c])):>11} "
                    f"{f(float(pc['accuracy'][c]), '.4f'):>9} {f(float(pc['precision'][c]), '.4f'):>9} "
                    f"{int(pc['predicted'][c]):>10}"
                    + ("" if iou is None else f" {f(float(iou[c]), '.4f'):>7}"))
            if len(shown) < C:
                lines.append(f"    ... {C - len(shown)} more classes (use --json for all)")
        return "\n".join(lines)

    __str__ = format


class Evaluator:
    """Streaming evaluation of logits against class-index targets, mergeable across workers.

    Parameters
    ----------
    num_classes : int
        C; every [`update`][numbaxent.evaluate.Evaluator.update] must have logits with C classes.
    weight : array_like, optional
        Class weights of shape (C,), as in [`cross_entropy`][numbaxent.cross_entropy]; they weight
        `loss` and `loss_sum` only (the other metrics are unweighted).
    ignore_index : int
        As in [`cross_entropy`][numbaxent.cross_entropy] (class-index targets); ignored targets are
        counted in `n_ignored` and skipped by every metric.
    label_smoothing : float
        As in [`cross_entropy`][numbaxent.cross_entropy]; it applies to `loss` and `loss_sum` only
        (the other metrics are unsmoothed).
    topk : int or sequence of int
        The k of the top-k accuracies (each >= 1; a k >= C gives 1).
    calibration_bins : int
        Number of equal-width confidence bins for the calibration error.
    confusion : bool
        Also keep the C x C int64 confusion matrix (rows: target class, columns: predicted class)
        and report per-class IoU and mean IoU. Refused (ValueError) when the matrix would take more
        than `MAX_CONFUSION_BYTES` (1 GiB: C > 11585).

    Notes
    -----
    The state is a few integer and float64 arrays of length O(C + bins + len(topk)) (plus C x C
    integers with `confusion=True`); float totals are kept with a two-sum error term, so
    `result()` agrees to ~1e-15 relative whatever the chunking of the rows and the order of
    [`merge`][numbaxent.evaluate.Evaluator.merge] calls. The object pickles (send it between
    processes), and [`save`][numbaxent.evaluate.Evaluator.save] writes it to a pickle-free `.npz`
    file that [`load`][numbaxent.evaluate.Evaluator.load] reads back (array jobs, shared file
    systems).

    Examples
    --------
    >>> ev = Evaluator(10, topk=(1, 5))
    >>> for x, y in batches:            # doctest: +SKIP
    ...     ev.update(x, y)
    >>> ev.merge(other_worker_ev)       # doctest: +SKIP
    >>> ev.result().loss                # doctest: +SKIP
    """

    _N_FLOAT_SCALARS = 4  # loss_sum, weight_sum, nll_sum, entropy_sum
    _N_INT_SCALARS = 5  # n_seen, n_ignored, n_valid, n_nonfinite, rows (first-axis entries)

    def __init__(self, num_classes: int, weight=None, ignore_index: int = -100,
                 label_smoothing: float = 0.0, topk=(1, 5), calibration_bins: int = 15,
                 confusion: bool = False):
        try:
            C = operator.index(num_classes)
        except TypeError:
            raise TypeError(f"num_classes must be an integer, got {type(num_classes).__name__}") \
                from None
        if C < 1:
            raise ValueError(f"num_classes must be >= 1, got {C}")
        self.num_classes = C
        if weight is None:
            self.weight = None
        else:
            wa = _prepare.as_array(weight, "weight")
            if not _prepare.is_real(wa.dtype):
                raise TypeError(f"weight must be a real array, got dtype {wa.dtype}")
            if wa.shape != (C,):
                raise ValueError(f"weight must have shape ({C},) (one per class), got {wa.shape}")
            self.weight = np.array(wa, dtype=np.float64)
            self._weight_src = np.array(wa)  # the user's dtype, cast per chunk like the core does
        self.ignore_index = _prepare.check_ignore_index(ignore_index)
        self.label_smoothing = _prepare.check_label_smoothing(label_smoothing)
        ks = (topk,) if isinstance(topk, (int, np.integer)) else tuple(topk)
        try:
            ks = tuple(sorted({operator.index(k) for k in ks}))
        except TypeError:
            raise TypeError(f"topk must be an integer or a sequence of integers, got {topk!r}") \
                from None
        if not ks or ks[0] < 1:
            raise ValueError(f"topk values must be integers >= 1, got {topk!r}")
        self.topk = ks
        try:
            B = operator.index(calibration_bins)
        except TypeError:
            raise TypeError("calibration_bins must be an integer") from None
        if B < 1:
            raise ValueError(f"calibration_bins must be >= 1, got {B}")
        self.calibration_bins = B
        if not isinstance(confusion, (bool, np.bool_)):
            raise TypeError(f"confusion must be True or False, got {confusion!r}")
        if confusion and 8 * C * C > MAX_CONFUSION_BYTES:
            raise ValueError(
                f"confusion=True needs a {C} x {C} int64 matrix ({8 * C * C / 2**30:.1f} GiB), more "
                f"than the {MAX_CONFUSION_BYTES / 2**30:g} GiB limit (at most "
                f"{math.isqrt(MAX_CONFUSION_BYTES // 8)} classes); evaluate without confusion")
        self.confusion = bool(confusion)
        self.reset()

    # -- state layout --------------------------------------------------------------------------------
    # floats: [loss_sum, weight_sum, nll_sum, entropy_sum] + cls_loss[C] + bin_conf[B]
    # ints:   [n_seen, n_ignored, n_valid, n_nonfinite, rows] + topk[K] + cls_count[C] + cls_correct[C]
    #         + cls_pred[C] + bin_count[B] + bin_correct[B]
    def _int_slices(self):
        C, B, K = self.num_classes, self.calibration_bins, len(self.topk)
        o = self._N_INT_SCALARS
        return dict(topk=slice(o, o + K), cls_count=slice(o + K, o + K + C),
                    cls_correct=slice(o + K + C, o + K + 2 * C),
                    cls_pred=slice(o + K + 2 * C, o + K + 3 * C),
                    bin_count=slice(o + K + 3 * C, o + K + 3 * C + B),
                    bin_correct=slice(o + K + 3 * C + B, o + K + 3 * C + 2 * B))

    def _float_slices(self):
        C, B = self.num_classes, self.calibration_bins
        o = self._N_FLOAT_SCALARS
        return dict(cls_loss=slice(o, o + C), bin_conf=slice(o + C, o + C + B))

    def reset(self) -> "Evaluator":
        """Forget everything seen (keep the configuration)."""
        C, B, K = self.num_classes, self.calibration_bins, len(self.topk)
        self._ints = np.zeros(self._N_INT_SCALARS + K + 3 * C + 2 * B, dtype=np.int64)
        self._hi = np.zeros(self._N_FLOAT_SCALARS + C + B, dtype=np.float64)
        self._lo = np.zeros_like(self._hi)
        self._cm = np.zeros((C, C), dtype=np.int64) if self.confusion else None
        return self

    _SETTINGS = ("num_classes", "ignore_index", "label_smoothing", "topk", "calibration_bins",
                 "confusion")

    def _differences(self, other: "Evaluator") -> list:
        """`["name: mine vs theirs", ...]` for every setting that differs from `other`'s."""
        diff = [f"{k}: {getattr(self, k)!r} vs {getattr(other, k)!r}" for k in self._SETTINGS
                if getattr(self, k) != getattr(other, k)]
        if (self.weight is None) != (other.weight is None):
            diff.append(f"weight: {'None' if self.weight is None else 'set'} vs "
                        f"{'None' if other.weight is None else 'set'}")
        elif self.weight is not None and not (
                self.weight.shape == other.weight.shape
                and np.array_equal(self.weight, other.weight, equal_nan=True)):
            diff.append("weight: different values")
        return diff

    def compatible(self, other: "Evaluator") -> bool:
        """Whether `other` has the same configuration (so the two can be merged)."""
        return isinstance(other, Evaluator) and not self._differences(other)

    def __repr__(self):
        return (f"Evaluator(num_classes={self.num_classes}, weight="
                f"{'None' if self.weight is None else 'set'}, ignore_index={self.ignore_index}, "
                f"label_smoothing={self.label_smoothing}, topk={self.topk}, "
                f"calibration_bins={self.calibration_bins}, confusion={self.confusion}; "
                f"{self.n_seen} targets seen)")

    @property
    def n_seen(self) -> int:
        """Number of targets seen so far (ignored ones included)."""
        return int(self._ints[0])

    def __getstate__(self):
        state = dict(self.__dict__)
        state.pop("_w_cache", None)  # derived (per-dtype weight casts): not part of the state
        return state

    def copy(self) -> "Evaluator":
        new = object.__new__(Evaluator)
        new.__dict__.update(self.__dict__)
        new._ints, new._hi, new._lo = self._ints.copy(), self._hi.copy(), self._lo.copy()
        new._cm = None if self._cm is None else self._cm.copy()
        return new

    def __setstate__(self, state):
        state.setdefault("confusion", False)  # pickled by a version without the confusion matrix
        state.setdefault("_cm", None)
        self.__dict__.update(state)

    # -- merge ---------------------------------------------------------------------------------------
    def merge(self, other: "Evaluator") -> "Evaluator":
        """Add `other`'s state to this one (in place) and return `self`.

        Merging is associative and commutative up to ~1e-16 relative on the float totals, so any
        reduction tree over any split of the rows gives the same `result()`."""
        if not isinstance(other, Evaluator):
            raise TypeError(f"can only merge another Evaluator, got {type(other).__name__}")
        diff = self._differences(other)
        if diff:
            raise ValueError(f"cannot merge evaluators with different configurations "
                             f"({'; '.join(diff)})")
        self._ints += other._ints
        _two_sum_into(self._hi, self._lo, other._hi, other._lo)
        if self._cm is not None:
            self._cm += other._cm
        return self

    # -- save / load ---------------------------------------------------------------------------------
    def save(self, path, info: dict | None = None) -> None:
        """Write the state to `path` as a `.npz` file that [`load`][numbaxent.evaluate.Evaluator.load]
        reads without pickle.

        Members (format version 1; every one a plain numeric or string array):

            format            str    "numbaxent.Evaluator"
            version           int64  1
            num_classes       int64  C
            ignore_index      int64
            label_smoothing   float64
            topk              int64 (K,)
            calibration_bins  int64  B
            confusion         bool
            weight            (C,) class weights in their dtype, or (0,) float64 for none
            ints              int64 (5 + K + 3C + 2B,)  counts (see _int_slices)
            hi, lo            float64 (4 + C + B,)      float totals and their two-sum error terms
            matrix            int64 (C, C), or (0, 0) without confusion
            info              str    JSON object (info: free-form provenance, e.g. the rows)

        The file is written to a temporary name in the same directory and renamed into place, so a
        reader never sees a partly written state. `info` must be JSON-serialisable.
        """
        import json

        w = self._weight_src if self.weight is not None else np.zeros(0)
        if w.dtype.kind not in "iuf" or not w.dtype.isnative:
            w = self.weight  # e.g. bfloat16: exactly representable in float64
        members = dict(
            format=np.array(STATE_FORMAT), version=np.array(STATE_VERSION, dtype=np.int64),
            num_classes=np.array(self.num_classes, dtype=np.int64),
            ignore_index=np.array(self.ignore_index, dtype=np.int64),
            label_smoothing=np.array(self.label_smoothing, dtype=np.float64),
            topk=np.array(self.topk, dtype=np.int64),
            calibration_bins=np.array(self.calibration_bins, dtype=np.int64),
            confusion=np.array(self.confusion), weight=np.asarray(w),
            ints=self._ints, hi=self._hi, lo=self._lo,
            matrix=self._cm if self._cm is not None else np.zeros((0, 0), dtype=np.int64),
            info=np.array(json.dumps(info or {})))
        path = os.fspath(path)
        fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".npz",
                                   dir=os.path.dirname(os.path.abspath(path)))
        try:
            with os.fdopen(fd, "wb") as f:
                np.savez_compressed(f, **members)
            os.replace(tmp, path)
        except BaseException:
            try:
                os.unlink(tmp)
            except OSError:
                pass
            raise

    @classmethod
    def load(cls, path) -> "Evaluator":
        """Read a state written by [`save`][numbaxent.evaluate.Evaluator.save].

        Nothing in the file is executed: it is read with `np.load(allow_pickle=False)` and every
        member's dtype and shape is checked. A missing, truncated, corrupt or foreign file, an
        object (pickle) member or an unknown format version raises ValueError with one line naming
        the file (FileNotFoundError for a missing one)."""
        return _read_state(path)[0]

    # -- update --------------------------------------------------------------------------------------
    def _check(self, logits, target):
        """Validate one chunk; returns (x3, flat int64 targets, compute dtype, target shape)."""
        x = _prepare.as_array(logits, "logits")
        if x.dtype.kind == "f" and (not x.dtype.isnative or x.dtype.itemsize not in (2, 4, 8)):
            # non-native byte order, or long double: one converted copy of the chunk
            x = x.astype(np.float64 if x.dtype.itemsize > 8 else x.dtype.newbyteorder("="))
        try:
            storage, compute = _prepare.logits_dtype(x)
        except TypeError:
            raise TypeError(f"Evaluator.update: logits must be floating point (float16, bfloat16, "
                            f"float32 or float64), got {x.dtype}") from None
        if x.ndim == 0:
            raise ValueError("Evaluator.update: logits must have a class dimension: shape (C,), "
                             "(N, C) or (N, C, d1, ..., dk), got a 0-d array")
        C = x.shape[0] if x.ndim == 1 else x.shape[1]
        if C != self.num_classes:
            raise ValueError(f"Evaluator.update: logits of shape {x.shape} have {C} classes, the "
                             f"evaluator was made for num_classes={self.num_classes}")
        t = _prepare.as_array(target, "target")
        expect = () if x.ndim == 1 else (x.shape[0],) + x.shape[2:]
        if t.shape != expect:
            raise ValueError(f"Evaluator.update: logits of shape {x.shape} need targets of shape "
                             f"{expect}, got targets of shape {t.shape}")
        if t.dtype.kind not in "iu":
            raise TypeError(f"Evaluator.update: targets must be integer class indices, got dtype "
                            f"{t.dtype}")
        N = 1 if x.ndim == 1 else x.shape[0]
        S = math.prod(x.shape[2:])
        transposed = x.ndim == 2 and not x.flags.c_contiguous and x.flags.f_contiguous
        shape3 = (1, C, N) if transposed else (N, C, S)
        xs = x.view(storage) if storage != x.dtype else x
        x3 = _prepare.canonical_view(xs, transposed, shape3)
        if x3 is None:
            x3 = np.ascontiguousarray(xs).reshape(shape3)
        flat = t.reshape(-1)
        if t.dtype == np.uint64 and flat.size and int(flat.max()) > np.iinfo(np.int64).max:
            self._bad_target(t, int(np.argmax(flat > np.iinfo(np.int64).max)))
        tgt = np.ascontiguousarray(flat, dtype=np.int64)
        return x3, tgt, compute, t

    _row_offset = 0  # rows before this evaluator's first one (set by numbaxent.dask per block)

    def _bad_target(self, t, r, first=None):
        """Raise the IndexError for flat target position `r` of chunk `t`, naming its row
        counted over everything seen (`(row, j1, ..., jk)` for K-dimensional targets); `first`:
        the rows added before the chunk (default: those in the state)."""
        first = self._row_offset + (int(self._ints[4]) if first is None else first)
        if t.ndim <= 1:
            row = first + r
        else:
            idx = np.unravel_index(r, t.shape)
            row = (first + int(idx[0]),) + tuple(int(i) for i in idx[1:])
        raise IndexError(f"Evaluator.update: target {int(t.reshape(-1)[r])} at row {row} is out of "
                         f"range: class indices must be in [0, {self.num_classes}) or equal "
                         f"ignore_index ({self.ignore_index})")

    def update(self, logits, target) -> "Evaluator":
        """Add a chunk of logits and their targets; returns `self`.

        Parameters
        ----------
        logits : array_like
            Shape (C,), (N, C) or (N, C, d1, ..., dk), of any float dtype (float16, bfloat16,
            float32, float64, either byte order).
        target : array_like of int
            Class indices of shape (), (N,) or (N, d1, ..., dk), of any integer dtype.

        Raises
        ------
        TypeError
            Non-float logits, non-integer targets.
        ValueError
            Wrong class count or target shape.
        IndexError
            A target outside `[0, C)` that is not `ignore_index`; the message gives its row counted
            over everything seen. A failed update changes nothing.
        """
        return self._update(logits, target, None)

    def _update(self, logits, target, cap) -> "Evaluator":
        """`update` of the logits soft-capped to `cap * tanh(x / cap)` (`cap=None`: as
        they are); the cap is applied by the kernel as it reads each logit."""
        x3, tgt, compute, t = self._check(logits, target)
        if tgt.shape[0]:
            self._fold(self._compute(x3, tgt, compute, t, cap, None, int(self._ints[4])))
        return self

    # chunks in flight when update_chunks asks for the next one: the threads then have the pieces
    # of the two chunks after the oldest to work on while the calling thread waits to fold it
    # (measured on 2 busy cores, medians of two runs: 2 gave 87% and 94% of the in-memory update's
    # speed, 3 gave 96% and 100%; in `numbaxent eval` under that load, this pipeline and one
    # `update` per chunk were within the noise of each other)
    IN_FLIGHT = 3

    def update_chunks(self, chunks, callback=None) -> "Evaluator":
        """Add every `(logits, target)` pair of the iterable `chunks`, in order; returns `self`.

        The result is that of `for x, y in chunks: self.update(x, y)` (counts equal, float totals
        within their rounding, ~1e-15 relative), but the threads never wait for each other between
        chunks: each chunk is cut into one piece of rows per thread (`numba.get_num_threads()` of
        the calling thread), every thread takes the next piece as soon as it is done with one
        (pieces of the next chunk included), and the calling thread adds the pieces' figures to
        the state in row order (so the result does not depend on which thread took which piece).
        At most `IN_FLIGHT` (3) chunks are in flight: the iterable may reuse or unmap the memory
        of a chunk once the third chunk after it is asked for
        (`numbaxent.io.row_chunks(..., keep=Evaluator.IN_FLIGHT - 1)` does that).
        A chunk too small to cut (fewer rows than threads, or a transposed 2-D array) is
        evaluated as `update` does, after the pieces before it.

        `callback(rows)`, if given, is called with each chunk's first-axis length once it is added.
        Errors are those of `update` (or of the iterable), raised for the first bad chunk after
        every chunk before it was added (and nothing of it or later chunks).
        """
        from concurrent.futures import ThreadPoolExecutor

        from ._parallel import MIN_PARALLEL_ELEMENTS, num_threads

        T = num_threads()
        pending = []  # per chunk in flight: (first-axis rows, [piece futures])
        pool = ThreadPoolExecutor(T, thread_name_prefix="numbaxent-eval") if T > 1 else None

        def fold_oldest():
            rows, futures = pending.pop(0)
            parts = [f.result() for f in futures]  # every piece first: all of a chunk or nothing
            for part in parts:
                self._fold(part)
            if callback is not None:
                callback(rows)

        it = iter(chunks)
        try:
            while True:
                try:
                    logits, target = next(it)
                    x3, tgt, compute, t = self._check(logits, target)
                except StopIteration:
                    break
                except Exception:  # a bad chunk, or the iterable failing: add what came before
                    while pending:
                        fold_oldest()
                    raise
                N, _, S = x3.shape
                rows = 1 if t.ndim == 0 else t.shape[0]
                # pieces: one per thread, each worth handing to a thread (and a cut along the rows
                # only: a transposed 2-D array is (1, C, N))
                n = 0 if pool is None or N != rows else min(T, N, x3.size // MIN_PARALLEL_ELEMENTS)
                if n < 2:
                    while pending:
                        fold_oldest()
                    if tgt.shape[0]:
                        self._fold(self._compute(x3, tgt, compute, t, None, None,
                                                 int(self._ints[4])))
                    if callback is not None:
                        callback(rows)
                    continue
                first = int(self._ints[4]) + sum(r for r, _ in pending)
                cuts = [N * i // n for i in range(n + 1)]
                pending.append((rows, [
                    pool.submit(self._compute, x3[a:b], tgt[a * S:b * S], compute, t[a:b], None,
                                1, first + a) for a, b in zip(cuts[:-1], cuts[1:])]))
                while len(pending) >= self.IN_FLIGHT:  # the next chunk is asked for after this
                    fold_oldest()
            while pending:
                fold_oldest()
        finally:
            if pool is not None:
                pool.shutdown(wait=True, cancel_futures=True)
        return self

    def _compute(self, x3, tgt, compute, t, cap, threads, first):
        """Every figure of one checked chunk (`_check`'s `x3, tgt, compute, t`, at least one
        target), without touching the state: what `_fold` adds. `threads`: None for
        `numba.get_num_threads()`, 1 to compute on the calling thread (`update_chunks`'s
        workers). `first`: the rows added before the chunk (for an error message)."""
        from . import _kernels, _metrics
        from ._parallel import run_tasks

        R = tgt.shape[0]
        C = self.num_classes
        w, wsum = self._class_weights(compute)
        first_bad, wtotal, n_valid = _kernels.check_targets(tgt, w, np.ones(1), self.ignore_index,
                                                            C)
        if first_bad >= 0:
            self._bad_target(t, int(first_bad), first)
        ks = np.asarray(self.topk, dtype=np.int64)
        kmax = min(int(ks[-1]), C)
        counts = (R, R - n_valid, n_valid, 1 if t.ndim == 0 else t.shape[0])
        if _api.use_columns(x3.shape):  # few classes or K-dim: vectorised across rows
            return ("cols", counts, wtotal, ks, kmax) + self._compute_cols(
                x3, tgt, w, wsum, cap, kmax, threads)
        loss = np.empty(R)
        nll = np.empty(R)
        ent = np.empty(R)
        conf = np.empty(R)
        rank = np.empty(R, dtype=np.int64)
        pred = np.empty(R, dtype=np.int64)
        args = (x3,) + _kernels.chunk_variant(x3.dtype, C, _kernels.FORWARD, False, self.label_smoothing, cap) + (
            tgt, w, wsum, self.ignore_index, self.label_smoothing, cap, kmax, loss, nll, ent, conf, rank, pred)
        if threads == 1:
            _metrics.metrics_rows(0, R, *args)
        else:
            run_tasks(_metrics.metrics_rows, R, x3.size, *args)
        sums = np.array([np.sum(loss), wtotal, np.sum(nll), np.sum(ent)])  # pairwise, float64
        return ("rows", counts, sums, ks, tgt, rank, pred, loss, conf)

    def _fold(self, part) -> None:
        """Add a `_compute` result to the state. Everything here is exact (counts) or a sum in
        a fixed order, so folding the pieces of a chunk in row order gives the same state
        whichever threads computed them."""
        from . import _metrics

        kind, counts = part[0], part[1]
        ints = self._ints
        if kind == "cols":
            _, _, wtotal, ks, kmax, tally, pairs, fp = part
            chunk = np.empty(self._hi.shape[0])
            _metrics.tallies_into_state(tally, pairs, fp, ks, kmax, self.calibration_bins, ints,
                                        self._cm if self._cm is not None else self._NO_MATRIX, chunk)
            chunk[1] = wtotal
            _two_sum_into(self._hi, self._lo, chunk, 0.0)
            ints[[0, 1, 2, 4]] += counts
            return
        _, _, sums, ks, tgt, rank, pred, loss, conf = part
        # per-class, per-bin and top-k totals go straight into the state (no O(C) work per chunk):
        # counts are exact, and each class's float total is a sum in row order whatever the chunking
        si, sf = self._int_slices(), self._float_slices()
        hi = self._hi
        _, n_nonfinite = _metrics.metrics_reduce(
            tgt, rank, pred, loss, conf, ks, ints[si["cls_count"]], ints[si["cls_correct"]],
            ints[si["cls_pred"]], hi[sf["cls_loss"]], ints[si["topk"]], ints[si["bin_count"]],
            hi[sf["bin_conf"]], ints[si["bin_correct"]])
        ints[[0, 1, 2, 4]] += counts
        ints[3] += n_nonfinite
        _two_sum_into(hi[:4], self._lo[:4], sums, 0.0)
        if self._cm is not None:
            self._add_confusion(tgt, pred)

    GROUP_SLACK = 4  # a group of column blocks holds >= this many rows per float it sums
    PAIR_TALLY_MAX_C = 64  # up to this many classes the kernel tallies (target, prediction) pairs
    _NO_MATRIX = np.zeros((0, 0), dtype=np.int64)

    def _compute_cols(self, x3, tgt, w, wsum, cap, kmax, threads):
        """The column kernel's share of `_compute`: `(tally, pairs, fp)`, every count and sum
        of the chunk folded by the kernel into per-task tallies and per-group float sums, which
        `_fold` adds (counts exactly, floats in group order: groups depend on C and the bin
        count, not on the thread count)."""
        from . import _kernels, _metrics
        from ._parallel import num_threads, run_tasks

        N, C, S = x3.shape
        B = self.calibration_bins
        nbmax = _kernels.column_block_rows(C, S)
        nblocks = _kernels.column_count(N, S, nbmax)
        n_float = self._hi.shape[0]
        # a group's float sums cost far less than its rows' work, and all of them together take
        # about 8 * rows / GROUP_SLACK bytes at most
        group = max(1, -(-self.GROUP_SLACK * n_float // nbmax))
        ngroups = -(-nblocks // group)
        T = min(threads or num_threads(), ngroups)
        # one increment per row for the per-class counts, hits and predictions: the C x C pairs
        # (the confusion matrix), when that is small or asked for anyway
        use_pairs = self._cm is not None or C <= self.PAIR_TALLY_MAX_C
        length = _metrics.tally_layout(C, B, kmax, use_pairs)[1]
        tally = np.empty((T, length), dtype=np.int64)
        pairs = np.empty((T, C, C) if use_pairs else (T, 0, 0), dtype=np.int64)
        fp = np.empty((ngroups, n_float))
        run_tasks(_metrics.metrics_cols, T, x3.size, T, group, x3, _kernels.transpose_variant(x3.dtype, C, S), tgt, w,
                  _kernels.uniform_weights(w), wsum, self.ignore_index, self.label_smoothing, cap, kmax, tally, pairs,
                  fp)
        return tally, pairs, fp

    def update_hidden(self, hidden, weight, target, bias=None, softcap=None,
                      chunk_size=None) -> "Evaluator":
        r"""Add the rows whose logits are `hidden @ weight.T + bias`, without forming them all.

        The result equals [`update`][numbaxent.evaluate.Evaluator.update]`(hidden @ weight.T + bias,
        target)` (within the rounding of the matrix product): the logits are formed `chunk_size`
        rows at a time into one reused buffer (`np.matmul(..., out=)`, BLAS) and each chunk goes
        through `update`'s one-pass kernel. Rows whose target is `ignore_index` are counted but never multiplied out.

        Parameters
        ----------
        hidden : ndarray
            Final hidden states of shape (N, H) or (..., H): float16, bfloat16 (`ml_dtypes`),
            float32 or float64. Leading axes are flattened into rows (an error message then counts
            rows in that order).
        weight : ndarray
            The output layer, shape (V, H) with `V == num_classes`, same dtypes.
        target : array_like of int
            Class indices of shape `hidden.shape[:-1]`.
        bias : array_like, optional
            Output bias of shape (V,).
        softcap : float, optional
            Score the soft-capped logits $s \tanh(x / s)$ (with $s$ = `softcap`; Gemma 2), as
            [`cross_entropy`][numbaxent.cross_entropy] does; the kernel caps each logit as it reads
            it.
        chunk_size : int, optional
            Rows per chunk. Default: as many as fit `HIDDEN_CHUNK_BYTES` (64 MiB) of logits,
            `max(1, 64 MiB // (V * itemsize))`.

        Notes
        -----
        Precision: logits are computed in float64 when `hidden` or `weight` is float64, else in
        float32 (half-precision inputs are converted to float32 one chunk of `hidden` at a time;
        a `weight` not already in the compute dtype is converted once per call, `V * H`
        values: convert it yourself when calling many times).

        Memory beyond the inputs: the logits buffer (`chunk_size x V`), a converted `hidden`
        chunk for half inputs or when rows are skipped, an int64 copy of the targets, and the
        converted `weight` when it needs one.

        Raises
        ------
        TypeError
            Non-float hidden/weight, non-integer targets.
        ValueError
            Hidden sizes, vocabulary vs `num_classes`, target shape or bias shape that do not match.
        IndexError
            An out-of-range target; all targets are checked before any row is added, so a failed
            call changes nothing.
        """
        name = "Evaluator.update_hidden"
        h = _prepare.as_array(hidden, "hidden")
        w = _prepare.as_array(weight, "weight")
        for a, what in ((h, "hidden"), (w, "weight")):
            if not _is_float(a.dtype):
                raise TypeError(f"{name}: {what} must be float16, bfloat16, float32 or float64, "
                                f"got {a.dtype}")
        if h.ndim == 0:
            raise ValueError(f"{name}: hidden must have shape (N, H) or (..., H), got a 0-d array")
        if w.ndim != 2:
            raise ValueError(f"{name}: weight must have shape (V, H) (one row per class), got "
                             f"shape {w.shape}")
        H, V = h.shape[-1], w.shape[0]
        if w.shape[1] != H:
            raise ValueError(f"{name}: hidden size mismatch: hidden of shape {h.shape} has "
                             f"H={H}, weight of shape {w.shape} has H={w.shape[1]}")
        if V != self.num_classes:
            raise ValueError(f"{name}: weight of shape {w.shape} gives {V} classes, the evaluator "
                             f"was made for num_classes={self.num_classes}")
        t = _prepare.as_array(target, "target")
        if t.shape != h.shape[:-1]:
            raise ValueError(f"{name}: hidden of shape {h.shape} needs targets of shape "
                             f"{h.shape[:-1]}, got targets of shape {t.shape}")
        if t.dtype.kind not in "iu":
            raise TypeError(f"{name}: targets must be integer class indices, got dtype {t.dtype}")
        compute = hidden_compute_dtype(h.dtype, w.dtype)
        b = None
        if bias is not None:
            ba = _prepare.as_array(bias, "bias")
            if not (_is_float(ba.dtype) or ba.dtype.kind in "iu"):
                raise TypeError(f"{name}: bias must be a real array, got dtype {ba.dtype}")
            if ba.shape != (V,):
                raise ValueError(f"{name}: bias must have shape ({V},) (one per class), got shape "
                                 f"{ba.shape}")
            b = np.asarray(ba, dtype=compute)
        cap = _prepare.check_softcap(softcap)
        if chunk_size is not None and (isinstance(chunk_size, (bool, np.bool_)) or not isinstance(
                chunk_size, (int, np.integer)) or chunk_size < 1):
            raise ValueError(f"{name}: chunk_size must be a positive integer or None, got "
                             f"{chunk_size!r}")
        # every target is checked before any row is added, so a failed call changes nothing; the
        # int64 copy is writable, so every chunk's kernels see one argument type (compiled once)
        flat = t.reshape(-1)
        if t.dtype == np.uint64 and flat.size and int(flat.max()) > np.iinfo(np.int64).max:
            self._bad_target(flat, int(np.argmax(flat > np.iinfo(np.int64).max)))
        tgt = np.array(flat, dtype=np.int64)
        N = tgt.shape[0]
        if N == 0:
            return self
        from . import _kernels

        first_bad, _, _ = _kernels.check_targets(tgt, self._class_weights(compute)[0], np.ones(1),
                                                 self.ignore_index, V)
        if first_bad >= 0:
            self._bad_target(flat, int(first_bad))
        h2 = h if h.ndim == 2 else h.reshape(N, H)
        wt = (w if w.dtype == compute else np.asarray(w, dtype=compute)).T
        kept = np.flatnonzero(tgt != self.ignore_index)
        n_kept = kept.shape[0]
        skip = n_kept < N  # ignored rows are gathered out: no matrix-product work for padding
        step = min(chunk_size or hidden_chunk_rows(V, compute.itemsize), max(n_kept, 1))
        buf = np.empty((step, V), dtype=compute)
        hbuf = np.empty((step, H), dtype=compute) if h.dtype != compute else None
        for a in range(0, n_kept, step):
            stop = min(a + step, n_kept)
            rows = kept[a:stop] if skip else slice(a, stop)
            hc = h2[rows]
            if hbuf is not None:  # half (or non-native) rows: converted one chunk at a time
                hb = hbuf[:stop - a]
                hb[...] = hc
                hc = hb
            x = buf[:stop - a]
            np.matmul(hc, wt, out=x)
            if b is not None:
                x += b
            self._update(x, tgt[rows], cap)
        # the ignored rows, counted as update() counts them (their logits are never read)
        n_ign = N - n_kept
        self._ints[[0, 1, 4]] += n_ign
        return self

    def _add_confusion(self, tgt, pred):
        """Count the chunk's (target, prediction) pairs into the confusion matrix. `pred` is the
        kernel's argmax (lowest index among ties, -1 for ignored rows)."""
        C = self.num_classes
        keep = pred >= 0
        pairs = tgt[keep] * C + pred[keep]
        flat = self._cm.reshape(-1)
        if pairs.shape[0] >= C * C // 4:  # dense: one O(rows + C^2) bincount
            flat += np.bincount(pairs, minlength=C * C)
        else:  # few rows for many classes: do not touch all C^2 cells per chunk
            np.add.at(flat, pairs, 1)

    def _class_weights(self, compute):
        """(class weights in the compute dtype, their float64 sum), cached per dtype."""
        cache = self.__dict__.setdefault("_w_cache", {})
        key = np.dtype(compute).str
        if key not in cache:
            w = (np.ones(self.num_classes, dtype=compute) if self.weight is None
                 else np.ascontiguousarray(self._weight_src, dtype=compute))
            cache[key] = (w, float(np.sum(w, dtype=np.float64)))
        return cache[key]

    # -- result --------------------------------------------------------------------------------------
    def result(self) -> EvalResult:
        """The figures for everything seen so far (see
        [`EvalResult`][numbaxent.evaluate.EvalResult])."""
        v = self._hi + self._lo
        si, sf = self._int_slices(), self._float_slices()
        n_seen, n_ignored, n_valid, n_nonfinite = (int(i) for i in self._ints[:4])
        loss_sum, wtotal, nll_sum, ent_sum = (float(f) for f in v[:4])
        nll = float(_quiet_divide(nll_sum, n_valid))
        count = self._ints[si["cls_count"]].copy()
        correct = self._ints[si["cls_correct"]].copy()
        predicted = self._ints[si["cls_pred"]].copy()
        cls_loss = v[sf["cls_loss"]].copy()
        w = np.ones(self.num_classes) if self.weight is None else self.weight
        with np.errstate(divide="ignore", invalid="ignore"):
            per_class = dict(
                count=count, loss_sum=cls_loss, loss=cls_loss / (count * w),
                accuracy=correct / count, predicted=predicted, precision=correct / predicted)
            present = count > 0
            balanced = float(np.mean(correct[present] / count[present])) if present.any() \
                else float("nan")
        bcount = self._ints[si["bin_count"]].copy()
        bcorrect = self._ints[si["bin_correct"]].copy()
        bconf = v[sf["bin_conf"]].copy()
        n_binned = int(bcount.sum())
        with np.errstate(divide="ignore", invalid="ignore"):
            gaps = np.abs(bcorrect - bconf)
            ece = float(np.sum(gaps) / n_binned) if n_binned else float("nan")
            nonempty = bcount > 0
            mce = float(np.max(gaps[nonempty] / bcount[nonempty])) if n_binned else float("nan")
            calibration = dict(edges=np.linspace(0.0, 1.0, self.calibration_bins + 1),
                               count=bcount, confidence=bconf / bcount,
                               accuracy=bcorrect / bcount)
        cm = iou = mean_iou = None
        if self._cm is not None:
            cm = self._cm.copy()
            inter = np.diag(cm).astype(np.float64)
            union = cm.sum(axis=1) + cm.sum(axis=0) - np.diag(cm)
            with np.errstate(divide="ignore", invalid="ignore"):
                iou = inter / union
            mean_iou = float(np.mean(iou[union > 0])) if (union > 0).any() else float("nan")
        return EvalResult(
            loss=float(_quiet_divide(loss_sum, wtotal)),
            loss_sum=loss_sum,
            weight_sum=wtotal,
            nll=nll,
            perplexity=float(np.exp(nll)) if not math.isnan(nll) else float("nan"),
            accuracy={k: float(_quiet_divide(c, n_valid)) for k, c in zip(self.topk,
                                                                  self._ints[si["topk"]])},
            entropy=float(_quiet_divide(ent_sum, n_valid)),
            confidence=float(_quiet_divide(bconf.sum(), n_binned)),
            ece=ece,
            mce=mce,
            calibration=calibration,
            per_class=per_class,
            balanced_accuracy=balanced,
            n_seen=n_seen,
            n_ignored=n_ignored,
            n_valid=n_valid,
            n_nonfinite=n_nonfinite,
            confusion=cm,
            iou=iou,
            mean_iou=mean_iou,
        )


def _read_state(path):
    """`(Evaluator, info dict)` from a state file (see `Evaluator.save`)."""
    import json

    path = os.fspath(path)
    label = f"{path}: not a numbaxent evaluator state"
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path}: no such file")
    with open(path, "rb") as f:
        magic = f.read(6)
    if magic == b"\x93NUMPY":
        raise ValueError(f"{label} (a single .npy array, not a .npz state file)")
    if magic[:2] != b"PK":  # np.load would take anything else for a pickle (and refuse it)
        raise ValueError(f"{label} ({'an empty file' if not magic else 'not a .npz (zip) file'})")
    try:
        npz = np.load(path, allow_pickle=False)
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as exc:
        raise ValueError(f"{label} (cannot read it as .npz: {_why(exc)})") from None
    if not isinstance(npz, np.lib.npyio.NpzFile):
        raise ValueError(f"{label} (a single .npy array, not a .npz state file)")
    with npz:
        def get(name, kinds, ndim):
            if name not in npz.files:
                raise ValueError(f"{label} (no '{name}' member)")
            try:
                a = npz[name]  # raises ValueError for an object (pickled) member
            except (OSError, ValueError, EOFError, KeyError, zipfile.BadZipFile, zlib.error) as exc:
                raise ValueError(f"{label} (member '{name}' is unreadable: {_why(exc)})") from None
            if a.dtype.kind not in kinds or a.ndim != ndim:
                raise ValueError(f"{label} (member '{name}' has dtype {a.dtype} and shape "
                                 f"{a.shape})")
            return a

        fmt = get("format", "U", 0)
        if str(fmt) != STATE_FORMAT:
            raise ValueError(f"{label} (its format is {str(fmt)!r})")
        version = int(get("version", "iu", 0))
        if version != STATE_VERSION:
            raise ValueError(f"{path}: evaluator state format version {version} is not supported "
                             f"(this numbaxent reads version {STATE_VERSION}); use the numbaxent "
                             f"version that wrote it")
        settings = dict(num_classes=int(get("num_classes", "iu", 0)),
                        ignore_index=int(get("ignore_index", "iu", 0)),
                        label_smoothing=float(get("label_smoothing", "f", 0)),
                        topk=tuple(int(k) for k in get("topk", "iu", 1)),
                        calibration_bins=int(get("calibration_bins", "iu", 0)),
                        confusion=bool(get("confusion", "b", 0)))
        weight = get("weight", "iuf", 1)
        state = dict(ints=get("ints", "iu", 1), hi=get("hi", "f", 1), lo=get("lo", "f", 1),
                     matrix=get("matrix", "iu", 2))
        # the shapes the settings imply, checked before anything of that size is allocated (a
        # corrupt class count must not become a huge allocation)
        C, B, K = (settings["num_classes"], settings["calibration_bins"],
                   len(set(settings["topk"])))
        n_float = Evaluator._N_FLOAT_SCALARS + C + B
        expect = dict(ints=(Evaluator._N_INT_SCALARS + K + 3 * C + 2 * B,), hi=(n_float,),
                      lo=(n_float,), matrix=(C, C) if settings["confusion"] else (0, 0))
        for name, shape in expect.items():
            if state[name].shape != shape:
                raise ValueError(f"{path}: corrupt evaluator state (member '{name}' has shape "
                                 f"{state[name].shape}, its settings need {shape})")
        try:
            ev = Evaluator(weight=weight if weight.shape[0] else None, **settings)
        except (TypeError, ValueError) as exc:
            raise ValueError(f"{path}: invalid evaluator settings ({exc})") from None
        ev._ints[...], ev._hi[...], ev._lo[...] = state["ints"], state["hi"], state["lo"]
        if ev._cm is not None:
            ev._cm[...] = state["matrix"]
        try:
            info = json.loads(str(get("info", "U", 0)))
        except json.JSONDecodeError as exc:
            raise ValueError(f"{path}: corrupt evaluator state (info: {exc})") from None
    n_seen, n_ignored, n_valid = (int(v) for v in ev._ints[:3])
    if (ev._ints < 0).any() or n_seen != n_ignored + n_valid or \
            (ev._cm is not None and ((ev._cm < 0).any() or int(ev._cm.sum()) != n_valid)):
        raise ValueError(f"{path}: corrupt evaluator state (inconsistent counts)")
    return ev, info if isinstance(info, dict) else {}


def _why(exc) -> str:
    return " ".join(str(exc).split()) or type(exc).__name__


def warmup_variants():
    """(label, thunk) pairs compiling the evaluator's kernels (used by `numbaxent warmup`)."""
    rng = np.random.default_rng(0)
    for name in ("float32", "float64", "float16"):
        # 4 classes take the column kernel with blocks transposed in registers, K-dim input the
        # column kernel without (`_columns.transpose_variant`), 48 classes the row kernel, 6200
        # float32/float64 classes its variant for long rows (`_rows.chunk_variant`)
        xs = [rng.standard_normal(shape).astype(name) for shape in ((3, 4), (3, 4, 2), (3, 48), (3, 6200))]

        def run(xs=xs):
            for x in xs:
                t = np.array([0, 3, -100])
                Evaluator(x.shape[1], label_smoothing=0.1, topk=(1, 2)).update(
                    x, np.stack([t, t[::-1]], axis=1) if x.ndim == 3 else t)

        yield f"{name:<8} evaluator", run
