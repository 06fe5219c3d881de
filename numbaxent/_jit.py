"""The one place that sets Numba's compilation options for every numbaxent kernel."""
from __future__ import annotations

import functools

from ._threading import configure

configure()  # must precede the first parallel kernel call; importing numba compiles nothing

import numba  # noqa: E402
from numba.core import typed_passes  # noqa: E402

from . import _cache, _linkonly, _vector_width  # noqa: E402

# Only the flags that let LLVM vectorise reductions (reassociation) and fuse multiply-adds (contract).
# No 'nnan'/'ninf': NaN and inf must propagate exactly as PyTorch's do.
FASTMATH = frozenset({"reassoc", "contract"})

# Helpers called only from other kernels need no CPython or C-callable entry point. Without these two
# wrappers a helper compiles in about 60% of the time (no argument boxing/unboxing code to generate and
# optimise), which adds up over the ~50 helpers and overloads behind each kernel (docs/internals.md).
HELPER_OPTIONS = {"no_cpython_wrapper": True, "no_cfunc_wrapper": True}


@functools.lru_cache(maxsize=None)
def _width_pipeline(link_only: bool):
    """The compiler pipeline that marks a function with the vector width asked for
    (`_vector_width`), built once per kind: a kernel's (Numba's default lowering) or a link-only
    helper's."""
    base = _linkonly.LinkOnlyLowering if link_only else typed_passes.NativeLowering
    return _vector_width.pipeline(_vector_width.lowering_pass(base, _vector_width.WIDTH))


def jit(parallel: bool = False, inline: bool = False, python_callable: bool | None = None):
    """Decorator factory for numbaxent kernels.

    Every kernel is `nopython`, releases the GIL, is cached on disk (`_cache.KernelCache`), and
    uses NumPy's error model (division by zero gives inf/nan, as in PyTorch, instead of raising).
    numbaxent's own kernels are serial and dealt to threads by `_parallel` (a `prange` kernel
    compiles three times over, see docs/internals.md); `parallel=True` remains available.
    `inline=True` marks small helpers that are inlined at the Numba IR level into the kernels that
    use them. `python_callable` (default: `parallel`) gives the function its CPython entry
    point; without it the function can only be called from other kernels, and is compiled for
    linking into them only (`_linkonly`: no machine code or cache entry of its own).
    """
    options = dict(
        nogil=True,
        error_model="numpy",
        boundscheck=False,
        fastmath=set(FASTMATH),
    )
    if parallel:
        options["parallel"] = True
    helper = not (parallel if python_callable is None else python_callable)
    if helper:
        options.update(HELPER_OPTIONS)
    if inline:  # inlined helpers are compiled into their callers' cache entries (and vector width)
        options["inline"] = "always"
        return numba.njit(**options)
    link_only = helper and _linkonly.available()
    if _vector_width.WIDTH:
        options["pipeline_class"] = _width_pipeline(link_only)
    elif link_only:
        options["pipeline_class"] = _linkonly.LinkOnlyCompiler
    if link_only:  # no machine code of its own, nothing cached: its callers' cache entries carry its code
        return numba.njit(**options)
    return lambda fn: _cache.enable(numba.njit(**options)(fn))
