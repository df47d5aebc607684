"""Small helpers on top of the BlobService interface."""

from __future__ import annotations

from collections.abc import Callable

from tvix.castore.blobservice._readers import BLOCK, open_verified
from tvix.castore.blobservice.base import BlobService
from tvix.castore.digest import B3Digest

__all__ = ["blob_size_matches", "copy_blob", "read_all", "write_all"]

COPY_BLOCK = BLOCK


async def read_all(service: BlobService, digest: B3Digest) -> bytes | None:
    """The whole blob in memory, or ``None`` when absent. Only for blobs known to be small."""
    reader = await service.open_read(digest)
    if reader is None:
        return None
    async with reader:
        return await reader.read()


async def write_all(service: BlobService, data: bytes) -> B3Digest:
    """Store ``data`` as a blob and return its digest."""
    async with service.open_write() as writer:
        await writer.write(data)
    return await writer.close()


async def copy_blob(
    src: BlobService,
    dst: BlobService,
    digest: B3Digest,
    progress: Callable[[int], None] | None = None,
) -> bool:
    """Stream blob ``digest`` from ``src`` into ``dst``; ``False`` if ``src`` lacks it.

    Raises :class:`~tvix.castore.errors.IntegrityError` (and stores nothing)
    if the bytes ``src`` returned do not hash to ``digest``. ``progress`` is
    called with the size of each piece written, as it is.
    """
    reader = await open_verified(src, digest, source="source")
    if reader is None:
        return False
    # The reader raises at the end, inside the writer's block: the writer aborts.
    async with reader, dst.open_write() as writer:
        while chunk := await reader.read(COPY_BLOCK):
            await writer.write(chunk)
            if progress is not None:
                progress(len(chunk))
    return True


async def blob_size_matches(service: BlobService, digest: B3Digest, size: int) -> bool | None:
    """Whether blob ``digest`` has ``size`` bytes; ``None`` when it is not stored.

    A blob stored in chunks answers from its chunk list; otherwise its bytes
    are counted, reading at most ``size + 1`` of them.
    """
    chunks = await service.chunks(digest)
    if chunks is None:
        return None
    if chunks:
        return sum(c.size for c in chunks) == size
    reader = await service.open_read(digest)
    if reader is None:
        return None
    got = 0
    async with reader:
        while got <= size and (part := await reader.read(min(COPY_BLOCK, size + 1 - got))):
            got += len(part)
    return got == size
