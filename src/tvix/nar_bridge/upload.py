"""Uploads: the NAR inside a (compressed) request body, and the NARs uploaded so far.

``nix copy --to http://…`` PUTs each NAR file (named by the sha256 of the
file, compressed or not) before the narinfo that describes it. The NAR is
ingested into castore as it streams in; what a later narinfo needs (the root
node, NAR size and sha256) is remembered in a bounded in-memory
:class:`UploadIndex`. Once a narinfo names the file, the file's URL is kept
across restarts by :class:`tvix.nar_bridge.nar_files.NarFiles`.

The compression is recognised by the body's first bytes, not trusted from
the file extension (Nix 2.8 names gzip-compressed NARs plain ``.nar``):
xz, bzip2, gzip and zstd are decoded as they stream by
:class:`tvix.nixcompat.compression.DecompressingReader`, each decompression
step in a worker thread (so a slow decompressor never blocks the event
loop) and bounded in output; each read returns at most what the NAR parser
asked for, so memory stays bounded whatever the ratio ("zip bombs"
included).
"""

from __future__ import annotations

import concurrent.futures
import hashlib
from collections import OrderedDict
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass

from tvix.castore.nodes import Node
from tvix.nar_bridge.errors import BadRequest, UnsupportedMediaType
from tvix.nar_bridge.urls import NarFileName
from tvix.nixcompat.compression import CompressionError, DecompressingReader

__all__ = ["NarBody", "UploadIndex", "UploadedNar"]

# Raw bytes pulled from the body per read.
_RAW_READ = 1 << 20
# Magic numbers, longest first where one is a prefix of another.
_MAGICS: tuple[tuple[bytes, str], ...] = (
    (b"\xfd7zXZ\x00", "xz"),
    (b"BZh", "bzip2"),
    (b"\x1f\x8b", "gzip"),
    (b"\x28\xb5\x2f\xfd", "zstd"),
    (b"\x04\x22\x4d\x18", "lz4"),
    (b"LZIP", "lzip"),
)
_SNIFF = max(len(m) for m, _ in _MAGICS)
_DECODABLE = {"xz", "bzip2", "gzip", "zstd"}


class _BodyReadError(Exception):
    """Reading the request body itself failed (e.g. the client went away); wraps the cause."""


class NarBody:
    """The NAR inside an upload body, decompressed if need be, as ``read(n)``.

    Call :meth:`start` first (it looks at the first bytes), then :meth:`read`
    until it returns ``b""``, then :meth:`finish` for the size and sha256 of
    the body as sent (the file hash Nix names it by). Corrupt compressed
    data raises :class:`BadRequest`; a compression that cannot be decoded
    (brotli, lz4, lzip) raises :class:`UnsupportedMediaType`.
    """

    def __init__(
        self,
        read_raw: Callable[[int], Awaitable[bytes]],
        extension: str,
        executor: concurrent.futures.Executor,
    ) -> None:
        self._read_raw = read_raw
        self._extension = extension
        self._executor = executor
        self._hash = hashlib.sha256()
        self._size = 0
        self._prefix = b""
        self._decoded: DecompressingReader | None = None
        #: The compression recognised by :meth:`start` (``none`` for a plain NAR).
        self.compression = "none"

    async def _pull(self, n: int) -> bytes:
        try:
            data = await self._read_raw(n)
        except Exception as e:
            raise _BodyReadError(e) from e
        self._hash.update(data)
        self._size += len(data)
        return data

    async def start(self) -> None:
        """Recognise the compression from the first bytes of the body."""
        head = b""
        while len(head) < _SNIFF and (data := await self._pull(_SNIFF - len(head))):
            head += data
        self._prefix = head
        self.compression = next((c for m, c in _MAGICS if head.startswith(m)), "none")
        if self.compression == "none" and self._extension == ".br":
            # Brotli has no magic number; only the name tells.
            self.compression = "brotli"
        if self.compression not in _DECODABLE | {"none"}:
            raise UnsupportedMediaType(
                f"{self.compression}-compressed NARs cannot be uploaded here; "
                "use compression=xz, zstd, bzip2, gzip or none"
            )
        if self.compression != "none":
            self._decoded = DecompressingReader(
                self._raw_chunks(), self.compression, executor=self._executor
            )

    async def _raw_chunks(self) -> AsyncIterator[bytes]:
        if self._prefix:
            prefix, self._prefix = self._prefix, b""
            yield prefix
        while data := await self._pull(_RAW_READ):
            yield data

    async def read(self, n: int) -> bytes:
        """Up to ``n`` bytes of the NAR; ``b""`` at its end."""
        if self._decoded is None:
            if self._prefix:
                data, self._prefix = self._prefix[:n], self._prefix[n:]
                return data
            return await self._unwrap(self._pull(n))
        try:
            return await self._decoded.read(n)
        except _BodyReadError as e:
            raise _cause(e) from None
        except CompressionError as e:
            raise BadRequest(str(e)) from None

    async def finish(self) -> tuple[int, bytes]:
        """Consume the rest of the body; its size and sha256 as sent.

        Only a compressed body can have bytes left here (the decoders ignore
        what follows the last compressed stream); they count for the file hash.
        """
        if self._decoded is not None:
            await self._decoded.aclose()  # its raw stream; the rest is read here
        while await self._unwrap(self._pull(_RAW_READ)):
            pass
        return self._size, self._hash.digest()

    async def _unwrap(self, aw: Awaitable[bytes]) -> bytes:
        try:
            return await aw
        except _BodyReadError as e:
            raise _cause(e) from None


def _cause(e: _BodyReadError) -> BaseException:
    # The original error, not a "corrupt data" one: the client's connection failed.
    cause = e.args[0]
    assert isinstance(cause, BaseException)
    return cause


@dataclass(frozen=True, slots=True)
class UploadedNar:
    """A NAR ingested from an upload: where it came from, and what a narinfo must match."""

    file: NarFileName
    file_size: int
    #: What the file was compressed with, recognised from its first bytes.
    compression: str
    node: Node
    nar_size: int
    nar_sha256: bytes


class UploadIndex:
    """The last ``capacity`` uploaded NARs, by file hash and by NAR sha256.

    In memory, for the narinfo that follows a NAR: a NAR uploaded but never
    named by a narinfo is forgotten at a restart (Nix's ``HEAD /nar/…`` then
    misses, and Nix simply uploads it again; its contents dedup in castore).
    """

    def __init__(self, capacity: int = 1 << 16) -> None:
        self._capacity = capacity
        self._by_file: OrderedDict[bytes, UploadedNar] = OrderedDict()
        self._by_nar: dict[bytes, UploadedNar] = {}

    def add(self, nar: UploadedNar) -> None:
        """Remember ``nar``, forgetting the least recently used beyond the capacity."""
        self._by_file[nar.file.file_hash] = nar
        self._by_file.move_to_end(nar.file.file_hash)
        self._by_nar[nar.nar_sha256] = nar
        while len(self._by_file) > self._capacity:
            _, old = self._by_file.popitem(last=False)
            if self._by_nar.get(old.nar_sha256) is old:
                del self._by_nar[old.nar_sha256]

    def by_file(self, file_hash: bytes) -> UploadedNar | None:
        """The NAR uploaded as the file with sha256 ``file_hash``, if remembered."""
        nar = self._by_file.get(file_hash)
        if nar is not None:
            self._by_file.move_to_end(file_hash)
        return nar

    def by_nar_sha256(self, nar_sha256: bytes) -> UploadedNar | None:
        """An uploaded NAR whose (uncompressed) sha256 is ``nar_sha256``, if remembered."""
        return self._by_nar.get(nar_sha256)

    def __len__(self) -> int:
        return len(self._by_file)
