"""Service URLs: parsing and strict option checking.

Every backend is built from a URL. A backend takes what it needs from a
:class:`ServiceURL` and rejects anything else (unknown query options, a host
or a path it has no use for) with :class:`InvalidURLError` naming it.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from urllib.parse import parse_qsl, quote, unquote, urlencode, urlsplit, urlunsplit

from tvix.castore.errors import InvalidURLError

__all__ = ["ServiceURL"]


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

    def with_params(self, extra: Mapping[str, object]) -> ServiceURL:
        """This URL with ``extra`` options added (booleans as ``true``/``false``).

        Raises :class:`InvalidURLError` for an option the URL already has.
        """
        if not extra:
            return self
        twice = sorted(set(extra) & set(self.params))
        if twice:
            raise InvalidURLError(
                f"invalid service URL {self.raw!r}: option(s) {', '.join(twice)} given both "
                "in the URL and as keys"
            )
        params = dict(self.params)
        for key, value in extra.items():
            params[key] = ("true" if value else "false") if isinstance(value, bool) else str(value)
        raw = urlunsplit((self.scheme, self.host, quote(self.path), urlencode(params), ""))
        return ServiceURL(raw, self.scheme, self.host, self.path, params)

    def bool_param(self, key: str, default: bool) -> bool:
        """A boolean option (``true``/``false``, ``1``/``0``), ``default`` when absent."""
        value = self.params.get(key)
        if value is None:
            return default
        if value in ("true", "1"):
            return True
        if value in ("false", "0"):
            return False
        raise InvalidURLError(f"invalid service URL {self.raw!r}: {key} must be true or false")

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
