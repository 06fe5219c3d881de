"""Release hygiene that needs no build: README links work off the repository (on a package index
page), and the lower bounds declared in pyproject.toml are the versions CI tests (.ci/matrix).

Building and checking the sdist and the wheel themselves is CI's job (.ci/matrix: python -m build,
twine check, the smoke tests from the unpacked sdist), too slow for a unit test.
"""
from __future__ import annotations

import os
import re

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
REPOSITORY = "https://github.com/numbaxent/numbaxent"


def _read(*parts):
    with open(os.path.join(ROOT, *parts), encoding="utf-8") as f:
        return f.read()


@pytest.mark.smoke
def test_readme_links_are_absolute_and_point_at_the_repository():
    text = _read("README.md")
    links = re.findall(r"\]\(([^)\s]+)\)", text)
    assert links, "the README links to the documentation"
    relative = [u for u in links if not u.startswith(("https://", "http://", "#"))]
    assert relative == [], "relative links break on a package index page"
    github = [u for u in links if "github.com" in u]
    assert github and all(u.startswith(REPOSITORY + "/") or u == REPOSITORY for u in github)
    for url in github:  # each link into the repository names a file that exists in it
        m = re.match(re.escape(REPOSITORY) + r"/(?:blob|tree)/main/([^#]+)", url)
        if m:
            assert os.path.exists(os.path.join(ROOT, m.group(1))), url
    for anchor in (u[1:] for u in links if u.startswith("#")):
        headings = [re.sub(r"[^a-z0-9 -]", "", h.lower()).replace(" ", "-")
                    for h in re.findall(r"^#+ (.+)$", text, re.M)]
        assert anchor in headings, anchor


def test_readme_test_command_is_what_ci_runs():
    readme = [line for line in _read("README.md").splitlines()
              if line.startswith("python3 -m venv") and "[test" in line]
    assert len(readme) == 1, "the README has one command that sets up and runs the tests"
    pytest_call = readme[0].rsplit("&& ", 1)[1]
    ci = [line for line in _read(".ci/run").splitlines() if "pytest" in line]
    assert ci == [pytest_call]


def test_project_urls_use_the_same_repository():
    urls = re.findall(r'^\w+ = "(https://[^"]+)"', _read("pyproject.toml"), re.M)
    assert urls and all(u.startswith(REPOSITORY) for u in urls)


def test_lower_bounds_are_the_versions_ci_tests():
    matrix = os.path.join(ROOT, ".ci", "matrix")
    if not os.path.exists(matrix):
        pytest.skip("no .ci/matrix (an unpacked sdist)")
    pins = dict(re.findall(r"\b(numpy|numba|tbb)==([\d.]+)", re.search(
        r"LOWER_PINS=\(([^)]*)\)", _read(".ci", "matrix")).group(1)))
    pyproject = _read("pyproject.toml")

    def release(v):  # "2021.6" and "2021.6.0" are the same release
        parts = [int(p) for p in v.split(".")]
        while parts and parts[-1] == 0:
            parts.pop()
        return parts

    for name, version in pins.items():
        declared = re.search(rf'"{name}>=([\d.]+)', pyproject).group(1)
        assert release(declared) == release(version), (name, declared, version)
    assert set(pins) == {"numpy", "numba", "tbb"}
