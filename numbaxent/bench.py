"""`numbaxent bench`: side-by-side timings of numbaxent, the memory floors, plain NumPy, PyTorch CPU
and JAX/optax (when installed), in one process, at 1 thread and at all threads.

Floors, measured on the same arrays: forward = one read of the logits, the fastest (by median) of
several one-pass NumPy reductions over their bytes (`read_floor_candidates`: float add and maximum
for float32/float64, bitwise or over uint64/uint32 views, maximum over a uint16 view; which is
fastest depends on the CPU and the dtype, and the table names the one kept); forward+backward =
`np.copyto(grad, logits)` (one read, one write). numbaxent's forward+backward writes into a
preallocated gradient (`out=`), like the floor; PyTorch and JAX allocate theirs. JAX computes a
float64 case in float64 (`jax_enable_x64` is set for that case and restored afterwards). Each
figure is the median (and min) of `--repeat` calls after a warm-up, taken in rounds that call
the floors and numbaxent once each, so a shared machine's drift reaches them alike (then NumPy,
PyTorch and JAX in rounds of their own: see `run_case`).
Every table starts with the CPU it was measured on (lscpu's model name, vendor family/model,
LLVM's CPU name, AVX2 or AVX-512).

    numbaxent bench                                  # the whole matrix, 1 and all threads
    numbaxent bench --cases S1,S3 --repeat 5 --markdown perf.md --plot perf.png
    numbaxent bench --quick                          # small shapes, a smoke run
    numbaxent bench --cases S8 --threads 2 --json s8.json   # every figure as JSON, with the CPU

After the timings, a second table gives each call's extra memory (tracemalloc peak of NumPy
allocations during one warm call): forward and `out=` should add O(rows) bytes, forward+backward
one gradient array.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import sys
import time

import numpy as np

from . import _api
from .bench_cases import (CASES, SETTLE_SECONDS, case_unavailable, cpu_info, cpu_line,
                          interleaved_timings, make_case, numpy_cross_entropy_with_grad)

def _median_min(ts):
    return float(np.median(ts)), float(np.min(ts))


def read_floor_candidates(x) -> dict:
    """One-pass NumPy reductions that each read every byte of `x` exactly once (and write a
    scalar): {name: zero-argument function}. The forward floor is the fastest of them, per case.

    Which one is fastest depends on the CPU and the dtype (`np.add.reduce` over float32 is slower
    than one read on Intel Xeon, NumPy has no vectorised float16 sum and no bfloat16 arithmetic),
    so the bench times them all: the float sum and maximum where NumPy vectorises them (float32,
    float64), and integer reductions over an integer view of the same buffer (bitwise or over
    uint64 and uint32 lanes, maximum over uint16 lanes; every dtype, half precision included).
    """
    out = {}
    if x.dtype in (np.float32, np.float64):
        out["add"] = lambda: np.add.reduce(x, axis=None)
        out["maximum"] = lambda: np.maximum.reduce(x, axis=None)
    if x.flags.c_contiguous:
        raw = x.reshape(-1).view(np.uint8)
        for name, ufunc, dt in (("or/uint64", np.bitwise_or, np.uint64),
                                ("or/uint32", np.bitwise_or, np.uint32),
                                ("maximum/uint16", np.maximum, np.uint16)):
            if raw.size % np.dtype(dt).itemsize == 0:
                v = raw.view(dt)
                out[name] = (lambda u, v: lambda: u.reduce(v, axis=None))(ufunc, v)
    if not out:  # a strided array of another dtype: the plain sum is the one read left
        out["add"] = lambda: np.add.reduce(x, axis=None)
    return out


def _fastest_floor(ts):
    """(median s, min s, name) of the read-floor candidate with the lowest median in `ts`."""
    name = min(ts, key=lambda k: np.median(ts[k]))
    return (*_median_min(ts[name]), name)


def _torch_fns(x, t, kw):
    try:
        import torch
    except ImportError:
        return {}
    if x.dtype.name == "bfloat16":
        xt = torch.from_numpy(x.view(np.int16)).view(torch.bfloat16)
    else:
        xt = torch.from_numpy(x)
    tt = torch.from_numpy(t)
    w = None if "weight" not in kw else torch.from_numpy(kw["weight"]).to(xt.dtype)
    eps = kw.get("label_smoothing", 0.0)

    def fwd():
        with torch.no_grad():
            torch.nn.functional.cross_entropy(xt, tt, weight=w, label_smoothing=eps)

    def fwd_bwd():
        a = xt.detach().requires_grad_()
        torch.nn.functional.cross_entropy(a, tt, weight=w, label_smoothing=eps).backward()

    return {"torch": (fwd, fwd_bwd)}


def _jax_fns(x, t, kw):
    """JAX/optax-style forward and forward+backward on the case's arrays, in the logits' dtype.

    Call inside `_jax_dtype(x)`: JAX computes in float32 unless `jax_enable_x64` is set, so a
    float64 case is only timed with it on (and its result checked to be float64).
    """
    try:
        import jax
        import jax.numpy as jnp
    except ImportError:
        return {}
    if x.ndim != 2 or x.dtype.name == "bfloat16" or "weight" in kw or kw.get("label_smoothing"):
        return {}  # only the plain (N, C) cases are expressed here
    xj = jnp.asarray(x)
    if xj.dtype != x.dtype:  # float64 without jax_enable_x64: not the case's precision
        raise _NotInDtype(f"JAX computes {x.dtype} here in {xj.dtype} (jax_enable_x64 could not "
                          f"be set)")
    soft = t.shape == x.shape
    tj = jnp.asarray(t)

    def loss(z, tgt):  # the target is an argument, not a closed-over constant XLA would fold
        logp = jax.nn.log_softmax(z, axis=-1)
        if soft:
            return -(logp * tgt).sum(-1).mean()
        return -jnp.take_along_axis(logp, tgt[:, None], axis=-1).mean()

    f = jax.jit(loss)
    fb = jax.jit(jax.value_and_grad(loss))
    return {"jax": (lambda: f(xj, tj).block_until_ready(),
                    lambda: jax.block_until_ready(fb(xj, tj)))}


class _NotInDtype(Exception):
    """A library cannot compute the case in the logits' own dtype: its column is left out."""


@contextlib.contextmanager
def _jax_dtype(x):
    """`jax_enable_x64` on while a float64 case is built and timed, restored afterwards (JAX
    computes float64 inputs in float32 without it); nothing for the other dtypes."""
    try:
        import jax
    except ImportError:
        yield
        return
    old = bool(jax.config.jax_enable_x64)
    want = old or x.dtype == np.float64
    if want != old:
        jax.config.update("jax_enable_x64", want)
    try:
        yield
    finally:
        if want != old:
            jax.config.update("jax_enable_x64", old)


def _set_threads(n):
    import numba

    numba.set_num_threads(n)
    try:
        import torch

        torch.set_num_threads(n)
    except ImportError:
        pass


def run_case(name, threads, repeat, quick=False):
    """Every figure of one case at `threads` threads: {key: (median s, min s)} plus the case's
    description. The floor candidates and numbaxent's calls are timed in rounds, one call of each
    per round (`interleaved_timings`), so the ratios to the floors are taken side by side even
    when the machine's speed drifts; then NumPy, PyTorch and JAX in rounds of their own. They
    allocate and free arrays of the logits' size on every call (gigabytes for NumPy's), and the
    system's work that follows (page reclaim, JAX's freeing on a thread of its own) had slowed the
    numbaxent and floor calls timed between them by up to 2x on a 2-core machine."""
    x, t, kw = make_case(name, quick)
    grad = np.empty_like(x)
    _set_threads(threads)
    r = {"case": name, "threads": threads, "desc": CASES[name][0], "shape": x.shape,
         "dtype": x.dtype.name}
    floors = {f"floor:{k}": fn for k, fn in read_floor_candidates(x).items()}
    time.sleep(SETTLE_SECONDS)  # after the case's arrays were made (and the last case's were freed)
    ts = interleaved_timings({**floors, "floor_fb": lambda: np.copyto(grad, x),
                              "nx_fwd": lambda: _api.cross_entropy(x, t, **kw),
                              "nx_fb": lambda: _api.cross_entropy_with_grad(x, t, out=grad, **kw)}, repeat)
    foreign, fewer = {}, {}
    if x.dtype.name != "bfloat16":
        foreign["numpy_fb"] = lambda: numpy_cross_entropy_with_grad(x, t, **kw)
        fewer["numpy_fb"] = max(1, repeat // 2)  # seconds a call on the large cases
    for lib, (fwd, fb) in _torch_fns(x, t, kw).items():
        foreign[f"{lib}_fwd"], foreign[f"{lib}_fb"] = fwd, fb
    with _jax_dtype(x):  # JAX's calls stay inside: a float64 case runs with jax_enable_x64 on
        try:
            for lib, (fwd, fb) in _jax_fns(x, t, kw).items():
                foreign[f"{lib}_fwd"], foreign[f"{lib}_fb"] = fwd, fb
                if lib == "jax":
                    r["jax_dtype"] = x.dtype.name
        except _NotInDtype as e:
            r["jax_skip"] = str(e)
        ts.update(interleaved_timings(foreign, repeat, fewer, settle=list(foreign)))
    med, low, r["floor_fwd_op"] = _fastest_floor({k.split(":", 1)[1]: ts.pop(k) for k in floors})
    r["floor_fwd"] = (med, low)
    r.update({k: _median_min(v) for k, v in ts.items()})
    return r


def _traced_peak(fn) -> int:
    """Peak bytes allocated through NumPy (which reports to tracemalloc) during one call of `fn`."""
    import tracemalloc

    fn()  # warm: compiled, workspace grown
    tracemalloc.start()
    try:
        tracemalloc.reset_peak()
        fn()
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def memory_case(name, quick=False):
    """Extra memory of numbaxent's calls on a case, in bytes: forward, forward+backward allocating
    its gradient, and forward+backward into `out=` (kernel scratch, a few KB a thread, is not
    traced). Expected: O(rows) for forward and `out=`; one gradient array (`logits.nbytes`) plus
    O(rows) otherwise."""
    x, t, kw = make_case(name, quick)
    grad = np.empty_like(x)
    rows = x.size // x.shape[1]
    return {"case": name, "logits": x.nbytes, "rows": rows,
            "fwd": _traced_peak(lambda: _api.cross_entropy(x, t, **kw)),
            "fb": _traced_peak(lambda: _api.cross_entropy_with_grad(x, t, **kw)),
            "fb_out": _traced_peak(lambda: _api.cross_entropy_with_grad(x, t, out=grad, **kw))}


def memory_table(rows) -> str:
    lines = [cpu_line(), "", "| case | logits MB | rows | fwd extra MB (bytes/row) | fwd+bwd extra MB "
             "(/ logits) | fwd+bwd with out= extra MB (bytes/row) |", "|---|---|---|---|---|---|"]
    for r in rows:
        mb = 1 / 2**20
        lines.append(f"| {r['case']} | {r['logits'] * mb:.1f} | {r['rows']} | "
                     f"{r['fwd'] * mb:.2f} ({r['fwd'] / r['rows']:.1f}) | {r['fb'] * mb:.1f} "
                     f"({r['fb'] / r['logits']:.3f}) | {r['fb_out'] * mb:.2f} "
                     f"({r['fb_out'] / r['rows']:.1f}) |")
    return "\n".join(lines)


def _time_ratio(r, a, b):
    return r[a][0] / r[b][0] if a in r and b in r else float("nan")


def table(rows) -> str:
    head = ("| case | threads | numbaxent fwd ms | fwd floor ms | fwd / floor | numbaxent fwd+bwd ms "
            "| fwd+bwd floor ms | fwd+bwd / floor | torch fwd+bwd ms | torch / numbaxent | "
            "jax fwd+bwd ms | jax / numbaxent | numpy fwd+bwd ms | fwd floor read |")
    lines = [cpu_line(), "", head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        def ms(k):
            return f"{r[k][0] * 1e3:.1f}" if k in r else "—"

        def ra(a, b):
            v = _time_ratio(r, a, b)
            return f"{v:.2f}" if v == v else "—"

        lines.append(f"| {r['case']} {r['desc']} | {r['threads']} | {ms('nx_fwd')} | "
                     f"{ms('floor_fwd')} | {ra('nx_fwd', 'floor_fwd')} | {ms('nx_fb')} | "
                     f"{ms('floor_fb')} | {ra('nx_fb', 'floor_fb')} | {ms('torch_fb')} | "
                     f"{ra('torch_fb', 'nx_fb')} | {ms('jax_fb')} | {ra('jax_fb', 'nx_fb')} | "
                     f"{ms('numpy_fb')} | {r.get('floor_fwd_op', '—')} |")
    return "\n".join(lines)


def notes(rows) -> list:
    """One line per reason a column of `table(rows)` shows "—" (a library not installed, a case a
    baseline does not express), and how the forward floor and JAX's float64 figures were taken."""
    out = []
    if any("floor_fwd_op" in r for r in rows):
        out.append("fwd floor: the fastest one-pass NumPy read of the logits' bytes (float add and "
                   "maximum for float32/float64, bitwise or over uint64/uint32 views, maximum over "
                   "a uint16 view; the last column names the one kept); fwd+bwd floor: "
                   "np.copyto into a preallocated array")
    for lib, name in (("torch", "PyTorch"), ("jax", "JAX")):
        if all(f"{lib}_fb" in r for r in rows):
            continue
        try:
            __import__(lib)
        except ImportError:
            out.append(f"{lib} —: {name} is not installed (pip install {lib})")
            continue
        if lib == "jax":
            if any("jax_fb" not in r and "jax_skip" not in r for r in rows):
                out.append("jax —: only the plain (N, C) cases (no class weight, no label "
                           "smoothing, not bfloat16) are written in JAX")
            for r in rows:
                if "jax_skip" in r:
                    out.append(f"jax —: {r['case']} left out: {r['jax_skip']}")
    x64 = sorted({r["case"] for r in rows if r.get("jax_dtype") == "float64"})
    if x64:
        out.append(f"jax: {', '.join(x64)} computed in float64 (jax_enable_x64 on for those "
                   f"cases only)")
    if any("numpy_fb" not in r for r in rows):
        out.append("numpy —: NumPy has no bfloat16 arithmetic, so there is no plain NumPy baseline "
                   "for bfloat16 cases")
    return out


def plot(rows, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in rows if r["threads"] == max(x["threads"] for x in rows)]
    names = [r["case"] for r in rows]
    series = [("numbaxent", "nx_fb"), ("torch", "torch_fb"), ("jax", "jax_fb")]
    fig, ax = plt.subplots(figsize=(9, 3.8))
    width = 0.25
    for i, (label, key) in enumerate(series):
        vals = [_time_ratio(r, key, "floor_fb") for r in rows]
        ax.bar(np.arange(len(rows)) + (i - 1) * width, vals, width, label=label)
    ax.axhline(1.0, color="k", lw=0.8)
    ax.set_yscale("log")
    ax.set_xticks(np.arange(len(rows)), names)
    ax.set_ylabel("forward+backward time / memory floor")
    ax.set_title(f"cross-entropy forward+backward, {rows[0]['threads']} threads (lower is better)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def parser() -> argparse.ArgumentParser:
    import numba

    ap = argparse.ArgumentParser(prog="numbaxent bench",
                                 description=__doc__.splitlines()[0].replace("``", ""))
    ap.add_argument("--cases", default=",".join(CASES), help="comma-separated (default: all)")
    ap.add_argument("--threads", default=f"1,{numba.config.NUMBA_NUM_THREADS}",
                    help="comma-separated thread counts (default: %(default)s)")
    ap.add_argument("--repeat", type=int, default=3,
                    help="timed calls per figure, after one warm-up call (default: %(default)s)")
    ap.add_argument("--quick", action="store_true", help="1/64 of the rows (a smoke run)")
    ap.add_argument("--markdown", metavar="FILE", help="also write the table to FILE")
    ap.add_argument("--plot", metavar="FILE.png", help="write a bar chart of the ratios")
    ap.add_argument("--json", metavar="FILE",
                    help="also write every figure (seconds: median, min), the CPU and the options "
                         "to FILE as JSON")
    ap.add_argument("--lm", action="store_true", help="also time the LM-head training step")
    ap.add_argument("--no-memory", action="store_true",
                    help="skip the tracemalloc table of extra memory per call")
    return ap


def main(argv=None) -> int:
    ap = parser()
    args = ap.parse_args(argv)
    names = [c.strip() for c in args.cases.split(",") if c.strip()]
    unknown = [c for c in names if c not in CASES]
    if unknown:
        ap.error(f"unknown case(s) {unknown}; choose from {list(CASES)}")
    for name in list(names):
        why = case_unavailable(name)
        if why:
            print(f"numbaxent bench: skipping {name} ({CASES[name][0]}): {why}", file=sys.stderr)
            names.remove(name)
    if not names:
        print("numbaxent bench: no case left to run", file=sys.stderr)
        return 1
    threads = sorted({int(s) for s in args.threads.split(",")})
    rows = []
    for n in threads:
        for name in names:
            print(f"  {name} at {n} thread(s)...", file=sys.stderr, flush=True)
            rows.append(run_case(name, n, args.repeat, args.quick))
    text = table(rows)
    if notes(rows):
        text += "\n\n" + "\n".join(notes(rows))
    mem, lm = None, None
    if not args.no_memory:
        print("  memory (tracemalloc)...", file=sys.stderr, flush=True)
        mem = [memory_case(name, args.quick) for name in names]
        text += "\n\n" + memory_table(mem)
    if args.lm:
        from . import bench_linear

        lm = bench_linear.run(threads=max(threads), repeat=args.repeat, memory=False)
        text += (f"\n\n{cpu_line()}, {max(threads)} threads\n\n| LM-head step | median s |\n"
                 "|---|---|\n" + "\n".join(f"| {r['impl']} | {r['median_s']:.3f} |" for r in lm))
    print(text)
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write(text + "\n")
    if args.json:
        from . import _vector_width

        with open(args.json, "w") as f:
            json.dump({"cpu": cpu_info(), "vector_width": _vector_width.WIDTH, "repeat": args.repeat,
                       "quick": args.quick, "rows": rows, "memory": mem, "lm": lm}, f, indent=1, default=list)
    if args.plot:
        plot(rows, args.plot)
    return 0
