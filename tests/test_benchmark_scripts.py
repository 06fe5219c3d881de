"""The A/B scripts in benchmarks/ that the performance notes quote still run (nothing else runs
them, and one of them had broken unnoticed), on small arrays."""
from __future__ import annotations

import importlib.util
import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _script(name):
    spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, "benchmarks", f"{name}.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_transpose_profile_round_trips(capsys):
    """Both kernel variants' transpositions, there and back, equal the input (exit status 0)."""
    mod = _script("transpose_profile")
    assert mod.main(["--dtypes", "float32", "--classes", "3,7", "--repeat", "1", "--logits", "20000"]) == 0
    out = capsys.readouterr().out
    assert "C= 3" in out and "C= 7" in out and out.count("round trip ok") == 2


def test_case_times_takes_shapes_and_in_place(capsys):
    mod = _script("case_times")
    assert mod.main(["t", "300x3:float32,200x5:float16", "--repeat", "1"]) == 0
    assert mod.main(["t", "100x50:float32", "--repeat", "1", "--in-place"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line.split(" fwd")[0] for line in lines] == ["t 300x3:float32", "t 200x5:float16",
                                                           "t 100x50:float32 in place"]


def test_row_stream_profile_runs(capsys):
    mod = _script("row_stream_profile")
    assert mod.main(["--rows", "6", "--classes", "3000", "--chunks", "1024", "--repeat", "1"]) == 0
    out = capsys.readouterr().out
    for name in ("next-row", "two passes", "one stream", "blockwise 1024", "one read"):
        assert name in out
