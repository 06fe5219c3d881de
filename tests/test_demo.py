"""`numbaxent demo`: the README's main job."""
import os
import subprocess
import sys

import pytest

pytest.importorskip("sklearn", reason="the demo needs scikit-learn (pip install -e '.[demo]')")

from numbaxent import demo  # noqa: E402


def test_default_run_reaches_95_percent_and_prints_every_epoch(capsys):
    assert demo.main([]) == 0
    out = capsys.readouterr().out
    epoch_lines = [ln for ln in out.splitlines() if ln.strip() and ln.split()[0].isdigit()]
    assert len(epoch_lines) == 30
    final = float(out.strip().splitlines()[-1].split()[3])
    assert final >= 0.95, out


def test_same_seed_same_numbers_and_plot(tmp_path):
    lines = []
    h1 = demo.train(epochs=3, hidden=32, seed=3, out=lines.append)
    h2 = demo.train(epochs=3, hidden=32, seed=3, out=lambda s: None)
    assert [(h["loss"], h["test_acc"]) for h in h1] == [(h["loss"], h["test_acc"]) for h in h2]
    assert h1[-1]["loss"] < h1[0]["loss"]
    assert all(0 < h["loss_share"] < 1 for h in h1)
    h3 = demo.train(epochs=3, hidden=32, seed=4, out=lambda s: None)
    assert [h["loss"] for h in h3] != [h["loss"] for h in h1]
    path = tmp_path / "curves.png"
    demo.plot(h1, path)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_command_line_entry_point(tmp_path):
    png = tmp_path / "p.png"
    r = subprocess.run([sys.executable, "-m", "numbaxent", "demo", "--epochs", "2", "--hidden", "16",
                        "--plot", str(png)], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert "final test accuracy" in r.stdout and os.path.exists(png)
    bad = subprocess.run([sys.executable, "-m", "numbaxent", "demo", "--epochs", "0"],
                         capture_output=True, text=True, timeout=300)
    assert bad.returncode != 0 and "--epochs" in bad.stderr
