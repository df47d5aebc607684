"""Streaming writes to the object store (batching and cutting: :mod:`.._writers`).

Each batch is one worker-thread job: it cuts the batch, hashes it (blob and
chunks), compresses the chunks and hands their puts to the I/O threads,
while the caller writes the next batch. Memory per writer: about two batches
plus the chunks being put. A blob's record is written only after all its
chunks are stored.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from concurrent.futures import Future, wait
from typing import Protocol

from tvix.castore._executor import BatchingExecutor
from tvix.castore.blobservice._writers import ChunkingBlobWriter
from tvix.castore.blobservice._zstd import compressor
from tvix.castore.blobservice.base import ChunkMeta
from tvix.castore.blobservice.objectstore._codec import Chunking, raw_zstd_frame
from tvix.castore.digest import B3Digest
from tvix.castore.proto import pb

__all__ = ["ChunkSink", "ObjectStoreBlobWriter"]


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


class ObjectStoreBlobWriter(ChunkingBlobWriter):
    """Chunks put as objects by the service's I/O threads; the record put last."""

    def __init__(self, service: ChunkSink) -> None:
        c = service.chunking
        super().__init__(min_size=c.min_size, avg_size=c.avg_size, max_size=c.max_size)
        self._service = service
        # Touched only by batch jobs, which run one at a time.
        self._stored: set[bytes] = set()
        self._puts: list[Future[None]] = []  # the previous batch's, still running

    async def _batch_job(self, parts: list[bytes], final: bool) -> bytes:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(None, self._store_batch, b"".join(parts), final)

    def _store_batch(self, buf: bytes, final: bool) -> bytes:
        """Cut ``buf``, start storing its chunks, and return the tail left uncut.

        Runs in a thread. Chunk puts run on the service's I/O threads; this
        batch's are left running and waited for by the next batch, so cutting
        one batch overlaps storing the one before, and at most two batches are
        in memory. The final batch waits for its own too.
        """
        used, chunks = self.cut(memoryview(buf), final)
        service = self._service
        zstd = compressor()
        puts: list[Future[None]] = []
        for digest, data in chunks:
            if digest in self._stored:
                continue
            self._stored.add(digest)
            payload = zstd.compress(data) if service.zstd else raw_zstd_frame(data)
            puts.append(
                service.executor.submit(service.put_sync, service.chunk_key(digest), payload)
            )
        waiting = self._puts + puts if final else self._puts
        self._puts = [] if final else puts
        # All of them end before the first failure is raised: none may still be
        # writing (a staging file, say) when the caller learns the write failed.
        wait(waiting)
        for put in waiting:
            put.result()  # raises the first failure
        return buf[used:]

    async def _store_single(self, data: bytes) -> B3Digest:
        # Hashed, compressed and stored in a single job on the I/O pool.
        service = self._service
        return await service.executor.run(service.store_single, data)

    async def _store_record(self, digest: B3Digest, chunks: Sequence[ChunkMeta]) -> None:
        record = pb.StatBlobResponse(
            chunks=[pb.StatBlobResponse.ChunkMeta(digest=c.digest, size=c.size) for c in chunks]
        )
        service = self._service
        await service.executor.run(
            service.put_sync, service.blob_key(digest), record.SerializeToString()
        )
