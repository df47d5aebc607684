"""Service URLs: parsing, strict option checking, and the scheme registries.

Every backend is built from a URL. A backend takes what it needs from a
:class:`ServiceURL` and rejects anything else (unknown query options, a host
or a path it has no use for) with :class:`InvalidURLError` naming it.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Generic, TypeVar
from urllib.parse import parse_qsl, unquote, urlsplit

from tvix.castore.errors import InvalidURLError

__all__ = ["Registry", "ServiceURL"]

T = TypeVar("T")


@dataclass(frozen=True)
class ServiceURL:
    """A parsed service URL: ``scheme://host/path?key=value&...``."""

    raw: str
    scheme: str
    host: str
    path: str
    params: dict[str, str] = field(default_factory=dict)

    @classmethod
    def parse(cls, url: str) -> ServiceURL:
        """Split ``url``; raises :class:`InvalidURLError` without a scheme or on repeats."""
        parts = urlsplit(url)
        if not parts.scheme or "://" not in url:
            raise InvalidURLError(f"invalid service URL {url!r}: expected scheme://...")
        if parts.fragment:
            raise InvalidURLError(f"invalid service URL {url!r}: fragments are not allowed")
        params: dict[str, str] = {}
        for key, value in parse_qsl(parts.query, keep_blank_values=True, strict_parsing=False):
            if key in params:
                raise InvalidURLError(f"invalid service URL {url!r}: option {key!r} given twice")
            params[key] = value
        return cls(url, parts.scheme, parts.netloc, unquote(parts.path), params)

    def reject_params(self, *allowed: str) -> None:
        """Raise unless every query option is one of ``allowed``."""
        unknown = sorted(set(self.params) - set(allowed))
        if unknown:
            raise InvalidURLError(
                f"invalid service URL {self.raw!r}: unknown option(s) {', '.join(unknown)}"
                + (f" (allowed: {', '.join(allowed)})" if allowed else "")
            )

    def reject_host(self) -> None:
        """Raise if the URL has a host part."""
        if self.host:
            raise InvalidURLError(f"invalid service URL {self.raw!r}: no host expected")

    def reject_path(self) -> None:
        """Raise if the URL has a path other than ``/`` or nothing."""
        if self.path not in ("", "/"):
            raise InvalidURLError(f"invalid service URL {self.raw!r}: no path expected")

    def require_path(self) -> str:
        """The path; raises if it is empty."""
        if self.path in ("", "/"):
            raise InvalidURLError(f"invalid service URL {self.raw!r}: a path is required")
        return self.path

    def int_param(self, key: str, default: int) -> int:
        """An integer option, ``default`` when absent."""
        value = self.params.get(key)
        if value is None:
            return default
        try:
            return int(value)
        except ValueError:
            raise InvalidURLError(
                f"invalid service URL {self.raw!r}: {key} must be an integer"
            ) from None


Factory = Callable[[ServiceURL], T]


class Registry(Generic[T]):
    """Maps URL schemes to backend factories for one kind of service.

    Factories may be given as ``"module:attribute[.attribute]"`` strings, imported on
    first use, so the registry can name backends whose dependencies are heavy
    or that live in layers above it.
    """

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._factories: dict[str, Factory[T] | str] = {}

    def register(self, scheme: str, factory: Factory[T] | str) -> None:
        """Build services of ``scheme`` with ``factory`` (replacing any earlier one)."""
        self._factories[scheme] = factory

    @property
    def schemes(self) -> list[str]:
        """The registered schemes, sorted."""
        return sorted(self._factories)

    def from_url(self, url: str) -> T:
        """Build the service ``url`` names; raises :class:`InvalidURLError`."""
        parsed = ServiceURL.parse(url)
        factory = self._factories.get(parsed.scheme)
        if factory is None:
            raise InvalidURLError(
                f"invalid {self.kind} URL {url!r}: unknown scheme {parsed.scheme!r} "
                f"(known: {', '.join(self.schemes)})"
            )
        if isinstance(factory, str):
            module, _, attr = factory.partition(":")
            target: object = importlib.import_module(module)
            for part in attr.split("."):
                target = getattr(target, part)
            factory = target  # type: ignore[assignment]
            self._factories[parsed.scheme] = factory
        assert callable(factory)
        return factory(parsed)
