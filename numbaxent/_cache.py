"""Where and how numbaxent's compiled kernels are cached on disk.

Numba's own cache keys a function on its *own* file's content, so a change to a helper in another
module (say the exp polynomial in ``_math.py``) would leave stale machine code in the cache of every
kernel that inlined it. numbaxent's locator keys every kernel on the content of all the package's
private modules (``numbaxent/_*.py``, where every jitted function lives) and the numba/llvmlite
versions, so any change to kernel code invalidates the whole cache.

Cache directory, first that is writable:

1. ``$NUMBA_CACHE_DIR/numbaxent-<hash of the package path>`` when ``NUMBA_CACHE_DIR`` is set;
2. ``numbaxent/__pycache__`` next to the sources (the usual place);
3. the user cache directory, ``~/.cache/numbaxent/<hash of the package path>`` (or
   ``$XDG_CACHE_HOME/numbaxent/...``): used when the package directory is read-only (a system or
   container install).

If none is writable, numba's own locators decide, and failing those the kernels are compiled in
memory on every run: importing never fails for want of a writable place. Concurrent cold compiles (Dask
workers, MPI ranks starting together) are safe: numba writes each cache file to a temporary name and
renames it into place, so a reader sees either a complete entry or none and recompiles.
"""
from __future__ import annotations

import hashlib
import os
import sys
import tempfile

from numba.core import caching, config

PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__))
_stamp = None


def source_stamp() -> str:
    """Hash of numbaxent's private modules plus the compiler versions (computed once per process)."""
    global _stamp
    if _stamp is None:
        import llvmlite
        import numba

        h = hashlib.sha256(f"{numba.__version__} {llvmlite.__version__} {sys.version}".encode())
        for name in sorted(os.listdir(PACKAGE_DIR)):
            if name.startswith("_") and name.endswith(".py"):
                with open(os.path.join(PACKAGE_DIR, name), "rb") as f:
                    h.update(name.encode() + b"\0" + f.read())
        _stamp = h.hexdigest()
    return _stamp


def _user_cache_root() -> str:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "numbaxent")


def candidate_dirs() -> list[str]:
    tag = hashlib.sha1(PACKAGE_DIR.encode()).hexdigest()[:16]
    dirs = []
    if config.CACHE_DIR:
        dirs.append(os.path.join(config.CACHE_DIR, f"numbaxent-{tag}"))
    dirs.append(os.path.join(PACKAGE_DIR, "__pycache__"))
    dirs.append(os.path.join(_user_cache_root(), tag))
    return dirs


def _writable(path: str) -> bool:
    try:
        os.makedirs(path, exist_ok=True)
        tempfile.TemporaryFile(dir=path).close()
        return True
    except OSError:
        return False


_chosen_dir = None


def cache_dir() -> str | None:
    """The directory numbaxent's kernels are cached in (None: numba's own locators decide)."""
    global _chosen_dir
    if _chosen_dir is None:
        _chosen_dir = next((d for d in candidate_dirs() if _writable(d)), "")
    return _chosen_dir or None


class NumbaxentCacheLocator(caching._CacheLocator):
    """Cache locator for functions defined in numbaxent's own modules (see the module docstring)."""

    def __init__(self, py_func, py_file, path):
        self._py_file = py_file
        self._lineno = py_func.__code__.co_firstlineno
        self._path = path

    def get_cache_path(self):
        return self._path

    def get_source_stamp(self):
        return source_stamp()

    def get_disambiguator(self):
        return str(self._lineno)

    @classmethod
    def from_function(cls, py_func, py_file):
        if os.path.dirname(os.path.abspath(py_file)) != PACKAGE_DIR:
            return None
        path = cache_dir()
        return None if path is None else cls(py_func, py_file, path)


def install() -> None:
    """Put the locator first in numba's list (idempotent); must run before kernels are defined."""
    impl = getattr(caching, "CacheImpl", None) or getattr(caching, "_CacheImpl")
    classes = impl._locator_classes
    if NumbaxentCacheLocator not in classes:
        classes.insert(0, NumbaxentCacheLocator)
