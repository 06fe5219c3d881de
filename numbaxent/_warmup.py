"""`numbaxent warmup`: compile every kernel variant ahead of time into the on-disk cache.

Useful before a job whose workers start together (each would otherwise compile on first use), in a
container image build, or on a login node before submitting to a cluster's compute nodes that share
the installation. `--cache-dir DIR` fills a cache that every user then reads (with
`NUMBAXENT_CACHE_DIR=DIR` set, or without setting anything when DIR is the package's own
`__pycache__`, which `numbaxent cache` shows).
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np

from . import _api

DTYPES = ("float32", "float64", "float16", "bfloat16")


def _dtype(name: str):
    if name == "bfloat16":
        try:
            import ml_dtypes
        except ImportError:
            return None
        return np.dtype(ml_dtypes.bfloat16)
    return np.dtype(name)


def variants(dtypes=DTYPES, only: str = ""):
    """(label, thunk) for every compiled specialisation the public API can reach (whose label
    contains `only`)."""
    for label, run in _all_variants(dtypes):
        if only in label:
            yield label, run


def _all_variants(dtypes):
    rng = np.random.default_rng(0)
    for name in dtypes:
        dt = _dtype(name)
        if dt is None:
            continue
        # 4 classes take the column kernels with their blocks transposed in registers, K-dim input
        # the column kernels without (`_columns.transpose_variant`), 48 classes the row kernels, and
        # 6200 float32/float64 the row kernels' variant for long rows (`_rows.chunk_variant`; a forward pass)
        xs = [rng.standard_normal(shape).astype(dt) for shape in ((3, 4), (3, 4, 2), (3, 48), (3, 6200))]
        idx = np.array([0, 3, -100])
        for kind in ("class-index", "probability"):
            for cap in (None, 30.0):
                label = f"{name:<8} {kind:<11} softcap={'on' if cap else 'off'}"

                def run(xs=xs, kind=kind, cap=cap):
                    for x in xs:
                        index = np.stack([idx, idx[::-1]], axis=1) if x.ndim == 3 else idx
                        target = index if kind == "class-index" else np.full(x.shape, 0.25, x.dtype)
                        _api.cross_entropy(x, target, softcap=cap)
                        _api.cross_entropy_with_grad(x, target, softcap=cap)
                        crit = _api.CrossEntropyLoss(softcap=cap)
                        crit(x, target)
                        crit.backward()

                yield label, run
    for label, run in _extra_variants():
        if label.split()[0] in dtypes:
            yield label, run


def _extra_variants():
    """Kernels of optional modules (the streaming evaluator), when present."""
    try:
        from . import evaluate
    except ImportError:
        return
    warm = getattr(evaluate, "warmup_variants", None)
    if warm is not None:
        yield from warm()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="numbaxent warmup", description=__doc__.splitlines()[0])
    parser.add_argument("--dtypes", default=",".join(DTYPES),
                        help="comma-separated logits dtypes to compile for (default: %(default)s)")
    parser.add_argument("--only", default="", metavar="TEXT",
                        help="compile only the variants whose label contains TEXT, e.g. "
                             "'class-index softcap=off'")
    parser.add_argument("--cache-dir", metavar="DIR",
                        help="write the compiled kernels to DIR (default: the first writable "
                             "directory, see 'numbaxent cache')")
    parser.add_argument("--jobs", "-j", type=int, default=None, metavar="N",
                        help="processes compiling at once, each a share of the variants (default: "
                             "the CPUs this process may run on)")
    parser.add_argument("--part", default=None, help=argparse.SUPPRESS)  # "i/N": a worker's share
    args = parser.parse_args(argv)
    from . import _cache

    if args.cache_dir:
        if _cache._chosen_dir is not None:  # kernels already imported in this process
            print("numbaxent warmup: --cache-dir must be given before any kernel is used",
                  file=sys.stderr)
            return 2
        if not _cache.writable(args.cache_dir):
            print(f"numbaxent warmup: cannot write to {args.cache_dir}", file=sys.stderr)
            return 1
        os.environ[_cache.ENV_VAR] = os.path.abspath(args.cache_dir)
    target = _cache.cache_dir()
    if target is None:
        print("numbaxent warmup: no writable cache directory (see 'numbaxent cache'); nothing "
              "would be kept", file=sys.stderr)
        return 1
    t_all = time.perf_counter()
    dtypes = tuple(d.strip() for d in args.dtypes.split(",") if d.strip())
    if args.part is not None:  # a worker of a parallel warmup: its share (`shares`)
        index, count = (int(v) for v in args.part.split("/"))
        chosen = list(variants(dtypes, args.only))
        for (label, run), owner in zip(chosen, shares([label for label, _ in chosen], count)):
            if owner == index:
                _compile(label, run)
        return 0
    print(f"numbaxent warmup: caching compiled kernels in {target}", file=sys.stderr)
    jobs = args.jobs if args.jobs is not None else default_jobs()
    if jobs < 1:
        parser.error("--jobs must be at least 1")
    if jobs == 1:
        for label, run in variants(dtypes, args.only):
            _compile(label, run)
    else:
        status = _run_workers(jobs, args.dtypes, args.only)
        if status:
            print(f"numbaxent warmup: a worker failed (exit status {status})", file=sys.stderr)
            return 1
    print(f"done in {time.perf_counter() - t_all:.1f} s", file=sys.stderr)
    return 0


def default_jobs() -> int:
    """The CPUs this process may run on: Numba compiles each kernel on one thread, so a warmup
    uses every core only with that many processes."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def _compile(label, run):
    t0 = time.perf_counter()
    run()
    print(f"  {label}  {time.perf_counter() - t0:6.2f} s", file=sys.stderr, flush=True)


def shares(labels, jobs: int) -> list[int]:
    """The worker (0 .. jobs-1) that compiles each variant: whole dtypes to one worker, so that
    the helpers a dtype's variants share (the column kernels' block steps, the target check) are
    compiled once, not once per worker that met them (float16 and bfloat16 also share float32's
    compute-type helpers). Dtypes go to the least loaded worker, most variants first; with fewer
    dtypes than workers, a dtype's target kinds (and the evaluator) are split instead."""
    keys = [label.split()[0] for label in labels]
    if len(set(keys)) < jobs:
        keys = [" ".join(label.split()[:2]) for label in labels]
    sizes = {}
    for k in keys:
        sizes[k] = sizes.get(k, 0) + 1
    load, owner = [0] * jobs, {}
    for k in sorted(sizes, key=lambda k: -sizes[k]):  # stable: ties keep the dtypes' order
        w = load.index(min(load))
        owner[k] = w
        load[w] += sizes[k]
    return [owner[k] for k in keys]


def _run_workers(jobs: int, dtypes: str, only: str) -> int:
    """Compile the variants in `jobs` processes at once, each its share of them (`shares`).
    Several processes writing one cache is safe (see `_cache`). Returns the first non-zero exit
    status, or 0."""
    import subprocess

    cmd = [sys.executable, "-m", "numbaxent", "warmup", "--dtypes", dtypes, "--only", only]
    workers = [subprocess.Popen(cmd + ["--part", f"{i}/{jobs}"]) for i in range(jobs)]
    codes = [w.wait() for w in workers]
    return next((c for c in codes if c), 0)
