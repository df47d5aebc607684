"""``memory://``: blobs in a dict, for tests and ephemeral use."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import blake3
from typing_extensions import override

from tvix.castore.blobservice._readers import BytesBlobReader
from tvix.castore.blobservice.base import BlobReader, BlobService, BlobWriter
from tvix.castore.composition import BuildContext, EmptyConfig
from tvix.castore.digest import B3Digest

__all__ = ["MemoryBlobService", "MemoryBlobServiceConfig"]


class _MemoryBlobWriter(BlobWriter):
    def __init__(self, service: MemoryBlobService) -> None:
        self._service = service
        self._parts: list[bytes] = []
        self._hasher = blake3.blake3()
        self._digest: B3Digest | None = None
        self._aborted = False

    async def write(self, data: bytes | memoryview) -> None:
        if self._digest is not None or self._aborted:
            raise ValueError("write to a closed blob writer")
        # Keep bytes as they are (no copy); copy views, whose buffer the caller may reuse.
        if type(data) is not bytes:
            data = bytes(data)
        self._hasher.update(data)
        self._parts.append(data)

    async def close(self) -> B3Digest:
        if self._digest is None:
            if self._aborted:
                raise ValueError("close of an aborted blob writer")
            self._digest = B3Digest(self._hasher.digest())
            parts = self._parts
            data = parts[0] if len(parts) == 1 else b"".join(parts)
            self._service._blobs.setdefault(self._digest, data)
            self._parts = []
        return self._digest

    async def abort(self) -> None:
        if self._digest is None:
            self._aborted = True
            self._parts = []


class MemoryBlobService(BlobService):
    """Blobs held in a dict, whole. Lost when the process ends."""

    def __init__(self) -> None:
        self._blobs: dict[B3Digest, bytes] = {}

    @override
    async def has(self, digest: B3Digest) -> bool:
        return digest in self._blobs

    @override
    async def open_read(self, digest: B3Digest) -> BlobReader | None:
        data = self._blobs.get(digest)
        return None if data is None else BytesBlobReader(data)

    @override
    def open_write(self) -> BlobWriter:
        return _MemoryBlobWriter(self)

    @override
    async def read_many(self, digests: Sequence[B3Digest]) -> list[bytes | None]:
        return [self._blobs.get(d) for d in digests]


@dataclass(frozen=True)
class MemoryBlobServiceConfig(EmptyConfig):
    """``memory://`` (type ``memory``): no settings."""

    def build(self, ctx: BuildContext) -> MemoryBlobService:
        """A new, empty service."""
        return MemoryBlobService()
