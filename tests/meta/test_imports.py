"""The module graph of ``src/tvix``: no import cycles, no private names across modules.

Every ``import`` statement counts, wherever it is (module level, inside a
function, under ``TYPE_CHECKING``): a cycle hidden by a late import is still
a cycle in the design. Registries that name backends by import string are
not imports, which is what lets a package list backends that depend on it.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

SRC = Path(__file__).resolve().parents[2] / "src"


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(SRC).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _modules() -> dict[str, Path]:
    return {
        _module_name(p): p
        for p in sorted((SRC / "tvix").rglob("*.py"))
        if "_pb2" not in p.name  # generated protobuf code imports itself by its own rules
    }


def _import_nodes(path: Path) -> Iterator[tuple[str, list[str], int]]:
    """Each import as (module imported from, names, line), relative imports resolved."""
    module = _module_name(path)
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name, [], node.lineno
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")
                anchor = anchor[: len(anchor) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            yield base, [a.name for a in node.names], node.lineno


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    graph: dict[str, set[str]] = {m: set() for m in modules}
    for name, path in modules.items():
        for base, names, _ in _import_nodes(path):
            targets = [f"{base}.{n}" for n in names if f"{base}.{n}" in modules]
            if len(targets) < len(names) or not names:
                targets.append(base)
            graph[name].update(t for t in targets if t in modules and t != name)
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
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

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_no_import_cycles() -> None:
    assert _cycles(_graph()) == []


def test_cycle_finder_finds_cycles() -> None:
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert _cycles({"a": {"b"}, "b": set()}) == []


def test_no_private_names_across_modules() -> None:
    """``from x import _y`` only inside one module's own package of private helpers."""
    bad = []
    for path in _modules().values():
        for base, names, line in _import_nodes(path):
            if not base.startswith("tvix"):
                continue
            for name in names:
                if name.startswith("_") and not name.startswith("__"):
                    bad.append(f"{path.relative_to(SRC)}:{line}: {base}.{name}")
    assert bad == []


def test_generated_protobuf_code_is_quarantined() -> None:
    """Only each layer's ``proto.py`` and its gRPC glue import ``tvix._proto``."""
    bad = []
    for name, path in _modules().items():
        if name.startswith("tvix._proto"):
            continue
        for base, _, line in _import_nodes(path):
            if base.startswith("tvix._proto") and not _may_import_proto(name):
                bad.append(f"{path.relative_to(SRC)}:{line}")
    assert bad == []


def _may_import_proto(module: str) -> bool:
    parts = module.split(".")
    return parts[-1] in ("proto", "_wire") or "grpc" in parts or parts[-1].endswith("server")
