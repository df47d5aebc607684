"""Every PathInfoService configuration that runs the shipped conformance suite, in one place.

A new backend or combinator is done when it has a class here. Backends that
need a real server take their fixture from ``tests/conftest.py`` and are
marked ``e2e``. (The read-only ``nix+http`` backend cannot run the suite yet:
it puts; see tests/store/test_nix_http_pathinfoservice.py.)
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from tests.support.daemons import Memory, serve
from tests.support.services import Unlistable
from tvix.castore.blobservice import write_all
from tvix.castore.testing.fixtures import BLOB_A, DIRECTORY_WITH_KEEP
from tvix.nixcompat.signing import SigningKey
from tvix.store import pathinfoservice
from tvix.store.pathinfo import PathInfo
from tvix.store.pathinfoservice import MemoryPathInfoService, PathInfoService
from tvix.store.pathinfoservice.cache import CachePathInfoService
from tvix.store.pathinfoservice.lru import LRUPathInfoService
from tvix.store.pathinfoservice.race import RacePathInfoService
from tvix.store.pathinfoservice.signing import SigningPathInfoService
from tvix.store.pathinfoservice.sqlite import SQLitePathInfoService
from tvix.store.pathinfoservice.trust import TrustedPathInfoService
from tvix.store.testing import PathInfoServiceTests

# -- keys ------------------------------------------------------------------------------------------


KEY = SigningKey.generate("cache.example.org-1")
TRUSTED = SigningKey.generate("trusted.example.org-1")


# -- memory ----------------------------------------------------------------------------------------


class TestMemoryPathInfoService(PathInfoServiceTests):
    @pytest.fixture
    def path_info_service(self) -> PathInfoService:
        return MemoryPathInfoService()


# -- sqlite (file, in memory) ----------------------------------------------------------------------


class TestSQLitePathInfoService(PathInfoServiceTests):
    @pytest.fixture
    async def path_info_service(self, tmp_path: Path) -> AsyncIterator[PathInfoService]:
        svc = pathinfoservice.from_url(f"sqlite://{tmp_path}/pathinfo.sqlite")
        yield svc
        await svc.close()


class TestInMemorySQLitePathInfoService(PathInfoServiceTests):
    @pytest.fixture
    async def path_info_service(self) -> AsyncIterator[PathInfoService]:
        svc = pathinfoservice.from_url("sqlite://")
        yield svc
        await svc.close()


# -- postgresql against a real server --------------------------------------------------------------


@pytest.mark.e2e
class TestPostgresPathInfoService(PathInfoServiceTests):
    @pytest.fixture
    async def path_info_service(self, pg_url: str) -> AsyncIterator[PathInfoService]:
        svc = pathinfoservice.from_url(pg_url)
        yield svc
        await svc.close()


# -- gRPC client against an in-process server ------------------------------------------------------


class TestGRPCPathInfoService(PathInfoServiceTests):
    @pytest.fixture
    async def path_info_service(self, tmp_path: Path) -> AsyncIterator[PathInfoService]:
        memory = Memory()
        # The fixtures' root nodes refer to these: the server refuses dangling roots.
        await write_all(memory.blobs, BLOB_A)
        await memory.dirs.put(DIRECTORY_WITH_KEEP)
        async with serve(f"unix://{tmp_path}/store.sock", memory) as (url, _):
            svc = pathinfoservice.from_url(url)
            yield svc
            await svc.close()


# -- cache and LRU ---------------------------------------------------------------------------------


class _ReadThrough(PathInfoService):
    """Puts go to the cache's far only, gets through the cache: every get is a miss first."""

    def __init__(self, cache: CachePathInfoService) -> None:
        self.cache = cache

    async def get(self, digest: bytes) -> PathInfo | None:
        return await self.cache.get(digest)

    async def put(self, info: PathInfo) -> PathInfo:
        return await self.cache.far.put(info)

    def list(self) -> AsyncIterator[PathInfo]:
        return self.cache.list()


class TestCachePathInfoServiceMemory(PathInfoServiceTests):
    @pytest.fixture
    def path_info_service(self) -> PathInfoService:
        return CachePathInfoService(MemoryPathInfoService(), MemoryPathInfoService())


class TestCachePathInfoServiceLRUOverSQLite(PathInfoServiceTests):
    @pytest.fixture
    async def path_info_service(self, tmp_path: Path) -> AsyncIterator[PathInfoService]:
        far = SQLitePathInfoService(str(tmp_path / "pathinfo.sqlite"))
        yield CachePathInfoService(LRUPathInfoService(4), far)
        await far.close()


class TestCachePathInfoServiceReadThrough(PathInfoServiceTests):
    @pytest.fixture
    async def path_info_service(self) -> AsyncIterator[PathInfoService]:
        far = SQLitePathInfoService(":memory:")
        yield _ReadThrough(CachePathInfoService(MemoryPathInfoService(), far))
        await far.close()


class TestCachePathInfoServiceUnlistableFar(PathInfoServiceTests):
    @pytest.fixture
    def path_info_service(self) -> PathInfoService:
        return CachePathInfoService(MemoryPathInfoService(), Unlistable())


class TestLRUPathInfoService(PathInfoServiceTests):
    @pytest.fixture
    def path_info_service(self) -> PathInfoService:
        return LRUPathInfoService(100)


# -- signing and trusted ---------------------------------------------------------------------------


class TestSigningPathInfoService(PathInfoServiceTests):
    @pytest.fixture
    def path_info_service(self) -> PathInfoService:
        return SigningPathInfoService(MemoryPathInfoService(), KEY)


class TestSigningOverCache(PathInfoServiceTests):
    @pytest.fixture
    async def path_info_service(self) -> AsyncIterator[PathInfoService]:
        far = SQLitePathInfoService(":memory:")
        yield SigningPathInfoService(CachePathInfoService(LRUPathInfoService(3), far), KEY)
        await far.close()


class TestTrustedPathInfoService(PathInfoServiceTests):
    """What is put through a signing service with a trusted key reads back."""

    @pytest.fixture
    def path_info_service(self) -> PathInfoService:
        signed = SigningPathInfoService(MemoryPathInfoService(), TRUSTED)
        return TrustedPathInfoService(signed, [TRUSTED.to_public()])


# -- race combinator -------------------------------------------------------------------------------


class TestRacePathInfoService(PathInfoServiceTests):
    @pytest.fixture
    def path_info_service(self) -> PathInfoService:
        return RacePathInfoService([MemoryPathInfoService(), MemoryPathInfoService()])
