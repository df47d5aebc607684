"""ObjectStoreBlobService: what chunking promises (its conformance runs are in
test_blobservice_conformance.py)."""

from __future__ import annotations

import errno
import io
import os
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import zstandard
from obstore.store import MemoryStore

from tvix.castore.blobservice import from_url, read_all, write_all
from tvix.castore.blobservice.objectstore import ObjectStoreBlobService, ObjectStoreConfig, _local
from tvix.castore.blobservice.objectstore._codec import raw_zstd_frame
from tvix.castore.digest import B3Digest
from tvix.castore.errors import IntegrityError, InvalidURLError, StorageError
from tvix.castore.testing.fixtures import BLOB_A, BLOB_A_DIGEST, BLOB_B, BLOB_B_DIGEST, b3, big_blob
from tvix.castore.url import ServiceURL

MIB = 1 << 20


@pytest.fixture
async def file_service(tmp_path: Path) -> AsyncIterator[ObjectStoreBlobService]:
    svc = from_url(f"objectstore+file://{tmp_path}")
    assert isinstance(svc, ObjectStoreBlobService)
    yield svc
    await svc.close()


def _parse(url: str) -> ServiceURL:
    return ServiceURL.parse(url)


def _chunk_files(root: Path) -> list[Path]:
    return sorted(p for p in (root / "chunks").rglob("*") if p.is_file())


def _blob_files(root: Path) -> list[Path]:
    base = root / "blobs"
    return sorted(p for p in base.rglob("*") if p.is_file()) if base.exists() else []


async def test_large_blob_split_into_chunks(file_service: ObjectStoreBlobService) -> None:
    data = big_blob(6 * MIB, seed=11)
    digest = await write_all(file_service, data)
    chunks = await file_service.chunks(digest)
    assert chunks is not None
    assert len(chunks) >= 6  # 256 KiB average: about two dozen
    assert sum(c.size for c in chunks) == len(data)
    assert all(128 * 1024 <= c.size <= 512 * 1024 for c in chunks[:-1])
    offset = 0
    for c in chunks:
        assert c.digest == b3(data[offset : offset + c.size])
        offset += c.size


async def test_small_blob_is_one_chunk_without_record(
    file_service: ObjectStoreBlobService, tmp_path: Path
) -> None:
    await write_all(file_service, BLOB_A)
    assert await file_service.chunks(BLOB_A_DIGEST) == []
    h = BLOB_A_DIGEST.hex()
    assert _chunk_files(tmp_path) == [tmp_path / "chunks" / "b3" / h[:4] / h]
    assert _blob_files(tmp_path) == []


async def test_layout_is_upstream_tvix(
    file_service: ObjectStoreBlobService, tmp_path: Path
) -> None:
    """Blob records are StatBlobResponse protobufs, chunks zstd frames, keyed as upstream."""
    from tvix.castore.proto import pb

    await write_all(file_service, BLOB_B)
    h = BLOB_B_DIGEST.hex()
    record = pb.StatBlobResponse.FromString((tmp_path / "blobs" / "b3" / h[:4] / h).read_bytes())
    assert sum(c.size for c in record.chunks) == len(BLOB_B)
    first = record.chunks[0]
    path = tmp_path / "chunks" / "b3" / first.digest.hex()[:4] / first.digest.hex()
    assert zstandard.ZstdDecompressor().decompress(path.read_bytes()) == BLOB_B[: first.size]


async def test_identical_content_shares_chunks(
    file_service: ObjectStoreBlobService, tmp_path: Path
) -> None:
    shared = big_blob(4 * MIB, seed=5)
    one = await write_all(file_service, big_blob(MIB, seed=6) + shared)
    after_one = len(_chunk_files(tmp_path))
    two = await write_all(file_service, big_blob(MIB // 2, seed=7) + shared)
    after_two = len(_chunk_files(tmp_path))
    chunks_one = await file_service.chunks(one)
    chunks_two = await file_service.chunks(two)
    assert chunks_one is not None
    assert chunks_two is not None
    common = {c.digest for c in chunks_one} & {c.digest for c in chunks_two}
    # CDC resynchronises shortly into the shared part: most of its chunks are common.
    assert sum(c.size for c in chunks_two if c.digest in common) > 3 * MIB
    assert after_two - after_one == len({c.digest for c in chunks_two} - common)
    assert len(_blob_files(tmp_path)) == 2


async def test_same_chunk_twice_in_one_blob(file_service: ObjectStoreBlobService) -> None:
    part = big_blob(3 * MIB, seed=9)
    data = part + part
    digest = await write_all(file_service, data)
    assert await read_all(file_service, digest) == data


async def test_seek_fetches_only_touched_chunks(
    file_service: ObjectStoreBlobService, monkeypatch: pytest.MonkeyPatch
) -> None:
    data = big_blob(16 * MIB, seed=12)
    digest = await write_all(file_service, data)
    chunks = await file_service.chunks(digest)
    assert chunks is not None
    assert len(chunks) > 20
    fetched: list[B3Digest] = []
    original = ObjectStoreBlobService._read_chunk_sync

    def counting(self: ObjectStoreBlobService, d: B3Digest, size: int | None) -> bytes | None:
        fetched.append(d)
        return original(self, d, size)

    monkeypatch.setattr(ObjectStoreBlobService, "_read_chunk_sync", counting)
    reader = await file_service.open_read(digest)
    assert reader is not None
    fetched.clear()  # open_read probes for a single chunk under the blob digest
    async with reader:
        middle = 8 * MIB + 1234
        await reader.seek(middle)
        assert await reader.read(1000) == data[middle : middle + 1000]
    # The chunk holding the range, plus at most one prefetched after it.
    assert 1 <= len(fetched) <= 2
    chunk_digests = [c.digest for c in chunks]
    assert all(d in chunk_digests for d in fetched)


async def test_sequential_read_verifies_whole_blob(
    tmp_path: Path, file_service: ObjectStoreBlobService
) -> None:
    """A record that lists valid chunks of other content is caught reading front to back."""
    from tvix.castore.proto import pb

    digest = await write_all(file_service, BLOB_B)
    other = await write_all(file_service, big_blob(2 * MIB, seed=99))
    h, o = digest.hex(), other.hex()
    record_path = tmp_path / "blobs" / "b3" / h[:4] / h
    record_path.write_bytes((tmp_path / "blobs" / "b3" / o[:4] / o).read_bytes())
    assert pb.StatBlobResponse.FromString(record_path.read_bytes()).chunks
    with pytest.raises(IntegrityError, match=h):
        await read_all(file_service, digest)


@pytest.mark.parametrize("damage", ["flip", "truncate", "garbage"])
async def test_corrupted_chunk_raises_integrity_error(
    file_service: ObjectStoreBlobService, tmp_path: Path, damage: str
) -> None:
    digest = await write_all(file_service, BLOB_B)
    chunks = await file_service.chunks(digest)
    assert chunks is not None
    victim = chunks[1].digest.hex()
    path = tmp_path / "chunks" / "b3" / victim[:4] / victim
    raw = path.read_bytes()
    if damage == "flip":
        # A payload byte of the frame (the frame is uncompressible data in raw blocks).
        pos = len(raw) // 2
        raw = raw[:pos] + bytes([raw[pos] ^ 1]) + raw[pos + 1 :]
    elif damage == "truncate":
        raw = raw[: len(raw) // 2]
    else:
        raw = b"not a zstd frame"
    path.write_bytes(raw)
    reader = await file_service.open_read(digest)
    assert reader is not None
    async with reader:
        assert await reader.read(chunks[0].size) == BLOB_B[: chunks[0].size]
        with pytest.raises(IntegrityError, match=victim):
            await reader.read(10)
    # The read removed the damaged chunk: a writer of those bytes stores it again.
    assert not path.exists()
    assert not await file_service.has(chunks[1].digest)
    assert await write_all(file_service, BLOB_B) == digest
    assert await read_all(file_service, digest) == BLOB_B


async def test_corrupted_single_chunk_blob(
    file_service: ObjectStoreBlobService, tmp_path: Path
) -> None:
    await write_all(file_service, BLOB_A)
    h = BLOB_A_DIGEST.hex()
    path = tmp_path / "chunks" / "b3" / h[:4] / h
    path.write_bytes(zstandard.ZstdCompressor().compress(b"Hello World?"))
    with pytest.raises(IntegrityError, match="hash to"):
        await file_service.open_read(BLOB_A_DIGEST)


async def test_missing_chunk_is_storage_error(
    file_service: ObjectStoreBlobService, tmp_path: Path
) -> None:
    digest = await write_all(file_service, BLOB_B)
    chunks = await file_service.chunks(digest)
    assert chunks is not None
    h = chunks[-1].digest.hex()
    (tmp_path / "chunks" / "b3" / h[:4] / h).unlink()
    with pytest.raises(StorageError, match="missing"):
        await read_all(file_service, digest)


async def test_empty_record_is_integrity_error(
    file_service: ObjectStoreBlobService, tmp_path: Path
) -> None:
    """A record truncated to nothing (e.g. after a power loss) must not read as b''."""
    digest = await write_all(file_service, BLOB_B)
    h = digest.hex()
    (tmp_path / "blobs" / "b3" / h[:4] / h).write_bytes(b"")
    with pytest.raises(IntegrityError, match="damaged"):
        await file_service.open_read(digest)


async def test_aborted_writer_leaves_no_blob_record(
    file_service: ObjectStoreBlobService, tmp_path: Path
) -> None:
    data = big_blob(12 * MIB, seed=4)
    writer = file_service.open_write()
    for i in range(0, len(data), MIB):
        await writer.write(data[i : i + MIB])
    # Batches were cut and stored while writing ...
    assert _chunk_files(tmp_path)
    await writer.abort()
    # ... but no record names them, so the blob does not exist.
    assert _blob_files(tmp_path) == []
    assert not await file_service.has(b3(data))
    assert await file_service.open_read(b3(data)) is None
    with pytest.raises(ValueError, match="closed"):
        await writer.write(b"x")


async def test_reader_after_close_fails(file_service: ObjectStoreBlobService) -> None:
    digest = await write_all(file_service, BLOB_B)
    reader = await file_service.open_read(digest)
    assert reader is not None
    await reader.close()
    with pytest.raises(ValueError, match="closed"):
        await reader.read(1)


async def test_read_whole_and_seek_end(file_service: ObjectStoreBlobService) -> None:
    digest = await write_all(file_service, BLOB_B)
    reader = await file_service.open_read(digest)
    assert reader is not None
    async with reader:
        assert await reader.read() == BLOB_B
        assert await reader.seek(-10, io.SEEK_END) == len(BLOB_B) - 10
        assert await reader.read() == BLOB_B[-10:]


async def test_failed_put_is_storage_error(
    file_service: ObjectStoreBlobService, tmp_path: Path
) -> None:
    # A file where the chunk directories belong: every chunk put fails (even as root).
    (tmp_path / "chunks").write_bytes(b"")
    with pytest.raises(StorageError, match="writing chunks/b3/"):
        await write_all(file_service, BLOB_A)
    with pytest.raises(StorageError, match="writing chunks/b3/"):
        await write_all(file_service, BLOB_B)
    assert _blob_files(tmp_path) == []


def test_raw_zstd_frame_decodes() -> None:
    dctx = zstandard.ZstdDecompressor()
    for size in (0, 1, 128 * 1024 - 1, 128 * 1024, 128 * 1024 + 1, 3 * MIB + 5):
        data = big_blob(size, seed=size)
        frame = raw_zstd_frame(data)
        assert zstandard.frame_content_size(frame) == size
        assert dctx.decompress(frame) == data
        assert len(frame) - size < 64 + 3 * (size // (128 * 1024) + 1)


def test_memory_store_direct() -> None:
    svc = ObjectStoreBlobService(MemoryStore(), "some/prefix", zstd=False)
    assert svc.chunk_key(BLOB_A_DIGEST).startswith("some/prefix/chunks/b3/")


def test_invalid_url_creates_nothing(tmp_path: Path) -> None:
    with pytest.raises(InvalidURLError):
        from_url(f"objectstore+file://{tmp_path}/new?bogus=1")
    assert not (tmp_path / "new").exists()


def test_unregistered_flavour_via_class() -> None:
    with pytest.raises(InvalidURLError, match="unknown object store flavour 'ftp'"):
        ObjectStoreConfig.from_url(_parse("objectstore+ftp://host/dir"))


async def test_upstream_empty_blob_record_reads_empty(tmp_path: Path) -> None:
    """Upstream stores the empty blob as a record without chunks, and no chunk."""
    from tvix.castore.proto import pb
    from tvix.castore.testing.fixtures import EMPTY_BLOB_DIGEST

    h = EMPTY_BLOB_DIGEST.hex()
    path = tmp_path / "blobs" / "b3" / h[:4] / h
    path.parent.mkdir(parents=True)
    path.write_bytes(pb.StatBlobResponse().SerializeToString())
    svc = from_url(f"objectstore+file://{tmp_path}")
    try:
        assert await svc.has(EMPTY_BLOB_DIGEST)
        assert await read_all(svc, EMPTY_BLOB_DIGEST) == b""
    finally:
        await svc.close()


# -- staging files (issue 13, item 6) ------------------------------------------------------


def _all_files(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.is_file())


async def test_failed_write_leaves_no_staging_file(
    file_service: ObjectStoreBlobService, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The disk fills up while a chunk is being written.
    def full(fd: int, data: object) -> int:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(_local.os, "write", full)
    with pytest.raises(StorageError, match="No space left on device"):
        await write_all(file_service, BLOB_B)
    assert _all_files(tmp_path) == []


def _dead_pid() -> int:
    """A pid no process has (as a writer killed mid-write leaves in its staging files)."""
    pid = int(Path("/proc/sys/kernel/pid_max").read_text()) - 1
    while Path(f"/proc/{pid}").exists():
        pid -= 1
    return pid


async def test_stale_staging_files_are_swept_on_open(tmp_path: Path) -> None:
    staging = tmp_path / _local.STAGING
    staging.mkdir()
    live = 1  # another process, alive
    killed = staging / f"{_dead_pid()}.1.0"
    writing = staging / f"{live}.1.0"  # being written right now
    ancient = staging / f"{live}.1.1"  # no object takes an hour to write
    foreign = staging / "junk"  # not a writer's name at all: old enough is stale
    for f in (killed, writing, ancient, foreign):
        f.write_bytes(b"partial")
    hour_ago = time.time() - _local.STALE_AFTER - 60
    os.utime(ancient, (hour_ago, hour_ago))
    os.utime(foreign, (hour_ago, hour_ago))
    svc = from_url(f"objectstore+file://{tmp_path}")
    assert isinstance(svc, ObjectStoreBlobService)
    try:
        assert sorted(svc.staging_swept) == sorted(map(str, (killed, ancient, foreign)))
        assert sorted(staging.iterdir()) == [writing]
        # The store still works, staging included.
        digest = await write_all(svc, BLOB_B)
        assert await read_all(svc, digest) == BLOB_B
        assert sorted(staging.iterdir()) == [writing]
    finally:
        await svc.close()
