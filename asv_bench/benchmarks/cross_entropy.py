"""asv benchmarks for numbaxent: forward, fused forward+backward, CrossEntropyLoss forward then
backward (time_ and peakmem_), over the performance matrix of numbaxent.bench (cases S1..S9b); a
few classes in three dtypes; the fused call in place; and cold start in a fresh interpreter
(timeraw_). Thread count: asv's environment matrix
(NUMBA_NUM_THREADS = 1, 2). Every benchmark also runs once as a test (tests/test_asv_bench.py),
with QUICK shapes, so the suite cannot rot."""
import numpy as np

import numbaxent as nx
from numbaxent.bench_cases import CASES, dtype_named, make_case

QUICK = False  # tests/test_asv_bench.py sets this: 1/64 of the rows


class CrossEntropy:
    params = [list(CASES)]
    param_names = ["case"]
    timeout = 600

    def setup(self, case):
        self.x, self.t, self.kw = make_case(case, quick=QUICK)
        self.grad = np.empty_like(self.x)
        nx.cross_entropy_with_grad(self.x, self.t, out=self.grad, **self.kw)  # compile / load

    def time_forward(self, case):
        nx.cross_entropy(self.x, self.t, **self.kw)

    def time_forward_backward(self, case):
        nx.cross_entropy_with_grad(self.x, self.t, out=self.grad, **self.kw)

    def time_forward_backward_alloc(self, case):
        nx.cross_entropy_with_grad(self.x, self.t, **self.kw)

    def time_module_forward_then_backward(self, case):
        crit = nx.CrossEntropyLoss(**self.kw)
        crit(self.x, self.t)
        crit.backward(out=self.grad)

    def peakmem_forward(self, case):
        nx.cross_entropy(self.x, self.t, **self.kw)

    def peakmem_forward_backward(self, case):
        nx.cross_entropy_with_grad(self.x, self.t, **self.kw)

    def peakmem_forward_backward_out(self, case):
        nx.cross_entropy_with_grad(self.x, self.t, out=self.grad, **self.kw)

    def peakmem_module_forward_then_backward(self, case):
        crit = nx.CrossEntropyLoss(**self.kw)
        crit(self.x, self.t)
        crit.backward(out=self.grad)


# few classes, whose 2-D blocks are transposed in registers (up to 6 float32 and 12 16-bit classes,
# numbaxent._math.transpose_group), about 4M logits each: classes, dtype
FEW = {"2-float32": (2, "float32"), "4-float16": (4, "float16"), "10-bfloat16": (10, "bfloat16")}


class FewClasses:
    params = [list(FEW)]
    param_names = ["classes_dtype"]
    timeout = 600

    def setup(self, key):
        C, name = FEW[key]
        dtype = dtype_named(name)  # (bfloat16 needs ml_dtypes, a bench extra, as for S9b)
        rows = (1 << 22) // C // (64 if QUICK else 1)
        rng = np.random.default_rng(0)
        self.x = rng.standard_normal((rows, C), dtype=np.float32).astype(dtype)
        self.t = rng.integers(0, C, rows)
        self.grad = np.empty_like(self.x)
        nx.cross_entropy_with_grad(self.x, self.t, out=self.grad)  # compile / load

    def time_forward(self, key):
        nx.cross_entropy(self.x, self.t)

    def time_forward_backward(self, key):
        nx.cross_entropy_with_grad(self.x, self.t, out=self.grad)


class InPlace:
    """The fused call with `out=` the logits themselves (what the LM head does per chunk)."""

    params = [["S1", "S3"]]
    param_names = ["case"]
    timeout = 600

    def setup(self, case):
        self.x, self.t, self.kw = make_case(case, quick=QUICK)
        nx.cross_entropy_with_grad(self.x, self.t, out=self.x, **self.kw)  # compile / load

    def time_forward_backward_in_place(self, case):
        nx.cross_entropy_with_grad(self.x, self.t, out=self.x, **self.kw)


class ColdStart:
    """A fresh interpreter: import, then the first call (kernels from the warm on-disk cache)."""

    def timeraw_import(self):
        return "import numbaxent"

    def timeraw_import_and_first_call(self):
        return """
import numpy as np
import numbaxent as nx
nx.cross_entropy_with_grad(np.zeros((4, 3), np.float32), np.array([0, 1, 2, 0]))
"""
