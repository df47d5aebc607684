"""The packed blob service: chunks appended to packs, found through an index.

Writing. Blobs are cut by FastCDC exactly as ``objectstore`` cuts them
(upstream's 128/256/512 KiB by default), so a blob of one chunk (most files)
is stored as that chunk and needs no record; a multi-chunk blob gets a
record listing its chunks (the gRPC ``Stat`` answer). Chunks not yet
indexed go to the service's one *committer*: every chunk handed over in the
same turn of the event loop, or while the previous commit ran, is encoded
(zstd when it pays), appended to the current pack with one write, made
durable (``fdatasync``, or the PUT of the pack object), and only then
indexed, in one transaction. That is a group commit: sixteen files closed
at once cost one write, one sync and one transaction, not sixteen. A blob
writer returns from ``close`` once the commit holding its last chunk (and
then its record) is done. Large blobs are cut, and hashed with blake3's
threads, in a worker thread 4 MiB at a time (the writer the chunking
backends share, :mod:`tvix.castore.blobservice._writers`) while the committer stores the
previous batch: the two stages run on both cores, and a writer holds about
two batches.

Reading. Every chunk is read through its index row and verified against its
digest; neighbouring payloads in one pack are read with one ``pread`` or one
ranged GET (see :func:`._format.coalesce`). ``read_many`` (NAR rendering,
extraction) reads a batch of small blobs in one job; a reader over a
multi-chunk blob fetches 32 chunks (8 MiB) at a time and the next window
while the current one is consumed, and, read front to back, checks the
whole blob's digest too. Index lookups from many concurrent callers in one
turn of the event loop are answered by one query.

Garbage collection (an index with ``supports_gc``: both). A chunk
or blob found present by ``has`` or by a writer deduplicating against it is
*refreshed* (its ``seen`` time moved to now, when older than
:data:`REFRESH_SLACK`) in the same step that confirms it is still there; a
sweep deletes only rows seen before its cutoff (:meth:`PacksBlobService.sweep`).
:meth:`PacksBlobService.compact` rewrites the live chunks of packs that are
mostly dead into new packs, switches their index rows, then deletes the old
pack; a reader that raced it looks its chunks up again.
"""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import io
import threading
import time
from collections.abc import Awaitable, Callable, Iterable, Sequence, Set
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

import blake3
from typing_extensions import override

from tvix.castore.blobservice import BytesBlobReader
from tvix.castore.blobservice._writers import ChunkingBlobWriter
from tvix.castore.blobservice.base import (
    BlobReader,
    BlobService,
    BlobSweep,
    BlobWriter,
    ChunkMeta,
)
from tvix.castore.blobservice.packs._format import (
    CODEC_ZSTD,
    HEADER,
    HEADER_SIZE,
    MAGIC,
    Location,
    coalesce,
    decode,
    encode,
)
from tvix.castore.blobservice.packs._index import (
    Entry,
    PackIndex,
    PackInfo,
    SQLiteIndex,
    decode_record,
    encode_record,
    now,
)
from tvix.castore.blobservice.packs._storage import PackStorage
from tvix.castore.digest import B3Digest
from tvix.castore.errors import CastoreError, IntegrityError, StorageError, ValidationError

__all__ = ["CompactResult", "PacksBlobService"]

V = TypeVar("V")
T = TypeVar("T")

KIB = 1024
MIB = 1024 * KIB
DEFAULT_AVG_CHUNK_SIZE = 256 * KIB
MIN_AVG_CHUNK_SIZE = 4 * KIB
MAX_AVG_CHUNK_SIZE = 1 * MIB
DEFAULT_PACK_SIZE = 64 * MIB
MIN_PACK_SIZE = 1 * MIB
# Lazy appends (the middle of a large blob) are synced and indexed at least
# this often, so a crash loses at most this much work of a blob being written.
SYNC_EVERY = 64 * MIB
# After 4 chunks in a row of a blob that zstd did not shrink, this many more
# are stored without trying (~16 MiB), then it tries again.
SKIP_ZSTD = 64
# Remote packs: a commit (one PUT) smaller than this waits LINGER seconds for
# more to join, so that small files cost well under one request per MiB.
PUT_TARGET = 4 * MIB
LINGER = 0.02
# Threads reading packs: the reads (or ranged GETs) in flight at most.
IO_THREADS = 4
# Chunks a reader fetches at once while reading front to back (~8 MiB), and
# the windows it keeps in flight ahead (fetched and verified in parallel: two
# keep both cores busy decompressing and verifying; 540 vs 460 MB/s for
# compressible data through the mount, the same for incompressible).
WINDOW = 32
AHEAD = 2
# Rows found present are refreshed when last seen longer ago than this
# (seconds): a refresh is a write, so a busy store writes each row at most
# once a minute. A GC's grace period must be longer (see tvix.store.gc).
REFRESH_SLACK = 60
# A pack object the index does not know is deleted by compaction once older
# than this (seconds): a commit follows its PUT within moments.
ORPHAN_AGE = 3600
# Bytes of live entries compaction copies per new-pack append.
COMPACT_BATCH = 16 * MIB


@dataclass(slots=True)
class CompactResult:
    """What :meth:`PacksBlobService.compact` did (or, dry, would do)."""

    packs: int = 0
    """Packs rewritten (or deleted, when nothing in them was live)."""
    moved: int = 0
    """Live bytes copied into new packs."""
    freed: int = 0
    """Bytes of pack storage released (old packs' size minus what was copied)."""


# A verified chunk: bytes, or a view into the buffer it was read into.
Chunk = bytes | memoryview


@dataclass(slots=True)
class _Item:
    """A chunk on its way into a pack.

    Raw (``header`` None: the committer encodes it) or already encoded.
    """

    digest: bytes
    data: bytes | memoryview
    header: bytes | None = None


class _Batcher(Generic[V]):
    """Answers lookups of single keys made in one turn of the event loop with one query.

    ``fetch_sync``, when given (an SQLite index), answers in the loop's
    callback itself: a query of a few hundred keys costs less than a task.
    Every caller waits on a future of its own, so one being cancelled
    cancels nothing for the others.
    """

    def __init__(
        self,
        fetch: Callable[[list[bytes]], Awaitable[dict[bytes, V]]],
        fetch_sync: Callable[[list[bytes]], dict[bytes, V]] | None = None,
    ) -> None:
        self._fetch = fetch
        self._fetch_sync = fetch_sync
        self._waiting: dict[bytes, list[asyncio.Future[V | None]]] = {}

    async def get(self, key: bytes) -> V | None:
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[V | None] = loop.create_future()
        waiters = self._waiting.get(key)
        if waiters is None:
            if not self._waiting:
                loop.call_soon(self._start)
            self._waiting[key] = [fut]
        else:
            waiters.append(fut)
        return await fut

    def _start(self) -> None:
        waiting, self._waiting = self._waiting, {}
        if self._fetch_sync is None:
            task = asyncio.ensure_future(self._run(waiting))
            task.add_done_callback(_retrieve)
            return
        try:
            found = self._fetch_sync(list(waiting))
        except Exception as e:
            self._fail(waiting, e)
        else:
            self._resolve(waiting, found)

    async def _run(self, waiting: dict[bytes, list[asyncio.Future[V | None]]]) -> None:
        try:
            found = await self._fetch(list(waiting))
        except Exception as e:
            self._fail(waiting, e)
        else:
            self._resolve(waiting, found)

    @staticmethod
    def _resolve(
        waiting: dict[bytes, list[asyncio.Future[V | None]]], found: dict[bytes, V]
    ) -> None:
        for key, futs in waiting.items():
            value = found.get(key)
            for fut in futs:
                if not fut.done():
                    fut.set_result(value)

    @staticmethod
    def _fail(waiting: dict[bytes, list[asyncio.Future[V | None]]], e: Exception) -> None:
        for futs in waiting.values():
            for fut in futs:
                if not fut.done():
                    fut.set_exception(e)
                    fut.add_done_callback(_retrieve)


def _retrieve(fut: asyncio.Future[Any]) -> None:
    """Mark a future's exception as seen (someone else reports it, or nobody needs it)."""
    if not fut.cancelled():
        fut.exception()


class PacksBlobService(BlobService):
    """Blobs chunked by FastCDC into packs with an index (see the package docs).

    ``chunks`` lists the chunks of a blob stored as more than one and ``[]``
    for a single-chunk blob (or a chunk); ``open_read`` reads blobs and
    chunks alike.
    """

    def __init__(
        self,
        storage: PackStorage,
        index: PackIndex,
        *,
        zstd: bool = True,
        avg_chunk_size: int = DEFAULT_AVG_CHUNK_SIZE,
        pack_size: int = DEFAULT_PACK_SIZE,
        local: bool = True,
    ) -> None:
        """A service storing packs in ``storage``, indexed by ``index``.

        ``local``: reads are cheap syscalls (one job may do many); else each
        coalesced read is a request, spread over the I/O threads.
        """
        if not MIN_AVG_CHUNK_SIZE <= avg_chunk_size <= MAX_AVG_CHUNK_SIZE:
            raise ValidationError(
                f"avg_chunk_size {avg_chunk_size} is outside "
                f"{MIN_AVG_CHUNK_SIZE}..{MAX_AVG_CHUNK_SIZE}"
            )
        self.storage = storage
        self.index = index
        self._zstd = zstd
        self._min = avg_chunk_size // 2
        self._avg = avg_chunk_size
        self._max = avg_chunk_size * 2
        self._pack_size = max(pack_size, MIN_PACK_SIZE)
        self._local = local
        self._io = ThreadPoolExecutor(IO_THREADS, thread_name_prefix="tvix-packs-read")
        self._writer = ThreadPoolExecutor(1, thread_name_prefix="tvix-packs-write")
        # Whole-blob hashes of readers (in order per reader: one thread).
        self._hashing = ThreadPoolExecutor(1, thread_name_prefix="tvix-packs-hash")
        sync = index if isinstance(index, SQLiteIndex) else None
        self._locations: _Batcher[Location] = _Batcher(
            index.locate, sync.locate_sync if sync else None
        )
        self._present: _Batcher[bool] = _Batcher(index.present, sync.present_sync if sync else None)
        self._records: _Batcher[bytes] = _Batcher(
            index.records, sync.records_sync if sync else None
        )
        self._refreshed: _Batcher[bool] = _Batcher(self._refresh_many)
        # Single-chunk blobs opened in one turn of the loop (extraction and
        # mounts open many at once): read together, in one job.
        self._small: _Batcher[bytes | CastoreError] = _Batcher(self._read_chunks)
        # The next commit: chunks and records waiting, and the future it resolves.
        self._pending: list[_Item] = []
        self._pending_records: list[tuple[bytes, bytes]] = []
        self._pending_bytes = 0
        self._next: asyncio.Future[None] | None = None
        # Chunks handed to the committer and not yet committed: their commit's future.
        self._inflight: dict[bytes, asyncio.Future[None]] = {}
        self._committer: asyncio.Task[None] | None = None
        # Whether every submission to the next commit was lazy.
        self._next_lazy = True
        # Written, not yet synced and indexed (writer thread only): [pack, end, entries].
        self._unsynced: list[Any] = []
        self._unsynced_bytes = 0
        self._closed = False

    # -- committing ---------------------------------------------------------------------------

    def _submit(
        self,
        items: Iterable[_Item],
        records: Sequence[tuple[bytes, bytes]] = (),
        *,
        lazy: bool = False,
    ) -> set[asyncio.Future[None]]:
        """Hand chunks, and records whose chunks are all committed, to the committer.

        Returns the commits to wait for.

        ``lazy`` (the middle of a large blob): the chunks need only be written,
        not yet durable and indexed; a later commit that is not lazy (the
        blob's last batch, before its record) syncs and indexes them.
        """
        if self._closed:
            raise StorageError("packs blob service is closed")
        if not lazy:
            self._next_lazy = False
        waits: set[asyncio.Future[None]] = set()
        for item in items:
            fut = self._inflight.get(item.digest)
            if fut is None:
                fut = self._inflight[item.digest] = self._next_commit()
                self._pending.append(item)
                self._pending_bytes += len(item.data)
            waits.add(fut)
        if records:
            self._pending_records.extend(records)
            waits.add(self._next_commit())
        if waits and self._committer is None:
            self._committer = asyncio.ensure_future(self._commit_loop())
        return waits

    def _next_commit(self) -> asyncio.Future[None]:
        if self._next is None:
            self._next = asyncio.get_running_loop().create_future()
            self._next.add_done_callback(_retrieve)
        return self._next

    async def _commit_loop(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            while self._next is not None:
                if not self._local and self._pending_bytes < PUT_TARGET:
                    # Each commit is one PUT: let the writers of this burst (a
                    # batch of small files closing together) join it first.
                    await asyncio.sleep(LINGER)
                items, self._pending = self._pending, []
                self._pending_bytes = 0
                records, self._pending_records = self._pending_records, []
                fut, self._next = self._next, None
                lazy, self._next_lazy = self._next_lazy, True
                try:
                    if self.index.sync_commit:
                        await loop.run_in_executor(
                            self._writer, self._store_sync, items, records, lazy
                        )
                    else:
                        placed = await loop.run_in_executor(self._writer, self._append_sync, items)
                        await self.index.commit(*placed, records)
                except BaseException as e:
                    fut.set_exception(e if isinstance(e, Exception) else StorageError(str(e)))
                    if not isinstance(e, Exception):
                        raise
                else:
                    fut.set_result(None)
                finally:
                    for item in items:
                        if self._inflight.get(item.digest) is fut:
                            del self._inflight[item.digest]
        finally:
            self._committer = None

    def _append_sync(self, items: list[_Item], sync: bool = True) -> tuple[str, int, list[Entry]]:
        """Encode ``items`` and append them to a pack (in the writer thread).

        Durably, unless not ``sync``.
        """
        if not items:
            return "", 0, []
        parts: list[bytes] = []
        raw: list[tuple[bytes, int, int, int]] = []  # digest, length, size, codec
        for item in items:
            header = item.header
            if header is None:
                header, payload, _codec = encode(item.digest, item.data, self._zstd)
            else:
                payload = bytes(item.data)
            _d, size, length, codec = HEADER.unpack(header)
            parts.append(header)
            parts.append(payload)
            raw.append((item.digest, length, size, codec))
        pack, start, end = self.storage.append(parts, self._pack_size, sync)
        entries = []
        pos = start
        for digest, length, size, codec in raw:
            pos += HEADER_SIZE
            entries.append(Entry(digest, pos, length, size, codec))
            pos += length
        return pack, end, entries

    def _store_sync(
        self, items: list[_Item], records: list[tuple[bytes, bytes]], lazy: bool
    ) -> None:
        """Append ``items``; unless ``lazy``, sync and index all appended so far.

        ``records`` are indexed with them. For an index committed in this thread.
        """
        if self._unsynced and self.storage.rolls(self._pack_size):
            # The pack is about to be let go: what it holds must be durable and
            # indexed first, or another writer taking it over would cut it off.
            self._sync_unsynced([])
        if items:
            pack, end, entries = self._append_sync(items, sync=False)
            if self._unsynced and pack != self._unsynced[0]:
                raise AssertionError("unsynced entries span packs")
            self._unsynced = [pack, end, self._unsynced[2] + entries if self._unsynced else entries]
            self._unsynced_bytes += sum(HEADER_SIZE + e.length for e in entries)
        if not lazy or self._unsynced_bytes >= SYNC_EVERY:
            self._sync_unsynced(records)

    def _sync_unsynced(self, records: list[tuple[bytes, bytes]]) -> None:
        if self._unsynced:
            pack, end, entries = self._unsynced
            self.storage.sync()
            self.index.commit_sync(pack, end, entries, records)
        elif records:
            self.index.commit_sync("", 0, [], records)
        self._unsynced = []
        self._unsynced_bytes = 0

    async def _wait(self, waits: set[asyncio.Future[None]]) -> None:
        for fut in waits:
            await asyncio.shield(fut)

    # -- refreshing ---------------------------------------------------------------------------

    @property
    def supports_gc(self) -> bool:  # type: ignore[override]
        """Whether :meth:`sweep` and :meth:`compact` work (the index supports them)."""
        return self.index.supports_gc

    async def _refresh_many(self, digests: list[bytes]) -> dict[bytes, bool]:
        present = await self.index.refresh(digests, now() - REFRESH_SLACK)
        return dict.fromkeys(present, True)

    async def _found(self, digest: bytes) -> bool:
        """Whether ``digest`` is stored (chunk or blob record), refreshing it."""
        if self.index.supports_gc:
            return await self._refreshed.get(digest) is not None
        return (
            await self._present.get(digest) is not None
            or await self._records.get(digest) is not None
        )

    # -- reading ------------------------------------------------------------------------------

    def _read_sync(
        self,
        wanted: Sequence[tuple[bytes, Location]],
        after: Callable[[list[Chunk]], None] | None = None,
    ) -> list[Chunk]:
        """The verified chunks ``wanted``, with neighbours in a pack read at once.

        ``after`` is called with them in this thread. A chunk that compaction
        moved meanwhile (its pack gone) is looked up again and read from where
        it is now.
        """
        try:
            return self._read_sync_once(wanted, after)
        except (StorageError, IntegrityError) as e:
            if not isinstance(self.index, SQLiteIndex):
                raise
            fresh = self.index.locate_sync([d for d, _loc in wanted])
            if all(fresh.get(d) == loc for d, loc in wanted):
                if isinstance(e, IntegrityError):
                    self._drop_damaged_sync(wanted)
                raise
            moved = [(d, fresh.get(d, loc)) for d, loc in wanted]
            return self._read_sync_once(moved, after)

    def _read_sync_once(
        self,
        wanted: Sequence[tuple[bytes, Location]],
        after: Callable[[list[Chunk]], None] | None = None,
    ) -> list[Chunk]:
        out: list[Chunk] = [b""] * len(wanted)
        for run in coalesce([loc for _d, loc in wanted]):
            buf = memoryview(self.storage.read(run.pack, run.start, run.end))
            for i in run.members:
                digest, loc = wanted[i]
                at = loc.offset - run.start
                out[i] = decode(buf[at : at + loc.length], digest, loc.size, loc.codec)
        if after is not None:
            after(out)
        return out

    async def _read(
        self,
        wanted: Sequence[tuple[bytes, Location]],
        after: Callable[[list[Chunk]], None] | None = None,
    ) -> list[Chunk]:
        try:
            return await self._read_once(wanted, after)
        except (StorageError, IntegrityError) as e:
            if isinstance(self.index, SQLiteIndex) or not self.index.supports_gc:
                raise  # the SQLite index is asked again in _read_sync already
            # Compaction may have moved the chunks (their pack object deleted).
            fresh = await self.index.locate(list({d for d, _loc in wanted}))
            if all(fresh.get(d) == loc for d, loc in wanted):
                if isinstance(e, IntegrityError):
                    await self._drop_damaged(wanted)
                raise
            return await self._read_once([(d, fresh.get(d, loc)) for d, loc in wanted], after)

    async def _read_once(
        self,
        wanted: Sequence[tuple[bytes, Location]],
        after: Callable[[list[Chunk]], None] | None = None,
    ) -> list[Chunk]:
        if self._closed:
            raise StorageError("packs blob service is closed")
        loop = asyncio.get_running_loop()
        if self._local or len(wanted) <= 1 or after is not None:
            return await loop.run_in_executor(self._io, self._read_sync, wanted, after)
        # Remote: each coalesced read is a request; spread them over the threads.
        runs = coalesce([loc for _d, loc in wanted])
        groups = [runs[i::IO_THREADS] for i in range(min(IO_THREADS, len(runs)))]
        parts = await asyncio.gather(
            *(
                loop.run_in_executor(
                    self._io, self._read_sync, [wanted[i] for r in g for i in r.members]
                )
                for g in groups
            )
        )
        out: list[Chunk] = [b""] * len(wanted)
        for g, data in zip(groups, parts, strict=True):
            for i, chunk in zip((i for r in g for i in r.members), data, strict=True):
                out[i] = chunk
        return out

    async def _record(self, digest: bytes) -> list[ChunkMeta] | None:
        raw = await self._records.get(digest)
        if raw is None:
            return None
        chunks = decode_record(raw, digest)
        if len(chunks) < 2 or any(c.size <= 0 or c.size > 2 * MAX_AVG_CHUNK_SIZE for c in chunks):
            raise IntegrityError(f"blob {digest.hex()}: damaged blob record")
        return chunks

    # -- BlobService --------------------------------------------------------------------------

    async def has(self, digest: B3Digest) -> bool:
        return await self._found(digest)

    async def _read_chunks(self, digests: list[bytes]) -> dict[bytes, bytes | CastoreError]:
        """The chunks among ``digests``, read and verified together.

        An absent one is left out; a damaged one maps to its error, for that
        chunk's reader alone.
        """
        if self._closed:
            raise StorageError("packs blob service is closed")
        loop = asyncio.get_running_loop()
        if self._local and isinstance(self.index, SQLiteIndex):
            return await loop.run_in_executor(self._io, self._read_many_sync, digests)
        found = await self.index.locate(digests)
        wanted = [(d, found[d]) for d in digests if d in found]
        if len(wanted) > 1:
            try:
                chunks = await self._read(wanted)
            except CastoreError:
                pass  # which one: below
            else:
                return {d: bytes(c) for (d, _), c in zip(wanted, chunks, strict=True)}
        return await loop.run_in_executor(self._io, self._read_isolated, wanted)

    async def open_read(self, digest: B3Digest) -> BlobReader | None:
        data = await self._small.get(digest)
        if isinstance(data, CastoreError):
            raise data
        if data is not None:
            return BytesBlobReader(data)
        chunks = await self._record(digest)
        if chunks is None:
            return None
        return _PacksReader(self, digest, chunks)

    def open_write(self) -> BlobWriter:
        return _PacksBlobWriter(self)

    async def read_many(self, digests: Sequence[B3Digest]) -> list[bytes | None]:
        if not digests:
            return []
        # Lookups, reads and verification in one job, off the event loop.
        data = await self._read_chunks(list(dict.fromkeys(digests)))
        out: list[bytes | None] = []
        for d in digests:
            got = data.get(d)
            if isinstance(got, CastoreError):
                raise got
            out.append(got if got is not None else await self._read_whole(d))
        return out

    def _read_many_sync(self, digests: Sequence[bytes]) -> dict[bytes, bytes | CastoreError]:
        assert isinstance(self.index, SQLiteIndex)
        found = self.index.locate_sync(list(set(digests)))
        wanted = [(d, found[d]) for d in dict.fromkeys(digests) if d in found]
        return self._read_isolated(wanted)

    def _read_isolated(
        self, wanted: list[tuple[bytes, Location]]
    ) -> dict[bytes, bytes | CastoreError]:
        """Like :meth:`_read_sync`, but a damaged chunk fails only its own reader."""
        try:
            chunks = self._read_sync(wanted)
        except CastoreError:
            out: dict[bytes, bytes | CastoreError] = {}
            for d, loc in wanted:  # rare: find which, one by one
                try:
                    out[d] = bytes(self._read_sync([(d, loc)])[0])
                except CastoreError as e:
                    out[d] = e
            return out
        return {d: bytes(c) for (d, _), c in zip(wanted, chunks, strict=True)}

    async def chunks(self, digest: B3Digest) -> list[ChunkMeta] | None:
        chunks = await self._record(digest)
        if chunks is not None:
            return chunks
        return [] if await self._locations.get(digest) is not None else None

    # -- garbage collection -------------------------------------------------------------------

    @override
    async def sweep(self, live: Set[bytes], cutoff: float, *, dry_run: bool = False) -> BlobSweep:
        """Only the index changes: the bytes stay in their packs until :meth:`compact`."""
        self._check_gc()
        r = await self.index.sweep(set(live), cutoff, dry_run=dry_run)
        return BlobSweep(r.records, r.chunks, r.bytes)

    # -- repair -------------------------------------------------------------------------------
    #
    # Deduplication trusts the index: a writer whose chunk is indexed does not
    # read the stored copy (that would read every chunk of every import again).
    # So a chunk found damaged is dropped from the index at once: by any read
    # that fails to verify it (_read_sync, _read) and by remove_damaged (verify
    # --repair). The next writer of those bytes then stores them again.

    def _damaged_sync(
        self, wanted: Sequence[tuple[bytes, Location]]
    ) -> list[tuple[bytes, Location]]:
        """Those of ``wanted`` whose stored bytes do not verify (read one by one)."""
        bad = []
        for d, loc in dict.fromkeys(wanted):
            try:
                self._read_sync_once([(d, loc)])
            except IntegrityError:
                bad.append((d, loc))
        return bad

    def _drop_damaged_sync(self, wanted: Sequence[tuple[bytes, Location]]) -> None:
        """Drop the index rows of the damaged ones among ``wanted`` (SQLite index).

        Best effort: the read fails with its own error whatever happens here.
        """
        assert isinstance(self.index, SQLiteIndex)
        bad = self._damaged_sync(wanted)
        if bad:
            with contextlib.suppress(StorageError):
                self.index.drop_sync(bad)

    async def _drop_damaged(self, wanted: Sequence[tuple[bytes, Location]]) -> None:
        """:meth:`_drop_damaged_sync` for a remote index."""
        loop = asyncio.get_running_loop()
        bad = await loop.run_in_executor(self._io, self._damaged_sync, wanted)
        if bad:
            with contextlib.suppress(StorageError):
                await self.index.drop(bad)

    @override
    async def remove_damaged(self, digest: B3Digest) -> list[str]:
        self._check_gc()
        removed: list[str] = []
        raw = (await self.index.records([digest])).get(digest)
        record_bad = False
        if raw is None:
            wanted = [ChunkMeta(digest, -1)]
        else:
            try:
                wanted = decode_record(raw, digest)
            except IntegrityError:
                wanted, record_bad = [], True
        found = await self.index.locate([c.digest for c in wanted])
        if raw is not None and (
            len(found) < len(wanted)
            or any(found[c.digest].size != c.size for c in wanted if c.digest in found)
        ):
            record_bad = True
        loop = asyncio.get_running_loop()
        bad = await loop.run_in_executor(
            self._io,
            self._damaged_sync,
            [(c.digest, found[c.digest]) for c in wanted if c.digest in found],
        )
        await self.index.drop(bad, [digest] if raw is not None and (record_bad or bad) else [])
        removed += [f"chunk {d.hex()} (damaged, in pack {loc.pack})" for d, loc in bad]
        if raw is not None and (record_bad or bad):
            removed.append(f"blob record {digest.hex()} (lists chunks absent or damaged)")
        return removed

    def _check_gc(self) -> None:
        if not self.index.supports_gc:
            raise StorageError(
                f"{type(self.index).__name__}: this pack index has no garbage collection"
            )

    async def compact(
        self, threshold: float, max_unused: float = 1.0, *, dry_run: bool = False
    ) -> CompactResult:
        """Rewrite the packs that are mostly dead, and then the most dead ones.

        First those whose live fraction is below ``threshold``, then, while
        dead bytes exceed ``max_unused`` of all pack bytes, the next most dead.
        The first rule reclaims mostly dead packs at a low copying cost; the
        second bounds the waste of the whole store (restic's ``--max-unused``)
        when deletions are spread thinly over many packs. Each pack chosen
        (one no writer is appending to) has its live entries copied into new
        packs, durably, then its index rows switched to the copies in one
        transaction, then the pack deleted. Packs with nothing
        live are just deleted. A crash at any point leaves every chunk
        indexed in a pack that holds it; a pack the index forgot or never
        learnt of is deleted by the next compaction (or writer).
        """
        self._check_gc()
        loop = asyncio.get_running_loop()
        result = CompactResult()
        output = self.storage.compactor()
        try:
            if not dry_run:
                await loop.run_in_executor(self._writer, self._let_go)
                await loop.run_in_executor(self._writer, output.reclaim)
                if not self._local:
                    await self._reclaim_remote()
            for info in self._choose(await self.index.packs(), threshold, max_unused):
                if dry_run:
                    result.packs += 1
                    result.moved += info.live
                    result.freed += info.size - info.live
                    continue
                claim = await loop.run_in_executor(self._writer, self.storage.claim, info.name)
                if claim is None:
                    continue  # a writer is appending to it: next time
                try:
                    moved = await self._compact_pack(info.name, output)
                    if await self.index.forget_if_empty(info.name):
                        await loop.run_in_executor(self._writer, self.storage.delete, info.name)
                        result.packs += 1
                        result.moved += moved
                        result.freed += info.size - moved
                finally:
                    await loop.run_in_executor(self._writer, self.storage.unclaim, claim)
        finally:
            if output is not self.storage:
                await loop.run_in_executor(self._writer, output.close)
        return result

    @staticmethod
    def _choose(infos: list[PackInfo], threshold: float, max_unused: float) -> list[PackInfo]:
        """The packs to compact (see :meth:`compact`), most dead first."""

        def live_fraction(info: PackInfo) -> float:
            body = info.size - len(MAGIC)
            return info.live / body if body > 0 else 1.0

        total = sum(i.size for i in infos)
        dead = sum(i.size - len(MAGIC) - i.live for i in infos)
        chosen = []
        for info in sorted(infos, key=live_fraction):
            fraction = live_fraction(info)
            if fraction >= 1.0:
                break
            if info.live == 0 or fraction < threshold or dead > max_unused * total:
                chosen.append(info)
                waste = info.size - len(MAGIC) - info.live
                dead -= waste
                total -= waste
        return chosen

    async def _reclaim_remote(self) -> None:
        """Delete pack objects the index never learnt of, once older than :data:`ORPHAN_AGE`.

        Those are left by a crash between a pack's PUT and its index commit.
        """
        loop = asyncio.get_running_loop()
        stored = await loop.run_in_executor(self._io, self.storage.listing)
        indexed = {p.name for p in await self.index.packs()}
        for name in stored.keys() - indexed:
            try:
                born = int(name.partition("-")[0], 16)
            except ValueError:
                continue  # not one of ours
            if time.time() - born > ORPHAN_AGE:
                await loop.run_in_executor(self._io, self.storage.delete, name)

    def _let_go(self) -> None:
        """Commit what this service appended and let its pack go (in the writer thread)."""
        self._sync_unsynced([])
        self.storage.let_go()

    async def _compact_pack(self, pack: str, output: PackStorage) -> int:
        loop = asyncio.get_running_loop()
        entries = await self.index.entries(pack)
        moved = 0
        i = 0
        while i < len(entries):
            batch: list[tuple[bytes, Location]] = []
            size = 0
            while i < len(entries) and (not batch or size < COMPACT_BATCH):
                batch.append(entries[i])
                size += entries[i][1].length
                i += 1
            parts, raw = await loop.run_in_executor(self._io, self._copy_sync, batch)
            name, start, end = await loop.run_in_executor(
                self._writer, output.append, parts, self._pack_size, True
            )
            moves = []
            pos = start
            for digest, length, size_, codec in raw:
                pos += HEADER_SIZE
                moves.append(Entry(digest, pos, length, size_, codec))
                pos += length
            got, _gone = await self.index.relocate(pack, name, end, moves)
            moved += got
        return moved

    def _copy_sync(
        self, batch: list[tuple[bytes, Location]]
    ) -> tuple[list[bytes], list[tuple[bytes, int, int, int]]]:
        """The entries of ``batch`` read back and verified, ready to append."""
        parts: list[bytes] = []
        raw: list[tuple[bytes, int, int, int]] = []
        for run in coalesce([loc for _d, loc in batch]):
            buf = memoryview(self.storage.read(run.pack, run.start, run.end))
            for j in run.members:
                digest, loc = batch[j]
                at = loc.offset - run.start
                payload = buf[at : at + loc.length]
                decode(payload, digest, loc.size, loc.codec)  # never copy damage along
                parts.append(HEADER.pack(digest, loc.size, loc.length, loc.codec))
                parts.append(bytes(payload))
                raw.append((digest, loc.length, loc.size, loc.codec))
        return parts, raw

    async def verify_storage(self, *, repair: bool = False) -> list[str]:
        """Check that packs and index agree; the problems found (empty: all is well).

        ``repair``: also drop the index rows of chunks that do not verify and
        the records of blobs listing chunks not indexed (or indexed with
        another size), so writers store them again (see :meth:`remove_damaged`).

        Every indexed chunk must sit behind a matching entry header in its
        pack, below the pack's committed size, and hash to its digest; every
        pack's live bytes must add up; every blob record's chunks must be
        indexed with the sizes it lists. Bytes past a pack's committed size
        (a crash's torn tail) and packs the index does not know (a crash
        before their first commit) are not problems: they are reclaimed.
        """
        problems: list[str] = []
        loop = asyncio.get_running_loop()
        stored = await loop.run_in_executor(self._io, self.storage.listing)
        for info in await self.index.packs():
            have = stored.get(info.name)
            if have is None:
                problems.append(f"pack {info.name} is indexed but missing")
                continue
            if have < info.size:
                problems.append(f"pack {info.name} has {have} bytes, the index says {info.size}")
                continue
            entries = await self.index.entries(info.name)
            live = sum(HEADER_SIZE + loc.length for _d, loc in entries)
            if live != info.live:
                problems.append(
                    f"pack {info.name}: the index counts {info.live} live bytes, its rows {live}"
                )
            magic = await loop.run_in_executor(
                self._io, self.storage.read, info.name, 0, len(MAGIC)
            )
            if bytes(magic) != MAGIC:
                problems.append(f"pack {info.name}: not a pack (bad magic)")
                continue
            # In slices, so memory stays bounded for any pack.
            for i in range(0, len(entries), 256):
                part = entries[i : i + 256]
                found, bad = await loop.run_in_executor(
                    self._io, self._check_entries, part, info.size
                )
                problems += found
                if repair and bad:
                    await self.index.drop(bad)
                    problems += [f"removed chunk {d.hex()} (damaged)" for d, _loc in bad]
        for digest, raw in await self.index.all_records():
            try:
                chunks = decode_record(raw, digest)
            except IntegrityError as e:
                problems.append(str(e))
                chunks = []
            locs = await self.index.locate([c.digest for c in chunks])
            before = len(problems)
            for c in chunks:
                loc = locs.get(c.digest)
                if loc is None:
                    problems.append(f"blob {digest.hex()}: chunk {c.digest.hex()} is not indexed")
                elif loc.size != c.size:
                    problems.append(
                        f"blob {digest.hex()}: chunk {c.digest.hex()} has {loc.size} bytes, "
                        f"the record says {c.size}"
                    )
            if repair and (len(problems) > before or not chunks):
                await self.index.drop([], [digest])
                problems.append(f"removed blob record {digest.hex()}")
        return problems

    def _check_entries(
        self, entries: list[tuple[bytes, Location]], committed: int
    ) -> tuple[list[str], list[tuple[bytes, Location]]]:
        """The problems of ``entries``, and the entries at fault."""
        problems: list[str] = []
        bad: list[tuple[bytes, Location]] = []
        for run in coalesce([loc for _d, loc in entries], headers=True):
            if run.end > committed:
                problems.append(f"pack {run.pack}: an entry ends past the committed size")
                bad += [entries[i] for i in run.members]
                continue
            try:
                buf = memoryview(self.storage.read(run.pack, run.start, run.end))
            except StorageError as e:
                problems.append(str(e))
                continue
            for i in run.members:
                digest, loc = entries[i]
                at = loc.offset - HEADER_SIZE - run.start
                header = HEADER.unpack(buf[at : at + HEADER_SIZE])
                if header != (digest, loc.size, loc.length, loc.codec):
                    problems.append(
                        f"pack {loc.pack}: the entry at {loc.offset} does not match the index "
                        f"row of chunk {digest.hex()}"
                    )
                    bad.append((digest, loc))
                    continue
                payload = buf[at + HEADER_SIZE : at + HEADER_SIZE + loc.length]
                try:
                    decode(payload, digest, loc.size, loc.codec)
                except IntegrityError as e:
                    problems.append(f"pack {loc.pack}: {e}")
                    bad.append((digest, loc))
        return problems, bad

    async def close(self) -> None:
        if self._closed:
            return
        committer = self._committer
        if committer is not None:
            await asyncio.gather(committer, return_exceptions=True)
        self._closed = True
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(self._writer, self.storage.close)
        self._writer.shutdown(wait=False)
        self._hashing.shutdown(wait=False, cancel_futures=True)
        self._io.shutdown(wait=False, cancel_futures=True)
        await self.index.close()


class _PacksReader(BlobReader):
    """Reads a multi-chunk blob a window of chunks at a time (see the module docs)."""

    def __init__(
        self, service: PacksBlobService, digest: B3Digest, chunks: list[ChunkMeta]
    ) -> None:
        self._service = service
        self._digest = digest
        self._chunks = chunks
        self._starts: list[int] = []
        offset = 0
        for c in chunks:
            self._starts.append(offset)
            offset += c.size
        self._size = offset
        self._pos = 0
        self._cur_first = 0
        self._cur: list[Chunk] = []
        # The window fetched ahead while reading front to back: (first index, task).
        self._ahead: list[tuple[int, asyncio.Task[list[Chunk]]]] = []
        # The whole blob's hash, updated by the fetch jobs (in their threads).
        self._hasher: blake3.blake3 | None = blake3.blake3()
        self._hashed = 0
        self._hash_lock = threading.Lock()
        # A local store with a SQLite index: a window is looked up, read and
        # verified in one job of one thread (every handoff between threads costs
        # up to the GIL's switch interval while the event loop is busy).
        self._one_job = service._local and isinstance(service.index, SQLiteIndex)
        self._closed = False

    async def _fetch(self, first: int, count: int) -> list[Chunk]:
        metas = self._chunks[first : first + count]
        digests = list({m.digest for m in metas})
        service = self._service
        if self._one_job:
            if service._closed:
                raise StorageError("packs blob service is closed")
            loop = asyncio.get_running_loop()
            return await loop.run_in_executor(service._io, self._fetch_sync, first, metas, digests)
        return await service._read(self._wanted(metas, await service.index.locate(digests)))

    def _fetch_sync(
        self, first: int, metas: list[ChunkMeta], digests: list[B3Digest]
    ) -> list[Chunk]:
        """Look up, read and verify: one job, one thread.

        A window read front to back also tells the storage which bytes the
        next window will read, so a cold read has them coming from disk
        while this one is verified and served.
        """
        service = self._service
        index = service.index
        assert isinstance(index, SQLiteIndex)
        after = self._chunks[first + len(metas) : first + 2 * len(metas)]
        if len(metas) < WINDOW:
            after = []
        locs = index.locate_sync(digests + [m.digest for m in after])
        for run in coalesce([locs[m.digest] for m in after if m.digest in locs]):
            service.storage.will_read(run.pack, run.start, run.end)
        return service._read_sync(self._wanted(metas, locs))

    def _wanted(
        self, metas: list[ChunkMeta], locs: dict[bytes, Location]
    ) -> list[tuple[bytes, Location]]:
        """Where the chunks ``metas`` are, checked against the blob's record."""
        wanted = []
        for m in metas:
            loc = locs.get(m.digest)
            if loc is None:
                raise StorageError(
                    f"blob {self._digest.hex()}: chunk {m.digest.hex()} is missing "
                    "(the store is damaged)"
                )
            if loc.size != m.size:
                raise IntegrityError(
                    f"blob {self._digest.hex()}: chunk {m.digest.hex()} has {loc.size} bytes, "
                    f"its record says {m.size}"
                )
            wanted.append((bytes(m.digest), loc))
        return wanted

    async def _chunk(self, index: int) -> Chunk:
        first, cur = self._cur_first, self._cur
        if first <= index < first + len(cur):
            return cur[index - first]
        sequential = index == first + len(cur)
        ahead = self._ahead
        if ahead and ahead[0][0] == index:
            data = await ahead.pop(0)[1]
        else:
            self._cancel_ahead()
            data = await self._fetch(index, WINDOW if sequential else 1)
        self._cur_first, self._cur = index, data
        end = index + len(data)
        if self._hasher is not None:
            # The whole blob's hash, on its own thread beside the fetches; the
            # last bytes are handed out only once it matched.
            loop = asyncio.get_running_loop()
            hashed = loop.run_in_executor(self._service._hashing, self._hash, index, data)
            if end == len(self._chunks):
                await hashed
            else:
                hashed.add_done_callback(_retrieve)
        if sequential:
            # Keep AHEAD windows coming, fetched and verified on the read threads.
            nxt = ahead[-1][0] + WINDOW if ahead else end
            while len(ahead) < AHEAD and nxt < len(self._chunks):
                task = asyncio.ensure_future(self._fetch(nxt, WINDOW))
                task.add_done_callback(_retrieve)
                ahead.append((nxt, task))
                nxt += WINDOW
        return data[0]

    def _cancel_ahead(self) -> list[asyncio.Task[list[Chunk]]]:
        tasks = [t for _i, t in self._ahead]
        for task in tasks:
            task.cancel()
        # In place: _chunk holds this list and appends the next prefetch to it.
        self._ahead.clear()
        return tasks

    def _hash(self, first: int, data: list[Chunk]) -> None:
        """Check the whole blob's digest while it is read front to back.

        Runs in the service's hashing thread, off the event loop.
        """
        with self._hash_lock:
            hasher = self._hasher
            if hasher is None:
                return
            if first != self._hashed:
                self._hasher = None
                return
            for chunk in data:
                hasher.update(chunk)
            self._hashed += len(data)
            if self._hashed < len(self._chunks):
                return
            self._hasher = None
            got = hasher.digest()
            if got != self._digest:
                raise IntegrityError(
                    f"blob {self._digest.hex()}: its record lists chunks hashing to {got.hex()}"
                )

    async def read(self, n: int = -1) -> bytes:
        if self._closed:
            raise ValueError("read from a closed blob reader")
        if n < 0:
            parts = []
            while part := await self.read(4 * MIB):
                parts.append(part)
            return b"".join(parts)
        pos = self._pos
        if n == 0 or pos >= self._size:
            return b""
        index = bisect.bisect_right(self._starts, pos) - 1
        data = await self._chunk(index)
        start = pos - self._starts[index]
        out = bytes(data[start : start + n])
        self._pos = pos + len(out)
        return out

    async def readinto(self, buffer: bytearray | memoryview) -> int:
        if self._closed:
            raise ValueError("read from a closed blob reader")
        out = memoryview(buffer).cast("B")
        got = 0
        # Chunk after chunk until the buffer is full: one copy, chunk to buffer.
        while got < len(out) and self._pos < self._size:
            index = bisect.bisect_right(self._starts, self._pos) - 1
            data = memoryview(await self._chunk(index))
            start = self._pos - self._starts[index]
            take = min(len(data) - start, len(out) - got)
            out[got : got + take] = data[start : start + take]
            got += take
            self._pos += take
        return got

    async def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        if whence == io.SEEK_SET:
            target = offset
        elif whence == io.SEEK_CUR:
            target = self._pos + offset
        elif whence == io.SEEK_END:
            target = self._size + offset
        else:
            raise ValueError(f"unsupported whence {whence}")
        if target < 0:
            raise ValueError(f"negative seek position {target}")
        self._pos = target
        return target

    def tell(self) -> int:
        return self._pos

    async def close(self) -> None:
        self._closed = True
        self._cur = []
        await asyncio.gather(*self._cancel_ahead(), return_exceptions=True)


class _PacksBlobWriter(ChunkingBlobWriter):
    """Chunks not stored yet handed to the service's committer; the record committed last."""

    def __init__(self, service: PacksBlobService) -> None:
        super().__init__(min_size=service._min, avg_size=service._avg, max_size=service._max)
        self._service = service
        # Commits of the previous batch, waited for before the next is handed on.
        self._commits: set[asyncio.Future[None]] = set()
        self._seen: set[bytes] = set()
        # Consecutive chunks zstd did not shrink, and chunks left to store raw.
        self._incompressible = 0
        self._skip_zstd = 0

    def _cut(self, parts: list[bytes], final: bool) -> tuple[bytes, int, list[_Item]]:
        """Join, cut and hash ``parts`` (in a worker thread): the buffer, bytes used, chunks."""
        buf = b"".join(parts)
        used, chunks = self.cut(memoryview(buf), final)
        return buf, used, [_Item(digest, data) for digest, data in chunks]

    def _encode(self, items: list[_Item]) -> None:
        """Encode ``items`` in place.

        zstd is not tried for a while on a blob whose chunks do not compress
        (media, archives: the attempt costs ~1 s/GB).
        """
        zstd = self._service._zstd
        for item in items:
            attempt = zstd and self._skip_zstd == 0
            if self._skip_zstd:
                self._skip_zstd -= 1
            header, payload, codec = encode(item.digest, item.data, attempt)
            item.header, item.data = header, payload
            if attempt:
                self._incompressible = 0 if codec == CODEC_ZSTD else self._incompressible + 1
                if self._incompressible >= 4:
                    self._incompressible = 0
                    self._skip_zstd = SKIP_ZSTD

    async def _batch_job(self, parts: list[bytes], final: bool) -> bytes:
        service = self._service
        loop = asyncio.get_running_loop()
        buf, used, items = await loop.run_in_executor(None, self._cut, parts, final)
        new = []
        for item in items:
            if item.digest not in self._seen:
                self._seen.add(item.digest)
                new.append(item)
        if new:
            digests = [i.digest for i in new]
            if service.index.supports_gc:
                known: Iterable[bytes] = await service.index.refresh(digests, now() - REFRESH_SLACK)
            else:
                known = await service.index.locate(digests)
            new = [i for i in new if i.digest not in known]
        if new:
            # Compressed here, beside the committer writing the previous batch.
            await loop.run_in_executor(None, self._encode, new)
        # Bounded memory: the previous batch is committed before this one is handed on.
        await service._wait(self._commits)
        self._commits = service._submit(new, lazy=not final)
        if final:
            await service._wait(self._commits)
        return buf[used:]

    async def _store_single(self, data: bytes) -> B3Digest:
        service = self._service
        digest = B3Digest(blake3.blake3(data).digest())
        fut = service._inflight.get(digest)
        if fut is not None:
            await asyncio.shield(fut)
        elif not await service._found(digest):
            await service._wait(service._submit([_Item(digest, data)]))
        return digest

    async def _store_record(self, digest: B3Digest, chunks: Sequence[ChunkMeta]) -> None:
        service = self._service
        if not await service._found(digest):
            await service._wait(service._submit((), [(bytes(digest), encode_record(chunks))]))
