"""Listings as the filesystem keeps them, and the one a walk reads next, fetched ahead."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from typing_extensions import override

from tests.support.trees import make_tree
from tvix.castore.blobservice import MemoryBlobService
from tvix.castore.digest import B3Digest
from tvix.castore.directory import Directory
from tvix.castore.directoryservice.memory import MemoryDirectoryService
from tvix.castore.errors import StorageError
from tvix.castore.nodes import DirectoryNode, FileNode
from tvix.fs.core import StoreFs
from tvix.fs.inodes import ROOT_INODE, EntryStat
from tvix.fs.listings import Listing, ListingCache
from tvix.store.importer import import_path
from tvix.store.pathinfoservice import from_url as path_info_service


class CountedDirectories(MemoryDirectoryService):
    """Records every Directory asked for; fails while ``broken``."""

    def __init__(self) -> None:
        super().__init__()
        self.asked: list[B3Digest] = []
        self.broken = False

    @override
    async def get(self, digest: B3Digest) -> Directory | None:
        self.asked.append(digest)
        if self.broken:
            raise StorageError("the directory service is gone")
        return await super().get(digest)


def test_next_directory_skips_files_and_ends() -> None:
    digest = B3Digest(bytes(32))
    a, c = DirectoryNode(b"a", digest, 0), DirectoryNode(b"c", digest, 0)
    listing = Listing((a, FileNode(b"b", B3Digest(bytes(range(32))), 1), c))
    assert listing.next_directory(b"") is a
    assert listing.next_directory(b"a") is c
    assert listing.next_directory(b"b") is c
    assert listing.next_directory(b"c") is None


async def test_a_prefetch_is_fetched_once_and_a_failed_one_retried() -> None:
    directories = CountedDirectories()
    digest = await directories.put(Directory(files=[FileNode(b"f", B3Digest(bytes(range(32))), 1)]))
    cache = ListingCache(directories)
    directories.broken = True
    cache.prefetch(digest)
    await asyncio.sleep(0.01)
    assert directories.asked == [digest]
    assert cache.cached(digest) is None
    with pytest.raises(StorageError):
        await cache.get(digest)  # asked again, and the failure reported
    directories.broken = False
    cache.prefetch(digest)
    cache.prefetch(digest)  # on its way already: not asked twice
    await asyncio.sleep(0.01)
    assert len(directories.asked) == 3
    listing = await cache.get(digest)
    assert [n.name for n in listing.entries] == [b"f"]
    assert len(directories.asked) == 3


async def test_reading_a_directory_fetches_the_one_a_walk_reads_next(tmp_path: Path) -> None:
    tree = make_tree(tmp_path / "tree", big_size=1000)
    blobs, directories = MemoryBlobService(), CountedDirectories()
    path_infos = path_info_service("memory://")
    info = await import_path(blobs, directories, path_infos, tree)
    fs = StoreFs(blobs, directories, path_infos)
    sent: list[tuple[bytes, int, EntryStat]] = []

    def add(name: bytes, ino: int, stat: EntryStat, next_offset: int) -> bool:
        sent.append((name, ino, stat))
        return True

    async def read(ino: int) -> list[B3Digest]:
        """Read directory ``ino``; the Directories fetched meanwhile (after the reply)."""
        directories.asked.clear()
        fh = await fs.opendir(ino)
        await fs.readdir(fh, 0, add)
        await fs.releasedir(fh)
        await asyncio.sleep(0.01)
        return directories.asked

    root = await fs.lookup(ROOT_INODE, info.store_path.base_name.encode())
    assert root is not None
    assert isinstance(info.node, DirectoryNode)
    top = Listing(tuple((await directories.get(info.node.digest) or Directory()).nodes()))
    empty, nested = top.by_name[b"emptydir"], top.by_name[b"nested"]
    assert isinstance(empty, DirectoryNode)
    assert isinstance(nested, DirectoryNode)
    # Its first subdirectory, "emptydir", is fetched ahead ...
    assert await read(root.ino) == [info.node.digest, empty.digest]
    # ... and, having no subdirectory, it has the next one beside it fetched.
    empty_ino = next(ino for name, ino, _ in sent if name == b"emptydir")
    assert await read(empty_ino) == [nested.digest]
    await fs.close()
