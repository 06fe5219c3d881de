"""`NUMBAXENT_VECTOR_WIDTH`: the vector width of numbaxent's kernels only (`numbaxent/_vector_width.py`).

Each check runs in a fresh interpreter (the width is read once, when the kernels are first needed)
with its own kernel cache. Where the host has AVX-512, the kernels are compiled for an Intel CPU
whose LLVM tuning prefers 256-bit vectors (`NUMBA_CPU_NAME=skylake-avx512`, runnable on every
AVX-512 host): without the setting they hold no 512-bit instruction, with `512` they do, and a
user's Numba function compiled in the same process keeps LLVM's choice either way.
"""
from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from numbaxent import bench_cases

PROBE = textwrap.dedent("""
    import json, re
    import numpy as np, numba
    import numbaxent as nx
    from numbaxent import _rows, _vector_width

    x = np.random.default_rng(0).standard_normal((8, 2000)).astype(np.float32)
    t = np.arange(8) * 7
    loss = float(nx.cross_entropy(x, t, reduction="sum"))  # rows of 2000 classes: the row kernel
    k = _rows.index_kernel
    misses = sum(k.stats.cache_misses.values())
    asm = "\\n".join(k.inspect_asm().values()) if misses else ""

    @numba.njit(fastmath=True)
    def user(a):
        s = 0.0
        for i in range(a.shape[0]):
            s += a[i] * a[i]
        return s

    user(x[0])
    uasm = "\\n".join(user.inspect_asm().values())
    print(json.dumps({"width": _vector_width.WIDTH, "loss": loss, "misses": misses,
                      "hits": sum(k.stats.cache_hits.values()), "zmm": len(re.findall("zmm", asm)),
                      "ymm": len(re.findall("ymm", asm)), "user_zmm": len(re.findall("zmm", uasm))}))
""")


def _probe(width, cache, cpu=None):
    env = dict(os.environ, NUMBAXENT_CACHE_DIR=str(cache))
    env.pop("NUMBAXENT_VECTOR_WIDTH", None)
    env.pop("NUMBA_CPU_NAME", None)
    if width:
        env["NUMBAXENT_VECTOR_WIDTH"] = width
    if cpu:
        env["NUMBA_CPU_NAME"] = cpu
    r = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, env=env, timeout=600)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout.strip().splitlines()[-1])


def _reference_loss():
    x = np.random.default_rng(0).standard_normal((8, 2000)).astype(np.float32).astype(np.float64)
    t = np.arange(8) * 7
    m = x.max(axis=1)
    return float((m + np.log(np.exp(x - m[:, None]).sum(axis=1)) - x[np.arange(8), t]).sum())


def test_width_is_keyed_in_the_cache_and_applies_to_numbaxent_only(tmp_path):
    avx512 = platform.machine() in ("x86_64", "AMD64") and bench_cases.cpu_info()["isa"] == "avx512"
    cpu = "skylake-avx512" if avx512 else None
    plain = _probe(None, tmp_path, cpu)
    wide = _probe("512", tmp_path, cpu)  # same cache directory: must compile, not load `plain`'s
    again = _probe("512", tmp_path, cpu)
    assert plain["width"] is None and wide["width"] == "512"
    assert plain["misses"] > 0 and wide["misses"] > 0 and wide["hits"] == 0
    assert again["hits"] > 0 and again["misses"] == 0  # and the width's own entries are reused
    ref = _reference_loss()
    for r in (plain, wide, again):
        assert r["loss"] == pytest.approx(ref, rel=1e-6)
    if not avx512:
        pytest.skip("the instruction checks need an AVX-512 host; the cache keying was checked")
    assert plain["zmm"] == 0 and plain["ymm"] > 0  # LLVM's tuning for this CPU: 256-bit vectors
    assert wide["zmm"] > 0
    assert plain["user_zmm"] == 0 and wide["user_zmm"] == 0  # the user's function is left alone


def test_a_width_it_cannot_take_is_ignored_with_a_warning():
    env = dict(os.environ, NUMBAXENT_VECTOR_WIDTH="1024")
    r = subprocess.run([sys.executable, "-c", "from numbaxent import _vector_width as v; print(v.WIDTH)"],
                       capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "None"
    assert "NUMBAXENT_VECTOR_WIDTH='1024' is not one of 256, 512" in r.stderr
