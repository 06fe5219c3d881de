"""`numbaxent cache`: where the compiled kernels are cached, how much is there, and clearing it.

Kernels are looked up in every directory listed (in that order) and written to the first writable
one; see `numbaxent/_cache.py` for the rules. `--clear` deletes numbaxent's cache files (and only
those: a package `__pycache__` also holds Python's own `.pyc` files) from every listed directory
this user may write to; run it before `pip uninstall numbaxent` to leave nothing behind.
"""
from __future__ import annotations

import argparse
import os
import sys


def _size(paths) -> int:
    total = 0
    for p in paths:
        try:
            total += os.path.getsize(p)
        except OSError:
            pass
    return total


def _human(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} B"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="numbaxent cache", description=__doc__.splitlines()[0])
    parser.add_argument("--clear", action="store_true",
                        help="delete numbaxent's cache files from every writable directory listed")
    args = parser.parse_args(argv)
    from . import _cache

    dirs = _cache.search_dirs()
    target = _cache.cache_dir()
    print(f"kernel cache (looked up in this order; new kernels go to the one marked '*'):")
    removed = 0
    for d in dirs:
        files = _cache.entries(d)
        kernels = sum(f.endswith(".nbi") for f in files)
        mark = "*" if d == target else " "
        state = "" if os.path.isdir(d) else "  (does not exist)"
        print(f" {mark} {d}{state}")
        print(f"     {kernels} kernels, {len(files) - kernels} compiled variants, "
              f"{_human(_size(files))}")
        if args.clear and files:
            if not _cache.writable(d):
                print("     not writable by this user: left as it is")
                continue
            for f in files:
                try:
                    os.remove(f)
                    removed += 1
                except OSError as exc:
                    print(f"     could not remove {f}: {exc}", file=sys.stderr)
    if target is None:
        print("no directory is writable: kernels are compiled in memory in each process "
              f"(set {_cache.ENV_VAR} to a writable directory)")
    if args.clear:
        print(f"removed {removed} files")
    return 0
