"""asv benchmarks for the repository's performance history: S1 (LLM head), S4 (few classes) and S9b
(bfloat16 input), fused forward+backward into a preallocated gradient (the forward alone is
timed by cross_entropy.CrossEntropy; it is left out here to keep a run over the whole history
short).

asv runs the benchmark suite of the current checkout against the package of each commit it measures,
so these benchmarks use only what every commit since the first kernels has: ``cross_entropy`` and
``cross_entropy_with_grad(..., out=)``. They build their inputs themselves instead of importing
``numbaxent.bench`` (absent before the comparison command was added); tests/test_asv_bench.py checks
that the inputs are the same arrays as ``numbaxent.bench.make_case`` makes. The committed results
and the plot made from them are described in docs/benchmark-history.md.
"""
import time

import numpy as np

import numbaxent as nx

QUICK = False  # tests/test_asv_bench.py sets this: 1/64 of the rows

# case: (shape, dtype), as in numbaxent.bench.CASES
CASES = {
    "S1": ((4096, 32000), "float32"),
    "S4": ((1048576, 10), "float32"),
    "S9b": ((4096, 32000), "bfloat16"),
}


def make_input(case: str, quick: bool = False, seed: int = 0):
    """(logits, class-index target) for ``case``: the draws of ``numbaxent.bench.make_case``."""
    shape, dt = CASES[case]
    if quick:
        shape = (max(1, shape[0] // 64),) + shape[1:]
    if dt == "bfloat16":
        import ml_dtypes

        dtype = np.dtype(ml_dtypes.bfloat16)
    else:
        dtype = np.dtype(dt)
    rng = np.random.default_rng(seed)
    x = rng.standard_normal(shape, dtype=np.float32).astype(dtype, copy=False)
    t = rng.integers(0, shape[1], shape[0])
    return x, t


class History:
    params = [list(CASES)]
    param_names = ["case"]
    timeout = 1200  # the first process of a commit compiles the kernels (no cache yet)
    # CPU time of this process, not wall time: on a shared machine other processes' load stretches
    # the wall time of a low-priority run several times over, but not the CPU time it uses. With
    # NUMBA_NUM_THREADS=1 (the history's setting) the two agree on a quiet machine.
    timer = time.process_time
    # One process, ten timed calls: setup (inputs, compiling) is the cost of a commit, not timing.
    rounds = 1
    repeat = 10
    number = 1
    warmup_time = 0

    def setup(self, case):
        self.x, self.t = make_input(case, quick=QUICK)
        self.grad = np.empty_like(self.x)
        # compile or load the kernel, and touch the gradient's pages, before timing
        nx.cross_entropy_with_grad(self.x, self.t, out=self.grad)

    def time_forward_backward(self, case):
        nx.cross_entropy_with_grad(self.x, self.t, out=self.grad)
