"""numbaxent: PyTorch-exact softmax cross-entropy (loss and gradient) on the CPU, with Numba kernels.

`import numbaxent` imports only NumPy; the kernels are compiled (or loaded from the on-disk cache) on
first use.
"""
from ._api import CrossEntropyLoss, Stats, cross_entropy, cross_entropy_with_grad
from .evaluate import EvalResult, Evaluator
from .linear import linear_cross_entropy, linear_cross_entropy_with_grad

__version__ = "0.1.0"
__all__ = ["cross_entropy", "cross_entropy_with_grad", "CrossEntropyLoss", "Stats", "Evaluator",
           "EvalResult", "linear_cross_entropy", "linear_cross_entropy_with_grad", "__version__"]
