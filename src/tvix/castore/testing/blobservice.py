"""The BlobService conformance suite."""

from __future__ import annotations

import asyncio
import io
import time

import pytest

from tvix.castore.blobservice.base import BlobReader, BlobService, BlobWriter
from tvix.castore.blobservice.util import read_all, write_all
from tvix.castore.digest import B3Digest
from tvix.castore.testing.fixtures import (
    BLOB_A,
    BLOB_A_DIGEST,
    BLOB_B,
    BLOB_B_DIGEST,
    EMPTY_BLOB_DIGEST,
    b3,
    big_blob,
)

__all__ = ["BlobServiceTests"]


class BlobServiceTests:
    """Tests every :class:`BlobService` must pass. Subclasses provide a ``blob_service`` fixture."""

    async def test_absent(self, blob_service: BlobService) -> None:
        assert not await blob_service.has(BLOB_A_DIGEST)
        assert await blob_service.open_read(BLOB_A_DIGEST) is None
        assert await blob_service.chunks(BLOB_A_DIGEST) is None

    @pytest.mark.parametrize(
        ("data", "digest"),
        [(b"", EMPTY_BLOB_DIGEST), (BLOB_A, BLOB_A_DIGEST), (BLOB_B, BLOB_B_DIGEST)],
        ids=["empty", "small", "multi-MiB"],
    )
    async def test_round_trip(
        self, blob_service: BlobService, data: bytes, digest: B3Digest
    ) -> None:
        assert await write_all(blob_service, data) == digest
        assert await blob_service.has(digest)
        assert await read_all(blob_service, b3(data)) == data
        # Writing the same content again is harmless.
        assert await write_all(blob_service, data) == digest
        assert await read_all(blob_service, b3(data)) == data

    async def test_digest_ignores_write_boundaries(self, blob_service: BlobService) -> None:
        async with blob_service.open_write() as writer:
            for i in range(0, len(BLOB_B), 99_991):
                await writer.write(memoryview(BLOB_B)[i : i + 99_991])
        assert await writer.close() == BLOB_B_DIGEST
        assert await writer.close() == BLOB_B_DIGEST  # idempotent
        assert await read_all(blob_service, BLOB_B_DIGEST) == BLOB_B

    async def test_chunks(self, blob_service: BlobService) -> None:
        await write_all(blob_service, BLOB_B)
        chunks = await blob_service.chunks(BLOB_B_DIGEST)
        assert chunks is not None
        if chunks:
            assert sum(c.size for c in chunks) == len(BLOB_B)
            parts = []
            for chunk in chunks:
                data = await read_all(blob_service, chunk.digest)
                assert data is not None, "a listed chunk must be readable by its digest"
                assert len(data) == chunk.size
                assert b3(data) == chunk.digest
                parts.append(data)
            assert b"".join(parts) == BLOB_B

    async def test_read_many(self, blob_service: BlobService) -> None:
        await write_all(blob_service, BLOB_A)
        await write_all(blob_service, BLOB_B)
        await write_all(blob_service, b"")
        got = await blob_service.read_many(
            [BLOB_B_DIGEST, b3(b"absent"), BLOB_A_DIGEST, EMPTY_BLOB_DIGEST, BLOB_A_DIGEST]
        )
        assert got == [BLOB_B, None, BLOB_A, b"", BLOB_A]
        assert await blob_service.read_many([]) == []

    async def test_partial_reads(self, blob_service: BlobService) -> None:
        await write_all(blob_service, BLOB_B)
        reader = await blob_service.open_read(BLOB_B_DIGEST)
        assert reader is not None
        async with reader:
            got = bytearray()
            while part := await reader.read(65_537):
                assert len(part) <= 65_537
                got += part
            assert bytes(got) == BLOB_B
            assert reader.tell() == len(BLOB_B)
            assert await reader.read(10) == b""

    @pytest.mark.parametrize(
        "offset", [0, 1, 4095, 1 << 20, (1 << 20) + 12345, len(BLOB_B) - 1, len(BLOB_B)]
    )
    async def test_seek(self, blob_service: BlobService, offset: int) -> None:
        await write_all(blob_service, BLOB_B)
        reader = await blob_service.open_read(BLOB_B_DIGEST)
        assert reader is not None
        async with reader:
            assert await reader.seek(offset) == offset
            assert reader.tell() == offset
            assert await _read_exactly(reader, 300_000) == BLOB_B[offset : offset + 300_000]
            # Backwards, relative.
            back = min(offset, 1000)
            pos = reader.tell()
            assert await reader.seek(-back, io.SEEK_CUR) == pos - back
            assert await _read_exactly(reader, 10) == BLOB_B[pos - back : pos - back + 10]

    async def test_seek_past_end_and_negative(self, blob_service: BlobService) -> None:
        await write_all(blob_service, BLOB_A)
        reader = await blob_service.open_read(BLOB_A_DIGEST)
        assert reader is not None
        async with reader:
            assert await reader.seek(1000) == 1000
            assert await reader.read(5) == b""
            with pytest.raises(ValueError, match="negative"):
                await reader.seek(-1)

    async def test_concurrent_writers_same_content(self, blob_service: BlobService) -> None:
        data = big_blob(1 << 20, seed=7)

        async def put() -> bytes:
            async with blob_service.open_write() as writer:
                for i in range(0, len(data), 1 << 16):
                    await writer.write(data[i : i + (1 << 16)])
                    await asyncio.sleep(0)
            return await writer.close()

        digests = await asyncio.gather(*(put() for _ in range(8)))
        assert set(digests) == {b3(data)}
        assert await read_all(blob_service, b3(data)) == data

    async def test_abort_stores_nothing(self, blob_service: BlobService) -> None:
        data = big_blob(700_000, seed=3)
        writer = blob_service.open_write()
        with pytest.raises(RuntimeError, match="boom"):
            await _write_then_fail(writer, data)
        assert not await blob_service.has(b3(data))
        assert await blob_service.open_read(b3(data)) is None

    async def test_write_after_close_fails(self, blob_service: BlobService) -> None:
        writer = blob_service.open_write()
        await writer.write(b"x")
        await writer.close()
        with pytest.raises(ValueError, match="closed"):
            await writer.write(b"y")

    async def test_sweep(self, blob_service: BlobService) -> None:
        """Deletes blobs neither live nor written or refreshed since the cutoff."""
        a = await write_all(blob_service, BLOB_A)
        b = await write_all(blob_service, BLOB_B)
        if not blob_service.supports_gc:
            with pytest.raises(NotImplementedError):
                await blob_service.sweep(set(), 0)
            return
        swept = await blob_service.sweep(set(), time.time() - 600)
        assert swept.chunks == 0
        dry = await blob_service.sweep({bytes(a)}, time.time() + 600, dry_run=True)
        assert dry.chunks > 0
        assert await blob_service.has(b)
        swept = await blob_service.sweep({bytes(a)}, time.time() + 600)
        assert swept.chunks == dry.chunks
        assert swept.bytes > 0
        assert not await blob_service.has(b)
        assert await read_all(blob_service, a) == BLOB_A
        # Written again, it is back.
        assert await write_all(blob_service, BLOB_B) == b
        assert await read_all(blob_service, b) == BLOB_B


async def _write_then_fail(writer: BlobWriter, data: bytes) -> None:
    async with writer:
        await writer.write(data)
        raise RuntimeError("boom")


async def _read_exactly(reader: BlobReader, n: int) -> bytes:
    out = bytearray()
    while len(out) < n:
        part = await reader.read(n - len(out))
        if not part:
            break
        out += part
    return bytes(out)
