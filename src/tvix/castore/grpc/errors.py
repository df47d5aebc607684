"""The one place where castore errors and gRPC status codes are translated, both ways.

Server side (a servicer answering a call):

=========================================  =====================
:class:`~tvix.castore.errors.ValidationError`  ``INVALID_ARGUMENT`` (also
                                           :class:`InvalidURLError` and
                                           digests of the wrong length)
:class:`~tvix.castore.errors.IntegrityError`   ``DATA_LOSS``
:class:`~tvix.castore.errors.StorageError`     ``INTERNAL``
=========================================  =====================

The status details carry the exception's message, so a client can pass it on.
Absence is not an error here either: servicers answer ``NOT_FOUND`` themselves.

Client side (a call that failed), the reverse: ``INVALID_ARGUMENT`` becomes a
:class:`ValidationError` with the server's message, ``DATA_LOSS`` an
:class:`IntegrityError`, everything else a :class:`StorageError` naming the
remote's address and the status.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import grpc

from tvix.castore.digest import B3Digest
from tvix.castore.errors import (
    CastoreError,
    IntegrityError,
    StorageError,
    ValidationError,
)

__all__ = ["digest_of", "error_from_rpc", "status_of", "translate_errors"]


def status_of(exc: CastoreError) -> tuple[grpc.StatusCode, str]:
    """The status code and details a server answers for ``exc``."""
    if isinstance(exc, ValidationError):
        return grpc.StatusCode.INVALID_ARGUMENT, str(exc)
    if isinstance(exc, IntegrityError):
        return grpc.StatusCode.DATA_LOSS, f"stored data is damaged: {exc}"
    if isinstance(exc, StorageError):
        return grpc.StatusCode.INTERNAL, f"storage backend failed: {exc}"
    return grpc.StatusCode.INTERNAL, f"{type(exc).__name__}: {exc}"


@asynccontextmanager
async def translate_errors(context: grpc.aio.ServicerContext[Any, Any]) -> AsyncIterator[None]:
    """Turn a :class:`CastoreError` raised in the block into the call's status.

    ``context.abort`` raises :class:`grpc.aio.AbortError`, which is not a
    ``CastoreError``, so an abort inside the block passes through untouched;
    so do cancellation and unexpected exceptions (grpc reports those as
    ``UNKNOWN`` and logs them: they are bugs, not conditions to translate).
    """
    try:
        yield
    except CastoreError as e:
        code, details = status_of(e)
        await context.abort(code, details)


def digest_of(raw: bytes, what: str = "digest") -> B3Digest:
    """``raw`` as a digest; :class:`ValidationError` (→ ``INVALID_ARGUMENT``) otherwise."""
    try:
        return B3Digest(raw)
    except ValidationError as e:
        raise ValidationError(f"invalid {what}: {e}") from None


def error_from_rpc(e: grpc.aio.AioRpcError, what: str, address: str) -> CastoreError:
    """The castore error for a failed call to ``address``; ``what`` says what was asked."""
    code = e.code()
    details = e.details() or ""
    if code == grpc.StatusCode.INVALID_ARGUMENT:
        # The server's own words, unchanged: they name the rule that was broken.
        return ValidationError(details or f"{what}: rejected by {address} as invalid")
    if code == grpc.StatusCode.DATA_LOSS:
        return IntegrityError(f"{what} at {address}: {details}")
    if code == grpc.StatusCode.UNAVAILABLE:
        # grpc's details end in the reason ("...: Connection refused"); the rest is noise.
        reason = details.rsplit(": ", 1)[-1].strip() or "no answer"
        return StorageError(
            f"{what}: the store daemon at {address} does not answer ({reason}): is a "
            "tvix-store daemon running there? (UNAVAILABLE)"
        )
    return StorageError(f"{what} at {address} failed: {code.name}: {details}")
