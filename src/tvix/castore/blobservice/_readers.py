"""The blob readers backends share, and the one place a blob is hashed and compared.

- :func:`seek_target`: where a seek lands, for every reader;
- :class:`BytesBlobReader`: a reader over bytes in memory;
- :class:`ChunkedReader`: a reader over a list of chunks, each fetched (and
  verified) by a backend's function on first touch, prefetching ahead while
  reading front to back (upstream: ``blobservice/chunked_reader.rs``);
- :class:`BlobVerifier`, :class:`VerifyingReader`, :func:`open_verified`,
  :func:`read_verified`: read a blob from a source not trusted, hash it and
  compare with its digest (upstream: ``hashing_reader.rs``).
"""

from __future__ import annotations

import asyncio
import bisect
import io
from collections.abc import Callable, Coroutine
from typing import Any

import blake3

from tvix.castore.blobservice.base import BlobReader, BlobService, ChunkMeta
from tvix.castore.digest import B3Digest
from tvix.castore.errors import IntegrityError

__all__ = [
    "BLOCK",
    "BlobMismatchError",
    "BlobVerifier",
    "BytesBlobReader",
    "ChunkedReader",
    "VerifyingReader",
    "open_verified",
    "read_verified",
    "seek_target",
]

# Bytes per read when a whole blob is streamed through.
BLOCK = 1 << 20


def seek_target(pos: int, size: int | None, offset: int, whence: int) -> int:
    """Where a seek from ``pos`` lands; ``size`` ``None`` (unknown) refuses ``SEEK_END``."""
    if whence == io.SEEK_SET:
        target = offset
    elif whence == io.SEEK_CUR:
        target = pos + offset
    elif whence == io.SEEK_END and size is not None:
        target = size + offset
    else:
        raise ValueError(f"unsupported whence {whence}")
    if target < 0:
        raise ValueError(f"negative seek position {target}")
    return target


class BytesBlobReader(BlobReader):
    """A :class:`BlobReader` over bytes already in memory."""

    def __init__(self, data: bytes) -> None:
        self._view = memoryview(data)
        self._pos = 0

    async def read(self, n: int = -1) -> bytes:
        start = self._pos
        end = len(self._view) if n < 0 else min(len(self._view), start + n)
        if start >= end:
            return b""
        self._pos = end
        return bytes(self._view[start:end])

    async def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        pos = seek_target(self._pos, len(self._view), offset, whence)
        self._pos = pos
        return pos

    def tell(self) -> int:
        return self._pos


# Fetches one chunk, verified against its digest and size; raises when it cannot.
FetchChunk = Callable[[ChunkMeta], Coroutine[Any, Any, bytes]]


class ChunkedReader(BlobReader):
    """Reads a blob chunk by chunk through ``fetch``, each chunk on first touch.

    ``fetch`` returns a chunk's bytes verified (its digest and size), so no
    byte is returned unverified. Reading front to back (each chunk right
    after the one before), the next chunks are fetched concurrently: at
    most ``ahead_chunks`` of them and, if given, at most ``ahead_bytes``
    bytes. Chunks fetched ahead of a seek target are kept, those behind it
    dropped. While the chunks are read in order from the first, the whole
    blob is hashed too and checked before the last chunk's bytes are
    returned (a chunk list belonging to another blob is caught);
    ``mismatch(got)`` words that error, ``got`` being the digest the chunks
    add up to. Once raised, it is raised by every later read.
    """

    def __init__(
        self,
        digest: B3Digest,
        chunks: list[ChunkMeta],
        fetch: FetchChunk,
        *,
        mismatch: Callable[[bytes], str],
        ahead_chunks: int | None = None,
        ahead_bytes: int | None = None,
    ) -> None:
        self._digest = digest
        self._chunks = chunks
        self._fetch = fetch
        self._mismatch = mismatch
        self._ahead_chunks = len(chunks) if ahead_chunks is None else ahead_chunks
        self._ahead_bytes = ahead_bytes
        self._starts: list[int] = []
        size = 0
        for c in chunks:
            self._starts.append(size)
            size += c.size
        self._size = size
        self._pos = 0
        self._current = -1
        self._current_data = b""
        self._fetches: dict[int, asyncio.Task[bytes]] = {}
        # Whole-blob verification, possible while chunks are read in order.
        self._whole = blake3.blake3()
        self._hashed = 0
        self._broken: IntegrityError | None = None
        self._closed = False

    async def read(self, n: int = -1) -> bytes:
        if self._closed:
            raise ValueError("read from a closed blob reader")
        if n < 0:
            parts = []
            while part := await self.read(BLOCK):
                parts.append(part)
            return b"".join(parts)
        if self._broken is not None:
            raise self._broken
        if n == 0 or self._pos >= self._size:
            return b""
        i = bisect.bisect_right(self._starts, self._pos) - 1
        data = await self._chunk(i)
        offset = self._pos - self._starts[i]
        end = min(len(data), offset + n)
        self._pos += end - offset
        if offset == 0 and end == len(data):
            return data
        return data[offset:end]

    async def _chunk(self, i: int) -> bytes:
        if i == self._current:
            return self._current_data
        sequential = i == self._current + 1
        task = self._fetches.pop(i, None)
        if task is None:
            task = self._start_fetch(i)
        # Drop prefetches a seek made useless; keep the ones ahead of i.
        for j in [j for j in self._fetches if j < i]:
            self._fetches.pop(j).cancel()
        if sequential:
            self._prefetch(i)
        data = await task
        if i == self._hashed:
            self._whole.update(data)
            self._hashed += 1
            if self._hashed == len(self._chunks):
                got = self._whole.digest()
                if got != self._digest:
                    self._broken = IntegrityError(self._mismatch(got))
                    raise self._broken
        self._current, self._current_data = i, data
        return data

    def _prefetch(self, i: int) -> None:
        """Reading front to back: keep the chunks after ``i`` coming."""
        limit = self._ahead_bytes
        ahead = 0
        for j in range(i + 1, min(i + 1 + self._ahead_chunks, len(self._chunks))):
            if limit is not None:
                ahead += self._chunks[j].size
                if ahead > limit:
                    break
            if j not in self._fetches:
                self._fetches[j] = self._start_fetch(j)

    def _start_fetch(self, i: int) -> asyncio.Task[bytes]:
        task = asyncio.create_task(self._fetch(self._chunks[i]))
        # A prefetch may fail or be dropped without anyone awaiting it.
        task.add_done_callback(_retrieve)
        return task

    async def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        self._pos = seek_target(self._pos, self._size, offset, whence)
        return self._pos

    def tell(self) -> int:
        return self._pos

    async def close(self) -> None:
        self._closed = True
        self._current_data = b""
        tasks = list(self._fetches.values())
        self._fetches.clear()
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


def _retrieve(task: asyncio.Task[bytes]) -> None:
    if not task.cancelled():
        task.exception()


class BlobMismatchError(IntegrityError):
    """A blob's bytes do not hash to its digest, or are not as many as expected.

    ``got`` is the digest they hash to, ``size`` how many there were.
    """

    def __init__(self, message: str, digest: B3Digest, got: bytes, size: int) -> None:
        super().__init__(message)
        self.digest = digest
        self.got = got
        self.size = size


class BlobVerifier:
    """Hashes a blob read front to back; :meth:`check` compares it with its digest.

    ``size``, if given, is checked too.
    """

    def __init__(self, digest: B3Digest, size: int | None = None) -> None:
        self.digest = digest
        self.size = size
        self._hasher = blake3.blake3()
        self.hashed = 0  # bytes hashed so far

    def update(self, data: bytes | memoryview) -> None:
        self._hasher.update(data)
        self.hashed += len(data)

    def current(self) -> bytes:
        """The digest of the bytes hashed so far."""
        return self._hasher.digest()

    def matches(self) -> bool:
        """Whether the bytes hashed so far are the blob."""
        return self.current() == self.digest and (self.size is None or self.hashed == self.size)

    def check(self, source: str = "the source") -> None:
        """Raise :class:`BlobMismatchError` unless the bytes hashed are the blob.

        ``source`` names where they came from.
        """
        got = self.current()
        if got != self.digest:
            raise BlobMismatchError(
                f"blob {self.digest.hex()}: {source} returned bytes hashing to {got.hex()}",
                self.digest,
                got,
                self.hashed,
            )
        if self.size is not None and self.hashed != self.size:
            raise BlobMismatchError(
                f"blob {self.digest.hex()}: {source} returned {self.hashed} bytes, "
                f"expected {self.size}",
                self.digest,
                got,
                self.hashed,
            )


class VerifyingReader(BlobReader):
    """Reads ``inner`` front to back, hashing.

    The read that reaches the end raises :class:`BlobMismatchError` unless
    the bytes are the blob ``digest`` (of ``size``).

    It only reads forward: seeking anywhere but the current position raises
    ``ValueError``. Closing it closes ``inner``.
    """

    def __init__(
        self,
        inner: BlobReader,
        digest: B3Digest,
        *,
        size: int | None = None,
        source: str = "the source",
    ) -> None:
        self._inner = inner
        self._verifier = BlobVerifier(digest, size)
        self._source = source
        self._done = False

    async def read(self, n: int = -1) -> bytes:
        data = await self._inner.read(n)
        if data:
            self._verifier.update(data)
            if n < 0:  # that was all of it
                self._verifier.check(self._source)
                self._done = True
        elif n != 0 and not self._done:
            self._verifier.check(self._source)
            self._done = True
        return data

    async def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        pos = self.tell()
        if seek_target(pos, None, offset, whence) != pos:
            raise ValueError("a verifying blob reader only reads front to back")
        return pos

    def tell(self) -> int:
        return self._verifier.hashed

    async def close(self) -> None:
        await self._inner.close()


async def open_verified(
    service: BlobService, digest: B3Digest, *, size: int | None = None, source: str = "the source"
) -> VerifyingReader | None:
    """A :class:`VerifyingReader` over blob ``digest`` of ``service``; ``None`` when absent."""
    reader = await service.open_read(digest)
    if reader is None:
        return None
    return VerifyingReader(reader, digest, size=size, source=source)


async def read_verified(
    service: BlobService, digest: B3Digest, *, size: int | None = None, source: str = "the source"
) -> bytes | None:
    """The whole blob ``digest`` of ``service``, verified; ``None`` when absent.

    Only for blobs known to be small: it is held in memory whole.
    """
    reader = await open_verified(service, digest, size=size, source=source)
    if reader is None:
        return None
    async with reader:
        return await reader.read()
