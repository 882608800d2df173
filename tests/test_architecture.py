"""The package's shape: modules depend on each other in one direction (imports inside functions counted), in the
layer order ARCHITECTURE.md draws, packages too, and every file stays short enough to read top to bottom."""
from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "src" / "loraplex"
ARCHITECTURE = ROOT / "ARCHITECTURE.md"
MAX_LINES = 450
ABOVE_ALL = {"loraplex", "loraplex.__main__"}  # the public API and `python -m loraplex` sit above every layer


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


def package_of(module: str) -> str:
    """loraplex.training.runner -> loraplex.training; a top-level module is its own package."""
    return ".".join(module.split(".")[:2])


def package_graph(graph: dict[str, set[str]]) -> dict[str, set[str]]:
    """Edges between loraplex's top-level packages and modules (the root `loraplex` left out: it imports all)."""
    packages: dict[str, set[str]] = {}
    for module, imports in graph.items():
        if module in ABOVE_ALL:
            continue
        source = package_of(module)
        packages.setdefault(source, set()).update(package_of(m) for m in imports if m not in ABOVE_ALL)
        packages[source].discard(source)
    for targets in list(packages.values()):
        for target in targets:
            packages.setdefault(target, set())
    return packages


def documented_layers(text: str) -> dict[str, int]:
    """ARCHITECTURE.md's layer table -> {"loraplex.errors": 0, "loraplex.data": 2, ...} (`data/` names a package)."""
    layers: dict[str, int] = {}
    for layer, modules in re.findall(r"^\| (\d+) \| ([^|]+) \|", text, flags=re.MULTILINE):
        for name in re.findall(r"`([\w.]+)/?`", modules):
            layers[f"loraplex.{name}"] = int(layer)
    return layers


def layer_of(module: str, layers: dict[str, int]) -> int | None:
    """A module's layer: its own entry, else its package's."""
    return layers.get(module, layers.get(package_of(module)))


def layer_breaks(graph: dict[str, set[str]], layers: dict[str, int]) -> list[str]:
    """Every import of a module from a higher layer, and every module the table does not place."""
    found = []
    for module in sorted(graph):
        if module in ABOVE_ALL:
            continue
        own = layer_of(module, layers)
        if own is None:
            found.append(f"{module} has no layer in ARCHITECTURE.md")
            continue
        for imported in sorted(graph[module] - ABOVE_ALL):
            theirs = layer_of(imported, layers)
            if theirs is not None and theirs > own:
                found.append(f"{module} (layer {own}) imports {imported} (layer {theirs})")
    return found


def test_the_layer_check_sees_an_upward_import():
    """The checker itself, on a planted graph: an import from a higher layer and an unplaced module are named."""
    layers = documented_layers("| 0 | `errors` | x |\n| 1 | `recipe`, `data/` | y |\n")
    assert layers == {"loraplex.errors": 0, "loraplex.recipe": 1, "loraplex.data": 1}
    graph = {"loraplex.errors": {"loraplex.data.prepare"}, "loraplex.data.prepare": {"loraplex.errors"},
             "loraplex.recipe": set(), "loraplex.stray": set()}
    assert layer_breaks(graph, layers) == ["loraplex.errors (layer 0) imports loraplex.data.prepare (layer 1)",
                                           "loraplex.stray has no layer in ARCHITECTURE.md"]


def test_the_package_graph_sees_a_cycle_between_packages():
    """The checker itself: a.x -> b.y and b.z -> a.w is no module cycle, but a package cycle."""
    graph = {"loraplex.a.x": {"loraplex.b.y"}, "loraplex.b.y": set(), "loraplex.b.z": {"loraplex.a.w"},
             "loraplex.a.w": set(), "loraplex": {"loraplex.a.x"}}
    assert find_cycle(graph) is None
    assert find_cycle(package_graph(graph)) in (["loraplex.a", "loraplex.b", "loraplex.a"],
                                                ["loraplex.b", "loraplex.a", "loraplex.b"])


def test_imports_follow_the_documented_layers():
    layers = documented_layers(ARCHITECTURE.read_text(encoding="utf-8"))
    assert layers["loraplex.lm"] < layers["loraplex.selection"] < layers["loraplex.training"]
    assert not layer_breaks(import_graph(), layers), "\n".join(layer_breaks(import_graph(), layers))


def test_no_package_cycle():
    packages = package_graph(import_graph())
    assert "loraplex.training" in packages["loraplex.cli"]
    assert find_cycle(packages) is None, " -> ".join(find_cycle(packages))


def demo_importers(graph: dict[str, set[str]]) -> set[str]:
    """Modules outside the demo package that import it."""
    return {module for module, imports in graph.items()
            if package_of(module) != "loraplex.demo" and any(package_of(m) == "loraplex.demo" for m in imports)}


def test_only_the_cli_imports_the_demo():
    """The demo sits at the edge: the library never knows it (its data, checkers and constants included)."""
    assert demo_importers({"loraplex.evaluation": {"loraplex.demo.data"}, "loraplex.demo.data": set()}) == \
        {"loraplex.evaluation"}
    assert demo_importers(import_graph()) == {"loraplex.cli"}


MAX_FUNCTION_LINES = 60


def long_functions(root: Path) -> dict[str, int]:
    """'file:function' -> lines (decorators included) of every function or method over MAX_FUNCTION_LINES."""
    found = {}
    for path in sorted(root.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                first = min([node.lineno] + [d.lineno for d in node.decorator_list])
                if (lines := node.end_lineno - first + 1) > MAX_FUNCTION_LINES:
                    found[f"{path.relative_to(root)}:{node.name}"] = lines
    return found


def test_the_length_check_counts_a_nested_function(tmp_path):
    body = "".join(f"        x{i} = {i}\n" for i in range(MAX_FUNCTION_LINES))
    (tmp_path / "m.py").write_text(f"def outer():\n    def inner():\n{body}    return inner\n")
    assert long_functions(tmp_path) == {"m.py:outer": MAX_FUNCTION_LINES + 3, "m.py:inner": MAX_FUNCTION_LINES + 1}


def test_no_long_function():
    assert not long_functions(PACKAGE), long_functions(PACKAGE)
