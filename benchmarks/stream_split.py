"""Where the streaming command's time goes beyond the in-memory evaluator (issue 12's streaming target).

    python benchmarks/stream_split.py [--repeat 7] [--dir /tmp/nx_eval]

Uses the float32 file that ``eval_throughput.py stream --gb 1`` writes (7812 x 32000 in ``--dir``;
run that first) and times, alternated over ``--repeat`` rounds in one process (medians and minima):

- ``whole``: ``Evaluator.update`` on the file loaded into memory;
- ``chunks in memory``: ``Evaluator.update_chunks`` over row chunks of that in-memory array, of
  ``numbaxent eval``'s default size (the streaming command's pipeline of pieces and folds, without
  the file);
- ``chunks mapped``: the same over ``numbaxent.io.row_chunks`` of the memory-mapped file, as
  ``numbaxent eval`` reads it;

and the minor page faults of one pass over the mapped file (re-read into the page cache first, as
``eval_throughput.py`` leaves it, unless ``--as-cached``), next to the file's 2 MiB extents: a
file cached in 2 MiB folios is mapped with about one fault per extent, one cached in small folios
with many more (about 9 150 for this file in one session, see docs/evaluating.md). The first two differ by the pipeline's own
cost, the last two by what mapping the file's pages costs.
"""
from __future__ import annotations

import argparse
import os
import resource
import time

import numpy as np


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeat", type=int, default=7)
    ap.add_argument("--dir", default="/tmp/nx_eval")
    ap.add_argument("--as-cached", action="store_true",
                    help="measure the file as the page cache holds it now, instead of re-reading it "
                         "first as eval_throughput.py does (a file cached in small folios is the "
                         "slow case, see docs/evaluating.md)")
    args = ap.parse_args(argv)
    from numbaxent import io as nio
    from numbaxent.evaluate import Evaluator

    xp, tp = (os.path.join(args.dir, f) for f in ("x_7812x32000.npy", "t_7812.npy"))
    if not (os.path.exists(xp) and os.path.exists(tp)):
        ap.error(f"{xp} or {tp} missing: run `python benchmarks/eval_throughput.py stream --gb 1` first")
    import importlib.util

    spec = importlib.util.spec_from_file_location(
        "eval_throughput", os.path.join(os.path.dirname(os.path.abspath(__file__)), "eval_throughput.py"))
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    if not args.as_cached:
        bench._warm_page_cache(xp)
    print(f"page cache: {bench._meminfo()}")
    x, t = np.load(xp), np.load(tp)
    C = x.shape[1]
    rows = nio.default_chunk_rows(4 * C)
    src = nio.open_array(xp)

    def whole():
        Evaluator(C).update(x, t)

    def chunks_in_memory():
        Evaluator(C).update_chunks((x[a:a + rows], t[a:a + rows]) for a in range(0, x.shape[0], rows))

    def chunks_mapped():
        Evaluator(C).update_chunks((c, t[a:b]) for a, b, c in
                                   nio.row_chunks(src, rows, keep=Evaluator.IN_FLIGHT - 1))

    runs = {f: [] for f in (whole, chunks_in_memory, chunks_mapped)}
    faults = []
    for f in runs:
        f()  # compile or load the kernels, map once
    for _ in range(args.repeat):
        for f, times in runs.items():
            before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
            start = time.perf_counter()
            f()
            times.append(time.perf_counter() - start)
            if f is chunks_mapped:
                faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
    print(f"{x.nbytes / 1e9:.3f} GB float32, chunks of {rows} rows "
          f"({rows * 4 * C / 2**20:.0f} MiB, numbaxent eval's default)")
    for f, times in runs.items():
        print(f"  {f.__name__.replace('_', ' '):18s} median {np.median(times) * 1e3:6.1f} ms   "
              f"min {min(times) * 1e3:6.1f} ms")
    print(f"  minor page faults per mapped pass: median {int(np.median(faults))} "
          f"(the file has {-(-os.path.getsize(xp) // (2 << 20))} extents of 2 MiB)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
