"""asv benchmarks for the fused LM-head step (numbaxent.linear_cross_entropy_with_grad)."""
import numpy as np

import numbaxent as nx

QUICK = False


class LinearCrossEntropy:
    params = [["plain", "z_loss+softcap"]]
    param_names = ["options"]
    timeout = 600

    def setup(self, options):
        n, h, v = (64, 32, 500) if QUICK else (4096, 1024, 32000)
        rng = np.random.default_rng(0)
        self.hidden = rng.standard_normal((n, h), dtype=np.float32)
        self.weight = rng.standard_normal((v, h), dtype=np.float32) * np.float32(0.02)
        self.target = rng.integers(0, v, n)
        self.kw = {} if options == "plain" else dict(z_loss=1e-4, softcap=30.0)
        nx.linear_cross_entropy_with_grad(self.hidden[:8], self.weight, self.target[:8], **self.kw)

    def time_training_step(self, options):
        nx.linear_cross_entropy_with_grad(self.hidden, self.weight, self.target, **self.kw)

    def peakmem_training_step(self, options):
        nx.linear_cross_entropy_with_grad(self.hidden, self.weight, self.target, **self.kw)
