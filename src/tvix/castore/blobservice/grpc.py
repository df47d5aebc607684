"""``grpc+http://host:port``, ``grpc+unix:///path.sock``: blobs on a remote store daemon.

The remote is not trusted: everything read is checked against the digest it
was asked for, and a mismatch raises :class:`~tvix.castore.errors.IntegrityError`.

Reading (:meth:`GRPCBlobService.open_read`) first asks ``Stat`` for the
blob's chunks.

- **Chunks listed** (each at most :data:`MAX_VERIFIED_CHUNK`): the reader
  fetches chunks by their own digest through ``Read``, each one whole, and
  verifies its length and blake3 before returning any of its bytes; a seek
  fetches only the chunks the following reads touch, and reading front to
  back prefetches a few chunks ahead. The chunk *list* is the server's word:
  when a reader has read every chunk in order (a front-to-back read), the
  whole blob's blake3 is checked too, before the last chunk's bytes are
  returned, so a list belonging to another blob is caught. Bytes read at
  random offsets are only as good as the list.
- **No chunks** (or an oversized one): the reader streams the whole blob and
  hashes as it goes. It holds back the last :data:`VERIFY_WINDOW` bytes
  received until the stream ends and the digest matches, so a blob up to
  that size is verified before any of it is returned, and of a larger one
  everything but the final window may be returned before the mismatch is
  found (then ``read`` raises ``IntegrityError`` and never reports the end of
  the blob). A backward seek restarts the stream; skipped bytes are hashed,
  so verification covers seeks as well.

Writing streams ``BlobChunk`` messages of :data:`MESSAGE_SIZE`, coalescing
small writes, hashes locally, and at ``close`` compares the server's digest
with the local one. ``abort`` cancels the call: the server sees a cancelled
stream, never a complete one, and stores nothing.
"""

from __future__ import annotations

import io
from collections import deque
from dataclasses import dataclass
from functools import partial

import blake3
import grpc
from typing_extensions import override

from tvix.castore.blobservice._readers import ChunkedReader, seek_target
from tvix.castore.blobservice.base import BlobReader, BlobService, BlobWriter, ChunkMeta
from tvix.castore.composition import BuildContext
from tvix.castore.digest import B3_LEN, B3Digest
from tvix.castore.errors import IntegrityError, StorageError, ValidationError
from tvix.castore.grpc._client import GRPCClient, StreamingPut
from tvix.castore.grpc._wire import MESSAGE_SIZE, decode_blob_chunk, encode_blob_chunk
from tvix.castore.grpc.channel import GRPCConfig
from tvix.castore.proto import pb

__all__ = [
    "MAX_VERIFIED_CHUNK",
    "MESSAGE_SIZE",
    "VERIFY_WINDOW",
    "GRPCBlobService",
    "GRPCBlobServiceConfig",
]

# A listed chunk is fetched and held whole to verify it; larger ones make the
# reader fall back to streaming the blob, so memory stays bounded whatever the
# server lists.
MAX_VERIFIED_CHUNK = 16 << 20
# Reading front to back, chunks up to this many bytes ahead are fetched
# concurrently (one round trip per chunk would otherwise cap throughput).
READ_AHEAD = 8 << 20
# Without chunks, this many trailing bytes are held until the digest is checked.
VERIFY_WINDOW = 4 << 20

# grpc-stubs lacks aio.EOF, what a stream's read() returns at its end.
_EOF: object = grpc.aio.EOF  # type: ignore[attr-defined]

_SERVICE = "castore.v1.BlobService"


@dataclass
class _Stubs:
    """The BlobService stubs on one channel."""

    channel: grpc.aio.Channel
    stat: grpc.aio.UnaryUnaryMultiCallable[pb.StatBlobRequest, pb.StatBlobResponse]
    read: grpc.aio.UnaryStreamMultiCallable[pb.ReadBlobRequest, memoryview | None]
    put: grpc.aio.StreamUnaryMultiCallable[bytes | bytearray | memoryview, pb.PutBlobResponse]


class GRPCBlobService(GRPCClient[_Stubs], BlobService):
    """A client of a remote ``tvix.castore.v1.BlobService``.

    See the module docstring for how what it reads is verified.

    ``address`` is what :meth:`from_url` was given (for error messages);
    ``target`` the grpc channel target.
    """

    def _make_stubs(self, channel: grpc.aio.Channel) -> _Stubs:
        return _Stubs(
            channel,
            channel.unary_unary(
                self.method(_SERVICE, "Stat"),
                request_serializer=pb.StatBlobRequest.SerializeToString,
                response_deserializer=pb.StatBlobResponse.FromString,
            ),
            channel.unary_stream(
                self.method(_SERVICE, "Read"),
                request_serializer=pb.ReadBlobRequest.SerializeToString,
                response_deserializer=decode_blob_chunk,
            ),
            channel.stream_unary(
                self.method(_SERVICE, "Put"),
                request_serializer=encode_blob_chunk,
                response_deserializer=pb.PutBlobResponse.FromString,
            ),
        )

    async def _stat(self, digest: B3Digest, send_chunks: bool) -> pb.StatBlobResponse | None:
        what = f"Stat of blob {digest.hex()}"
        request = pb.StatBlobRequest(digest=digest, send_chunks=send_chunks)
        try:
            return await self.read_call(what, lambda: self._stubs().stat(request))
        except grpc.aio.AioRpcError as e:
            if e.code() == grpc.StatusCode.NOT_FOUND:
                return None
            self._fail(e, what)

    @override
    async def has(self, digest: B3Digest) -> bool:
        return await self._stat(digest, send_chunks=False) is not None

    @override
    async def chunks(self, digest: B3Digest) -> list[ChunkMeta] | None:
        response = await self._stat(digest, send_chunks=True)
        if response is None:
            return None
        return self._chunk_list(digest, response)

    def _chunk_list(self, digest: B3Digest, response: pb.StatBlobResponse) -> list[ChunkMeta]:
        out = []
        for c in response.chunks:
            if len(c.digest) != B3_LEN or c.size == 0:
                raise IntegrityError(
                    f"{self.address} listed a malformed chunk of blob {digest.hex()} "
                    f"(digest of {len(c.digest)} bytes, size {c.size})"
                )
            out.append(ChunkMeta(B3Digest(c.digest), c.size))
        return out

    @override
    async def open_read(self, digest: B3Digest) -> BlobReader | None:
        response = await self._stat(digest, send_chunks=True)
        if response is None:
            return None
        chunks = self._chunk_list(digest, response)
        if chunks and all(c.size <= MAX_VERIFIED_CHUNK for c in chunks):
            return ChunkedReader(
                digest,
                chunks,
                partial(self._fetch_chunk, digest),
                mismatch=lambda _got: (
                    f"blob {digest.hex()} from {self.address}: its chunks "
                    "(each matching its own digest) do not add up to the blob"
                ),
                ahead_bytes=READ_AHEAD,
            )
        return _StreamReader(self, digest)

    async def _fetch_chunk(self, blob: B3Digest, chunk: ChunkMeta) -> bytes:
        """Chunk ``chunk`` of ``blob``, verified."""
        what = f"chunk {chunk.digest.hex()} of blob {blob.hex()}"

        async def attempt() -> tuple[list[memoryview], bytes]:
            hasher = blake3.blake3()
            parts: list[memoryview] = []
            got = 0
            call = self._stubs().read(pb.ReadBlobRequest(digest=chunk.digest))
            try:
                async for part in call:
                    if part is None:
                        raise IntegrityError(f"{what} from {self.address}: undecodable message")
                    got += len(part)
                    if got > chunk.size:
                        raise IntegrityError(
                            f"{what} from {self.address}: more than the {chunk.size} bytes listed"
                        )
                    hasher.update(part)
                    parts.append(part)
            finally:
                call.cancel()
            return parts, hasher.digest()

        try:
            parts, digest = await self.read_call(f"Read of {what}", attempt)
        except grpc.aio.AioRpcError as e:
            if e.code() == grpc.StatusCode.NOT_FOUND:
                raise StorageError(
                    f"{what}: {self.address} listed it but does not have it"
                ) from None
            self._fail(e, f"Read of {what}")
        got = sum(len(p) for p in parts)
        if got != chunk.size or digest != chunk.digest:
            raise IntegrityError(
                f"{what} from {self.address}: received {got} bytes hashing to "
                f"{digest.hex()}, expected {chunk.size} bytes"
            )
        return b"".join(parts)

    @override
    def open_write(self) -> BlobWriter:
        return _GRPCBlobWriter(self)


class _StreamReader(BlobReader):
    """Streams a whole blob, hashing it; see the module docstring for what is held back."""

    def __init__(self, service: GRPCBlobService, digest: B3Digest) -> None:
        self._service = service
        self._digest = digest
        self._pos = 0  # the caller's position
        self._call: grpc.aio.UnaryStreamCall[pb.ReadBlobRequest, memoryview | None] | None = None
        self._started = False  # a stream was (re)started; the call is made on the first pull
        self._consumed = 0  # stream bytes handed out or skipped (start of _buf)
        self._buf: deque[memoryview] = deque()
        self._buffered = 0
        self._hasher = blake3.blake3()
        self._verified = False  # the stream ended and matched the digest
        self._broken: IntegrityError | None = None

    def _restart(self) -> None:
        if self._call is not None:
            self._call.cancel()
        self._call = None
        self._started = True
        self._consumed = self._buffered = 0
        self._buf.clear()
        self._hasher = blake3.blake3()
        self._verified = False

    async def _pull(self) -> None:
        """Receive one more message, or finish and verify the stream."""
        service = self._service
        try:
            # Holding a slot while waiting on the server (the module docs of
            # tvix.castore.grpc._client); the call starts under it too.
            async with service.slot():
                if self._call is None:
                    self._call = service._stubs().read(pb.ReadBlobRequest(digest=self._digest))
                part = await self._call.read()
        except grpc.aio.AioRpcError as e:
            if e.code() == grpc.StatusCode.NOT_FOUND:
                raise StorageError(
                    f"blob {self._digest.hex()} vanished from {service.address} while reading"
                ) from None
            service._fail(e, f"Read of blob {self._digest.hex()}")
        if part is _EOF:
            if self._hasher.digest() != self._digest:
                self._broken = IntegrityError(
                    f"blob {self._digest.hex()} from {service.address}: received "
                    f"{self._consumed + self._buffered} bytes hashing to {self._hasher.hexdigest()}"
                )
                raise self._broken
            self._verified = True
            return
        if part is None:
            self._broken = IntegrityError(
                f"blob {self._digest.hex()} from {service.address}: undecodable message"
            )
            raise self._broken
        assert isinstance(part, memoryview)
        if part:
            self._hasher.update(part)
            self._buf.append(part)
            self._buffered += len(part)

    def _releasable(self) -> int:
        return self._buffered if self._verified else self._buffered - VERIFY_WINDOW

    async def _fill(self, want: int) -> None:
        while not self._verified and self._releasable() < want:
            await self._pull()

    def _take(self, n: int, keep: bool) -> list[memoryview]:
        """Remove ``n`` bytes from the front of the buffer (returned when ``keep``)."""
        out = []
        self._buffered -= n
        self._consumed += n
        while n:
            head = self._buf[0]
            if len(head) <= n:
                self._buf.popleft()
                part = head
            else:
                part = head[:n]
                self._buf[0] = head[n:]
            n -= len(part)
            if keep:
                out.append(part)
        return out

    async def read(self, n: int = -1) -> bytes:
        if self._broken is not None:
            raise self._broken
        if n == 0:
            return b""
        if not self._started or self._pos < self._consumed:
            self._restart()
        while self._consumed < self._pos:  # a forward seek: skip (hashing) up to it
            await self._fill(1)
            skip = min(self._pos - self._consumed, self._releasable())
            if skip <= 0:
                return b""  # past the end (and verified)
            self._take(skip, keep=False)
        if n < 0:
            await self._fill(1 << 62)
        else:
            await self._fill(n)
        take = self._releasable() if n < 0 else min(n, self._releasable())
        if take <= 0:
            return b""
        parts = self._take(take, keep=True)
        self._pos += take
        return parts[0].tobytes() if len(parts) == 1 else b"".join(parts)

    async def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        # The size is unknown until the end of the stream, so SEEK_END is refused.
        self._pos = seek_target(self._pos, None, offset, whence)
        return self._pos

    def tell(self) -> int:
        return self._pos

    async def close(self) -> None:
        if self._call is not None:
            self._call.cancel()
            self._call = None
        self._buf.clear()


class _GRPCBlobWriter(BlobWriter):
    def __init__(self, service: GRPCBlobService) -> None:
        self._service = service
        self._put: StreamingPut[pb.PutBlobResponse] = StreamingPut(
            service,
            lambda: service._stubs().put(),  # type: ignore[call-arg]  # stubs gap
            "Put of a blob",
            "the server ended it early",
        )
        self._buf = bytearray()
        self._hasher = blake3.blake3()
        self._digest: B3Digest | None = None

    async def write(self, data: bytes | memoryview) -> None:
        if self._digest is not None or self._put.aborted:
            raise ValueError("write to a closed blob writer")
        view = memoryview(data).cast("B")
        self._hasher.update(view)
        buf = self._buf
        if buf:
            take = MESSAGE_SIZE - len(buf)
            buf += view[:take]
            view = view[take:]
            if len(buf) < MESSAGE_SIZE:
                return
            # The serializer has copied the message once write() returns.
            await self._put.send(buf)
            buf.clear()
        # Large writes go out in slices without passing through the buffer.
        while len(view) >= MESSAGE_SIZE:
            await self._put.send(view[:MESSAGE_SIZE])
            view = view[MESSAGE_SIZE:]
        if view:
            buf += view

    async def close(self) -> B3Digest:
        if self._digest is not None:
            return self._digest
        if self._put.aborted:
            raise ValueError("close of an aborted blob writer")
        if self._buf:
            await self._put.send(self._buf)
            self._buf = bytearray()
        response = await self._put.finish()
        local = B3Digest(self._hasher.digest())
        try:
            remote = B3Digest(response.digest)
        except ValidationError:
            remote = None
        if remote != local:
            self._put.aborted = True
            raise IntegrityError(
                f"Put of a blob at {self._service.address}: the server answered digest "
                f"{response.digest.hex()}, the bytes sent hash to {local.hex()}"
            )
        self._digest = local
        return local

    async def abort(self) -> None:
        if self._digest is None:
            self._buf = bytearray()
            self._put.cancel()


@dataclass(frozen=True)
class GRPCBlobServiceConfig(GRPCConfig):
    """A store daemon's BlobService (see :class:`~tvix.castore.grpc.channel.GRPCConfig`)."""

    def build(self, ctx: BuildContext) -> GRPCBlobService:
        """A client; it connects on first use."""
        return GRPCBlobService(self.target, self.address, protocol=self.protocol, tls=self.tls)
