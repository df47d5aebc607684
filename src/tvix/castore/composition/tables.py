"""Composition tables: checked when loaded (keys, types, references, cycles).

See :mod:`tvix.castore.composition`.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tvix.castore.composition.config import (
    TOML_NAMES,
    CompositionError,
    Registry,
    ServiceConfig,
    Setting,
)

__all__ = ["Entry", "check_graph", "parse_entry", "toml_type", "url_type_prefix"]


@dataclass(frozen=True)
class Entry:
    """One checked ``[kind.name]`` table."""

    kind: str
    name: str
    type_name: str
    config_class: type[ServiceConfig] | None  # None: type "url"
    settings: dict[str, Any]
    spec: Mapping[str, Setting]

    @property
    def label(self) -> str:
        """``kind.name``, as messages name the table."""
        return f"{self.kind}.{self.name}"

    def refs(self) -> list[tuple[str, str]]:
        """The names this service refers to, each with its setting's key."""
        out: list[tuple[str, str]] = []
        for key, spec in self.spec.items():
            value = self.settings.get(key)
            if value is None:
                continue
            if spec.kind == "ref":
                out.append((key, value))
            elif spec.kind == "refs":
                out.extend((key, v) for v in value)
        return out


URL_SPEC = {"url": Setting("str")}


def toml_type(value: object) -> str:
    """How TOML calls the type of ``value`` (for messages)."""
    names = {bool: "boolean", int: "integer", float: "float", str: "string", list: "array"}
    return names.get(type(value), "table" if isinstance(value, dict) else type(value).__name__)


def check_value(label: str, key: str, spec: Setting, value: object, base_dir: Path) -> object:
    kind = spec.kind
    ok: bool
    if kind in ("str", "path", "ref"):
        ok = isinstance(value, str)
    elif kind == "int":
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif kind == "bool":
        ok = isinstance(value, bool)
    else:
        ok = isinstance(value, list) and all(isinstance(v, str) for v in value)
    if not ok:
        raise CompositionError(
            f"{label}: key {key!r} must be {TOML_NAMES[kind]}, not {toml_type(value)}"
        )
    if kind == "path":
        assert isinstance(value, str)
        if not value:
            raise CompositionError(f"{label}: key {key!r} must not be empty")
        return str(base_dir / os.path.expanduser(value))
    return value


def parse_entry(registry: Registry, name: str, table: object, base_dir: Path) -> Entry:
    """Check the table ``[kind.name]`` against its type's settings; paths made absolute."""
    label = f"{registry.kind}.{name}"
    if not isinstance(table, dict):
        raise CompositionError(f"{label}: must be a table, not {toml_type(table)}")
    type_name = table.get("type")
    if type_name is None:
        raise CompositionError(f"{label}: missing key 'type'")
    if not isinstance(type_name, str):
        raise CompositionError(f"{label}: key 'type' must be a string, not {toml_type(type_name)}")
    config_class: type[ServiceConfig] | None = None
    if type_name == "url":
        spec: Mapping[str, Setting] = URL_SPEC
    else:
        config_class = registry.config_class(type_name)
        if config_class is None:
            known = ", ".join(sorted([*registry.types, "url"]))
            raise CompositionError(f"{label}: unknown type {type_name!r} (known: {known})")
        spec = config_class.settings()
    for key in table:
        if key != "type" and key not in spec:
            allowed = ", ".join(sorted(spec)) or "none"
            raise CompositionError(
                f"{label}: unknown key {key!r} for type {type_name!r} (allowed: {allowed})"
            )
    settings: dict[str, Any] = {}
    for key, setting_spec in spec.items():
        if key not in table:
            if setting_spec.required:
                raise CompositionError(f"{label}: missing key {key!r} for type {type_name!r}")
            continue
        settings[key] = check_value(label, key, setting_spec, table[key], base_dir)
    return Entry(registry.kind, name, type_name, config_class, settings, spec)


def check_graph(entries: Mapping[str, Mapping[str, Entry]]) -> None:
    """Reject references to undefined names, and cycles."""
    for kind, by_name in entries.items():
        for entry in by_name.values():
            for key, ref in entry.refs():
                if ref not in by_name:
                    known = ", ".join(sorted(by_name))
                    raise CompositionError(
                        f"{entry.label}: {key} refers to {ref!r}, which is not defined in "
                        f"[{kind}] (defined: {known})"
                    )
        check_acyclic(kind, by_name)


def check_acyclic(kind: str, by_name: Mapping[str, Entry]) -> None:
    """Reject a cycle among the services of one kind, naming it (names sorted, so stable)."""
    done: set[str] = set()
    path: list[str] = []

    def visit(name: str) -> None:
        if name in done:
            return
        if name in path:
            loop = [*path[path.index(name) :], name]
            raise CompositionError("cycle: " + " -> ".join(f"{kind}.{n}" for n in loop))
        path.append(name)
        for _, ref in by_name[name].refs():
            visit(ref)
        path.pop()
        done.add(name)

    for name in sorted(by_name):
        visit(name)


def url_type_prefix(schemes: tuple[str, ...]) -> str:
    """What the URLs of a type start with (``objectstore+``), for messages."""
    if len(schemes) == 1:
        return f"{schemes[0]}://"
    prefix = schemes[0]
    while not all(s.startswith(prefix) for s in schemes):
        prefix = prefix[:-1]
    return prefix
