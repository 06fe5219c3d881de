"""Measured figures for ``numbaxent eval`` and ``numbaxent.dask.evaluate`` (issue 5's targets).

    python benchmarks/eval_throughput.py stream [--gb 2] [--classes 32000] [--dir /tmp/nx_eval]
    python benchmarks/eval_throughput.py dask   [--gb 1] [--classes 32000] [--blocks 4] [--dir /tmp/nx_eval]

``stream``: writes a float32 ``.npy`` of ``--gb`` GB (and its targets) once, reads it into the page
cache, then in one process measures, alternating them over ``--repeat`` rounds (medians, and the
fastest runs, the least disturbed by other load on a shared machine):

- the in-memory forward throughput: ``numbaxent.cross_entropy`` on the array loaded into RAM;
- the in-memory evaluator: ``Evaluator.update`` on the same array (all metrics);
- the streaming command: ``numbaxent eval FILE.npy TARGETS.npy --json`` run in-process (its own
  timing: memory-mapped row chunks of ``--chunk-mb`` MB);

and then runs the command as a subprocess, sampling its ``RssAnon`` / ``RssFile`` from
``/proc/PID/status`` every 2 ms, for the peak anonymous memory with the timed chunk (``--chunk-mb``,
or ``numbaxent eval``'s default) and one four times larger, next to a baseline run on a tiny file
(imports and compiled kernels only).

``dask``: writes a ``--gb`` GB file, evaluates it in memory in this process (``Evaluator.update``,
Numba's threads), then on a ``distributed.LocalCluster`` with ``--workers`` single-threaded worker
processes via ``numbaxent.dask.evaluate(numbaxent.dask.from_npy(FILE), targets)`` (workers
memory-map their own blocks); reports both throughputs, their ratio, and the largest relative
difference over every float figure of the two results.

Files go to ``--dir`` (default /tmp/nx_eval), never to the repository.
"""
from __future__ import annotations

import argparse
import io
import json
import os
import subprocess
import sys
import threading
import time
from contextlib import redirect_stdout

import numpy as np

from numbaxent.bench_cases import timings


def _write(path, n, c, seed=0):
    """A float32 (n, c) .npy written with ordinary write() calls of 64 MiB pieces (as np.save or any
    program writing a stream does; no n*c temporary)."""
    if os.path.exists(path) and np.load(path, mmap_mode="r").shape == (n, c):
        return
    rng = np.random.default_rng(seed)
    step = max(1, (64 << 20) // (4 * c))
    with open(path + ".tmp", "wb") as f:
        np.lib.format.write_array_header_1_0(
            f, {"descr": np.dtype(np.float32).str, "fortran_order": False, "shape": (n, c)})
        for a in range(0, n, step):
            b = min(n, a + step)
            f.write(memoryview(rng.standard_normal((b - a, c), dtype=np.float32) * 3))
    os.replace(path + ".tmp", path)


def _targets(path, n, c, seed=1):
    rng = np.random.default_rng(seed)
    t = rng.integers(0, c, n)
    t[rng.random(n) < 0.02] = -100
    np.save(path, t)
    return t


def _warm_page_cache(path):
    """Put the file in the page cache as a sequential read() leaves it: drop this file's cached
    pages (posix_fadvise, this file only) and read it in 64 MiB pieces. On Linux >= 6.x with a
    file system that has large folios (ext4, xfs) that caches it in 2 MiB folios, which memory maps
    with one page-table entry each; see docs/evaluating.md for what 4 KiB folios cost."""
    with open(path, "rb", buffering=0) as f:
        if hasattr(os, "posix_fadvise"):
            os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
        buf = bytearray(64 << 20)
        while f.readinto(buf):
            pass


def _meminfo():
    """Large folios in the page cache decide what mapping a file costs (see docs/evaluating.md)."""
    try:
        with open("/proc/meminfo") as f:
            d = dict(line.split(":", 1) for line in f)
        return ", ".join(f"{k} {d[k].strip()}" for k in ("FileHugePages", "FilePmdMapped") if k in d)
    except OSError:
        return "n/a"


def _median_time(fn, repeat):
    ts = timings(fn, repeat)
    return float(np.median(ts)), ts


def _in_memory(xp, t, c, repeat, forward):
    """(median forward time or None, median Evaluator.update time, its result) on the file loaded
    into RAM."""
    import numbaxent as nx
    from numbaxent.evaluate import Evaluator

    x = np.load(xp)
    fwd = _median_time(lambda: nx.cross_entropy(x, t), repeat)[0] if forward else None
    evm = _median_time(lambda: Evaluator(c).update(x, t), repeat)[0]
    return fwd, evm, Evaluator(c).update(x, t).result()


def _cli_inprocess(args):
    from numbaxent.eval_cli import main

    buf = io.StringIO()
    with redirect_stdout(buf):
        rc = main(args + ["--json", "--no-progress"])
    if rc != 0:
        raise SystemExit(f"numbaxent eval failed with status {rc}")
    return json.loads(buf.getvalue())


def _sample_memory(cmd):
    """Run ``cmd``; return (its JSON output, peak RssAnon, peak RssFile) in bytes."""
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    peak = {"RssAnon": 0, "RssFile": 0}
    done = threading.Event()

    def poll():
        path = f"/proc/{proc.pid}/status"
        while not done.is_set():
            try:
                with open(path) as f:
                    for line in f:
                        key = line.split(":", 1)[0]
                        if key in peak:
                            peak[key] = max(peak[key], int(line.split()[1]) * 1024)
            except (FileNotFoundError, ProcessLookupError, ValueError):
                pass
            time.sleep(0.002)

    th = threading.Thread(target=poll, daemon=True)
    th.start()
    out, err = proc.communicate()
    done.set()
    th.join()
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed: {err}")
    return json.loads(out), peak["RssAnon"], peak["RssFile"]


def stream(args):
    import numba

    os.makedirs(args.dir, exist_ok=True)
    c = args.classes
    n = int(args.gb * 1e9) // (4 * c)
    xp = os.path.join(args.dir, f"x_{n}x{c}.npy")
    tp = os.path.join(args.dir, f"t_{n}.npy")
    _write(xp, n, c)
    t = _targets(tp, n, c)
    size = os.path.getsize(xp)
    _warm_page_cache(xp)
    if args.chunk_mb is None:  # numbaxent eval's own default
        from numbaxent.io import default_chunk_rows

        chunk_rows = default_chunk_rows(4 * c)
    else:
        chunk_rows = max(1, (args.chunk_mb << 20) // (4 * c))
    import numbaxent as nx
    from numbaxent.evaluate import Evaluator

    x = np.load(xp)
    mem_result = Evaluator(c).update(x, t).result()  # also compiles (or loads) the kernels
    nx.cross_entropy(x, t)
    print(f"file {xp}: {n} x {c} float32, {size / 1e9:.3f} GB; numba {numba.get_num_threads()} "
          f"threads ({numba.threading_layer()} layer); page cache: {_meminfo()}")
    cli = [xp, tp, "--chunk-rows", str(chunk_rows)]
    _cli_inprocess(cli)  # warm-up
    # the three alternate (forward, evaluator, command; --repeat rounds), so that a change in the
    # machine's load hits all of them; each round's command time is its own (the pass alone)
    fwds, evms, secs, runs = [], [], [], []
    for _ in range(args.repeat):
        fwds += timings(lambda: nx.cross_entropy(x, t), 1, warmup=False)  # warmed up above
        evms += timings(lambda: Evaluator(c).update(x, t), 1, warmup=False)
        runs.append(_cli_inprocess(cli))
        secs.append(runs[-1]["timing"]["seconds"])
    x = None  # free the in-memory copy before the subprocess runs
    fwd, evm, st = (float(np.median(v)) for v in (fwds, evms, secs))
    rel = abs(runs[0]["loss"] - mem_result.loss) / abs(mem_result.loss)
    gbs = lambda s: size / s / 1e9  # noqa: E731
    print(f"in-memory forward   nx.cross_entropy        median {fwd:7.3f} s  {gbs(fwd):6.2f} GB/s"
          f"  (fastest {min(fwds):.3f} s)")
    print(f"in-memory evaluator Evaluator.update        median {evm:7.3f} s  {gbs(evm):6.2f} GB/s"
          f"  (fastest {min(evms):.3f} s)")
    print(f"streaming command   numbaxent eval (mmap)   median {st:7.3f} s  {gbs(st):6.2f} GB/s  "
          f"chunk {chunk_rows} rows = {chunk_rows * 4 * c / 2**20:.1f} MiB  (fastest {min(secs):.3f} s)")
    print(f"  stream / in-memory forward = {fwd / st:.1%}   stream / in-memory evaluator = "
          f"{evm / st:.1%}   (fastest runs: {min(fwds) / min(secs):.1%} and "
          f"{min(evms) / min(secs):.1%})   |loss(stream) - loss(in-memory)| / loss = {rel:.1e}")
    print(f"  load average {os.getloadavg()[0]:.2f} on {os.cpu_count()} CPUs (other jobs slow "
          f"every figure; the fastest runs are the least disturbed)")

    # peak anonymous memory of the command as a process
    tiny_x = os.path.join(args.dir, "tiny_x.npy")
    tiny_t = os.path.join(args.dir, "tiny_t.npy")
    np.save(tiny_x, np.zeros((4, c), np.float32))
    np.save(tiny_t, np.zeros(4, np.int64))
    exe = [sys.executable, "-m", "numbaxent", "eval"]
    _, base_anon, base_file = _sample_memory(exe + [tiny_x, tiny_t, "--json"])
    print("peak memory of `numbaxent eval` as a process (RssAnon / RssFile sampled every 2 ms):")
    print(f"  baseline (4-row file: interpreter, numba, kernels)  anon {base_anon / 2**20:7.1f} MiB"
          f"  file {base_file / 2**20:7.1f} MiB")
    for rows in sorted({chunk_rows, chunk_rows * 4}):  # the timed chunk, and one 4x larger
        out, anon, filerss = _sample_memory(exe + cli[:2] + ["--chunk-rows", str(rows), "--json"])
        print(f"  {size / 2**20:.0f} MiB file, chunk {rows * 4 * c / 2**20:6.1f} MiB "
              f"(file = {size / (rows * 4 * c):5.1f} x chunk)  anon {anon / 2**20:7.1f} MiB "
              f"(+{(anon - base_anon) / 2**20:6.1f} over baseline)  file-backed "
              f"{filerss / 2**20:7.1f} MiB  ({out['timing']['seconds']:.2f} s)")


def _warm_worker(c):
    from numbaxent.evaluate import Evaluator

    Evaluator(c).update(np.zeros((4, c), np.float32), np.zeros(4, np.int64))


def dask_bench(args):
    from distributed import Client, LocalCluster

    import numbaxent.dask as nxd

    os.makedirs(args.dir, exist_ok=True)
    c = args.classes
    n = int(args.gb * 1e9) // (4 * c)
    xp = os.path.join(args.dir, f"x_{n}x{c}.npy")
    tp = os.path.join(args.dir, f"t_{n}.npy")
    _write(xp, n, c, seed=2)
    t = _targets(tp, n, c, seed=3)
    size = os.path.getsize(xp)
    _warm_page_cache(xp)
    _, single, ref = _in_memory(xp, t, c, args.repeat, forward=False)
    runs = [_cli_inprocess([xp, tp]) for _ in range(args.repeat + 1)][1:]
    stream_s = float(np.median([r["timing"]["seconds"] for r in runs]))
    chunk_rows = -(-n // args.blocks)
    def settled(client):
        """Wait until the scheduler has forgotten the last run's tasks (the next run has the same
        keys and would otherwise pick up results still held in the workers' memory)."""
        while client.run_on_scheduler(lambda dask_scheduler: len(dask_scheduler.tasks)):
            time.sleep(0.01)

    with LocalCluster(n_workers=args.workers, threads_per_worker=1, processes=True,
                      dashboard_address=None) as cluster, Client(cluster) as client:
        dx = nxd.from_npy(xp, chunk_rows=chunk_rows)
        client.run(_warm_worker, c)  # every worker loads the cached kernels before the timing
        res = None
        ts = []
        for _ in range(args.repeat + 1):
            settled(client)
            t0 = time.perf_counter()
            res = nxd.evaluate(dx, t)
            ts.append(time.perf_counter() - t0)
        ts = ts[1:]  # the first run is a warm-up
    dist = float(np.median(ts))
    worst = 0.0
    for key in ("loss", "loss_sum", "weight_sum", "nll", "perplexity", "entropy", "confidence",
                "ece", "mce", "balanced_accuracy"):
        a, b = getattr(res, key), getattr(ref, key)
        worst = max(worst, abs(a - b) / abs(b) if b else abs(a - b))
    worst = max([worst] + [abs(res.accuracy[k] - ref.accuracy[k]) for k in ref.accuracy])
    counts_equal = (np.array_equal(res.per_class["count"], ref.per_class["count"])
                    and np.array_equal(res.per_class["predicted"], ref.per_class["predicted"]))
    print(f"file {xp}: {n} x {c} float32, {size / 1e9:.3f} GB; {len(dx.chunks[0])} blocks of "
          f"{chunk_rows} rows ({chunk_rows * 4 * c / 2**20:.0f} MiB)")
    print(f"single process, in memory  Evaluator.update     median {single:6.3f} s  "
          f"{size / single / 1e9:6.2f} GB/s")
    print(f"LocalCluster {args.workers} x 1-thread procs  dask.evaluate(from_npy) median "
          f"{dist:6.3f} s  {size / dist / 1e9:6.2f} GB/s   ({', '.join(f'{s:.3f}' for s in ts)})")
    print(f"single process, streaming  numbaxent eval FILE  median {stream_s:6.3f} s  "
          f"{size / stream_s / 1e9:6.2f} GB/s")
    print(f"  cluster / single process in memory = {single / dist:.1%};  cluster / single process "
          f"streaming = {stream_s / dist:.1%}")
    print(f"  largest relative difference to the in-memory result over the float figures: "
          f"{worst:.1e}; per-class counts identical: {counts_equal}")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("what", choices=["stream", "dask"])
    ap.add_argument("--gb", type=float, default=None, help="file size (stream: 2, dask: 1)")
    ap.add_argument("--classes", type=int, default=32000)
    ap.add_argument("--chunk-mb", type=int, default=None,
                    help="stream: chunk budget in MiB (default: numbaxent eval's own)")
    ap.add_argument("--blocks", type=int, default=4, help="dask: number of row blocks")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--dir", default="/tmp/nx_eval")
    args = ap.parse_args(argv)
    if args.what == "stream":
        args.gb = args.gb or 2.0
        stream(args)
    else:
        args.gb = args.gb or 1.0
        dask_bench(args)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
