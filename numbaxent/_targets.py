"""The target check: range validation and the `'mean'` denominator in one serial pass."""
from __future__ import annotations

import numpy as np

from ._jit import jit


@jit(python_callable=True)
def check_targets(target, w, sw, ignore_index, C):
    """Validate class-index targets and total their weights in one serial pass.

    Returns `(first_bad, W, n_valid)`: the flat position of the first target that is neither
    `ignore_index` nor in `[0, C)` (-1 if none), `W = sum_{valid r} sw_r w[y_r]` in float64 (the
    'mean' denominator; `sw` is (R,) or (1,) for all ones) and the number of valid targets.
    """
    total = 0.0
    n_valid = 0
    per_row_sw = sw.shape[0] == target.shape[0]
    for r in range(target.shape[0]):
        y = target[r]
        if y == ignore_index:
            continue
        if y < 0 or y >= C:
            return r, total, n_valid
        total += np.float64(w[y]) * (sw[r] if per_row_sw else sw[0])
        n_valid += 1
    return -1, total, n_valid
