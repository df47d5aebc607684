"""The cache combinators of castore: read-through, trust (their conformance runs are in the
*_conformance modules)."""

from __future__ import annotations

import io
from collections.abc import AsyncIterator

import pytest

from tvix.castore import blobservice
from tvix.castore.blobservice import (
    BlobReader,
    BlobWriter,
    BytesBlobReader,
    MemoryBlobService,
    read_all,
    write_all,
)
from tvix.castore.blobservice.cache import COPY_BLOCK, CacheBlobService
from tvix.castore.digest import B3Digest
from tvix.castore.directory import Directory
from tvix.castore.directoryservice import (
    DirectoryService,
    MemoryDirectoryService,
)
from tvix.castore.directoryservice.cache import CacheDirectoryService
from tvix.castore.directoryservice.graph import verified_closure
from tvix.castore.errors import IntegrityError, StorageError, ValidationError
from tvix.castore.nodes import DirectoryNode
from tvix.castore.testing.fixtures import (
    BLOB_A,
    BLOB_A_DIGEST,
    BLOB_B,
    BLOB_B_DIGEST,
    DIRECTORY_A,
    DIRECTORY_B,
    DIRECTORY_C,
    DIRECTORY_COMPLICATED,
    DIRECTORY_WITH_KEEP,
    b3,
    big_blob,
)

# -- helpers ---------------------------------------------------------------------------------


class _CorruptBlobs(MemoryBlobService):
    """A far that flips the first byte of every blob it returns."""

    async def open_read(self, digest: B3Digest) -> BlobReader | None:
        data = self._blobs.get(digest)
        if data is None:
            return None
        return BytesBlobReader(bytes([data[0] ^ 1]) + data[1:])


class _RecordingBlobs(MemoryBlobService):
    """Records the size of every read from its readers."""

    def __init__(self) -> None:
        super().__init__()
        self.reads: list[int] = []

    async def open_read(self, digest: B3Digest) -> BlobReader | None:
        inner = await super().open_read(digest)
        return None if inner is None else _RecordingReader(inner, self.reads)


class _RecordingReader(BlobReader):
    def __init__(self, inner: BlobReader, reads: list[int]) -> None:
        self._inner = inner
        self._reads = reads

    async def read(self, n: int = -1) -> bytes:
        self._reads.append(n)
        return await self._inner.read(n)

    async def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        return await self._inner.seek(offset, whence)

    def tell(self) -> int:
        return self._inner.tell()


class _FailingCloseWriter(BlobWriter):
    async def write(self, data: bytes | memoryview) -> None:
        pass

    async def close(self) -> B3Digest:
        raise StorageError("far is down")

    async def abort(self) -> None:
        pass


class _FailingWriteBlobs(MemoryBlobService):
    def open_write(self) -> BlobWriter:
        return _FailingCloseWriter()


# -- BlobService cache behaviour -------------------------------------------------------------


async def test_blob_read_from_far_fills_near() -> None:
    near, far = MemoryBlobService(), MemoryBlobService()
    cache = CacheBlobService(near, far)
    await write_all(far, BLOB_B)
    assert not await near.has(BLOB_B_DIGEST)
    assert await cache.has(BLOB_B_DIGEST)
    assert not await near.has(BLOB_B_DIGEST), "has() copies nothing"
    assert await read_all(cache, BLOB_B_DIGEST) == BLOB_B
    # Near alone now has it.
    assert await read_all(near, BLOB_B_DIGEST) == BLOB_B


async def test_blob_absent_everywhere() -> None:
    near, far = MemoryBlobService(), MemoryBlobService()
    cache = CacheBlobService(near, far)
    assert await cache.open_read(BLOB_A_DIGEST) is None
    assert await cache.chunks(BLOB_A_DIGEST) is None
    assert not await cache.has(BLOB_A_DIGEST)


async def test_blob_miss_is_served_from_near_after_copy_with_bounded_reads() -> None:
    near, far = MemoryBlobService(), _RecordingBlobs()
    cache = CacheBlobService(near, far)
    await write_all(far, BLOB_B)
    reader = await cache.open_read(BLOB_B_DIGEST)
    assert reader is not None
    async with reader:
        # Seeking works on a missed blob: it is served by near.
        await reader.seek(len(BLOB_B) - 10)
        assert await reader.read() == BLOB_B[-10:]
    # The copy read far in bounded blocks, never "all of it".
    assert far.reads
    assert all(0 < n <= COPY_BLOCK for n in far.reads), far.reads
    assert len(far.reads) >= len(BLOB_B) // COPY_BLOCK


async def test_blob_corrupt_far_not_copied() -> None:
    near, far = MemoryBlobService(), _CorruptBlobs()
    cache = CacheBlobService(near, far)
    await write_all(far, BLOB_B)
    with pytest.raises(IntegrityError, match=BLOB_B_DIGEST.hex()):
        await cache.open_read(BLOB_B_DIGEST)
    assert not await near.has(BLOB_B_DIGEST)
    # Not even under the digest of the wrong bytes.
    assert not await near.has(b3(bytes([BLOB_B[0] ^ 1]) + BLOB_B[1:]))
    assert not near._blobs


async def test_blob_writes_land_in_both() -> None:
    near, far = MemoryBlobService(), MemoryBlobService()
    cache = CacheBlobService(near, far)
    assert await write_all(cache, BLOB_B) == BLOB_B_DIGEST
    assert await read_all(near, BLOB_B_DIGEST) == BLOB_B
    assert await read_all(far, BLOB_B_DIGEST) == BLOB_B


async def test_blob_failing_far_write_leaves_near_empty() -> None:
    near = MemoryBlobService()
    cache = CacheBlobService(near, _FailingWriteBlobs())
    with pytest.raises(StorageError, match="far is down"):
        await write_all(cache, BLOB_A)
    assert not await near.has(BLOB_A_DIGEST)


async def test_blob_chunks_from_far_and_chunk_reads_fill_near() -> None:
    near = MemoryBlobService()
    far = blobservice.from_url("objectstore+memory://?avg_chunk_size=65536")
    cache = CacheBlobService(near, far)
    data = big_blob(1 << 20, seed=5)
    await write_all(far, data)
    chunks = await cache.chunks(b3(data))
    assert chunks, "far stores it in several chunks"
    assert sum(c.size for c in chunks) == len(data)
    first = await read_all(cache, chunks[0].digest)
    assert first == data[: chunks[0].size]
    assert await near.has(chunks[0].digest)
    # Near now answers for the chunk (as a whole blob of its own).
    assert await cache.chunks(chunks[0].digest) == []
    await far.close()


# -- DirectoryService cache behaviour --------------------------------------------------------


async def _put_closure(svc: DirectoryService, *directories: Directory) -> B3Digest:
    async with svc.put_multiple_start() as putter:
        for d in directories:
            await putter.put(d)
    return await putter.close()


def _node(name: bytes, d: Directory) -> DirectoryNode:
    return DirectoryNode(name, d.digest, d.size)


# A DAG whose breadth-first order, reversed, is not leaves first: X is a child
# of the root (met at depth 1) and also of Y's child Z (depth 2), so reversed
# BFS (Z, Y, X, root) would send Z before X.
_X = DIRECTORY_WITH_KEEP
_Z = Directory(directories=[_node(b"x", _X)])
_Y = Directory(directories=[_node(b"z", _Z)])
_DAG_ROOT = Directory(directories=[_node(b"a", _X), _node(b"b", _Y)])


def test_verified_closure_orders_a_dag_leaves_first() -> None:
    bfs, leaves_first = verified_closure(_DAG_ROOT.digest, [_DAG_ROOT, _X, _Y, _Z])
    assert bfs == [_DAG_ROOT, _X, _Y, _Z]
    assert list(reversed(bfs)) != leaves_first
    position = {d.digest: i for i, d in enumerate(leaves_first)}
    assert len(position) == 4
    for d in leaves_first:
        for child in d.directories:
            assert position[child.digest] < position[d.digest]


def test_verified_closure_deep_chain() -> None:
    chain = [DIRECTORY_A]
    for i in range(5000):
        chain.append(Directory(directories=[_node(b"d%d" % i, chain[-1])]))
    bfs, leaves_first = verified_closure(chain[-1].digest, list(reversed(chain)))
    assert leaves_first == chain
    assert bfs == list(reversed(chain))


async def test_directory_read_from_far_fills_near_with_a_dag() -> None:
    near, far = MemoryDirectoryService(), MemoryDirectoryService()
    cache = CacheDirectoryService(near, far)
    await _put_closure(far, _X, _Z, _Y, _DAG_ROOT)
    assert await cache.get(_DAG_ROOT.digest) == _DAG_ROOT
    # Near alone now has the whole closure.
    got = [d async for d in near.get_recursive(_DAG_ROOT.digest)]
    assert got == [_DAG_ROOT, _X, _Y, _Z]


async def test_directory_get_recursive_miss_yields_bfs_and_fills_near() -> None:
    near, far = MemoryDirectoryService(), MemoryDirectoryService()
    cache = CacheDirectoryService(near, far)
    await _put_closure(far, DIRECTORY_WITH_KEEP, DIRECTORY_C, DIRECTORY_COMPLICATED)
    got = [d async for d in cache.get_recursive(DIRECTORY_COMPLICATED.digest)]
    assert got == [DIRECTORY_COMPLICATED, DIRECTORY_C, DIRECTORY_WITH_KEEP]
    assert await near.get(DIRECTORY_C.digest) == DIRECTORY_C


class _LyingDirectories(MemoryDirectoryService):
    """A far that tampers with the closures it returns."""

    def __init__(self, how: str) -> None:
        super().__init__()
        self.how = how

    async def get_recursive(self, root: B3Digest) -> AsyncIterator[Directory]:
        honest = [d async for d in super().get_recursive(root)]
        if self.how == "wrong-root":
            honest[0] = DIRECTORY_B
        elif self.how == "missing-child":
            honest.pop()
        elif self.how == "extra":
            honest.append(DIRECTORY_A)
        elif self.how == "wrong-child":
            honest[-1] = DIRECTORY_A
        for d in honest:
            yield d


@pytest.mark.parametrize(
    ("how", "message"),
    [
        ("wrong-root", "returned"),
        ("missing-child", "did not return"),
        ("extra", "not below it"),
        ("wrong-child", "did not return"),
    ],
)
async def test_directory_corrupt_far_not_copied(how: str, message: str) -> None:
    near, far = MemoryDirectoryService(), _LyingDirectories(how)
    cache = CacheDirectoryService(near, far)
    await _put_closure(far, DIRECTORY_WITH_KEEP, DIRECTORY_C, DIRECTORY_COMPLICATED)
    with pytest.raises(IntegrityError, match=message):
        await cache.get(DIRECTORY_COMPLICATED.digest)
    with pytest.raises(IntegrityError, match=message):
        [d async for d in cache.get_recursive(DIRECTORY_COMPLICATED.digest)]
    assert not near._directories


async def test_directory_writes_land_in_both() -> None:
    near, far = MemoryDirectoryService(), MemoryDirectoryService()
    cache = CacheDirectoryService(near, far)
    await _put_closure(cache, DIRECTORY_WITH_KEEP, DIRECTORY_C, DIRECTORY_COMPLICATED)
    for svc in (near, far):
        got = [d async for d in svc.get_recursive(DIRECTORY_COMPLICATED.digest)]
        assert got == [DIRECTORY_COMPLICATED, DIRECTORY_C, DIRECTORY_WITH_KEEP]


async def test_directory_put_referring_to_far_only_child() -> None:
    near, far = MemoryDirectoryService(), MemoryDirectoryService()
    cache = CacheDirectoryService(near, far)
    await far.put(DIRECTORY_A)
    # near lacks the child: far takes it, near is left out without failing the put.
    assert await cache.put(DIRECTORY_B) == DIRECTORY_B.digest
    assert await far.get(DIRECTORY_B.digest) == DIRECTORY_B
    assert await near.get(DIRECTORY_B.digest) is None
    # A read fills near with the whole closure.
    assert await cache.get(DIRECTORY_B.digest) == DIRECTORY_B
    assert await near.get(DIRECTORY_A.digest) == DIRECTORY_A


async def test_directory_invalid_put_stored_nowhere() -> None:
    near, far = MemoryDirectoryService(), MemoryDirectoryService()
    cache = CacheDirectoryService(near, far)
    with pytest.raises(ValidationError, match="not stored"):
        await cache.put(DIRECTORY_B)
    assert not near._directories
    assert not far._directories
