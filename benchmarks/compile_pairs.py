"""First-call time of two checkouts compared in pairs run at the same time, so that both see the
same machine (the shared 2-core machines these are measured on change speed by 20-50% within
minutes, more than most compile-time changes).

    python benchmarks/compile_pairs.py OLD_CHECKOUT NEW_CHECKOUT [--case f32-10cls] [--pairs 5]

Each pair starts ``benchmarks/compile_profile.py --case CASE`` of both checkouts at once, one process
each (one core each on two cores), each with its own fresh, empty cache directories (kernels, Numba,
``HOME``). Prints every pair's CPU seconds and the ratio NEW / OLD per pair, with their median: a
change is only worth believing when the ratios agree in sign over the pairs.
"""
from __future__ import annotations

import argparse
import os
import re
import statistics
import subprocess
import sys
import tempfile

LINE = re.compile(r"first call ([\d.]+) s wall, ([\d.]+) s CPU")


def _start(checkout: str, case: str, tmp: str) -> subprocess.Popen:
    env = dict(os.environ, HOME=tmp, XDG_CACHE_HOME=os.path.join(tmp, "c"),
               NUMBAXENT_CACHE_DIR=os.path.join(tmp, "nx"), NUMBA_CACHE_DIR=os.path.join(tmp, "nb"),
               PYTHONPATH=checkout)
    env.pop("PYTHONDONTWRITEBYTECODE", None)  # as a user's first run: bytecode written too
    script = os.path.join(checkout, "benchmarks", "compile_profile.py")
    return subprocess.Popen([sys.executable, script, "--case", case, "--top", "1"], cwd=checkout,
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _cpu_seconds(proc: subprocess.Popen, label: str) -> float:
    out = proc.communicate()[0]
    m = LINE.search(out)
    if proc.returncode != 0 or m is None:
        raise SystemExit(f"{label}: compile_profile.py failed:\n{out}")
    return float(m.group(2))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("old", help="checkout of the code before (a git worktree)")
    ap.add_argument("new", help="checkout of the code after")
    ap.add_argument("--case", default="f32-10cls", help="a compile_profile.py case")
    ap.add_argument("--pairs", type=int, default=5)
    args = ap.parse_args(argv)
    old, new = os.path.abspath(args.old), os.path.abspath(args.new)
    ratios = []
    for i in range(args.pairs):
        with tempfile.TemporaryDirectory() as t_old, tempfile.TemporaryDirectory() as t_new:
            p_old, p_new = _start(old, args.case, t_old), _start(new, args.case, t_new)
            c_old, c_new = _cpu_seconds(p_old, old), _cpu_seconds(p_new, new)
        ratios.append(c_new / c_old)
        print(f"pair {i + 1}: old {c_old:.2f} s CPU, new {c_new:.2f} s CPU, new / old {ratios[-1]:.3f}",
              flush=True)
    print(f"{args.case}: new / old median {statistics.median(ratios):.3f} "
          f"(range {min(ratios):.3f}-{max(ratios):.3f}, {len(ratios)} pairs)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
