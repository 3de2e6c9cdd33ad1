"""The shape of ``marketplace/``: one direction, no import cycles, no hidden imports.

The import graph is read from the source (``ast``), counting every import, also those inside
functions: an in-function import that breaks a cycle still is one. Layers: ``api`` and ``cli`` on
top, then ``services`` (and the compute site, the SDK and the agent beside it), then ``db``; the
services never import the API, the CLI or the Celery worker.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PKG = ROOT / "marketplace"

#: package -> packages it must never import
FORBIDDEN = {
    "marketplace.services": ("marketplace.api", "marketplace.cli", "marketplace.worker", "marketplace.web"),
    "marketplace.db": ("marketplace.api", "marketplace.cli", "marketplace.services", "marketplace.worker"),
    "marketplace.sdk": ("marketplace.api", "marketplace.services", "marketplace.db", "marketplace.worker"),
}
#: an import inside a function is allowed only with a comment on it or the line above saying why
REASONS = ("start-up", "optional", "cost", "lazy", "heavy", "only ", "cycle-free", "why")
#: ...or, for a module whose every command imports lazily (the CLI: `som --help` must not load the
#: service stack), one module-level comment starting with this and giving the reason
MODULE_REASON = "# lazy imports: "


def _module_name(path: Path) -> str:
    rel = path.relative_to(ROOT).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for p in PKG.rglob("*.py") if "migrations" not in p.parts}


def _imports(path: Path, name: str) -> Iterator[tuple[str, int, bool]]:
    """(imported module, line, inside a function?) for every marketplace import of ``path``."""
    tree = ast.parse(path.read_text(), filename=str(path))
    parents: dict[ast.AST, ast.AST] = {}
    for node in ast.walk(tree):
        for child in ast.iter_child_nodes(node):
            parents[child] = node

    def in_function(node: ast.AST) -> bool:
        while node in parents:
            node = parents[node]
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                return True
        return False

    def type_checking(node: ast.AST) -> bool:
        while node in parents:
            node = parents[node]
            if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
                return True
        return False

    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    for node in ast.walk(tree):
        if type_checking(node):
            continue
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(
                    package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else [])
                )
            targets = [base] + [f"{base}.{a.name}" for a in node.names]
        else:
            continue
        for t in targets:
            if t.startswith("marketplace"):
                yield t, node.lineno, in_function(node)


def _graph() -> dict[str, set[str]]:
    mods = _modules()
    graph: dict[str, set[str]] = {m: set() for m in mods}
    for name, path in mods.items():
        for target, _line, _fn in _imports(path, name):
            if target in mods and target != name:
                graph[name].add(target)
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []
    counter = [0]

    def visit(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in sorted(graph[v]):
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


def _is_package_edge(a: str, b: str) -> bool:
    # ``import marketplace.x.y`` also imports the package ``marketplace.x``; a package's
    # ``__init__`` importing its own submodules is not a cycle of the design.
    return b == a.rsplit(".", 1)[0] or a == b.rsplit(".", 1)[0]


def test_no_import_cycles() -> None:
    graph = {a: {b for b in bs if not _is_package_edge(a, b)} for a, bs in _graph().items()}
    cycles = _cycles(graph)
    assert cycles == [], "import cycles in marketplace/:\n" + "\n".join(" <-> ".join(c) for c in cycles)


def test_one_direction() -> None:
    bad = []
    for name, path in _modules().items():
        for layer, forbidden in FORBIDDEN.items():
            if name == layer or name.startswith(layer + "."):
                for target, line, _fn in _imports(path, name):
                    if target.startswith(forbidden):
                        bad.append(f"{path.relative_to(ROOT)}:{line} imports {target}")
    assert bad == [], "layering broken:\n" + "\n".join(bad)


def test_in_function_imports_say_why() -> None:
    bad = []
    for path in _modules().values():
        lines = path.read_text().splitlines()
        if any(line.startswith(MODULE_REASON) and "start-up" in line for line in lines):
            continue
        tree = ast.parse("\n".join(lines))
        for node in ast.walk(tree):
            if not isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                continue
            for sub in ast.walk(node):
                if isinstance(sub, ast.Import | ast.ImportFrom) and sub.lineno - 1 < len(lines):
                    here = lines[sub.lineno - 1].lower()
                    above = "\n".join(lines[max(0, sub.lineno - 4) : sub.lineno - 1]).lower()  # a comment just above
                    if not ("#" in here + above and any(r in here + above for r in REASONS)):
                        bad.append(f"{path.relative_to(ROOT)}:{sub.lineno}: {lines[sub.lineno - 1].strip()}")
    assert bad == [], f"{len(bad)} in-function imports without a reason:\n" + "\n".join(sorted(set(bad)))


def test_modules_stay_small() -> None:
    big = {str(p.relative_to(ROOT)): n for p in _modules().values() if (n := len(p.read_text().splitlines())) > 420}
    assert big == {}, f"modules over ~400 lines: {big}"
