"""The asv performance history of S1, S4 and S9b: record this machine, run asv over the commits that
changed a kernel, and plot or tabulate the committed results (docs/benchmark-history.md).

    cd asv_bench
    python ../benchmarks/asv_history.py machine                # this machine, named after its CPU
    python ../benchmarks/asv_history.py run                    # kernel commits + HEAD, 1 thread
    python ../benchmarks/asv_history.py run --commits HEAD     # just this checkout
    python ../benchmarks/asv_history.py plot --png ../docs/img/asv-history.png --table

``run`` extracts each commit's files (``git archive``, so the repository and the working tree are
left alone) into a temporary directory and calls, from asv_bench/,

    asv run --python=same --set-commit-hash SHA --machine NAME --bench '^history\\.' --record-samples

with ``ASV_PYTHONPATH`` pointing at that directory, so the current interpreter's NumPy and Numba run
that commit's numbaxent with the current checkout's benchmark suite
(asv_bench/benchmarks/history.py), and the configuration's thread matrix cut to one value.
``--set-commit-hash`` is what makes ``asv run --python=same`` save its results; without it asv
measures and then throws the figures away. ``plot`` reads the JSON itself (no asv needed) and draws
with Matplotlib.
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
from io import BytesIO

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ASV_DIR = os.path.join(ROOT, "asv_bench")
RESULTS = os.path.join(ASV_DIR, "results")
KERNEL_FILES = ["numbaxent/_kernels.py", "numbaxent/_rows.py", "numbaxent/_columns.py",
                "numbaxent/_targets.py", "numbaxent/_math.py", "numbaxent/_metrics.py",
                "numbaxent/_parallel.py"]
CASES = ["S1", "S4", "S9b"]
BENCHMARKS = {"forward+backward": "history.History.time_forward_backward"}


def _git(*args: str) -> str:
    return subprocess.check_output(["git", "-C", ROOT, *args], text=True).strip()


def kernel_commits() -> list[str]:
    """Full hashes of the commits that changed a kernel file, oldest first."""
    return _git("log", "--reverse", "--format=%H", "--", *KERNEL_FILES).split()


# --- machine -------------------------------------------------------------------------------------

def cpu_description() -> tuple[str, str]:
    """(short name, description) of this CPU from /proc/cpuinfo (lscpu's 'Model name' can be as
    terse as 'AMD EPYC'; family and model say which generation it is)."""
    info = {}
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if ":" in line:
                    k, v = (s.strip() for s in line.split(":", 1))
                    info.setdefault(k, v)
    except OSError:
        pass
    model = info.get("model name") or platform.processor() or platform.machine()
    flags = info.get("flags", "").split()
    simd = "AVX-512" if "avx512f" in flags else "AVX2" if "avx2" in flags else ""
    extra = ", ".join(x for x in (
        f"family {info['cpu family']} model {info['model']}" if "cpu family" in info else "",
        simd) if x)
    desc = f"{model} ({extra})" if extra else model
    fam = f"-f{info['cpu family']}m{info['model']}" if "cpu family" in info else ""
    name = re.sub(r"[^a-z0-9]+", "-", model.lower()).strip("-") + fam + f"-{os.cpu_count()}cpu"
    return name, desc


def cmd_machine(args) -> int:
    # `asv machine --machine NAME --yes` stores only the name (asv 0.6 keeps just the fields that
    # differ from the detected ones), so write the entry through asv's own machine file API.
    from asv.machine import Machine, MachineCollection

    name, desc = cpu_description()
    info = Machine.get_defaults()
    info.update(machine=args.name or name, cpu=args.cpu or desc)
    MachineCollection.save(info["machine"], info)
    print(json.dumps(info, indent=1))
    return 0


# --- run -----------------------------------------------------------------------------------------

def _extract(sha: str, dest: str) -> None:
    data = subprocess.check_output(["git", "-C", ROOT, "archive", sha, "numbaxent"])
    safe = {"filter": "data"} if hasattr(tarfile, "data_filter") else {}  # Python >= 3.11.4
    with tarfile.open(fileobj=BytesIO(data)) as tar:
        tar.extractall(dest, **safe)


def cmd_run(args) -> int:
    commits = ([_git("rev-parse", c) for c in args.commits] if args.commits
               else kernel_commits() + [_git("rev-parse", "HEAD")])
    commits = list(dict.fromkeys(commits))
    exe = os.path.abspath(shutil.which(sys.executable) or sys.executable)
    # The configuration with the thread-count matrix cut to one value (`-E` cannot select an
    # existing environment's matrix entry), written next to asv.conf.json so its paths still hold.
    with open(os.path.join(ASV_DIR, "asv.conf.json")) as f:
        conf = json.load(f)
    conf["matrix"]["env"]["NUMBA_NUM_THREADS"] = [args.threads]
    conf_path = os.path.join(ASV_DIR, f".asv-history-{os.getpid()}.conf.json")
    with open(conf_path, "w") as f:
        json.dump(conf, f)
    machine = args.machine or cpu_description()[0]
    extra = os.environ.get("PYTHONPATH", "")
    failed = []
    try:
        for sha in commits:
            _run_one(sha, exe, conf_path, machine, extra, args, failed)
    finally:
        os.remove(conf_path)
    if failed:
        print("asv failed for:", " ".join(failed))
    return 1 if failed else 0


def _run_one(sha, exe, conf_path, machine, extra, args, failed) -> None:
    """asv run for one commit, its numbaxent extracted into a temporary directory."""
    with tempfile.TemporaryDirectory(prefix=f"asv-{sha[:8]}-") as tmp:
        _extract(sha, tmp)
        env = dict(os.environ, ASV_PYTHONPATH=os.pathsep.join(p for p in (tmp, extra) if p))
        env["PYTHONPATH"] = env["ASV_PYTHONPATH"]
        where = subprocess.check_output(
            [exe, "-c", "import numbaxent; print(numbaxent.__file__)"], env=env, text=True)
        if not where.startswith(tmp):  # an installed numbaxent would shadow the commit's
            raise SystemExit(f"{sha[:8]}: numbaxent imported from {where.strip()}, not {tmp}")
        env["PYTHONPATH"] = extra
        cmd = [exe, "-m", "asv", "run", "--config", conf_path, "--python=same",
               "--set-commit-hash", sha, "--machine", machine, "--bench", args.bench,
               *([] if args.no_samples else ["--record-samples"]), *args.asv_args]
        print(f"== {sha[:8]} {_git('log', '-1', '--format=%s', sha)[:70]}"
              f" (load average {os.getloadavg()[0]:.1f})", flush=True)
        if subprocess.call(cmd, cwd=ASV_DIR, env=env) != 0:
            failed.append(sha[:8])


# --- results -------------------------------------------------------------------------------------

def load_results(machine: str | None = None, threads: str = "1") -> dict:
    """{(case, label): [(commit date ms, sha, best s, median s, q25 s, q75 s), ...]} from the asv
    results JSON (read directly, so this needs no asv), oldest commit first; failed points are left
    out. ``best`` is the fastest recorded sample (the median when asv ran without
    --record-samples): on a shared machine it is the least disturbed by other processes."""
    pattern = os.path.join(RESULTS, machine or "*", "*.json")
    out: dict = {}
    for path in sorted(glob.glob(pattern)):
        if os.path.basename(path) in ("machine.json", "benchmarks.json"):
            continue
        with open(path) as f:
            d = json.load(f)
        if d.get("env_vars", {}).get("NUMBA_NUM_THREADS") != threads:
            continue
        cols = d["result_columns"]
        for label, bench in BENCHMARKS.items():
            row = d["results"].get(bench)
            if row is None:
                continue
            row = dict(zip(cols, row))
            params = [p.strip("'") for p in row["params"][0]]
            n = len(params)
            for i, case in enumerate(params):
                med = row["result"][i] if row["result"] else None
                if case not in CASES or med is None or med != med:  # None / NaN: failed
                    continue
                q25 = (row.get("stats_q_25") or [None] * n)[i] or med
                q75 = (row.get("stats_q_75") or [None] * n)[i] or med
                samples = (row.get("samples") or [None] * n)[i]
                best = min(samples) if samples else med
                out.setdefault((case, label), []).append(
                    (d["date"], d["commit_hash"], best, med, q25, q75))
    for v in out.values():
        v.sort()
    return out


def _subjects() -> dict:
    try:
        log = _git("log", "--format=%H %s")
    except (subprocess.CalledProcessError, OSError):
        return {}
    return dict(line.split(" ", 1) for line in log.splitlines() if " " in line)


def cmd_plot(args) -> int:
    res = load_results(args.machine, args.threads)
    if not res:
        raise SystemExit(f"no results under {RESULTS}")
    commits = sorted({(p[0], p[1]) for v in res.values() for p in v})
    index = {sha: i for i, (_, sha) in enumerate(commits)}
    if args.png:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, axes = plt.subplots(len(CASES), 1, figsize=(10, 8.5), sharex=True)
        for ax, case in zip(axes, CASES):
            for label, marker in zip(BENCHMARKS, "os"):
                pts = res.get((case, label), [])
                if not pts:
                    continue
                x = [index[p[1]] for p in pts]
                line, = ax.plot(x, [p[2] * 1e3 for p in pts], marker=marker,
                                label=f"{label}, best of the samples (solid)")
                ax.plot(x, [p[3] * 1e3 for p in pts], ls="--", lw=1, alpha=0.6,
                        color=line.get_color(), label=f"{label}, median (dashed)")
            ax.set_ylabel(f"{case}  [ms]")
            ax.set_ylim(bottom=0)
            ax.grid(alpha=0.3)
        axes[0].legend(loc="lower left", fontsize=8)
        axes[-1].set_xticks(range(len(commits)))
        axes[-1].set_xticklabels([sha[:7] for _, sha in commits], rotation=60, fontsize=8)
        axes[-1].set_xlabel("commit (oldest first)")
        cpu = ""
        for mpath in glob.glob(os.path.join(RESULTS, args.machine or "*", "machine.json")):
            with open(mpath) as f:
                cpu = json.load(f).get("cpu", "")
        fig.suptitle(f"numbaxent asv history: CPU time per call, NUMBA_NUM_THREADS={args.threads}"
                     f"\n{cpu}", fontsize=10)
        fig.tight_layout()
        os.makedirs(os.path.dirname(os.path.abspath(args.png)), exist_ok=True)
        fig.savefig(args.png, dpi=90)
        print("wrote", args.png)
    if args.table:
        subj = _subjects()
        cols = [(c, l) for c in CASES for l in BENCHMARKS]
        print("| commit | " + " | ".join(f"{c} {l} ms" for c, l in cols) + " |")
        print("|---" * (len(cols) + 1) + "|")
        for _, sha in commits:
            cells = []
            for key in cols:
                p = {p[1]: p for p in res.get(key, [])}.get(sha)
                cells.append("—" if p is None else f"{p[2] * 1e3:.0f} ({p[3] * 1e3:.0f})")
            title = subj.get(sha, "").replace("|", "/")
            if len(title) > 40:
                title = title[:40].rsplit(" ", 1)[0] + " …"
            print(f"| `{sha[:7]}` {title} | " + " | ".join(cells) + " |")
    return 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    m = sub.add_parser("machine", help="record this machine for asv, named after its CPU")
    m.add_argument("--name", help="machine name (default: from the CPU model and core count)")
    m.add_argument("--cpu", help="CPU description (default: model, family/model, AVX level)")
    r = sub.add_parser("run", help="asv run --python=same --set-commit-hash over commits")
    r.add_argument("--commits", nargs="+", help="commits (default: every kernel commit and HEAD)")
    r.add_argument("--machine", help="asv machine name (default: as `machine` names it)")
    r.add_argument("--threads", default="1", choices=["1", "2"], help="NUMBA_NUM_THREADS")
    r.add_argument("--bench", default=r"^history\.", help="asv --bench regex")
    r.add_argument("--no-samples", action="store_true",
                   help="leave out --record-samples (the plot then shows medians)")
    r.add_argument("asv_args", nargs="*", help="more asv run arguments (after --)")
    g = sub.add_parser("plot", help="plot and/or tabulate the committed results")
    g.add_argument("--machine", help="one machine's results (default: all)")
    g.add_argument("--threads", default="1")
    g.add_argument("--png", help="write the plot here")
    g.add_argument("--table", action="store_true", help="print a Markdown table")
    args = p.parse_args(argv)
    return {"machine": cmd_machine, "run": cmd_run, "plot": cmd_plot}[args.command](args)


if __name__ == "__main__":
    sys.exit(main())
