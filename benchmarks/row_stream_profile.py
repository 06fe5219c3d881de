"""Why the long-row forward is slower from memory than from cache, and what a blockwise pass would
give: ns per float32 logit at one thread, rows read from memory (4096 x 32000, 524 MB).

    python benchmarks/row_stream_profile.py [--rows 4096] [--classes 32000] [--chunks 1024,2048] [--repeat 7]

Loops over each row `i` (the same arithmetic as the kernels' forward: `_math.exp_summand` and the
integer maximum of a row's float bits), each in a driver of its own:

- `next-row`: the kernels' scheme, this row's exp-sum (the row in L2: it was the previous
  row's "next") with the next row's maximum (from memory) in the same loop;
- `two passes`: the next row's maximum, then this row's exp-sum, as separate loops;
- `one stream`: the exp-sum and the maximum of the *same* row in one loop (not a softmax: the
  maximum is not known in time; it shows what one memory stream costs);
- `blockwise C`: the row in chunks of `C` logits (L1-sized), each chunk's maximum then its
  exp-sum shifted by it, the chunks' sums rescaled to the row's maximum as they are added (an
  online softmax by chunks: one memory stream, the second pass from L1).

Numerics differ between the loops (the blockwise sum rounds differently from the kernels'); this
measures speed only.
"""
from __future__ import annotations

import argparse
import math
import time

import numba
import numpy as np

from numbaxent._jit import FASTMATH
from numbaxent._math import exp_summand, max_int, max_skipnan, min_int, storage_bits
from numbaxent.bench_cases import cpu_line

FM = set(FASTMATH)
NEXT_ROW, TWO_PASSES, ONE_STREAM = 0, 1, 2


@numba.njit(fastmath=FM, error_model="numpy", nogil=True, boundscheck=False)
def _row_loops(X, scheme):
    n, C = X.shape
    total = 0.0
    for i in range(n - 1):
        row, nxt = X[i], X[i + 1] if scheme != ONE_STREAM else X[i]
        m = np.float32(1.0)
        s = np.float32(0.0)
        hi, lo = np.int32(-2**31), np.int32(2**31 - 1)
        if scheme == TWO_PASSES:
            for j in range(C):
                b = storage_bits(nxt[j])
                hi, lo = max_int(hi, b), min_int(lo, b)
            for j in range(C):
                s += exp_summand(row[j] - m)
        else:
            for j in range(C):
                s += exp_summand(row[j] - m)
                b = storage_bits(nxt[j])
                hi, lo = max_int(hi, b), min_int(lo, b)
        total += s + hi + lo
    return total


@numba.njit(fastmath=FM, error_model="numpy", nogil=True, boundscheck=False)
def _blockwise(X, chunk):
    n, C = X.shape
    total = 0.0
    for i in range(n):
        row = X[i]
        big = np.float32(-np.inf)
        s = np.float32(0.0)
        for j0 in range(0, C, chunk):
            part = row[j0:j0 + chunk]
            mk = np.float32(-np.inf)
            for j in range(part.shape[0]):
                mk = max_skipnan(mk, part[j])
            sk = np.float32(0.0)
            for j in range(part.shape[0]):
                sk += exp_summand(part[j] - mk)
            if mk > big:
                s = s * np.float32(math.exp(big - mk)) + sk
                big = mk
            else:
                s += sk * np.float32(math.exp(mk - big))
        total += s + big
    return total


def _ns(f, X, arg, repeat):
    f(X[:4], arg)
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        f(X, arg)
        times.append(time.perf_counter() - t0)
    return float(np.median(times)) / X.size * 1e9


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=4096)
    ap.add_argument("--classes", type=int, default=32000)
    ap.add_argument("--chunks", default="1024,2048,8192")
    ap.add_argument("--repeat", type=int, default=7)
    args = ap.parse_args(argv)
    numba.set_num_threads(1)
    X = np.random.default_rng(0).standard_normal((args.rows, args.classes), dtype=np.float32)
    print(cpu_line())
    print(f"{args.rows} x {args.classes} float32 from memory, one thread, ns per logit (median of {args.repeat}):")
    for name, scheme in (("next-row", NEXT_ROW), ("two passes", TWO_PASSES), ("one stream", ONE_STREAM)):
        print(f"  {name:16} {_ns(_row_loops, X, scheme, args.repeat):.3f}", flush=True)
    for chunk in (int(c) for c in args.chunks.split(",")):
        print(f"  {'blockwise ' + str(chunk):16} {_ns(_blockwise, X, chunk, args.repeat):.3f}", flush=True)
    u = X.view(np.uint64).reshape(-1)
    t0 = time.perf_counter()
    np.bitwise_or.reduce(u)
    print(f"  {'one read (NumPy)':16} {(time.perf_counter() - t0) / X.size * 1e9:.3f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
