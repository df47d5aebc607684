"""The BlobService interface: the contract every blob backend fulfils."""

from __future__ import annotations

import abc
import asyncio
import io
from collections.abc import Sequence, Set
from dataclasses import dataclass
from types import TracebackType
from typing import ClassVar, Self

from tvix.castore.digest import B3Digest

__all__ = ["BlobReader", "BlobService", "BlobSweep", "BlobWriter", "ChunkMeta"]


@dataclass(slots=True)
class BlobSweep:
    """What :meth:`BlobService.sweep` deleted (or, dry, would delete)."""

    blobs: int = 0
    """Blob records (of blobs stored in several chunks) deleted."""
    chunks: int = 0
    """Chunks (single-chunk blobs included) deleted."""
    bytes: int = 0
    """Stored bytes no longer referenced (freed at once, or by a later compaction)."""


@dataclass(frozen=True, slots=True)
class ChunkMeta:
    """A chunk of a blob: its own blake3 digest and its length."""

    digest: B3Digest
    size: int


class BlobReader(abc.ABC):
    """A readable, seekable stream over the bytes of one blob.

    Use as an async context manager, or call :meth:`close`.
    """

    @abc.abstractmethod
    async def read(self, n: int = -1) -> bytes:
        """Up to ``n`` bytes from the current position (``-1``: to the end).

        Returns ``b""`` only at the end of the blob. May return fewer than
        ``n`` bytes before the end. Raises :class:`~tvix.castore.errors.IntegrityError`
        if the backend's data does not match the digest, and
        :class:`~tvix.castore.errors.StorageError` if the backend fails.
        """

    async def readinto(self, buffer: bytearray | memoryview) -> int:
        """Read up to ``len(buffer)`` bytes into ``buffer``; how many were read.

        As :meth:`read` (0 only at the end, maybe fewer before it, the same
        errors), but into the caller's buffer: a backend that holds the bytes
        already copies them once, straight into it.
        """
        data = await self.read(len(buffer))
        buffer[: len(data)] = data
        return len(data)

    @abc.abstractmethod
    async def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        """Move to ``offset`` (``SEEK_SET``) or by ``offset`` (``SEEK_CUR``).

        Returns the new position. Seeking past the end is allowed (reads then
        return ``b""``); a negative position raises ``ValueError``. Backends
        that store a blob in chunks read only the chunks a later read touches.
        """

    @abc.abstractmethod
    def tell(self) -> int:
        """The current position."""

    async def close(self) -> None:  # noqa: B027 - optional hook, not abstract
        """Release what the reader holds; idempotent."""

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()


class BlobWriter(abc.ABC):
    """Receives the bytes of a new blob.

    :meth:`close` returns the blake3 digest of everything written; only then
    does the blob become visible to readers. As an async context manager it
    closes on a clean exit and :meth:`abort`s when the block raises, so an
    interrupted write never leaves a blob behind. Writing the same content
    concurrently from several writers is allowed; each gets the same digest.
    """

    @abc.abstractmethod
    async def write(self, data: bytes | memoryview) -> None:
        """Append ``data``. Raises ``ValueError`` after :meth:`close` or :meth:`abort`."""

    @abc.abstractmethod
    async def close(self) -> B3Digest:
        """Finish the blob, store it durably, and return its digest.

        Calling it again returns the same digest. Raises
        :class:`~tvix.castore.errors.StorageError` if storing failed (then
        nothing is stored).
        """

    @abc.abstractmethod
    async def abort(self) -> None:
        """Discard what was written; nothing is stored. Idempotent; no-op after close."""

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        if e is None:
            await self.close()
        else:
            await self.abort()


class BlobService(abc.ABC):
    """Stores blobs (file contents), each addressed by the blake3 digest of its bytes.

    Blobs are immutable: writing the same bytes twice stores them once.
    Absence is a value (``False``/``None``), failures are exceptions
    (:class:`~tvix.castore.errors.StorageError`); damaged stored data (bytes
    that do not match their digest) raises
    :class:`~tvix.castore.errors.IntegrityError`. All methods may be called
    concurrently. Memory use is bounded regardless of blob size.

    Backends with :attr:`supports_gc` remember when each blob (and chunk)
    was last written or *refreshed*: :meth:`has` answering ``True`` and a
    writer finding its bytes already stored both refresh what they found,
    in the step that confirms it is still there. A client that skips an
    upload because :meth:`has` said ``True`` is therefore safe from a
    concurrent :meth:`sweep` (within its grace period, see
    :mod:`tvix.store.gc`).
    """

    supports_gc: ClassVar[bool] = False
    """Whether :meth:`sweep` can delete blobs."""

    @abc.abstractmethod
    async def has(self, digest: B3Digest) -> bool:
        """Whether the blob (or, for chunking backends, a chunk) ``digest`` is stored."""

    @abc.abstractmethod
    async def open_read(self, digest: B3Digest) -> BlobReader | None:
        """A reader over the blob ``digest``, or ``None`` when it is not stored.

        A backend that lists chunks (see :meth:`chunks`) also opens a single
        chunk by its digest.
        """

    @abc.abstractmethod
    def open_write(self) -> BlobWriter:
        """A writer for a new blob; see :class:`BlobWriter`."""

    async def read_many(self, digests: Sequence[B3Digest]) -> list[bytes | None]:
        """The whole contents of several blobs, in order (``None`` for an absent one).

        For many small blobs (a NAR render, an extraction): backends override
        it to fetch a batch at once rather than paying a round trip each. Only
        for blobs known to be small: each is held in memory whole. Verifies
        like :meth:`open_read` does.
        """
        return list(await asyncio.gather(*(self._read_whole(d) for d in digests)))

    async def _read_whole(self, digest: B3Digest) -> bytes | None:
        reader = await self.open_read(digest)
        if reader is None:
            return None
        async with reader:
            return await reader.read()

    async def chunks(self, digest: B3Digest) -> list[ChunkMeta] | None:
        """The finer chunks the blob is stored as, in order, or ``None`` when absent.

        An empty list means the backend has no finer chunking for this blob:
        read it whole through :meth:`open_read`. Each chunk listed can be
        opened through :meth:`open_read` by its own digest, so a reader can
        fetch and verify only the chunks it needs.
        """
        return [] if await self.has(digest) else None

    async def sweep(self, live: Set[bytes], cutoff: float, *, dry_run: bool = False) -> BlobSweep:
        """Delete every blob not in ``live`` that was not written or refreshed since ``cutoff``.

        Atomic with respect to :meth:`has` and writers: a blob they find (and
        so refresh) is not deleted. Chunks shared with a blob that stays stay.
        ``dry_run``: nothing changes; the result says what would. Raises
        :class:`NotImplementedError` without :attr:`supports_gc`.
        """
        raise NotImplementedError(f"{type(self).__name__} cannot delete blobs")

    async def remove_damaged(self, digest: B3Digest) -> list[str]:
        """Remove what is damaged of blob ``digest``; one line per object removed.

        Each of its chunks whose stored bytes do not match their digest, and
        its record if that is unreadable or lists a chunk absent or removed,
        go at once, whoever refers to them; intact chunks stay. Afterwards
        :meth:`has` answers ``False`` for what went, so the next writer of
        those bytes stores them again. Backends with :attr:`supports_gc` also
        do this by themselves for a chunk a read finds damaged. Raises
        :class:`NotImplementedError` without :attr:`supports_gc`.
        """
        raise NotImplementedError(f"{type(self).__name__} cannot delete blobs")

    async def close(self) -> None:  # noqa: B027 - optional hook, not abstract
        """Release connections and handles; the service is unusable afterwards."""
