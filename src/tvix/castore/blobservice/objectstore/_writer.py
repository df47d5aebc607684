"""Streaming writes to the object store: FastCDC cuts batches in a worker thread.

Bytes are buffered until a batch of :data:`BATCH_SIZE` is complete, then one
worker-thread job cuts it, hashes it (blob and chunks), compresses the chunks
and hands their puts to the I/O threads, while the caller writes the next
batch. The last chunk of a batch may end only because the batch does, so it
is carried over into the next. Memory per writer: about two batches plus the
chunks being put. A blob's record is written only after all its chunks are
stored.
"""

from __future__ import annotations

import asyncio
from concurrent.futures import Future, wait
from typing import Protocol

import blake3
from pyfastcdc.cy import FastCDC

from tvix.castore._executor import BatchingExecutor
from tvix.castore.blobservice.base import BlobWriter, ChunkMeta
from tvix.castore.blobservice.objectstore._codec import MIB, Chunking, compressor, raw_zstd_frame
from tvix.castore.digest import B3Digest
from tvix.castore.proto import pb

__all__ = ["BATCH_SIZE", "ChunkSink", "ObjectStoreBlobWriter"]

# Bytes cut per worker-thread round trip: big enough that the hop (~0.1 ms)
# is small next to the work, small enough to keep writers' memory low.
BATCH_SIZE = 4 * MIB


class ChunkSink(Protocol):
    """What a writer needs of the service: its settings, keys and blocking puts."""

    @property
    def chunking(self) -> Chunking: ...
    @property
    def zstd(self) -> bool: ...
    @property
    def executor(self) -> BatchingExecutor: ...
    def chunk_key(self, digest: bytes) -> str: ...
    def blob_key(self, digest: bytes) -> str: ...
    def put_sync(self, key: str, payload: bytes) -> None: ...
    def store_single(self, data: bytes) -> B3Digest: ...


class ObjectStoreBlobWriter(BlobWriter):
    def __init__(self, service: ChunkSink) -> None:
        self._service = service
        c = service.chunking
        self._cdc = FastCDC(
            avg_size=c.avg_size, min_size=c.min_size, max_size=c.max_size, normalized_chunking=1
        )
        self._batch = max(BATCH_SIZE, 2 * c.max_size)
        self._pending: list[bytes] = []  # written, not handed to a batch yet
        self._pending_size = 0
        # The batch being cut and stored in a thread, while the caller writes the next one.
        self._job: asyncio.Future[tuple[bytes, list[Future[None]]]] | None = None
        # Touched only by batch jobs, which run one at a time.
        self._hasher = blake3.blake3(max_threads=blake3.blake3.AUTO)
        self._chunks: list[ChunkMeta] = []
        self._stored: set[B3Digest] = set()
        self._digest: B3Digest | None = None
        self._failed = False
        self._aborted = False

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
        tail, puts = await self._wait_job()
        buf = b"".join([tail, *self._pending])
        self._pending = []
        self._pending_size = 0
        self._job = asyncio.get_running_loop().run_in_executor(
            None, self._store_batch, buf, final, puts
        )
        if final:
            await self._wait_job()

    async def _wait_job(self) -> tuple[bytes, list[Future[None]]]:
        job, self._job = self._job, None
        if job is None:
            return b"", []
        try:
            return await job
        except BaseException:
            self._failed = True
            raise

    def _store_batch(
        self, buf: bytes, final: bool, previous: list[Future[None]]
    ) -> tuple[bytes, list[Future[None]]]:
        """Cut ``buf``, start storing its chunks, and return the tail left uncut.

        Runs in a thread. Unless ``final``, the last chunk is left as the tail:
        it may end only because the buffer does. Chunk puts run on the
        service's I/O threads; this batch's are returned unfinished and waited
        for by the next batch (``previous``), so cutting one batch overlaps
        storing the one before, and at most two batches are in memory. The
        final batch waits for its own too.
        """
        view = memoryview(buf)
        cuts = [(c.offset, c.length) for c in self._cdc.cut_buf(view)]
        if not final and cuts:
            cuts.pop()
        if final and not cuts and not self._chunks:
            cuts = [(0, 0)]  # the empty blob: one empty chunk
        used = cuts[-1][0] + cuts[-1][1] if cuts else 0
        self._hasher.update(view[:used])
        service = self._service
        zstd = compressor()
        puts: list[Future[None]] = []
        for offset, length in cuts:
            data = view[offset : offset + length]
            digest = B3Digest(blake3.blake3(data).digest())
            self._chunks.append(ChunkMeta(digest, length))
            if digest in self._stored:
                continue
            self._stored.add(digest)
            payload = zstd.compress(data) if service.zstd else raw_zstd_frame(data)
            puts.append(
                service.executor.submit(service.put_sync, service.chunk_key(digest), payload)
            )
        waiting = previous + puts if final else previous
        # All of them end before the first failure is raised: none may still be
        # writing (a staging file, say) when the caller learns the write failed.
        wait(waiting)
        for put in waiting:
            put.result()  # raises the first failure
        return buf[used:], [] if final else puts

    async def close(self) -> B3Digest:
        if self._digest is not None:
            return self._digest
        if self._aborted:
            raise ValueError("close of an aborted blob writer")
        if self._failed:
            raise ValueError("close of a failed blob writer")
        try:
            if self._job is None and self._pending_size < self._service.chunking.min_size:
                # Smaller than any chunk FastCDC cuts (most files): one chunk,
                # hashed, compressed and stored in a single job on the I/O pool.
                data = b"".join(self._pending)
                self._pending = []
                service = self._service
                self._digest = await service.executor.run(service.store_single, data)
                return self._digest
            await self._flush(final=True)
            digest = B3Digest(self._hasher.digest())
            if len(self._chunks) > 1:
                record = pb.StatBlobResponse(
                    chunks=[
                        pb.StatBlobResponse.ChunkMeta(digest=c.digest, size=c.size)
                        for c in self._chunks
                    ]
                )
                # Only now: every chunk it lists is stored.
                service = self._service
                await service.executor.run(
                    service.put_sync, service.blob_key(digest), record.SerializeToString()
                )
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
            # A running batch job cannot be interrupted; let it finish (its chunks
            # are valid content, just unreferenced) so nothing outlives the writer.
            job, self._job = self._job, None
            if job is not None:
                await asyncio.gather(job, return_exceptions=True)
