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


# Who answers first is decided by gates, not by sleeping: a late source waits for an
# asyncio.Event that the source meant to answer first sets once it has answered (or
# failed), or for one that is never set when it must never answer.


class _Tampered(MemoryBlobService):
    """Serves every blob with one byte flipped (a source that does not verify).

    ``answered`` (if given) is set when a reader of it is closed: the race
    closes the reader of a small blob once it has found the bytes wrong.
    """

    def __init__(self, answered: asyncio.Event | None = None) -> None:
        super().__init__()
        self.answered = answered

    async def open_read(self, digest: B3Digest) -> BlobReader | None:
        data = self._blobs.get(digest)
        if data is None:
            return None
        bad = bytearray(data)
        bad[len(bad) // 2] ^= 1
        return _SignallingReader(BytesBlobReader(bytes(bad)), self.answered)


class _Gated(BlobService):
    """``inner``, answering reads only once ``gate`` is set (never, by default); counts
    reads cancelled while waiting."""

    def __init__(self, inner: BlobService, gate: asyncio.Event | None = None) -> None:
        self.inner = inner
        self.gate = gate or asyncio.Event()
        self.cancelled = 0

    async def _wait(self) -> None:
        try:
            await self.gate.wait()
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


class _Signalling(BlobService):
    """``inner``; sets ``answered`` when a read of it fails or a reader of it is closed."""

    def __init__(self, inner: BlobService, answered: asyncio.Event) -> None:
        self.inner = inner
        self.answered = answered

    async def has(self, digest: B3Digest) -> bool:
        return await self.inner.has(digest)

    async def open_read(self, digest: B3Digest) -> BlobReader | None:
        try:
            reader = await self.inner.open_read(digest)
        except Exception:
            self.answered.set()
            raise
        return None if reader is None else _SignallingReader(reader, self.answered)

    def open_write(self) -> BlobWriter:
        return self.inner.open_write()


class _SignallingReader(BlobReader):
    """``inner``; sets ``answered`` (if given) when a read fails or the reader is closed."""

    def __init__(self, inner: BlobReader, answered: asyncio.Event | None) -> None:
        self.inner = inner
        self.answered = answered

    def _signal(self) -> None:
        if self.answered is not None:
            self.answered.set()

    async def read(self, n: int = -1) -> bytes:
        try:
            return await self.inner.read(n)
        except Exception:
            self._signal()
            raise

    async def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        return await self.inner.seek(offset, whence)

    def tell(self) -> int:
        return self.inner.tell()

    async def close(self) -> None:
        await self.inner.close()
        self._signal()


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
    """Readers return ``good`` bytes up to ``at``, then raise ``IntegrityError`` (and set
    ``failed``, if given)."""

    def __init__(
        self, data: bytes, at: int, good: bool = True, failed: asyncio.Event | None = None
    ) -> None:
        super().__init__()
        self.data = data if good else bytes(len(data))
        self.at = at
        self.failed = failed

    async def open_read(self, digest: B3Digest) -> BlobReader | None:
        return _SignallingReader(_MidwayReader(self.data, self.at), self.failed)


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
    tampered_answered = asyncio.Event()
    good = _Gated(await _memory_with(BLOB_A), tampered_answered)
    tampered = _Tampered(tampered_answered)
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
    race = RaceBlobService([tampered, _Gated(await _memory_with(BLOB_B))])
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
        serve(f"unix://{tmp_path}/good.sock", good) as (good_url, _),
    ):
        clients = [blobservice.from_url(u) for u in (bad_url, good_url)]
        for digest, data in ((BLOB_A_DIGEST, BLOB_A), (BLOB_B_DIGEST, BLOB_B)):
            # The good server is only heard once the client has refused the bad one's bytes.
            refused = asyncio.Event()
            race = RaceBlobService([_Signalling(clients[0], refused), _Gated(clients[1], refused)])
            assert await read_all(race, digest) == data
            assert refused.is_set()
        for c in clients:
            await c.close()


async def test_large_blob_falls_back_midway(caplog: pytest.LogCaptureFixture) -> None:
    data = big_blob((3 << 20) + 11, seed=5)
    digest = B3Digest(_b3(data))
    failed = asyncio.Event()
    first = _FailsMidway(data, at=(2 << 20) + 7, failed=failed)
    second = _Gated(await _memory_with(data), failed)
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
    failed = asyncio.Event()
    race = RaceBlobService([_FailsMidway(data, at=(2 << 20), failed=failed), _Gated(liar, failed)])
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
    slow = _Gated(await _memory_with(BLOB_A))  # never answers
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


class _Answered:
    """One event per kind of read: set once the source meant to answer first has answered."""

    def __init__(self) -> None:
        self.get = asyncio.Event()
        self.get_recursive = asyncio.Event()


class _WrongClosure(MemoryDirectoryService):
    """Answers every recursive get with an incomplete closure, and gets with another Directory."""

    def __init__(self, answered: _Answered | None = None) -> None:
        super().__init__()
        self.answered = answered or _Answered()

    async def get(self, digest: B3Digest) -> Directory | None:
        self.answered.get.set()
        return DIRECTORY_A

    async def get_recursive(self, root: B3Digest) -> AsyncIterator[Directory]:
        yield DIRECTORY_COMPLICATED  # without the Directories below it
        self.answered.get_recursive.set()


class _LateDirs(MemoryDirectoryService):
    """Answers each kind of read only once ``first`` has answered it."""

    def __init__(self, first: _Answered) -> None:
        super().__init__()
        self.first = first

    async def get_recursive(self, root: B3Digest) -> AsyncIterator[Directory]:
        await self.first.get_recursive.wait()
        async for d in super().get_recursive(root):
            yield d

    async def get(self, digest: B3Digest) -> Directory | None:
        await self.first.get.wait()
        return await super().get(digest)

    def put_multiple_start(self) -> DirectoryPutter:
        return super().put_multiple_start()


async def test_directory_wrong_answers_skipped(caplog: pytest.LogCaptureFixture) -> None:
    answered = _Answered()
    good = _LateDirs(answered)
    async with good.put_multiple_start() as putter:
        for d in (DIRECTORY_WITH_KEEP, DIRECTORY_C, DIRECTORY_COMPLICATED):
            await putter.put(d)
    race = RaceDirectoryService([_WrongClosure(answered), good])
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
