"""The blob writer the chunking backends share: buffered batches, cut by FastCDC.

:class:`ChunkingBlobWriter` buffers written bytes until a batch of at least
:data:`BATCH_SIZE` is complete, then hands it to the backend's batch job
(:meth:`ChunkingBlobWriter._batch_job`) while the caller writes the next
batch; one job runs at a time. :meth:`ChunkingBlobWriter.cut` cuts a batch
into content-defined chunks (hashing the blob and each chunk as it goes). The
last chunk of a batch may end only because the batch does, so it is carried
over into the next. A blob smaller than the smallest chunk is stored whole by
:meth:`ChunkingBlobWriter._store_single`; a blob of several chunks gets its
record (:meth:`ChunkingBlobWriter._store_record`) only after every chunk it
lists is stored. The backends: ``objectstore`` (one object per chunk) and
``packs`` (chunks appended to pack files).
"""

from __future__ import annotations

import abc
import asyncio
from collections.abc import Sequence

import blake3
from pyfastcdc.cy import FastCDC

from tvix.castore.blobservice.base import BlobWriter, ChunkMeta
from tvix.castore.digest import B3Digest

__all__ = ["BATCH_SIZE", "ChunkingBlobWriter"]

# Bytes cut per worker-thread round trip: big enough that the hop (~0.1 ms)
# is small next to the work, small enough to keep writers' memory low.
BATCH_SIZE = 4 * 1024 * 1024


class ChunkingBlobWriter(BlobWriter):
    """A :class:`BlobWriter` that cuts what is written into chunks of ``min``..``max`` bytes.

    Subclasses store what it hands them: :meth:`_batch_job` (a batch),
    :meth:`_store_single` (a blob of one small chunk) and
    :meth:`_store_record` (the chunk list of a blob of several). A failure
    in any of them fails the writer for good; :meth:`abort` waits for a
    running batch job (it cannot be interrupted) so nothing outlives the
    writer.
    """

    def __init__(self, *, min_size: int, avg_size: int, max_size: int) -> None:
        self._cdc = FastCDC(
            avg_size=avg_size, min_size=min_size, max_size=max_size, normalized_chunking=1
        )
        self._min_size = min_size
        self._batch = max(BATCH_SIZE, 2 * max_size)
        self._pending: list[bytes] = []  # written, not handed to a batch yet
        self._pending_size = 0
        # The batch job running; it returns the uncut tail of its batch.
        self._job: asyncio.Future[bytes] | None = None
        # Touched only by batch jobs (one at a time) and close().
        self._hasher = blake3.blake3(max_threads=blake3.blake3.AUTO)
        self._chunks: list[ChunkMeta] = []
        self._digest: B3Digest | None = None
        self._failed = False
        self._aborted = False

    @abc.abstractmethod
    async def _batch_job(self, parts: list[bytes], final: bool) -> bytes:
        """Cut ``parts`` (with :meth:`cut`) and store their chunks; return the uncut tail.

        ``final``: the last batch of the blob (nothing left uncut); it
        returns only once every chunk of the blob is stored.
        """

    @abc.abstractmethod
    async def _store_single(self, data: bytes) -> B3Digest:
        """Store ``data``, smaller than the smallest chunk, as a blob of one chunk."""

    @abc.abstractmethod
    async def _store_record(self, digest: B3Digest, chunks: Sequence[ChunkMeta]) -> None:
        """Store the record of blob ``digest``: its ``chunks`` (all stored already)."""

    def cut(self, view: memoryview, final: bool) -> tuple[int, list[tuple[bytes, memoryview]]]:
        """Cut ``view`` into chunks: the bytes used, and each chunk's digest and data.

        Unless ``final``, the last chunk is left uncut (it may end only
        because the buffer does): the bytes after ``used`` belong to the next
        batch. Hashes the blob's bytes and records each chunk (in a worker
        thread, one batch at a time).
        """
        cuts = [(c.offset, c.length) for c in self._cdc.cut_buf(view)]
        if not final and cuts:
            cuts.pop()
        if final and not cuts and not self._chunks:
            cuts = [(0, 0)]  # the empty blob: one empty chunk
        used = cuts[-1][0] + cuts[-1][1] if cuts else 0
        self._hasher.update(view[:used])
        out = []
        for offset, length in cuts:
            data = view[offset : offset + length]
            digest = blake3.blake3(data).digest()
            self._chunks.append(ChunkMeta(B3Digest(digest), length))
            out.append((digest, data))
        return used, out

    async def write(self, data: bytes | memoryview) -> None:
        if self._digest is not None or self._aborted:
            raise ValueError("write to a closed blob writer")
        if self._failed:
            raise ValueError("write to a failed blob writer")
        if not data:
            return
        # Copied: the caller may reuse its buffer, and the bytes outlive this call.
        self._pending.append(bytes(data))
        self._pending_size += len(data)
        if self._pending_size >= self._batch:
            await self._flush(final=False)

    async def _flush(self, final: bool) -> None:
        """Hand what is pending, after the previous batch's uncut tail, to a new batch job."""
        tail = await self._wait_job()
        parts = [tail, *self._pending]
        self._pending = []
        self._pending_size = 0
        self._job = asyncio.ensure_future(self._batch_job(parts, final))
        if final:
            await self._wait_job()

    async def _wait_job(self) -> bytes:
        job, self._job = self._job, None
        if job is None:
            return b""
        try:
            return await job
        except BaseException:
            self._failed = True
            raise

    async def close(self) -> B3Digest:
        if self._digest is not None:
            return self._digest
        if self._aborted:
            raise ValueError("close of an aborted blob writer")
        if self._failed:
            raise ValueError("close of a failed blob writer")
        try:
            if self._job is None and self._pending_size < self._min_size:
                # Smaller than any chunk FastCDC cuts (most files): one chunk.
                data = b"".join(self._pending)
                self._pending = []
                digest = await self._store_single(data)
            else:
                await self._flush(final=True)
                digest = B3Digest(self._hasher.digest())
                if len(self._chunks) > 1:
                    await self._store_record(digest, self._chunks)
        except BaseException:
            self._failed = True
            raise
        self._digest = digest
        self._chunks = []
        return digest

    async def abort(self) -> None:
        if self._digest is None and not self._aborted:
            self._aborted = True
            self._pending = []
            job, self._job = self._job, None
            if job is not None:
                await asyncio.gather(job, return_exceptions=True)
