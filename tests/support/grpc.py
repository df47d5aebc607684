"""Helpers for the gRPC tests (no tests here): servers over real sockets, a chunking backend."""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from pathlib import Path

from tvix.castore.blobservice import BlobReader, BlobService, BlobWriter, ChunkMeta
from tvix.castore.blobservice.memory import MemoryBlobService
from tvix.castore.digest import B3Digest
from tvix.castore.grpc import GRPCServer, Servicer, build_server
from tvix.castore.testing.fixtures import b3

CHUNK = 256 * 1024


@asynccontextmanager
async def running_server(listen: str, servicers: Sequence[Servicer]) -> AsyncIterator[GRPCServer]:
    """A started server on ``listen`` (a real socket), stopped on exit."""
    server = build_server(listen, servicers)
    await server.start()
    try:
        yield server
    finally:
        await server.stop(0)


def unix_listen(tmp_path: Path) -> str:
    return f"unix://{tmp_path}/castore.sock"


class ChunkedMemoryBlobService(BlobService):
    """Memory blobs that list fixed-size chunks, each readable by its digest.

    Makes the gRPC client take its chunked (verify per chunk) read path.
    Records writers opened and aborted, to see what a server did with a stream.
    """

    def __init__(self, chunk_size: int = CHUNK) -> None:
        self.inner = MemoryBlobService()
        self.chunk_size = chunk_size
        self.chunk_lists: dict[B3Digest, list[ChunkMeta]] = {}
        self.writers_opened = 0
        self.writers_aborted = 0

    async def has(self, digest: B3Digest) -> bool:
        return await self.inner.has(digest)

    async def open_read(self, digest: B3Digest) -> BlobReader | None:
        return await self.inner.open_read(digest)

    async def chunks(self, digest: B3Digest) -> list[ChunkMeta] | None:
        if not await self.inner.has(digest):
            return None
        return list(self.chunk_lists.get(digest, []))

    def open_write(self) -> BlobWriter:
        self.writers_opened += 1
        return _ChunkingWriter(self)


class _ChunkingWriter(BlobWriter):
    def __init__(self, service: ChunkedMemoryBlobService) -> None:
        self._service = service
        self._inner = service.inner.open_write()
        self._data = bytearray()

    async def write(self, data: bytes | memoryview) -> None:
        await self._inner.write(data)
        self._data += data

    async def close(self) -> B3Digest:
        digest = await self._inner.close()
        data, size = bytes(self._data), self._service.chunk_size
        if len(data) > size:
            metas = []
            for i in range(0, len(data), size):
                piece = data[i : i + size]
                self._service.inner._blobs.setdefault(b3(piece), piece)
                metas.append(ChunkMeta(b3(piece), len(piece)))
            self._service.chunk_lists[digest] = metas
        return digest

    async def abort(self) -> None:
        self._service.writers_aborted += 1
        await self._inner.abort()
