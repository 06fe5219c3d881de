"""Forward+backward through numbaxent.torch vs PyTorch's own loss, same process, same tensors.

    python benchmarks/dropin_speed.py [--shape 4096 32000] [--repeat 7] [--probs]

Times include the drop-in's whole overhead (autograd Function, tensor<->array views, gradient
tensor allocation). ``--probs``: probability targets that require grad (both gradients are
computed). Prints medians and the speed-up.
"""
from __future__ import annotations

import argparse
import numpy as np

from numbaxent.bench_cases import timings


def measure(shape=(4096, 32000), repeat=7, probs=False):
    import torch
    import torch.nn.functional as F

    import numbaxent.torch as nt

    g = torch.Generator().manual_seed(0)
    x = torch.randn(shape, generator=g)
    if probs:
        t = torch.rand(shape, generator=g)
    else:
        t = torch.randint(0, shape[1], (shape[0],), generator=g)
    results = {}
    for name, fn in (("numbaxent.torch", nt.cross_entropy), ("torch", F.cross_entropy)):
        def step():
            xi = x.detach().requires_grad_()
            ti = t.detach().requires_grad_(probs)
            fn(xi, ti).backward()
            return xi.grad

        results[name] = float(np.median(timings(step, repeat)))
    return results


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", type=int, nargs=2, default=(4096, 32000))
    ap.add_argument("--repeat", type=int, default=7)
    ap.add_argument("--probs", action="store_true",
                    help="probability targets that require grad (gradients for both)")
    args = ap.parse_args(argv)
    import torch

    r = measure(tuple(args.shape), args.repeat, args.probs)
    kind = "probability targets (requires_grad)" if args.probs else "class-index targets"
    print(f"forward+backward {args.shape[0]}x{args.shape[1]} float32, {kind}, torch threads "
          f"{torch.get_num_threads()}")
    for name, sec in r.items():
        print(f"  {name:<16} median {sec * 1e3:8.1f} ms")
    print(f"  speed-up: {r['torch'] / r['numbaxent.torch']:.1f}x")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
