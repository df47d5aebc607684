"""Composition: the mechanism that builds services from URLs and from named, wired tables.

This module is mechanism only. It knows no backend: each service package
keeps a :class:`Registry` of its own backends (``tvix.castore.blobservice.registry``,
``tvix.castore.directoryservice.registry``, ``tvix.store.pathinfoservice.registry``),
naming each backend's :class:`ServiceConfig` by import string, so a package
can list backends that depend on it and heavy dependencies load on first use.

One registry per kind of service serves both ways of asking for a service:

- a URL (``objectstore+file:///var/lib/blobs?zstd=false``): the scheme selects
  a type, whose config is built with :meth:`ServiceConfig.from_url`;
- a table in a composition file (``[blobservices.NAME]`` with ``type`` and
  settings), built with :meth:`ServiceConfig.from_settings` after the keys
  and their types were checked against :meth:`ServiceConfig.settings`.

A type whose config is a :class:`URLConfig` takes ``url`` plus, as keys, every
option its URL takes: ``{type = "objectstore", url = "objectstore+file:///x",
zstd = false}`` is the same service as ``objectstore+file:///x?zstd=false``.

A :class:`Composition` holds checked tables of several kinds, builds each
service on first use (once, however often it is referred to), rejects
references to undefined names and cycles when loaded, and closes what it
built, dependents first. ``tvix.store.composition`` is the composition of
the store's three kinds; its docs describe the file format and the types.

Modules: :mod:`.config` (configs, registries, the build context) and
:mod:`.tables` (checking tables when loaded); :class:`Composition` is here.
"""

from __future__ import annotations

import os
import tomllib
from collections.abc import Mapping
from pathlib import Path
from types import TracebackType
from typing import Any, ClassVar, Self

from tvix.castore.composition.config import (
    BuildContext,
    CompositionError,
    EmptyConfig,
    Registry,
    ServiceConfig,
    Setting,
    SettingKind,
    URLConfig,
    setting,
)
from tvix.castore.composition.tables import (
    Entry,
    check_graph,
    parse_entry,
    toml_type,
    url_type_prefix,
)
from tvix.castore.errors import ValidationError
from tvix.castore.url import ServiceURL

__all__ = [
    "BuildContext",
    "Composition",
    "CompositionError",
    "EmptyConfig",
    "Registry",
    "ServiceConfig",
    "Setting",
    "SettingKind",
    "URLConfig",
    "setting",
]


class Composition:
    """Named services of several kinds, built on demand from checked tables.

    Subclasses fix :data:`REGISTRIES` (one :class:`Registry` per kind, the
    order of the sections); ``tvix.store.composition.Composition`` is the one
    commands use. Use as an async context manager, or call :meth:`close`.
    """

    REGISTRIES: ClassVar[Mapping[str, Registry]] = {}

    def __init__(self, entries: Mapping[str, Mapping[str, Entry]]) -> None:
        """Use :meth:`from_file`, :meth:`from_toml`, :meth:`from_dict` or :meth:`from_urls`."""
        self._entries = entries
        self._built: dict[tuple[str, str], Any] = {}
        self._building: list[tuple[str, str]] = []

    @classmethod
    def from_file(cls, path: str | os.PathLike[str]) -> Self:
        """Load a TOML composition file; relative paths in it resolve against its directory.

        Raises :class:`CompositionError` for invalid TOML or an invalid
        composition, ``OSError`` if the file cannot be read.
        """
        file = Path(path)
        text = file.read_text(encoding="utf-8")
        try:
            return cls.from_toml(text, base_dir=file.absolute().parent)
        except CompositionError as e:
            raise CompositionError(f"{file}: {e}") from None

    @classmethod
    def from_toml(cls, text: str, base_dir: str | os.PathLike[str] | None = None) -> Self:
        """Load a composition from TOML text; see :meth:`from_dict` for ``base_dir``."""
        try:
            data = tomllib.loads(text)
        except tomllib.TOMLDecodeError as e:
            raise CompositionError(f"invalid TOML: {e}") from None
        return cls.from_dict(data, base_dir)

    @classmethod
    def from_dict(
        cls, data: Mapping[str, object], base_dir: str | os.PathLike[str] | None = None
    ) -> Self:
        """Load a composition from parsed TOML (or JSON): ``{kind: {name: {type: ...}}}``.

        Relative paths resolve against ``base_dir``, by default the current
        working directory. Raises :class:`CompositionError`.
        """
        base = Path(base_dir).absolute() if base_dir is not None else Path.cwd()
        kinds = list(cls.REGISTRIES)
        unknown = sorted(set(data) - set(kinds))
        if unknown:
            raise CompositionError(
                f"unknown section(s) {', '.join(repr(u) for u in unknown)} "
                f"(known: {', '.join(kinds)})"
            )
        entries: dict[str, dict[str, Entry]] = {}
        for kind, registry in cls.REGISTRIES.items():
            section = data.get(kind, {})
            if not isinstance(section, dict):
                raise CompositionError(f"{kind}: must be a table, not {toml_type(section)}")
            entries[kind] = {
                name: parse_entry(registry, name, table, base) for name, table in section.items()
            }
        check_graph(entries)
        return cls(entries)

    @classmethod
    def from_urls(cls, *urls: str) -> Self:
        """A trivial composition: each kind's ``default`` service built from a URL, in order.

        The URLs are checked when the services are built.
        """
        if len(urls) != len(cls.REGISTRIES):
            raise TypeError(f"expected {len(cls.REGISTRIES)} URLs ({', '.join(cls.REGISTRIES)})")
        return cls.from_dict(
            {
                kind: {"default": {"type": "url", "url": url}}
                for kind, url in zip(cls.REGISTRIES, urls, strict=True)
            }
        )

    def names(self, kind: str) -> list[str]:
        """The names of the services of ``kind`` defined, sorted."""
        return sorted(self._entries[kind])

    def build(self, kind: str, name: str = "default") -> Any:
        """The service ``name`` of ``kind``, built (with what it refers to) on first use.

        Raises :class:`CompositionError` if it is not defined or cannot be built.
        """
        key = (kind, name)
        built = self._built.get(key)
        if built is not None:
            return built
        entry = self._entries[kind].get(name)
        if entry is None:
            defined = ", ".join(self.names(kind)) or "none"
            raise CompositionError(f"{kind}.{name}: not defined (defined: {defined})")
        if key in self._building:
            # Only reachable across kinds: same-kind cycles are rejected when loading.
            loop = [*self._building[self._building.index(key) :], key]
            raise CompositionError("cycle: " + " -> ".join(f"{k}.{n}" for k, n in loop))
        self._building.append(key)
        try:
            service = self._build_entry(entry)
        finally:
            self._building.pop()
        interface = self.REGISTRIES[kind].interface
        if not isinstance(service, interface):
            raise CompositionError(
                f"{entry.label}: type {entry.type_name!r} built a {type(service).__name__}, "
                f"not a {interface.__name__}"
            )
        self._built[key] = service
        return service

    def _build_entry(self, entry: Entry) -> Any:
        registry = self.REGISTRIES[entry.kind]
        ctx = BuildContext(self, entry.kind, entry.name)
        try:
            config = self._config(registry, entry)
            return config.build(ctx)
        except CompositionError:
            raise
        except (ValidationError, OSError) as e:
            raise CompositionError(f"{entry.label}: {e}") from e

    @staticmethod
    def _config(registry: Registry, entry: Entry) -> ServiceConfig:
        values = dict(entry.settings)
        if entry.config_class is None:
            return registry.config_from_url(values["url"])
        if issubclass(entry.config_class, URLConfig):
            schemes = registry.type_schemes(entry.type_name)
            scheme = ServiceURL.parse(values["url"]).scheme
            if scheme not in schemes:
                raise CompositionError(
                    f"{entry.label}: type {entry.type_name!r} needs a URL starting with "
                    f"{url_type_prefix(schemes)!r}, not {values['url']!r} "
                    "(type 'url' takes any)"
                )
        return entry.config_class.from_settings(values)

    async def close(self) -> None:
        """Close every service built, dependents before what they use; idempotent.

        Tries all of them; raises the first failure afterwards.
        """
        built = list(self._built.values())
        self._built.clear()
        error: BaseException | None = None
        # Built in dependency order (what a service uses finishes building first).
        for service in reversed(built):
            try:
                await service.close()
            except Exception as e:
                error = error or e
        if error is not None:
            raise error

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()
