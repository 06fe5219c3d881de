"""Reading the arrays that `numbaxent eval` and the Dask path evaluate: `.npy` files (memory
maps over 2 MiB-aligned windows, read in row chunks), `.npz` members (uncompressed ones memory-mapped,
compressed ones decompressed as a stream), Zarr stores (through Dask), and bfloat16 saved as raw
2-byte voids. A library for the command line (`numbaxent.eval_cli`) and `numbaxent.dask`;
it imports neither, nor the kernels.
"""
from __future__ import annotations

import math
import mmap
import os
import struct
import zipfile
from dataclasses import dataclass, replace

import numpy as np

__all__ = ["open_array", "InputError", "RawArray", "ZipStreamArray", "DaskStore", "row_chunks",
           "read_whole", "shape_dtype", "split_member", "is_zarr", "madvise", "bfloat16_view",
           "DEFAULT_CHUNK_BYTES", "MAX_CHUNK_ROWS", "default_chunk_rows"]

# Rows per chunk of `numbaxent eval`: about this many bytes of logits, and at most MAX_CHUNK_ROWS
# rows. Each chunk costs fixed work (its checks, the set-up of its pieces at ~0.1 ms of Python each,
# the folds of their figures, the unmapping of finished pages), on cores the kernels want: on 32,000
# classes 64 MiB measured 5-8% faster streaming than 32 MiB (Zen 3), and 256 MiB 81-82% of the
# in-memory forward against 78% for 64 MiB (Zen 4; docs/evaluating.md). Three chunks are mapped at
# a time (page cache, not anonymous memory). The row cap bounds the row kernels' per-row records
# (48 bytes a row, three chunks in flight) for short rows: 1 M rows is a 40 MiB chunk of 10 float32
# classes, which streamed as fast as 64 and 256 MiB chunks there.
DEFAULT_CHUNK_BYTES = 256 << 20
MAX_CHUNK_ROWS = 1 << 20
_WINDOW = 2 << 20  # mappings start and end on 2 MiB file offsets (huge page-cache folios)


def default_chunk_rows(row_bytes: int, budget: int = DEFAULT_CHUNK_BYTES) -> int:
    """Rows per chunk of `numbaxent eval` for rows of `row_bytes` bytes: as many as fit `budget`
    bytes, at most `MAX_CHUNK_ROWS`, at least 1."""
    return max(1, min(budget // max(1, row_bytes), MAX_CHUNK_ROWS))


class InputError(Exception):
    """A problem with the user's input, reported as one line."""


# -- file access ---------------------------------------------------------------------------------------
def _read_npy_header(f, label: str):
    """(shape, fortran_order, dtype) from a .npy header at `f`'s position (left after it)."""
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
class StoredArray:
    """What the file says of an array: where it is, its dtype, shape and order, and the name to
    show in messages."""

    path: str
    dtype: np.dtype
    shape: tuple
    fortran: bool
    label: str

    @property
    def row_bytes(self) -> int:
        return self.dtype.itemsize * math.prod(self.shape[1:])


@dataclass(frozen=True)
class RawArray(StoredArray):
    """An array stored raw in a file at `offset` (a `.npy` file, or an uncompressed `.npz`
    member): memory-mapped, so reading rows costs no copy and no anonymous memory. Picklable
    (Dask tasks map their own rows)."""

    offset: int = 0  # of the array's data in the file

    def rows(self, a: int, b: int) -> np.ndarray:
        """Rows `a:b` (a read-only memory map; `b` is clipped to the row count)."""
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
            madvise(window._mmap, "MADV_HUGEPAGE")
        return window[start - lo:stop - lo].view(self.dtype).reshape((b - a,) + self.shape[1:])

    def whole(self) -> np.ndarray:
        if math.prod(self.shape) == 0:
            return np.empty(self.shape, dtype=self.dtype)
        return np.memmap(self.path, dtype=self.dtype, mode="r", offset=self.offset,
                         shape=self.shape, order="F" if self.fortran else "C")


@dataclass(frozen=True)
class ZipStreamArray(StoredArray):
    """A compressed `.npz` member: read front to back, one chunk of rows at a time."""

    member: str = ""  # its name in the archive

    def chunks(self, rows: int, start: int = 0, stop: int | None = None):
        """Yield `(a, b, rows a:b)` over `start:stop`; the rows before `start` are
        decompressed and dropped (a stream cannot seek)."""
        if self.fortran and len(self.shape) > 1:
            raise InputError(f"{self.label}: a compressed Fortran-ordered member cannot be read in "
                             f"row chunks; save it C-ordered or uncompressed (np.savez)")
        n = self.shape[0]
        stop = n if stop is None else min(stop, n)

        def fill(f, view, row):
            got = 0
            while got < len(view):
                k = f.readinto(view[got:])
                if not k:
                    raise InputError(f"{self.label}: truncated member (ends at row "
                                     f"{row + got // max(1, self.row_bytes)} of {n})")
                got += k

        try:
            with zipfile.ZipFile(self.path) as zf, zf.open(self.member) as f:
                _read_npy_header(f, self.label)
                skip = max(1, (8 << 20) // max(1, self.row_bytes))  # rows per discarded read
                for a in range(0, start, skip):
                    b = min(start, a + skip)
                    fill(f, memoryview(bytearray((b - a) * self.row_bytes)), a)
                for a in range(start, stop, rows):
                    b = min(stop, a + rows)
                    buf = np.empty((b - a,) + self.shape[1:], dtype=self.dtype)
                    fill(f, memoryview(buf.reshape(-1).view(np.uint8)), a)
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


def split_member(spec: str):
    """`path:member` -> (path, member) when `path` exists and `spec` does not."""
    if os.path.exists(spec) or ":" not in spec:
        return spec, None
    path, member = spec.rsplit(":", 1)
    return path, member or None


def is_zarr(path: str) -> bool:
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
            return ZipStreamArray(path, dtype, shape, fortran, label, member=name)
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
    return RawArray(path, dtype, shape, fortran, label, offset=data)


def open_array(spec: str, raw_only: bool = False):
    """Open `path.npy`, `path.npz[:member]` or `store.zarr[:component]` for reading.

    Returns a `RawArray`, `ZipStreamArray` or `DaskStore`; raises
    `InputError` with a one-line message for anything unusable."""
    path, member = split_member(spec)
    label = spec
    if is_zarr(path):
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
    return RawArray(path, dtype, shape, fortran, label, offset=offset)


def shape_dtype(src):
    if isinstance(src, DaskStore):
        a = src.array()
        return a.shape, a.dtype
    return src.shape, src.dtype


def row_chunks(src, rows: int, start: int = 0, stop: int | None = None, keep: int = 0):
    """Yield `(a, b, rows a:b)` front to back over rows `start:stop` (default: all).

    A raw file is memory-mapped once; the pages of a chunk are unmapped from this process
    (`MADV_DONTNEED`: they stay in the page cache) when the chunk `keep + 1` places after it is
    asked for (`keep=0`: when the next one is), in whole 2 MiB steps so that huge page-cache
    folios stay mapped by one page-table entry until they are done with. Resident memory,
    anonymous or file-backed, is therefore bounded by `keep + 1` chunks, not the file; a consumer
    that still reads `keep` chunks while it asks for the next one (`Evaluator.update_chunks`:
    `keep=Evaluator.IN_FLIGHT - 1`) never sees their pages unmapped under it."""
    if isinstance(src, ZipStreamArray):
        yield from src.chunks(rows, start, stop)
        return
    n = src.shape[0] if stop is None else min(stop, src.shape[0])
    whole = src.whole()
    mm = getattr(whole, "_mmap", None)
    if mm is None or (src.fortran and len(src.shape) > 1):
        for a in range(start, n, rows):
            yield a, min(n, a + rows), whole[a:min(n, a + rows)]
        return
    madvise(mm, "MADV_SEQUENTIAL")
    madvise(mm, "MADV_HUGEPAGE")  # pages read in now are cached as huge folios where possible
    base = src.offset % mmap.ALLOCATIONGRANULARITY  # where the data starts in the mapping
    step = 2 << 20
    dropped = (base + start * src.row_bytes) // step * step  # nothing before start is touched
    ends = []  # the ends of the chunks yielded and not yet unmapped
    for a in range(start, n, rows):
        b = min(n, a + rows)
        yield a, b, whole[a:b]
        ends.append(b)
        if len(ends) <= keep:
            continue
        done = (base + ends.pop(0) * src.row_bytes) // step * step
        if done > dropped:
            madvise(mm, "MADV_DONTNEED", dropped, done - dropped)
            dropped = done


def madvise(mm, name, *span):
    option = getattr(mmap, name, None)
    if option is not None:
        try:
            mm.madvise(option, *span)
        except (OSError, ValueError):
            pass


def read_whole(src):
    """The whole array of an opened input: a memory map for a raw file (nothing read yet)."""
    if isinstance(src, RawArray):
        return src.whole()
    if isinstance(src, ZipStreamArray):
        return np.concatenate([c for _, _, c in src.chunks(max(1, src.shape[0] or 1))]) \
            if src.shape and src.shape[0] else np.empty(src.shape, src.dtype)
    return np.asarray(src.array())


def bfloat16_view(src):
    """Read a file whose dtype is a bare 2-byte void (`|V2`: what `np.save` writes for an
    `ml_dtypes.bfloat16` array, NumPy having no such type) as bfloat16."""
    dt = getattr(src, "dtype", None)
    if dt is None or dt.kind != "V" or dt.itemsize != 2 or dt.names is not None:
        return src
    try:
        import ml_dtypes
    except ImportError:
        raise InputError(f"{src.label}: raw 2-byte dtype {dt} (bfloat16 saved by np.save?): "
                         f"reading it as bfloat16 needs ml_dtypes (pip install ml_dtypes)") \
            from None
    return replace(src, dtype=np.dtype(ml_dtypes.bfloat16))
