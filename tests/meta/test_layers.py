"""The dependency direction between layers is a rule: check every import."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[2] / "src" / "tvix"

# What each layer may import of ours (besides itself).
ALLOWED = {
    "nixcompat": set(),
    "castore": {"_proto"},
    "store": {"_proto", "castore", "nixcompat"},
    "server": {"_proto", "castore", "nixcompat", "store"},
    "nar_bridge": {"_proto", "castore", "nixcompat", "store"},
    "fs": {"_proto", "castore", "nixcompat", "store"},
    "nix_daemon": {"_proto", "castore", "nixcompat", "store"},
    "cli": {"_proto", "castore", "nixcompat", "store", "server", "nar_bridge", "fs", "nix_daemon"},
}


def _imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), str(path))
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module]
        else:
            continue
        for name in names:
            parts = name.split(".")
            if parts[0] == "tvix" and len(parts) > 1:
                found.add(parts[1])
    return found


@pytest.mark.parametrize("layer", sorted(name for name in ALLOWED if (SRC / name).is_dir()))
def test_layer_imports(layer: str) -> None:
    base = SRC / layer
    for path in sorted(base.rglob("*.py")):
        bad = _imports(path) - ALLOWED[layer] - {layer}
        assert not bad, f"{path.relative_to(SRC)} imports {sorted(bad)}"


def test_every_layer_is_listed() -> None:
    layers = {p.name for p in SRC.iterdir() if p.is_dir() and not p.name.startswith("__")}
    assert layers - {"_proto"} <= set(ALLOWED), layers - set(ALLOWED)
