"""The code's layers, read from its import statements: front-end -> queue -> worker -> runtime -> predictor
math, with no cycle between modules, and the front-end packages never importing the model side at module
level (the process-level check is tests/test_lean_frontends.py)."""

from __future__ import annotations

import ast
from pathlib import Path

from tests.conftest import REPO

PACKAGES = ("models", "service")


def module_name(path: Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def top_level_imports(path: Path) -> set[str]:
    """Modules imported when `path` is imported: module-level statements only, not `if TYPE_CHECKING:`."""
    found: set[str] = set()
    tree = ast.parse(path.read_text())
    package = module_name(path) if path.name == "__init__.py" else module_name(path).rpartition(".")[0]

    def visit(statements: list[ast.stmt]) -> None:
        for node in statements:
            if isinstance(node, ast.Import):
                found.update(alias.name for alias in node.names)
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    parents = package.split(".")[: package.count(".") + 2 - node.level]
                    base = ".".join([*parents, base]).strip(".")
                found.add(base)
                found.update(f"{base}.{alias.name}" for alias in node.names)
            elif isinstance(node, ast.If) and "TYPE_CHECKING" not in ast.unparse(node.test):
                visit(node.body + node.orelse)
            elif isinstance(node, ast.Try):
                visit(node.body + node.orelse + node.finalbody + [s for h in node.handlers for s in h.body])

    visit(tree.body)
    return found


def graph() -> dict[str, set[str]]:
    files = [p for pkg in PACKAGES for p in (REPO / pkg).rglob("*.py") if "stubs" not in p.parts]
    modules = {module_name(p): p for p in files}
    edges: dict[str, set[str]] = {}
    for name, path in modules.items():
        targets = {t for t in top_level_imports(path) if t in modules and t != name}
        # importing a.b.c runs a/__init__ and a/b/__init__ first
        for t in list(targets):
            parts = t.split(".")
            targets.update(".".join(parts[:i]) for i in range(1, len(parts)) if ".".join(parts[:i]) in modules)
        # A module's own ancestor packages are already importing when it runs: not an edge.
        ancestors = {".".join(name.split(".")[:i]) for i in range(1, name.count(".") + 1)}
        edges[name] = targets - {name} - ancestors
    return edges


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def connect(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in edges.get(v, ()):
            if w not in index:
                connect(w)
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
                found.append(sorted(component))

    for v in edges:
        if v not in index:
            connect(v)
    return found


def test_no_import_cycle_between_modules() -> None:
    edges = graph()
    assert len(edges) > 50, "the module graph was not read"
    assert not cycles(edges)


def test_runtime_export_and_loading_form_layers() -> None:
    edges = graph()

    def imports(prefix: str, other: str) -> list[str]:
        return [f"{m} -> {t}" for m, ts in edges.items() if m.startswith(prefix) for t in ts if t.startswith(other)]

    assert not imports("models.export", "models.runtime"), "export formats must not import the runtimes"
    assert not imports("models.export", "models.loading")
    assert not imports("models.runtime", "models.loading")
    assert imports("models.runtime", "models.export"), "precondition: the runtimes read the export formats"


def test_front_end_modules_import_no_model_side_at_module_level() -> None:
    edges = graph()
    front = [m for m in edges if m.startswith(("service.api", "service.grpc", "service.queue", "service.request"))]
    worker_side = ("models.loading", "models.runtime", "models.predictors", "models.inference", "service.worker")
    seen: set[str] = set()
    todo = list(front)
    while todo:  # everything a front-end module pulls in, transitively
        m = todo.pop()
        for t in edges.get(m, ()):
            if t not in seen:
                seen.add(t)
                todo.append(t)
    assert not sorted(t for t in seen if t.startswith(worker_side))
