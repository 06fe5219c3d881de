"""Threading-layer choice on every platform Numba supports, simulated: ``sys.platform`` and
``platform.machine()`` are set to each platform's, the loaders to what loads there (the tbb wheel
exists for x86-64 Linux, Windows and Intel macOS only; OpenMP is GNU on Linux, LLVM/Intel on macOS,
MS on Windows). Then, for real on this machine, numbaxent runs with TBB (and OpenMP) made
unloadable, including after ``fork()``.

Expected choices follow numba's documented layer properties (tbb > omp > workqueue, the first that
loads), not numbaxent's code.
"""
from __future__ import annotations

import ctypes
import os
import platform
import subprocess
import sys
import textwrap
import types

import numba
import pytest

from numbaxent import _threading

pytestmark = pytest.mark.smoke


@pytest.fixture
def fresh(monkeypatch):
    """A not-yet-configured ``_threading`` (restored afterwards, as is numba's config)."""
    monkeypatch.setattr(_threading, "_configured", False)
    monkeypatch.setattr(_threading, "_choice", None)
    monkeypatch.setattr(_threading, "_omp_vendor", None)
    monkeypatch.setattr(numba.config, "THREADING_LAYER", numba.config.THREADING_LAYER)
    monkeypatch.delenv("NUMBA_THREADING_LAYER", raising=False)
    return monkeypatch


def simulate(mp, plat, machine, tbb_loads, omp_vendor):
    """Pretend to be on ``plat``/``machine`` where TBB does or does not load and OpenMP of flavour
    ``omp_vendor`` (None: no OpenMP runtime) does. Returns the list of layers asked for, in order."""
    mp.setattr(sys, "platform", plat)
    mp.setattr(platform, "machine", lambda: machine)

    def no_real_library(name, *a, **k):  # nothing of the simulated platform is really loadable
        raise OSError(f"{name}: cannot open shared object file")

    mp.setattr(ctypes, "CDLL", no_real_library)
    asked = []

    def import_layer(layer):
        asked.append(layer)
        if layer == "tbb" and tbb_loads:
            return types.SimpleNamespace()
        if layer == "omp" and omp_vendor:
            return types.SimpleNamespace(openmp_vendor=omp_vendor)
        raise ImportError(f"numba.np.ufunc.{layer}pool: library not found")

    mp.setattr(_threading, "_import_layer", import_layer)
    return asked


PLATFORMS = [
    # platform, machine, TBB loads, OpenMP flavour that loads (None: none), expected layer
    ("linux", "x86_64", True, "GNU", "tbb"),         # the tbb wheel is a dependency there
    ("linux", "x86_64", False, "GNU", "omp"),        # installed without it (--no-deps, conda)
    ("linux", "aarch64", False, "GNU", "omp"),       # no tbb wheel: numba's GNU OpenMP
    ("linux", "aarch64", False, None, "workqueue"),  # no libgomp either
    ("linux", "ppc64le", False, None, "workqueue"),
    ("darwin", "arm64", False, None, "workqueue"),   # no tbb wheel, no libomp (the case)
    ("darwin", "arm64", False, "Intel", "omp"),      # brew/conda libomp: numba's vendor "Intel"
    ("darwin", "arm64", True, "Intel", "tbb"),       # conda's tbb
    ("darwin", "x86_64", True, None, "tbb"),         # the tbb wheel exists for Intel macOS
    ("win32", "AMD64", True, "MS", "tbb"),
    ("win32", "AMD64", False, "MS", "omp"),          # MS OpenMP ships with the VC++ runtime
    ("win32", "ARM64", False, None, "workqueue"),
]


@pytest.mark.parametrize("plat,machine,tbb,omp,expected", PLATFORMS)
def test_each_platform_takes_the_first_layer_that_loads(fresh, plat, machine, tbb, omp, expected):
    asked = simulate(fresh, plat, machine, tbb, omp)
    assert _threading.configure() == expected
    assert numba.config.THREADING_LAYER == expected
    assert _threading.threading_layer_choice() == expected
    assert _threading.openmp_vendor() == (omp if expected == "omp" else None)
    # asked in order, and no further than needed: no OpenMP runtime is loaded next to TBB
    assert asked == ["tbb", "omp"][:1 + (expected != "tbb")]
    assert _threading.configure() == expected  # once only
    assert asked == ["tbb", "omp"][:1 + (expected != "tbb")]


def test_a_layer_the_user_chose_is_kept_and_nothing_is_probed(fresh):
    asked = simulate(fresh, "linux", "x86_64", True, "GNU")
    fresh.setenv("NUMBA_THREADING_LAYER", "workqueue")
    before = numba.config.THREADING_LAYER
    assert _threading.configure() == "workqueue"
    assert asked == [] and numba.config.THREADING_LAYER == before


@pytest.mark.parametrize("plat,subdir,name", [
    ("linux", "lib", "libtbb.so.12"),
    ("darwin", "lib", "libtbb.12.dylib"),
    ("win32", os.path.join("Library", "bin"), "tbb12.dll"),
])
def test_the_tbb_wheels_library_is_found_where_pip_puts_it(fresh, tmp_path, plat, subdir, name):
    # pip installs the tbb wheel's data files under the environment's prefix, where the loader
    # does not look; numbaxent hands that path to the loader before numba looks the name up
    prefix = tmp_path / "venv"
    (prefix / subdir).mkdir(parents=True)
    lib = prefix / subdir / name
    lib.write_bytes(b"")
    fresh.setattr(sys, "platform", plat)
    fresh.setattr(sys, "prefix", str(prefix))
    fresh.setattr(sys, "base_prefix", str(prefix))
    loaded, dll_dirs = [], []

    def cdll(path, *a, **k):
        if not os.path.isabs(path):
            raise OSError(f"{path}: not on the loader's path")
        loaded.append(path)

    fresh.setattr(ctypes, "CDLL", cdll)
    fresh.setattr(os, "add_dll_directory", dll_dirs.append, raising=False)
    assert _threading._preload_tbb()
    assert loaded[0] == str(lib)
    assert dll_dirs == ([str(lib.parent)] if plat == "win32" else [])


def test_no_tbb_anywhere_is_not_an_error(fresh, tmp_path):
    fresh.setattr(sys, "prefix", str(tmp_path))
    fresh.setattr(sys, "base_prefix", str(tmp_path))
    fresh.setattr(_threading, "_tbb_candidates", lambda name: [])

    def absent(*a, **k):
        raise OSError("absent")

    fresh.setattr(ctypes, "CDLL", absent)
    assert _threading._preload_tbb() is False


# -- for real: the fallbacks compute, in threads and after fork() -------------------------------------
FALLBACK = """
import os, sys, threading
import numba  # numba's own platform flags: the real ones
for layer in {blocked}:  # these layers' libraries "are not installed"
    sys.modules["numba.np.ufunc." + layer + "pool"] = None
real, sys.platform = sys.platform, {platform!r}
from numbaxent import _jit  # numbaxent chooses the layer here
sys.platform = real
import numpy as np
import numbaxent as nx

numba.set_num_threads(2)
rng = np.random.default_rng(0)
x = rng.standard_normal((400, 400)); t = rng.integers(0, 400, 400)  # big enough for two threads
m = x.max(1, keepdims=True); lp = x - m - np.log(np.exp(x - m).sum(1, keepdims=True))
ref = -lp[np.arange(400), t]
errors = []
def work():
    for _ in range(5):
        if not np.allclose(nx.cross_entropy(x, t, reduction="none"), ref, rtol=1e-12):
            errors.append("mismatch")
ths = [threading.Thread(target=work) for _ in range(3)]
[th.start() for th in ths]; [th.join() for th in ths]
pid = os.fork()
if pid == 0:  # a forked child of a parent whose pools and layer have started
    os._exit(0 if np.allclose(nx.cross_entropy(x, t, reduction="none"), ref, rtol=1e-12) else 3)
_, status = os.waitpid(pid, 0)
print(numba.threading_layer(), not errors, os.waitstatus_to_exitcode(status))
"""


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork()")
@pytest.mark.parametrize("blocked,plat,expected", [
    (("tbb", "omp"), "darwin", "workqueue"),  # macOS arm64 without TBB or libomp
    (("tbb",), "linux", "omp"),               # Linux aarch64: GNU OpenMP
])
def test_without_tbb_numbaxent_runs_on_the_fallback(blocked, plat, expected):
    if expected == "omp":
        try:
            from numba.np.ufunc import omppool  # noqa: F401
        except ImportError:
            pytest.skip("numba's OpenMP layer does not load on this machine")
    env = {k: v for k, v in os.environ.items() if k != "NUMBA_THREADING_LAYER"}
    code = textwrap.dedent(FALLBACK).format(blocked=list(blocked), platform=plat)
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                       timeout=300)
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == [expected, "True", "0"], r.stdout + r.stderr
