"""Castore records as SQL backends store them, checked when read back."""

from __future__ import annotations

import blake3

from tvix.castore.directory import Directory
from tvix.castore.errors import IntegrityError, ValidationError
from tvix.castore.proto import directory_from_bytes

__all__ = ["decode_directory"]


def decode_directory(digest: bytes, data: bytes) -> Directory:
    """A stored Directory, checked against its digest (the row may be damaged or edited).

    Raises :class:`~tvix.castore.errors.IntegrityError` when ``data`` is not
    the valid encoding of the Directory ``digest``.
    """
    if blake3.blake3(data).digest() != digest:
        raise IntegrityError(f"Directory {digest.hex()}: stored encoding does not match")
    try:
        return directory_from_bytes(data)
    except ValidationError as e:
        raise IntegrityError(f"Directory {digest.hex()}: stored encoding is invalid: {e}") from e
