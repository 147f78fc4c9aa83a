"""The engine package's import graph has no cycles, and the core does not know the fal protocol.

Built from the source with `ast` (no module is imported): every `import`/`from ... import` anywhere in a module, at top
level or inside a function, relative ones resolved; imports under `if TYPE_CHECKING:` are annotations only and are left
out. A `from package import name` counts as an import of `package.name` when that is a module, and importing
`package.module` from outside `package` also runs `package/__init__.py` (an edge to the package too)."""

from __future__ import annotations

import ast
from pathlib import Path

import engine

ROOT = Path(engine.__file__).resolve().parent
PROTOCOL = ("engine.service", "engine.endpoints", "engine.server")


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for p in ROOT.rglob("*.py")}


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _imports(tree: ast.AST) -> list[ast.Import | ast.ImportFrom]:
    found: list[ast.Import | ast.ImportFrom] = []

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and _is_type_checking(node.test):
            for child in node.orelse:  # only the `else:` branch runs
                visit(child)
            return
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            found.append(node)
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(tree)
    return found


def _owner(name: str, modules: dict[str, Path]) -> str | None:
    """The engine module `name` is, or the closest package/module above it."""
    while name:
        if name in modules:
            return name
        name = name.rpartition(".")[0]
    return None


def build_graph() -> dict[str, set[str]]:
    modules = _modules()
    graph: dict[str, set[str]] = {name: set() for name in modules}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        for node in _imports(ast.parse(path.read_text(encoding="utf-8"), str(path))):
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            else:
                if node.level:
                    base = package.split(".")
                    base = base[: len(base) - (node.level - 1)]
                    stem = ".".join(base + ([node.module] if node.module else []))
                else:
                    stem = node.module or ""
                targets = [f"{stem}.{alias.name}" if f"{stem}.{alias.name}" in modules else stem
                           for alias in node.names]
            for target in targets:
                owner = _owner(target, modules) if target.split(".")[0] == "engine" else None
                while owner is not None and owner != name and not name.startswith(owner + "."):
                    graph[name].add(owner)  # the module, then each package above it that `name` is not inside
                    owner = owner.rpartition(".")[0]
    return graph


def find_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    cycles: list[list[str]] = []
    counter = [0]

    def strongconnect(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                strongconnect(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            strongconnect(v)
    return cycles


def _reachable(graph: dict[str, set[str]], start: str) -> set[str]:
    seen: set[str] = set()
    todo = [start]
    while todo:
        for nxt in graph.get(todo.pop(), ()):
            if nxt not in seen:
                seen.add(nxt)
                todo.append(nxt)
    return seen


def _describe(graph: dict[str, set[str]], cycle: list[str]) -> str:
    members = set(cycle)
    return "; ".join(f"{m} -> {sorted(graph[m] & members)}" for m in cycle)


def test_the_graph_is_built_from_real_imports():
    graph = build_graph()
    assert "engine.compiler" in graph["engine.api"]  # `from .compiler import ...`
    assert "engine.runtime.queue" in graph["engine.service"]  # `from .runtime.queue import ...`
    assert "engine.loading.aurasr" in graph["engine.api"]  # a function-level import
    assert "engine.loading" in graph["engine.api"]  # ... which runs the package's __init__ first
    assert "engine.compiler" not in graph["engine.compiler.config"]  # a package's own modules: normal import order
    assert find_cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_no_import_cycles_in_the_engine_package():
    graph = build_graph()
    cycles = find_cycles(graph)
    assert not cycles, "import cycles: " + " | ".join(_describe(graph, c) for c in cycles)


def test_the_core_does_not_know_the_fal_protocol():
    graph = build_graph()
    direct = {t for t in graph["engine.api"] if t.startswith(PROTOCOL)}
    assert not direct, f"engine.api imports {sorted(direct)}"
    indirect = {t for t in _reachable(graph, "engine.api") if t.startswith(PROTOCOL)}
    assert not indirect, f"engine.api reaches {sorted(indirect)}"
    assert not {t for t in graph["engine.registry"] if t.startswith(("engine.loading", "engine.runtime"))}, \
        "the registry is data: it loads nothing"
