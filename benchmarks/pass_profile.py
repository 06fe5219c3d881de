"""Where a kernel's time goes, pass by pass, in nanoseconds per logit at one thread: the profile
behind the bench ratios that are not at the memory floor (docs/performance.md).

    python benchmarks/pass_profile.py [--rows-only | --columns-only] [--repeat 7]

*Row kernels* (long rows): each row primitive alone, run by a small Numba driver over a cached block
(4 rows, in L2) and over a large array (from memory), for float32, float64, float16 and bfloat16
logits: the row maximum, the exp-sum (the forward's compute), the exp-sum that also keeps each
exponential (the fused call's first pass) and the rescaling gradient pass; next to them one read of
the same bytes by NumPy (the bench's forward floor) and the whole API call. A pass that costs more
per logit on the cached block than one read costs from memory is compute-bound on this CPU.

*Column kernels* (1,048,576 rows of 10 classes, float32): the steps of a block, added one at a
time in a driver that calls the kernels' own helpers, so each step's cost is the difference of two
cumulative times (the transposition includes the first read of the block from memory).

Every figure is the fastest of `--repeat` runs (default 9) after a warm-up.
"""
from __future__ import annotations

import argparse

import numba
import numpy as np

from numbaxent import _columns, _math, _rows
from numbaxent._jit import FASTMATH
from numbaxent.bench_cases import cpu_line, timings

FM = set(FASTMATH)


def _fastest_seconds(f, repeat):
    """The fastest of `repeat` runs after a warm-up: the least disturbed by a shared machine, which
    is what differences of cumulative times need."""
    return float(np.min(timings(f, repeat)))


@numba.njit(fastmath=FM, error_model="numpy", nogil=True)
def _row_passes(x, step, reps, scratch, m):
    """Run one row primitive over every row of `x`, `reps` times: 0 max, 1 exp-sum, 2 exp-sum
    keeping the exponentials in `scratch`, 3 the rescaling gradient pass over `scratch`. `m`: the
    shift of the exp-sums (a value above every logit, in the compute type)."""
    acc = _math.compute_zero(x)
    w = np.ones(x.shape[1], scratch.dtype)
    zero = _math.compute_zero(x)
    for _ in range(reps):
        for r in range(x.shape[0]):
            row = x[r]
            if step == 0:
                acc += _rows.row_max(row, None)
            elif step == 1:
                acc += _rows.row_sumexp(row, m, None, scratch, False, row)[0]
            elif step == 2:
                acc += _rows.row_sumexp(row, m, None, scratch, True, row)[0]
            else:
                _rows.row_grad_from_exp(scratch, scratch, _math.one_like(acc), w, zero)
    return acc


def rows_profile(repeat):
    import numbaxent as nx

    try:
        import ml_dtypes
        halves = [("float16", np.float16), ("bfloat16", ml_dtypes.bfloat16)]
    except ImportError:
        halves = [("float16", np.float16)]
    print("row kernels, ns per logit at 1 thread (cached: 64 rows, 4-8 MB, in L3; memory: 2048 rows)")
    print(f"{'dtype':9} {'where':7} {'max':>6} {'exp-sum':>8} {'sum+keep':>9} {'rescale':>8}"
          f" {'np read':>8} {'API fwd':>8} {'API fwd+bwd':>12}")
    rng = np.random.default_rng(0)
    for name, dt in [("float32", np.float32), ("float64", np.float64)] + halves:
        C = 32000 if np.dtype(dt).itemsize <= 4 else 16000
        big = rng.standard_normal((2048, C)).astype(np.float32).astype(dt)
        target = rng.integers(0, C, big.shape[0])
        for where, x, reps in (("cached", big[:64].copy(), 10), ("memory", big, 1)):
            storage = x.view(np.uint16 if name == "float16" else np.int16) if name in (
                "float16", "bfloat16") else x
            compute = np.float64 if name == "float64" else np.float32
            scratch = np.empty(C, compute)
            m = compute(8.0)
            per = x.size * reps
            cells = []
            for step in range(4):
                t = _fastest_seconds(lambda: _row_passes(storage, step, reps, scratch, m), repeat)
                cells.append(t / per * 1e9)
            u = x.view(np.uint16).reshape(-1)
            read = _fastest_seconds(lambda: [np.maximum.reduce(u) for _ in range(reps)], repeat)
            t_idx = target[:x.shape[0]]
            g = np.empty_like(x)
            fwd = _fastest_seconds(lambda: [nx.cross_entropy(x, t_idx) for _ in range(reps)], repeat)
            fb = _fastest_seconds(lambda: [nx.cross_entropy_with_grad(x, t_idx, out=g)
                                          for _ in range(reps)], repeat)
            print(f"{name:9} {where:7} " + " ".join(f"{c:>{wd}.3f}" for c, wd in zip(
                cells + [read / per * 1e9, fwd / per * 1e9, fb / per * 1e9], (6, 8, 9, 8, 8, 8, 12))))


@numba.njit(fastmath=FM, error_model="numpy", nogil=True)
def _column_steps(x, target, w, last, in_registers):
    """The forward steps of `index_cols_kernel` on 2-D float32 input, up to step `last`."""
    N, C = x.shape
    nbmax = _columns.column_block_rows(C, 1)
    x_block = np.empty((C, nbmax), x.dtype)
    m, s, d, ls = (np.empty(nbmax, w.dtype), np.empty(nbmax, w.dtype), np.empty(nbmax, w.dtype),
                   np.empty(nbmax, w.dtype))
    xy, wy = np.empty(nbmax, w.dtype), np.empty(nbmax, w.dtype)
    lrow = np.empty(nbmax, np.float64)
    yv, ok = np.empty(nbmax, np.int64), np.empty(nbmax, np.bool_)
    acc = 0.0
    for n0 in range(0, N, nbmax):
        nb = nbmax if N - n0 > nbmax else N - n0
        if last >= 1:
            _columns._transpose_in(x, n0, nb, C, x_block, in_registers)
        if last >= 2:
            _columns.cols_max(x_block, 0, 0, nb, C, m, None)
        if last >= 3:
            _columns.cols_sumexp(x_block, 0, 0, nb, C, m, s, None, 0, 0, d)  # (the forward without smoothing)
        if last >= 4:
            _columns.cols_log(s, ls, nb)
        if last >= 5:
            _columns.cols_target_rows(target, n0, nb, -100, w, True, yv, ok, wy)  # (w: all ones)
            _columns.cols_target_logits(x_block, 0, 0, nb, yv, None, xy)
        if last >= 6:
            for b in range(nb):
                lr = _rows.index_loss(m[b], ls[b], xy[b], d[b], wy[b], C, 0.0, 0.0, 0.0)
                lrow[b] = lr if ok[b] else 0.0
        if last >= 7:
            acc += _columns.sum_in_order(lrow[:nb])
        acc += m[0] + ls[0]
    return acc


def columns_profile(repeat):
    rng = np.random.default_rng(0)
    N, C = 1 << 20, 10
    x = rng.standard_normal((N, C), dtype=np.float32)
    target = rng.integers(0, C, N)
    w = np.ones(C, np.float32)
    in_registers = _columns.transpose_variant(x.dtype, C, 1)
    names = ["(loop only)", "transpose in", "max", "exp-sum", "log", "target gather", "row losses",
             "block sum"]
    print(f"\ncolumn kernel forward, {N} x {C} float32, 1 thread: ns per logit (ms in all)")
    prev = 0.0
    for last, name in enumerate(names):
        t = _fastest_seconds(lambda: _column_steps(x, target, w, last, in_registers), repeat)
        print(f"  {name:14} {1e9 * (t - prev) / x.size:6.3f}  ({1e3 * (t - prev):6.2f} ms)")
        prev = t
    u = x.view(np.uint64).reshape(-1)
    read = _fastest_seconds(lambda: np.bitwise_or.reduce(u), repeat)
    print(f"  {'one read':14} {1e9 * read / x.size:6.3f}  ({1e3 * read:6.2f} ms, NumPy bitwise or)")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows-only", action="store_true")
    ap.add_argument("--columns-only", action="store_true")
    ap.add_argument("--repeat", type=int, default=9)
    args = ap.parse_args(argv)
    numba.set_num_threads(1)
    print(cpu_line())
    if not args.columns_only:
        rows_profile(args.repeat)
    if not args.rows_only:
        columns_profile(args.repeat)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
