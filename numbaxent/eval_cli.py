"""`numbaxent eval`, `eval-hidden` and `merge`: stream-evaluate saved logits (or the logits of
saved hidden states) against targets.

    numbaxent eval LOGITS [LOGITS ...] TARGETS [TARGETS ...] [--rows START:STOP]
                   [--save-state FILE] [--confusion] [--weight FILE] [--ignore-index I]
                   [--label-smoothing E] [--topk 1,5] [--calibration-bins B] [--chunk-rows R]
                   [--threads T] [--scheduler ADDRESS] [--json] [--per-class]
                   [--progress | --no-progress]
    numbaxent eval-hidden HIDDEN [HIDDEN ...] WEIGHT TARGETS [TARGETS ...] [--bias FILE]
                   [--softcap S] [every option of eval]
    numbaxent merge STATE [STATE ...] [--json] [--per-class]

LOGITS and TARGETS are `.npy` files (memory-mapped, read in row chunks), `file.npz:member`
(uncompressed members are memory-mapped, compressed ones are decompressed as a stream) or Zarr
stores (`store.zarr` or `store.zarr:component`), which go through Dask (`numbaxent.dask`).
Several logits files are followed by as many target files, or two quoted glob patterns are paired in
sorted order. `--rows START:STOP` evaluates a half-open range of the rows (counted over the files
in order) and `--save-state` writes the evaluator state, which `merge` combines (SLURM/PBS array
jobs). `--scheduler ADDRESS` evaluates on an existing `distributed` cluster (workers memory-map
`.npy` files from a shared file system; nothing goes through the client).

`eval-hidden` reads a language model's final hidden states (N, H) and its output layer WEIGHT
(V, H) instead of logits, and forms the logits `HIDDEN @ WEIGHT.T + BIAS` a chunk at a time
(`numbaxent.evaluate.Evaluator.update_hidden`): everything else is `eval`'s code path.

Exit status: 0 on success; 1 with a one-line error on stderr for unusable input (missing, truncated
or corrupt file, mismatched lengths, wrong dtype, out-of-range target, a state file that is not one
or has other settings); 2 for bad options; 130 when interrupted (Ctrl-C).
"""
from __future__ import annotations

import argparse
import glob
import json
import math
import os
import sys
import time
import zipfile
from dataclasses import dataclass, field

import numpy as np

from ._prepare import is_real
from .io import (DEFAULT_CHUNK_BYTES, MAX_CHUNK_ROWS, DaskStore, InputError, RawArray, bfloat16_view,
                 default_chunk_rows, open_array, read_whole, row_chunks, shape_dtype, split_member)

__all__ = ["main", "hidden_main", "merge_main"]

# -- options -------------------------------------------------------------------------------------------
def _parse_topk(text: str):
    try:
        ks = tuple(int(k) for k in text.split(",") if k.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") \
            from None
    if not ks or min(ks) < 1:
        raise argparse.ArgumentTypeError(f"top-k values must be integers >= 1, got {text!r}")
    return ks


def _positive_int(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if v < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return v


def _parse_rows(text: str):
    """`START:STOP` (either may be left out) -> (start, stop or None)."""
    a, sep, b = text.partition(":")
    try:
        start = int(a) if a.strip() else 0
        stop = int(b) if b.strip() else None
    except ValueError:
        start = stop = -1
    if not sep or start < 0 or (stop is not None and stop < 0):
        raise argparse.ArgumentTypeError(f"expected START:STOP with integers >= 0 (a half-open "
                                         f"range of rows), got {text!r}")
    if stop is not None and stop <= start:
        raise argparse.ArgumentTypeError(f"empty range {text!r}: STOP must be greater than START")
    return start, stop


def _positive_float(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        v = float("nan")
    if not (v > 0 and math.isfinite(v)):
        raise argparse.ArgumentTypeError(f"expected a finite number > 0, got {text!r}")
    return v


def _parser(hidden: bool = False) -> argparse.ArgumentParser:
    """`eval`'s options; `hidden=True`: `eval-hidden`'s (the same, plus the output layer)."""
    what = "hidden-state" if hidden else "logits"
    p = argparse.ArgumentParser(
        prog="numbaxent eval-hidden" if hidden else "numbaxent eval",
        usage=("numbaxent eval-hidden [options] HIDDEN [HIDDEN ...] WEIGHT TARGETS [TARGETS ...]"
               if hidden else
               "numbaxent eval [options] LOGITS [LOGITS ...] TARGETS [TARGETS ...]"),
        description=("Stream-evaluate a language model from its final hidden states: the logits "
                     "HIDDEN @ WEIGHT.T (+ BIAS) are formed chunk by chunk (64 MiB at a time by "
                     "default), never stored, and scored as 'numbaxent eval' scores saved logits."
                     if hidden else
                     "Stream-evaluate saved logits against class-index targets: PyTorch-exact "
                     "cross-entropy (mean and sum), perplexity, top-k accuracy, entropy, "
                     "calibration error, per-class figures and (--confusion) the confusion matrix "
                     "and IoU, in one pass over the logits."),
        epilog=("Inputs: FILE.npy, FILE.npz:MEMBER, STORE.zarr[:COMPONENT]. "
                + ("HIDDEN is (N, H) float16/bfloat16/float32/float64 (bfloat16 as saved by "
                   "np.save with ml_dtypes: dtype |V2), WEIGHT (V, H), TARGETS (N,). Several "
                   "HIDDEN files are followed by one WEIGHT and as many TARGETS files, or give "
                   "'hidden-*.npy' WEIGHT 'targets-*.npy' (quoted glob patterns, paired in sorted "
                   "order). --weight is the class weights of the loss, as in 'numbaxent eval'. "
                   if hidden else
                   "Several logits files are followed by as many target files (paired in order), "
                   "or give two quoted glob patterns ('logits-*.npy' 'targets-*.npy'), paired in "
                   "sorted order. ")
                + "Exit status: 0 ok, 1 unusable input (one-line error), 2 bad options, 130 "
                  "interrupted."))
    if hidden:
        p.set_defaults(hidden=True)
        p.add_argument("files", nargs="+", metavar="FILE",
                       help="the hidden-state file(s) (N, H), then the output layer WEIGHT "
                            "(V, H), then as many target files (N,), any integer dtype")
        p.add_argument("--bias", metavar="FILE",
                       help="output-layer bias (V,): .npy, .npz:MEMBER or a text file of V "
                            "numbers")
        p.add_argument("--softcap", type=_positive_float, metavar="S",
                       help="score the soft-capped logits S * tanh(logits / S) (Gemma 2)")
    else:
        p.add_argument("files", nargs="+", metavar="FILE",
                       help="the logits file(s) (N, C[, d1..dk]), any float dtype, then as many "
                            "target files (N[, d1..dk]), any integer dtype; or two glob patterns")
    p.add_argument("--rows", type=_parse_rows, metavar="START:STOP",
                   help=f"evaluate only rows START to STOP-1 of the first axis (counted over all "
                        f"the {what} files in order; STOP past the end means the end)")
    p.add_argument("--save-state", metavar="FILE",
                   help="also save the evaluator state to FILE (.npz) for 'numbaxent merge'")
    p.add_argument("--confusion", action="store_true",
                   help="keep the C x C confusion matrix: adds mean IoU and per-class IoU (the "
                        "matrix itself is in the --json output)")
    p.add_argument("--weight", metavar="FILE",
                   help="class weights: .npy, .npz:MEMBER or a text file of C numbers")
    p.add_argument("--ignore-index", type=int, default=-100, metavar="I",
                   help="targets equal to I are skipped (default: %(default)s)")
    p.add_argument("--label-smoothing", type=float, default=0.0, metavar="E",
                   help="label smoothing of the loss, in [0, 1] (default: %(default)s)")
    p.add_argument("--topk", type=_parse_topk, default=(1, 5), metavar="K,K",
                   help="top-k accuracies to report (default: 1,5)")
    p.add_argument("--calibration-bins", type=_positive_int, default=15, metavar="B",
                   help="equal-width confidence bins of the calibration error (default: 15)")
    p.add_argument("--chunk-rows", type=_positive_int, metavar="R",
                   help=(f"rows per chunk (default: about {DEFAULT_CHUNK_BYTES >> 20} MiB of "
                         f"logits, at most {MAX_CHUNK_ROWS} rows)" if not hidden else
                         "rows of logits formed at a time (default: as many as fit 64 MiB)")
                        + "; memory use is bounded by the chunk, not the file")
    p.add_argument("--threads", type=_positive_int, metavar="T",
                   help="compute threads (default: all cores; with --scheduler: per task)")
    p.add_argument("--scheduler", metavar="ADDRESS",
                   help="evaluate on an existing Dask distributed cluster: its address "
                        "(tcp://host:8786) or its scheduler file (JSON)")
    _output_options(p)
    g = p.add_mutually_exclusive_group()
    g.add_argument("--progress", dest="progress", action="store_true", default=None,
                   help="always show a progress bar on stderr (needs tqdm)")
    g.add_argument("--no-progress", dest="progress", action="store_false",
                   help="never show a progress bar (default: only when stderr is a terminal)")
    return p


def _output_options(p):
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.add_argument("--per-class", action="store_true",
                   help="add the per-class table to the text output")


def _load_weight(spec: str, what: str = "class weights"):
    path, member = split_member(spec)
    if not os.path.exists(path):
        raise InputError(f"{spec}: no such file")
    with open(path, "rb") as f:
        head = f.read(6)
    if head == b"\x93NUMPY" or head[:4] == b"PK\x03\x04":
        w = np.array(read_whole(bfloat16_view(open_array(spec))))
    else:
        try:
            with open(path) as f:
                text = f.read().replace(",", " ")
            w = np.array([float(v) for v in text.split()])
        except (ValueError, UnicodeDecodeError):
            raise InputError(f"{spec}: not a .npy/.npz file nor whitespace- or comma-separated "
                             f"numbers") from None
    if not is_real(w.dtype):
        raise InputError(f"{spec}: {what} must be real numbers, got dtype {w.dtype}")
    return w


@dataclass
class _Head:
    """The output layer of `eval-hidden`: `weight` (V, H) as stored (a memory map for a raw
    file), converted once per compute dtype when a chunk's dtype needs it."""

    weight: np.ndarray
    src: object
    label: str
    bias: np.ndarray | None
    bias_label: str | None
    softcap: float | None
    chunk_size: int | None
    _cast: dict = field(default_factory=dict)

    def weight_for(self, dtype):
        from .evaluate import hidden_compute_dtype

        compute = hidden_compute_dtype(dtype, self.weight.dtype)
        if self.weight.dtype == compute:
            return self.weight
        if compute.str not in self._cast:  # e.g. a bfloat16 layer: one float32 copy, not per chunk
            self._cast[compute.str] = np.asarray(self.weight, dtype=compute)
        return self._cast[compute.str]


def _open_head(spec: str, H: int, first: str, args) -> _Head:
    """The output layer WEIGHT (and `--bias`) of `eval-hidden`, checked against H."""
    from .evaluate import _is_float

    src = bfloat16_view(open_array(spec))
    shape, dtype = shape_dtype(src)
    if not _is_float(np.dtype(dtype)):
        raise InputError(f"{spec}: the output layer must be float16, bfloat16, float32 or "
                         f"float64, got {dtype}")
    if len(shape) != 2 or shape[1] != H or shape[0] < 1:
        raise InputError(f"{spec}: output layer of shape {tuple(shape)} does not fit hidden states "
                         f"of size H={H} ({first}): expected (V, {H}) with V >= 1")
    V = int(shape[0])
    bias = None
    if args.bias is not None:
        bias = _load_weight(args.bias, "bias")
        if bias.shape != (V,):
            raise InputError(f"{args.bias}: bias must have shape ({V},) (one per row of {spec}), "
                             f"got {bias.shape}")
    return _Head(read_whole(src), src, spec, bias, args.bias, args.softcap, args.chunk_rows)




# -- the command ---------------------------------------------------------------------------------------
def _check_inputs(xs, ts, xshape, xdtype, tshape, tdtype, hidden=False):
    """Check one (logits or hidden states, targets) pair from their shapes and dtypes."""
    if hidden:
        from .evaluate import _is_float

        if not _is_float(xdtype):
            raise InputError(f"{xs.label}: hidden states must be float16, bfloat16, float32 or "
                             f"float64, got {xdtype}")
        if len(xshape) != 2:
            raise InputError(f"{xs.label}: hidden states must have shape (N, H), got {xshape}")
        if xshape[1] < 1:
            raise InputError(f"{xs.label}: hidden states have no features (shape {xshape})")
    else:
        if not (xdtype.kind == "f" or xdtype.name == "bfloat16"):
            raise InputError(f"{xs.label}: logits must be floating point (float16, float32, "
                             f"float64, ...), got {xdtype}")
        if len(xshape) < 2:
            raise InputError(f"{xs.label}: logits must have shape (N, C) or (N, C, d1, ..., dk), "
                             f"got {xshape}")
        if xshape[1] < 1:
            raise InputError(f"{xs.label}: logits have no classes (shape {xshape})")
    if tdtype.kind not in "iu":
        raise InputError(f"{ts.label}: targets must be integer class indices, got dtype {tdtype}")
    if len(tshape) == 0 or tshape[0] != xshape[0]:
        n = tshape[0] if len(tshape) else "no"
        raise InputError(f"lengths differ: {xs.label} has {xshape[0]} rows, {ts.label} has {n}")
    expect = (xshape[0],) + tuple(xshape[2:])
    if tuple(tshape) != expect:
        raise InputError(f"{ts.label}: targets of shape {tuple(tshape)} do not match "
                         f"{'hidden states' if hidden else 'logits'} of shape {tuple(xshape)} "
                         f"(expected {expect})")




def _scan_targets(ts, rows: int, C: int, ignore_index: int, start: int = 0, stop=None):
    """Fail fast (before reading any logits) on the first out-of-range target of rows
    `start:stop`; the message gives the row in that file."""
    for a, _, t in row_chunks(ts, rows, start, stop):
        flat = np.asarray(t).reshape(len(t), -1)
        bad = (flat != ignore_index) & ((flat < 0) | (flat >= C))
        if bad.any():
            i = int(np.argmax(bad.reshape(-1)))
            r, j = divmod(i, flat.shape[1])
            pos = tuple(int(i) for i in np.unravel_index(j, t.shape[1:]))
            where = f"row {a + r}" + (f", position {pos[0] if len(pos) == 1 else pos}"
                                      if t.ndim > 1 else "")
            raise InputError(f"{ts.label}: {where}: target {int(flat.reshape(-1)[i])} is out of "
                             f"range [0, {C}) and is not the ignore index ({ignore_index})")


class _Progress:
    def __init__(self, total: int, enabled, desc: str = "numbaxent eval"):
        self.bar = None
        if enabled is False or (enabled is None and not sys.stderr.isatty()):
            return
        try:
            from tqdm import tqdm
        except ImportError:
            if enabled:  # asked for explicitly: say once why there is none
                print(f"{desc}: --progress: tqdm is not installed, so no progress bar can be "
                      f"shown (pip install 'numbaxent[eval]')", file=sys.stderr)
            return
        self.bar = tqdm(total=total, unit="rows", unit_scale=True, file=sys.stderr,
                        desc=desc, dynamic_ncols=True, mininterval=0.2)

    def update(self, n: int):
        if self.bar is not None:
            self.bar.update(n)

    def close(self):
        if self.bar is not None:
            self.bar.close()
            self.bar = None


@dataclass(frozen=True)
class _Pair:
    """One logits file and its targets, with the file-local rows `start:stop` to evaluate."""

    xs: object
    ts: object
    xshape: tuple
    xdtype: np.dtype
    start: int
    stop: int


def _has_glob(spec: str) -> bool:
    return any(c in spec for c in "*?[")


def _glob(spec: str):
    """Sorted matches of a glob pattern; a `:member` suffix is kept on every match."""
    matches = sorted(glob.glob(spec))
    if not matches and ":" in spec:
        path, member = spec.rsplit(":", 1)
        if member and "/" not in member:
            matches = [f"{m}:{member}" for m in sorted(glob.glob(path))]
    if not matches:
        raise InputError(f"{spec}: no file matches this pattern")
    return matches


def _pair_specs(files, parser):
    """[(logits spec, targets spec)] from the positional arguments: two glob patterns, or N
    logits files followed by N target files."""
    if len(files) == 2 and any(_has_glob(f) and not os.path.exists(split_member(f)[0])
                               for f in files):
        xs, ts = (_glob(f) if _has_glob(f) and not os.path.exists(split_member(f)[0]) else [f]
                  for f in files)
        if len(xs) != len(ts):
            raise InputError(f"{files[0]} matches {len(xs)} file(s) but {files[1]} matches "
                             f"{len(ts)}; each logits file needs one targets file")
        return list(zip(xs, ts))
    if len(files) % 2:
        parser.error(f"expected as many target files as logits files (LOGITS... TARGETS...), got "
                     f"{len(files)} files")
    n = len(files) // 2
    return list(zip(files[:n], files[n:]))


def _open_pairs(specs, rows_range, hidden=False):
    """Open and check every pair; returns (pairs restricted to `rows_range`, C, total rows).
    `hidden`: the files hold hidden states (N, H), and C is H."""
    opened = []
    C = None
    for xspec, tspec in specs:
        xs, ts = bfloat16_view(open_array(xspec)), open_array(tspec)
        xshape, xdtype = shape_dtype(xs)
        tshape, tdtype = shape_dtype(ts)
        _check_inputs(xs, ts, xshape, xdtype, tshape, tdtype, hidden)
        if C is None:
            C, first = int(xshape[1]), xs.label
        elif int(xshape[1]) != C:
            raise InputError(f"{xs.label}: " + (f"hidden states have size H={xshape[1]}, {first} "
                                                f"has H={C}" if hidden else
                                                f"logits have {xshape[1]} classes, {first} has {C}"))
        opened.append((xs, ts, tuple(int(n) for n in xshape), xdtype))
    total = sum(p[2][0] for p in opened)
    start, stop = rows_range if rows_range is not None else (0, None)
    if start > 0 and start >= total:
        raise InputError(f"--rows {start}:{'' if stop is None else stop} starts at or after the "
                         f"end of the input ({total} rows)")
    stop = total if stop is None else min(stop, total)
    pairs, offset = [], 0
    for xs, ts, xshape, xdtype in opened:
        n = xshape[0]
        a, b = max(start - offset, 0), min(stop - offset, n)
        if b > a or (n == 0 and len(opened) == 1):
            pairs.append(_Pair(xs, ts, xshape, xdtype, a, max(a, b)))
        offset += n
    return pairs, C, total, (start, stop)


def _pair_chunks(pairs, rows, head: _Head | None = None, keep: int = 0):
    """`(a, b, x, t)`: rows `a:b` of every pair's logits (or hidden states) and targets, pair after
    pair, `rows` at a time (default `_default_rows`); `keep` as in `row_chunks`."""
    for p in pairs:
        r = rows or _default_rows(p.xs, head)
        for (a, b, x), (_, _, t) in zip(row_chunks(p.xs, r, p.start, p.stop, keep=keep),
                                        row_chunks(p.ts, r, p.start, p.stop, keep=keep)):
            yield a, b, x, t


def _evaluate_local(pairs, ev, rows, progress: _Progress, head: _Head | None = None):
    if head is None:  # one pipeline over every pair: the threads never wait between chunks or files
        # (the chunks still being read when the next one is asked for keep their pages mapped)
        chunks = ((x, t) for _, _, x, t in _pair_chunks(pairs, rows, keep=ev.IN_FLIGHT - 1))
        return ev.update_chunks(chunks, callback=progress.update)
    for a, b, x, t in _pair_chunks(pairs, rows, head):
        ev.update_hidden(x, head.weight_for(x.dtype), t, head.bias, head.softcap, head.chunk_size)
        progress.update(b - a)
    return ev


def _to_dask(src, rows: int):
    from . import dask as nxd

    if isinstance(src, DaskStore):
        return src.array()
    if isinstance(src, RawArray):
        return nxd._from_raw(src, rows)
    raise InputError(f"{src.label}: compressed .npz members cannot be read by Dask workers; use "
                     f".npy, an uncompressed .npz (np.savez) or Zarr")


def _evaluate_dask(pairs, cfg: dict, rows, threads, scheduler, progress: _Progress,
                   head: _Head | None = None):
    """The Dask path: Zarr inputs, or any input with --scheduler. Several files are concatenated
    along the rows (they must then agree on the shape after the first axis)."""
    try:
        import dask
        import dask.array as da
    except ImportError:
        raise InputError("the Dask path needs Dask: pip install 'numbaxent[dask]'") from None
    from . import dask as nxd

    xparts, tparts = [], []
    for p in pairs:
        x = _to_dask(p.xs, rows or _default_rows(p.xs, head))
        t = _to_dask(p.ts, x.chunks[0][0] if x.chunks[0] else 1)
        if (p.start, p.stop) != (0, p.xshape[0]):
            x, t = x[p.start:p.stop], t[p.start:p.stop]
        xparts.append(x)
        tparts.append(t)
    if len(xparts) > 1:
        if len({x.shape[1:] for x in xparts}) > 1:
            raise InputError("the Dask path (Zarr inputs or --scheduler) needs every logits file "
                             "to have the same shape after the first axis")
        x, t = da.concatenate(xparts, axis=0), da.concatenate(tparts, axis=0)
    else:
        x, t = xparts[0], tparts[0]
    if rows is not None:
        x = x.rechunk({0: rows})
    hd = None
    if head is not None:
        # on a cluster, workers map a raw weight file themselves (nothing large in the graph)
        w = head.src if scheduler is not None and isinstance(head.src, RawArray) \
            else head.weight_for(x.dtype)
        hd = dict(weight=w, bias=head.bias, softcap=head.softcap, chunk_size=head.chunk_size)
    blocks, root = nxd.evaluation_graph(x, t, threads=threads, head=hd, **cfg)
    if scheduler is None:
        from dask.callbacks import Callback

        rows_of = {d.key: n for n, d in blocks}

        class _Bar(Callback):
            def _posttask(self, key, result, dsk, state, id):
                n = rows_of.get(key)
                if n:
                    progress.update(n)

        with _Bar():
            (ev,) = dask.compute(root, scheduler="threads", num_workers=threads)
        return ev
    from distributed import Client, as_completed

    try:  # an address, or a scheduler file (dask scheduler --scheduler-file)
        client = (Client(scheduler_file=scheduler, set_as_default=False)
                  if os.path.isfile(scheduler) else Client(scheduler, set_as_default=False))
    except (OSError, ValueError) as exc:
        raise InputError(f"cannot connect to the Dask scheduler at {scheduler} ({exc})") from None
    try:
        futures = client.compute([d for _, d in blocks] + [root])
        block_futures, root_future = futures[:-1], futures[-1]
        rows_of = {f.key: n for (n, _), f in zip(blocks, block_futures)}
        for f in as_completed(block_futures, loop=client.loop):
            if f.status == "error":
                f.result()  # raises the task's exception here
            progress.update(rows_of.get(f.key, 0))
        ev = root_future.result()
        return ev
    except BaseException:
        try:
            client.cancel(futures)
        except Exception:
            pass
        raise
    finally:
        client.close()


def _default_rows(src, head: _Head | None = None) -> int:
    """Rows read at a time: `io.default_chunk_rows` (about `DEFAULT_CHUNK_BYTES` of the file);
    for hidden states about `HIDDEN_CHUNK_BYTES` of the file, a multiple of the logits chunk (so
    no read ends in a short matrix product)."""
    shape, dtype = shape_dtype(src)
    row_bytes = dtype.itemsize * math.prod(shape[1:])
    if head is None:
        return default_chunk_rows(row_bytes)
    from .evaluate import HIDDEN_CHUNK_BYTES, hidden_chunk_rows, hidden_compute_dtype

    rows = default_chunk_rows(row_bytes, HIDDEN_CHUNK_BYTES)
    k = head.chunk_size or hidden_chunk_rows(
        head.weight.shape[0], hidden_compute_dtype(dtype, head.weight.dtype).itemsize)
    return max(k, rows // k * k)


# Numba specialises a kernel on its argument types (dtype, read-only or not), so the first chunk of
# each kind compiles it (10-20 s) or loads it from the on-disk cache. That happens before the timed
# pass; if the timed pass still added a specialisation, the printed time says so.
_TIMED_KERNELS = (("numbaxent._metrics", ("metrics_rows", "metrics_cols", "metrics_reduce",
                                         "tallies_into_state")),
                  ("numbaxent._targets", ("check_target_blocks",)))


def _compiled_kernels() -> int:
    """How many specialisations of the evaluator's kernels this process has compiled or loaded."""
    n = 0
    for module, names in _TIMED_KERNELS:
        m = sys.modules.get(module)
        if m is not None:
            n += sum(len(getattr(getattr(m, name), "signatures", ())) for name in names)
    return n


def _warm_kernels(pairs, C: int, rows, head: _Head | None = None) -> None:
    """Compile (or load) the kernels for every kind of chunk the pass will see, before the clock
    starts: Numba specialises on the dtype and on whether an array is read-only (a memory map used
    in place) or writable (a converted copy, a decompressed buffer), which depends on the file's
    layout and on how the chunk covers it. So each pair's first chunk goes through the evaluator's
    own checks, and a one-row array with the same dtype and flags is evaluated."""
    from .evaluate import Evaluator

    if head is not None:  # update_hidden hands the kernels writable buffers: one kind per dtype
        for dtype in {p.xdtype for p in pairs if p.stop > p.start}:
            Evaluator(C).update_hidden(np.zeros((1, head.weight.shape[1]), dtype=dtype),
                                       head.weight_for(dtype), np.zeros(1, dtype=np.int64),
                                       head.bias, head.softcap)
        return
    seen = set()
    for p in pairs:
        if p.stop <= p.start:
            continue
        r = rows or _default_rows(p.xs)
        _, _, x = next(iter(row_chunks(p.xs, r, p.start, p.stop)))
        _, _, t = next(iter(row_chunks(p.ts, r, p.start, p.stop)))
        x3, tgt, _, _ = Evaluator(C)._check(x, t)
        dtype = x.dtype.newbyteorder("=") if x.dtype.itemsize in (2, 4, 8) else np.dtype(np.float64)
        key = (dtype.str, x3.flags.writeable, tgt.flags.writeable)
        if key in seen:
            continue
        seen.add(key)
        xp = np.zeros((1,) + x.shape[1:], dtype=dtype)  # K-dim and few classes: the column kernel
        tp = np.zeros((1,) + x.shape[2:], dtype=np.int64)
        xp.flags.writeable, tp.flags.writeable = key[1], key[2]
        Evaluator(C).update(xp, tp)


def _abs_spec(label: str) -> str:
    path, member = split_member(label)
    return os.path.abspath(path) + ("" if member is None else f":{member}")


def _evaluate_files(args, parser) -> int:
    """`eval`, and `eval-hidden` (`args.hidden`): the same pass, with the logits of each
    chunk formed from hidden states by `Evaluator.update_hidden`."""
    hidden = getattr(args, "hidden", False)
    files = args.files
    if hidden:  # HIDDEN... WEIGHT TARGETS...
        if len(files) < 3 or len(files) % 2 == 0:
            parser.error(f"expected HIDDEN... WEIGHT TARGETS... (one WEIGHT between as many "
                         f"hidden-state files as target files), got {len(files)} file(s)")
        head_spec, files = files[len(files) // 2], files[:len(files) // 2] + files[
            len(files) // 2 + 1:]
    specs = _pair_specs(files, parser)
    if args.save_state is not None:
        folder = os.path.dirname(os.path.abspath(args.save_state))
        if not os.path.isdir(folder):
            raise InputError(f"--save-state {args.save_state}: no such directory {folder}")
    pairs, C, total, (start, stop) = _open_pairs(specs, args.rows, hidden)
    head = None
    if hidden:
        H = C
        head = _open_head(head_spec, H, specs[0][0], args)
        C = int(head.weight.shape[0])
    weight = _load_weight(args.weight) if args.weight else None
    from .evaluate import Evaluator

    cfg = dict(num_classes=C, weight=weight, ignore_index=args.ignore_index,
               label_smoothing=args.label_smoothing, topk=args.topk,
               calibration_bins=args.calibration_bins, confusion=args.confusion)
    try:
        ev = Evaluator(**cfg)
    except (TypeError, ValueError) as exc:
        raise InputError(str(exc)) from None
    use_dask = args.scheduler is not None or any(isinstance(s, DaskStore) for p in pairs
                                                 for s in (p.xs, p.ts))
    if args.threads is not None and args.scheduler is None:
        import numba

        from . import _jit  # noqa: F401  (threading layer first)

        if args.threads > numba.config.NUMBA_NUM_THREADS:
            raise InputError(f"--threads {args.threads}: at most {numba.config.NUMBA_NUM_THREADS} "
                             f"on this machine")
        numba.set_num_threads(args.threads)
    n_rows = sum(p.stop - p.start for p in pairs)
    warmup = 0.0
    if not use_dask:  # compile (or load) the kernels before the clock starts
        t0 = time.perf_counter()
        _warm_kernels(pairs, C, args.chunk_rows, head)
        warmup = time.perf_counter() - t0
        compiled = _compiled_kernels()
    progress = _Progress(n_rows, args.progress, parser.prog)
    t0 = time.perf_counter()
    try:
        if use_dask:
            ev = _evaluate_dask(pairs, cfg, args.chunk_rows, args.threads, args.scheduler,
                                progress, head)
        else:
            for p in pairs:  # every target first: fail fast, before any logits are read
                _scan_targets(p.ts, max(args.chunk_rows or _default_rows(p.xs, head), 1 << 16),
                              C, args.ignore_index, p.start, p.stop)
            _evaluate_local(pairs, ev, args.chunk_rows, progress, head)
    finally:
        progress.close()
    elapsed = time.perf_counter() - t0
    includes_compile = None if use_dask else _compiled_kernels() != compiled
    files = [[_abs_spec(p.xs.label), _abs_spec(p.ts.label)] for p in pairs]
    all_files = [[_abs_spec(x), _abs_spec(t)] for x, t in specs]
    state_info = dict(inputs=all_files, total_rows=total, rows=[start, stop], files=files)
    if hidden:  # states of different output layers must not be taken for parts of one run
        state_info["head"] = [_abs_spec(head.label), head.bias_label and _abs_spec(
            head.bias_label), head.softcap]
    if args.save_state is not None:
        ev.save(args.save_state, info=state_info)
    res = ev.result()
    nbytes = sum((p.stop - p.start) * p.xdtype.itemsize * math.prod(p.xshape[1:]) for p in pairs)
    rests = {p.xshape[1:] for p in pairs}
    shape = [n_rows, *next(iter(rests))] if len(rests) == 1 else None
    dtypes = ", ".join(sorted({str(p.xdtype) for p in pairs}))
    one = len(specs) == 1
    info = dict(logits=specs[0][0] if one else [x for x, _ in specs],
                targets=specs[0][1] if one else [t for _, t in specs],
                shape=shape, dtype=dtypes, rows=[start, stop], total_rows=total,
                weight=args.weight, ignore_index=args.ignore_index,
                label_smoothing=args.label_smoothing, topk=list(args.topk),
                confusion=args.confusion, chunk_rows=args.chunk_rows,
                path="dask" if use_dask else "stream", scheduler=args.scheduler,
                save_state=args.save_state)
    if not use_dask and one:
        info["chunk_rows"] = args.chunk_rows or _default_rows(pairs[0].xs, head)
    timing = dict(seconds=elapsed, rows_per_second=n_rows / elapsed if elapsed > 0 else None,
                  bytes_per_second=nbytes / elapsed if elapsed > 0 else None,
                  includes_compile=includes_compile, warmup_seconds=None if use_dask else warmup)
    if hidden:
        V = C
        info = dict(hidden=info.pop("logits"), output_layer=dict(
            weight=head.label, shape=[V, H], dtype=str(head.weight.dtype), bias=args.bias,
            softcap=args.softcap), **info)
        info["chunk_rows"] = head.chunk_size or _default_rows(pairs[0].xs, head)
        # the matrix product over the evaluated rows (ignored rows are never multiplied out)
        flops = 2.0 * res.n_valid * H * V
        timing["gflops_per_second"] = flops / elapsed / 1e9 if elapsed > 0 else None
    if args.json:
        _print_json(res, info, timing)
        return 0
    names = lambda i: (specs[0][i] if one else  # noqa: E731
                       f"{specs[0][i]} ... {specs[-1][i]} ({len(specs)} files)")
    size = " x ".join(map(str, shape)) if shape else f"{n_rows} rows x {C} classes"
    if hidden:
        size = " x ".join(map(str, shape)) if shape else f"{n_rows} rows x {H}"
        header = [f"hidden   {names(0)}  {size} {dtypes}",
                  f"weight   {head.label}  {V} x {H} {head.weight.dtype}"
                  + (f", bias {args.bias}" if args.bias else ""),
                  f"targets  {names(1)}"]
    else:
        header = [f"logits   {names(0)}  {size} {dtypes}", f"targets  {names(1)}"]
    if (start, stop) != (0, total):
        header.append(f"rows     {start}:{stop} of {total}")
    header.append(f"options  {_options_line(ev, args.weight)}"
                  + (f", softcap={args.softcap:g}" if hidden and args.softcap else ""))
    if includes_compile is None:
        note = "Dask; includes scheduling and any kernel compilation on the workers"
    elif includes_compile:
        note = "streamed; includes kernel compilation"
    else:
        note = f"streamed; kernels compiled or loaded beforehand in {warmup:.2f} s, not timed"
    rate = (f"{n_rows / max(elapsed, 1e-12):,.0f} rows/s, "
            f"{timing['gflops_per_second'] or 0:.1f} GFLOP/s of logits" if hidden else
            f"{nbytes / max(elapsed, 1e-12) / 1e9:.2f} GB/s of logits")
    footer = [f"time     {elapsed:.3f} s  ({rate}, {note})"]
    if args.save_state is not None:
        footer.append(f"state    saved to {args.save_state}")
    _print_table(res, args.per_class, header, footer)
    return 0


def _options_line(ev, weight_label) -> str:
    opts = [f"ignore_index={ev.ignore_index}"]
    if ev.weight is not None:
        opts.append(f"weight={weight_label or 'set'}")
    if ev.label_smoothing:
        opts.append(f"label_smoothing={ev.label_smoothing:g}")
    if ev.confusion:
        opts.append("confusion")
    return ", ".join(opts)


def _print_json(res, info: dict, timing: dict | None = None):
    out = res.to_dict()
    out["input"] = info
    if timing is not None:
        out["timing"] = timing
    print(json.dumps(out, indent=1))


def _print_table(res, per_class: bool, header: list, footer: list):
    print("\n".join(header))
    print()
    print(res.format(per_class=per_class, max_classes=None))
    if footer:
        print()
        print("\n".join(footer))


# -- numbaxent merge -----------------------------------------------------------------------------------
def _merge_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="numbaxent merge",
        description="Merge evaluator states saved by 'numbaxent eval --save-state' (or "
                    "Evaluator.save) and print the report for all their rows: the same figures "
                    "as one 'numbaxent eval' over those rows.",
        epilog="States must have the same settings (classes, ignore index, smoothing, weights, "
               "top-k, bins, confusion). Exit status: 0 ok, 1 unusable state (one-line error), "
               "2 bad options.")
    p.add_argument("states", nargs="+", metavar="STATE", help="state files (.npz)")
    _output_options(p)
    return p


def _coverage(paths, infos):
    """Rows covered by the states when they all come from the same inputs (as recorded by
    `eval --save-state`): `(total rows, covered ranges, missing ranges)`, or None. Two states
    holding the same rows would count them twice: that is an error."""
    if not infos or any("inputs" not in i or "rows" not in i for i in infos) or \
            any((i["inputs"], i.get("head")) != (infos[0]["inputs"], infos[0].get("head"))
                for i in infos):
        return None
    spans = sorted((int(i["rows"][0]), int(i["rows"][1]), path) for i, path in zip(infos, paths))
    covered, missing = [], []
    pos = 0
    prev = None
    for a, b, path in spans:
        if prev is not None and a < prev[1]:
            raise InputError(f"{prev[2]} and {path} both hold rows {a}:{min(b, prev[1])} of the "
                             f"same inputs (they would be counted twice)")
        if a > pos:
            missing.append([pos, a])
        if covered and covered[-1][1] == a:
            covered[-1][1] = b
        elif b > a:
            covered.append([a, b])
        pos = max(pos, b)
        prev = (a, b, path)
    total = int(infos[0].get("total_rows", pos))
    if pos < total:
        missing.append([pos, total])
    return total, covered, missing


def _run_merge(args, parser) -> int:
    from .evaluate import _read_state

    seen = {}
    for path in args.states:  # before reading any: a state given twice would count twice
        real = os.path.realpath(path)
        if real in seen:
            also = "" if seen[real] == path else f" (also as {seen[real]})"
            raise InputError(f"{path}: given twice{also}; each state may be merged once")
        seen[real] = path
    total = None
    infos = []
    for path in args.states:
        try:
            ev, info = _read_state(path)
        except FileNotFoundError:
            raise InputError(f"{path}: no such file") from None
        except OSError as exc:
            raise InputError(f"{path}: cannot read ({exc.strerror})") from None
        if total is None:
            total = ev
        else:
            diff = ev._differences(total)
            if diff:
                raise InputError(f"{path}: cannot merge with {args.states[0]}: different settings "
                                 f"({'; '.join(diff)})")
            total.merge(ev)
        infos.append(info)
        heads = [(i.get("head"), p) for i, p in zip(infos, args.states) if i.get("head")]
        if heads and heads[-1][0] != heads[0][0]:
            raise InputError(f"{heads[-1][1]}: cannot merge with {heads[0][1]}: evaluated with "
                             f"another output layer (weight, bias, softcap: {heads[-1][0]} vs "
                             f"{heads[0][0]})")
    cov = _coverage(args.states, infos)
    if cov is not None and cov[2]:
        gaps = ", ".join(f"{a}:{b}" for a, b in cov[2])
        print(f"numbaxent merge: warning: rows {gaps} of the {cov[0]} are in none of the states",
              file=sys.stderr)
    res = total.result()
    ev = total
    info = dict(states=list(args.states), ignore_index=ev.ignore_index,
                label_smoothing=ev.label_smoothing, topk=list(ev.topk),
                calibration_bins=ev.calibration_bins, weight=ev.weight is not None,
                confusion=ev.confusion)
    if cov is not None:
        info.update(inputs=infos[0]["inputs"], total_rows=cov[0], rows=cov[1], missing=cov[2])
    if args.json:
        _print_json(res, info)
        return 0
    n = len(args.states)
    header = [f"states   {args.states[0] if n == 1 else f'{args.states[0]} ... {args.states[-1]}'}"
              f" ({n} file{'s' if n > 1 else ''})"]
    if cov is not None:
        first = cov[1][0] if cov[1] else None
        spans = ", ".join(f"{a}:{b}" for a, b in cov[1]) if first else "none"
        header.append(f"rows     {spans} of {cov[0]}")
    header.append(f"options  {_options_line(ev, None)}")
    _print_table(res, args.per_class, header, [])
    return 0


# -- entry points --------------------------------------------------------------------------------------
def _main(parser, run, name: str, argv) -> int:
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help (0) or a usage error (2)
        return int(exc.code or 0)
    try:
        return run(args, parser)
    except SystemExit as exc:  # parser.error() after parsing (a usage error)
        return int(exc.code or 0)
    except KeyboardInterrupt:
        print(f"{name}: interrupted", file=sys.stderr)
        return 130
    except InputError as exc:
        return _fail(str(exc), name)
    except BrokenPipeError:
        return 1
    except (OSError, ValueError, TypeError, IndexError, zipfile.BadZipFile) as exc:
        return _fail(str(exc) or type(exc).__name__, name)


def main(argv=None) -> int:
    """`numbaxent eval`."""
    return _main(_parser(), _evaluate_files, "numbaxent eval", argv)


def hidden_main(argv=None) -> int:
    """`numbaxent eval-hidden`."""
    return _main(_parser(hidden=True), _evaluate_files, "numbaxent eval-hidden", argv)


def merge_main(argv=None) -> int:
    """`numbaxent merge`."""
    return _main(_merge_parser(), _run_merge, "numbaxent merge", argv)


def _fail(msg: str, name: str = "numbaxent eval") -> int:
    msg = " ".join(msg.split())
    print(f"{name}: error: {msg}", file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(main())
