"""Every asv benchmark (and the comparison command) runs once on tiny shapes, so they cannot rot."""
import importlib
import inspect
import os
import sys

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "asv_bench"))

MODULES = ["benchmarks.cross_entropy", "benchmarks.linear"]


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
    assert "S5 segmentation" in out and md.read_text().startswith("| case |")
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
