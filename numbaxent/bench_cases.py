"""The benchmark cases and the one timer, shared by `numbaxent bench`, `bench_linear`, the asv suite
(`asv_bench/`) and the scripts in `benchmarks/`: the performance matrix S1..S9b, how each case's
arrays are made, a plain NumPy baseline, `timings`, and `cpu_info` (the CPU every table names)."""
from __future__ import annotations

import functools
import os
import platform
import subprocess
import time

import numpy as np

# case: (description, shape, options)
CASES = {
    "S1": ("LLM head", (4096, 32000), {}),
    "S2": ("large vocab", (1024, 128256), {}),
    "S3": ("ImageNet", (65536, 1000), {}),
    "S4": ("few classes", (1048576, 10), {}),
    "S5": ("segmentation, K-dim", (8, 21, 512, 512), {}),
    "S6": ("everything on", (4096, 32000), {"weight": True, "ignored": 0.1,
                                             "label_smoothing": 0.1}),
    "S7": ("soft targets", (65536, 1000), {"soft": True}),
    "S8": ("double", (65536, 1000), {"dtype": "float64"}),
    "S9": ("float16 input", (4096, 32000), {"dtype": "float16"}),
    "S9b": ("bfloat16 input", (4096, 32000), {"dtype": "bfloat16"}),
}


class MissingDependency(NotImplementedError):
    """A case needs an optional package that is not installed. A `NotImplementedError`: asv skips
    a benchmark whose `setup` raises one, instead of failing it."""


def case_unavailable(name: str) -> str | None:
    """Why case `name` cannot run in this environment (a missing optional package), or None."""
    if CASES[name][2].get("dtype") == "bfloat16":
        try:
            import ml_dtypes  # noqa: F401  (NumPy's bfloat16 dtype)
        except ImportError:
            return "ml_dtypes is not installed (pip install ml_dtypes, or 'numbaxent[bench]')"
    return None


def dtype_named(name: str) -> np.dtype:
    """NumPy's dtype for a name, `"bfloat16"` included (ml_dtypes' type; `MissingDependency` when
    ml_dtypes is not installed)."""
    if name != "bfloat16":
        return np.dtype(name)
    try:
        import ml_dtypes
    except ImportError:
        raise MissingDependency("bfloat16 needs ml_dtypes (pip install ml_dtypes, or 'numbaxent[bench]')") from None
    return np.dtype(ml_dtypes.bfloat16)


def make_case(name: str, quick: bool = False, seed: int = 0):
    """(logits, target, kwargs) for a case of the matrix (`quick`: 1/64 of the rows).

    Raises `MissingDependency` when the case needs a package that is not installed.
    """
    desc, shape, opts = CASES[name]
    why = case_unavailable(name)
    if why:
        raise MissingDependency(f"{name} ({desc}): {why}")
    if quick:
        shape = (max(1, shape[0] // 64),) + shape[1:]
        if len(shape) > 2:
            shape = (1, shape[1], 64, 64)
    rng = np.random.default_rng(seed)
    dtype = dtype_named(opts.get("dtype", "float32"))
    x = rng.standard_normal(shape, dtype=np.float32).astype(dtype, copy=False)
    c = shape[1]
    tshape = (shape[0],) + shape[2:]
    if opts.get("soft"):
        t = rng.random(shape, dtype=np.float32)
        t /= t.sum(axis=1, keepdims=True)
    else:
        t = rng.integers(0, c, tshape)
        if opts.get("ignored"):
            t[rng.random(tshape) < opts["ignored"]] = -100
    kw = {}
    if opts.get("weight"):
        kw["weight"] = rng.uniform(0.5, 2.0, c).astype(np.float32)
    if opts.get("label_smoothing"):
        kw["label_smoothing"] = opts["label_smoothing"]
    return x, t, kw


def numpy_cross_entropy_with_grad(x, t, weight=None, label_smoothing=0.0):
    """A plain NumPy implementation (class-index or probability targets, mean reduction): the
    baseline a user would write without numbaxent."""
    xc = x.astype(np.float32) if x.dtype.itemsize == 2 else x
    axis = 1
    m = xc.max(axis=axis, keepdims=True)
    logp = xc - m
    logp -= np.log(np.exp(logp).sum(axis=axis, keepdims=True))
    c = xc.shape[1]
    w = np.ones(c, xc.dtype) if weight is None else weight.astype(xc.dtype)
    wshape = (1, c) + (1,) * (xc.ndim - 2)
    if t.shape == x.shape:
        tt = t * (1 - label_smoothing) + label_smoothing / c if label_smoothing else t
        loss = -(logp * tt * w.reshape(wshape)).sum(axis=axis).mean()
        grad = (np.exp(logp) * (tt * w.reshape(wshape)).sum(axis, keepdims=True)
                - tt * w.reshape(wshape)) / (t.size // c)
        return loss, grad
    valid = t != -100
    tc = np.where(valid, t, 0)
    onehot = np.zeros_like(logp)
    np.put_along_axis(onehot, np.expand_dims(tc, axis), 1.0, axis)
    onehot *= np.expand_dims(valid, axis)
    wy = w[tc] * valid
    coef = (1 - label_smoothing) * onehot * w.reshape(wshape)
    if label_smoothing:
        coef = coef + (label_smoothing / c) * w.reshape(wshape) * np.expand_dims(valid, axis)
    W = wy.sum()
    loss = -(coef * logp).sum() / W
    grad = (np.exp(logp) * coef.sum(axis, keepdims=True) - coef) / W
    return loss, grad


def timings(fn, repeat: int, warmup: bool = True) -> list:
    """Seconds of `repeat` calls of `fn` after one warm-up call (`interleaved_timings` of one
    function: the one timer of every numbaxent benchmark script). `warmup=False` for a caller that
    alternates several functions one timed call at a time and has warmed them up itself."""
    return interleaved_timings({"fn": fn}, repeat, warmup=warmup)["fn"]


SETTLE_SECONDS = 0.2  # the pause after a call that frees large arrays (see interleaved_timings)


def interleaved_timings(fns: dict, repeat: int, fewer: dict | None = None, settle=(), warmup: bool = True) -> dict:
    """Seconds of `repeat` calls of each of `fns` ({name: zero-argument function}), taken in
    rounds: one warm-up call of each (unless `warmup` is False), then each round times one call of
    every function in turn.

    So the figures of one case see the same machine: on a shared machine whose speed drifts by
    tens of percent within a minute, timing each function's calls in a block of its own puts the
    drift into the ratios between them. `fewer` ({name: n}) times a slow function only in the
    first `n` rounds. After each call of a function named in `settle` the timer waits
    `SETTLE_SECONDS`, untimed: JAX frees its buffers on a thread of its own after the call returns
    (80 ms of system time after a 250 MB case, measured), which had doubled the time of the call
    timed next (numbaxent's float16 forward 18 -> 30-35 ms, 2-core Zen 4). Returns
    {name: [seconds, ...]}.
    """
    fewer = fewer or {}

    def call(name, fn):
        t0 = time.perf_counter()
        fn()
        t = time.perf_counter() - t0
        if name in settle:
            time.sleep(SETTLE_SECONDS)
        return t

    if warmup:
        for name, fn in fns.items():
            call(name, fn)
    ts = {name: [] for name in fns}
    for k in range(repeat):
        for name, fn in fns.items():
            if k < fewer.get(name, repeat):
                ts[name].append(call(name, fn))
    return ts


def _cpuinfo_fields() -> dict:
    """The first processor's fields of /proc/cpuinfo (Linux), or {}."""
    try:
        with open("/proc/cpuinfo") as f:
            text = f.read().split("\n\n", 1)[0]
    except OSError:
        return {}
    return {k.strip(): v.strip() for k, _, v in (ln.partition(":") for ln in text.splitlines())}


def _lscpu_model_name() -> str | None:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10,
                             env={**os.environ, "LC_ALL": "C"}).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    for line in out.splitlines():
        if line.startswith("Model name:"):
            return line.split(":", 1)[1].strip()
    return None


@functools.lru_cache(maxsize=None)
def cpu_info() -> dict:
    """The CPU the figures come from: {'model', 'vendor', 'family', 'model_id', 'llvm_cpu', 'isa'}.

    `model` is lscpu's 'Model name' (else /proc/cpuinfo's 'model name', else the platform's
    processor string); `vendor`, `family` and `model_id` are /proc/cpuinfo's vendor_id, cpu family
    and model (what tells Zen 3 from Zen 4, or Sapphire from Emerald Rapids, when a hypervisor
    shortens the model name); `llvm_cpu` is the CPU LLVM (hence Numba) compiles for; `isa` is the
    widest x86 vector extension the host reports: 'avx512' (avx512f), 'avx2', 'sse' or '' (not
    x86). Fields that cannot be read are None.
    """
    fields = _cpuinfo_fields()
    flags = set(fields.get("flags", "").split())
    llvm_cpu = None
    try:
        import llvmlite.binding as ll  # numba's own LLVM: the features its kernels are built for

        llvm_cpu = ll.get_host_cpu_name()
        if not flags:
            flags = {f[1:] for f in ll.get_host_cpu_features().flatten().split(",")
                     if f.startswith("+")}
    except Exception:  # noqa: BLE001  (an informative field only)
        pass
    if "avx512f" in flags:
        isa = "avx512"
    elif "avx2" in flags:
        isa = "avx2"
    elif flags & {"sse2", "sse4_2", "sse4.2"}:
        isa = "sse"
    else:
        isa = ""
    return {"model": _lscpu_model_name() or fields.get("model name") or platform.processor()
            or None,
            "vendor": fields.get("vendor_id"), "family": fields.get("cpu family"),
            "model_id": fields.get("model"), "llvm_cpu": llvm_cpu, "isa": isa}


def cpu_line() -> str:
    """`cpu_info()` as the one line printed above every benchmark table, e.g.
    'CPU: AMD EPYC (AuthenticAMD family 25 model 1, LLVM znver3), vector ISA avx2 (no AVX-512)', and
    the kernels' vector width when `NUMBAXENT_VECTOR_WIDTH` sets one."""
    c = cpu_info()
    ident = " ".join(p for p in (c["vendor"], c["family"] and f"family {c['family']}",
                                 c["model_id"] and f"model {c['model_id']}") if p)
    if c["llvm_cpu"]:
        ident = f"{ident}, LLVM {c['llvm_cpu']}" if ident else f"LLVM {c['llvm_cpu']}"
    isa = {"avx512": "avx512 (AVX-512F)", "avx2": "avx2 (no AVX-512)"}.get(c["isa"], c["isa"] or "?")
    from . import _vector_width  # (Numba's compiler modules: imported only when a table is printed)

    width = f", kernels' vector width {_vector_width.WIDTH} (NUMBAXENT_VECTOR_WIDTH)" if _vector_width.WIDTH else ""
    return f"CPU: {c['model'] or 'unknown'}" + (f" ({ident})" if ident else "") + \
        f", vector ISA {isa}{width}"
