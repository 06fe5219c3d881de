"""The one place that sets Numba's compilation options for every numbaxent kernel."""
from __future__ import annotations

from ._threading import configure

configure()  # must precede the first parallel kernel call; importing numba compiles nothing

import numba  # noqa: E402

from . import _cache  # noqa: E402

_cache.install()  # before any kernel is defined: kernels find their cache directory at decoration

# Only the flags that let LLVM vectorise reductions (reassociation) and fuse multiply-adds (contract).
# No 'nnan'/'ninf': NaN and inf must propagate exactly as PyTorch's do.
FASTMATH = frozenset({"reassoc", "contract"})


def jit(parallel: bool = False, inline: bool = False):
    """Decorator factory for numbaxent kernels.

    Every kernel is ``nopython``, releases the GIL, is cached on disk, and uses NumPy's error model
    (division by zero gives inf/nan, as in PyTorch, instead of raising). ``parallel=True`` kernels
    distribute ``prange`` loops over rows; ``inline=True`` marks small helpers that are inlined at the
    Numba IR level into the kernels that use them.
    """
    options = dict(
        nogil=True,
        cache=True,
        error_model="numpy",
        boundscheck=False,
        fastmath=set(FASTMATH),
    )
    if parallel:
        options["parallel"] = True
    if inline:
        options["inline"] = "always"
        options.pop("cache")  # inlined helpers are compiled into their callers' cache entries
    return numba.njit(**options)
