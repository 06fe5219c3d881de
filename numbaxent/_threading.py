"""Choose Numba's threading layer, by what actually loads, before numba starts its threads.

How much the layer matters to numbaxent: little. Its kernels run no Numba parallel region; they are
serial functions dealt to a pool of Python threads by `_parallel`, which is safe for concurrent
callers and after `fork()` whatever the layer. But `_parallel` sizes that pool with
`numba.get_num_threads()`, and that call starts Numba's threading layer: if the configured layer
cannot be loaded, every numbaxent call fails (`ValueError: No threading layer could be loaded`).
The layer also governs the user's own `parallel=True` code in the same process, where the layers
differ:

- `tbb`: safe for concurrent parallel regions and after `fork()`;
- `omp` with GNU OpenMP (Linux): thread-safe, but a `fork()`ed child that enters a parallel
  region is terminated;
- `omp` with LLVM/Intel OpenMP (numba's macOS builds; vendor "Intel") or MS OpenMP (Windows, which
  has no fork): thread-safe and fork-safe;
- `workqueue`: aborts the process when two threads enter a parallel region at once; fork-safe.

`configure` therefore takes, in order, the first layer that numba really loads here: `tbb`, then
`omp` (whatever its flavour: the GNU one, numba's own choice on Linux without TBB, is thread-safe,
and its fork limit only touches the user's parallel regions), then `workqueue`, which always
loads. "Loads" is decided as numba decides it (its TBB version check, then importing the layer's
extension), after helping the loader find the `tbb` wheel's library, which pip puts where the
loader does not look: `<prefix>/lib` (Linux, macOS; not searched inside a virtualenv) or
`<prefix>/Library/bin` (Windows; not on the DLL search path). A layer chosen by the user through
`NUMBA_THREADING_LAYER` is respected as it is.
"""
from __future__ import annotations

import ctypes
import glob
import importlib
import os
import site
import sys

__all__ = ["configure", "threading_layer_choice", "openmp_vendor"]

_configured = False
_choice = None
_omp_vendor = None
_dll_directories = []  # Windows: keep the search-path entries we add alive

# the TBB runtime numba's tbbpool extension links against, per platform (numba checks the same names)
TBB_LIBRARY = {"linux": "libtbb.so.12", "darwin": "libtbb.12.dylib", "win32": "tbb12.dll"}


def _platform() -> str:
    return "linux" if sys.platform.startswith("linux") else sys.platform


def _tbb_candidates(libname: str) -> list:
    """Absolute paths of `libname` (and its versioned copies) where pip or a prefix may hold it."""
    prefixes = [sys.prefix, sys.base_prefix, getattr(site, "USER_BASE", None) or ""]
    sub = os.path.join("Library", "bin") if _platform() == "win32" else "lib"
    dirs = [os.path.join(p, sub) for p in prefixes if p]
    try:  # wherever pip put the tbb wheel's files
        from importlib import metadata

        for f in metadata.files("tbb") or ():
            if os.path.basename(str(f)).startswith(libname.split(".")[0] + "."):
                dirs.append(os.path.dirname(os.path.abspath(f.locate())))
    except Exception:
        pass
    found = []
    for d in dirs:
        for path in sorted(glob.glob(os.path.join(d, libname + "*"))):
            if path not in found:
                found.append(path)
    return found


def _preload_tbb() -> bool:
    """Make the TBB runtime findable by its bare name, as numba looks it up. True if one loaded.

    Linux and macOS: load it by absolute path with `RTLD_GLOBAL` (the loader then resolves the
    bare name and `tbbpool`'s dependency to the loaded copy). Windows: add its directory to the
    DLL search path.
    """
    libname = TBB_LIBRARY.get(_platform())
    if libname is None:
        return False
    try:  # already on the loader's path (system TBB, conda)
        ctypes.CDLL(libname, mode=getattr(ctypes, "RTLD_GLOBAL", 0))
        return True
    except OSError:
        pass
    for path in _tbb_candidates(libname):
        try:
            if _platform() == "win32":
                _dll_directories.append(os.add_dll_directory(os.path.dirname(path)))
                ctypes.CDLL(path)
            else:
                ctypes.CDLL(path, mode=ctypes.RTLD_GLOBAL)
            return True
        except (OSError, AttributeError):
            continue
    return False


def _import_layer(layer: str):
    """numba's extension module for `layer` ('tbb' or 'omp'); ImportError when it cannot load."""
    if layer == "tbb":
        from numba.np.ufunc import parallel

        check = getattr(parallel, "_check_tbb_version_compatible", None)
        if check is not None:  # numba refuses TBB older than 2021.6 (raises ImportError)
            check()
    return importlib.import_module(f"numba.np.ufunc.{layer}pool")


def _loads(layer: str):
    try:
        return _import_layer(layer)
    except (ImportError, OSError):
        return None


def choose() -> str:
    """The first threading layer that loads in this process: `tbb`, `omp`, else `workqueue`.

    Sets `openmp_vendor()` when it looked at the `omp` layer.
    """
    global _omp_vendor
    _preload_tbb()
    if _loads("tbb") is not None:
        return "tbb"
    omp = _loads("omp")
    if omp is not None:
        _omp_vendor = str(getattr(omp, "openmp_vendor", "unknown"))
        return "omp"
    return "workqueue"  # built into numba: always loads


def configure() -> str:
    """Select the threading layer once, before numba starts its thread pool. Returns the choice."""
    global _configured, _choice
    if _configured:
        return _choice
    import numba

    user = os.environ.get("NUMBA_THREADING_LAYER")
    if user:
        _choice = user
    else:
        _choice = choose()
        numba.config.THREADING_LAYER = _choice
    _configured = True
    return _choice


def threading_layer_choice() -> str | None:
    """The layer `configure` selected (or the user's `NUMBA_THREADING_LAYER`); None before."""
    return _choice


def openmp_vendor() -> str | None:
    """The `omp` layer's OpenMP flavour ('GNU', 'Intel' for LLVM/Intel OpenMP, 'MS') when it was
    chosen, else None. GNU OpenMP terminates a `fork()`ed child that enters a parallel region."""
    return _omp_vendor if _choice == "omp" else None
