"""Deal a kernel's rows (or column blocks) to threads.

Why not `@njit(parallel=True)`: a `prange` kernel is compiled three times over. Numba compiles the
loop body as a separate "gufunc" and links it into the kernel, and LLVM optimises and generates
machine code for the whole row code once per library that links it: in the body's own library, in
the gufunc's and in the kernel's. That tripled the first-call compile time of every kernel variant
(docs/internals.md has the measured breakdown). The kernels are therefore plain serial `@njit`
functions over a range `[lo, hi)` of work items that release the GIL, and this module runs one
range per thread on a small pool of Python threads: the same parallelism, compiled once.

- Thread count: `numba.get_num_threads()` of the calling thread, so `NUMBA_NUM_THREADS` and
  `numba.set_num_threads` work as before.
- Determinism: kernels write per-row results, or per-block sums over blocks fixed by the class count,
  so results do not depend on the split (tested for 1 and 2 threads).
- Small calls (under `MIN_PARALLEL_ELEMENTS` logits) run on the calling thread: handing work to a
  pool costs tens of microseconds.
- Safe for concurrent callers (each call waits only for its own ranges, and the caller computes one
  range itself) and after `fork()` (a child starts a new pool on first use).
"""
from __future__ import annotations

import os
import threading
from concurrent.futures import ThreadPoolExecutor

MIN_PARALLEL_ELEMENTS = 1 << 17  # ~0.1 ms of work or more per call before threads pay

_pool = None
_pool_lock = threading.Lock()


def _reset_after_fork():
    global _pool, _pool_lock
    _pool = None  # the parent's worker threads do not exist in the child
    _pool_lock = threading.Lock()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_reset_after_fork)


def num_threads() -> int:
    import numba

    return max(1, int(numba.get_num_threads()))


def _executor(workers: int) -> ThreadPoolExecutor:
    global _pool
    with _pool_lock:
        if _pool is None or _pool._max_workers < workers:
            old, _pool = _pool, ThreadPoolExecutor(max_workers=workers,
                                                   thread_name_prefix="numbaxent")
            if old is not None:
                old.shutdown(wait=False)
        return _pool


def run_tasks(kernel, count: int, elements: int, *args) -> None:
    """Call `kernel(lo, hi, *args)` over `[0, count)` split into one contiguous range per thread.

    `elements` (the logits the call reads) decides whether threads are worth it.
    """
    n = min(num_threads(), count)
    if n <= 1 or elements < MIN_PARALLEL_ELEMENTS:
        kernel(0, count, *args)
        return
    bounds = [count * i // n for i in range(n + 1)]
    pool = _executor(n - 1)
    futures = [pool.submit(kernel, bounds[i], bounds[i + 1], *args) for i in range(1, n)]
    try:
        kernel(bounds[0], bounds[1], *args)
    finally:
        for f in futures:
            f.result()
