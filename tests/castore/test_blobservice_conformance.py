"""Every BlobService configuration that runs the shipped conformance suite, in one place.

A new backend or combinator is done when it has a class here. Backends that
need a real server take their fixture from ``tests/conftest.py`` and are
marked ``e2e``.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from tests.support.daemons import Memory, serve
from tests.support.grpc import ChunkedMemoryBlobService, running_server, unix_listen
from tvix.castore import blobservice
from tvix.castore.blobservice import BlobReader, BlobService, BlobWriter, MemoryBlobService
from tvix.castore.blobservice.base import ChunkMeta
from tvix.castore.blobservice.cache import CacheBlobService
from tvix.castore.blobservice.grpc import GRPCBlobService
from tvix.castore.blobservice.race import RaceBlobService
from tvix.castore.digest import B3Digest
from tvix.castore.directoryservice import MemoryDirectoryService
from tvix.castore.grpc import castore_servicers
from tvix.castore.testing import BlobServiceTests

# -- memory ----------------------------------------------------------------------------------------


class TestMemoryBlobService(BlobServiceTests):
    @pytest.fixture
    def blob_service(self) -> BlobService:
        return MemoryBlobService()


# -- objectstore (memory, file, small chunks) ------------------------------------------------------


class TestObjectStoreMemory(BlobServiceTests):
    @pytest.fixture
    async def blob_service(self) -> AsyncIterator[BlobService]:
        svc = blobservice.from_url("objectstore+memory://")
        yield svc
        await svc.close()


@pytest.mark.parametrize("zstd", ["true", "false"])
class TestObjectStoreFile(BlobServiceTests):
    @pytest.fixture
    async def blob_service(self, tmp_path: Path, zstd: str) -> AsyncIterator[BlobService]:
        svc = blobservice.from_url(f"objectstore+file://{tmp_path}/store?zstd={zstd}")
        yield svc
        await svc.close()


class TestObjectStoreSmallChunks(BlobServiceTests):
    """Many chunks per blob, so every read and seek crosses chunk boundaries."""

    @pytest.fixture
    async def blob_service(self) -> AsyncIterator[BlobService]:
        svc = blobservice.from_url("objectstore+memory://?avg_chunk_size=16384&zstd=false")
        yield svc
        await svc.close()


# -- objectstore+s3 against a real SeaweedFS -------------------------------------------------------


@pytest.mark.e2e
class TestS3BlobService(BlobServiceTests):
    @pytest.fixture
    async def blob_service(self, s3_url: str) -> AsyncIterator[BlobService]:
        svc = blobservice.from_url(s3_url)
        yield svc
        await svc.close()


# -- cache combinator ------------------------------------------------------------------------------


class _ReadThroughBlobs(BlobService):
    """Writes go to the cache's far only, reads through the cache: so the conformance
    suite exercises every read on the miss path (fill near from far, then serve)."""

    def __init__(self, cache: CacheBlobService) -> None:
        self.cache = cache

    async def has(self, digest: B3Digest) -> bool:
        return await self.cache.has(digest)

    async def open_read(self, digest: B3Digest) -> BlobReader | None:
        return await self.cache.open_read(digest)

    def open_write(self) -> BlobWriter:
        return self.cache.far.open_write()

    async def chunks(self, digest: B3Digest) -> list[ChunkMeta] | None:
        return await self.cache.chunks(digest)


class TestCacheBlobServiceMemory(BlobServiceTests):
    @pytest.fixture
    def blob_service(self) -> BlobService:
        return CacheBlobService(MemoryBlobService(), MemoryBlobService())


class TestCacheBlobServiceMemoryOverObjectStore(BlobServiceTests):
    @pytest.fixture
    async def blob_service(self, tmp_path: Path) -> AsyncIterator[BlobService]:
        far = blobservice.from_url(f"objectstore+file://{tmp_path}/blobs")
        yield CacheBlobService(MemoryBlobService(), far)
        await far.close()


class TestCacheBlobServiceObjectStoreOverMemory(BlobServiceTests):
    @pytest.fixture
    async def blob_service(self) -> AsyncIterator[BlobService]:
        near = blobservice.from_url("objectstore+memory://")
        yield CacheBlobService(near, MemoryBlobService())
        await near.close()


class TestCacheBlobServiceReadThrough(BlobServiceTests):
    """Every read a miss: near empty, far an object store with small chunks."""

    @pytest.fixture
    async def blob_service(self) -> AsyncIterator[BlobService]:
        far = blobservice.from_url("objectstore+memory://?avg_chunk_size=65536")
        yield _ReadThroughBlobs(CacheBlobService(MemoryBlobService(), far))
        await far.close()


# -- gRPC client against an in-process server ------------------------------------------------------


async def _blob_client(listen: str, backend: BlobService) -> AsyncIterator[BlobService]:
    async with running_server(listen, castore_servicers(backend, MemoryDirectoryService())) as srv:
        client = blobservice.from_url(srv.url)
        assert isinstance(client, GRPCBlobService)
        yield client
        await client.close()


class TestGRPCBlobServiceUnix(BlobServiceTests):
    @pytest.fixture
    async def blob_service(self, tmp_path: Path) -> AsyncIterator[BlobService]:
        async for client in _blob_client(unix_listen(tmp_path), MemoryBlobService()):
            yield client


class TestGRPCBlobServiceTCP(BlobServiceTests):
    @pytest.fixture
    async def blob_service(self) -> AsyncIterator[BlobService]:
        async for client in _blob_client("127.0.0.1:0", MemoryBlobService()):
            yield client


class TestGRPCBlobServiceChunked(BlobServiceTests):
    """The server lists chunks: the client reads and verifies chunk by chunk."""

    @pytest.fixture
    async def blob_service(self, tmp_path: Path) -> AsyncIterator[BlobService]:
        async for client in _blob_client(unix_listen(tmp_path), ChunkedMemoryBlobService()):
            yield client


class TestGRPCBlobServiceObjectStore(BlobServiceTests):
    """In front of the content-defined chunking backend, the daemon's default."""

    @pytest.fixture
    async def blob_service(self, tmp_path: Path) -> AsyncIterator[BlobService]:
        backend = blobservice.from_url("objectstore+memory://")
        async for client in _blob_client(unix_listen(tmp_path), backend):
            yield client
        await backend.close()


# -- race combinator -------------------------------------------------------------------------------


class TestRaceBlobServiceMemory(BlobServiceTests):
    @pytest.fixture
    def blob_service(self) -> BlobService:
        return RaceBlobService([MemoryBlobService(), MemoryBlobService()])


class TestRaceBlobServiceGRPC(BlobServiceTests):
    """The primary is a remote daemon (verifying client), the mirror local."""

    @pytest.fixture
    async def blob_service(self, tmp_path: Path) -> AsyncIterator[BlobService]:
        async with serve(f"unix://{tmp_path}/s.sock", Memory()) as (url, _):
            client = blobservice.from_url(url)
            yield RaceBlobService([client, MemoryBlobService()])
            await client.close()
