"""``numbaxent eval`` end to end on real files written here: every input format (.npy of several
dtypes and layouts, .npz members stored and compressed, Zarr through Dask), the JSON and table
outputs against the float64 NumPy reference of test_evaluator.py, chunking invariance, the progress
bar, every error path (one line on stderr, status 1), usage errors (status 2) and Ctrl-C (status 130).
"""
from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time

import numpy as np
import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from test_evaluator import reference  # noqa: E402  (the independent NumPy reference)

from numbaxent.eval_cli import main  # noqa: E402

C = 7
N = 500


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("eval")
    rng = np.random.default_rng(0)
    x = (2 * rng.standard_normal((N, C))).astype(np.float32)
    t = rng.integers(0, C, N)
    t[rng.random(N) < 0.1] = -100
    w = np.linspace(0.5, 2.0, C)
    np.save(d / "x.npy", x)
    np.save(d / "x16.npy", x.astype(np.float16))
    np.save(d / "x64be.npy", x.astype(">f8"))
    np.save(d / "xf.npy", np.asfortranarray(x))
    np.save(d / "t.npy", t)
    np.save(d / "t32.npy", t.astype(np.int32))
    np.save(d / "w.npy", w)
    (d / "w.txt").write_text(", ".join(f"{v!r}" for v in w.tolist()) + "\n")
    np.savez(d / "stored.npz", logits=x, targets=t)
    np.savez_compressed(d / "packed.npz", logits=x, targets=t)
    return d, x, t, w


def run(capsys, *args):
    rc = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return rc, out, err


def run_json(capsys, *args):
    rc, out, err = run(capsys, *args, "--json")
    assert rc == 0, err
    return json.loads(out)


# -- results -------------------------------------------------------------------------------------------
@pytest.mark.smoke
def test_json_matches_the_numpy_reference(files, capsys):
    d, x, t, w = files
    got = run_json(capsys, d / "x.npy", d / "t.npy", "--weight", d / "w.npy", "--label-smoothing",
                   "0.1", "--topk", "1,3", "--calibration-bins", "10", "--chunk-rows", "64")
    ref = reference(x, t, C, w, -100, 0.1, (1, 3), 10)
    for key in ("loss", "loss_sum", "weight_sum", "nll", "perplexity", "entropy", "confidence",
                "balanced_accuracy"):
        assert got[key] == pytest.approx(ref[key], rel=2e-5), key
    assert got["accuracy"] == {str(k): pytest.approx(v, abs=1e-12)
                               for k, v in ref["accuracy"].items()}
    assert got["ece"] == pytest.approx(ref["ece"], abs=1e-4)
    assert got["per_class"]["count"] == ref["per_class"]["count"].tolist()
    assert got["per_class"]["predicted"] == ref["per_class"]["predicted"].tolist()
    assert (got["n_seen"], got["n_ignored"], got["n_valid"]) == (N, ref["n_ignored"], ref["n_valid"])
    assert got["input"]["shape"] == [N, C] and got["input"]["dtype"] == "float32"
    assert got["timing"]["seconds"] > 0


def test_every_format_and_chunking_gives_the_same_result(files, capsys):
    d, x, t, w = files
    base = run_json(capsys, d / "x.npy", d / "t.npy")
    for args in ([d / "x.npy", d / "t.npy", "--chunk-rows", 1],
                 [d / "x.npy", d / "t32.npy", "--chunk-rows", 33],
                 [d / "xf.npy", d / "t.npy", "--chunk-rows", 100],
                 [f"{d / 'stored.npz'}:logits", f"{d / 'stored.npz'}:targets", "--chunk-rows", 77],
                 [f"{d / 'packed.npz'}:logits", f"{d / 'packed.npz'}:targets", "--chunk-rows", 50],
                 [d / "x.npy", d / "t.npy", "--threads", 1]):
        got = run_json(capsys, *args)
        for key in ("loss", "loss_sum", "nll", "entropy", "ece", "confidence"):
            assert got[key] == pytest.approx(base[key], rel=1e-12), (args, key)
        assert got["accuracy"] == base["accuracy"]
        assert got["per_class"]["count"] == base["per_class"]["count"]


def test_float16_and_big_endian_float64_files(files, capsys):
    d, x, t, _ = files
    got = run_json(capsys, d / "x64be.npy", d / "t.npy", "--topk", "2")
    ref = reference(x.astype(np.float64), t, C, topk=(2,))
    assert got["loss"] == pytest.approx(ref["loss"], rel=1e-12)
    assert got["accuracy"]["2"] == pytest.approx(ref["accuracy"][2], abs=1e-15)
    got = run_json(capsys, d / "x16.npy", d / "t.npy")
    ref = reference(x.astype(np.float16), t, C)
    assert got["loss"] == pytest.approx(ref["loss"], rel=2e-5)
    assert got["input"]["dtype"] == "float16"


def test_weight_from_a_text_file(files, capsys):
    d, *_ = files
    a = run_json(capsys, d / "x.npy", d / "t.npy", "--weight", d / "w.npy")
    b = run_json(capsys, d / "x.npy", d / "t.npy", "--weight", d / "w.txt")
    assert a["loss"] == pytest.approx(b["loss"], rel=1e-12)


def test_table_output(files, capsys):
    d, x, t, _ = files
    t3 = np.where(t == -100, 3, t)  # an in-range ignore index
    np.save(d / "t3.npy", t3)
    rc, out, err = run(capsys, d / "x.npy", d / "t3.npy", "--per-class", "--ignore-index", "3")
    assert rc == 0 and err == ""
    ref = reference(x, t3, C, ignore_index=3)
    for label in ("loss (mean)", "perplexity", "accuracy@1", "accuracy@5", "ECE (15 bins)",
                  "mean entropy", "targets seen", "ignored"):
        assert label in out
    line = next(ln for ln in out.splitlines() if ln.startswith("loss (mean)"))
    assert float(line.split()[-1]) == pytest.approx(ref["loss"], rel=1e-5)
    assert "class" in out and "precision" in out


def test_zarr_through_dask_with_a_chunked_class_axis(files, capsys, tmp_path):
    zarr = pytest.importorskip("zarr")
    pytest.importorskip("dask.array")
    d, x, t, _ = files
    z = zarr.open_array(str(tmp_path / "x.zarr"), mode="w", shape=x.shape, chunks=(64, 3),
                        dtype=x.dtype)
    z[...] = x
    zt = zarr.open_array(str(tmp_path / "t.zarr"), mode="w", shape=t.shape, chunks=(100,),
                         dtype=t.dtype)
    zt[...] = t
    base = run_json(capsys, d / "x.npy", d / "t.npy")
    for targets in (tmp_path / "t.zarr", d / "t.npy"):
        got = run_json(capsys, tmp_path / "x.zarr", targets)
        assert got["input"]["path"] == "dask"
        for key in ("loss", "loss_sum", "entropy", "ece"):
            assert got[key] == pytest.approx(base[key], rel=1e-12), key
        assert got["accuracy"] == base["accuracy"]


def test_progress_bar_only_when_asked_or_on_a_terminal(files, capsys):
    pytest.importorskip("tqdm")
    d, *_ = files
    rc, out, err = run(capsys, d / "x.npy", d / "t.npy", "--chunk-rows", "100")
    assert rc == 0 and err == ""  # stderr is not a terminal here
    rc, out, err = run(capsys, d / "x.npy", d / "t.npy", "--chunk-rows", "100", "--progress")
    assert rc == 0 and "numbaxent eval" in err and "100%" in err and f"{N}/{N}" in err


# -- errors ----------------------------------------------------------------------------------------------
def _truncate(src, dst, drop):
    data = open(src, "rb").read()
    open(dst, "wb").write(data[:-drop])


def _bad_header(dst):
    with open(dst, "wb") as f:
        f.write(b"\x93NUMPY\x01\x00" + (20).to_bytes(2, "little") + b"{'descr': <f4, oops" + b"\n")


def _error_cases(d, x, t):
    p = lambda name: str(d / name)  # noqa: E731
    cases = {}
    cases["missing file"] = ([p("nope.npy"), p("t.npy")], "nope.npy: no such file")
    _truncate(p("x.npy"), p("trunc.npy"), 100)
    cases["truncated npy"] = ([p("trunc.npy"), p("t.npy")], "trunc.npy: truncated file")
    open(p("garbage.npy"), "wb").write(os.urandom(300))
    cases["not npy"] = ([p("garbage.npy"), p("t.npy")], "garbage.npy: not a .npy file")
    _bad_header(p("badhdr.npy"))
    cases["corrupt header"] = ([p("badhdr.npy"), p("t.npy")], "badhdr.npy: corrupt .npy header")
    _truncate(p("stored.npz"), p("trunc.npz"), 50)
    cases["truncated npz"] = ([p("trunc.npz") + ":logits", p("t.npy")], "not a valid .npz")
    cases["npz member needed"] = ([p("stored.npz"), p("t.npy")], "name one as")
    cases["npz no member"] = ([p("stored.npz") + ":probs", p("t.npy")], "no member 'probs'")
    np.save(d / "t_short.npy", t[:-3])
    cases["lengths"] = ([p("x.npy"), p("t_short.npy")],
                        f"lengths differ: {p('x.npy')} has {N} rows, {p('t_short.npy')} has {N - 3}")
    bad = t.copy()
    bad[123], bad[321] = C, -1
    np.save(d / "t_bad.npy", bad)
    cases["out of range"] = ([p("x.npy"), p("t_bad.npy"), "--chunk-rows", "50"],
                             f"row 123: target {C} is out of range [0, {C})")
    np.save(d / "x_int.npy", np.zeros((N, C), dtype=np.int32))
    cases["int logits"] = ([p("x_int.npy"), p("t.npy")], "logits must be floating point")
    np.save(d / "t_float.npy", t.astype(np.float64))
    cases["float targets"] = ([p("x.npy"), p("t_float.npy")],
                              "targets must be integer class indices, got dtype float64")
    np.save(d / "x1d.npy", x[0])
    cases["1-d logits"] = ([p("x1d.npy"), p("t.npy")], "must have shape (N, C)")
    np.save(d / "t2d.npy", np.zeros((N, 2), dtype=np.int64))
    cases["target shape"] = ([p("x.npy"), p("t2d.npy")], "do not match logits of shape")
    np.save(d / "w_short.npy", np.ones(C - 1))
    cases["weight length"] = ([p("x.npy"), p("t.npy"), "--weight", p("w_short.npy")],
                              f"weight must have shape ({C},)")
    (d / "w_bad.txt").write_text("1 2 three\n")
    cases["weight text"] = ([p("x.npy"), p("t.npy"), "--weight", p("w_bad.txt")],
                            "comma-separated numbers")
    cases["threads"] = ([p("x.npy"), p("t.npy"), "--threads", "100000"], "--threads 100000: at most")
    cases["smoothing"] = ([p("x.npy"), p("t.npy"), "--label-smoothing", "2"],
                          "label_smoothing must be between 0.0 and 1.0")
    np.save(d / "x_obj.npy", np.array([[1, "a"]], dtype=object), allow_pickle=True)
    cases["object array"] = ([p("x_obj.npy"), p("t.npy")], "holds Python objects")
    os.makedirs(d / "broken.zarr", exist_ok=True)
    (d / "broken.zarr" / "zarr.json").write_text("{not json")
    cases["corrupt zarr"] = ([p("broken.zarr"), p("t.npy")], "cannot open as a Zarr array")
    return cases


ERROR_NAMES = ["missing file", "truncated npy", "not npy", "corrupt header", "truncated npz",
               "npz member needed", "npz no member", "lengths", "out of range", "int logits",
               "float targets", "1-d logits", "target shape", "weight length", "weight text",
               "threads", "smoothing", "object array", "corrupt zarr"]


@pytest.fixture(scope="module")
def error_cases(files):
    d, x, t, _ = files
    return _error_cases(d, x, t)


@pytest.mark.parametrize("name", ERROR_NAMES)
def test_errors_are_one_line_with_status_1(error_cases, name, capsys):
    if name == "corrupt zarr":
        pytest.importorskip("zarr")
    args, expected = error_cases[name]
    rc, out, err = run(capsys, *args)
    assert rc == 1, (out, err)
    assert out == ""
    lines = err.splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("numbaxent eval: error: ")
    assert expected in lines[0]


def test_out_of_range_target_in_a_compressed_member_names_the_row(files, capsys, tmp_path):
    d, x, t, _ = files
    bad = t.copy()
    bad[456] = 99
    np.savez_compressed(tmp_path / "p.npz", logits=x, targets=bad)
    rc, out, err = run(capsys, f"{tmp_path / 'p.npz'}:logits", f"{tmp_path / 'p.npz'}:targets")
    assert rc == 1 and "row 456: target 99 is out of range" in err


def test_kdim_logits_and_their_target_errors(capsys, tmp_path):
    rng = np.random.default_rng(5)
    x = rng.standard_normal((50, 6, 4)).astype(np.float32)
    t = rng.integers(0, 6, (50, 4))
    np.save(tmp_path / "x.npy", x)
    np.save(tmp_path / "t.npy", t)
    got = run_json(capsys, tmp_path / "x.npy", tmp_path / "t.npy", "--chunk-rows", 7)
    ref = reference(np.moveaxis(x, 1, -1).reshape(-1, 6), t.reshape(-1), 6)
    assert got["loss"] == pytest.approx(ref["loss"], rel=2e-6)
    assert got["n_seen"] == 200
    t[3, 2] = 9
    np.save(tmp_path / "bad.npy", t)
    rc, out, err = run(capsys, tmp_path / "x.npy", tmp_path / "bad.npy")
    assert rc == 1 and "row 3, position 2: target 9 is out of range [0, 6)" in err


@pytest.mark.smoke
def test_usage_errors_exit_2(files, capsys):
    d, *_ = files
    for args in (["--topk", "0,1"], ["--topk", "a"], ["--chunk-rows", "0"], []):
        rc, out, err = run(capsys, *([d / "x.npy", d / "t.npy"] if args else []), *args)
        assert rc == 2 and "usage: numbaxent eval" in err


@pytest.mark.smoke
def test_help_exits_0(capsys):
    rc, out, _ = run(capsys, "--help")
    assert rc == 0 and "--chunk-rows" in out and "--scheduler" in out


# -- as a program ------------------------------------------------------------------------------------
def _cmd(*args):
    return subprocess.run(list(args), capture_output=True, text=True, timeout=300)


def test_console_script_and_python_dash_m(files, capsys):
    d, *_ = files
    base = run_json(capsys, d / "x.npy", d / "t.npy")
    r = _cmd(sys.executable, "-m", "numbaxent", "eval", str(d / "x.npy"), str(d / "t.npy"),
             "--json")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["loss"] == base["loss"]
    exe = shutil.which("numbaxent", path=os.path.dirname(sys.executable)) or \
        shutil.which("numbaxent")
    if exe is None:
        pytest.skip("console script not on PATH")
    r = _cmd(exe, "eval", str(d / "x.npy"), str(d / "nope.npy"))
    assert r.returncode == 1 and r.stderr.strip().endswith("nope.npy: no such file")


def test_ctrl_c_stops_cleanly_with_status_130(tmp_path):
    pytest.importorskip("tqdm")
    rng = np.random.default_rng(1)
    n = 400_000
    np.save(tmp_path / "x.npy", rng.standard_normal((n, C), dtype=np.float32))
    np.save(tmp_path / "t.npy", rng.integers(0, C, n))
    proc = subprocess.Popen([sys.executable, "-X", "faulthandler", "-m", "numbaxent", "eval",
                             str(tmp_path / "x.npy"), str(tmp_path / "t.npy"), "--chunk-rows", "1",
                             "--progress"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            # as in a terminal: a shell's background job (a CI runner may start
                            # the suite as one) inherits SIGINT ignored, and so would this child
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    err = bytearray()

    def pump():
        while True:
            b = proc.stderr.read1(4096)
            if not b:
                return
            err.extend(b)

    reader = threading.Thread(target=pump, daemon=True)
    reader.start()
    deadline = time.monotonic() + 120
    # wait until the bar has refreshed with rows done (the loop over chunks is running)
    while time.monotonic() < deadline and proc.poll() is None:
        if re.search(rb"\| *[1-9][0-9.]*k?/400k", bytes(err)):  # some rows done
            break
        time.sleep(0.05)
    assert proc.poll() is None, "finished before it could be interrupted: " + err.decode()
    time.sleep(0.3)
    proc.send_signal(signal.SIGINT)
    try:
        rc = proc.wait(timeout=60)
    except subprocess.TimeoutExpired:  # faulthandler dumps every thread's stack on SIGABRT
        proc.send_signal(signal.SIGABRT)
        time.sleep(2)
        proc.kill()
        reader.join(timeout=10)
        pytest.fail("no exit within 60 s of SIGINT; stacks:\n" + err.decode()[-20000:])
    reader.join(timeout=10)
    out = proc.stdout.read()
    text = err.decode()
    assert rc == 130, text
    assert out == b""
    assert "Traceback" not in text
    last = text.replace("\r", "\n").strip().splitlines()[-1]
    assert last == "numbaxent eval: interrupted"


# -- row ranges, saved states and merge ----------------------------------------------------------------
from numbaxent.eval_cli import merge_main  # noqa: E402
from test_evaluator import confusion_reference  # noqa: E402

SUMS = ("loss", "loss_sum", "weight_sum", "nll", "perplexity", "entropy", "confidence", "ece", "mce",
        "balanced_accuracy", "mean_iou")
COUNTS = ("n_seen", "n_ignored", "n_valid", "n_nonfinite", "accuracy")


def assert_same_report(got: dict, want: dict):
    """Counts equal, float figures within 1e-9 relative (per class, per bin and IoU included)."""
    for key in COUNTS:
        assert got[key] == want[key], key
    for key in SUMS:
        if key in want or key in got:
            assert got[key] == pytest.approx(want[key], rel=1e-9, nan_ok=True), key
    for group, keys in (("per_class", ("count", "predicted")), ("calibration", ("count",))):
        for key in keys:
            assert got[group][key] == want[group][key], (group, key)
    for group, keys in (("per_class", ("loss_sum", "loss", "accuracy", "precision")),
                        ("calibration", ("confidence", "accuracy"))):
        for key in keys:
            np.testing.assert_allclose(np.array(got[group][key], dtype=float),
                                       np.array(want[group][key], dtype=float), rtol=1e-9,
                                       equal_nan=True, err_msg=f"{group}.{key}")
    assert got.get("confusion") == want.get("confusion")
    if "iou" in want:
        np.testing.assert_allclose(np.array(got["iou"], dtype=float),
                                   np.array(want["iou"], dtype=float), rtol=1e-9, equal_nan=True)


def run_merge(capsys, *args):
    rc = merge_main([str(a) for a in args])
    out, err = capsys.readouterr()
    return rc, out, err


OPTS = ["--weight", "w.npy", "--label-smoothing", "0.1", "--topk", "1,3", "--calibration-bins", "8",
        "--confusion", "--chunk-rows", "37"]


def _opts(d):
    return [str(d / o) if o == "w.npy" else o for o in OPTS]


def test_array_job_ranges_saved_and_merged_equal_one_eval(files, capsys, tmp_path):
    d, x, t, w = files
    whole = run_json(capsys, d / "x.npy", d / "t.npy", *_opts(d))
    ranges = ["0:1", "1:137", "137:400", "400:1000"]  # uneven; the last STOP is past the end
    states = []
    for i, r in enumerate(ranges):
        states.append(tmp_path / f"part-{i}.npz")
        got = run_json(capsys, d / "x.npy", d / "t.npy", *_opts(d), "--rows", r, "--save-state",
                       states[-1])
        a, b = (int(v) for v in r.split(":"))
        assert got["n_seen"] == min(b, N) - a and got["input"]["rows"] == [a, min(b, N)]
    merged = run_json_merge(capsys, *reversed(states))  # any order
    assert_same_report(merged, whole)
    assert merged["input"]["rows"] == [[0, N]] and merged["input"]["missing"] == []
    assert merged["input"]["total_rows"] == N
    ref = reference(x, t, C, w, -100, 0.1, (1, 3), 8)
    assert merged["loss"] == pytest.approx(ref["loss"], rel=2e-5)
    cm, iou, mean_iou = confusion_reference(x, t, C)
    assert merged["confusion"] == cm.tolist()
    assert merged["mean_iou"] == pytest.approx(mean_iou, rel=1e-12)
    # the table: same figures as one eval's table
    rc, out, err = run_merge(capsys, *states, "--per-class")
    assert rc == 0 and err == ""
    rc2, out2, _ = run(capsys, d / "x.npy", d / "t.npy", *_opts(d), "--per-class")
    body = lambda text: [b.strip() for b in text.split("\n\n")[1:3]]  # noqa: E731  (the tables)
    assert body(out) == body(out2)
    assert f"rows     0:{N} of {N}" in out and "mean IoU" in out


def run_json_merge(capsys, *args):
    rc, out, err = run_merge(capsys, *args, "--json")
    assert rc == 0, err
    return json.loads(out)


def test_merge_warns_about_rows_no_state_holds_and_refuses_overlaps(files, capsys, tmp_path):
    d, *_ = files
    for name, r in (("a", "0:100"), ("b", "200:300"), ("c", "250:400")):
        rc, _, err = run(capsys, d / "x.npy", d / "t.npy", "--rows", r, "--save-state",
                         tmp_path / f"{name}.npz")
        assert rc == 0, err
    rc, out, err = run_merge(capsys, tmp_path / "a.npz", tmp_path / "b.npz")
    assert rc == 0 and "rows     0:100, 200:300 of 500" in out
    assert err == f"numbaxent merge: warning: rows 100:200, 300:{N} of the {N} are in none of " \
                  f"the states\n"
    rc, out, err = run_merge(capsys, tmp_path / "b.npz", tmp_path / "c.npz")
    assert rc == 1 and out == ""
    assert err == (f"numbaxent merge: error: {tmp_path / 'b.npz'} and {tmp_path / 'c.npz'} both "
                   f"hold rows 250:300 of the same inputs (they would be counted twice)\n")


def test_sharded_files_and_glob_patterns_equal_one_file(files, capsys, tmp_path):
    d, x, t, _ = files
    bounds = [0, 120, 121, 333, N]
    xs, ts = [], []
    for i, (a, b) in enumerate(zip(bounds[:-1], bounds[1:])):
        xs.append(tmp_path / f"logits-{i:05d}.npy")
        ts.append(tmp_path / f"targets-{i:05d}.npy")
        np.save(xs[-1], x[a:b])
        np.save(ts[-1], t[a:b].astype(np.int32) if i % 2 else t[a:b])  # dtypes may differ
    whole = run_json(capsys, d / "x.npy", d / "t.npy", "--confusion")
    listed = run_json(capsys, *xs, *ts, "--confusion", "--chunk-rows", "50")
    assert_same_report(listed, whole)
    assert listed["input"]["shape"] == [N, C] and len(listed["input"]["logits"]) == 4
    globbed = run_json(capsys, tmp_path / "logits-*.npy", tmp_path / "targets-*.npy", "--confusion")
    assert_same_report(globbed, whole)
    assert globbed["input"]["logits"] == [str(p) for p in xs]  # sorted order
    # a range across shard boundaries, saved and merged with the rest
    states = []
    for i, r in enumerate(("0:121", "121:350", "350:")):
        states.append(tmp_path / f"s{i}.npz")
        rc, _, err = run(capsys, tmp_path / "logits-*.npy", tmp_path / "targets-*.npy",
                         "--confusion", "--rows", r, "--save-state", states[-1])
        assert rc == 0, err
    assert_same_report(run_json_merge(capsys, *states), whole)
    ref = reference(x[100:350], t[100:350], C)
    got = run_json(capsys, *xs, *ts, "--rows", "100:350")
    assert got["n_seen"] == 250 and got["loss"] == pytest.approx(ref["loss"], rel=2e-5)
    # progress covers the whole set
    pytest.importorskip("tqdm")
    rc, _, err = run(capsys, tmp_path / "logits-*.npy", tmp_path / "targets-*.npy", "--progress",
                     "--rows", "100:350")
    assert rc == 0 and "250/250" in err


def test_confusion_in_json_and_table_for_kdim_logits(capsys, tmp_path):
    rng = np.random.default_rng(12)
    x = rng.standard_normal((6, 4, 5, 3)).astype(np.float32)
    t = rng.integers(0, 4, (6, 5, 3))
    t[2, 1] = -100
    np.save(tmp_path / "x.npy", x)
    np.save(tmp_path / "t.npy", t)
    got = run_json(capsys, tmp_path / "x.npy", tmp_path / "t.npy", "--confusion", "--chunk-rows",
                   "4")
    cm, iou, mean_iou = confusion_reference(np.moveaxis(x, 1, -1).reshape(-1, 4), t.reshape(-1), 4)
    assert got["confusion"] == cm.tolist()
    np.testing.assert_allclose(got["iou"], iou, rtol=1e-12)
    assert got["mean_iou"] == pytest.approx(mean_iou, rel=1e-12)
    rc, out, _ = run(capsys, tmp_path / "x.npy", tmp_path / "t.npy", "--confusion")
    line = next(ln for ln in out.splitlines() if ln.startswith("mean IoU"))
    assert float(line.split()[-1]) == pytest.approx(mean_iou, rel=1e-5)
    assert str(cm[0].tolist()) not in out and "confusion" in out  # the matrix: --json only
    no = run_json(capsys, tmp_path / "x.npy", tmp_path / "t.npy")
    assert "mean_iou" not in no and "confusion" not in no


def test_time_excludes_compilation_and_says_so(files, tmp_path):
    d, x, t, _ = files
    np.savez_compressed(tmp_path / "p.npz", logits=x.astype(np.float64), targets=t)
    np.save(tmp_path / "xk.npy", x.reshape(100, 5, C).transpose(0, 2, 1))  # (100, C, 5)
    np.save(tmp_path / "tk.npy", t.reshape(100, 5))
    cases = [[d / "x.npy", d / "t.npy"], [d / "xf.npy", d / "t32.npy"], [d / "x16.npy", d / "t.npy"],
             [f"{tmp_path / 'p.npz'}:logits", f"{tmp_path / 'p.npz'}:targets"],
             [d / "xf.npy", d / "t.npy", "--chunk-rows", "64"], [tmp_path / "xk.npy",
                                                                 tmp_path / "tk.npy"]]
    # a fresh process, where no kernel is loaded yet: each kind of input needs its own
    # specialisations, which the warm-up must compile (or load) before the clock starts
    code = ("import io, json, sys, contextlib; from numbaxent.eval_cli import main\n"
            "for args in json.loads(sys.argv[1]):\n"
            "    out = io.StringIO()\n"
            "    with contextlib.redirect_stdout(out): assert main(args + ['--json']) == 0\n"
            "    print(json.dumps(json.loads(out.getvalue())['timing']))\n"
            "    with contextlib.redirect_stdout(out): assert main(args) == 0\n"
            "    print(out.getvalue().splitlines()[-1])\n")
    r = _cmd(sys.executable, "-c", code, json.dumps([[str(a) for a in c] for c in cases]))
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert len(lines) == 2 * len(cases)
    for args, timing, line in zip(cases, lines[::2], lines[1::2]):
        timing = json.loads(timing)
        assert timing["includes_compile"] is False, args
        assert timing["warmup_seconds"] > 0
        assert line.startswith("time ") and "kernels compiled or loaded beforehand" in line
        assert line.endswith("not timed)")


def test_progress_without_tqdm_says_so_once(files, capsys, monkeypatch):
    d, *_ = files
    monkeypatch.setitem(sys.modules, "tqdm", None)  # import tqdm now raises ImportError
    rc, out, err = run(capsys, d / "x.npy", d / "t.npy", "--progress", "--chunk-rows", "10")
    assert rc == 0 and "loss (mean)" in out
    assert err == ("numbaxent eval: --progress: tqdm is not installed, so no progress bar can be "
                   "shown (pip install 'numbaxent[eval]')\n")
    rc, out, err = run(capsys, d / "x.npy", d / "t.npy", "--chunk-rows", "10")
    assert rc == 0 and err == ""  # not asked for: nothing said


def _state_error_cases(d, tmp, capsys):
    """{name: (merge arguments, expected message)} for unusable states."""
    p = lambda name: str(tmp / name)  # noqa: E731
    assert main([str(d / "x.npy"), str(d / "t.npy"), "--rows", "0:250", "--save-state",
                 p("s0.npz")]) == 0
    assert main([str(d / "x.npy"), str(d / "t.npy"), "--rows", "250:", "--save-state",
                 p("s1.npz"), "--topk", "1"]) == 0
    capsys.readouterr()
    raw = open(p("s0.npz"), "rb").read()
    open(p("trunc.npz"), "wb").write(raw[:-40])
    open(p("garbage.npz"), "wb").write(os.urandom(200))
    members = dict(np.load(p("s0.npz"), allow_pickle=False))
    np.savez(p("v9.npz"), **{**members, "version": np.array(9)})
    return {
        "missing": ([p("s0.npz"), p("nope.npz")], f"{p('nope.npz')}: no such file"),
        "truncated": ([p("s0.npz"), p("trunc.npz")],
                      f"{p('trunc.npz')}: not a numbaxent evaluator state (cannot read it as .npz"),
        "garbage": ([p("garbage.npz")], "not a numbaxent evaluator state (not a .npz (zip) file)"),
        "foreign npz": ([str(d / "stored.npz")], "(no 'format' member)"),
        "npy": ([str(d / "x.npy")], "a single .npy array, not a .npz state file"),
        "future version": ([p("v9.npz")], "evaluator state format version 9 is not supported"),
        "settings": ([p("s0.npz"), p("s1.npz")],
                     f"{p('s1.npz')}: cannot merge with {p('s0.npz')}: different settings "
                     f"(topk: (1,) vs (1, 5))"),
        "twice": ([p("s0.npz"), p("s1.npz"), p("s0.npz")], "given twice"),
        "pickle": ([p("s0.npz"), p("evil.npz")], "member 'ints' is unreadable"),
    }


STATE_ERRORS = ["missing", "truncated", "garbage", "foreign npz", "npy", "future version",
                "settings", "twice", "pickle"]


@pytest.mark.parametrize("name", STATE_ERRORS)
def test_merge_errors_are_one_line_with_status_1(files, capsys, tmp_path, name):
    d, *_ = files
    cases = _state_error_cases(d, tmp_path, capsys)
    marker = tmp_path / "pwned"
    if name == "pickle":
        class Payload:
            def __reduce__(self):
                return (open, (str(marker), "w"))

        members = dict(np.load(tmp_path / "s0.npz", allow_pickle=False))
        members["ints"] = np.array([Payload()], dtype=object)
        np.savez(tmp_path / "evil.npz", **members)
    args, expected = cases[name]
    rc, out, err = run_merge(capsys, *args)
    assert rc == 1 and out == ""
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("numbaxent merge: error: "), err
    assert expected in lines[0]
    assert not marker.exists()


def _eval_error_cases(d, tmp):
    p = lambda name: str(d / name)  # noqa: E731
    np.save(tmp / "x-00000.npy", np.zeros((5, C), np.float32))
    np.save(tmp / "x-00001.npy", np.zeros((5, C + 1), np.float32))
    np.save(tmp / "t-00000.npy", np.zeros(5, np.int64))
    np.save(tmp / "t-00001.npy", np.zeros(4, np.int64))
    np.save(tmp / "wide.npy", np.zeros((2, 11586), np.float32))
    np.save(tmp / "t2.npy", np.zeros(2, np.int64))
    q = lambda name: str(tmp / name)  # noqa: E731
    return {
        "rows past the end": ([p("x.npy"), p("t.npy"), "--rows", f"{N}:{N + 10}"],
                              f"--rows {N}:{N + 10} starts at or after the end of the input "
                              f"({N} rows)"),
        "no glob match": ([q("y-*.npy"), q("t-*.npy")], f"{q('y-*.npy')}: no file matches"),
        "glob counts": ([q("x-*.npy"), q("t-00000.np[y]")],
                        "matches 2 file(s) but"),
        "shard lengths": ([q("x-00000.npy"), p("x.npy"), q("t-00000.npy"), p("t_short.npy")],
                          f"lengths differ: {p('x.npy')} has {N} rows"),
        "shard classes": ([q("x-00000.npy"), q("x-00001.npy"), q("t-00000.npy"), q("t-00000.npy")],
                          f"{q('x-00001.npy')}: logits have {C + 1} classes, "
                          f"{q('x-00000.npy')} has {C}"),
        "shard target range": ([q("x-00000.npy"), p("x.npy"), q("t-00000.npy"), p("t_bad.npy")],
                               f"{p('t_bad.npy')}: row 123: target {C} is out of range"),
        "save-state folder": ([p("x.npy"), p("t.npy"), "--save-state", q("no/such/s.npz")],
                              f"--save-state {q('no/such/s.npz')}: no such directory"),
        "confusion too large": ([q("wide.npy"), q("t2.npy"), "--confusion"],
                                "confusion=True needs a 11586 x 11586 int64 matrix (1.0 GiB), "
                                "more than the 1 GiB limit (at most 11585 classes)"),
    }


EVAL_ERRORS = ["rows past the end", "no glob match", "glob counts", "shard lengths", "shard classes",
               "shard target range", "save-state folder", "confusion too large"]


@pytest.mark.parametrize("name", EVAL_ERRORS)
def test_sharded_range_and_state_errors_are_one_line_with_status_1(files, error_cases, capsys,
                                                                    tmp_path, name):
    d, *_ = files
    args, expected = _eval_error_cases(d, tmp_path)[name]
    rc, out, err = run(capsys, *args)
    assert rc == 1 and out == "", err
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("numbaxent eval: error: "), err
    assert expected in lines[0]
    assert not (tmp_path / "no").exists()


def test_range_and_file_count_usage_errors_exit_2(files, capsys):
    d, *_ = files
    x, t = str(d / "x.npy"), str(d / "t.npy")
    for args, expected in (([x, t, "--rows", "5"], "expected START:STOP"),
                           ([x, t, "--rows", "a:b"], "expected START:STOP"),
                           ([x, t, "--rows=-3:5"], "expected START:STOP"),
                           ([x, t, "--rows", "9:9"], "empty range '9:9'"),
                           ([x, t, x], "expected as many target files as logits files")):
        rc, out, err = run(capsys, *args)
        assert rc == 2 and "usage: numbaxent eval" in err and expected in err, args
    rc, out, err = run_merge(capsys)
    assert rc == 2 and "usage: numbaxent merge" in err


def test_merge_as_a_program(files, tmp_path, capsys):
    d, *_ = files
    for i, r in enumerate(("0:300", "300:")):
        assert main([str(d / "x.npy"), str(d / "t.npy"), "--rows", r, "--save-state",
                     str(tmp_path / f"s{i}.npz")]) == 0
    capsys.readouterr()
    whole = run_json(capsys, d / "x.npy", d / "t.npy")
    merged = _cmd(sys.executable, "-m", "numbaxent", "merge", str(tmp_path / "s0.npz"),
                  str(tmp_path / "s1.npz"), "--json")
    assert merged.returncode == 0, merged.stderr
    assert_same_report(json.loads(merged.stdout), whole)
    bad = _cmd(sys.executable, "-m", "numbaxent", "merge", str(d / "x.npy"))
    assert bad.returncode == 1 and "Traceback" not in bad.stderr
    assert bad.stderr.startswith("numbaxent merge: error: ")
    usage = _cmd(sys.executable, "-m", "numbaxent")
    assert "merge" in usage.stdout


def test_row_ranges_on_every_input_format(files, capsys):
    d, x, t, _ = files
    ref = reference(x[137:400], t[137:400], C)
    for xs, ts in ((d / "x.npy", d / "t.npy"), (d / "xf.npy", d / "t32.npy"),
                   (f"{d / 'stored.npz'}:logits", f"{d / 'stored.npz'}:targets"),
                   (f"{d / 'packed.npz'}:logits", f"{d / 'packed.npz'}:targets")):
        for chunk in ("50", "1000"):
            got = run_json(capsys, xs, ts, "--rows", "137:400", "--chunk-rows", chunk)
            assert got["n_seen"] == 263 and got["n_ignored"] == ref["n_ignored"], (xs, chunk)
            assert got["per_class"]["count"] == ref["per_class"]["count"].tolist()
            assert got["loss"] == pytest.approx(ref["loss"], rel=2e-5), (xs, chunk)
            assert got["accuracy"]["1"] == pytest.approx(ref["accuracy"][1], abs=1e-12)


def test_default_chunk_rows_follow_the_byte_budget_and_the_row_cap(tmp_path):
    """`numbaxent eval`'s default chunk: as many rows as fit DEFAULT_CHUNK_BYTES (long rows: a few
    thousand), at most MAX_CHUNK_ROWS (short rows: the row kernels keep per-row records), never 0;
    hidden states are read in reads of about HIDDEN_CHUNK_BYTES."""
    from numbaxent import eval_cli, io
    from numbaxent.evaluate import HIDDEN_CHUNK_BYTES

    assert io.default_chunk_rows(4 * 32000) == io.DEFAULT_CHUNK_BYTES // (4 * 32000)
    assert io.default_chunk_rows(4 * 32000) * 4 * 32000 <= io.DEFAULT_CHUNK_BYTES
    assert io.default_chunk_rows(4 * 10) == io.MAX_CHUNK_ROWS
    assert io.default_chunk_rows(io.DEFAULT_CHUNK_BYTES * 3) == 1
    assert io.default_chunk_rows(4 * 1024, HIDDEN_CHUNK_BYTES) == HIDDEN_CHUNK_BYTES // 4096
    path = tmp_path / "x.npy"
    np.save(path, np.zeros((8, 32000), np.float32))
    assert eval_cli._default_rows(eval_cli.open_array(str(path))) == io.default_chunk_rows(4 * 32000)
