"""Where numbaxent's first-call time goes: per compiled function and per compiler stage.

Run it in a fresh process with an empty kernel cache (it refuses a warm one unless ``--allow-warm``)::

    python benchmarks/compile_profile.py [--case NAME ...] [--top 25]

Cases are first calls a new user makes (``f32-2d``, ``f32-long``, ``f64-kdim-ls``, ``f32-10cls``, ``linear``,
``evaluator``, ``evaluator-10cls``). Stage times are *exclusive*: a callee compiled while its caller
is being typed is counted under the callee, not inside the caller's type inference. Stages:

- Numba front end: bytecode analysis, IR passes, type inference (``NopythonTypeInference``),
  IR-level inlining (``InlineOverloads``/``InlineInlinables``), the parfors passes (``ParforPass``,
  ``ParforFusionPass``, ``ParforPreLoweringPass``);
- ``NativeLowering``: Numba IR to LLVM IR (for a parallel kernel this includes compiling each ``prange``
  body as a gufunc, whose own stages are attributed to it);
- LLVM: ``llvm:function-passes``, ``llvm:module-passes`` (the O3 pipeline over each library's linked
  module) and ``llvm:codegen`` (machine code, MCJIT).

Numba's own events (``numba.core.event``) give the passes; the LLVM stages are timed by wrapping
``CPUCodeLibrary._optimize_functions``/``_optimize_final_module`` and ``JITCodeLibrary._finalize_specific``.
"""
from __future__ import annotations

import argparse
import collections
import os
import sys
import time

T0 = time.perf_counter()
C0 = time.process_time()


def _cases():
    import numpy as np

    rng = np.random.default_rng(0)

    def f32_2d():
        import numbaxent as nx
        x = rng.standard_normal((64, 1000), dtype=np.float32)
        nx.cross_entropy_with_grad(x, rng.integers(0, 1000, 64))

    def f32_long():  # a forward pass over rows summed in chunks (`_rows.chunk_variant`): a vocabulary
        import numbaxent as nx
        x = rng.standard_normal((8, 32000), dtype=np.float32)
        nx.cross_entropy(x, rng.integers(0, 32000, 8))

    def f64_kdim_ls():
        import numbaxent as nx
        x = rng.standard_normal((2, 5, 8, 8))
        nx.cross_entropy_with_grad(x, rng.integers(0, 5, (2, 8, 8)), label_smoothing=0.1)

    def f32_10cls():
        import numbaxent as nx
        x = rng.standard_normal((256, 10), dtype=np.float32)
        nx.cross_entropy_with_grad(x, rng.integers(0, 10, 256))

    def f32_4cls():  # a class count whose blocks are transposed in registers
        import numbaxent as nx
        x = rng.standard_normal((256, 4), dtype=np.float32)
        nx.cross_entropy_with_grad(x, rng.integers(0, 4, 256))

    def linear():
        import numbaxent as nx
        h = rng.standard_normal((64, 32), dtype=np.float32)
        w = rng.standard_normal((500, 32), dtype=np.float32)
        nx.linear_cross_entropy_with_grad(h, w, rng.integers(0, 500, 64))

    def evaluator():
        import numbaxent as nx
        ev = nx.Evaluator(1000)
        ev.update(rng.standard_normal((64, 1000), dtype=np.float32), rng.integers(0, 1000, 64))
        ev.result()

    def evaluator_10cls():  # the column path
        import numbaxent as nx
        ev = nx.Evaluator(10)
        ev.update(rng.standard_normal((256, 10), dtype=np.float32), rng.integers(0, 10, 256))
        ev.result()

    def evaluator_long():  # rows summed in chunks
        import numbaxent as nx
        ev = nx.Evaluator(32000)
        ev.update(rng.standard_normal((8, 32000), dtype=np.float32), rng.integers(0, 32000, 8))
        ev.result()

    return {"f32-2d": f32_2d, "f32-long": f32_long, "f64-kdim-ls": f64_kdim_ls, "f32-10cls": f32_10cls,
            "f32-4cls": f32_4cls, "linear": linear,
            "evaluator": evaluator, "evaluator-10cls": evaluator_10cls, "evaluator-long": evaluator_long}


class Profile:
    """Exclusive time per (function, stage), from a stack of nested start/end events."""

    def __init__(self):
        self.stack = []  # [name, function, start, child time]
        self.excl = collections.defaultdict(float)
        self.by_fn = collections.defaultdict(float)
        self.by_stage = collections.defaultdict(float)

    def start(self, stage, fn):
        self.stack.append([stage, fn, time.perf_counter(), 0.0])

    def end(self):
        stage, fn, t0, child = self.stack.pop()
        total = time.perf_counter() - t0
        own = total - child
        self.excl[(fn, stage)] += own
        self.by_fn[fn] += own
        self.by_stage[stage] += own
        if self.stack:
            self.stack[-1][3] += total


def install(profile: Profile):
    from numba.core import codegen, event

    class PassListener(event.Listener):
        def on_start(self, ev):
            stage = ev.data["name"].split(" [")[0]
            # a helper's lowering pass (numbaxent._linkonly) is Numba's own under another name
            stage = "native_lowering" if stage == "numbaxent_link_only_lowering" else stage
            profile.start(stage, ev.data["qualname"])

        def on_end(self, ev):
            profile.end()

    event.register("numba:run_pass", PassListener())

    def wrap(cls, meth, stage):
        orig = getattr(cls, meth)

        def timed(self, *a, **k):
            fn = profile.stack[-1][1] if profile.stack else "(outside a pass)"
            profile.start(stage, fn)
            try:
                return orig(self, *a, **k)
            finally:
                profile.end()

        setattr(cls, meth, timed)

    wrap(codegen.CPUCodeLibrary, "_optimize_functions", "llvm:function-passes")
    wrap(codegen.CPUCodeLibrary, "_optimize_final_module", "llvm:module-passes")
    wrap(codegen.JITCodeLibrary, "_finalize_specific", "llvm:codegen")


def main(argv=None) -> int:
    cases = _cases()
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--case", action="append", choices=sorted(cases),
                    help="first call(s) to profile, in order (default: f32-2d)")
    ap.add_argument("--top", type=int, default=25, help="rows of the per-function table")
    ap.add_argument("--allow-warm", action="store_true", help="profile even with a warm cache")
    args = ap.parse_args(argv)

    from numbaxent import _cache

    # every directory kernels are loaded from, not only the one they are written to: a warm-up may
    # have filled the package's own __pycache__ (as .ci/run does) while the writes go elsewhere
    warm = [d for d in _cache.search_dirs() if any(f.endswith(".nbi") for f in _cache.entries(d))]
    if warm and not args.allow_warm:
        print(f"kernel cache entries in {', '.join(warm)}: clear them (numbaxent cache --clear) for "
              f"a cold profile, or pass --allow-warm", file=sys.stderr)
        return 1
    prof = Profile()
    install(prof)
    for name in args.case or ["f32-2d"]:
        t, c = time.perf_counter(), time.process_time()
        cases[name]()
        print(f"{name}: first call {time.perf_counter() - t:.2f} s wall, "
              f"{time.process_time() - c:.2f} s CPU", flush=True)
    total = time.perf_counter() - T0
    import numba
    import platform
    print(f"\nprocess total {total:.2f} s wall, {time.process_time() - C0:.2f} s CPU  (numba {numba.__version__}, {platform.processor() or ''})")
    print("\nby stage (exclusive seconds):")
    for stage, t in sorted(prof.by_stage.items(), key=lambda kv: -kv[1]):
        if t >= 0.01:
            print(f"  {stage:<34} {t:7.2f}")
    print(f"  {'(all stages)':<34} {sum(prof.by_stage.values()):7.2f}")
    print(f"\nby function (exclusive seconds, top {args.top}):")
    for fn, t in sorted(prof.by_fn.items(), key=lambda kv: -kv[1])[:args.top]:
        stages = sorted(((s, v) for (f, s), v in prof.excl.items() if f == fn), key=lambda kv: -kv[1])
        detail = ", ".join(f"{s} {v:.2f}" for s, v in stages[:3])
        print(f"  {fn[:48]:<48} {t:7.2f}   {detail}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
