"""Forward and forward+backward (`out=`) times of bench cases for whichever numbaxent is imported:
the A/B comparison of two commits, run alternately from two checkouts on the same machine.

    PYTHONPATH=OLD_CHECKOUT python benchmarks/case_times.py old S3,S4 --repeat 9
    PYTHONPATH=NEW_CHECKOUT python benchmarks/case_times.py new S3,S4 --repeat 9

Prints the median and the minimum of each, in milliseconds, after one warm-up call (which may
compile). Alternate the two a few times: a shared machine's noise is larger than most differences.

Besides the bench cases, a shape of random logits and class-index targets: `ROWSxCLASSES:DTYPE`
(e.g. `4194304x2:float32`, `1048576x10:bfloat16`). `--in-place` times the fused call with
`out=` the logits themselves (what `linear_cross_entropy_with_grad` does per chunk).
"""
from __future__ import annotations

import argparse

import numpy as np


def _shape_case(spec: str):
    """(logits, targets, {}) for `ROWSxCLASSES:DTYPE`: standard normal logits, uniform classes."""
    from numbaxent.bench_cases import dtype_named

    shape, dtype = spec.split(":")
    n, c = (int(v) for v in shape.split("x"))
    dt = dtype_named(dtype)
    rng = np.random.default_rng(0)
    return rng.standard_normal((n, c), dtype=np.float32).astype(dt), rng.integers(0, c, n), {}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("tag", help="a label for the output lines (e.g. old/new)")
    ap.add_argument("cases", help="comma-separated bench cases, e.g. S3,S4")
    ap.add_argument("--repeat", type=int, default=9)
    ap.add_argument("--in-place", action="store_true", help="the fused call with out= the logits")
    args = ap.parse_args(argv)
    import numbaxent as nx
    from numbaxent import bench_cases
    from numbaxent.bench_cases import timings

    for name in args.cases.split(","):
        x, t, kw = _shape_case(name) if ":" in name else bench_cases.make_case(name)
        out = x if args.in_place else np.empty_like(x)
        fwd = lambda: nx.cross_entropy(x, t, **kw)  # noqa: E731
        fused = lambda: nx.cross_entropy_with_grad(x, t, out=out, **kw)  # noqa: E731
        fwd(), fused()
        tf, tb = [], []
        for _ in range(args.repeat):  # interleaved, so both see the same machine
            tf += timings(fwd, 1, warmup=False)
            tb += timings(fused, 1, warmup=False)
        print(f"{args.tag} {name}{' in place' if args.in_place else ''} fwd median {np.median(tf) * 1e3:.1f} min {min(tf) * 1e3:.1f}  "
              f"fwd+bwd median {np.median(tb) * 1e3:.1f} min {min(tb) * 1e3:.1f} ms", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
