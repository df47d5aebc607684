"""The object-store blob service: blobs as chunk objects and records (see the package docs)."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable, Sequence, Set
from functools import partial
from typing import TYPE_CHECKING

import blake3
import obstore
from obstore.exceptions import AlreadyExistsError, BaseError, NotSupportedError

from tvix.castore._executor import BatchingExecutor
from tvix.castore.blobservice._readers import BytesBlobReader, ChunkedReader
from tvix.castore.blobservice._zstd import compressor
from tvix.castore.blobservice.base import (
    BlobReader,
    BlobService,
    BlobSweep,
    BlobWriter,
    ChunkMeta,
)
from tvix.castore.blobservice.objectstore._codec import (
    Chunking,
    decode_chunk,
    decode_record,
    digest_key,
    raw_zstd_frame,
)
from tvix.castore.blobservice.objectstore._config import (
    DEFAULT_AVG_CHUNK_SIZE,
    MAX_AVG_CHUNK_SIZE,
    MIN_AVG_CHUNK_SIZE,
    first_line,
)
from tvix.castore.blobservice.objectstore._gc import Found, GCObjects, RemoteObjects
from tvix.castore.blobservice.objectstore._local import LocalFiles
from tvix.castore.blobservice.objectstore._writer import ObjectStoreBlobWriter
from tvix.castore.digest import B3Digest
from tvix.castore.errors import IntegrityError, StorageError, ValidationError

if TYPE_CHECKING:
    from obstore.store import ObjectStore

__all__ = ["IO_THREADS", "READ_AHEAD", "ObjectStoreBlobService"]

# Threads per service doing object I/O: the requests in flight at most.
IO_THREADS = 4
# Chunks a reader fetches ahead while reading front to back (~2 MiB at the
# default chunk size): enough to keep the I/O threads busy.
READ_AHEAD = 8


class ObjectStoreBlobService(BlobService):
    """Blobs chunked by FastCDC into an ``obstore`` object store (see the module docs).

    ``chunks`` lists the chunks of a blob stored as more than one, and ``[]``
    for a blob stored as a single chunk (or for a chunk itself).
    ``open_read`` reads blobs and chunks alike; a reader fetches only the
    chunks its reads touch, keeps the current chunk and up to READ_AHEAD more in
    memory, and prefetches the next while reading front to back.

    Garbage collection: see :mod:`._gc` (seen times, refreshes, quarantined
    deletes).
    """

    supports_gc = True

    def __init__(
        self,
        store: ObjectStore,
        prefix: str = "",
        *,
        zstd: bool = True,
        avg_chunk_size: int = DEFAULT_AVG_CHUNK_SIZE,
        local_root: str | None = None,
    ) -> None:
        """Store under ``prefix`` (``""`` or ending in ``/``) in ``store``.

        ``zstd`` compresses chunks; ``avg_chunk_size`` sets FastCDC's target
        (min half, max twice that). ``local_root``, for a ``LocalStore`` rooted
        there, reads and writes its files directly (see the module docs).
        """
        if prefix and not prefix.endswith("/"):
            prefix += "/"
        if not MIN_AVG_CHUNK_SIZE <= avg_chunk_size <= MAX_AVG_CHUNK_SIZE:
            raise ValidationError(
                f"avg_chunk_size {avg_chunk_size} is outside "
                f"{MIN_AVG_CHUNK_SIZE}..{MAX_AVG_CHUNK_SIZE}"
            )
        self._store = store
        self._local = LocalFiles(local_root) if local_root is not None else None
        self._remote = RemoteObjects(store, prefix)
        self._gc: GCObjects = self._local if self._local is not None else self._remote
        self._prefix = prefix
        self.zstd = zstd
        self.chunking = Chunking.around(avg_chunk_size)
        # Object I/O runs on obstore's blocking API in these threads, each call
        # together with the CPU work around it (see the module docs for why).
        # The threads bound the requests in flight across all readers and writers.
        self.executor = BatchingExecutor(
            IO_THREADS, "tvix-objectstore", "object store blob service is closed"
        )
        # Cleared on the first store that rejects put-if-not-exists; content-
        # addressed objects can then simply be overwritten with the same bytes.
        self._create_mode = True

    @property
    def staging_swept(self) -> list[str]:
        """Stale staging files (of failed or killed writers) removed when the store opened."""
        return self._local.swept if self._local is not None else []

    # -- keys and raw object access (blocking; called in worker threads) -----------------

    def chunk_key(self, digest: bytes) -> str:
        return digest_key("chunks", self._prefix, digest)

    def blob_key(self, digest: bytes) -> str:
        return digest_key("blobs", self._prefix, digest)

    def _get_sync(self, key: str) -> obstore.Bytes | bytes | None:
        try:
            if self._local is not None:
                return self._local.get(key)
            return obstore.get(self._store, key).bytes()
        except FileNotFoundError:
            return None
        except (BaseError, OSError) as e:
            raise StorageError(f"object store: reading {key} failed: {first_line(e)}") from e

    def put_sync(self, key: str, payload: bytes) -> None:
        """Store ``payload`` at content-addressed ``key`` unless something is there already."""
        try:
            if self._local is not None:
                self._local.put(key, payload)
                return
            if self._create_mode:
                at = time.time()
                try:
                    obstore.put(self._store, key, payload, mode="create", use_multipart=False)
                except NotSupportedError:
                    self._create_mode = False
                else:
                    self._remote.remember(key, at)
                    return
            obstore.put(self._store, key, payload, use_multipart=False)
            # A sweep that checked this object just before the PUT does not see it
            # (its re-check reads the marker): marked, then confirmed, like a refresh.
            if not self._remote.refresh_sync(key, force=True):
                obstore.put(self._store, key, payload, use_multipart=False)
        except AlreadyExistsError:
            # The same content, written earlier or concurrently: refreshed, or
            # stored again if a GC deleted it since.
            self._refresh_or_put(key, payload)
        except (BaseError, OSError) as e:
            raise StorageError(f"object store: writing {key} failed: {first_line(e)}") from e

    def _refresh_or_put(self, key: str, payload: bytes) -> None:
        try:
            if not self._remote.refresh_sync(key):
                obstore.put(self._store, key, payload, use_multipart=False)
        except (BaseError, OSError) as e:
            raise StorageError(f"object store: refreshing {key} failed: {first_line(e)}") from e

    def store_single(self, data: bytes) -> B3Digest:
        """Store ``data`` as a blob of one chunk; return its digest."""
        digest = B3Digest(blake3.blake3(data).digest())
        if self.zstd:
            payload = compressor().compress(data)
        else:
            payload = raw_zstd_frame(data)
        self.put_sync(self.chunk_key(digest), payload)
        return digest

    def _read_chunk_sync(self, digest: B3Digest, size: int | None) -> bytes | None:
        """The verified bytes of chunk ``digest`` (of ``size`` if known), ``None`` if absent.

        A chunk whose bytes do not match its digest is removed before the
        error is raised, so the next writer of those bytes stores them again
        (see :meth:`remove_damaged`).
        """
        raw = self._get_sync(self.chunk_key(digest))
        if raw is None:
            return None
        try:
            return decode_chunk(raw, digest, size)
        except IntegrityError:
            with contextlib.suppress(StorageError):
                self._remove_if_damaged(digest)
            raise

    def _damaged(self, raw: obstore.Bytes | bytes, digest: B3Digest) -> bool:
        """Whether the chunk object ``raw`` fails to decode to bytes hashing to ``digest``."""
        try:
            decode_chunk(raw, digest, None)
        except IntegrityError:
            return True
        return False

    def _remove_if_damaged(self, digest: B3Digest) -> bool:
        """Remove chunk ``digest`` if its object (read again) is damaged; whether it went.

        Read again right before: a chunk stored whole meanwhile (after a GC
        deleted the damaged one) is not removed.
        """
        key = self.chunk_key(digest)
        raw = self._get_sync(key)
        if raw is None or not self._damaged(raw, digest):
            return False
        try:
            return self._gc.remove(key)
        except (BaseError, OSError) as e:
            raise StorageError(f"object store: removing {key} failed: {first_line(e)}") from e

    def _remove_damaged_sync(self, digest: B3Digest) -> list[str]:
        removed: list[str] = []
        try:
            listed = self._read_record_sync(digest)
            record, record_bad = listed is not None, False
        except IntegrityError:
            listed, record, record_bad = None, True, True
        wanted = listed if listed is not None else [] if record else [ChunkMeta(digest, -1)]
        for c in wanted:
            raw = self._get_sync(self.chunk_key(c.digest))
            if raw is None:
                record_bad = True
            elif self._remove_if_damaged(c.digest):
                removed.append(f"chunk {c.digest.hex()} (damaged)")
                record_bad = True
            elif c.size >= 0 and len(decode_chunk(raw, c.digest, None)) != c.size:
                record_bad = True
        if record and record_bad:
            key = self.blob_key(digest)
            try:
                self._gc.remove(key)
            except (BaseError, OSError) as e:
                raise StorageError(f"object store: removing {key} failed: {first_line(e)}") from e
            removed.append(
                f"blob record {digest.hex()} (damaged, or lists chunks absent or damaged)"
            )
        return removed

    def _read_record_sync(self, digest: B3Digest) -> list[ChunkMeta] | None:
        raw = self._get_sync(self.blob_key(digest))
        return None if raw is None else decode_record(bytes(raw), digest)

    async def _found(self, key: str) -> bool:
        """Whether ``key`` is stored, refreshing it (see :mod:`._gc`)."""
        if self._local is not None:
            return self._local.refresh(key)
        return await self._remote.found(key)

    async def _exists(self, key: str) -> bool:
        if self._local is not None:
            # A stat of a local file: cheaper than any handoff to a thread.
            return self._local.exists(key)
        # Asynchronous: a HEAD carries no data to process, so there is no thread work to join.
        try:
            await obstore.head_async(self._store, key)
        except FileNotFoundError:
            return False
        except (BaseError, OSError) as e:
            raise StorageError(f"object store: checking {key} failed: {first_line(e)}") from e
        return True

    # -- BlobService ------------------------------------------------------------------------

    async def has(self, digest: B3Digest) -> bool:
        # Chunk first: most blobs are a single chunk.
        return await self._found(self.chunk_key(digest)) or await self._found(self.blob_key(digest))

    async def open_read(self, digest: B3Digest) -> BlobReader | None:
        data = await self.executor.run(self._read_chunk_sync, digest, None)
        if data is not None:
            return BytesBlobReader(data)
        chunks = await self.executor.run(self._read_record_sync, digest)
        if chunks is None:
            return None
        return ChunkedReader(
            digest,
            chunks,
            partial(self._fetch_chunk, digest),
            mismatch=lambda got: (
                f"blob {digest.hex()}: its record lists chunks hashing to {got.hex()}"
            ),
            ahead_chunks=READ_AHEAD,
        )

    async def _fetch_chunk(self, blob: B3Digest, meta: ChunkMeta) -> bytes:
        """Chunk ``meta`` of ``blob``, verified (on the I/O threads)."""
        data = await self.executor.run(self._read_chunk_sync, meta.digest, meta.size)
        if data is None:
            raise StorageError(
                f"blob {blob.hex()}: chunk {meta.digest.hex()} is missing (the store is damaged)"
            )
        return data

    def open_write(self) -> BlobWriter:
        return ObjectStoreBlobWriter(self)

    async def read_many(self, digests: Sequence[B3Digest]) -> list[bytes | None]:
        # Single-chunk blobs (most small files) in one pool job per batch;
        # anything stored in several chunks goes through a reader.
        out = await self.executor.run(self._read_chunks_sync, list(digests))
        for i, data in enumerate(out):
            if data is None:
                out[i] = await self._read_whole(digests[i])
        return out

    def _read_chunks_sync(self, digests: list[B3Digest]) -> list[bytes | None]:
        return [self._read_chunk_sync(d, None) for d in digests]

    async def chunks(self, digest: B3Digest) -> list[ChunkMeta] | None:
        chunks = await self.executor.run(self._read_record_sync, digest)
        if chunks is not None:
            return chunks
        return [] if await self._exists(self.chunk_key(digest)) else None

    # -- garbage collection -------------------------------------------------------------------

    async def sweep(self, live: Set[bytes], cutoff: float, *, dry_run: bool = False) -> BlobSweep:
        """Blob records first, then chunks; each object re-checked and quarantined (``_gc``)."""
        gc, run = self._gc, self.executor.run
        result = BlobSweep()
        try:
            if not dry_run:
                await run(gc.recover)
            cutoff += await run(gc.server_offset)
            records = await run(lambda: list(gc.scan("blobs")))
            keep = [B3Digest(f.digest) for f in records if f.digest in live or f.seen >= cutoff]
            doomed = [f for f in records if f.digest not in live and f.seen < cutoff]
            result.blobs, result.bytes, stayed = await self._delete_unseen(
                self.blob_key, doomed, cutoff, dry_run
            )
            keep += [B3Digest(f.digest) for f in stayed]
            # Every record that stays keeps its chunks, whoever else refers to them.
            needed = set(live)
            for digest in keep:
                try:
                    chunks = await run(self._read_record_sync, digest)
                except IntegrityError as e:
                    raise IntegrityError(
                        f"{e}; its chunks cannot be told apart from garbage: run "
                        "`tvix-store verify --repair` first"
                    ) from None
                needed.update(bytes(c.digest) for c in chunks or ())
            found = await run(lambda: list(gc.scan("chunks")))
            doomed = [f for f in found if f.digest not in needed and f.seen < cutoff]
            result.chunks, nbytes, _ = await self._delete_unseen(
                self.chunk_key, doomed, cutoff, dry_run
            )
            result.bytes += nbytes
            if not dry_run:
                await run(gc.finish, cutoff)
        except (BaseError, OSError) as e:
            raise StorageError(f"object store: garbage collection failed: {first_line(e)}") from e
        return result

    async def remove_damaged(self, digest: B3Digest) -> list[str]:
        return await self.executor.run(self._remove_damaged_sync, digest)

    async def verify_storage(self, *, repair: bool = False) -> list[str]:
        """Read and check every chunk and blob record; the problems (empty: all is well).

        Found: chunks whose bytes do not match their digest, records that are
        damaged or list a chunk not stored. ``repair``: those are removed too
        (as :meth:`remove_damaged` does), so that writers store them again.
        """
        gc, run = self._gc, self.executor.run
        problems: list[str] = []
        chunks = await run(lambda: [B3Digest(f.digest) for f in gc.scan("chunks")])
        groups = [chunks[i : i + 64] for i in range(0, len(chunks), 64)]
        gone: set[bytes] = set()
        for start in range(0, len(groups), IO_THREADS):
            for found, removed in await asyncio.gather(
                *(
                    run(self._check_chunks_sync, g, repair)
                    for g in groups[start : start + IO_THREADS]
                )
            ):
                problems += found
                gone.update(removed)
        stored = {bytes(c) for c in chunks} - gone
        for digest in await run(lambda: [B3Digest(f.digest) for f in gc.scan("blobs")]):
            problems += await run(self._check_record_sync, digest, stored, repair)
        return problems

    def _check_chunks_sync(
        self, digests: list[B3Digest], repair: bool
    ) -> tuple[list[str], list[bytes]]:
        problems: list[str] = []
        removed: list[bytes] = []
        for d in digests:
            raw = self._get_sync(self.chunk_key(d))
            if raw is None or not self._damaged(raw, d):
                continue
            problems.append(f"chunk {d.hex()}: its object does not hold bytes of that digest")
            if repair and self._remove_if_damaged(d):
                problems.append(f"removed chunk {d.hex()} (damaged)")
                removed.append(bytes(d))
        return problems, removed

    def _check_record_sync(self, digest: B3Digest, stored: set[bytes], repair: bool) -> list[str]:
        try:
            listed = self._read_record_sync(digest)
        except IntegrityError as e:
            problem = str(e)
        else:
            if listed is None:
                return []
            missing = [c.digest for c in listed if bytes(c.digest) not in stored]
            if not missing:
                return []
            problem = f"blob {digest.hex()}: chunk {missing[0].hex()} is not stored"
        if not repair:
            return [problem]
        return [problem, *(f"removed {r}" for r in self._remove_damaged_sync(digest))]

    async def _delete_unseen(
        self, key: Callable[[bytes], str], doomed: list[Found], cutoff: float, dry_run: bool
    ) -> tuple[int, int, list[Found]]:
        """Delete ``doomed``, each re-checked (none, dry).

        Returns how many went, their bytes, and those that stayed (refreshed meanwhile).
        """
        gone = await self._deleted(key, doomed, cutoff, dry_run)
        deleted = [f for f, g in zip(doomed, gone, strict=True) if g]
        stayed = [f for f, g in zip(doomed, gone, strict=True) if not g]
        return len(deleted), sum(f.size for f in deleted), stayed

    async def _deleted(
        self, key: Callable[[bytes], str], doomed: list[Found], cutoff: float, dry_run: bool
    ) -> list[bool]:
        """Which of ``doomed`` were deleted (re-checked each); all of them, dry."""
        if dry_run:
            return [True] * len(doomed)
        gc = self._gc

        def delete(group: list[Found]) -> list[bool]:
            return [gc.delete_unseen(key(f.digest), cutoff) for f in group]

        # In runs of 64 on every I/O thread: a request each, on an object store.
        groups = [doomed[i : i + 64] for i in range(0, len(doomed), 64)]
        out: list[bool] = []
        for start in range(0, len(groups), IO_THREADS):
            done = await asyncio.gather(
                *(self.executor.run(delete, g) for g in groups[start : start + IO_THREADS])
            )
            out += [gone for part in done for gone in part]
        return out

    async def close(self) -> None:
        self.executor.shutdown()
