"""Compositions: named services wired together, from a TOML file.

A composition file names services of the three kinds in the tables
``[blobservices.NAME]``, ``[directoryservices.NAME]`` and
``[pathinfoservices.NAME]``. Each has a ``type`` and that type's settings; a
setting may name another service of the same kind. The service called
``default`` of each kind is the one a command uses::

    # A local cache in front of a remote daemon, blobs and metadata alike.
    [blobservices.default]
    type = "cache"
    near = "local"
    far = "remote"

    [blobservices.local]
    type = "objectstore"
    url = "objectstore+file:///var/cache/tvix/blobs"

    [blobservices.remote]
    type = "grpc"
    url = "grpc+http://store.example.org:8000"

    [directoryservices.default]
    type = "cache"
    near = "local"
    far = "remote"

    [directoryservices.local]
    type = "sqlite"
    path = "cache/directories.sqlite"   # relative: next to this file

    [directoryservices.remote]
    type = "url"
    url = "grpc+http://store.example.org:8000"

    [pathinfoservices.default]
    type = "signing"
    inner = "cached"
    key_file = "/etc/tvix/secret-key"

    [pathinfoservices.cached]
    type = "cache"
    near = "recent"
    far = "db"

    [pathinfoservices.recent]
    type = "lru"
    capacity = 10000

    [pathinfoservices.db]
    type = "sqlite"
    path = "/var/lib/tvix/pathinfo.sqlite"

Types (see :data:`TYPES`; :func:`register_type` adds more):

============== ========================= ===================================================
type           kinds                     settings
============== ========================= ===================================================
``url``        all                       ``url``: any URL the kind's registry builds
``memory``     all                       none
``objectstore`` blob                     ``url``: ``objectstore+...``
``packs``      blob                      ``path`` (a directory); optional ``zstd``,
                                         ``avg_chunk_size``, ``pack_size`` (as in the URL)
``packs_s3``   blob                      ``bucket``, ``index`` (``postgresql://...``);
                                         optional ``prefix``, ``endpoint``, ``region``,
                                         ``allow_http``, ``zstd``, ``avg_chunk_size``,
                                         ``pack_size``
``sqlite``     directory, pathinfo       ``path``: the database file (its directory is created)
``grpc``       all                       ``url``: ``grpc+http://...``, ``grpc+unix://...``
``cache``      all                       ``near``, ``far``: names of services of the same kind
``lru``        pathinfo                  ``capacity``: a positive integer
``signing``    pathinfo                  ``inner``: a name; ``key_file``: a Nix secret key file
``nix``        pathinfo                  ``url``: a binary cache (``https://``, ``http://``,
                                         ``file://``, or ``nix+...?trusted-public-keys=``);
                                         optional ``trusted_public_keys`` (space-separated),
                                         ``require_sigs``, ``blob_service`` and
                                         ``directory_service`` (names of the services NARs
                                         are ingested into, default ``default``)
``race``       all                       ``sources``: names of services of the same kind,
                                         asked at once; the first answer that verifies wins
``trusted``    pathinfo                  ``inner``: a name; ``trusted_public_keys``
                                         (space-separated); optional ``verify_nar``
============== ========================= ===================================================

A PathInfo URL ``nix+http(s)://...`` or ``nix+file://...`` (type ``url``, or
:meth:`Composition.from_urls`) is built as type ``nix`` with that URL.

Relative paths (``path``, ``key_file``; ``~`` is expanded) resolve against
the directory of the composition file (:meth:`Composition.from_file`), or against
``base_dir`` (default: the working directory when loaded). URLs are taken
as they are.

Everything that can be checked without building is checked when a
composition is loaded: unknown sections and types, unknown or missing keys,
values of the wrong type, names that refer to no service, and cycles. Each
raises :class:`CompositionError` naming the culprit, e.g.
``blobservices.default: unknown key 'foo'`` or
``cycle: blobservices.a -> blobservices.b -> blobservices.a``. Errors found
while building (an invalid URL, an unreadable key file) are raised as
:class:`CompositionError` too, prefixed with the service's name.

Services are built on demand, each once however often it is referred to,
and :meth:`Composition.close` closes all it built, dependents first.
Combinators do not close what they wrap; the composition does.
"""

from __future__ import annotations

import os
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, Literal, Self, overload

from tvix.castore import blobservice, directoryservice
from tvix.castore.blobservice.base import BlobService
from tvix.castore.blobservice.cache import CacheBlobService
from tvix.castore.blobservice.packs import PacksFileConfig, PacksS3Config
from tvix.castore.directoryservice.base import DirectoryService
from tvix.castore.directoryservice.cache import CacheDirectoryService
from tvix.castore.directoryservice.sqlite import SQLiteDirectoryService
from tvix.castore.errors import ValidationError
from tvix.nixcompat.signing import SigningKey
from tvix.store import pathinfoservice
from tvix.store.pathinfoservice.base import PathInfoService
from tvix.store.pathinfoservice.cache import CachePathInfoService
from tvix.store.pathinfoservice.lru import LRUPathInfoService
from tvix.store.pathinfoservice.signing import SigningPathInfoService
from tvix.store.pathinfoservice.sqlite import SQLitePathInfoService

__all__ = [
    "KINDS",
    "TYPES",
    "BuildContext",
    "Composition",
    "CompositionError",
    "Kind",
    "Service",
    "ServiceType",
    "Setting",
    "register_type",
]

Kind = Literal["blobservices", "directoryservices", "pathinfoservices"]
KINDS: tuple[Kind, ...] = ("blobservices", "directoryservices", "pathinfoservices")

Service = BlobService | DirectoryService | PathInfoService

_INTERFACES: dict[Kind, type[Service]] = {
    "blobservices": BlobService,
    "directoryservices": DirectoryService,
    "pathinfoservices": PathInfoService,
}


class CompositionError(ValidationError):
    """A composition is invalid or cannot be built; the message names the service and why."""


# -- service types ---------------------------------------------------------------------------

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
    """One key a service type takes.

    ``kind`` is the value's type: ``str``, ``int``, ``bool``; ``path`` (a
    string, resolved to an absolute path when loaded); ``ref`` (the name of
    another service of the same kind) or ``refs`` (an array of names). The
    builder receives references as the built services, and optional
    settings (``required=False``) only when they are given.
    """

    kind: SettingKind
    required: bool = True


Builder = Callable[["BuildContext", dict[str, Any]], Service]


@dataclass(frozen=True)
class ServiceType:
    """A ``type`` of service: the settings it takes and how to build it from them."""

    settings: Mapping[str, Setting]
    build: Builder


TYPES: dict[Kind, dict[str, ServiceType]] = {kind: {} for kind in KINDS}
"""The types of each kind, by name."""


def register_type(kind: Kind, name: str, service_type: ServiceType) -> None:
    """Make ``type = name`` available in ``[kind.*]`` tables (replacing any earlier one)."""
    if "type" in service_type.settings:
        raise ValueError("'type' is not a setting: it selects the type")
    TYPES[kind][name] = service_type


@dataclass
class BuildContext:
    """What a :data:`Builder` may use besides its settings.

    A builder of one kind may need default services of another (e.g. a
    PathInfo service that ingests NARs into the blob and directory
    services): :meth:`blob_service` and :meth:`directory_service` build them
    (once) through the composition.
    """

    composition: Composition
    kind: Kind
    name: str

    def blob_service(self, name: str = "default") -> BlobService:
        """The composition's blob service ``name``."""
        return self.composition.blob_service(name)

    def directory_service(self, name: str = "default") -> DirectoryService:
        """The composition's directory service ``name``."""
        return self.composition.directory_service(name)


# PathInfo URL schemes whose services ingest into the composition's blob and
# directory services, so the plain registry cannot build them: they are built
# as type "nix" (which also makes ``Composition.from_urls`` accept them).
_INGESTING_SCHEMES = ("nix+http://", "nix+https://", "nix+file://")


def _registry_build(ctx: BuildContext, url: str) -> Service:
    if ctx.kind == "blobservices":
        return blobservice.from_url(url)
    if ctx.kind == "directoryservices":
        return directoryservice.from_url(url)
    if url.startswith(_INGESTING_SCHEMES):
        return _build_nix(ctx, {"url": url})
    return pathinfoservice.from_url(url)


def _url_with_scheme(prefix: str, what: str) -> Builder:
    """A builder for a URL that must start with ``prefix`` (the short forms)."""

    def build(ctx: BuildContext, settings: dict[str, Any]) -> Service:
        url: str = settings["url"]
        if not url.startswith(prefix):
            raise CompositionError(
                f"{ctx.kind}.{ctx.name}: type {what!r} needs a URL starting with {prefix!r}, "
                f"not {url!r} (type 'url' takes any)"
            )
        return _registry_build(ctx, url)

    return build


def _build_url(ctx: BuildContext, settings: dict[str, Any]) -> Service:
    return _registry_build(ctx, settings["url"])


def _build_memory(ctx: BuildContext, settings: dict[str, Any]) -> Service:
    return _registry_build(ctx, "memory://")


def _build_sqlite(ctx: BuildContext, settings: dict[str, Any]) -> Service:
    path = Path(settings["path"])
    # SQLite creates the file but not its directory; do as objectstore+file does.
    path.parent.mkdir(parents=True, exist_ok=True)
    if ctx.kind == "directoryservices":
        return SQLiteDirectoryService(str(path))
    return SQLitePathInfoService(str(path))


def _build_cache(ctx: BuildContext, settings: dict[str, Any]) -> Service:
    near, far = settings["near"], settings["far"]
    if ctx.kind == "blobservices":
        return CacheBlobService(near, far)
    if ctx.kind == "directoryservices":
        return CacheDirectoryService(near, far)
    return CachePathInfoService(near, far)


def _build_nix(ctx: BuildContext, settings: dict[str, Any]) -> Service:
    # Imported here: aiohttp takes ~0.4 s to import, and only binary caches need it.
    from tvix.store.pathinfoservice.nix_http import build_from_composition

    return build_from_composition(ctx, settings)


def _build_lru(ctx: BuildContext, settings: dict[str, Any]) -> Service:
    return LRUPathInfoService(settings["capacity"])


def _build_signing(ctx: BuildContext, settings: dict[str, Any]) -> Service:
    path = settings["key_file"]
    try:
        key = SigningKey.from_file(path)
    except (OSError, ValueError) as e:
        # ValueError: nixcompat's InvalidKeyError; its message does not name the file.
        raise CompositionError(f"{ctx.kind}.{ctx.name}: cannot use key_file {path}: {e}") from None
    return SigningPathInfoService(settings["inner"], key)


_URL = {"url": Setting("str")}
_NEAR_FAR = {"near": Setting("ref"), "far": Setting("ref")}

for _kind in KINDS:
    register_type(_kind, "url", ServiceType(_URL, _build_url))
    register_type(_kind, "memory", ServiceType({}, _build_memory))
    register_type(_kind, "grpc", ServiceType(_URL, _url_with_scheme("grpc+", "grpc")))
    register_type(_kind, "cache", ServiceType(_NEAR_FAR, _build_cache))
register_type(
    "blobservices",
    "objectstore",
    ServiceType(_URL, _url_with_scheme("objectstore+", "objectstore")),
)


def _build_packs(config: type[PacksFileConfig | PacksS3Config]) -> Builder:
    """A builder from a table of the options of a packed store (see its config)."""

    def build(ctx: BuildContext, settings: dict[str, Any]) -> Service:
        try:
            return config.from_mapping(settings).build()
        except ValidationError as e:
            raise CompositionError(f"{ctx.kind}.{ctx.name}: {e}") from None

    return build


_PACKS_COMMON = {
    "zstd": Setting("bool", required=False),
    "avg_chunk_size": Setting("int", required=False),
    "pack_size": Setting("int", required=False),
}
register_type(
    "blobservices",
    "packs",
    ServiceType({"path": Setting("path"), **_PACKS_COMMON}, _build_packs(PacksFileConfig)),
)
register_type(
    "blobservices",
    "packs_s3",
    ServiceType(
        {
            "bucket": Setting("str"),
            "index": Setting("str"),
            "prefix": Setting("str", required=False),
            "endpoint": Setting("str", required=False),
            "region": Setting("str", required=False),
            "allow_http": Setting("bool", required=False),
            **_PACKS_COMMON,
        },
        _build_packs(PacksS3Config),
    ),
)
for _kind in ("directoryservices", "pathinfoservices"):
    register_type(_kind, "sqlite", ServiceType({"path": Setting("path")}, _build_sqlite))
register_type("pathinfoservices", "lru", ServiceType({"capacity": Setting("int")}, _build_lru))
register_type(
    "pathinfoservices",
    "nix",
    ServiceType(
        {
            "url": Setting("str"),
            "trusted_public_keys": Setting("str", required=False),
            "require_sigs": Setting("bool", required=False),
            "blob_service": Setting("str", required=False),
            "directory_service": Setting("str", required=False),
        },
        _build_nix,
    ),
)
register_type(
    "pathinfoservices",
    "signing",
    ServiceType({"inner": Setting("ref"), "key_file": Setting("path")}, _build_signing),
)


# -- loading and checking --------------------------------------------------------------------


@dataclass(frozen=True)
class _Entry:
    """One checked ``[kind.name]`` table."""

    kind: Kind
    name: str
    type_name: str
    service_type: ServiceType
    settings: dict[str, Any]

    @property
    def label(self) -> str:
        return f"{self.kind}.{self.name}"

    def refs(self) -> list[tuple[str, str]]:
        """The names this service refers to, each with its setting's key."""
        out: list[tuple[str, str]] = []
        for key, setting in self.service_type.settings.items():
            value = self.settings.get(key)
            if value is None:
                continue
            if setting.kind == "ref":
                out.append((key, value))
            elif setting.kind == "refs":
                out.extend((key, v) for v in value)
        return out


def _toml_type(value: object) -> str:
    names = {bool: "boolean", int: "integer", float: "float", str: "string", list: "array"}
    return names.get(type(value), "table" if isinstance(value, dict) else type(value).__name__)


def _check_value(label: str, key: str, setting: Setting, value: object, base_dir: Path) -> object:
    kind = setting.kind
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


def _parse_entry(kind: Kind, name: str, table: object, base_dir: Path) -> _Entry:
    label = f"{kind}.{name}"
    if not isinstance(table, dict):
        raise CompositionError(f"{label}: must be a table, not {_toml_type(table)}")
    type_name = table.get("type")
    if type_name is None:
        raise CompositionError(f"{label}: missing key 'type'")
    if not isinstance(type_name, str):
        raise CompositionError(f"{label}: key 'type' must be a string, not {_toml_type(type_name)}")
    types = TYPES[kind]
    service_type = types.get(type_name)
    if service_type is None:
        raise CompositionError(
            f"{label}: unknown type {type_name!r} (known: {', '.join(sorted(types))})"
        )
    spec = service_type.settings
    for key in table:
        if key != "type" and key not in spec:
            allowed = ", ".join(sorted(spec)) or "none"
            raise CompositionError(
                f"{label}: unknown key {key!r} for type {type_name!r} (allowed: {allowed})"
            )
    settings: dict[str, Any] = {}
    for key, setting in spec.items():
        if key not in table:
            if setting.required:
                raise CompositionError(f"{label}: missing key {key!r} for type {type_name!r}")
            continue
        settings[key] = _check_value(label, key, setting, table[key], base_dir)
    return _Entry(kind, name, type_name, service_type, settings)


def _check_graph(entries: dict[Kind, dict[str, _Entry]]) -> None:
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


def _check_acyclic(kind: Kind, by_name: dict[str, _Entry]) -> None:
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


# -- the composition --------------------------------------------------------------------------


class Composition:
    """Named services of the three kinds, built on demand (see the module docs).

    Use as an async context manager, or call :meth:`close`, to close all it built.
    """

    def __init__(self, entries: dict[Kind, dict[str, _Entry]]) -> None:
        """Use :meth:`from_file`, :meth:`from_toml`, :meth:`from_dict` or :meth:`from_urls`."""
        self._entries = entries
        self._built: dict[tuple[Kind, str], Service] = {}
        self._building: list[tuple[Kind, str]] = []

    @classmethod
    def from_file(cls, path: str | os.PathLike[str]) -> Composition:
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
    def from_toml(cls, text: str, base_dir: str | os.PathLike[str] | None = None) -> Composition:
        """Load a composition from TOML text; see :meth:`from_dict` for ``base_dir``."""
        try:
            data = tomllib.loads(text)
        except tomllib.TOMLDecodeError as e:
            raise CompositionError(f"invalid TOML: {e}") from None
        return cls.from_dict(data, base_dir)

    @classmethod
    def from_dict(
        cls, data: Mapping[str, object], base_dir: str | os.PathLike[str] | None = None
    ) -> Composition:
        """Load a composition from parsed TOML (or JSON): ``{kind: {name: {type: ...}}}``.

        Relative paths resolve against ``base_dir``, by default the current
        working directory. Raises :class:`CompositionError`.
        """
        base = Path(base_dir).absolute() if base_dir is not None else Path.cwd()
        unknown = sorted(set(data) - set(KINDS))
        if unknown:
            raise CompositionError(
                f"unknown section(s) {', '.join(repr(u) for u in unknown)} "
                f"(known: {', '.join(KINDS)})"
            )
        entries: dict[Kind, dict[str, _Entry]] = {}
        for kind in KINDS:
            section = data.get(kind, {})
            if not isinstance(section, dict):
                raise CompositionError(f"{kind}: must be a table, not {_toml_type(section)}")
            entries[kind] = {
                name: _parse_entry(kind, name, table, base) for name, table in section.items()
            }
        _check_graph(entries)
        return cls(entries)

    @classmethod
    def from_urls(cls, blob_url: str, directory_url: str, path_info_url: str) -> Composition:
        """A trivial composition: the three ``default`` services built from URLs.

        The URLs are checked when the services are built.
        """
        return cls.from_dict(
            {
                "blobservices": {"default": {"type": "url", "url": blob_url}},
                "directoryservices": {"default": {"type": "url", "url": directory_url}},
                "pathinfoservices": {"default": {"type": "url", "url": path_info_url}},
            }
        )

    def names(self, kind: Kind) -> list[str]:
        """The names of the services of ``kind`` defined, sorted."""
        return sorted(self._entries[kind])

    @overload
    def build(self, kind: Literal["blobservices"], name: str = ...) -> BlobService: ...
    @overload
    def build(self, kind: Literal["directoryservices"], name: str = ...) -> DirectoryService: ...
    @overload
    def build(self, kind: Literal["pathinfoservices"], name: str = ...) -> PathInfoService: ...
    @overload
    def build(self, kind: Kind, name: str = ...) -> Service: ...
    def build(self, kind: Kind, name: str = "default") -> Service:
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
            # Only reachable through a BuildContext across kinds: same-kind cycles are
            # rejected when loading.
            loop = [*self._building[self._building.index(key) :], key]
            raise CompositionError("cycle: " + " -> ".join(f"{k}.{n}" for k, n in loop))
        self._building.append(key)
        try:
            settings = dict(entry.settings)
            for setting_key, setting in entry.service_type.settings.items():
                if setting_key not in settings:
                    continue
                if setting.kind == "ref":
                    settings[setting_key] = self.build(kind, settings[setting_key])
                elif setting.kind == "refs":
                    settings[setting_key] = [self.build(kind, r) for r in settings[setting_key]]
            ctx = BuildContext(self, kind, name)
            try:
                service = entry.service_type.build(ctx, settings)
            except CompositionError:
                raise
            except (ValidationError, OSError) as e:
                raise CompositionError(f"{entry.label}: {e}") from e
        finally:
            self._building.pop()
        interface = _INTERFACES[kind]
        if not isinstance(service, interface):
            raise CompositionError(
                f"{entry.label}: type {entry.type_name!r} built a {type(service).__name__}, "
                f"not a {interface.__name__}"
            )
        self._built[key] = service
        return service

    def blob_service(self, name: str = "default") -> BlobService:
        """The blob service ``name``; see :meth:`build`."""
        return self.build("blobservices", name)

    def directory_service(self, name: str = "default") -> DirectoryService:
        """The directory service ``name``; see :meth:`build`."""
        return self.build("directoryservices", name)

    def path_info_service(self, name: str = "default") -> PathInfoService:
        """The PathInfo service ``name``; see :meth:`build`."""
        return self.build("pathinfoservices", name)

    def build_all(self) -> tuple[BlobService, DirectoryService, PathInfoService]:
        """The three ``default`` services; raises :class:`CompositionError` if one is missing."""
        return self.blob_service(), self.directory_service(), self.path_info_service()

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


def _register_racing_and_trust() -> None:
    # Imported here: those modules import this one for their types.
    from tvix.store.pathinfoservice.race import build_race
    from tvix.store.pathinfoservice.trust import build_trusted

    for kind in KINDS:
        register_type(kind, "race", ServiceType({"sources": Setting("refs")}, build_race))
    register_type(
        "pathinfoservices",
        "trusted",
        ServiceType(
            {
                "inner": Setting("ref"),
                "trusted_public_keys": Setting("str"),
                "verify_nar": Setting("bool", required=False),
            },
            build_trusted,
        ),
    )


_register_racing_and_trust()
