"""Forward and fused forward+backward of numbaxent vs PyTorch CPU, measured in the same process.

    python benchmarks/core_vs_torch.py [--shape 4096 32000] [--repeat 7]

(4096, 32000) float32 logits with class-index targets, mean reduction. Prints the median and min of
``--repeat`` runs after one warm-up, and the ratios. numbaxent's fused call allocates its gradient
(like PyTorch's backward does); the ``out=`` line reuses one.
"""
from __future__ import annotations

import argparse
import numpy as np

import numbaxent as nx
from numbaxent.bench_cases import timings


def timeit(fn, repeat):
    ts = timings(fn, repeat)
    return float(np.median(ts)), float(np.min(ts))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", type=int, nargs=2, default=(4096, 32000))
    ap.add_argument("--repeat", type=int, default=7)
    args = ap.parse_args(argv)
    import torch
    import numba

    n, c = args.shape
    rng = np.random.default_rng(0)
    x = rng.standard_normal((n, c), dtype=np.float32)
    t = rng.integers(0, c, n)
    out = np.empty_like(x)
    xt, tt = torch.from_numpy(x), torch.from_numpy(t)

    def torch_fwd():
        with torch.no_grad():
            torch.nn.functional.cross_entropy(xt, tt)

    def torch_fwd_bwd():
        a = xt.detach().requires_grad_()
        torch.nn.functional.cross_entropy(a, tt).backward()

    rows = [
        ("numbaxent forward", timeit(lambda: nx.cross_entropy(x, t), args.repeat)),
        ("torch forward", timeit(torch_fwd, args.repeat)),
        ("numbaxent forward+backward", timeit(lambda: nx.cross_entropy_with_grad(x, t), args.repeat)),
        ("numbaxent forward+backward, out=", timeit(
            lambda: nx.cross_entropy_with_grad(x, t, out=out), args.repeat)),
        ("torch forward+backward", timeit(torch_fwd_bwd, args.repeat)),
    ]
    print(f"shape {n}x{c} float32, numba threads {numba.get_num_threads()}, "
          f"torch threads {torch.get_num_threads()}, torch {torch.__version__}")
    for name, (med, mn) in rows:
        print(f"  {name:<34} median {med * 1e3:8.1f} ms   min {mn * 1e3:8.1f} ms")
    d = dict(rows)
    print(f"  speed-up forward:          {d['torch forward'][0] / d['numbaxent forward'][0]:.1f}x")
    print(f"  speed-up forward+backward: "
          f"{d['torch forward+backward'][0] / d['numbaxent forward+backward'][0]:.1f}x")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
