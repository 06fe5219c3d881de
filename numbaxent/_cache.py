"""Where numbaxent's compiled kernels are cached on disk, and how a kernel finds its cache entry.

Keying. Numba's own cache keys a function on its *own* file's content, so a change to a helper in
another module (say the exp polynomial in `_math.py`) would leave stale machine code in the cache of
every kernel that inlined it. numbaxent keys every kernel on the content of all the package's private
modules (`numbaxent/_*.py`, where every jitted function lives), the numba/llvmlite/Python
versions and the vector width asked for (`_vector_width`); Numba adds the CPU (name and features)
and the signature, so one directory can serve machines of several kinds.

Directories, in this order (`search_dirs`):

1. `$NUMBAXENT_CACHE_DIR` when set: a cache shared by every user, for example filled once by
   `numbaxent warmup --cache-dir DIR` in a container build or by an HPC administrator;
2. `$NUMBA_CACHE_DIR/numbaxent-<tag>` when `NUMBA_CACHE_DIR` is set (`<tag>` hashes the
   package's path, so two installations never share entries by accident);
3. the user cache, `$XDG_CACHE_HOME/numbaxent/<tag>` (default `~/.cache/numbaxent/<tag>`);
4. the package's own `numbaxent/__pycache__`.

A kernel is loaded from the first directory that holds an entry for it, whoever wrote it and whether
or not this process may write there. New entries go to the first *writable* directory of the list
(`cache_dir`): normally the user cache, so that `pip uninstall` leaves nothing behind in
site-packages; the package directory only when nothing before it is writable. When nothing is
writable (a user without a home directory, a read-only container), kernels are compiled in memory
for the process and one `RuntimeWarning` says so: importing and calling never fail for want of a
writable place.

Concurrent cold compiles (Dask workers, MPI ranks starting together) are safe: numba writes each cache
file to a temporary name and renames it into place, so a reader sees either a complete entry or none.
Cache files are pickles read by numba: point `NUMBAXENT_CACHE_DIR` only at a directory whose writers
you trust, as for any Python package directory.
"""
from __future__ import annotations

import hashlib
import os
import sys
import tempfile
import warnings

from numba.core import caching, config

PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__))
ENV_VAR = "NUMBAXENT_CACHE_DIR"
_stamp = None


def source_stamp() -> str:
    """Hash of numbaxent's private modules plus the compiler versions (computed once per process)."""
    global _stamp
    if _stamp is None:
        import llvmlite
        import numba

        from . import _vector_width

        h = hashlib.sha256(f"{numba.__version__} {llvmlite.__version__} {sys.version} "
                           f"vector width {_vector_width.WIDTH}".encode())
        for name in sorted(os.listdir(PACKAGE_DIR)):
            if name.startswith("_") and name.endswith(".py"):
                with open(os.path.join(PACKAGE_DIR, name), "rb") as f:
                    h.update(name.encode() + b"\0" + f.read())
        _stamp = h.hexdigest()
    return _stamp


def _user_cache_root() -> str:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "numbaxent")


def search_dirs() -> list[str]:
    """Every directory a kernel is looked up in, in order (see the module docstring)."""
    tag = hashlib.sha1(PACKAGE_DIR.encode()).hexdigest()[:16]
    dirs = []
    if os.environ.get(ENV_VAR):
        dirs.append(os.path.abspath(os.environ[ENV_VAR]))
    if config.CACHE_DIR:
        dirs.append(os.path.join(config.CACHE_DIR, f"numbaxent-{tag}"))
    dirs.append(os.path.join(_user_cache_root(), tag))
    dirs.append(os.path.join(PACKAGE_DIR, "__pycache__"))
    return dirs


def writable(path: str) -> bool:
    """Whether files can be created in `path` (created if missing)."""
    try:
        os.makedirs(path, exist_ok=True)
        tempfile.TemporaryFile(dir=path).close()
        return True
    except OSError:
        return False


_chosen_dir = None
_warned = False


def cache_dir() -> str | None:
    """The directory new kernels are written to (the first writable of `search_dirs`), or
    None when nothing is writable (kernels are then compiled in memory; warned once)."""
    global _chosen_dir, _warned
    if _chosen_dir is None:
        _chosen_dir = next((d for d in search_dirs() if writable(d)), "")
        if not _chosen_dir and not _warned:
            _warned = True
            warnings.warn(
                "numbaxent: no writable directory for the kernel cache (tried "
                + ", ".join(search_dirs()) + "); kernels are compiled in memory for this process. "
                f"Set {ENV_VAR} to a writable directory to keep them.", RuntimeWarning, stacklevel=2)
    return _chosen_dir or None


class _Locator(caching._CacheLocator):
    """numba's hook for the cache path and the source stamp of a numbaxent function."""

    def __init__(self, py_func):
        self._lineno = py_func.__code__.co_firstlineno
        self._path = cache_dir() or search_dirs()[-1]  # a path is needed even when never written

    def ensure_cache_path(self):
        os.makedirs(self._path, exist_ok=True)

    def get_cache_path(self):
        return self._path

    def get_source_stamp(self):
        return source_stamp()

    def get_disambiguator(self):
        return str(self._lineno)

    @classmethod
    def from_function(cls, py_func, py_file):
        return cls(py_func)  # numba's source path is not needed: the stamp covers every kernel file


class _Impl(caching.CompileResultCacheImpl):
    _locator_classes = [_Locator]


class KernelCache(caching.FunctionCache):
    """numba's per-function cache, loading from every directory of `search_dirs` in turn and
    saving to `cache_dir` only (nothing when it is None)."""

    _impl_class = _Impl

    def __init__(self, py_func):
        super().__init__(py_func)
        base = self._impl.filename_base
        self._files = [caching.IndexDataCacheFile(d, base, source_stamp()) for d in search_dirs()]
        self._can_save = cache_dir() is not None

    def _load_overload(self, sig, target_context):
        if not self._enabled:
            return None
        key = self._index_key(sig, target_context.codegen())
        for f in self._files:
            try:
                data = f.load(key)
            except Exception:  # an unreadable or foreign entry is a miss, never an error
                continue
            if data is not None:
                return self._impl.rebuild(target_context, data)
        return None

    def _save_overload(self, sig, data):
        if self._can_save:
            try:
                super()._save_overload(sig, data)
            except OSError:  # the directory became unwritable: the kernel still runs
                self._can_save = False


def enable(dispatcher):
    """Give a numbaxent dispatcher its `KernelCache` (instead of `cache=True`, whose numba
    locators raise when no directory is writable and read only the one they write)."""
    dispatcher._cache = KernelCache(dispatcher.py_func)
    return dispatcher


def entries(path: str) -> list[str]:
    """numbaxent's cache files (index `.nbi` and data `.nbc`) in `path`."""
    modules = tuple(f"{name[:-3]}." for name in os.listdir(PACKAGE_DIR)
                    if name.startswith("_") and name.endswith(".py"))
    try:
        names = os.listdir(path)
    except OSError:
        return []
    return sorted(os.path.join(path, n) for n in names
                  if n.endswith((".nbi", ".nbc")) and n.startswith(modules))
