"""The package's layout as docs/internals.md states it: no import cycles between numbaxent's modules,
the core imports no integration, and every module is on the internals page."""
from __future__ import annotations

import ast
import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PKG = os.path.join(ROOT, "numbaxent")
CORE = {"_prepare", "_api", "_kernels", "_rows", "_columns", "_targets", "_metrics", "_math", "_jit",
        "_linkonly", "_parallel", "_threading", "_cache"}
INTEGRATIONS = {"torch", "dask", "eval_cli", "io", "bench", "bench_linear", "demo", "cache_cli",
                "_warmup", "__main__"}


def modules() -> list[str]:
    return sorted(f[:-3] for f in os.listdir(PKG) if f.endswith(".py"))


def imports(name: str) -> set[str]:
    """numbaxent modules that ``name`` imports anywhere in its source (function-level too)."""
    tree = ast.parse(open(os.path.join(PKG, name + ".py")).read())
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            mod = node.module or ""
            if node.level == 1:  # from . import x / from .x import y
                if mod:
                    found.add(mod.split(".")[0])
                else:
                    found.update(a.name for a in node.names)
            elif mod == "numbaxent" or mod.startswith("numbaxent."):
                rest = mod.split(".")[1:]
                found.update([rest[0]] if rest else [a.name for a in node.names])
        elif isinstance(node, ast.Import):
            for a in node.names:
                if a.name.startswith("numbaxent."):
                    found.add(a.name.split(".")[1])
    return found & set(modules())


def import_cycles(graph: dict) -> list[str]:
    """Each cycle a depth-first walk of `graph` (module -> imported modules) runs into."""
    state, cycles = {}, []

    def visit(m, path):
        state[m] = "open"
        for n in sorted(graph[m]):
            if state.get(n) == "open":
                cycles.append(" -> ".join(path[path.index(n):] + [n]))
            elif n not in state:
                visit(n, path + [n])
        state[m] = "done"

    for m in sorted(graph):
        if m not in state:
            visit(m, [m])
    return cycles


def test_the_cycle_finder_finds_cycles():
    assert import_cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == ["a -> b -> c -> a"]
    assert import_cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_cycles():
    graph = {m: imports(m) - {m} for m in modules()}
    assert "_api" in graph and "_prepare" in graph["_api"]  # the graph sees relative imports
    assert import_cycles(graph) == []


def test_the_core_imports_no_integration():
    for m in CORE:
        assert not imports(m) & INTEGRATIONS, (m, imports(m) & INTEGRATIONS)


def test_every_module_is_on_the_internals_page():
    page = open(os.path.join(ROOT, "docs", "internals.md")).read()
    missing = [m for m in modules() if f"`{m}.py`" not in page and f"`numbaxent/{m}.py`" not in page]
    assert not missing, missing
