"""Several blob sources asked at once; the first answer that verifies wins.

Composition only (it refers to other services, so it has no URL): name it
``type = "race"`` with ``sources = ["a", "b", ...]`` in a composition file,
or build it directly.

The racing loop itself, shared by the race combinators of all three kinds,
is :func:`tvix.castore.race.first_answer`.
"""

from __future__ import annotations

import io
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TypeVar

import blake3
from typing_extensions import override

from tvix.castore.blobservice._readers import BLOCK, BlobVerifier, BytesBlobReader, seek_target
from tvix.castore.blobservice.base import BlobReader, BlobService, BlobWriter, ChunkMeta
from tvix.castore.composition import BuildContext
from tvix.castore.digest import B3Digest
from tvix.castore.errors import CastoreError, IntegrityError
from tvix.castore.race import RaceConfig, first_answer, source_name

__all__ = [
    "EAGER_SIZE",
    "RaceBlobService",
    "RaceBlobServiceConfig",
]

log = logging.getLogger(__name__)

S = TypeVar("S")
T = TypeVar("T")

# Blobs up to this size are read whole by every source and verified before
# one wins: most files are small, and this is what makes "the first answer
# that verifies" literal for them. Larger blobs are streamed from the first
# source to deliver this many bytes, verified as they stream (see _RaceReader).
EAGER_SIZE = 1 << 20
_BLOCK = BLOCK


@dataclass
class _Found:
    """What a source delivered: a whole verified small blob, or a large blob's start."""

    data: bytes
    reader: BlobReader | None = None  # set for a large blob: positioned after ``data``


class RaceBlobService(BlobService):
    """Blobs read from whichever of ``sources`` answers first with the right bytes.

    Reads
        :meth:`open_read` asks every source at once. Each reads up to
        :data:`EAGER_SIZE` bytes; a blob no larger than that is checked
        against the digest right there, and the first source whose bytes
        verify wins (a source that sends wrong bytes is logged and skipped).
        For a larger blob the first source to deliver its first
        :data:`EAGER_SIZE` bytes wins, and the reader verifies as it goes:
        it relies on the source's reader to refuse damaged data (the gRPC
        client and the object store verify every chunk), and when that
        reader fails (damaged data, the source goes away), it continues from
        the next source that has the blob, after checking that this source's
        bytes up to the current position hash like those already returned.
        Read front to back, the whole blob is checked against its digest
        before the end is reported. The losers' calls are cancelled.
        :meth:`has` is true as soon as one source says so; :meth:`chunks` is
        the first list a source gives (chunk lists cannot be verified before
        their chunks are read; each chunk then is, by its digest).
        Absence (``False``/``None``) only when every source says absent; a
        failing source is logged and skipped, and if none has the blob and
        some failed, the failure is raised.
    Writes
        :meth:`open_write` writes to the first source only (the primary);
        the others are mirrors this service only reads from.
    Not raced
        Writes. Nothing is cached: every read asks every source.

    It does not close the sources: whoever built them does.
    """

    def __init__(self, sources: Sequence[BlobService]) -> None:
        if not sources:
            raise ValueError("a race needs at least one source")
        self.sources = list(sources)

    @override
    async def has(self, digest: B3Digest) -> bool:
        async def ask(source: BlobService) -> bool | None:
            return True if await source.has(digest) else None

        return await first_answer(self.sources, ask, f"has blob {digest.hex()}") is not None

    @override
    async def chunks(self, digest: B3Digest) -> list[ChunkMeta] | None:
        found = await first_answer(
            self.sources, lambda s: s.chunks(digest), f"chunks of blob {digest.hex()}"
        )
        return None if found is None else found[1]

    @override
    async def open_read(self, digest: B3Digest) -> BlobReader | None:
        what = f"blob {digest.hex()}"
        found = await first_answer(
            self.sources,
            lambda s: _probe(s, digest),
            what,
            discard=_close_found,
        )
        if found is None:
            return None
        index, answer = found
        if answer.reader is None:
            return BytesBlobReader(answer.data)
        return _RaceReader(self, digest, index, answer.data, answer.reader)

    @override
    def open_write(self) -> BlobWriter:
        return self.sources[0].open_write()


async def _probe(source: BlobService, digest: B3Digest) -> _Found | None:
    """Open ``digest`` on ``source`` and read its start; a small blob whole and verified."""
    reader = await source.open_read(digest)
    if reader is None:
        return None
    try:
        head = await _read_up_to(reader, EAGER_SIZE + 1)
        if len(head) > EAGER_SIZE:
            return _Found(head, reader)
        verifier = BlobVerifier(digest)
        verifier.update(head)
        verifier.check("the source")
    except BaseException:
        await reader.close()
        raise
    await reader.close()
    return _Found(head)


async def _close_found(found: _Found) -> None:
    if found.reader is not None:
        await found.reader.close()


async def _read_up_to(reader: BlobReader, n: int) -> bytes:
    parts: list[bytes] = []
    got = 0
    while got < n:
        part = await reader.read(n - got)
        if not part:
            break
        parts.append(part)
        got += len(part)
    return b"".join(parts)


class _RaceReader(BlobReader):
    """A large blob from the winning source, falling back to others when it fails.

    ``head`` is what the winner delivered first; ``reader`` continues after it.
    While every byte returned was read in order from the start, they are
    hashed; a fallback source must then agree with them (same blake3 of the
    prefix), and the whole blob is checked at its end.
    """

    def __init__(
        self,
        service: RaceBlobService,
        digest: B3Digest,
        index: int,
        head: bytes,
        reader: BlobReader,
    ) -> None:
        self._service = service
        self._digest = digest
        self._index = index
        self._tried = {index}
        self._head = head
        self._reader: BlobReader | None = reader
        self._reader_pos = len(head)  # where the source's reader is
        self._pos = 0
        # None once reads skipped around.
        self._verifier: BlobVerifier | None = BlobVerifier(digest)
        self._broken: IntegrityError | None = None
        self._closed = False

    async def read(self, n: int = -1) -> bytes:
        if self._closed:
            raise ValueError("read from a closed blob reader")
        if self._broken is not None:
            raise self._broken
        if n < 0:
            parts = []
            while part := await self.read(_BLOCK):
                parts.append(part)
            return b"".join(parts)
        if n == 0:
            return b""
        pos = self._pos
        if pos < len(self._head):
            data = self._head[pos : pos + n]
        else:
            data = await self._read_source(n)
        verifier = self._verifier
        if verifier is not None and pos == verifier.hashed:
            if data:
                verifier.update(data)
            elif not verifier.matches():
                self._broken = IntegrityError(
                    f"blob {self._digest.hex()}: the bytes read hash to "
                    f"{verifier.current().hex()} (last source: "
                    f"{source_name(self._service.sources[self._index], self._index)})"
                )
                raise self._broken
        elif verifier is not None:
            self._verifier = None
        self._pos += len(data)
        return data

    async def _read_source(self, n: int) -> bytes:
        while True:
            reader = self._reader
            assert reader is not None  # only None between a failure and the switch
            try:
                if self._reader_pos != self._pos:
                    await reader.seek(self._pos)
                    self._reader_pos = self._pos
                data = await reader.read(n)
                self._reader_pos += len(data)
                return data
            except CastoreError as e:
                name = source_name(self._service.sources[self._index], self._index)
                log.warning(
                    "race: blob %s: %s failed at offset %d, trying the next source: %s",
                    self._digest.hex(),
                    name,
                    self._pos,
                    e,
                )
                await self._switch(e)

    async def _switch(self, cause: CastoreError) -> None:
        """Continue from the next source that has the blob (raise ``cause`` if none)."""
        if self._reader is not None:
            await self._reader.close()
            self._reader = None
        sources = self._service.sources
        for i, source in enumerate(sources):
            if i in self._tried:
                continue
            self._tried.add(i)
            name = source_name(source, i)
            try:
                reader = await source.open_read(self._digest)
                if reader is None:
                    continue
                try:
                    await self._align(reader, name)
                except BaseException:
                    await reader.close()
                    raise
            except CastoreError as e:
                if self._broken is not None:
                    raise
                log.warning("race: blob %s: %s failed: %s", self._digest.hex(), name, e)
                continue
            self._reader, self._reader_pos, self._index = reader, self._pos, i
            return
        raise cause

    async def _align(self, reader: BlobReader, name: str) -> None:
        """Bring a fallback ``reader`` to the current position, checking it agrees so far."""
        verifier = self._verifier
        if verifier is None or verifier.hashed != self._pos:
            # Reads skipped around: only the sources' own verification vouches for them.
            await reader.seek(self._pos)
            return
        prefix = blake3.blake3()
        remaining = self._pos
        while remaining:
            part = await reader.read(min(_BLOCK, remaining))
            if not part:
                break
            prefix.update(part)
            remaining -= len(part)
        if remaining or prefix.digest() != verifier.current():
            self._broken = IntegrityError(
                f"blob {self._digest.hex()}: the {self._pos} bytes already returned differ "
                f"from {name}'s; the blob cannot be read consistently"
            )
            raise self._broken

    async def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        # The size is not known until the end, so SEEK_END is refused.
        self._pos = seek_target(self._pos, None, offset, whence)
        return self._pos

    def tell(self) -> int:
        return self._pos

    async def close(self) -> None:
        self._closed = True
        if self._reader is not None:
            await self._reader.close()
            self._reader = None
        self._head = b""


@dataclass(frozen=True)
class RaceBlobServiceConfig(RaceConfig):
    """A :class:`RaceBlobService` (see :class:`RaceConfig`)."""

    def build(self, ctx: BuildContext) -> RaceBlobService:
        """The sources come from the composition."""
        return RaceBlobService(self.source_services(ctx))
