"""HTTP basic authentication for uploads (reads stay open).

Credentials come from a file of ``user:password`` lines (blank lines and
lines starting with ``#`` are ignored), the form a ``.htpasswd``-style list
takes without hashing: Nix sends them from its netrc file
(``--option netrc-file``) with every request to the cache.
"""

from __future__ import annotations

import base64
import binascii
import hmac
import os
from collections.abc import Mapping

__all__ = ["BasicAuth", "load_credentials"]


def load_credentials(path: str | os.PathLike[str]) -> dict[str, str]:
    """The ``user -> password`` pairs in the file at ``path``.

    Raises ``ValueError`` naming the line that is not ``user:password``, and
    ``OSError`` when the file cannot be read.
    """
    creds: dict[str, str] = {}
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, start=1):
            line = line.rstrip("\r\n")
            if not line.strip() or line.lstrip().startswith("#"):
                continue
            user, sep, password = line.partition(":")
            if not sep or not user or not password:
                raise ValueError(f"{os.fspath(path)} line {number}: expected user:password")
            creds[user] = password
    if not creds:
        raise ValueError(f"{os.fspath(path)}: no user:password line")
    return creds


class BasicAuth:
    """Checks an ``Authorization: Basic …`` header against known credentials."""

    realm = "nar-bridge uploads"

    def __init__(self, credentials: Mapping[str, str]) -> None:
        self._credentials = {u.encode(): p.encode() for u, p in credentials.items()}

    def check(self, header: str | None) -> str | None:
        """The user the header authenticates, or ``None`` (missing, malformed or wrong)."""
        if header is None:
            return None
        scheme, _, value = header.partition(" ")
        if scheme.lower() != "basic":
            return None
        try:
            decoded = base64.b64decode(value.strip(), validate=True)
        except (binascii.Error, ValueError):
            return None
        user, sep, password = decoded.partition(b":")
        expected = self._credentials.get(user)
        # Compare even for an unknown user, so timing does not tell which users exist.
        ok = hmac.compare_digest(password, expected if expected is not None else b"\0" * 32)
        if not sep or expected is None or not ok:
            return None
        return user.decode(errors="replace")
