"""The documentation site builds with warnings as errors (when MkDocs is installed: CI installs it)."""
import os
import shutil
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_mkdocs_build_strict(tmp_path):
    pytest.importorskip("mkdocs", reason="mkdocs not installed (pip install -e '.[docs]')")
    pytest.importorskip("mkdocstrings", reason="mkdocstrings not installed")
    r = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir",
                        str(tmp_path / "site")], cwd=ROOT, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr[-4000:]
    pages = sorted(f[:-3] for f in os.listdir(os.path.join(ROOT, "docs")) if f.endswith(".md"))
    assert {"index", "api", "lm-head", "evaluating"} <= set(pages)
    for page in pages:  # every Markdown page is built (the home page at the site's root)
        html = tmp_path / "site" / ("index.html" if page == "index" else f"{page}/index.html")
        assert html.exists(), page
        assert len(html.read_text()) > 2000, page
    assert "cross_entropy_with_grad" in (tmp_path / "site" / "api" / "index.html").read_text()
    shutil.rmtree(tmp_path / "site")
