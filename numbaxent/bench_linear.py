"""LM-head training step, side by side: numbaxent's fused linear + cross-entropy, the three bare
matrix products any implementation needs, and PyTorch CPU (unfused, and F.linear_cross_entropy).

    python -m numbaxent.bench_linear [--n 4096 --h 1024 --v 32000] [--repeat 3] [--threads 2]

Times are medians of `--repeat` runs after one warm-up, all in one process; the table is headed by
the CPU it ran on. Peak additional memory
is measured in a fresh child process per implementation (Linux): the peak resident set (VmHWM, reset
through `/proc/self/clear_refs` once the inputs exist) minus the resident set at that point, minus
the returned gradients' own size.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

import numpy as np

from .bench_cases import cpu_line, timings


def _inputs(n, h, v, seed=0):
    rng = np.random.default_rng(seed)
    hidden = rng.standard_normal((n, h), dtype=np.float32)
    weight = rng.standard_normal((v, h), dtype=np.float32) * np.float32(0.02)
    target = rng.integers(0, v, n)
    return hidden, weight, target


def _impls(n, h, v):
    hidden, weight, target = _inputs(n, h, v)

    def bare():
        logits = hidden @ weight.T
        gh = logits @ weight
        gw = logits.T @ hidden
        return gh, gw

    def fused(**kw):
        from numbaxent.linear import linear_cross_entropy_with_grad

        return linear_cross_entropy_with_grad(hidden, weight, target, **kw)[1:3]

    def torch_unfused():
        import torch

        ht = torch.from_numpy(hidden).requires_grad_()
        wt = torch.from_numpy(weight).requires_grad_()
        loss = torch.nn.functional.cross_entropy(ht @ wt.T, torch.from_numpy(target))
        loss.backward()
        return ht.grad, wt.grad

    def torch_fused():
        import torch

        ht = torch.from_numpy(hidden).requires_grad_()
        wt = torch.from_numpy(weight).requires_grad_()
        loss = torch.nn.functional.linear_cross_entropy(ht, wt, torch.from_numpy(target))
        loss.backward()
        return ht.grad, wt.grad

    impls = {
        "bare 3 matmuls (numpy)": bare,
        "numbaxent fused": fused,
        "numbaxent fused, z_loss+softcap": lambda: fused(z_loss=1e-4, softcap=30.0),
    }
    try:
        import torch

        torch.set_num_threads(int(os.environ.get("NUMBAXENT_BENCH_THREADS", "2")))
        impls["torch unfused"] = torch_unfused
        if hasattr(torch.nn.functional, "linear_cross_entropy"):
            impls["torch F.linear_cross_entropy"] = torch_fused
    except ImportError:
        pass
    return impls, (hidden, weight, target)


def _peak_child(name, n, h, v):
    """Run one implementation once in a fresh process; return its extra peak memory in MB."""
    code = f"""
import json, sys
sys.path.insert(0, {os.path.dirname(os.path.dirname(os.path.abspath(__file__)))!r})
from numbaxent.bench_linear import _impls
impls, inputs = _impls({n}, {h}, {v})
fn = impls[{name!r}]
def status_mb(key):
    with open('/proc/self/status') as f:
        for line in f:
            if line.startswith(key + ':'):
                return int(line.split()[1]) / 1024
if {name!r}.startswith('numbaxent'):
    from numbaxent.linear import linear_cross_entropy_with_grad
    linear_cross_entropy_with_grad(inputs[0][:16], inputs[1][:64], inputs[2][:16] % 64)  # compile/load
with open('/proc/self/clear_refs', 'w') as f:
    f.write('5')  # reset the peak (VmHWM) to the current resident set
base = status_mb('VmRSS')
out = fn()
peak = status_mb('VmHWM')
grads = sum(a.nbytes if hasattr(a, 'nbytes') else a.numel() * a.element_size() for a in out) / 2**20
print(json.dumps(dict(extra=peak - base - grads)))
"""
    env = dict(os.environ)
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                       timeout=900)
    if r.returncode != 0:
        return float("nan")
    return json.loads(r.stdout.strip().splitlines()[-1])["extra"]


def run(threads: int = 2, repeat: int = 3, n: int = 4096, h: int = 1024, v: int = 32000,
        memory: bool = True) -> list[dict]:
    """Rows {case, impl, threads, min_s, median_s, peak_mb} for the LM-head step."""
    os.environ["NUMBAXENT_BENCH_THREADS"] = str(threads)
    import numba

    numba.set_num_threads(min(threads, numba.config.NUMBA_NUM_THREADS))
    impls, _ = _impls(n, h, v)
    rows = []
    for name, fn in impls.items():
        ts = timings(fn, repeat)
        rows.append(dict(case=f"LM head N={n} H={h} V={v}", impl=name, threads=threads,
                         min_s=min(ts), median_s=float(np.median(ts)),
                         peak_mb=_peak_child(name, n, h, v) if memory else float("nan")))
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=4096)
    ap.add_argument("--h", type=int, default=1024)
    ap.add_argument("--v", type=int, default=32000)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--no-memory", action="store_true", help="skip the peak-memory children")
    args = ap.parse_args(argv)
    rows = run(args.threads, args.repeat, args.n, args.h, args.v, not args.no_memory)
    base = next(r["median_s"] for r in rows if r["impl"].startswith("bare"))
    print(cpu_line())
    print(f"{rows[0]['case']}, float32, {args.threads} threads, median of {args.repeat}")
    print(f"| implementation | median s | min s | / bare matmuls | extra peak MB |")
    print(f"|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['impl']} | {r['median_s']:.3f} | {r['min_s']:.3f} | "
              f"{r['median_s'] / base:.2f} | {r['peak_mb']:.0f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
