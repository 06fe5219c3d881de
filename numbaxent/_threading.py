"""Choose Numba's threading layer before the first parallel kernel runs.

Why this module exists: numbaxent's kernels are ``parallel=True`` and must be safe both for concurrent
calls from several Python threads (Dask's threaded scheduler, a web service) and inside ``fork()``ed
children (multiprocessing, Dask's process scheduler) after the parent used the library.

- GNU OpenMP (numba's usual pick on Linux) kills forked children;
- the ``workqueue`` layer aborts when two threads enter a parallel region at once;
- TBB is safe in both situations, but the PyPI ``tbb`` wheel installs ``libtbb.so.12`` into
  ``<prefix>/lib``, which the dynamic loader does not search inside a virtualenv, so numba reports
  TBB as unavailable.

We therefore pre-load ``libtbb`` by absolute path (``RTLD_GLOBAL``) so that numba's ``tbbpool`` extension
resolves against it, and select the ``tbb`` layer. When no TBB can be loaded (a platform without
wheels), we select ``workqueue`` and serialise parallel kernel calls with a process-wide lock, which keeps
concurrent calls correct (they queue instead of overlapping) and fork safe. A threading layer chosen by
the user through ``NUMBA_THREADING_LAYER`` is respected as it is.
"""
from __future__ import annotations

import ctypes
import glob
import os
import site
import sys
import threading

__all__ = ["configure", "kernel_lock", "threading_layer_choice"]

_configured = False
_choice = None
_lock = None  # a threading.Lock when calls into parallel kernels must be serialised


class _NullLock:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


_NULL = _NullLock()


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
    global _configured, _choice, _lock
    if _configured:
        return _choice
    import numba

    user = os.environ.get("NUMBA_THREADING_LAYER")
    if user:
        _choice = user
        # only tbb (and omp with a non-GNU runtime) are safe for concurrent callers
        _lock = None if user in ("tbb", "safe", "threadsafe", "omp") else threading.Lock()
    elif _preload_tbb():
        numba.config.THREADING_LAYER = "tbb"
        _choice = "tbb"
    else:
        numba.config.THREADING_LAYER = "workqueue"
        _choice = "workqueue"
        _lock = threading.Lock()
    _configured = True
    return _choice


def kernel_lock():
    """Context manager held around parallel kernel calls (a no-op unless the layer is not thread safe)."""
    return _lock if _lock is not None else _NULL


def _reset_lock_in_child():
    global _lock
    if _lock is not None:  # a lock held by another thread at fork time would never be released here
        _lock = threading.Lock()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_reset_lock_in_child)


def threading_layer_choice() -> str | None:
    return _choice
