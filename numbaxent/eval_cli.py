"""``numbaxent eval``: stream-evaluate saved logits against targets.

    numbaxent eval LOGITS TARGETS [--weight FILE] [--ignore-index I] [--label-smoothing E]
                   [--topk 1,5] [--calibration-bins B] [--chunk-rows R] [--threads T]
                   [--scheduler ADDRESS] [--json] [--per-class] [--progress | --no-progress]

LOGITS and TARGETS are ``.npy`` files (memory-mapped, read in row chunks), ``file.npz:member``
(uncompressed members are memory-mapped, compressed ones are decompressed as a stream) or Zarr
stores (``store.zarr`` or ``store.zarr:component``), which go through Dask (:mod:`numbaxent.dask`).
``--scheduler ADDRESS`` evaluates on an existing ``distributed`` cluster (workers memory-map ``.npy``
files from a shared file system; nothing goes through the client).

Exit status: 0 on success; 1 with a one-line error on stderr for unusable input (missing, truncated
or corrupt file, mismatched lengths, wrong dtype, out-of-range target); 2 for bad options;
130 when interrupted (Ctrl-C).
"""
from __future__ import annotations

import argparse
import json
import math
import mmap
import os
import struct
import sys
import time
import zipfile
from dataclasses import dataclass

import numpy as np

__all__ = ["main", "open_array", "InputError"]

DEFAULT_CHUNK_BYTES = 32 << 20
_WINDOW = 2 << 20  # mappings start and end on 2 MiB file offsets (huge page-cache folios)


class InputError(Exception):
    """A problem with the user's input, reported as one line."""


# -- file access ---------------------------------------------------------------------------------------
def _read_npy_header(f, label: str):
    """(shape, fortran_order, dtype) from a .npy header at ``f``'s position (left after it)."""
    try:
        version = np.lib.format.read_magic(f)
    except ValueError as exc:
        raise InputError(f"{label}: not a .npy file ({exc})") from None
    try:
        if version == (1, 0):
            shape, fortran, dtype = np.lib.format.read_array_header_1_0(f)
        elif version == (2, 0):
            shape, fortran, dtype = np.lib.format.read_array_header_2_0(f)
        else:  # 3.0: utf-8 field names; same layout as 2.0
            shape, fortran, dtype = np.lib.format._read_array_header(f, version)
    except Exception as exc:  # ValueError, SyntaxError, tokenize.TokenError, ... from the parser
        raise InputError(f"{label}: corrupt .npy header ({type(exc).__name__}: {exc})") from None
    if dtype.hasobject:
        raise InputError(f"{label}: holds Python objects (dtype {dtype}); numeric arrays only")
    return tuple(int(s) for s in shape), bool(fortran), dtype


@dataclass(frozen=True)
class RawArray:
    """An array stored raw in a file at ``offset`` (a ``.npy`` file, or an uncompressed ``.npz``
    member): memory-mapped, so reading rows costs no copy and no anonymous memory. Picklable
    (Dask tasks map their own rows)."""

    path: str
    offset: int
    dtype: np.dtype
    shape: tuple
    fortran: bool
    label: str

    @property
    def row_bytes(self) -> int:
        return self.dtype.itemsize * math.prod(self.shape[1:])

    def rows(self, a: int, b: int) -> np.ndarray:
        """Rows ``a:b`` (a read-only memory map; ``b`` is clipped to the row count)."""
        b = min(b, self.shape[0])
        if b <= a or self.row_bytes == 0:
            return np.empty((max(0, b - a),) + self.shape[1:], dtype=self.dtype)
        if self.fortran and len(self.shape) > 1:
            return self.whole()[a:b]
        # map a window aligned to 2 MiB in the file: huge page-cache folios at the edges are then
        # mapped whole (one page-table entry each) and unmapped whole, instead of partly (which
        # costs a fault per 4 KiB page and makes the kernel split the folio)
        start = self.offset + a * self.row_bytes
        stop = self.offset + b * self.row_bytes
        lo = start - start % _WINDOW
        hi = min(-(-stop // _WINDOW) * _WINDOW, os.path.getsize(self.path))
        window = np.memmap(self.path, dtype=np.uint8, mode="r", offset=lo, shape=(hi - lo,))
        if getattr(window, "_mmap", None) is not None:
            _madvise(window._mmap, "MADV_HUGEPAGE")
        return window[start - lo:stop - lo].view(self.dtype).reshape((b - a,) + self.shape[1:])

    def whole(self) -> np.ndarray:
        if math.prod(self.shape) == 0:
            return np.empty(self.shape, dtype=self.dtype)
        return np.memmap(self.path, dtype=self.dtype, mode="r", offset=self.offset,
                         shape=self.shape, order="F" if self.fortran else "C")


@dataclass(frozen=True)
class ZipStreamArray:
    """A compressed ``.npz`` member: read front to back, one chunk of rows at a time."""

    path: str
    member: str
    dtype: np.dtype
    shape: tuple
    fortran: bool
    label: str

    @property
    def row_bytes(self) -> int:
        return self.dtype.itemsize * math.prod(self.shape[1:])

    def chunks(self, rows: int):
        if self.fortran and len(self.shape) > 1:
            raise InputError(f"{self.label}: a compressed Fortran-ordered member cannot be read in "
                             f"row chunks; save it C-ordered or uncompressed (np.savez)")
        n = self.shape[0]
        try:
            with zipfile.ZipFile(self.path) as zf, zf.open(self.member) as f:
                _read_npy_header(f, self.label)
                for a in range(0, n, rows):
                    b = min(n, a + rows)
                    buf = np.empty((b - a,) + self.shape[1:], dtype=self.dtype)
                    view = memoryview(buf.reshape(-1).view(np.uint8))
                    got = 0
                    while got < len(view):
                        k = f.readinto(view[got:])
                        if not k:
                            raise InputError(f"{self.label}: truncated member (ends at row "
                                             f"{a + got // max(1, self.row_bytes)} of {n})")
                        got += k
                    yield a, b, buf
        except (zipfile.BadZipFile, EOFError, OSError) as exc:
            raise InputError(f"{self.label}: corrupt .npz member ({exc})") from None


@dataclass(frozen=True)
class DaskStore:
    """A Zarr store, read through Dask."""

    path: str
    component: str | None
    label: str

    def array(self):
        try:
            import dask.array as da
        except ImportError:
            raise InputError(f"{self.label}: reading Zarr stores needs Dask: "
                             f"pip install 'numbaxent[dask]'") from None
        try:
            return da.from_zarr(self.path, component=self.component)
        except Exception as exc:  # zarr's errors vary by version
            raise InputError(f"{self.label}: cannot open as a Zarr array "
                             f"({type(exc).__name__}: {exc})") from None


def _split_member(spec: str):
    """``path:member`` -> (path, member) when ``path`` exists and ``spec`` does not."""
    if os.path.exists(spec) or ":" not in spec:
        return spec, None
    path, member = spec.rsplit(":", 1)
    return path, member or None


def _is_zarr(path: str) -> bool:
    if path.rstrip("/").endswith(".zarr"):
        return True
    return os.path.isdir(path) and any(
        os.path.exists(os.path.join(path, f)) for f in (".zarray", "zarr.json", ".zgroup"))


def _open_npz(path: str, member, label: str, raw_only: bool):
    try:
        zf = zipfile.ZipFile(path)
    except zipfile.BadZipFile as exc:
        raise InputError(f"{label}: not a valid .npz (zip) file ({exc})") from None
    with zf:
        names = [n for n in zf.namelist() if n.endswith(".npy")]
        if member is None:
            if len(names) != 1:
                listed = ", ".join(n[:-4] for n in names) or "none"
                raise InputError(f"{label}: holds several arrays ({listed}); name one as "
                                 f"{path}:NAME")
            name = names[0]
        else:
            name = member if member.endswith(".npy") else member + ".npy"
            if name not in zf.namelist():
                listed = ", ".join(n[:-4] for n in names) or "none"
                raise InputError(f"{label}: no member {member!r} (members: {listed})")
        info = zf.getinfo(name)
        if info.flag_bits & 0x1:
            raise InputError(f"{label}: encrypted member")
        if info.compress_type != zipfile.ZIP_STORED:
            if raw_only:
                raise InputError(f"{label}: compressed member; this path needs an uncompressed "
                                 f"one (np.savez, not np.savez_compressed) or a .npy file")
            with zf.open(name) as f:
                shape, fortran, dtype = _read_npy_header(f, label)
            return ZipStreamArray(path, name, dtype, shape, fortran, label)
    # stored member: find its data in the zip file and map it like a .npy
    with open(path, "rb") as f:
        f.seek(info.header_offset)
        local = f.read(30)
        if len(local) != 30 or local[:4] != b"PK\x03\x04":
            raise InputError(f"{label}: corrupt .npz (bad local header for {name})")
        n_name, n_extra = struct.unpack("<HH", local[26:30])
        start = info.header_offset + 30 + n_name + n_extra
        f.seek(start)
        shape, fortran, dtype = _read_npy_header(f, label)
        data = f.tell()
    nbytes = dtype.itemsize * math.prod(shape)
    if data - start + nbytes > info.file_size:
        raise InputError(f"{label}: corrupt member: its header says {shape} {dtype} "
                         f"({nbytes} bytes) but the member holds {info.file_size - (data - start)}")
    if data + nbytes > os.path.getsize(path):
        raise InputError(f"{label}: truncated file")
    return RawArray(path, data, dtype, shape, fortran, label)


def open_array(spec: str, raw_only: bool = False):
    """Open ``path.npy``, ``path.npz[:member]`` or ``store.zarr[:component]`` for reading.

    Returns a :class:`RawArray`, :class:`ZipStreamArray` or :class:`DaskStore`; raises
    :class:`InputError` with a one-line message for anything unusable."""
    path, member = _split_member(spec)
    label = spec
    if _is_zarr(path):
        if not os.path.exists(path):
            raise InputError(f"{label}: no such file or directory")
        if raw_only:
            raise InputError(f"{label}: a Zarr store; use dask.array.from_zarr")
        return DaskStore(path, member, label)
    if not os.path.exists(path):
        raise InputError(f"{label}: no such file")
    if os.path.isdir(path):
        raise InputError(f"{label}: is a directory (not a .npy/.npz file or a Zarr store)")
    try:
        with open(path, "rb") as f:
            magic = f.read(6)
    except OSError as exc:
        raise InputError(f"{label}: cannot read ({exc.strerror})") from None
    if magic[:4] == b"PK\x03\x04" or path.endswith(".npz"):
        return _open_npz(path, member, label, raw_only)
    if member is not None:
        raise InputError(f"{label}: only .npz files have members")
    with open(path, "rb") as f:
        shape, fortran, dtype = _read_npy_header(f, label)
        offset = f.tell()
    nbytes = dtype.itemsize * math.prod(shape)
    size = os.path.getsize(path)
    if offset + nbytes > size:
        raise InputError(f"{label}: truncated file: the header says shape {shape} {dtype} "
                         f"({nbytes} bytes of data) but only {size - offset} bytes follow it")
    return RawArray(path, offset, dtype, shape, fortran, label)


def _shape_dtype(src):
    if isinstance(src, DaskStore):
        a = src.array()
        return a.shape, a.dtype
    return src.shape, src.dtype


def _row_chunks(src, rows: int):
    """Yield ``(a, b, rows a:b)`` front to back.

    A raw file is memory-mapped once; after each chunk the pages already processed are unmapped
    from this process (``MADV_DONTNEED``: they stay in the page cache), in whole 2 MiB steps so that
    huge page-cache folios stay mapped by one page-table entry until they are done with. Resident
    memory, anonymous or file-backed, is therefore bounded by the chunk, not the file."""
    if isinstance(src, ZipStreamArray):
        yield from src.chunks(rows)
        return
    n = src.shape[0]
    whole = src.whole()
    mm = getattr(whole, "_mmap", None)
    if mm is None or (src.fortran and len(src.shape) > 1):
        for a in range(0, n, rows):
            yield a, min(n, a + rows), whole[a:a + rows]
        return
    _madvise(mm, "MADV_SEQUENTIAL")
    _madvise(mm, "MADV_HUGEPAGE")  # pages read in now are cached as huge folios where possible
    base = src.offset % mmap.ALLOCATIONGRANULARITY  # where the data starts in the mapping
    step = 2 << 20
    dropped = 0
    for a in range(0, n, rows):
        b = min(n, a + rows)
        yield a, b, whole[a:b]
        done = (base + b * src.row_bytes) // step * step
        if done > dropped:
            _madvise(mm, "MADV_DONTNEED", dropped, done - dropped)
            dropped = done


def _madvise(mm, name, *span):
    option = getattr(mmap, name, None)
    if option is not None:
        try:
            mm.madvise(option, *span)
        except (OSError, ValueError):
            pass


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


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="numbaxent eval",
        description="Stream-evaluate saved logits against class-index targets: PyTorch-exact "
                    "cross-entropy (mean and sum), perplexity, top-k accuracy, entropy, "
                    "calibration error and per-class figures, in one pass over the logits.",
        epilog="Inputs: FILE.npy, FILE.npz:MEMBER, STORE.zarr[:COMPONENT]. Exit status: 0 ok, "
               "1 unusable input (one-line error), 2 bad options, 130 interrupted.")
    p.add_argument("logits", help="logits (N, C[, d1..dk]), any float dtype")
    p.add_argument("targets", help="class indices (N[, d1..dk]), any integer dtype")
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
                   help=f"rows per chunk (default: about {DEFAULT_CHUNK_BYTES >> 20} MiB of "
                        f"logits); memory use is bounded by the chunk, not the file")
    p.add_argument("--threads", type=_positive_int, metavar="T",
                   help="compute threads (default: all cores; with --scheduler: per task)")
    p.add_argument("--scheduler", metavar="ADDRESS",
                   help="evaluate on an existing Dask distributed cluster: its address "
                        "(tcp://host:8786) or its scheduler file (JSON)")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.add_argument("--per-class", action="store_true",
                   help="add the per-class table to the text output")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--progress", dest="progress", action="store_true", default=None,
                   help="always show a progress bar on stderr (needs tqdm)")
    g.add_argument("--no-progress", dest="progress", action="store_false",
                   help="never show a progress bar (default: only when stderr is a terminal)")
    return p


def _load_weight(spec: str):
    path, member = _split_member(spec)
    if not os.path.exists(path):
        raise InputError(f"{spec}: no such file")
    with open(path, "rb") as f:
        head = f.read(6)
    if head == b"\x93NUMPY" or head[:4] == b"PK\x03\x04":
        src = open_array(spec)
        if isinstance(src, RawArray):
            w = np.array(src.whole())
        elif isinstance(src, ZipStreamArray):
            w = np.concatenate([c for _, _, c in src.chunks(max(1, src.shape[0] or 1))]) \
                if src.shape and src.shape[0] else np.empty(src.shape, src.dtype)
        else:
            w = np.asarray(src.array())
    else:
        try:
            with open(path) as f:
                text = f.read().replace(",", " ")
            w = np.array([float(v) for v in text.split()])
        except (ValueError, UnicodeDecodeError):
            raise InputError(f"{spec}: not a .npy/.npz file nor whitespace- or comma-separated "
                             f"numbers") from None
    if w.dtype.kind not in "iuf":
        raise InputError(f"{spec}: class weights must be real numbers, got dtype {w.dtype}")
    return w


# -- the command ---------------------------------------------------------------------------------------
def _check_inputs(xs, ts, xshape, xdtype, tshape, tdtype):
    if not (xdtype.kind == "f"):
        raise InputError(f"{xs.label}: logits must be floating point (float16, float32, float64, "
                         f"...), got {xdtype}")
    if len(xshape) < 2:
        raise InputError(f"{xs.label}: logits must have shape (N, C) or (N, C, d1, ..., dk), got "
                         f"{xshape}")
    if xshape[1] < 1:
        raise InputError(f"{xs.label}: logits have no classes (shape {xshape})")
    if tdtype.kind not in "iu":
        raise InputError(f"{ts.label}: targets must be integer class indices, got dtype {tdtype}")
    if len(tshape) == 0 or tshape[0] != xshape[0]:
        n = tshape[0] if len(tshape) else "no"
        raise InputError(f"lengths differ: {xs.label} has {xshape[0]} rows, {ts.label} has {n}")
    expect = (xshape[0],) + tuple(xshape[2:])
    if tuple(tshape) != expect:
        raise InputError(f"{ts.label}: targets of shape {tuple(tshape)} do not match logits of "
                         f"shape {tuple(xshape)} (expected {expect})")


def _scan_targets(ts, rows: int, C: int, ignore_index: int):
    """Fail fast (before reading any logits) on the first out-of-range target."""
    for a, _, t in _row_chunks(ts, rows):
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
    def __init__(self, total: int, enabled):
        self.bar = None
        if enabled is False or (enabled is None and not sys.stderr.isatty()):
            return
        try:
            from tqdm import tqdm
        except ImportError:
            return
        self.bar = tqdm(total=total, unit="rows", unit_scale=True, file=sys.stderr,
                        desc="numbaxent eval", dynamic_ncols=True, mininterval=0.2)

    def update(self, n: int):
        if self.bar is not None:
            self.bar.update(n)

    def close(self):
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def _evaluate_local(xs, ts, ev, rows: int, progress: _Progress):
    xit = _row_chunks(xs, rows)
    tit = _row_chunks(ts, rows)
    for (a, b, x), (_, _, t) in zip(xit, tit):
        ev.update(x, t)
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


def _evaluate_dask(xs, ts, cfg: dict, rows, threads, scheduler, progress: _Progress):
    """The Dask path: Zarr inputs, or any input with --scheduler."""
    try:
        import dask
    except ImportError:
        raise InputError("the Dask path needs Dask: pip install 'numbaxent[dask]'") from None
    from . import dask as nxd

    x = _to_dask(xs, rows or _default_rows(xs))
    t = _to_dask(ts, x.chunks[0][0] if x.chunks[0] else 1)
    if rows is not None:
        x = x.rechunk({0: rows})
    blocks, root = nxd.evaluation_graph(x, t, threads=threads, **cfg)
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


def _default_rows(src) -> int:
    shape, dtype = _shape_dtype(src)
    row_bytes = max(1, dtype.itemsize * math.prod(shape[1:]))
    return max(1, DEFAULT_CHUNK_BYTES // row_bytes)


def _run(args) -> int:
    xs = open_array(args.logits)
    ts = open_array(args.targets)
    xshape, xdtype = _shape_dtype(xs)
    tshape, tdtype = _shape_dtype(ts)
    _check_inputs(xs, ts, xshape, xdtype, tshape, tdtype)
    C = int(xshape[1])
    weight = _load_weight(args.weight) if args.weight else None
    from .evaluate import Evaluator

    try:
        ev = Evaluator(C, weight=weight, ignore_index=args.ignore_index,
                       label_smoothing=args.label_smoothing, topk=args.topk,
                       calibration_bins=args.calibration_bins)
    except (TypeError, ValueError) as exc:
        raise InputError(str(exc)) from None
    cfg = dict(num_classes=C, weight=weight, ignore_index=args.ignore_index,
               label_smoothing=args.label_smoothing, topk=args.topk,
               calibration_bins=args.calibration_bins)
    use_dask = args.scheduler is not None or isinstance(xs, DaskStore) or isinstance(ts, DaskStore)
    if args.threads is not None and args.scheduler is None:
        import numba

        from . import _jit  # noqa: F401  (threading layer first)

        if args.threads > numba.config.NUMBA_NUM_THREADS:
            raise InputError(f"--threads {args.threads}: at most {numba.config.NUMBA_NUM_THREADS} "
                             f"on this machine")
        numba.set_num_threads(args.threads)
    rows = args.chunk_rows or _default_rows(xs)
    n_rows = int(xshape[0])
    if not use_dask:  # load the compiled kernels first, so that the timing is the pass itself
        probe = np.zeros((1,) + tuple(xshape[1:]), dtype=xdtype)
        Evaluator(C).update(probe, np.zeros((1,) + tuple(xshape[2:]), dtype=np.int64))
    progress = _Progress(n_rows, args.progress)
    t0 = time.perf_counter()
    try:
        if use_dask:
            ev = _evaluate_dask(xs, ts, cfg, args.chunk_rows, args.threads, args.scheduler,
                                progress)
        else:
            _scan_targets(ts, max(rows, 1 << 16), C, args.ignore_index)
            _evaluate_local(xs, ts, ev, rows, progress)
    finally:
        progress.close()
    elapsed = time.perf_counter() - t0
    res = ev.result()
    nbytes = xdtype.itemsize * math.prod(xshape)
    info = dict(logits=xs.label, targets=ts.label, shape=list(xshape), dtype=str(xdtype),
                weight=args.weight, ignore_index=args.ignore_index,
                label_smoothing=args.label_smoothing, topk=list(args.topk),
                chunk_rows=rows if not use_dask else args.chunk_rows,
                path="dask" if use_dask else "stream", scheduler=args.scheduler)
    timing = dict(seconds=elapsed, rows_per_second=n_rows / elapsed if elapsed > 0 else None,
                  bytes_per_second=nbytes / elapsed if elapsed > 0 else None)
    if args.json:
        out = res.to_dict()
        out["input"] = info
        out["timing"] = timing
        print(json.dumps(out, indent=1))
    else:
        print(f"logits   {xs.label}  {' x '.join(map(str, xshape))} {xdtype}")
        print(f"targets  {ts.label}")
        opts = [f"ignore_index={args.ignore_index}"]
        if args.weight:
            opts.append(f"weight={args.weight}")
        if args.label_smoothing:
            opts.append(f"label_smoothing={args.label_smoothing:g}")
        print(f"options  {', '.join(opts)}")
        print()
        print(res.format(per_class=args.per_class, max_classes=None))
        print()
        print(f"time     {elapsed:.3f} s  ({nbytes / max(elapsed, 1e-12) / 1e9:.2f} GB/s of "
              f"logits, {'Dask' if use_dask else 'streamed'})")
    return 0


def main(argv=None) -> int:
    parser = _parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help (0) or a usage error (2)
        return int(exc.code or 0)
    try:
        return _run(args)
    except KeyboardInterrupt:
        print("numbaxent eval: interrupted", file=sys.stderr)
        return 130
    except InputError as exc:
        return _fail(str(exc))
    except BrokenPipeError:
        return 1
    except (OSError, ValueError, TypeError, IndexError, zipfile.BadZipFile) as exc:
        return _fail(str(exc) or type(exc).__name__)


def _fail(msg: str) -> int:
    msg = " ".join(msg.split())
    print(f"numbaxent eval: error: {msg}", file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(main())
