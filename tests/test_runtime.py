"""Runtime behaviour: thread safety, fork safety, determinism across thread counts, the on-disk cache
(read-only fallback, invalidation, concurrent cold compiles), lazy import and the warmup command.

Expected values come from a plain float64 NumPy log-softmax written here, never from numbaxent.
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys
import textwrap
import threading

import numpy as np
import pytest

import numbaxent as nx

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def numpy_ce_none(x, t):
    x = x.astype(np.float64)
    m = x.max(axis=1, keepdims=True)
    logp = x - m - np.log(np.exp(x - m).sum(axis=1, keepdims=True))
    return -logp[np.arange(len(t)), t]


def run_py(code: str, env_extra=None, cwd=None, timeout=240):
    env = dict(os.environ)
    env.update(env_extra or {})
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True,
                          text=True, env=env, cwd=cwd, timeout=timeout)


# -- threads -------------------------------------------------------------------------------------------
@pytest.mark.smoke
def test_threading_layer_is_thread_and_fork_safe():
    import numba

    nx.cross_entropy(np.zeros((2, 3)), np.array([0, 1]))  # starts the thread pool
    from numbaxent._threading import threading_layer_choice

    choice = threading_layer_choice()
    assert choice in ("tbb", "omp", "workqueue")
    assert numba.threading_layer() == choice
    if sys.platform.startswith("linux") and os.uname().machine == "x86_64":
        assert choice == "tbb", "the tbb wheel is a dependency on this platform and must be found"


@pytest.mark.smoke
def test_concurrent_calls_from_python_threads_are_correct():
    rng = np.random.default_rng(0)
    xs = [rng.standard_normal((300, 17)) for _ in range(8)]
    ts = [rng.integers(0, 17, 300) for _ in range(8)]
    serial = [nx.cross_entropy_with_grad(x, t, reduction="none") for x, t in zip(xs, ts)]
    results = [None] * 8
    barrier = threading.Barrier(8)

    def work(i):
        barrier.wait()
        for _ in range(20):
            results[i] = nx.cross_entropy_with_grad(xs[i], ts[i], reduction="none")

    threads = [threading.Thread(target=work, args=(i,)) for i in range(8)]
    for th in threads:
        th.start()
    for th in threads:
        th.join(timeout=120)
        assert not th.is_alive()
    for i in range(8):
        np.testing.assert_array_equal(results[i][0], serial[i][0])
        np.testing.assert_array_equal(results[i][1], serial[i][1])
        np.testing.assert_allclose(serial[i][0], numpy_ce_none(xs[i], ts[i]), rtol=1e-12)


def test_results_identical_for_one_and_two_threads():
    import numba

    rng = np.random.default_rng(1)
    x = rng.standard_normal((999, 33)).astype(np.float32)
    t = rng.integers(0, 33, 999)
    n = numba.get_num_threads()
    try:
        numba.set_num_threads(1)
        one = nx.cross_entropy_with_grad(x, t, label_smoothing=0.1)
        numba.set_num_threads(n)
        many = nx.cross_entropy_with_grad(x, t, label_smoothing=0.1)
    finally:
        numba.set_num_threads(n)
    assert one[0].tobytes() == many[0].tobytes()
    np.testing.assert_array_equal(one[1], many[1])


FORK_SCRIPT = """
import os, sys, numpy as np, numbaxent as nx
import multiprocessing as mp
rng = np.random.default_rng(0)
x = rng.standard_normal((500, 40)); t = rng.integers(0, 40, 500)
ref = nx.cross_entropy(x, t)            # the parent uses the library (thread pool started) ...
pid = os.fork()                          # ... then forks
if pid == 0:
    ok = nx.cross_entropy(x, t) == ref
    os._exit(0 if ok else 3)
_, status = os.waitpid(pid, 0)
assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0, status

def child(i):
    return float(nx.cross_entropy(x, t))

with mp.get_context("fork").Pool(2) as pool:
    vals = pool.map(child, range(4))
assert all(v == float(ref) for v in vals), vals
print("FORK-OK")
"""


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
def test_forked_children_after_parent_used_library():
    r = run_py(FORK_SCRIPT, timeout=180)
    assert r.returncode == 0, r.stderr
    assert "FORK-OK" in r.stdout


# -- import and cache ------------------------------------------------------------------------------------
def test_import_compiles_nothing_and_does_not_import_numba():
    r = run_py("import sys, numbaxent; print('numba' in sys.modules)")
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "False"


CACHE_PROBE = """
import json, sys, numpy as np
import numbaxent as nx
from numbaxent import _kernels, _cache
rng = np.random.default_rng(int(sys.argv[1]) if len(sys.argv) > 1 else 0)
x = rng.standard_normal((64, 50)); t = rng.integers(0, 50, 64)  # 50 classes: the row kernel
loss = nx.cross_entropy(x, t, reduction="none")
m = x.max(1, keepdims=True); lp = x - m - np.log(np.exp(x - m).sum(1, keepdims=True))
ok = bool(np.allclose(loss, -lp[np.arange(64), t], rtol=1e-12))
k = _kernels.index_kernel
print(json.dumps(dict(ok=ok, hits=sum(k._cache_hits.values()), misses=sum(k._cache_misses.values()),
                      dir=_cache.cache_dir())))
"""


@pytest.fixture
def package_copy(tmp_path):
    """A private copy of the package (so its cache starts cold and can be made unwritable)."""
    dst = tmp_path / "site"
    shutil.copytree(os.path.join(ROOT, "numbaxent"), dst / "numbaxent",
                    ignore=shutil.ignore_patterns("__pycache__"))
    env = {"PYTHONPATH": str(dst), "XDG_CACHE_HOME": str(tmp_path / "xdg"), "HOME": str(tmp_path)}
    return dst, env


def _probe_run(env, seed=0, prefix=()):
    env = {k: v for k, v in {**os.environ, **env}.items()
           if k not in ("NUMBA_CACHE_DIR", "NUMBAXENT_CACHE_DIR") or k in env}
    # cwd matters: `python -c` puts the working directory first on sys.path
    return subprocess.run([*prefix, sys.executable, "-c", CACHE_PROBE, str(seed)],
                          capture_output=True, cwd=env["PYTHONPATH"], text=True, env=env,
                          timeout=300)


def _probe(env, seed=0):
    r = _probe_run(env, seed)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout.strip().splitlines()[-1])


def _user_cache(tmp_path, dst):
    import hashlib

    tag = hashlib.sha1(str(dst / "numbaxent").encode()).hexdigest()[:16]
    return str(tmp_path / "xdg" / "numbaxent" / tag)


def test_cache_hit_then_invalidated_by_a_change_in_another_module(package_copy, tmp_path):
    dst, env = package_copy
    first = _probe(env)
    assert first["ok"] and first["misses"] >= 1 and first["hits"] == 0
    # new entries go to the user cache, not into the installed package (uninstall leaves nothing)
    assert first["dir"] == _user_cache(tmp_path, dst)
    assert not any(n.endswith(".nbi") for n in os.listdir(dst / "numbaxent" / "__pycache__")) \
        if (dst / "numbaxent" / "__pycache__").is_dir() else True
    second = _probe(env)
    assert second["ok"] and second["hits"] >= 1 and second["misses"] == 0
    # a change in _math.py (not the kernel's own file) must invalidate the kernel's cache entry
    with open(dst / "numbaxent" / "_math.py", "a") as f:
        f.write("\n# changed\n")
    third = _probe(env)
    assert third["ok"] and third["misses"] >= 1 and third["hits"] == 0


def test_nothing_writable_compiles_in_memory_and_warns_once(package_copy, tmp_path):
    dst, env = package_copy
    # root may write anywhere: make every candidate impossible instead (a file where a directory
    # would be created)
    blocker = tmp_path / "blocker"
    blocker.write_text("a file")
    env = dict(env, XDG_CACHE_HOME=str(blocker), HOME=str(blocker))
    (dst / "numbaxent" / "__pycache__").write_text("not a directory")
    r = _probe_run(env)
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert out["ok"] and out["dir"] is None and out["hits"] == 0
    assert r.stderr.count("no writable directory for the kernel cache") == 1, r.stderr
    assert "Traceback" not in r.stderr


@contextlib.contextmanager
def _read_only(path):
    """Make ``path`` unwritable even for root (``chattr +i``), or skip."""
    if os.geteuid() == 0:
        if shutil.which("chattr") is None or subprocess.run(["chattr", "+i", str(path)],
                                                            capture_output=True).returncode:
            pytest.skip("cannot make a directory read-only for root here (chattr +i)")
        try:
            yield
        finally:
            subprocess.run(["chattr", "-i", str(path)], check=True)
    else:
        mode = os.stat(path).st_mode
        os.chmod(path, 0o555)
        try:
            yield
        finally:
            os.chmod(path, mode)


def _unprivileged():
    """Command prefix running a process as 'nobody' with no writable home, when we are root: it may
    read everything (the interpreter lives under /root here) but write only where anyone may."""
    if os.geteuid() != 0 or shutil.which("setpriv") is None:
        return []
    return ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups",
            "--inh-caps=+dac_read_search", "--ambient-caps=+dac_read_search"]


def test_warmup_cache_dir_is_read_by_another_user_and_cleared(package_copy, tmp_path):
    dst, env = package_copy
    shared = tmp_path / "shared"
    full = {k: v for k, v in {**os.environ, **env}.items() if k != "NUMBA_CACHE_DIR"}
    r = subprocess.run([sys.executable, "-m", "numbaxent", "warmup", "--dtypes", "float64",
                        "--only", "class-index softcap=off", "--cache-dir", str(shared)],
                       capture_output=True, text=True, env=full, cwd=dst, timeout=600)
    assert r.returncode == 0, r.stderr
    assert str(shared) in r.stderr and "class-index" in r.stderr
    assert any(n.endswith(".nbi") for n in os.listdir(shared))
    before = sorted(os.listdir(shared))

    # another user, no writable home, the shared cache read-only: every kernel is a hit
    other = dict(env, NUMBAXENT_CACHE_DIR=str(shared), HOME="/nonexistent")
    other.pop("XDG_CACHE_HOME")
    prefix = _unprivileged()
    if not prefix:  # not root: the same user, with nothing else writable
        blocker = tmp_path / "blocker"
        blocker.write_text("a file")
        other.update(XDG_CACHE_HOME=str(blocker))
        (dst / "numbaxent" / "__pycache__").write_text("not a directory")
    with _read_only(shared):
        r = _probe_run(other, prefix=prefix)
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert out["ok"] and out["hits"] >= 1 and out["misses"] == 0, out
    assert out["dir"] is None  # nothing writable for this user ...
    assert r.stderr.count("no writable directory") == 1  # ... said once, no traceback
    assert "Traceback" not in r.stderr
    assert sorted(os.listdir(shared)) == before

    # `numbaxent cache` lists the shared directory and --clear empties it
    listing = subprocess.run([sys.executable, "-m", "numbaxent", "cache"], capture_output=True,
                             text=True, env={**full, "NUMBAXENT_CACHE_DIR": str(shared)}, cwd=dst)
    assert listing.returncode == 0 and str(shared) in listing.stdout
    n_index = sum(n.endswith(".nbi") for n in before)
    assert f"{n_index} kernels" in listing.stdout
    cleared = subprocess.run([sys.executable, "-m", "numbaxent", "cache", "--clear"],
                             capture_output=True, text=True,
                             env={**full, "NUMBAXENT_CACHE_DIR": str(shared)}, cwd=dst)
    assert cleared.returncode == 0, cleared.stderr
    assert not any(n.endswith((".nbi", ".nbc")) for n in os.listdir(shared))


def test_concurrent_cold_compiles_in_several_processes(package_copy):
    dst, env = package_copy
    full_env = {k: v for k, v in {**os.environ, **env}.items()
                if k not in ("NUMBA_CACHE_DIR", "NUMBAXENT_CACHE_DIR")}
    procs = [subprocess.Popen([sys.executable, "-c", CACHE_PROBE, str(i)], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, env=full_env, cwd=dst)
             for i in range(3)]
    for p in procs:
        out, err = p.communicate(timeout=300)
        assert p.returncode == 0, err
        assert json.loads(out.strip().splitlines()[-1])["ok"]
    after = _probe(env, seed=7)
    assert after["ok"] and after["hits"] >= 1 and after["misses"] == 0


@pytest.mark.parametrize("jobs", [1, 2])
def test_warmup_command_compiles_and_reports(jobs):
    from numbaxent import _warmup

    r = subprocess.run([sys.executable, "-m", "numbaxent", "warmup", "--dtypes", "float64",
                        "--jobs", str(jobs)], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    assert "done in" in r.stderr
    # every variant compiled exactly once, whether by one process or shared between two
    labels = [label for label, _ in _warmup.variants(("float64",))]
    assert len(labels) >= 5
    for label in labels:
        assert r.stderr.count(f"  {label}  ") == 1, (label, r.stderr)


def test_warmup_shares_keep_each_dtype_in_one_worker():
    """`_warmup.shares`: every variant goes to one worker; with at least as many dtypes as workers
    each dtype's variants stay together (their shared helpers compile once) and the workers' loads
    differ by at most one dtype's variants; with fewer dtypes the target kinds are split."""
    from numbaxent import _warmup

    labels = [label for label, _ in _warmup.variants()]
    dtypes = [label.split()[0] for label in labels]
    for jobs in (1, 2, 3, 4):
        owner = _warmup.shares(labels, jobs)
        assert len(owner) == len(labels) and set(owner) <= set(range(jobs))
        if len(set(dtypes)) >= jobs:
            for d in set(dtypes):
                assert len({w for w, dd in zip(owner, dtypes) if dd == d}) == 1, (jobs, d)
            load = [owner.count(w) for w in range(jobs)]
            biggest = max(dtypes.count(d) for d in set(dtypes))
            assert max(load) - min(load) <= biggest and min(load) > 0, (jobs, load)
    one = [label for label, _ in _warmup.variants(("float64",))]
    owner = _warmup.shares(one, 2)
    assert set(owner) == {0, 1}  # one dtype, two workers: both busy
    kinds = [tuple(label.split()[:2]) for label in one]
    for kind in set(kinds):
        assert len({w for w, k in zip(owner, kinds) if k == kind}) == 1


def test_warmup_rejects_zero_jobs():
    r = subprocess.run([sys.executable, "-m", "numbaxent", "warmup", "--jobs", "0"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "--jobs" in r.stderr


def test_bfloat16_and_float16_are_computed_in_float32_and_rounded_once():
    ml_dtypes = pytest.importorskip("ml_dtypes")
    rng = np.random.default_rng(3)
    x32 = rng.standard_normal((40, 6)).astype(np.float32)
    t = rng.integers(0, 6, 40)
    for dt in (np.dtype(np.float16), np.dtype(ml_dtypes.bfloat16)):
        xh = x32.astype(dt)
        loss, grad = nx.cross_entropy_with_grad(xh, t, reduction="none")
        assert loss.dtype == dt and grad.dtype == dt
        xw = xh.astype(np.float64)
        ref = numpy_ce_none(xw, t)
        # one rounding of a float32-accurate value: within one ulp of the dtype
        ulp = np.abs(ref.astype(dt).astype(np.float64)) * float(ml_dtypes.finfo(dt).eps) + 1e-30
        assert np.all(np.abs(loss.astype(np.float64) - ref) <= ulp)
        p = np.exp(xw - xw.max(1, keepdims=True))
        p /= p.sum(1, keepdims=True)
        gref = p.copy()
        gref[np.arange(40), t] -= 1
        gulp = np.abs(gref) * float(ml_dtypes.finfo(dt).eps) + 1e-7
        assert np.all(np.abs(grad.astype(np.float64) - gref) <= gulp)


WORKQUEUE_SCRIPT = """
import threading, numpy as np, numbaxent as nx, numba
rng = np.random.default_rng(0)
x = rng.standard_normal((400, 30)); t = rng.integers(0, 30, 400)
ref = nx.cross_entropy(x, t, reduction="none")
assert numba.threading_layer() == "workqueue"
errors = []
def work():
    for _ in range(30):
        if not np.array_equal(nx.cross_entropy(x, t, reduction="none"), ref):
            errors.append("mismatch")
ths = [threading.Thread(target=work) for _ in range(4)]
[th.start() for th in ths]; [th.join() for th in ths]
assert not errors
print("WQ-OK")
"""


def test_non_thread_safe_layer_is_serialised_not_aborted():
    # numba's workqueue layer aborts the process on concurrent parallel regions; numbaxent's kernels
    # run none (they are dealt to Python threads), so concurrent calls are safe with it too
    r = run_py(WORKQUEUE_SCRIPT, env_extra={"NUMBA_THREADING_LAYER": "workqueue"}, timeout=300)
    assert r.returncode == 0, r.stderr
    assert "WQ-OK" in r.stdout


ASM_PROBE = """
import numba, numpy as np
from numbaxent import _kernels

@numba.njit(fastmath={"reassoc", "contract"}, error_model="numpy")
def probe(row, m):  # the helper has no Python entry point: LLVM inlines it into this one
    return _kernels.row_sumexp(row, m, None, row, False, row)[0]

row = np.linspace(-3, 3, 257).astype(np.float32)
probe(row, np.float32(3.0))
asm = probe.inspect_asm(probe.signatures[0])
packed = [ln for ln in asm.splitlines() if "ps\t" in ln and ("%ymm" in ln or "%zmm" in ln)]
print(len(packed))
"""


def test_row_loops_compile_to_packed_simd_instructions(tmp_path):
    # LLVM does not vectorise math.exp here (no SVML); numbaxent's exp is plain arithmetic so the
    # row loops must come out as packed AVX instructions: check the machine code of the exp-sum loop
    # (through an uncached wrapper: numba cannot show the assembly of cached code)
    import platform

    if platform.machine() not in ("x86_64", "AMD64"):
        pytest.skip("x86-64 assembly check")
    r = run_py(ASM_PROBE)
    assert r.returncode == 0, r.stderr
    assert int(r.stdout.strip().splitlines()[-1]) > 10, "the float32 exp-sum loop is not vectorised"


# -- helpers compiled for linking only ----------------------------------------------------------------
def test_helpers_get_no_machine_code_and_their_kernel_is_right():
    # `_jit.jit()` helpers (no Python entry point) are compiled into a library that is only linked
    # into callers (`_linkonly`): no machine code or cache entry of their own; callers compute as before
    import numba

    from numbaxent import _cache, _jit, _linkonly

    if not _linkonly.available():
        pytest.skip(f"helpers are compiled the ordinary way with this numba ({_linkonly.TESTED})")

    @_jit.jit()
    def weighted_sum(a, w):  # a leaf helper
        s = 0.0
        for i in range(a.shape[0]):
            s += a[i] * w
        return s

    @_jit.jit()
    def row_sums(x, w):  # a helper calling a helper, allocating (NRT) and returning an array
        out = np.empty(x.shape[0])
        for r in range(x.shape[0]):
            out[r] = weighted_sum(x[r], w)
        return out

    @numba.njit  # the caller: not a cached numbaxent kernel, so that every run compiles it all
    def kernel(x, w):
        return row_sums(x, w)

    x = np.arange(12.0).reshape(3, 4)
    np.testing.assert_array_equal(kernel(x, 0.5), x.sum(axis=1) * 0.5)
    for helper in (weighted_sum, row_sums):
        (cres,) = helper.overloads.values()
        assert isinstance(cres.library, _linkonly.LinkOnlyLibrary)
        assert cres.library.get_pointer_to_function(cres.fndesc.llvm_func_name) == 0
        assert not isinstance(helper._cache, _cache.KernelCache)
    (cres,) = kernel.overloads.values()
    assert not isinstance(cres.library, _linkonly.LinkOnlyLibrary)
    assert cres.library.get_pointer_to_function(cres.fndesc.llvm_func_name) != 0
    # numbaxent's own helpers are built that way, its kernels are not (and are cached)
    from numbaxent import _columns, _rows

    for helper in (_columns.cols_sums, _columns.cols_block_grad, _rows.index_row):
        assert helper._compiler.pipeline_class is _linkonly.LinkOnlyCompiler
        assert not isinstance(helper._cache, _cache.KernelCache)
    for kern in (_columns.index_cols_kernel, _rows.index_kernel):
        assert kern._compiler.pipeline_class is not _linkonly.LinkOnlyCompiler
        assert isinstance(kern._cache, _cache.KernelCache)
