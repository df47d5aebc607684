"""The blob and directory race combinators: first verified answer wins, failures skipped,
losers cancelled. (Their conformance runs are in the *_conformance modules; the PathInfo
race and composition in tests/store/test_race_pathinfoservice.py.)"""

from __future__ import annotations

import asyncio
import io
import logging
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from tests.support.daemons import Memory, serve
from tvix.castore import blobservice
from tvix.castore.blobservice import (
    BlobReader,
    BlobService,
    BlobWriter,
    BytesBlobReader,
    MemoryBlobService,
    read_all,
    write_all,
)
from tvix.castore.blobservice.race import RaceBlobService
from tvix.castore.digest import B3Digest
from tvix.castore.directory import Directory
from tvix.castore.directoryservice import (
    DirectoryPutter,
    MemoryDirectoryService,
)
from tvix.castore.directoryservice.race import RaceDirectoryService
from tvix.castore.errors import IntegrityError, StorageError
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
    big_blob,
)

# -- test sources ----------------------------------------------------------------------------


class _Tampered(MemoryBlobService):
    """Serves every blob with one byte flipped (a source that does not verify)."""

    async def open_read(self, digest: B3Digest) -> BlobReader | None:
        data = self._blobs.get(digest)
        if data is None:
            return None
        bad = bytearray(data)
        bad[len(bad) // 2] ^= 1
        return BytesBlobReader(bytes(bad))


class _Late(BlobService):
    """``inner``, answering after ``delay``; counts reads cancelled while waiting."""

    def __init__(self, inner: BlobService, delay: float) -> None:
        self.inner = inner
        self.delay = delay
        self.cancelled = 0

    async def _wait(self) -> None:
        try:
            await asyncio.sleep(self.delay)
        except asyncio.CancelledError:
            self.cancelled += 1
            raise

    async def has(self, digest: B3Digest) -> bool:
        await self._wait()
        return await self.inner.has(digest)

    async def open_read(self, digest: B3Digest) -> BlobReader | None:
        await self._wait()
        return await self.inner.open_read(digest)

    def open_write(self) -> BlobWriter:
        return self.inner.open_write()


class _Broken(BlobService):
    """Fails every call, as an unreachable remote does."""

    address = "grpc+http://broken.invalid:1"

    async def has(self, digest: B3Digest) -> bool:
        raise StorageError("connection refused")

    async def open_read(self, digest: B3Digest) -> BlobReader | None:
        raise StorageError("connection refused")

    def open_write(self) -> BlobWriter:
        raise StorageError("connection refused")


class _FailsMidway(MemoryBlobService):
    """Readers return ``good`` bytes up to ``at``, then raise ``IntegrityError``."""

    def __init__(self, data: bytes, at: int, good: bool = True) -> None:
        super().__init__()
        self._blobs[B3Digest(bytes(32))] = b""  # not used; keeps the dict non-trivial
        self.data = data if good else bytes(len(data))
        self.at = at

    async def open_read(self, digest: B3Digest) -> BlobReader | None:
        return _MidwayReader(self.data, self.at)


class _MidwayReader(BytesBlobReader):
    def __init__(self, data: bytes, at: int) -> None:
        super().__init__(data)
        self.at = at

    async def read(self, n: int = -1) -> bytes:
        if self.tell() >= self.at:
            raise IntegrityError("chunk 7 does not match its digest")
        return await super().read(min(n, self.at - self.tell()) if n >= 0 else self.at)


async def _memory_with(*blobs: bytes) -> MemoryBlobService:
    svc = MemoryBlobService()
    for b in blobs:
        await write_all(svc, b)
    return svc


# -- blobs -----------------------------------------------------------------------------------


async def test_blob_tampered_source_skipped(caplog: pytest.LogCaptureFixture) -> None:
    """The tampered source answers first; its bytes do not verify, the good one wins."""
    good = _Late(await _memory_with(BLOB_A), 0.2)
    tampered = _Tampered()
    await write_all(tampered, BLOB_A)
    race = RaceBlobService([tampered, good])
    with caplog.at_level(logging.WARNING):
        assert await read_all(race, BLOB_A_DIGEST) == BLOB_A
    assert "source 0 (_Tampered)" in caplog.text


async def test_large_blob_from_unverifying_source_fails_at_the_end() -> None:
    """A large blob streams from the first source to deliver its start; a source that
    does not verify its own bytes (unlike the gRPC client and the object store) is only
    caught once the whole blob is read, too late to fall back: the read fails."""
    tampered = _Tampered()
    await write_all(tampered, BLOB_B)
    race = RaceBlobService([tampered, _Late(await _memory_with(BLOB_B), 0.2)])
    reader = await race.open_read(BLOB_B_DIGEST)
    assert reader is not None
    with pytest.raises(IntegrityError, match=r"the bytes read hash to .* source 0 \(_Tampered\)"):
        await _drain(reader)
    await reader.close()


async def test_blob_tampered_remote_skipped(tmp_path: Path) -> None:
    """Through gRPC: the client refuses the tampered server's bytes, the good one wins,
    small and large blobs alike."""
    bad, good = Memory(), Memory()
    for data in (BLOB_A, BLOB_B):
        await write_all(good.blobs, data)
        digest = B3Digest(_b3(data))
        flipped = bytearray(data)
        flipped[-1] ^= 1
        bad.blobs._blobs[digest] = bytes(flipped)
    async with (
        serve(f"unix://{tmp_path}/bad.sock", bad) as (bad_url, _),
        serve(f"unix://{tmp_path}/good.sock", good, delay=0.2) as (good_url, _),
    ):
        clients = [blobservice.from_url(u) for u in (bad_url, good_url)]
        race = RaceBlobService(clients)
        assert await read_all(race, BLOB_A_DIGEST) == BLOB_A
        assert await read_all(race, BLOB_B_DIGEST) == BLOB_B
        for c in clients:
            await c.close()


async def test_large_blob_falls_back_midway(caplog: pytest.LogCaptureFixture) -> None:
    data = big_blob((3 << 20) + 11, seed=5)
    digest = B3Digest(_b3(data))
    first = _FailsMidway(data, at=(2 << 20) + 7)
    second = _Late(await _memory_with(data), 0.1)
    race = RaceBlobService([first, second])
    reader = await race.open_read(digest)
    assert reader is not None
    with caplog.at_level(logging.WARNING):
        got = bytearray()
        while part := await reader.read(300_000):
            got += part
    assert bytes(got) == data
    assert "failed at offset" in caplog.text
    await reader.close()


async def test_large_blob_fallback_must_agree() -> None:
    """A fallback source whose bytes differ from those already returned is not spliced in."""
    data = big_blob((3 << 20) + 11, seed=6)
    digest = B3Digest(_b3(data))
    liar = MemoryBlobService()
    liar._blobs[digest] = bytes(len(data))  # a different blob under the same digest
    race = RaceBlobService([_FailsMidway(data, at=(2 << 20)), _Late(liar, 0.1)])
    reader = await race.open_read(digest)
    assert reader is not None
    with pytest.raises(IntegrityError, match="already returned differ"):
        await _drain(reader)
    await reader.close()


async def _drain(reader: BlobReader) -> None:
    while await reader.read(1 << 20):
        pass


async def test_blob_seek_on_large_race_reader() -> None:
    data = big_blob((2 << 20) + 3, seed=2)
    race = RaceBlobService([await _memory_with(data)])
    reader = await race.open_read(B3Digest(_b3(data)))
    assert reader is not None
    async with reader:
        await reader.seek(100)
        assert await reader.read(10) == data[100:110]
        await reader.seek((2 << 20) - 5)
        assert await reader.read(20) == data[(2 << 20) - 5 : (2 << 20) + 3]
        await reader.seek(-10, io.SEEK_CUR)
        assert await reader.read(5) == data[-10:-5]
        with pytest.raises(ValueError, match="whence"):
            await reader.seek(0, io.SEEK_END)


async def test_blob_absence_and_failures(caplog: pytest.LogCaptureFixture) -> None:
    have = await _memory_with(BLOB_A)
    # A failing source is skipped when another has the blob...
    with caplog.at_level(logging.WARNING):
        assert await read_all(RaceBlobService([_Broken(), have]), BLOB_A_DIGEST) == BLOB_A
        assert await RaceBlobService([_Broken(), have]).has(BLOB_A_DIGEST)
    assert "source 0 (grpc+http://broken.invalid:1)" in caplog.text
    assert "connection refused" in caplog.text
    # ...absence needs every source to say so...
    race = RaceBlobService([MemoryBlobService(), MemoryBlobService()])
    assert await race.open_read(BLOB_A_DIGEST) is None
    assert not await race.has(BLOB_A_DIGEST)
    assert await race.chunks(BLOB_A_DIGEST) is None
    # ...and a failure is not absence.
    with pytest.raises(StorageError, match="no source had it and 1 of 2 failed"):
        await RaceBlobService([_Broken(), MemoryBlobService()]).open_read(BLOB_A_DIGEST)


async def test_blob_slow_source_cancelled() -> None:
    slow = _Late(await _memory_with(BLOB_A), 30)
    race = RaceBlobService([slow, await _memory_with(BLOB_A)])
    async with asyncio.timeout(5):
        assert await read_all(race, BLOB_A_DIGEST) == BLOB_A
        assert await race.has(BLOB_A_DIGEST)
    assert slow.cancelled == 2


async def test_blob_writes_go_to_the_primary() -> None:
    primary, mirror = MemoryBlobService(), MemoryBlobService()
    await write_all(RaceBlobService([primary, mirror]), BLOB_A)
    assert await primary.has(BLOB_A_DIGEST)
    assert not await mirror.has(BLOB_A_DIGEST)


# -- directories -----------------------------------------------------------------------------


class _WrongClosure(MemoryDirectoryService):
    """Answers every recursive get with an incomplete closure, and gets with another Directory."""

    async def get(self, digest: B3Digest) -> Directory | None:
        return DIRECTORY_A

    async def get_recursive(self, root: B3Digest) -> AsyncIterator[Directory]:
        yield DIRECTORY_COMPLICATED  # without the Directories below it


class _LateDirs(MemoryDirectoryService):
    async def get_recursive(self, root: B3Digest) -> AsyncIterator[Directory]:
        await asyncio.sleep(0.1)
        async for d in super().get_recursive(root):
            yield d

    async def get(self, digest: B3Digest) -> Directory | None:
        await asyncio.sleep(0.1)
        return await super().get(digest)

    def put_multiple_start(self) -> DirectoryPutter:
        return super().put_multiple_start()


async def test_directory_wrong_answers_skipped(caplog: pytest.LogCaptureFixture) -> None:
    good = _LateDirs()
    async with good.put_multiple_start() as putter:
        for d in (DIRECTORY_WITH_KEEP, DIRECTORY_C, DIRECTORY_COMPLICATED):
            await putter.put(d)
    race = RaceDirectoryService([_WrongClosure(), good])
    with caplog.at_level(logging.WARNING):
        got = [d async for d in race.get_recursive(DIRECTORY_COMPLICATED.digest)]
        assert await race.get(DIRECTORY_C.digest) == DIRECTORY_C
    assert got == [DIRECTORY_COMPLICATED, DIRECTORY_C, DIRECTORY_WITH_KEEP]
    assert "did not return" in caplog.text  # the incomplete closure
    assert "returned " + DIRECTORY_A.digest.hex() in caplog.text
    # Only wrong answers: that is not absence.
    with pytest.raises(IntegrityError):
        await RaceDirectoryService([_WrongClosure()]).get(DIRECTORY_B.digest)


def _b3(data: bytes) -> bytes:
    import blake3

    return blake3.blake3(data).digest()
