"""The layout's rules, checked on the source: which package may import which, no import
cycle, no test hooks in production code, no sys.path edits outside the entry scripts.

docs/architecture.md states these rules; this module is what keeps them true.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from tests.support import REPO_ROOT

PACKAGES = ("app", "serving", "training")
# Scripts users run by path where the project may not be installed (`ray job submit -- python
# training/run.py` ships the working tree to the cluster): the only places that may put the repo
# root on sys.path. Evaluation runs where the project is installed (`codecomplete-eval`).
ENTRY_SCRIPTS = {"training/run.py", "serving/run.py"}


def _modules() -> dict[str, Path]:
    out = {}
    for pkg in PACKAGES:
        for f in sorted((REPO_ROOT / pkg).rglob("*.py")):
            rel = f.relative_to(REPO_ROOT).with_suffix("")
            parts = rel.parts[:-1] if rel.name == "__init__" else rel.parts
            out[".".join(parts)] = f
    return out


MODULES = _modules()


def _imports(path: Path) -> set[str]:
    """Every project module this file imports, at module level or inside functions."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
            names.update(f"{node.module}.{a.name}" for a in node.names)  # `from pkg import module`
    found = set()
    for name in names:
        while name and name not in MODULES:
            name = name.rpartition(".")[0]
        if name:
            found.add(name)
    return found


def _third_party(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    roots = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            roots.update(a.name.split(".")[0] for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            roots.add(node.module.split(".")[0])
    return roots


GRAPH = {m: _imports(f) - {m} for m, f in MODULES.items()}


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in graph.get(v, ()):
            # A package's __init__ is imported with its submodules; an edge to one's own
            # parent package is not a cycle of code.
            if v.startswith(w + "."):
                continue
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_the_checker_finds_a_cycle_and_a_forbidden_import():
    # The checks below could fail: a two-module cycle and a three-module one are found.
    assert _cycles({"a": {"b"}, "b": {"a"}, "c": set()}) == [["a", "b"]]
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == [["a", "b", "c"]]
    assert "training.config.cli" in _imports(MODULES["training.run"])  # function-level imports count too


def test_no_import_cycle_among_the_projects_modules():
    assert _cycles(GRAPH) == []


@pytest.mark.parametrize("module", sorted(m for m in MODULES if m.startswith("serving.engine")))
def test_the_engine_imports_neither_ray_nor_the_app(module):
    assert "ray" not in _third_party(MODULES[module])
    assert not any(d.startswith("app") or d.startswith("serving.deployment") for d in GRAPH[module]), GRAPH[module]


@pytest.mark.parametrize("module", sorted(m for m in MODULES if m.startswith("app")))
def test_the_app_imports_only_the_engines_request_types(module):
    outside = {d for d in GRAPH[module] if not d.startswith("app")}
    assert outside <= {"serving.engine.params"}, outside


@pytest.mark.parametrize("module", sorted(MODULES))
def test_no_test_hooks_in_production_code(module):
    text = MODULES[module].read_text(encoding="utf-8")
    for marker in ("CODECOMPLETE_TEST", "TEST_FAULT", "test-only", "Test-only", "CODECOMPLETE_FAIL_AT_STEP"):
        assert marker not in text, f"{module} holds {marker!r}"


@pytest.mark.parametrize("module", sorted(MODULES))
def test_only_entry_scripts_edit_sys_path(module):
    rel = str(MODULES[module].relative_to(REPO_ROOT))
    if rel in ENTRY_SCRIPTS:
        return
    assert "sys.path" not in MODULES[module].read_text(encoding="utf-8"), rel


def test_test_files_have_unique_names():
    """pytest imports test modules by their base name (tests/ folders have no __init__.py), so
    two test files of one name in different folders stop the whole suite at collection."""
    from collections import Counter

    names = Counter(f.name for f in (REPO_ROOT / "tests").rglob("test_*.py"))
    assert not [n for n, k in names.items() if k > 1], sorted(n for n, k in names.items() if k > 1)
