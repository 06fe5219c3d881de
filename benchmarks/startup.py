"""Warm start-up: the first call in a new process with the kernel cache already filled, next to Numba's
own floor (the first call of a trivial cached ``parallel=True`` function in a new process).

    python benchmarks/startup.py [--repeat 9]

A first round, not counted, fills both caches (numbaxent's where it is configured, the floor's in a
temporary folder); then the two alternate, one new process each, and the medians are printed with
their difference. Python writes no bytecode cache when ``PYTHONDONTWRITEBYTECODE`` is set, so a
fresh clone then compiles numbaxent's modules on every import (about 45 ms here), which an installed
package (byte-compiled by pip) does not: the script says so when it is set.

Each child also times Python's full (generation 2) garbage collections. Importing NumPy, Numba and
the SciPy that Numba loads leaves some 10^5 objects waiting for the next full collection, which
takes about 0.1 s on these machines; whichever code allocates next sets it off. Numba's trivial
function usually exits before that point and numbaxent's import and first call usually reach it, so
the medians are printed with and without the time spent in full collections.
"""
from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile

CHILD = r"""
import gc, sys, time
full_gc = [0.0, 0.0]  # start of the running full collection, total seconds in full collections
def _gc(phase, info):
    if info["generation"] == 2:
        if phase == "start":
            full_gc[0] = time.perf_counter()
        else:
            full_gc[1] += time.perf_counter() - full_gc[0]
gc.callbacks.append(_gc)
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
print(time.perf_counter() - t0, full_gc[1])
"""


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeat", type=int, default=9)
    args = ap.parse_args(argv)
    if os.environ.get("PYTHONDONTWRITEBYTECODE"):
        print("note: PYTHONDONTWRITEBYTECODE is set: numbaxent's modules are compiled from source in "
              "every process unless their bytecode was cached before", flush=True)
    times = {"numbaxent": [], "numba": []}
    no_gc = {"numbaxent": [], "numba": []}
    with tempfile.TemporaryDirectory() as d:
        path = f"{d}/child.py"
        with open(path, "w") as f:
            f.write(CHILD)
        for i in range(args.repeat + 1):
            for who in times:
                out = subprocess.run([sys.executable, path, who], capture_output=True, text=True,
                                     check=True, cwd=d).stdout.split()
                t, gc_s = float(out[0]), float(out[1])
                if i:  # round 0 fills the caches
                    times[who].append(t)
                    no_gc[who].append(t - gc_s)
                print(f"{who:<10} first call in a new process: {t:.3f} s ({gc_s:.3f} s of it full "
                      f"garbage collections){'' if i else ' (warm-up)'}", flush=True)
    for label, ts in (("", times), (", full garbage collections left out", no_gc)):
        med = {who: statistics.median(v) for who, v in ts.items()}
        print(f"medians of {args.repeat}{label}: numbaxent {med['numbaxent']:.3f} s, Numba's floor "
              f"{med['numba']:.3f} s, difference {med['numbaxent'] - med['numba']:.3f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
