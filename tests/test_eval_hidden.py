"""Evaluation from hidden states: ``Evaluator.update_hidden``, ``numbaxent eval-hidden``,
``numbaxent.dask.evaluate_hidden``, and half-precision ``linear_cross_entropy``.

Expected values come from the materialised-logits path (``update(hidden @ weight.T + bias)``, and
``numbaxent eval`` on a saved logits file), from the independent float64 NumPy reference of
tests/test_evaluator.py applied to logits NumPy forms in float64, and, for the fused training
loss, from tests/naive.py.
"""
from __future__ import annotations

import json
import os
import sys

import numpy as np
import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from naive import naive_cross_entropy  # noqa: E402
from test_evaluator import assert_matches, assert_same, reference  # noqa: E402

import numbaxent as nx  # noqa: E402
from numbaxent import evaluate as ev_mod  # noqa: E402
from numbaxent.eval_cli import hidden_main, main as eval_main, merge_main  # noqa: E402
from numbaxent.evaluate import Evaluator  # noqa: E402

ml_dtypes = pytest.importorskip("ml_dtypes")
BF16 = ml_dtypes.bfloat16

N, H, V = 200, 12, 23


def problem(seed=0, n=N, ignore_frac=0.1):
    rng = np.random.default_rng(seed)
    h = rng.standard_normal((n, H))
    w = rng.standard_normal((V, H)) * 0.6
    b = rng.standard_normal(V) * 0.5
    t = rng.integers(0, V, n)
    t[rng.random(n) < ignore_frac] = -100
    return h, w, b, t


def f64_logits(h, w, b=None, cap=None):
    """The logits in float64 NumPy from the inputs' exact values (half values upcast exactly)."""
    x = h.astype(np.float64) @ w.astype(np.float64).T
    if b is not None:
        x = x + np.asarray(b).astype(np.float64)
    return x if cap is None else cap * np.tanh(x / cap)


# -- Evaluator.update_hidden ---------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("chunk", [None, 1, 7, 1000])
def test_equals_update_on_the_materialised_logits(dtype, bias, chunk):
    h, w, b, t = problem(1)
    h, w, b = h.astype(dtype), w.astype(dtype), b.astype(dtype)
    cw = np.linspace(0.5, 2.0, V)
    cfg = dict(weight=cw, label_smoothing=0.1, topk=(1, 3), calibration_bins=9, confusion=True)
    got = Evaluator(V, **cfg).update_hidden(h, w, t, b if bias else None, chunk_size=chunk)
    want = Evaluator(V, **cfg).update(h @ w.T + (b if bias else 0), t)
    # float32: the chunked and the whole matrix product may round differently (1 ulp)
    assert_same(got.result(), want.result(), rtol=1e-12 if dtype == np.float64 else 1e-6)
    np.testing.assert_array_equal(got.result().confusion, want.result().confusion)


@pytest.mark.parametrize("hdt,wdt", [(np.float64, np.float64), (np.float32, np.float32),
                                     (np.float16, np.float16), (BF16, BF16),
                                     (np.float16, np.float32), (BF16, np.float64)])
def test_every_dtype_matches_the_float64_reference(hdt, wdt):
    h, w, b, t = problem(2)
    h, w = h.astype(hdt), w.astype(wdt)
    res = Evaluator(V, topk=(1, 5)).update_hidden(h, w, t, b, chunk_size=16).result()
    ref = reference(f64_logits(h, w, b), t, V)
    wide = np.float64 in (hdt, wdt)  # float64 stays float64; anything else is computed in float32
    assert_matches(res, ref, rtol=1e-10 if wide else 2e-5, exact_bins=wide)


def test_softcap_scores_the_capped_logits():
    h, w, b, t = problem(3)
    h *= 3.0  # logits well beyond the cap
    for dtype, rtol in ((np.float64, 1e-10), (np.float32, 2e-5)):
        res = Evaluator(V).update_hidden(h.astype(dtype), w.astype(dtype), t, b, softcap=4.0,
                                         chunk_size=50).result()
        ref = reference(f64_logits(h.astype(dtype), w.astype(dtype), b, cap=4.0), t, V)
        assert_matches(res, ref, rtol=rtol, exact_bins=False)
    plain = Evaluator(V).update_hidden(h, w, t, b).result()
    assert abs(plain.loss - res.loss) > 1e-3  # the cap changes the figures


def test_leading_axes_are_rows_and_ignored_rows_are_counted():
    h, w, b, t = problem(4, n=60, ignore_frac=0.3)
    got = Evaluator(V).update_hidden(h.reshape(3, 20, H), w, t.reshape(3, 20), b, chunk_size=8)
    ref = reference(f64_logits(h, w, b), t, V)
    assert_matches(got.result(), ref, rtol=1e-10)
    # every row ignored: nothing multiplied out, everything counted
    ev = Evaluator(V).update_hidden(h, w, np.full(60, -100), b)
    r = ev.result()
    assert (r.n_seen, r.n_ignored, r.n_valid) == (60, 60, 0) and np.isnan(r.loss)
    assert Evaluator(V).update_hidden(h[:0], w, t[:0]).n_seen == 0


def test_default_chunk_is_64_MiB_of_logits(monkeypatch):
    assert ev_mod.HIDDEN_CHUNK_BYTES == 64 << 20
    assert ev_mod.hidden_chunk_rows(32000, 4) == (64 << 20) // (32000 * 4) == 524
    assert ev_mod.hidden_chunk_rows(10**9, 4) == 1
    h, w, b, t = problem(5, n=100, ignore_frac=0.0)
    seen = []
    real = Evaluator._update

    def spy(self, x, target, cap):
        seen.append((x.shape, x.dtype, x.base is not None))
        return real(self, x, target, cap)

    monkeypatch.setattr(Evaluator, "_update", spy)
    monkeypatch.setattr(ev_mod, "HIDDEN_CHUNK_BYTES", 30 * V * 4)  # 30 float32 rows
    Evaluator(V).update_hidden(h.astype(BF16), w.astype(BF16), t)
    assert [s[0] for s in seen] == [(30, V)] * 3 + [(10, V)]
    assert all(s[1] == np.float32 for s in seen)
    seen.clear()
    Evaluator(V).update_hidden(h, w, t)  # float64: 15 rows of 8-byte logits
    assert [s[0][0] for s in seen] == [15] * 6 + [10]
    assert all(s[2] for s in seen)  # every chunk is a view of one reused buffer


def test_errors_are_clear_and_change_nothing():
    h, w, b, t = problem(6, n=20)
    ev = Evaluator(V).update_hidden(h, w, t)
    before = ev.result()
    cases = [
        (ValueError, "hidden size mismatch", (h[:, :5], w, t)),
        (ValueError, "gives 22 classes", (h, w[:22], t)),
        (ValueError, r"needs targets of shape \(20,\)", (h, w, t[:19])),
        (ValueError, r"bias must have shape \(23,\)", (h, w, t, b[:5])),
        (ValueError, r"weight must have shape \(V, H\)", (h, w[0], t)),
        (ValueError, "0-d", (np.float32(1.0), w, t)),
        (TypeError, "hidden must be float16", (h.astype(np.int32), w, t)),
        (TypeError, "weight must be float16", (h, w.astype(np.int64), t)),
        (TypeError, "integer class indices", (h, w, t.astype(np.float32))),
        (IndexError, "target 23 at row 27 is out of range", (h, w, np.where(
            np.arange(20) == 7, 23, t))),
        (IndexError, "out of range", (h, w, np.full(20, 2**63, dtype=np.uint64))),
    ]
    for exc, msg, args in cases:
        with pytest.raises(exc, match=msg) as info:
            ev.update_hidden(*args)
        assert "\n" not in str(info.value)
    with pytest.raises(ValueError, match="softcap"):
        ev.update_hidden(h, w, t, softcap=-1.0)
    with pytest.raises(ValueError, match="chunk_size"):
        ev.update_hidden(h, w, t, chunk_size=0)
    assert_same(ev.result(), before, rtol=0)


# -- Dask ----------------------------------------------------------------------------------------------
def test_dask_evaluate_hidden_equals_the_evaluator_and_evaluate_on_logits():
    da = pytest.importorskip("dask.array")
    import numbaxent.dask as nxd

    h, w, b, t = problem(7, n=150)
    cw = np.linspace(0.5, 2.0, V)
    cfg = dict(label_smoothing=0.05, topk=(1, 2), confusion=True)
    want = Evaluator(V, weight=cw, **cfg).update_hidden(h, w, t, b, softcap=3.0).result()
    hd = da.from_array(h, chunks=(40, 5))  # the hidden axis chunked too: rechunked to whole rows
    for scheduler in ("sync", "threads"):
        got = nxd.evaluate_hidden(hd, w, da.from_array(t, chunks=33), b, softcap=3.0,
                                  class_weight=cw, chunk_size=7, scheduler=scheduler, **cfg)
        assert_same(got, want, rtol=1e-12)
        np.testing.assert_array_equal(got.confusion, want.confusion)
    on_logits = nxd.evaluate(3.0 * np.tanh(f64_logits(h, w, b) / 3.0), t, weight=cw,
                             chunk_rows=40, **cfg)
    assert_same(on_logits, want, rtol=1e-9)
    with pytest.raises(ValueError, match="hidden size mismatch"):
        nxd.evaluate_hidden(hd, w[:, :4], t)
    with pytest.raises(ValueError, match="hidden must have shape"):
        nxd.evaluate_hidden(h[0], w, t[:1])


# -- the command ---------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("hidden")
    h, w, b, t = problem(8)
    h32, w32, b32 = h.astype(np.float32), w.astype(np.float32), b.astype(np.float32)
    np.save(d / "h.npy", h32)
    np.save(d / "w.npy", w32)
    np.save(d / "b.npy", b32)
    np.save(d / "t.npy", t)
    np.save(d / "t32.npy", t.astype(np.int32))
    np.save(d / "logits.npy", h32 @ w32.T + b32)  # what 'eval' would need: N x V on disk
    np.save(d / "h16.npy", h.astype(np.float16))
    np.save(d / "w16.npy", w.astype(np.float16))
    np.save(d / "hbf.npy", h.astype(BF16))  # saved as |V2, read back as bfloat16
    np.save(d / "wbf.npy", w.astype(BF16))
    np.save(d / "h64.npy", h)
    np.save(d / "w64.npy", w)
    for i, (a, z) in enumerate(((0, 64), (64, 130), (130, N))):
        np.save(d / f"h-{i}.npy", h32[a:z])
        np.save(d / f"t-{i}.npy", t[a:z])
    return d, h32, w32, b32, t


def run(capsys, *args, cmd=hidden_main):
    rc = cmd([str(a) for a in args])
    out, err = capsys.readouterr()
    return rc, out, err


def run_json(capsys, *args, cmd=hidden_main):
    rc, out, err = run(capsys, *args, "--json", cmd=cmd)
    assert rc == 0, err
    return json.loads(out)


FIGURES = ("loss", "loss_sum", "nll", "perplexity", "entropy", "confidence", "balanced_accuracy")


def test_command_equals_eval_on_the_saved_logits_and_the_reference(files, capsys):
    d, h, w, b, t = files
    opts = ["--label-smoothing", "0.1", "--topk", "1,3", "--chunk-rows", "48"]
    got = run_json(capsys, d / "h.npy", d / "w.npy", d / "t.npy", "--bias", d / "b.npy", *opts)
    want = run_json(capsys, d / "logits.npy", d / "t.npy", *opts, cmd=eval_main)
    for key in FIGURES:
        assert got[key] == pytest.approx(want[key], rel=1e-6), key
    assert got["accuracy"] == want["accuracy"]
    assert got["per_class"]["count"] == want["per_class"]["count"]
    ref = reference(f64_logits(h, w, b), t, V, eps=0.1, topk=(1, 3))
    for key in FIGURES:
        assert got[key] == pytest.approx(ref[key], rel=2e-5), key
    assert (got["n_seen"], got["n_ignored"]) == (N, ref["n_ignored"])
    assert got["input"]["hidden"] == str(d / "h.npy")
    assert got["input"]["output_layer"] == dict(weight=str(d / "w.npy"), shape=[V, H],
                                                dtype="float32", bias=str(d / "b.npy"),
                                                softcap=None)
    assert got["input"]["shape"] == [N, H] and got["input"]["chunk_rows"] == 48
    assert got["timing"]["gflops_per_second"] > 0 and got["timing"]["includes_compile"] is False


@pytest.mark.parametrize("hf,wf", [("h16", "w16"), ("hbf", "wbf"), ("h64", "w64"), ("h16", "w")])
def test_command_reads_every_dtype(files, capsys, hf, wf):
    d, *_ = files
    got = run_json(capsys, d / f"{hf}.npy", d / f"{wf}.npy", d / "t32.npy", "--softcap", "2.5")
    h = np.load(d / f"{hf}.npy")
    w = np.load(d / f"{wf}.npy")
    if h.dtype.kind == "V":
        h, w = h.view(BF16), w.view(BF16)
    ref = reference(f64_logits(h, w, cap=2.5), np.load(d / "t.npy"), V)
    rtol = 1e-10 if hf == "h64" else 2e-5
    for key in FIGURES:
        assert got[key] == pytest.approx(ref[key], rel=rtol), key
    assert got["input"]["dtype"] == {"h16": "float16", "hbf": "bfloat16", "h64": "float64"}[hf]


def test_table_rows_states_merge_shards_and_progress(files, capsys, tmp_path):
    d, h, w, b, t = files
    one = run_json(capsys, d / "h.npy", d / "w.npy", d / "t.npy", "--bias", d / "b.npy")
    s1, s2 = tmp_path / "a.npz", tmp_path / "b.npz"
    for rows, state in (("0:77", s1), ("77:", s2)):
        rc, out, err = run(capsys, d / "h.npy", d / "w.npy", d / "t.npy", "--bias", d / "b.npy",
                           "--rows", rows, "--save-state", state)
        assert rc == 0, err
    assert out.splitlines()[:4] == [
        f"hidden   {d / 'h.npy'}  123 x {H} float32",
        f"weight   {d / 'w.npy'}  {V} x {H} float32, bias {d / 'b.npy'}",
        f"targets  {d / 't.npy'}", f"rows     77:{N} of {N}"]
    assert "GFLOP/s of logits" in out
    merged = run_json(capsys, s2, s1, cmd=merge_main)
    shards = run_json(capsys, str(d / "h-*.npy"), d / "w.npy", str(d / "t-*.npy"), "--bias",
                      d / "b.npy", "--chunk-rows", "10")
    listed = run_json(capsys, d / "h-0.npy", d / "h-1.npy", d / "h-2.npy", d / "w.npy",
                      d / "t-0.npy", d / "t-1.npy", d / "t-2.npy", "--bias", d / "b.npy")
    for got in (merged, shards, listed):
        for key in FIGURES:
            assert got[key] == pytest.approx(one[key], rel=1e-6), key
        assert got["accuracy"] == one["accuracy"] and got["n_seen"] == N
    assert merged["input"]["rows"] == [[0, N]] and merged["input"]["missing"] == []
    rc, out, err = run(capsys, d / "h.npy", d / "w.npy", d / "t.npy", "--progress", "--rows",
                       "10:60")
    assert rc == 0 and "numbaxent eval-hidden" in err and "50.0/50.0" in err


def test_zarr_hidden_states_go_through_dask(files, capsys, tmp_path):
    zarr = pytest.importorskip("zarr")
    pytest.importorskip("dask.array")
    d, h, w, b, t = files
    z = zarr.open(str(tmp_path / "h.zarr"), mode="w", shape=h.shape, chunks=(64, 5),
                  dtype=h.dtype)
    z[...] = h
    got = run_json(capsys, tmp_path / "h.zarr", d / "w.npy", d / "t.npy", "--bias", d / "b.npy",
                   "--softcap", "3")
    want = run_json(capsys, d / "h.npy", d / "w.npy", d / "t.npy", "--bias", d / "b.npy",
                    "--softcap", "3")
    assert got["input"]["path"] == "dask"
    for key in FIGURES:
        assert got[key] == pytest.approx(want[key], rel=1e-6), key
    assert got["accuracy"] == want["accuracy"]


def _error_cases(d, tmp):
    h, w, t = np.load(d / "h.npy"), np.load(d / "w.npy"), np.load(d / "t.npy")
    np.save(tmp / "h_int.npy", h.astype(np.int32))
    np.save(tmp / "h3.npy", h.reshape(10, 20, H))
    np.save(tmp / "h_narrow.npy", h[:, :5])
    np.save(tmp / "t_short.npy", t[:-1])
    np.save(tmp / "t2d.npy", t.reshape(N, 1))
    np.save(tmp / "t_float.npy", t.astype(np.float32))
    np.save(tmp / "t_bad.npy", np.where(np.arange(N) == 42, V, t))
    np.save(tmp / "w_narrow.npy", w[:, :5])
    np.save(tmp / "w1d.npy", w[0])
    np.save(tmp / "w_int.npy", w.astype(np.int64))
    np.save(tmp / "b_short.npy", np.zeros(V - 1, np.float32))
    (tmp / "b.txt").write_text("not numbers")
    raw = (d / "h.npy").read_bytes()
    (tmp / "h_trunc.npy").write_bytes(raw[:len(raw) // 2])
    hw, tw = (d / "h.npy", d / "w.npy"), d / "t.npy"
    return {
        "missing hidden": ([tmp / "none.npy", d / "w.npy", tw], "none.npy: no such file"),
        "integer hidden": ([tmp / "h_int.npy", d / "w.npy", tw], "hidden states must be float16"),
        "3-d hidden": ([tmp / "h3.npy", d / "w.npy", tw], "must have shape (N, H)"),
        "truncated hidden": ([tmp / "h_trunc.npy", d / "w.npy", tw], "truncated file"),
        "short targets": ([*hw, tmp / "t_short.npy"], f"has {N} rows"),
        "2-d targets": ([*hw, tmp / "t2d.npy"], "do not match hidden states"),
        "float targets": ([*hw, tmp / "t_float.npy"], "integer class indices"),
        "target out of range": ([*hw, tmp / "t_bad.npy"], "row 42: target 23 is out of range"),
        "hidden size": ([tmp / "h_narrow.npy", d / "w.npy", tw], "does not fit hidden states of "
                                                                 "size H=5"),
        "weight hidden size": ([d / "h.npy", tmp / "w_narrow.npy", tw], "expected (V, 12)"),
        "1-d weight": ([d / "h.npy", tmp / "w1d.npy", tw], "output layer of shape (12,)"),
        "integer weight": ([d / "h.npy", tmp / "w_int.npy", tw], "must be float16, bfloat16"),
        "missing weight": ([d / "h.npy", tmp / "none_w.npy", tw], "none_w.npy: no such file"),
        "shard sizes": ([d / "h.npy", tmp / "h_narrow.npy", d / "w.npy", tw, tw],
                        "hidden states have size H=5"),
        "bias shape": ([*hw, tw, "--bias", tmp / "b_short.npy"], "bias must have shape (23,)"),
        "bias text": ([*hw, tw, "--bias", tmp / "b.txt"], "nor whitespace- or comma-separated"),
        "missing bias": ([*hw, tw, "--bias", tmp / "none_b.npy"], "none_b.npy: no such file"),
        "rows past the end": ([*hw, tw, "--rows", f"{N}:"], "starts at or after the end"),
        "no glob match": ([str(tmp / "zz-*.npy"), d / "w.npy", str(tmp / "yy-*.npy")],
                          "no file matches"),
    }


@pytest.fixture(scope="module")
def error_cases(files, tmp_path_factory):
    d = files[0]
    return _error_cases(d, tmp_path_factory.mktemp("bad"))


@pytest.mark.parametrize("name", ["missing hidden", "integer hidden", "3-d hidden",
                                  "truncated hidden", "short targets", "2-d targets",
                                  "float targets", "target out of range", "hidden size",
                                  "weight hidden size", "1-d weight", "integer weight",
                                  "missing weight", "shard sizes", "bias shape", "bias text",
                                  "missing bias", "rows past the end", "no glob match"])
def test_errors_are_one_line_with_status_1(error_cases, capsys, name):
    args, msg = error_cases[name]
    rc, out, err = run(capsys, *args)
    assert rc == 1, (name, err)
    assert out == ""
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("numbaxent eval-hidden: error: "), err
    assert msg in lines[0], (name, lines[0])


def test_states_of_different_output_layers_do_not_merge(files, capsys, tmp_path):
    d, *_ = files
    a, b = tmp_path / "a.npz", tmp_path / "b.npz"
    assert run(capsys, d / "h.npy", d / "w.npy", d / "t.npy", "--rows", ":50",
               "--save-state", a)[0] == 0
    assert run(capsys, d / "h.npy", d / "w.npy", d / "t.npy", "--rows", "50:", "--softcap", "2",
               "--save-state", b)[0] == 0
    rc, out, err = run(capsys, a, b, cmd=merge_main)
    assert rc == 1 and len(err.strip().splitlines()) == 1
    assert "evaluated with another output layer" in err


def test_usage_errors_exit_2_and_the_command_is_registered(files, capsys):
    d, *_ = files
    for args in ([d / "h.npy", d / "t.npy"],  # no WEIGHT
                 [d / "h.npy", d / "w.npy", d / "t.npy", d / "t.npy"],  # even count
                 [d / "h.npy", d / "w.npy", d / "t.npy", "--softcap", "-1"],
                 [d / "h.npy", d / "w.npy", d / "t.npy", "--softcap", "inf"],
                 [d / "h.npy", d / "w.npy", d / "t.npy", "--chunk-rows", "0"]):
        rc, out, err = run(capsys, *args)
        assert rc == 2, (args, err)
        assert "usage: numbaxent eval-hidden" in err
    from numbaxent.__main__ import main as cli

    assert cli(["eval-hidden", "--help"]) == 0
    assert "--softcap" in capsys.readouterr().out
    cli(["--help"])
    assert "eval-hidden" in capsys.readouterr().out


# -- half-precision linear_cross_entropy ---------------------------------------------------------------
@pytest.mark.parametrize("dtype,rtol", [(np.float16, 2e-3), (BF16, 1.6e-2)])
@pytest.mark.parametrize("opts", [dict(), dict(label_smoothing=0.1, softcap=3.0),
                                  dict(reduction="sum", z_loss=0.01)])
def test_half_precision_linear_cross_entropy_against_a_float64_reference(dtype, rtol, opts):
    rng = np.random.default_rng(9)
    n, hd, v = 37, 16, 50
    h = rng.standard_normal((n, hd)).astype(dtype)
    w = (rng.standard_normal((v, hd)) * 0.3).astype(dtype)
    b = rng.standard_normal(v).astype(dtype)
    t = rng.integers(0, v, n)
    t[[3, 10, 11]] = -100
    loss, gh, gw, gb = nx.linear_cross_entropy_with_grad(h, w, t, b, chunk_size=8, **opts)
    assert (loss.dtype, gh.dtype, gw.dtype, gb.dtype) == (np.dtype(dtype),) * 4
    # the reference: float64 on the inputs' exact values, rounded once to the output dtype
    h64, w64 = h.astype(np.float64), w.astype(np.float64)
    ref_loss, G = naive_cross_entropy(f64_logits(h, w, b), t, **opts)
    assert float(loss) == pytest.approx(float(ref_loss), rel=rtol)
    for got, want in ((gh, G @ w64), (gw, G.T @ h64), (gb, G.sum(0))):
        np.testing.assert_allclose(got.astype(np.float64), want, rtol=rtol,
                                   atol=rtol * np.abs(want).max())
    alone = nx.linear_cross_entropy(h, w, t, b, chunk_size=8, **opts)
    assert alone.dtype == dtype and float(alone) == float(loss)
    none, stats = nx.linear_cross_entropy(h, w, t, b, reduction="none", return_stats=True,
                                          **{k: x for k, x in opts.items() if k != "reduction"})
    assert none.dtype == dtype and stats.lse.dtype == np.float32  # as the core's half path


def test_eval_reads_bfloat16_logits_saved_by_np_save(files, capsys, tmp_path):
    d, h, w, b, t = files
    x = (h @ w.T + b).astype(BF16)
    np.save(tmp_path / "xbf.npy", x)  # stored as the raw dtype |V2
    assert np.load(tmp_path / "xbf.npy").dtype == np.dtype("V2")
    got = run_json(capsys, tmp_path / "xbf.npy", d / "t.npy", cmd=eval_main)
    ref = reference(x.astype(np.float64), t, V)
    for key in FIGURES:
        assert got[key] == pytest.approx(ref[key], rel=2e-5), key
    assert got["input"]["dtype"] == "bfloat16"


def test_dask_tasks_can_map_the_weight_file_themselves(files):
    """What ``eval-hidden --scheduler`` sends: the weight as a file spec, mapped in each task."""
    pytest.importorskip("dask.array")
    import numbaxent.dask as nxd
    from numbaxent.io import RawArray, open_array

    d, h, w, b, t = files
    spec = open_array(str(d / "w.npy"), raw_only=True)
    assert isinstance(spec, RawArray)
    got = nxd.evaluate_hidden(h, spec, t, b, chunk_rows=64, scheduler="sync")
    want = Evaluator(V).update_hidden(h, w, t, b).result()
    assert_same(got, want, rtol=1e-6)
