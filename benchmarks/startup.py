"""Warm start-up: the first call in a new process with the kernel cache already filled, next to Numba's
own floor (the first call of a trivial cached ``parallel=True`` function in a new process).

    python benchmarks/startup.py [--repeat 3]

Run it twice: the first round may compile (cold cache); the figures that count are those of a round
whose numbaxent times are all alike.
"""
from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile

CHILD = r"""
import sys, time
t0 = time.perf_counter()
import numpy as np
if sys.argv[1] == "numbaxent":
    import numbaxent as nx
    rng = np.random.default_rng(0)
    x = rng.standard_normal((64, 1000), dtype=np.float32)
    nx.cross_entropy_with_grad(x, rng.integers(0, 1000, 64))
else:
    import numba
    @numba.njit(parallel=True, cache=True)
    def f(a):
        s = 0.0
        for i in numba.prange(a.shape[0]):
            s += a[i]
        return s
    f(np.ones(10))
print(time.perf_counter() - t0)
"""


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory() as d:
        path = f"{d}/child.py"
        with open(path, "w") as f:
            f.write(CHILD)
        for _ in range(args.repeat):
            for who in ("numbaxent", "numba"):
                t = float(subprocess.run([sys.executable, path, who], capture_output=True, text=True,
                                         check=True, cwd=d).stdout.strip())
                print(f"{who:<10} first call in a new process: {t:.3f} s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
