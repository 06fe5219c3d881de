"""The column kernels' transposition of 2-D blocks, element loops against registers (shuffles), in
nanoseconds per logit at one thread: what sets `_math._SHUFFLE_MAX_CLASSES`, and how to re-measure
it on another CPU.

    python benchmarks/transpose_profile.py [--dtypes float32,float64,float16] [--classes 2,4,6,10]
                                           [--most N] [--repeat 7] [--logits 4194304]

For each dtype and class count, ~4M logits from memory are moved block by block (the kernels'
block length for that count) into the (C, nb) scratch by `_columns._transpose_in` and back into
rows by `_columns._transpose_out`, once as the kernel variant without shuffles (`in_registers`
None) and once with them (True), and the round trip is checked against NumPy's transpose.
`--most N` lets the shuffles take up to N classes for every dtype (to measure past the limits;
the kernels themselves are not changed). Code generation follows Numba's target: set
`NUMBA_CPU_NAME`/`NUMBA_CPU_FEATURES` to measure, say, AVX2 code on an AVX-512 machine.
Medians of `--repeat` runs.
"""
from __future__ import annotations

import argparse
import time

import numba
import numpy as np

from numbaxent import _columns, _math
from numbaxent.bench_cases import cpu_line


@numba.njit(nogil=True, boundscheck=False)
def _move(X, nb, cols, back, reps, in_registers, into_columns, out_of_columns):
    N, C = X.shape
    for _ in range(reps):
        for n0 in range(0, N - nb + 1, nb):
            if into_columns:
                _columns._transpose_in(X, n0, nb, C, cols, in_registers)
            if out_of_columns:
                _columns._transpose_out(cols, n0, nb, C, back, in_registers)


def _storage(name: str) -> np.dtype:
    """The kernels' storage dtype: float16 and bfloat16 travel as 16-bit integers."""
    return np.dtype(np.uint16 if name in ("float16", "bfloat16") else name)


def _ns_per_logit(X, nb, cols, back, in_registers, into_columns, repeat):
    _move(X, nb, cols, back, 1, in_registers, into_columns, not into_columns)
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        _move(X, nb, cols, back, 2, in_registers, into_columns, not into_columns)
        times.append((time.perf_counter() - t0) / 2)
    return float(np.median(times)) / X.size * 1e9


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dtypes", default="float32,float64,float16")
    ap.add_argument("--classes", default="2,3,4,6,8,10,12")
    ap.add_argument("--most", type=int, default=0, help="shuffles up to this many classes (0: the kernels' limits)")
    ap.add_argument("--repeat", type=int, default=7)
    ap.add_argument("--logits", type=int, default=1 << 22, help="logits per measurement (about)")
    args = ap.parse_args(argv)
    numba.set_num_threads(1)
    if args.most:
        for size in list(_math._SHUFFLE_MAX_CLASSES):
            _math._SHUFFLE_MAX_CLASSES[size] = args.most
    print(cpu_line())
    print(f"ns per logit, one thread, ~{args.logits} logits: element loops -> shuffles "
          "(in: rows to the (C, nb) scratch; out: back)")
    for name in args.dtypes.split(","):
        dt = _storage(name)
        most = _math._SHUFFLE_MAX_CLASSES[dt.itemsize]
        for C in (int(c) for c in args.classes.split(",")):
            nb = _columns.column_block_rows(C, 1)
            N = max(nb, args.logits // C // nb * nb)
            X = np.random.default_rng(C).integers(0, 2**15, (N, C)).astype(dt)
            cols, back = np.empty((C, nb), dt), np.empty_like(X)
            figures = []
            for into_columns in (True, False):
                pair = [_ns_per_logit(X, nb, cols, back, flag, into_columns, args.repeat) for flag in (None, True)]
                figures.append(f"{pair[0]:.3f} -> {pair[1]:.3f}")
            back[:] = 0
            _move(X, nb, cols, back, 1, True, True, True)  # block by block, there and back
            ok = np.array_equal(back, X)
            note = "" if C <= most else f"  (beyond {most}: both are the element loops)"
            print(f"{name:8} C={C:2d}  in {figures[0]}   out {figures[1]}   round trip "
                  f"{'ok' if ok else 'WRONG'}{note}", flush=True)
            if not ok:
                return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
