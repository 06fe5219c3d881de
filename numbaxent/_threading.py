"""Choose Numba's threading layer before numba starts its threads.

numbaxent's own kernels no longer run Numba parallel regions: they are serial functions dealt to a pool
of Python threads by `_parallel` (compiled once instead of three times), which is safe for
concurrent callers and after `fork()` with any layer. The layer still matters for
`numba.get_num_threads`/`set_num_threads`, which size that pool and start Numba's own threads,
and for the user's own `parallel=True` code in the same process:

- GNU OpenMP (numba's usual pick on Linux) kills forked children that enter a parallel region;
- the `workqueue` layer aborts when two threads enter a parallel region at once;
- TBB is safe in both situations, but the PyPI `tbb` wheel installs `libtbb.so.12` into
  `<prefix>/lib`, which the dynamic loader does not search inside a virtualenv, so numba reports
  TBB as unavailable.

We therefore pre-load `libtbb` by absolute path (`RTLD_GLOBAL`) so that numba's `tbbpool` extension
resolves against it, and select the `tbb` layer; when no TBB can be loaded, `workqueue`. A threading
layer chosen by the user through `NUMBA_THREADING_LAYER` is respected as it is.
"""
from __future__ import annotations

import ctypes
import glob
import os
import site
import sys

__all__ = ["configure", "threading_layer_choice"]

_configured = False
_choice = None


def _tbb_candidates():
    prefixes = [sys.prefix, sys.base_prefix, getattr(site, "USER_BASE", None) or ""]
    dirs = [os.path.join(p, "lib") for p in prefixes if p]
    try:  # wherever pip put the tbb wheel's files
        from importlib import metadata

        for f in metadata.files("tbb") or ():
            if os.path.basename(str(f)).startswith("libtbb.so.12"):
                dirs.append(os.path.dirname(os.path.abspath(f.locate())))
    except Exception:
        pass
    seen = []
    for d in dirs:
        for path in sorted(glob.glob(os.path.join(d, "libtbb.so.12*"))):
            if path not in seen:
                seen.append(path)
    return seen


def _preload_tbb() -> bool:
    if sys.platform.startswith("win") or sys.platform == "darwin":
        # numba finds TBB on its own there (DLL search path / @rpath); try the layer as it is.
        return True
    try:  # already on the loader's path (system TBB, conda)
        ctypes.CDLL("libtbb.so.12", mode=ctypes.RTLD_GLOBAL)
        return True
    except OSError:
        pass
    for path in _tbb_candidates():
        try:
            ctypes.CDLL(path, mode=ctypes.RTLD_GLOBAL)
            return True
        except OSError:
            continue
    return False


def configure() -> str:
    """Select the threading layer once, before numba starts its thread pool. Returns the choice."""
    global _configured, _choice
    if _configured:
        return _choice
    import numba

    user = os.environ.get("NUMBA_THREADING_LAYER")
    if user:
        _choice = user
    elif _preload_tbb():
        numba.config.THREADING_LAYER = "tbb"
        _choice = "tbb"
    else:
        numba.config.THREADING_LAYER = "workqueue"
        _choice = "workqueue"
    _configured = True
    return _choice


def threading_layer_choice() -> str | None:
    return _choice
