"""Backend configs and their registries: what a URL or a composition table builds.

See :mod:`tvix.castore.composition` for how they fit together.
"""

from __future__ import annotations

import dataclasses
import importlib
from abc import ABC, abstractmethod
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar, Literal, Protocol, Self

from tvix.castore.errors import InvalidURLError, ValidationError
from tvix.castore.url import ServiceURL

__all__ = [
    "TOML_NAMES",
    "BuildContext",
    "Builds",
    "CompositionError",
    "ConfigTarget",
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

TOML_NAMES: dict[SettingKind, str] = {
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


class Builds(Protocol):
    """What a :class:`BuildContext` asks of its composition."""

    def build(self, kind: str, name: str = "default") -> Any:
        """The service ``name`` of ``kind``, built on first use."""
        ...


@dataclass
class BuildContext:
    """What :meth:`ServiceConfig.build` may use besides its config.

    Within a composition, :meth:`service` builds (once) another service of
    the same kind by name, and :meth:`blob_service` / :meth:`directory_service`
    the composition's services of those kinds. Built from a URL alone there
    is no composition, and asking for another service is an error.
    """

    composition: Builds | None
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
