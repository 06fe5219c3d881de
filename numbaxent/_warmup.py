"""``numbaxent warmup``: compile every kernel variant ahead of time into the on-disk cache.

Useful before a job whose workers start together (each would otherwise compile on first use), in a
container image build, or on a login node before submitting to a cluster's compute nodes that share
the installation.
"""
from __future__ import annotations

import argparse
import sys
import time

import numpy as np

from . import _api

DTYPES = ("float32", "float64", "float16", "bfloat16")


def _dtype(name: str):
    if name == "bfloat16":
        try:
            import ml_dtypes
        except ImportError:
            return None
        return np.dtype(ml_dtypes.bfloat16)
    return np.dtype(name)


def variants(dtypes=DTYPES):
    """(label, thunk) for every compiled specialisation the public API can reach."""
    rng = np.random.default_rng(0)
    for name in dtypes:
        dt = _dtype(name)
        if dt is None:
            continue
        # 4 classes take the column kernels (short rows, K-dim), 48 the row kernels
        xs = [rng.standard_normal((3, c)).astype(dt) for c in (4, 48)]
        idx = np.array([0, 3, -100])
        for kind in ("class-index", "probability"):
            for cap in (None, 30.0):
                label = f"{name:<8} {kind:<11} softcap={'on' if cap else 'off'}"

                def run(xs=xs, kind=kind, cap=cap):
                    for x in xs:
                        target = idx if kind == "class-index" else np.full(x.shape, 0.25, x.dtype)
                        _api.cross_entropy(x, target, softcap=cap)
                        _api.cross_entropy_with_grad(x, target, softcap=cap)
                        crit = _api.CrossEntropyLoss(softcap=cap)
                        crit(x, target)
                        crit.backward()

                yield label, run
    for label, run in _extra_variants():
        yield label, run


def _extra_variants():
    """Kernels of optional modules (the streaming evaluator), when present."""
    try:
        from . import evaluate
    except ImportError:
        return
    warm = getattr(evaluate, "warmup_variants", None)
    if warm is not None:
        yield from warm()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="numbaxent warmup", description=__doc__.splitlines()[0])
    parser.add_argument("--dtypes", default=",".join(DTYPES),
                        help="comma-separated logits dtypes to compile for (default: %(default)s)")
    args = parser.parse_args(argv)
    from ._cache import cache_dir

    print(f"numbaxent warmup: caching compiled kernels in {cache_dir() or '(numba default)'}",
          file=sys.stderr)
    t_all = time.perf_counter()
    for label, run in variants(tuple(d.strip() for d in args.dtypes.split(",") if d.strip())):
        t0 = time.perf_counter()
        run()
        print(f"  {label}  {time.perf_counter() - t0:6.2f} s", file=sys.stderr)
    print(f"done in {time.perf_counter() - t_all:.1f} s", file=sys.stderr)
    return 0
