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
"""

from __future__ import annotations

import dataclasses
import importlib
import os
import tomllib
from abc import ABC, abstractmethod
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, ClassVar, Literal, Self

from tvix.castore.errors import InvalidURLError, ValidationError
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


class CompositionError(ValidationError):
    """A composition is invalid or cannot be built; the message names the service and why."""


SettingKind = Literal["str", "int", "bool", "path", "ref", "refs"]

_TOML_NAMES: dict[SettingKind, str] = {
    "str": "a string",
    "int": "an integer",
    "bool": "a boolean",
    "path": "a string (a path)",
    "ref": "a string (a service name)",
    "refs": "an array of strings (service names)",
}


@dataclass(frozen=True)
class Setting:
    """One key a type takes in a composition table.

    ``kind`` is the value's type: ``str``, ``int``, ``bool``; ``path`` (a
    string, resolved to an absolute path when loaded); ``ref`` (the name of
    another service of the same kind) or ``refs`` (an array of names), which
    :meth:`BuildContext.service` turns into services when building.
    """

    kind: SettingKind
    required: bool = True


def setting(kind: SettingKind, default: Any = dataclasses.MISSING) -> Any:
    """A config field that is also a composition key (optional when it has a default)."""
    return dataclasses.field(default=default, metadata={"setting": kind})


class ServiceConfig(ABC):
    """The settings of one backend, built strictly from a URL or a composition table.

    Subclasses are frozen dataclasses. Fields declared with :func:`setting`
    are the keys of the backend's composition table; :meth:`from_url` parses
    the URL form, if the backend has one. Either way invalid values raise
    :class:`~tvix.castore.errors.ValidationError` naming them, and
    :meth:`build` makes the service.
    """

    @classmethod
    def settings(cls) -> dict[str, Setting]:
        """The keys a composition table of this type takes (besides ``type``)."""
        return {
            f.name: Setting(
                f.metadata["setting"],
                required=f.default is dataclasses.MISSING
                and f.default_factory is dataclasses.MISSING,
            )
            for f in dataclasses.fields(cls)  # type: ignore[arg-type]
            if "setting" in f.metadata
        }

    @classmethod
    def from_url(cls, url: ServiceURL) -> Self:
        """The config a URL of one of the type's schemes names; raises ``InvalidURLError``."""
        raise InvalidURLError(f"invalid service URL {url.raw!r}: this type has no URL form")

    @classmethod
    def from_settings(cls, values: dict[str, Any]) -> Self:
        """The config of a checked table (keys known, values of the right types)."""
        return cls(**values)

    @abstractmethod
    def build(self, ctx: BuildContext) -> Any:
        """The service; other services it uses come from ``ctx``."""


class URLConfig(ServiceConfig):
    """A config whose table is its URL: ``url``, plus each URL option as a key of its own.

    :data:`OPTIONS` names the query options :meth:`from_url` accepts and their
    types in a table.
    """

    OPTIONS: ClassVar[Mapping[str, SettingKind]] = {}

    @classmethod
    def settings(cls) -> dict[str, Setting]:
        """``url`` and every option, optional."""
        return {"url": Setting("str")} | {
            key: Setting(kind, required=False) for key, kind in cls.OPTIONS.items()
        }

    @classmethod
    def from_settings(cls, values: dict[str, Any]) -> Self:
        """Parse ``url`` with the options given as keys added to its query."""
        url = ServiceURL.parse(values.pop("url"))
        return cls.from_url(url.with_params(values))


class EmptyConfig(ServiceConfig):
    """A config with no settings; its URL is the bare scheme (``memory://``)."""

    @classmethod
    def from_url(cls, url: ServiceURL) -> Self:
        """Only ``scheme://``: no host, path or options."""
        url.reject_host()
        url.reject_path()
        url.reject_params()
        return cls()


# The shape of what registries hold: a config class, or "module:attribute" to import.
ConfigTarget = type[ServiceConfig] | str


@dataclass
class _Type:
    name: str
    target: ConfigTarget
    schemes: tuple[str, ...]

    def config_class(self) -> type[ServiceConfig]:
        if isinstance(self.target, str):
            module, _, attr = self.target.partition(":")
            target: object = importlib.import_module(module)
            for part in attr.split("."):
                target = getattr(target, part)
            if not (isinstance(target, type) and issubclass(target, ServiceConfig)):
                raise TypeError(f"{self.target} is not a ServiceConfig")
            self.target = target
        return self.target


class Registry:
    """The backends of one kind of service: composition types and the URL schemes they take.

    ``kind`` is the composition section (``blobservices``, ...); ``interface``
    the class every service of the kind derives from.
    """

    def __init__(self, kind: str, interface: type, what: str) -> None:
        """An empty registry; ``what`` names the kind in messages ("blob service")."""
        self.kind = kind
        self.interface = interface
        self.what = what
        self._types: dict[str, _Type] = {}
        self._schemes: dict[str, str] = {}

    def register(self, name: str, target: ConfigTarget, schemes: tuple[str, ...] = ()) -> None:
        """Make ``type = name`` (and URLs of ``schemes``) build ``target``'s config.

        Replaces an earlier registration of the same name or schemes.
        """
        self._types[name] = _Type(name, target, schemes)
        for scheme in schemes:
            self._schemes[scheme] = name

    def unregister(self, name: str) -> None:
        """Forget type ``name`` and its schemes (for tests that register their own)."""
        entry = self._types.pop(name)
        for scheme in entry.schemes:
            self._schemes.pop(scheme, None)

    @property
    def types(self) -> list[str]:
        """The type names, sorted."""
        return sorted(self._types)

    @property
    def schemes(self) -> list[str]:
        """The URL schemes, sorted."""
        return sorted(self._schemes)

    def config_class(self, type_name: str) -> type[ServiceConfig] | None:
        """The config class of ``type_name``, imported on first use; ``None`` if unknown."""
        entry = self._types.get(type_name)
        return entry.config_class() if entry is not None else None

    def type_schemes(self, type_name: str) -> tuple[str, ...]:
        """The URL schemes type ``type_name`` takes."""
        return self._types[type_name].schemes

    def type_for_scheme(self, scheme: str) -> str | None:
        """The type URLs of ``scheme`` build; ``None`` if no type takes it."""
        return self._schemes.get(scheme)

    def config_from_url(self, url: str | ServiceURL) -> ServiceConfig:
        """The config ``url`` names; raises ``InvalidURLError`` (unknown scheme, bad options)."""
        parsed = url if isinstance(url, ServiceURL) else ServiceURL.parse(url)
        type_name = self.type_for_scheme(parsed.scheme)
        if type_name is None:
            raise InvalidURLError(
                f"invalid {self.what} URL {parsed.raw!r}: unknown scheme {parsed.scheme!r} "
                f"(known: {', '.join(self.schemes)})"
            )
        return self._types[type_name].config_class().from_url(parsed)

    def from_url(self, url: str) -> Any:
        """The service ``url`` names, built alone (it may use no other service)."""
        return self.config_from_url(url).build(BuildContext(None, self.kind, url))


# -- building -------------------------------------------------------------------------------


@dataclass
class BuildContext:
    """What :meth:`ServiceConfig.build` may use besides its config.

    Within a composition, :meth:`service` builds (once) another service of
    the same kind by name, and :meth:`blob_service` / :meth:`directory_service`
    the composition's services of those kinds. Built from a URL alone there
    is no composition, and asking for another service is an error.
    """

    composition: Composition | None
    kind: str
    name: str

    def build(self, kind: str, name: str = "default") -> Any:
        """The composition's service ``name`` of ``kind``."""
        if self.composition is None:
            raise CompositionError(
                f"{self.name}: needs the {kind} {name!r}, so it must be built in a composition"
            )
        return self.composition.build(kind, name)

    def service(self, name: str) -> Any:
        """The composition's service ``name`` of the kind being built."""
        return self.build(self.kind, name)

    def blob_service(self, name: str = "default") -> Any:
        """The composition's blob service ``name``."""
        return self.build("blobservices", name)

    def directory_service(self, name: str = "default") -> Any:
        """The composition's directory service ``name``."""
        return self.build("directoryservices", name)


@dataclass(frozen=True)
class _Entry:
    """One checked ``[kind.name]`` table."""

    kind: str
    name: str
    type_name: str
    config_class: type[ServiceConfig] | None  # None: type "url"
    settings: dict[str, Any]
    spec: Mapping[str, Setting]

    @property
    def label(self) -> str:
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


_URL_SPEC = {"url": Setting("str")}


def _toml_type(value: object) -> str:
    names = {bool: "boolean", int: "integer", float: "float", str: "string", list: "array"}
    return names.get(type(value), "table" if isinstance(value, dict) else type(value).__name__)


def _check_value(label: str, key: str, spec: Setting, value: object, base_dir: Path) -> object:
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
            f"{label}: key {key!r} must be {_TOML_NAMES[kind]}, not {_toml_type(value)}"
        )
    if kind == "path":
        assert isinstance(value, str)
        if not value:
            raise CompositionError(f"{label}: key {key!r} must not be empty")
        return str(base_dir / os.path.expanduser(value))
    return value


def _parse_entry(registry: Registry, name: str, table: object, base_dir: Path) -> _Entry:
    label = f"{registry.kind}.{name}"
    if not isinstance(table, dict):
        raise CompositionError(f"{label}: must be a table, not {_toml_type(table)}")
    type_name = table.get("type")
    if type_name is None:
        raise CompositionError(f"{label}: missing key 'type'")
    if not isinstance(type_name, str):
        raise CompositionError(f"{label}: key 'type' must be a string, not {_toml_type(type_name)}")
    config_class: type[ServiceConfig] | None = None
    if type_name == "url":
        spec: Mapping[str, Setting] = _URL_SPEC
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
        settings[key] = _check_value(label, key, setting_spec, table[key], base_dir)
    return _Entry(registry.kind, name, type_name, config_class, settings, spec)


def _check_graph(entries: Mapping[str, Mapping[str, _Entry]]) -> None:
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
        _check_acyclic(kind, by_name)


def _check_acyclic(kind: str, by_name: Mapping[str, _Entry]) -> None:
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


def _url_type_prefix(schemes: tuple[str, ...]) -> str:
    if len(schemes) == 1:
        return f"{schemes[0]}://"
    prefix = schemes[0]
    while not all(s.startswith(prefix) for s in schemes):
        prefix = prefix[:-1]
    return prefix


class Composition:
    """Named services of several kinds, built on demand from checked tables.

    Subclasses fix :data:`REGISTRIES` (one :class:`Registry` per kind, the
    order of the sections); ``tvix.store.composition.Composition`` is the one
    commands use. Use as an async context manager, or call :meth:`close`.
    """

    REGISTRIES: ClassVar[Mapping[str, Registry]] = {}

    def __init__(self, entries: Mapping[str, Mapping[str, _Entry]]) -> None:
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
        entries: dict[str, dict[str, _Entry]] = {}
        for kind, registry in cls.REGISTRIES.items():
            section = data.get(kind, {})
            if not isinstance(section, dict):
                raise CompositionError(f"{kind}: must be a table, not {_toml_type(section)}")
            entries[kind] = {
                name: _parse_entry(registry, name, table, base) for name, table in section.items()
            }
        _check_graph(entries)
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

    def _build_entry(self, entry: _Entry) -> Any:
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
    def _config(registry: Registry, entry: _Entry) -> ServiceConfig:
        values = dict(entry.settings)
        if entry.config_class is None:
            return registry.config_from_url(values["url"])
        if issubclass(entry.config_class, URLConfig):
            schemes = registry.type_schemes(entry.type_name)
            scheme = ServiceURL.parse(values["url"]).scheme
            if scheme not in schemes:
                raise CompositionError(
                    f"{entry.label}: type {entry.type_name!r} needs a URL starting with "
                    f"{_url_type_prefix(schemes)!r}, not {values['url']!r} "
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
