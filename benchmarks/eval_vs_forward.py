"""Issue 12's point 4: ``Evaluator.update`` (every metric) against the forward ``cross_entropy`` on the
same in-memory float32 logits, side by side in one process.

    python benchmarks/eval_vs_forward.py [--repeat 9] [--cases few,kdim,long] [--threads N]
                                         [--confusion]

Forward and update runs alternate, so machine noise hits both; the figures are medians over
``--repeat`` pairs, of the wall time and of the process CPU time (all threads; steadier than the
wall time on a shared machine), and the ratio of the fastest runs (least disturbed by other load). ``--threads`` sets ``numba.set_num_threads`` (default: as configured).
"""
from __future__ import annotations

import argparse
import time

import numpy as np

import numbaxent as nx
from numbaxent.bench_cases import cpu_line

CASES = {"few": (1048576, 10), "kdim": (8, 21, 256, 256), "long": (4096, 32000)}


def timed(fn):
    w0, c0 = time.perf_counter(), time.process_time()
    fn()
    return time.perf_counter() - w0, time.process_time() - c0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeat", type=int, default=9)
    ap.add_argument("--cases", default=",".join(CASES))
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--confusion", action="store_true", help="Evaluator(..., confusion=True)")
    args = ap.parse_args(argv)
    import numba

    if args.threads:
        numba.set_num_threads(args.threads)
    rng = np.random.default_rng(0)
    print(f"{cpu_line()}; threads: {numba.get_num_threads()}; repeat: {args.repeat}"
          + ("; confusion=True" if args.confusion else ""))
    for name in args.cases.split(","):
        shape = CASES[name]
        C = shape[1]
        x = rng.standard_normal(shape, dtype=np.float32)
        t = rng.integers(0, C, (shape[0],) + shape[2:])
        nx.cross_entropy(x, t)  # compile (or load) both before timing
        nx.Evaluator(C, confusion=args.confusion).update(x, t)
        fwd, ev = [], []
        for _ in range(args.repeat):
            fwd.append(timed(lambda: nx.cross_entropy(x, t)))
            e = nx.Evaluator(C, confusion=args.confusion)
            ev.append(timed(lambda: e.update(x, t)))
        (fw, fc), (uw, uc) = np.median(fwd, axis=0), np.median(ev, axis=0)
        best = min(u for u, _ in ev) / min(f for f, _ in fwd)
        print(f"{name:<5} {str(shape):<20} forward {fw * 1e3:7.1f} ms  Evaluator.update "
              f"{uw * 1e3:7.1f} ms  ratio {uw / fw:5.2f}   (CPU time: {fc * 1e3:7.1f} vs "
              f"{uc * 1e3:7.1f} ms, ratio {uc / fc:5.2f}; fastest runs: {best:5.2f})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
