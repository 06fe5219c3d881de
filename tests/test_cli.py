"""The `numbaxent` command line as a user meets it: `--version`, help texts, a reader that goes away
(`numbaxent ... | head -1`), and `bench` without its optional packages (ml_dtypes, PyTorch, JAX).

Expected values come from outside the code under test: the version from pyproject.toml, the option
list from argparse itself, the absence of a traceback from the child's stderr.
"""
from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys

import numpy as np
import pytest

from numbaxent import bench, bench_cases
from numbaxent.__main__ import COMMANDS

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def numbaxent(*args, stdout=subprocess.PIPE, cwd=None):
    return subprocess.run([sys.executable, "-m", "numbaxent", *args], stdout=stdout,
                          stderr=subprocess.PIPE, text=True, cwd=cwd, timeout=120)


@pytest.mark.smoke
def test_version_is_the_distribution_version(tmp_path):
    with open(os.path.join(ROOT, "pyproject.toml")) as f:
        version = re.search(r'^version = "([^"]+)"', f.read(), re.M).group(1)
    for flag in ("--version", "-V"):
        r = numbaxent(flag, cwd=tmp_path)
        assert r.returncode == 0, r.stderr
        assert r.stdout.strip() == f"numbaxent {version}"


@pytest.mark.smoke
@pytest.mark.parametrize("command", [None, *COMMANDS])
def test_help_to_a_closed_pipe_exits_quietly(command, tmp_path):
    # `numbaxent COMMAND --help | head -1`, made deterministic: the reader is gone before the
    # command writes its first byte
    read_end, write_end = os.pipe()
    os.close(read_end)
    try:
        r = numbaxent(*([command] if command else []), "--help", stdout=write_end, cwd=tmp_path)
    finally:
        os.close(write_end)
    assert "Traceback" not in r.stderr and "BrokenPipeError" not in r.stderr, r.stderr
    assert r.returncode in (0, 141), r.stderr


def _options(parser: argparse.ArgumentParser):
    return [a for a in parser._actions if not isinstance(a, argparse._HelpAction)]


@pytest.mark.smoke
@pytest.mark.parametrize("module", ["demo", "bench"])
def test_every_option_has_a_help_text(module, capsys):
    import importlib

    mod = importlib.import_module(f"numbaxent.{module}")
    with pytest.raises(SystemExit) as exc:
        mod.main(["--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    # every option argparse knows about is listed, each followed by its own text
    for action in _options(mod.parser()):
        assert action.help and action.help.strip(), action.option_strings
    for block in filter(str.strip, re.split(r"\n(?=  -)", out.split("options:", 1)[1])):
        words = block.split()
        flags = [w for w in words if w.startswith("-")]
        assert len(words) > len(flags) + 1, f"no help text in {block!r}"


@pytest.fixture
def without(monkeypatch):
    """Make ``import NAME`` fail as if the package were not installed."""
    def hide(*names):
        for name in names:
            monkeypatch.setitem(sys.modules, name, None)
    return hide


@pytest.mark.smoke
def test_bfloat16_case_is_skipped_with_a_reason_without_ml_dtypes(without, capsys):
    without("ml_dtypes")
    assert bench_cases.case_unavailable("S9b") and not bench_cases.case_unavailable("S1")
    with pytest.raises(NotImplementedError, match="ml_dtypes"):  # asv skips such a setup
        bench_cases.make_case("S9b", quick=True)
    assert bench.main(["--cases", "S9b"]) == 1
    err = capsys.readouterr().err
    assert "skipping S9b" in err and "ml_dtypes is not installed" in err


def test_asv_bfloat16_benchmark_skips_without_ml_dtypes(without):
    sys.path.insert(0, os.path.join(ROOT, "asv_bench"))
    try:
        from benchmarks.cross_entropy import CrossEntropy
    finally:
        sys.path.remove(os.path.join(ROOT, "asv_bench"))
    without("ml_dtypes")
    with pytest.raises(NotImplementedError):  # asv reports a benchmark whose setup raises it skipped
        CrossEntropy().setup("S9b")


def test_bench_runs_the_rest_and_says_why_columns_are_empty(without, capsys):
    without("ml_dtypes", "torch", "jax")
    rc = bench.main(["--cases", "S1,S9b", "--quick", "--repeat", "1", "--threads", "1",
                     "--no-memory"])
    out, err = capsys.readouterr()
    assert rc == 0, err
    assert "skipping S9b" in err
    rows = [ln for ln in out.splitlines() if ln.startswith("| S")]
    assert len(rows) == 1 and rows[0].startswith("| S1 ")
    cells = [c.strip() for c in rows[0].strip("|").split("|")]
    assert cells[8] == "—" and cells[10] == "—"  # the torch and jax fwd+bwd columns
    assert "torch —: PyTorch is not installed" in out
    assert "jax —: JAX is not installed" in out


def test_bench_notes_name_only_what_is_missing(monkeypatch, without):
    import types

    monkeypatch.setitem(sys.modules, "jax", types.ModuleType("jax"))  # JAX "installed"
    row = {"case": "S1", "torch_fb": (1.0, 1.0), "jax_fb": (1.0, 1.0), "numpy_fb": (1.0, 1.0)}
    assert bench.notes([row]) == []
    bf16 = {"case": "S9b", "torch_fb": (1.0, 1.0)}
    lines = bench.notes([row, bf16])
    assert any(ln.startswith("jax —: only the plain") for ln in lines)
    assert any(ln.startswith("numpy —:") for ln in lines)
    assert len(lines) == 2
    weighted = {"case": "S6", "torch_fb": (1.0, 1.0), "numpy_fb": (1.0, 1.0)}
    assert [ln.split(":")[0] for ln in bench.notes([weighted])] == ["jax —"]
    without("torch", "jax")
    assert sorted(bench.notes([{"case": "S1", "numpy_fb": (1.0, 1.0)}])) == [
        "jax —: JAX is not installed (pip install jax)",
        "torch —: PyTorch is not installed (pip install torch)"]


@pytest.mark.parametrize("dtype", ["float32", "float64", "float16", "bfloat16"])
def test_every_read_floor_candidate_reads_every_element(dtype):
    # a floor that skipped part of the buffer (a wrong view length, a strided slice) would not see
    # a single nonzero element there: each candidate's result must change wherever it is put
    if dtype == "bfloat16":
        dt = np.dtype(pytest.importorskip("ml_dtypes").bfloat16)
    else:
        dt = np.dtype(dtype)
    zeros = np.zeros((6, 10), dtype=dt)
    cands = bench.read_floor_candidates(zeros)
    assert cands, dtype
    if dt.itemsize == 2:  # half precision: integer views only (NumPy's own half sums are slow)
        assert not {"add", "maximum"} & set(cands)
    for name, fn in cands.items():
        base = np.asarray(fn())
        for pos in (0, 29, 59):
            x = zeros.copy()
            x.flat[pos] = 1
            again = bench.read_floor_candidates(x)[name]()
            assert not np.array_equal(np.asarray(again), base), (dtype, name, pos)


def test_read_floor_of_a_strided_array_is_a_plain_sum():
    x = np.zeros((6, 10), np.float16)[:, ::2]
    assert list(bench.read_floor_candidates(x)) == ["add"]


def _proc_cpuinfo():
    try:
        with open("/proc/cpuinfo") as f:
            first = f.read().split("\n\n")[0]
    except OSError:
        pytest.skip("no /proc/cpuinfo")
    return dict((k.strip(), v.strip()) for k, _, v in
                (ln.partition(":") for ln in first.splitlines()))


def test_bench_times_a_case_in_rounds_of_one_call_each():
    calls = []
    fns = {k: (lambda k=k: calls.append(k)) for k in "abc"}
    ts = bench_cases.interleaved_timings(fns, 3, fewer={"c": 1})
    # a warm-up call of each, then rounds; the slow one only in the first round
    assert "".join(calls) == "abc" + "abc" + "ab" + "ab"
    assert {k: len(v) for k, v in ts.items()} == {"a": 3, "b": 3, "c": 1}
    assert all(t >= 0 for v in ts.values() for t in v)


def test_bench_waits_after_a_call_that_frees_in_the_background(monkeypatch):
    naps, calls = [], []
    monkeypatch.setattr(bench_cases.time, "sleep", lambda s: naps.append((calls[-1], s)))
    fns = {k: (lambda k=k: calls.append(k)) for k in "ab"}
    ts = bench_cases.interleaved_timings(fns, 2, settle=["b"])
    assert naps == [("b", bench_cases.SETTLE_SECONDS)] * 3 and len(ts["b"]) == 2


def test_bench_row_keeps_the_fastest_floor_by_median(monkeypatch):
    import numba

    slow = {"floor:add": [3.0, 0.4, 3.0], "floor:or/uint32": [2.0, 0.5, 2.0]}
    fake = {**slow, "floor_fb": [4.0], "nx_fwd": [5.0, 7.0, 6.0], "nx_fb": [8.0]}
    monkeypatch.setattr(bench, "interleaved_timings", lambda fns, repeat, fewer=None, settle=(): {
        k: fake.get(k, [1.0]) for k in fns})
    monkeypatch.setattr(bench, "read_floor_candidates", lambda x: {
        "add": None, "or/uint32": None})
    row = bench.run_case("S4", numba.get_num_threads(), 3, quick=True)
    assert row["floor_fwd_op"] == "or/uint32" and row["floor_fwd"] == (2.0, 0.5)
    assert row["nx_fwd"] == (6.0, 5.0) and row["nx_fb"] == (8.0, 8.0)
    assert not any(k.startswith("floor:") for k in row)


def test_bench_times_the_floors_and_numbaxent_apart_from_the_other_libraries(monkeypatch):
    import numba

    seen = []

    def record(fns, repeat, fewer=None, settle=()):
        seen.append((sorted(fns), sorted(settle)))
        return {k: [1.0] for k in fns}

    monkeypatch.setattr(bench, "interleaved_timings", record)
    monkeypatch.setattr(bench.time, "sleep", lambda s: None)
    bench.run_case("S3", numba.get_num_threads(), 2, quick=True)
    (core, core_settle), (others, others_settle) = seen
    assert {k for k in core if not k.startswith("floor:")} == {"floor_fb", "nx_fwd", "nx_fb"}
    assert core_settle == [] and others_settle == others
    assert "numpy_fb" in others and all(k.split("_")[0] in ("numpy", "torch", "jax") for k in others)


def test_cpu_line_names_the_model_and_the_vector_isa():
    info = _proc_cpuinfo()
    if "model name" not in info or "flags" not in info:
        pytest.skip("not an x86 /proc/cpuinfo")
    line = bench_cases.cpu_line()
    assert line.startswith(f"CPU: {info['model name']} (")
    assert f"family {info['cpu family']} model {info['model']}" in line
    flags = info["flags"].split()
    isa = "avx512" if "avx512f" in flags else "avx2" if "avx2" in flags else "sse"
    assert f"vector ISA {isa}" in line and "vector width" not in line


def test_cpu_line_names_a_vector_width_set_for_the_kernels(monkeypatch):
    from numbaxent import _vector_width

    monkeypatch.setattr(_vector_width, "WIDTH", "512")
    assert bench_cases.cpu_line().endswith(", kernels' vector width 512 (NUMBAXENT_VECTOR_WIDTH)")


def test_every_table_starts_with_the_cpu(capsys, tmp_path):
    import json

    js = tmp_path / "b.json"
    assert bench.main(["--cases", "S1", "--quick", "--repeat", "1", "--threads", "1",
                       "--json", str(js)]) == 0
    out = capsys.readouterr().out
    tables = out.split("\n\n|")
    assert len(tables) == 3  # the timings and the memory table, each after its caption
    for before in tables[:-1]:
        assert before.rstrip().splitlines()[-1] == bench_cases.cpu_line()
    data = json.loads(js.read_text())
    assert data["cpu"] == bench_cases.cpu_info() and data["vector_width"] is None
    (row,) = data["rows"]
    assert row["case"] == "S1" and row["floor_fwd_op"] in bench.read_floor_candidates(
        bench_cases.make_case("S1", quick=True)[0])


def test_jax_times_a_float64_case_in_float64_and_restores_the_setting():
    jax = pytest.importorskip("jax")
    import numba

    before, threads = bool(jax.config.jax_enable_x64), numba.get_num_threads()
    try:
        row = bench.run_case("S8", threads, 1, quick=True)
    finally:
        numba.set_num_threads(threads)
    assert bool(jax.config.jax_enable_x64) == before
    assert row["dtype"] == "float64" and row["jax_dtype"] == "float64" and "jax_fb" in row
    assert any(ln.startswith("jax: S8 computed in float64") for ln in bench.notes([row]))


def test_a_case_jax_cannot_run_in_its_dtype_is_left_out_and_said_so(monkeypatch):
    import types

    monkeypatch.setitem(sys.modules, "jax", types.ModuleType("jax"))
    row = {"case": "S8", "dtype": "float64", "torch_fb": (1.0, 1.0), "numpy_fb": (1.0, 1.0),
           "jax_skip": "JAX computes float64 here in float32"}
    assert bench.notes([row]) == ["jax —: S8 left out: JAX computes float64 here in float32"]
