"""``StoreFs`` called directly, without a transport: what ``statfs`` counts, and when."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from typing_extensions import override

from tests.support.trees import make_tree
from tvix.castore.blobservice import MemoryBlobService
from tvix.castore.directoryservice.memory import MemoryDirectoryService
from tvix.fs.core import FRSIZE, StoreFs, StoreSize
from tvix.fs.requests import FsError, FsOptions
from tvix.store.importer import import_path
from tvix.store.pathinfo import PathInfo
from tvix.store.pathinfoservice import from_url as path_info_service
from tvix.store.pathinfoservice.base import PathInfoService
from tvix.store.pathinfoservice.memory import MemoryPathInfoService


class CountedListing(MemoryPathInfoService):
    """Counts its listings; fails them while ``broken``."""

    def __init__(self) -> None:
        super().__init__()
        self.listings = 0
        self.broken = False

    @override
    async def list(self) -> AsyncIterator[PathInfo]:
        self.listings += 1
        if self.broken:
            raise OSError("the database is gone")
        async for info in super().list():
            yield info


async def _import(tmp_path: Path, path_infos: PathInfoService, name: str, **sizes: int) -> int:
    blobs, directories = MemoryBlobService(), MemoryDirectoryService()
    tree = make_tree(tmp_path / name, **sizes)
    info = await import_path(blobs, directories, path_infos, tree)
    return info.nar_size


async def test_statfs_counts_nar_bytes_and_store_paths(tmp_path: Path) -> None:
    path_infos = path_info_service("memory://")
    sizes = [
        await _import(tmp_path, path_infos, "a", big_size=300_000),
        await _import(tmp_path, path_infos, "b", big_size=5_000),
    ]
    fs = StoreFs(MemoryBlobService(), MemoryDirectoryService(), path_infos)
    size = await fs.statfs()
    assert size == StoreSize(sum(sizes), 2)
    assert size.blocks * FRSIZE >= sum(sizes) > (size.blocks - 1) * FRSIZE
    await fs.close()


async def test_statfs_counts_again_only_when_stale_and_in_the_background(
    tmp_path: Path,
) -> None:
    path_infos = CountedListing()
    first = await _import(tmp_path, path_infos, "a", big_size=1_000)
    fs = StoreFs(
        MemoryBlobService(), MemoryDirectoryService(), path_infos, FsOptions(statfs_interval=0.2)
    )
    assert await fs.statfs() == StoreSize(first, 1)
    second = await _import(tmp_path, path_infos, "b", big_size=2_000)
    for _ in range(20):  # fresh: no recount, however often asked
        assert await fs.statfs() == StoreSize(first, 1)
    assert path_infos.listings == 1
    await asyncio.sleep(0.3)
    # Stale: this answer is the last count; the recount runs behind it.
    assert await fs.statfs() == StoreSize(first, 1)
    await asyncio.sleep(0.05)
    assert await fs.statfs() == StoreSize(first + second, 2)
    assert path_infos.listings == 2

    # A recount that fails keeps the last count, and the next stale statfs tries again.
    path_infos.broken = True
    await asyncio.sleep(0.3)
    assert await fs.statfs() == StoreSize(first + second, 2)
    await asyncio.sleep(0.05)
    assert path_infos.listings == 3
    assert await fs.statfs() == StoreSize(first + second, 2)
    await fs.close()


async def test_a_first_count_that_fails_is_eio(tmp_path: Path) -> None:
    path_infos = CountedListing()
    path_infos.broken = True
    fs = StoreFs(MemoryBlobService(), MemoryDirectoryService(), path_infos)
    with pytest.raises(FsError):
        await fs.statfs()
    await fs.close()


async def test_statfs_of_a_service_that_cannot_list_is_zero() -> None:
    class Unlistable(MemoryPathInfoService):
        @property
        @override
        def supports_list(self) -> bool:
            return False

    fs = StoreFs(MemoryBlobService(), MemoryDirectoryService(), Unlistable())
    assert await fs.statfs() == StoreSize(0, 0)
    await fs.close()
