"""Every DirectoryService configuration that runs the shipped conformance suite, in one place.

A new backend or combinator is done when it has a class here. Backends that
need a real server take their fixture from ``tests/conftest.py`` and are
marked ``e2e``.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from tests.support.grpc import running_server, unix_listen
from tvix.castore import directoryservice
from tvix.castore.blobservice import MemoryBlobService
from tvix.castore.digest import B3Digest
from tvix.castore.directory import Directory
from tvix.castore.directoryservice import (
    DirectoryPutter,
    DirectoryService,
    MemoryDirectoryService,
    SQLiteDirectoryService,
)
from tvix.castore.directoryservice.cache import CacheDirectoryService
from tvix.castore.directoryservice.grpc import GRPCDirectoryService
from tvix.castore.directoryservice.race import RaceDirectoryService
from tvix.castore.grpc import castore_servicers
from tvix.castore.testing import DirectoryServiceTests

# -- memory ----------------------------------------------------------------------------------------


class TestMemoryDirectoryService(DirectoryServiceTests):
    @pytest.fixture
    def directory_service(self) -> DirectoryService:
        return MemoryDirectoryService()


# -- sqlite (file, in memory) ----------------------------------------------------------------------


class TestSQLiteDirectoryServiceFile(DirectoryServiceTests):
    @pytest.fixture
    async def directory_service(self, tmp_path: Path) -> AsyncIterator[DirectoryService]:
        svc = directoryservice.from_url(f"sqlite://{tmp_path}/dirs.db")
        yield svc
        await svc.close()


class TestSQLiteDirectoryServiceMemory(DirectoryServiceTests):
    @pytest.fixture
    async def directory_service(self) -> AsyncIterator[DirectoryService]:
        svc = directoryservice.from_url("sqlite://")
        yield svc
        await svc.close()


# -- postgresql against a real server --------------------------------------------------------------


@pytest.mark.e2e
class TestPostgresDirectoryService(DirectoryServiceTests):
    @pytest.fixture
    async def directory_service(self, pg_url: str) -> AsyncIterator[DirectoryService]:
        svc = directoryservice.from_url(pg_url)
        yield svc
        await svc.close()


# -- cache combinator ------------------------------------------------------------------------------


class _ReadThroughDirectories(DirectoryService):
    """As :class:`_ReadThroughBlobs`, for Directories."""

    def __init__(self, cache: CacheDirectoryService) -> None:
        self.cache = cache

    async def get(self, digest: B3Digest) -> Directory | None:
        return await self.cache.get(digest)

    def get_recursive(self, root: B3Digest) -> AsyncIterator[Directory]:
        return self.cache.get_recursive(root)

    def put_multiple_start(self) -> DirectoryPutter:
        return self.cache.far.put_multiple_start()


class TestCacheDirectoryServiceMemory(DirectoryServiceTests):
    @pytest.fixture
    def directory_service(self) -> DirectoryService:
        return CacheDirectoryService(MemoryDirectoryService(), MemoryDirectoryService())


class TestCacheDirectoryServiceMemoryOverSQLite(DirectoryServiceTests):
    @pytest.fixture
    async def directory_service(self, tmp_path: Path) -> AsyncIterator[DirectoryService]:
        far = directoryservice.from_url(f"sqlite://{tmp_path}/dirs.sqlite")
        yield CacheDirectoryService(MemoryDirectoryService(), far)
        await far.close()


class TestCacheDirectoryServiceSQLiteOverMemory(DirectoryServiceTests):
    @pytest.fixture
    async def directory_service(self) -> AsyncIterator[DirectoryService]:
        near = SQLiteDirectoryService(":memory:")
        yield CacheDirectoryService(near, MemoryDirectoryService())
        await near.close()


class TestCacheDirectoryServiceReadThrough(DirectoryServiceTests):
    """Every read a miss: near empty, far SQLite."""

    @pytest.fixture
    async def directory_service(self) -> AsyncIterator[DirectoryService]:
        far = SQLiteDirectoryService(":memory:")
        yield _ReadThroughDirectories(CacheDirectoryService(MemoryDirectoryService(), far))
        await far.close()


# -- gRPC client against an in-process server ------------------------------------------------------


async def _directory_client(listen: str) -> AsyncIterator[DirectoryService]:
    servicers = castore_servicers(MemoryBlobService(), MemoryDirectoryService())
    async with running_server(listen, servicers) as srv:
        client = directoryservice.from_url(srv.url)
        assert isinstance(client, GRPCDirectoryService)
        yield client
        await client.close()


class TestGRPCDirectoryServiceUnix(DirectoryServiceTests):
    @pytest.fixture
    async def directory_service(self, tmp_path: Path) -> AsyncIterator[DirectoryService]:
        async for client in _directory_client(unix_listen(tmp_path)):
            yield client


class TestGRPCDirectoryServiceTCP(DirectoryServiceTests):
    @pytest.fixture
    async def directory_service(self) -> AsyncIterator[DirectoryService]:
        async for client in _directory_client("127.0.0.1:0"):
            yield client


# -- race combinator -------------------------------------------------------------------------------


class TestRaceDirectoryService(DirectoryServiceTests):
    @pytest.fixture
    def directory_service(self) -> DirectoryService:
        return RaceDirectoryService([MemoryDirectoryService(), MemoryDirectoryService()])
