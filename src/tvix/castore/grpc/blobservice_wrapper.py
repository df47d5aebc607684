"""``tvix.castore.v1.BlobService`` served from any :class:`BlobService`."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any, ClassVar

import grpc

from tvix.castore.blobservice.base import BlobService
from tvix.castore.errors import ValidationError
from tvix.castore.grpc._stream import ensure_stream_completed
from tvix.castore.grpc._wire import (
    MESSAGE_SIZE,
    decode_blob_chunk,
    encode_blob_chunk_parts,
    identity,
)
from tvix.castore.grpc.errors import digest_of, translate_errors
from tvix.castore.grpc.handlers import unary_stream, unary_unary
from tvix.castore.proto import pb

__all__ = ["READ_MESSAGE_SIZE", "GRPCBlobServiceWrapper"]

# Bytes per BlobChunk sent by Read: the one message size, see _wire.MESSAGE_SIZE.
READ_MESSAGE_SIZE = MESSAGE_SIZE

_Context = grpc.aio.ServicerContext[Any, Any]


class GRPCBlobServiceWrapper:
    """Serves a :class:`BlobService` as ``tvix.castore.v1.BlobService``.

    - ``Stat`` answers ``NOT_FOUND`` for an absent blob; with ``send_chunks``
      it lists :meth:`BlobService.chunks` (empty for backends without finer
      chunking). ``send_bao`` is ignored: the answer never carries a bao
      outboard, as none is kept. Failing the call instead would also fail
      clients that only wanted to know whether the blob exists.
    - ``Read`` answers ``NOT_FOUND`` before sending anything, then streams the
      blob (or a chunk, by the chunk's digest) in messages of 512 KiB (the
      last one shorter), whatever piece sizes the backend's reader returns.
      An empty blob is an empty stream.
    - ``Put`` writes the stream into :meth:`BlobService.open_write` as it
      arrives (memory stays bounded) and returns the digest. If the stream
      breaks (the client cancels, the connection drops) the writer is
      aborted, so no blob appears.

    Digests of the wrong length answer ``INVALID_ARGUMENT``; backend errors are
    mapped by :mod:`tvix.castore.grpc.errors`.
    """

    service_name: ClassVar[str] = "tvix.castore.v1.BlobService"

    def __init__(self, blob_service: BlobService) -> None:
        self._blobs = blob_service

    def method_handlers(self) -> dict[str, grpc.RpcMethodHandler[Any, Any]]:
        """The handlers by method name (see :func:`tvix.castore.grpc.build_server`)."""
        return {
            "Stat": unary_unary(
                self.Stat,
                pb.StatBlobRequest,
                pb.StatBlobResponse.SerializeToString,
            ),
            "Read": unary_stream(
                self.Read,
                pb.ReadBlobRequest,
                # Read yields encoded messages, built in one join.
                identity,
            ),
            "Put": grpc.stream_unary_rpc_method_handler(
                self.Put,
                request_deserializer=decode_blob_chunk,
                response_serializer=pb.PutBlobResponse.SerializeToString,
            ),
        }

    async def Stat(self, request: pb.StatBlobRequest, context: _Context) -> pb.StatBlobResponse:
        """``BlobService/Stat``: whether the blob exists, or its chunks; see the class."""
        async with translate_errors(context):
            digest = digest_of(request.digest)
            if request.send_chunks:
                chunks = await self._blobs.chunks(digest)
                if chunks is not None:
                    return pb.StatBlobResponse(
                        chunks=[
                            pb.StatBlobResponse.ChunkMeta(digest=c.digest, size=c.size)
                            for c in chunks
                        ]
                    )
            elif await self._blobs.has(digest):
                return pb.StatBlobResponse()
            await context.abort(grpc.StatusCode.NOT_FOUND, f"blob {digest.hex()} not found")
        raise AssertionError("unreachable")  # pragma: no cover - abort raises

    async def Read(self, request: pb.ReadBlobRequest, context: _Context) -> AsyncIterator[bytes]:
        """``BlobService/Read``: stream the blob or chunk; see the class."""
        async with translate_errors(context):
            digest = digest_of(request.digest)
            reader = await self._blobs.open_read(digest)
            if reader is None:
                await context.abort(grpc.StatusCode.NOT_FOUND, f"blob {digest.hex()} not found")
            async with reader:
                parts: list[bytes] = []
                have = 0
                while data := await reader.read(READ_MESSAGE_SIZE - have):
                    parts.append(data)
                    have += len(data)
                    if have >= READ_MESSAGE_SIZE:
                        yield encode_blob_chunk_parts(parts, have)
                        parts, have = [], 0
                if parts:
                    yield encode_blob_chunk_parts(parts, have)

    async def Put(
        self, request_iterator: AsyncIterator[memoryview | None], context: _Context
    ) -> pb.PutBlobResponse:
        """``BlobService/Put``: store the streamed blob; see the class."""
        async with translate_errors(context):
            writer = self._blobs.open_write()
            try:
                async for data in request_iterator:
                    if data is None:
                        raise ValidationError("invalid BlobChunk: undecodable message")
                    await writer.write(data)
                await ensure_stream_completed(context)
                digest = await writer.close()
            except BaseException:
                # Cancelled by the client, a broken connection, or a failing
                # backend: whatever arrived must not become a blob.
                await writer.abort()
                raise
            return pb.PutBlobResponse(digest=digest)
        raise AssertionError("unreachable")  # pragma: no cover - translate_errors aborts
