"""The code's layers, read from every import statement (function-level ones included) by import-linter: the
contracts in pyproject.toml's [tool.importlinter] (docs/architecture.md#import-contracts), and no import cycle
between modules. The process-level check that the front-ends never load torch is tests/test_lean_frontends.py."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import grimp

from tests.conftest import REPO

PACKAGES = ("models", "service")


def test_import_contracts_hold() -> None:
    """`lint-imports` from this venv; a broken contract fails with import-linter's report (the import chain)."""
    lint_imports = Path(sys.executable).parent / "lint-imports"
    proc = subprocess.run(
        [str(lint_imports), "--no-cache", "--no-logo"], cwd=REPO, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, f"lint-imports failed:\n{proc.stdout}{proc.stderr}"
    assert " kept, 0 broken" in proc.stdout, proc.stdout


def graph() -> dict[str, set[str]]:
    """Module -> modules it imports, anywhere in the file: function bodies and `if TYPE_CHECKING:` included (an
    import deferred into a function to dodge a cycle is still a cycle)."""
    g = grimp.build_graph(*PACKAGES, cache_dir=None)
    modules = {m for m in g.modules if "stubs" not in m.split(".")}
    edges: dict[str, set[str]] = {}
    for name in modules:
        targets = {t for t in g.find_modules_directly_imported_by(name) if t in modules}
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

    for v in sorted(edges):
        if v not in index:
            connect(v)
    return found


def test_no_import_cycle_between_modules() -> None:
    edges = graph()
    assert len(edges) > 50, "the module graph was not read"
    assert "models.runtime.simulated_runtime" in edges["models.loading"], "precondition: function-level imports"
    assert not cycles(edges)


def test_a_deferred_import_cycle_is_found() -> None:
    """The check itself: two modules importing each other, one of them inside a function, form a cycle."""
    edges = {"a": {"b"}, "b": {"a"}, "c": {"a"}}
    assert cycles(edges) == [["a", "b"]]
