"""Every asv benchmark (and the comparison command) runs once on tiny shapes, so they cannot rot."""
import importlib
import importlib.util
import inspect
import os
import re
import sys

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "asv_bench"))

MODULES = ["benchmarks.cross_entropy", "benchmarks.linear", "benchmarks.history"]


def _benchmarks():
    for modname in MODULES:
        mod = importlib.import_module(modname)
        mod.QUICK = True
        for _, cls in inspect.getmembers(mod, inspect.isclass):
            if cls.__module__ != mod.__name__:
                continue
            methods = [m for m in dir(cls) if m.startswith(("time_", "peakmem_", "timeraw_"))]
            params = getattr(cls, "params", [[None]])
            for p in params[0]:
                yield pytest.param(cls, methods, p, id=f"{cls.__name__}-{p}")


@pytest.mark.parametrize("cls,methods,param", list(_benchmarks()))
def test_benchmark_runs(cls, methods, param):
    obj = cls()
    args = () if param is None else (param,)
    if hasattr(obj, "setup"):
        obj.setup(*args)
    for name in methods:
        result = getattr(obj, name)(*args)
        if name.startswith("timeraw_"):
            compile(result, name, "exec")  # asv runs this source in a fresh interpreter
            assert "numbaxent" in result
    assert methods


def test_bench_command_quick(tmp_path, capsys):
    from numbaxent import bench

    md, png = tmp_path / "t.md", tmp_path / "p.png"
    assert bench.main(["--quick", "--repeat", "1", "--cases", "S1,S5,S7", "--threads", "1",
                       "--markdown", str(md), "--plot", str(png)]) == 0
    out = capsys.readouterr().out
    assert "S5 segmentation" in out
    caption, table = md.read_text().split("\n\n", 1)  # the CPU it ran on, then the table
    assert caption.startswith("CPU: ") and table.startswith("| case |")
    assert png.read_bytes()[:4] == b"\x89PNG"


def test_numpy_baseline_matches_core():
    import numbaxent as nx
    from numbaxent.bench import make_case, numpy_cross_entropy_with_grad

    for case in ("S1", "S6", "S7"):
        x, t, kw = make_case(case, quick=True)
        x, t = x[:8], t[:8]
        loss, grad = numpy_cross_entropy_with_grad(x, t, **kw)
        ref_loss, ref_grad = nx.cross_entropy_with_grad(x, t, **kw)
        np.testing.assert_allclose(loss, ref_loss, rtol=1e-4)
        np.testing.assert_allclose(grad, ref_grad, rtol=1e-3, atol=1e-7)


def _asv_history():
    """benchmarks/asv_history.py, loaded by path (`benchmarks` is asv_bench's package here)."""
    spec = importlib.util.spec_from_file_location(
        "asv_history", os.path.join(ROOT, "benchmarks", "asv_history.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.parametrize("case", ["S1", "S4", "S9b"])
def test_history_inputs_are_the_bench_cases(case):
    # history.py builds its inputs itself (it runs against commits older than numbaxent.bench);
    # they must stay the arrays numbaxent.bench measures under the same case name.
    from numbaxent.bench import make_case

    history = importlib.import_module("benchmarks.history")
    x, t = history.make_input(case, quick=True)
    bx, bt, kw = make_case(case, quick=True)
    assert kw == {} and x.dtype == bx.dtype
    np.testing.assert_array_equal(x.view(np.uint8), bx.view(np.uint8))
    np.testing.assert_array_equal(t, bt)


MIN_COMMITS = 10


def test_committed_history_results():
    """The committed asv results hold S1, S4 and S9b, forward and forward+backward, for at least
    MIN_COMMITS distinct commits of this repository, on a machine whose CPU is recorded."""
    import json
    import subprocess

    hist = _asv_history()
    res = hist.load_results(threads="1")
    machines = [d for d in os.listdir(hist.RESULTS) if os.path.isdir(os.path.join(hist.RESULTS, d))]
    assert machines
    for m in machines:
        with open(os.path.join(hist.RESULTS, m, "machine.json")) as f:
            assert json.load(f)["cpu"]
    try:
        known = set(subprocess.check_output(["git", "-C", ROOT, "rev-list", "--all"],
                                            text=True).split())
    except (OSError, subprocess.CalledProcessError):
        known = None  # not a git checkout (an unpacked sdist)
    for case in ("S1", "S4", "S9b"):
        for label in ("forward+backward",):
            pts = res.get((case, label), [])
            shas = {p[1] for p in pts}
            assert len(shas) >= MIN_COMMITS, (case, label, len(shas))
            assert all(len(s) == 40 for s in shas)
            if known is not None:
                assert shas <= known
            for _, _, best, med, q25, q75 in pts:
                assert 0 < best <= med < 60 and q25 <= med <= q75


def test_documented_asv_commands_save_results():
    """`asv run --python=same` saves nothing without --set-commit-hash: every documented command
    line with it has the flag and a machine name, and the docs publish the results."""
    code = []
    for name in ("performance.md", "benchmark-history.md"):
        with open(os.path.join(ROOT, "docs", name)) as f:
            code += re.findall(r"```bash\n(.*?)```", f.read(), re.S)
    lines = [line for block in code for line in block.splitlines()]
    same = [line for line in lines if re.search(r"\basv run\b.*--python=same", line)]
    assert len(same) >= 3
    for line in same:
        assert "--set-commit-hash" in line and "--machine" in line, line
    assert any(re.match(r"\s*asv publish\b", line) for line in lines)
    assert any("asv_history.py run" in line for line in lines)
    assert any("asv_history.py machine" in line for line in lines)
