"""PathInfo records as the SQL backends store them, checked when read back.

The database plumbing itself is castore's (:mod:`tvix.castore.sql`); this
is the store layer's record kind: a PathInfo stored as its deterministic
protobuf encoding under the 20-byte digest of its store path.
"""

from __future__ import annotations

from tvix.castore.errors import IntegrityError
from tvix.store.errors import InvalidPathInfoError
from tvix.store.pathinfo import PathInfo
from tvix.store.proto import pathinfo_from_bytes, pathinfo_to_bytes

__all__ = ["decode_pathinfo", "encode_pathinfo"]


def encode_pathinfo(info: PathInfo) -> bytes:
    """What is stored for ``info`` (under ``info.store_path.digest``)."""
    return pathinfo_to_bytes(info)


def decode_pathinfo(digest: bytes, data: bytes) -> PathInfo:
    """The PathInfo stored under ``digest``, checked (the row may be damaged or edited).

    Raises :class:`~tvix.castore.errors.IntegrityError` when ``data`` does
    not decode to a valid PathInfo, or to one of another store path.
    """
    try:
        info = pathinfo_from_bytes(data)
    except (InvalidPathInfoError, ValueError) as e:
        raise IntegrityError(f"stored PathInfo {digest.hex()} is damaged: {e}") from e
    if info.store_path.digest != digest:
        raise IntegrityError(f"stored PathInfo {digest.hex()} is for {info.store_path}")
    return info
