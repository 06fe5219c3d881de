"""The documentation site builds with warnings as errors (when MkDocs is installed: CI installs it),
and every built page reads as rendered Markdown: no reST left from docstrings, no unresolved
cross-reference, and the API page's formulas go through arithmatex to the bundled KaTeX (each
formula parsed by that KaTeX when Node.js is there)."""
import ast
import glob
import html
import json
import os
import re
import shutil
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DOCS = os.path.join(ROOT, "docs")
PAGES = sorted(f[:-3] for f in os.listdir(DOCS) if f.endswith(".md"))
KATEX = os.path.join(DOCS, "assets", "katex")

# reST that the Markdown pipeline would print verbatim
REST = (":math:`", ".. math::", ":func:`", ":class:`", ":meth:`", ":attr:`", ":data:`", ":mod:`",
        ":obj:`", ":exc:`", "``")
# an autoref mkdocs-autorefs could not resolve stays as `[title][identifier]` or an <autoref> tag
UNRESOLVED = re.compile(r"<autoref\b|\]\[[A-Za-z_][\w.]*\]")
ARITHMATEX = re.compile(r'<(span|div) class="arithmatex">(.*?)</\1>', re.S)


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    pytest.importorskip("mkdocs", reason="mkdocs not installed (pip install -e '.[docs]')")
    pytest.importorskip("mkdocstrings", reason="mkdocstrings not installed")
    out = tmp_path_factory.mktemp("docs") / "site"
    r = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(out)],
                       cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-4000:]
    yield out
    shutil.rmtree(out, ignore_errors=True)


def _html(site, page):
    path = site / ("index.html" if page == "index" else f"{page}/index.html")
    assert path.exists(), page
    return path.read_text()


def _prose(text):
    """The page without code blocks, scripts and formulas: what should be plain rendered text."""
    for pat in (r"<pre\b.*?</pre>", r"<script\b.*?</script>", ARITHMATEX.pattern):
        text = re.sub(pat, " ", text, flags=re.S)
    return text


def test_every_page_is_built(site):
    assert {"index", "api", "semantics", "lm-head", "evaluating"} <= set(PAGES)
    for page in PAGES:  # every Markdown page is built (the home page at the site's root)
        assert len(_html(site, page)) > 2000, page
    assert "cross_entropy_with_grad" in _html(site, "api")


@pytest.mark.parametrize("page", PAGES)
def test_no_raw_rest_or_unresolved_reference(site, page):
    text = _html(site, page)
    prose = _prose(text)
    assert [m for m in REST if m in text] == [], page
    assert UNRESOLVED.findall(prose) == [], page
    # a backtick outside code blocks is Markdown that did not render (e.g. in a docstring's type)
    assert "`" not in re.sub(r"<[^>]+>", "", prose), page
    # one title per page: a wrapped line that starts with '#' (an issue number) becomes a heading
    assert len(re.findall(r"<h1\b", text)) == 1, page


@pytest.mark.parametrize("page", PAGES)
def test_numbered_lists_are_not_cut(site, page):
    # Python-Markdown numbers every <ol> from 1: an item whose list was cut before it (by a table or
    # a paragraph indented less than four spaces inside the item before) would show as "1." again
    with open(os.path.join(DOCS, page + ".md")) as f:
        source = re.sub(r"```.*?```", " ", f.read(), flags=re.S)
    lists = len(re.findall(r"^\s*1\. ", source, flags=re.M))
    assert len(re.findall(r"<ol>", re.sub(r"<pre\b.*?</pre>", " ", _html(site, page), flags=re.S))) \
        == lists, page


@pytest.mark.parametrize("page", PAGES)
def test_every_list_item_is_rendered_as_one(site, page):
    # a list right after a paragraph line, with no blank line between, stays part of the
    # paragraph in Python-Markdown: its "- " markers show as text
    with open(os.path.join(DOCS, page + ".md")) as f:
        source = re.sub(r"```.*?```", " ", f.read(), flags=re.S)
    if ":::" in source:  # pages that mkdocstrings fills from docstrings
        return
    items = len(re.findall(r"^\s*(?:[-*]|\d+\.) ", source, flags=re.M))
    article = re.search(r"<article\b.*?</article>", _html(site, page), flags=re.S).group(0)
    rendered = len(re.findall(r"<li\b", re.sub(r"<pre\b.*?</pre>", " ", article, flags=re.S)))
    assert rendered == items, page


def test_api_page_renders_math_and_links(site):
    text = _html(site, "api")
    formulas = ARITHMATEX.findall(text)
    assert len(formulas) >= 20 and any(tag == "div" for tag, _ in formulas)  # inline and display
    for script in ("assets/katex/katex.min.js", "assets/math.js"):
        assert f'src="../{script}"' in text, script
    assert 'href="../assets/katex/katex.min.css"' in text
    assert "$" not in re.sub(r"<code>.*?</code>", "", _prose(text)), "math arithmatex did not take"
    # cross-references resolved to the objects' anchors on this page
    for ref in ("numbaxent.cross_entropy", "numbaxent.Stats", "numbaxent.evaluate.Evaluator.update"):
        assert f'href="#{ref}"' in text, ref
    # every font the bundled stylesheet asks for first (woff2) is in the built site
    css = (site / "assets" / "katex" / "katex.min.css").read_text()
    fonts = set(re.findall(r"url\((fonts/[\w-]+\.woff2)\)", css))
    assert fonts and all((site / "assets" / "katex" / f).exists() for f in fonts)


def test_katex_parses_every_formula(site):
    """Each formula of every page through the bundled KaTeX with errors raised (a formula KaTeX
    cannot parse would show as red source text in the browser)."""
    node = shutil.which("node")
    if node is None:
        pytest.skip("Node.js not installed")
    formulas = []
    for page in PAGES:
        for tag, body in ARITHMATEX.findall(_html(site, page)):
            tex = html.unescape(body).strip()
            tex = re.sub(r"^\\[\[(]|\\[\])]$", "", tex)
            formulas.append([page, tag == "div", tex])
    assert formulas
    script = ("const k = require(process.argv[1]); const bad = [];"
              "for (const [page, display, tex] of JSON.parse(require('fs').readFileSync(0)))"
              "  try { k.renderToString(tex, {displayMode: display, throwOnError: true}); }"
              "  catch (e) { bad.push(page + ': ' + tex + ': ' + e.message); }"
              "console.log(JSON.stringify(bad));")
    r = subprocess.run([node, "-e", script, os.path.join(KATEX, "katex.min.js")],
                       input=json.dumps(formulas), capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout) == []


def test_docstrings_with_backslashes_are_raw():
    """LaTeX in a docstring needs a raw string: in a plain one `\\tanh` is a tab and `\\ne` a
    newline, which KaTeX still renders, wrongly (seen in the browser)."""
    bad = []
    for path in sorted(glob.glob(os.path.join(ROOT, "numbaxent", "*.py"))):
        src = open(path, encoding="utf-8").read()
        for node in ast.walk(ast.parse(src)):
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                first = node.body[0] if node.body else None
                if (isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant)
                        and isinstance(first.value.value, str)):
                    literal = ast.get_source_segment(src, first.value)
                    if "\\" in literal and literal[0] not in "rR":
                        bad.append(f"{os.path.basename(path)}:{first.lineno}")
    assert bad == []
