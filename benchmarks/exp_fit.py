"""The exp polynomials of `numbaxent._math` (`_F64.q`, `_F32.q`), reproduced: a Chebyshev fit (near
minimax) of q(r) = (exp(r) - 1 - r) / r^2 on |r| <= ln2/2 (a hair wider, for the rounding of r), so
that exp(r) = 1 + r + r^2 q(r); prints the coefficients (highest degree first, as `_Format` takes
them) and the maximum relative error of 1 + r + r^2 q(r) with them rounded to float64 (the kernels
evaluate it as one Horner chain, 1 + r (1 + r q(r)), and round float32's coefficients to float32).

    python benchmarks/exp_fit.py [--degree 9]   # float64's q; --degree 4 gives float32's

Needs mpmath (installed with PyTorch's sympy; `pip install mpmath` otherwise).
"""
from __future__ import annotations

import argparse


def main(argv=None) -> int:
    import mpmath as mp

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--degree", type=int, default=9)
    args = ap.parse_args(argv)
    mp.mp.dps = 50
    a = mp.log(2) / 2 * mp.mpf("1.0005")

    def q(r):
        return (mp.exp(r) - 1 - r) / r ** 2 if abs(r) > mp.mpf("1e-40") else mp.mpf(1) / 2

    coeffs = [float(c) for c in mp.chebyfit(q, [-a, a], args.degree + 1)]
    worst = mp.mpf(0)
    for i in range(4001):
        r = -a + 2 * a * i / 4000
        approx = 1 + r + r * r * mp.polyval([mp.mpf(c) for c in coeffs], r)
        worst = max(worst, abs(approx / mp.exp(r) - 1))
    print(repr(tuple(coeffs)))
    print(f"degree {args.degree}: max relative error {mp.nstr(worst, 3)} (coefficients in float64)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
