"""numbaxent.dask on a real ``distributed.LocalCluster`` with two worker processes (and on the local
threaded and synchronous schedulers): evaluate / cross_entropy against the in-memory Evaluator, the
core loss and the NumPy reference, class-axis rechunking, from_npy, ``numbaxent eval --scheduler``,
errors from workers, and that the core never imports Dask.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

dask = pytest.importorskip("dask")
da = pytest.importorskip("dask.array")
distributed = pytest.importorskip("distributed")

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from test_evaluator import assert_matches, assert_same, reference  # noqa: E402

import numbaxent as nx  # noqa: E402
import numbaxent.dask as nxd  # noqa: E402
from numbaxent.evaluate import Evaluator  # noqa: E402

C = 9
N = 600


@pytest.fixture(scope="module")
def client():
    from distributed import Client, LocalCluster

    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None,
                      worker_dashboard_address=None) as cluster, Client(cluster) as c:
        yield c


@pytest.fixture(scope="module")
def arrays():
    rng = np.random.default_rng(3)
    x = 2 * rng.standard_normal((N, C))
    t = rng.integers(0, C, N)
    t[rng.random(N) < 0.1] = -100
    return x, t, np.linspace(0.5, 2.0, C)


def test_evaluate_on_a_local_cluster_with_worker_processes(client, arrays):
    from distributed import get_task_stream

    x, t, w = arrays
    dx = da.from_array(x, chunks=(50, 4))  # class axis chunked too: rechunked for the user
    dt = da.from_array(t, chunks=77)  # row chunks unlike the logits': aligned for the user
    kw = dict(weight=w, label_smoothing=0.1, topk=(1, 3), calibration_bins=12)
    with get_task_stream(client) as ts:
        res = nxd.evaluate(dx, dt, **kw)
    whole = Evaluator(C, **kw).update(x, t).result()
    assert_same(res, whole, rtol=1e-12)
    assert_matches(res, reference(x, t, C, w, -100, 0.1, (1, 3), 12), rtol=1e-12)
    workers = {rec["worker"] for rec in ts.data if "numbaxent-block" in str(rec["key"])}
    assert len(workers) == 2, "the block tasks should run on both worker processes"
    pids = set(client.run(os.getpid).values())
    assert os.getpid() not in pids and len(pids) == 2


def test_cross_entropy_on_the_cluster(client, arrays):
    x, t, w = arrays
    dx = da.from_array(x, chunks=(64, C))
    for reduction in ("mean", "sum"):
        got = nxd.cross_entropy(dx, t, weight=w, label_smoothing=0.2, reduction=reduction)
        assert isinstance(got, da.Array) and got.shape == ()
        expect = nx.cross_entropy(x, t, weight=w, label_smoothing=0.2, reduction=reduction)
        np.testing.assert_allclose(got.compute(), expect, rtol=1e-12)
    none = nxd.cross_entropy(dx, t, weight=w, reduction="none")
    np.testing.assert_allclose(none.compute(), nx.cross_entropy(x, t, weight=w, reduction="none"),
                               rtol=1e-12)
    p = np.abs(np.random.default_rng(0).standard_normal((N, C)))
    p /= p.sum(1, keepdims=True)
    got = nxd.cross_entropy(dx, da.from_array(p, chunks=(100, 3))).compute()
    np.testing.assert_allclose(got, nx.cross_entropy(x, p), rtol=1e-12)


def test_from_npy_blocks_are_read_by_the_workers(client, arrays, tmp_path):
    x, t, _ = arrays
    np.save(tmp_path / "x.npy", x.astype(np.float32))
    dx = nxd.from_npy(tmp_path / "x.npy", chunk_rows=128)
    assert dx.chunks[0] == (128, 128, 128, 128, 88)
    res = nxd.evaluate(dx, t, topk=(1, 2))
    whole = Evaluator(C, topk=(1, 2)).update(x.astype(np.float32), t).result()
    assert_same(res, whole, rtol=1e-12)


def test_eval_command_with_scheduler_address(client, arrays, tmp_path, capsys):
    from numbaxent.eval_cli import main

    x, t, w = arrays
    np.save(tmp_path / "x.npy", x)
    np.save(tmp_path / "t.npy", t)
    args = [str(tmp_path / "x.npy"), str(tmp_path / "t.npy"), "--json", "--chunk-rows", "100"]
    assert main(args + ["--scheduler", client.scheduler.address]) == 0
    got = json.loads(capsys.readouterr().out)
    assert main(args) == 0
    local = json.loads(capsys.readouterr().out)
    assert got["input"]["path"] == "dask" and local["input"]["path"] == "stream"
    for key in ("loss", "loss_sum", "entropy", "ece", "nll"):
        assert got[key] == pytest.approx(local[key], rel=1e-12), key
    assert got["accuracy"] == local["accuracy"]
    # as a program, where no default client exists; with a scheduler file as `dask scheduler
    # --scheduler-file` writes it
    sched_file = tmp_path / "scheduler.json"
    sched_file.write_text(json.dumps({"address": client.scheduler.address}))
    r = subprocess.run([sys.executable, "-m", "numbaxent", "eval", *args, "--scheduler",
                        str(sched_file)], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["loss"] == pytest.approx(local["loss"], rel=1e-12)
    bad = t.copy()
    bad[333] = C
    np.save(tmp_path / "bad.npy", bad)
    rc = main([str(tmp_path / "x.npy"), str(tmp_path / "bad.npy"), "--chunk-rows", "100",
               "--scheduler", client.scheduler.address])
    err = capsys.readouterr().err
    assert rc == 1 and "target 9 at row 333 is out of range" in err and len(err.splitlines()) == 1
    with dask.config.set({"distributed.comm.timeouts.connect": "1s"}):
        rc = main(args + ["--scheduler", "tcp://127.0.0.1:1"])
    err = capsys.readouterr().err
    assert rc == 1 and "cannot connect to the Dask scheduler" in err


def test_worker_errors_name_the_global_row(client, arrays):
    x, t, _ = arrays
    bad = t.copy()
    bad[517] = -7
    with pytest.raises(IndexError, match="target -7 at row 517"):
        nxd.evaluate(da.from_array(x, chunks=(100, C)), bad)


@pytest.mark.parametrize("scheduler", ["threads", "sync"])
def test_local_schedulers_and_tree_shapes(arrays, scheduler):
    x, t, w = arrays
    whole = Evaluator(C, weight=w, topk=(1, 4)).update(x, t).result()
    for chunks, split_every in (((37, 5), 2), ((600, C), 8), ((1, C), 3)):
        res = nxd.evaluate(da.from_array(x, chunks=chunks), t, weight=w, topk=(1, 4),
                           split_every=split_every, scheduler=scheduler)
        assert_same(res, whole, rtol=1e-12)
    lazy = nxd.evaluate(x, t, weight=w, topk=(1, 4), chunk_rows=64, compute=False)
    assert isinstance(lazy.compute(scheduler=scheduler), Evaluator)


def test_input_errors(arrays):
    x, t, _ = arrays
    with pytest.raises(ValueError, match="600 rows but targets have 599"):
        nxd.evaluate(da.from_array(x, chunks=100), t[:-1])
    with pytest.raises(TypeError, match="integer class indices"):
        nxd.evaluate(da.from_array(x, chunks=100), t.astype(float))
    with pytest.raises(ValueError, match="num_classes"):
        nxd.evaluate(da.from_array(x, chunks=100), t, num_classes=C + 1)


def test_core_never_imports_dask():
    code = ("import sys, numpy as np, numbaxent as nx, numbaxent.evaluate as e, "
            "numbaxent.eval_cli; e.Evaluator(3).update(np.eye(3), np.arange(3)); "
            "nx.cross_entropy(np.eye(3), np.arange(3)); print('dask' in sys.modules)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "False"


# -- confusion matrix, shards, row ranges and saved states -------------------------------------------------
from test_evaluator import assert_confusion, confusion_reference  # noqa: E402


def test_confusion_on_the_cluster_equals_the_reference(client, arrays):
    x, t, _ = arrays
    res = nxd.evaluate(da.from_array(x, chunks=(70, 4)), t, confusion=True, topk=(1, 2))
    assert_confusion(res, confusion_reference(x, t, C))
    whole = Evaluator(C, confusion=True, topk=(1, 2)).update(x, t).result()
    assert_same(res, whole, rtol=1e-12)


@pytest.mark.parametrize("scheduler", ["threads", "sync"])
def test_confusion_for_kdim_logits_on_local_schedulers(scheduler):
    rng = np.random.default_rng(8)
    x = rng.standard_normal((10, 5, 4, 3)).astype(np.float32)
    t = rng.integers(0, 5, (10, 4, 3))
    t[3] = -100
    dx = da.from_array(x, chunks=(3, 2, 4, 2))  # classes and a spatial axis chunked too
    res = nxd.evaluate(dx, da.from_array(t, chunks=(4, 2, 3)), confusion=True, split_every=2,
                       scheduler=scheduler)
    assert_confusion(res, confusion_reference(np.moveaxis(x, 1, -1).reshape(-1, 5),
                                              t.reshape(-1), 5))
    np.testing.assert_array_equal(res.confusion,
                                  Evaluator(5, confusion=True).update(x, t).result().confusion)


def test_eval_command_on_the_cluster_with_shards_rows_and_saved_states(client, arrays, tmp_path,
                                                                     capsys):
    from numbaxent.eval_cli import main, merge_main

    x, t, _ = arrays
    for i, (a, b) in enumerate(((0, 250), (250, N))):
        np.save(tmp_path / f"x-{i}.npy", x[a:b])
        np.save(tmp_path / f"t-{i}.npy", t[a:b])
    shards = [str(tmp_path / "x-*.npy"), str(tmp_path / "t-*.npy"), "--confusion", "--json"]
    assert main(shards) == 0
    local = json.loads(capsys.readouterr().out)
    for i, rows in enumerate(("0:200", "200:")):  # the first range ends inside the first shard
        assert main(shards + ["--rows", rows, "--chunk-rows", "64", "--scheduler",
                              client.scheduler.address,
                              "--save-state", str(tmp_path / f"s{i}.npz")]) == 0
        got = json.loads(capsys.readouterr().out)
        assert got["input"]["path"] == "dask" and got["timing"]["includes_compile"] is None
    assert merge_main([str(tmp_path / "s0.npz"), str(tmp_path / "s1.npz"), "--json"]) == 0
    merged = json.loads(capsys.readouterr().out)
    for key in ("n_seen", "n_valid", "accuracy", "confusion"):
        assert merged[key] == local[key], key
    for key in ("loss", "loss_sum", "entropy", "ece", "mean_iou"):
        assert merged[key] == pytest.approx(local[key], rel=1e-9), key
    assert merged["confusion"] == confusion_reference(x, t, C)[0].tolist()
