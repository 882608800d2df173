"""The package's shape: modules depend on each other in one direction (imports inside functions counted), and every
file stays short enough to read top to bottom."""
from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "loraplex"
MAX_LINES = 450


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported_modules(path: Path, modules: set[str]) -> set[str]:
    """loraplex modules `path` imports, anywhere in the file; `from pkg import name` counts pkg.name if a module."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            found.add(base)
            found |= {f"{base}.{alias.name}" for alias in node.names}
    return {m for m in found if m in modules and m != name}


def import_graph() -> dict[str, set[str]]:
    files = sorted(PACKAGE.rglob("*.py"))
    modules = {module_name(f) for f in files}
    graph = {module_name(f): imported_modules(f, modules) for f in files}
    # importing a submodule runs its package's __init__ first: a package depends on what its __init__ imports,
    # which is in the graph already; a module does not depend on its own package's __init__ (that would make
    # every package a cycle), so packages' edges stay as written
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}  # 1 = on the current path, 2 = done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_the_graph_sees_imports_inside_functions(tmp_path, monkeypatch):
    """The checker itself: a cycle hidden in a function body is found."""
    package = tmp_path / "loraplex"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "a.py").write_text("from .b import thing\n")
    (package / "b.py").write_text("def thing():\n    from . import a\n    return a\n")
    monkeypatch.setattr(__import__(__name__), "PACKAGE", package)
    assert find_cycle(import_graph()) in (["loraplex.a", "loraplex.b", "loraplex.a"],
                                          ["loraplex.b", "loraplex.a", "loraplex.b"])


def test_no_import_cycle():
    graph = import_graph()
    assert "loraplex.training.runner" in graph and graph["loraplex.training.runner"]
    assert find_cycle(graph) is None, " -> ".join(find_cycle(graph))


def test_no_long_file():
    long = {str(p.relative_to(PACKAGE)): n for p in PACKAGE.rglob("*.py")
            if (n := len(p.read_text(encoding="utf-8").splitlines())) > MAX_LINES}
    assert not long, long
