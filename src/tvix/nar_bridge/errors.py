"""The exceptions of :mod:`tvix.nar_bridge` and the one place that maps errors to HTTP statuses.

::

    HTTPError              a request is answered with ``status`` and a one-line message
    ├── BadRequest         400: malformed request, NAR, narinfo, or a hash/size mismatch
    ├── Unauthorized       401: uploads need credentials
    ├── Forbidden          403: uploads are disabled
    ├── NotFound           404
    ├── Conflict           409: a narinfo whose NAR was not uploaded
    ├── PayloadTooLarge    413
    ├── RangeNotSatisfiable 416
    └── UnsupportedMediaType 415: a compression nar-bridge cannot decode

:func:`status_for` also maps the errors of the layers below: invalid input
(nixcompat errors, castore/store validation errors, NAR hash or size
mismatches) is the client's fault (400); a failing or damaged store is ours
(500).
"""

from __future__ import annotations

from tvix.castore.errors import CastoreError, IntegrityError, StorageError, ValidationError
from tvix.nixcompat.errors import NixCompatError
from tvix.store.errors import StoreError

__all__ = [
    "BadRequest",
    "Conflict",
    "Forbidden",
    "HTTPError",
    "NotFound",
    "PayloadTooLarge",
    "RangeNotSatisfiable",
    "Unauthorized",
    "UnsupportedMediaType",
    "is_unexpected",
    "status_for",
]


class HTTPError(Exception):
    """Answer the request with :attr:`status` and the message as a one-line text body."""

    status = 500

    def __init__(self, message: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.headers = headers or {}


class BadRequest(HTTPError):
    """400 Bad Request."""

    status = 400


class Unauthorized(HTTPError):
    """401 Unauthorized."""

    status = 401


class Forbidden(HTTPError):
    """403 Forbidden."""

    status = 403


class NotFound(HTTPError):
    """404 Not Found."""

    status = 404


class Conflict(HTTPError):
    """409 Conflict."""

    status = 409


class PayloadTooLarge(HTTPError):
    """413 Payload Too Large."""

    status = 413


class UnsupportedMediaType(HTTPError):
    """415 Unsupported Media Type."""

    status = 415


class RangeNotSatisfiable(HTTPError):
    """416 Range Not Satisfiable."""

    status = 416


def status_for(exc: BaseException) -> tuple[int, str]:
    """The HTTP status and one-line message for ``exc``, raised while handling a request."""
    if isinstance(exc, HTTPError):
        return exc.status, str(exc)
    # Validation first: NarMismatchError and InvalidPathInfoError are StoreErrors
    # *and* ValidationErrors; they say the client sent something wrong.
    if isinstance(exc, ValidationError | NixCompatError):
        return 400, str(exc)
    if isinstance(exc, IntegrityError):
        return 500, f"store data is damaged: {exc}"
    if isinstance(exc, StorageError):
        return 500, f"store error: {exc}"
    return 500, "internal error"


def is_unexpected(exc: BaseException) -> bool:
    """Whether ``exc`` is none of the failures the layers document (a bug: log its traceback)."""
    return not isinstance(exc, HTTPError | CastoreError | StoreError | NixCompatError)
