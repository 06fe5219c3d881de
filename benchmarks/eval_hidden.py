"""Measured figures for ``Evaluator.update_hidden`` (issue 16's targets).

    python benchmarks/eval_hidden.py [--n 16384] [--hidden 1024] [--vocab 32000] [--repeat 5]
                                     [--dtype float32] [--memory-n 4096,16384,65536]

**Throughput.** On random ``float32`` hidden states (N, H), an output layer (V, H) and targets
(none ignored, so every row is multiplied out), it times, interleaved round by round (so load from
other processes hits all three alike) and reports the median of ``--repeat`` rounds:

- ``gemm @``: the bare NumPy products ``hidden[i:j] @ weight.T`` over the same chunks as
  ``update_hidden`` uses (a new result array per chunk, as that expression allocates);
- ``gemm out=``: the same products into one reused buffer (``np.matmul(..., out=buf)``), the
  fastest way NumPy has to form the logits;
- ``update_hidden``: ``Evaluator(V).update_hidden(hidden, weight, target)``: the same products plus
  every metric of the evaluator.

and the ratio ``gemm / update_hidden`` against both (the target is >= 0.9 against the bare GEMMs),
from the medians and per round. Then, because load from other processes varies over seconds, a
paired measurement: chunk by chunk, the bare ``hidden[i:j] @ weight.T`` immediately followed by
``update_hidden`` on the same rows, summed over ``--repeat`` passes.

**Memory.** For each N of ``--memory-n``, a fresh subprocess makes the inputs, compiles the
kernels on a tiny problem, then measures during one ``update_hidden`` call: the ``tracemalloc``
peak (NumPy reports its allocations to it) and the growth of the resident set's high-water mark
(``VmHWM`` after the call, after resetting it through ``/proc/self/clear_refs``, minus ``VmRSS``
before). Both are "beyond the inputs": the inputs exist before the measurement starts. The logits
of one chunk (64 MiB by default) are the expected bound, whatever N.

Nothing is written to disk.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)


def _inputs(n, hd, v, dtype, seed=0):
    rng = np.random.default_rng(seed)
    h = rng.standard_normal((n, hd), dtype=np.float32)
    w = rng.standard_normal((v, hd), dtype=np.float32) * np.float32(hd ** -0.5)
    t = rng.integers(0, v, n)
    if dtype != "float32":
        import ml_dtypes  # noqa: F401  (bfloat16)

        h, w = h.astype(dtype), w.astype(dtype)
    return h, w, t


def _status(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    return -1


def memory_child(n, hd, v, dtype) -> dict:
    """Runs in a fresh process (``--child-memory``): peak memory of one update_hidden call."""
    import tracemalloc

    from numbaxent.evaluate import Evaluator, hidden_chunk_rows

    h, w, t = _inputs(n, hd, v, dtype)
    Evaluator(v).update_hidden(h[:2], w, t[:2])  # compile or load the kernels first
    ev = Evaluator(v)
    rss0 = _status("VmRSS")
    try:
        with open("/proc/self/clear_refs", "w") as f:  # resets VmHWM to the current RSS
            f.write("5")
        hwm_reset = True
    except OSError:
        hwm_reset = False
    tracemalloc.start()
    ev.update_hidden(h, w, t)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    hwm = _status("VmHWM")
    rows = hidden_chunk_rows(v, 4)
    return dict(n=n, tracemalloc_peak=peak, hwm_growth=hwm - rss0 if hwm_reset else None,
                chunk_logits_bytes=rows * v * 4, chunk_rows=rows,
                inputs_bytes=h.nbytes + w.nbytes + t.nbytes, loss=ev.result().loss)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--n", type=int, default=16384)
    p.add_argument("--hidden", type=int, default=1024)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--dtype", default="float32")
    p.add_argument("--repeat", type=int, default=5)
    p.add_argument("--memory-n", default="4096,16384,65536")
    p.add_argument("--child-memory", type=int, help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.child_memory is not None:
        print(json.dumps(memory_child(a.child_memory, a.hidden, a.vocab, a.dtype)))
        return 0

    import numba

    from numbaxent.evaluate import Evaluator, hidden_chunk_rows

    n, hd, v = a.n, a.hidden, a.vocab
    h, w, t = _inputs(n, hd, v, a.dtype)
    rows = hidden_chunk_rows(v, 4)
    buf = np.empty((rows, v), dtype=np.float32)
    hc = h.astype(np.float32) if a.dtype != "float32" else h
    wt = (w.astype(np.float32) if a.dtype != "float32" else w).T
    Evaluator(v).update_hidden(h[:2], w, t[:2])  # compile or load the kernels, untimed

    def gemm_new():
        for i in range(0, n, rows):
            hc[i:i + rows] @ wt

    def gemm_out():
        for i in range(0, n, rows):
            m = min(rows, n - i)
            np.matmul(hc[i:i + m], wt, out=buf[:m])

    def evaluate():
        Evaluator(v).update_hidden(h, w, t)

    runs = {"gemm @": gemm_new, "gemm out=": gemm_out, "update_hidden": evaluate}
    times = {k: [] for k in runs}
    for _ in range(a.repeat):
        for k, f in runs.items():
            t0 = time.perf_counter()
            f()
            times[k].append(time.perf_counter() - t0)
    med = {k: statistics.median(x) for k, x in times.items()}
    flops = 2.0 * n * hd * v
    print(f"N={n} H={hd} V={v} {a.dtype}; chunk {rows} rows ({rows * v * 4 / 2**20:.1f} MiB of "
          f"float32 logits); numba threads {numba.get_num_threads()}, cpu count {os.cpu_count()}, "
          f"load average {os.getloadavg()[0]:.2f}")
    for k in runs:
        print(f"  {k:<14} median {med[k]:.3f} s  ({flops / med[k] / 1e9:.1f} GFLOP/s)   runs: "
              + " ".join(f"{x:.3f}" for x in times[k]))
    for k in ("gemm @", "gemm out="):
        per_round = [g / u for g, u in zip(times[k], times["update_hidden"])]
        print(f"  throughput update_hidden / {k:<10} = {med[k] / med['update_hidden']:.3f}x "
              f"(medians); per round: " + " ".join(f"{r:.3f}" for r in per_round))
    # paired per chunk: the same chunk's bare GEMM and update_hidden back to back, so load from
    # other processes (which varies over seconds) hits both sides of each pair alike
    ev = Evaluator(v)
    g_sum = u_sum = 0.0
    for _ in range(a.repeat):
        for i in range(0, n, rows):
            m = min(rows, n - i)
            t0 = time.perf_counter()
            hc[i:i + m] @ wt
            t1 = time.perf_counter()
            ev.update_hidden(h[i:i + m], w, t[i:i + m])
            t2 = time.perf_counter()
            g_sum += t1 - t0
            u_sum += t2 - t1
    print(f"  paired per chunk ({a.repeat} passes): gemm @ {g_sum:.3f} s, update_hidden "
          f"{u_sum:.3f} s, throughput ratio {g_sum / u_sum:.3f}x")

    print("peak memory beyond the inputs during one update_hidden call (fresh process each):")
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    for m in (int(x) for x in a.memory_n.split(",") if x):
        out = subprocess.run([sys.executable, __file__, "--child-memory", str(m), "--hidden",
                              str(hd), "--vocab", str(v), "--dtype", a.dtype], env=env,
                             capture_output=True, text=True, check=True).stdout
        r = json.loads(out.strip().splitlines()[-1])
        hwm = "n/a" if r["hwm_growth"] is None else f"{r['hwm_growth'] / 2**20:.1f} MiB"
        print(f"  N={m:<7} inputs {r['inputs_bytes'] / 2**20:8.1f} MiB   tracemalloc peak "
              f"{r['tracemalloc_peak'] / 2**20:6.1f} MiB   VmHWM growth {hwm}   (one chunk of "
              f"logits: {r['chunk_logits_bytes'] / 2**20:.1f} MiB; all logits would be "
              f"{m * v * 4 / 2**20:.0f} MiB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
