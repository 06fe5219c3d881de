"""Issue 12's point 4: ``Evaluator.update`` (every metric) against the forward ``cross_entropy`` on the
same in-memory float32 logits, side by side in one process (medians of ``--repeat``, interleaved).

    python benchmarks/eval_vs_forward.py [--repeat 7] [--cases few,kdim,long]
"""
from __future__ import annotations

import argparse
import time

import numpy as np

import numbaxent as nx

CASES = {"few": (1048576, 10), "kdim": (8, 21, 256, 256), "long": (4096, 32000)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeat", type=int, default=7)
    ap.add_argument("--cases", default=",".join(CASES))
    args = ap.parse_args(argv)
    rng = np.random.default_rng(0)
    import numba
    print(f"threads: {numba.get_num_threads()}")
    for name in args.cases.split(","):
        shape = CASES[name]
        C = shape[1]
        x = rng.standard_normal(shape, dtype=np.float32)
        t = rng.integers(0, C, (shape[0],) + shape[2:])
        nx.cross_entropy(x, t)
        nx.Evaluator(C).update(x, t)
        fwd, ev = [], []
        for _ in range(args.repeat):
            t0 = time.perf_counter()
            nx.cross_entropy(x, t)
            fwd.append(time.perf_counter() - t0)
            e = nx.Evaluator(C)
            t0 = time.perf_counter()
            e.update(x, t)
            ev.append(time.perf_counter() - t0)
        f, u = np.median(fwd), np.median(ev)
        print(f"{name:<5} {str(shape):<22} forward {f * 1e3:7.1f} ms  Evaluator.update "
              f"{u * 1e3:7.1f} ms  ratio {u / f:5.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
