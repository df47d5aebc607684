"""A read-through cache of blobs: a fast ``near`` service in front of a slower ``far`` one.

Composition only (it refers to two other services, so it has no URL): name
it ``type = "cache"`` in a composition file, or build it directly.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from typing_extensions import override

from tvix.castore.blobservice._readers import BLOCK, open_verified
from tvix.castore.blobservice.base import BlobReader, BlobService, BlobWriter, ChunkMeta
from tvix.castore.composition import BuildContext, ServiceConfig, setting
from tvix.castore.digest import B3Digest
from tvix.castore.errors import IntegrityError, StorageError

__all__ = ["CacheBlobService", "CacheBlobServiceConfig", "CacheConfig"]

log = logging.getLogger(__name__)

# Bytes per read while copying a blob from far into near: what bounds the
# memory of a cache fill, whatever the blob's size.
COPY_BLOCK = BLOCK


class CacheBlobService(BlobService):
    """Blobs read from ``near`` when it has them, else from ``far``, copying them into ``near``.

    Reads
        :meth:`open_read` asks ``near``; on a miss it asks ``far`` and, when
        ``far`` has the blob, first copies it into ``near`` (streamed in
        blocks of 1 MiB, so memory stays bounded for any size), hashing it on
        the way, and only then serves it from ``near``. Bytes from ``far``
        that do not hash to the digest asked for are not stored in ``near``
        and raise :class:`~tvix.castore.errors.IntegrityError`, before the
        caller has seen any of them. The price is latency: the first byte of
        a miss arrives once the whole blob is copied; in exchange, seeks and
        re-reads of a missed blob are served by ``near``. The same holds for
        a single chunk opened by its digest (it is cached as a blob of its own).
        :meth:`has` is ``near`` or ``far``; :meth:`chunks` is ``near``'s
        answer when it has the blob, else ``far``'s.
    Writes
        :meth:`open_write` writes to both: each block goes to ``far`` and to
        ``near``; at close ``far`` (the source of truth) is closed first, and
        ``near`` only once ``far`` has stored the blob, so ``near`` never holds
        a blob ``far`` lacks. A failure of either fails the write (``near``
        is aborted when ``far`` fails; when ``near`` fails after ``far``
        stored the blob, the blob is durable in ``far`` and a retry is harmless).
    Not cached
        Absence (a miss asks ``far`` again every time), :meth:`has` and
        :meth:`chunks` answers (they copy nothing into ``near``).

    Concurrent misses of one blob may each copy it; being content-addressed,
    it is stored once. The cache does not close ``near`` and ``far``: whoever
    built them does (a composition closes everything it built).
    """

    def __init__(self, near: BlobService, far: BlobService) -> None:
        self.near = near
        self.far = far

    @override
    async def has(self, digest: B3Digest) -> bool:
        return await self.near.has(digest) or await self.far.has(digest)

    @override
    async def open_read(self, digest: B3Digest) -> BlobReader | None:
        reader = await self.near.open_read(digest)
        if reader is not None:
            return reader
        if not await self._fill(digest):
            return None
        reader = await self.near.open_read(digest)
        if reader is None:
            raise StorageError(
                f"blob {digest.hex()}: the cache's near service lost it right after storing it"
            )
        return reader

    async def _fill(self, digest: B3Digest) -> bool:
        """Copy blob ``digest`` from far into near, verified; ``False`` if far lacks it."""
        src = await open_verified(self.far, digest, source="the cache's far service")
        if src is None:
            return False
        async with src:
            # The writer aborts (stores nothing) if anything below raises. The
            # reader checks the digest at the end, before close: wrong bytes must
            # never become visible in near, not even under their own (correct) digest.
            async with self.near.open_write() as dst:
                while block := await src.read(COPY_BLOCK):
                    await dst.write(block)
            stored = await dst.close()
        if stored != digest:
            raise IntegrityError(
                f"blob {digest.hex()}: the cache's near service stored it as {stored.hex()}"
            )
        log.debug("cache: copied blob %s from far into near", digest.hex())
        return True

    @override
    def open_write(self) -> BlobWriter:
        return _CacheBlobWriter(self.near.open_write(), self.far.open_write())

    @override
    async def chunks(self, digest: B3Digest) -> list[ChunkMeta] | None:
        chunks = await self.near.chunks(digest)
        if chunks is not None:
            return chunks
        return await self.far.chunks(digest)


class _CacheBlobWriter(BlobWriter):
    """Writes every block to far and near; closes far first (see :class:`CacheBlobService`)."""

    def __init__(self, near: BlobWriter, far: BlobWriter) -> None:
        self._near = near
        self._far = far
        self._digest: B3Digest | None = None
        self._aborted = False

    async def write(self, data: bytes | memoryview) -> None:
        if self._digest is not None or self._aborted:
            raise ValueError("write to a closed blob writer")
        await self._far.write(data)
        await self._near.write(data)

    async def close(self) -> B3Digest:
        if self._digest is None:
            if self._aborted:
                raise ValueError("close of an aborted blob writer")
            try:
                digest = await self._far.close()
            except BaseException:
                await self._near.abort()
                raise
            near_digest = await self._near.close()
            if near_digest != digest:
                raise StorageError(
                    f"cache: far stored the blob as {digest.hex()} but near as {near_digest.hex()}"
                )
            self._digest = digest
        return self._digest

    async def abort(self) -> None:
        if self._digest is None:
            self._aborted = True
            try:
                await self._far.abort()
            finally:
                await self._near.abort()


@dataclass(frozen=True)
class CacheConfig(ServiceConfig):
    """Type ``cache``: ``near`` and ``far``, names of services of the same kind.

    The base of the cache combinators' configs, one per kind.
    """

    near: str = setting("ref")
    far: str = setting("ref")


@dataclass(frozen=True)
class CacheBlobServiceConfig(CacheConfig):
    """A :class:`CacheBlobService` (see :class:`CacheConfig`)."""

    def build(self, ctx: BuildContext) -> CacheBlobService:
        """Near and far come from the composition."""
        return CacheBlobService(ctx.service(self.near), ctx.service(self.far))
