"""``tvix.castore.v1.DirectoryService`` served from any :class:`DirectoryService`."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any, ClassVar

import grpc

from tvix.castore.directoryservice.base import DirectoryService
from tvix.castore.grpc._stream import ensure_stream_completed
from tvix.castore.grpc._wire import identity
from tvix.castore.grpc.errors import digest_of, translate_errors
from tvix.castore.grpc.handlers import unary_stream
from tvix.castore.proto import directory_from_bytes, pb

__all__ = ["GRPCDirectoryServiceWrapper"]

_Context = grpc.aio.ServicerContext[Any, Any]


class GRPCDirectoryServiceWrapper:
    """Serves a :class:`DirectoryService` as ``tvix.castore.v1.DirectoryService``.

    - ``Get`` answers ``NOT_FOUND`` when the root is absent; otherwise streams
      it (and, with ``recursive``, everything below it in the order of
      :meth:`DirectoryService.get_recursive`). Directories go out as their
      canonical encoding, without building protobuf messages.
    - ``Put`` validates each received Directory (``INVALID_ARGUMENT`` with the
      rule it breaks) and feeds it to :meth:`DirectoryService.put_multiple_start`;
      a closure the putter rejects answers ``INVALID_ARGUMENT`` with the
      putter's message, and a stream that breaks off (the client cancels, the
      connection drops) is aborted. Either way nothing of it is stored.
    """

    service_name: ClassVar[str] = "tvix.castore.v1.DirectoryService"

    def __init__(self, directory_service: DirectoryService) -> None:
        self._directories = directory_service

    def method_handlers(self) -> dict[str, grpc.RpcMethodHandler[Any, Any]]:
        """The handlers by method name (see :func:`tvix.castore.grpc.build_server`)."""
        return {
            "Get": unary_stream(
                self.Get,
                pb.GetDirectoryRequest,
                identity,
            ),
            "Put": grpc.stream_unary_rpc_method_handler(
                self.Put,
                request_deserializer=identity,
                response_serializer=pb.PutDirectoryResponse.SerializeToString,
            ),
        }

    async def Get(self, request: pb.GetDirectoryRequest, context: _Context) -> AsyncIterator[bytes]:
        """``DirectoryService/Get``: stream a Directory (and below); see the class."""
        async with translate_errors(context):
            if request.WhichOneof("by_what") != "digest":
                await context.abort(
                    grpc.StatusCode.INVALID_ARGUMENT, "GetDirectoryRequest: no digest given"
                )
            digest = digest_of(request.digest)
            if not request.recursive:
                directory = await self._directories.get(digest)
                if directory is not None:
                    yield directory.encode()
                    return
            else:
                found = False
                async for directory in self._directories.get_recursive(digest):
                    found = True
                    yield directory.encode()
                if found:
                    return
            await context.abort(grpc.StatusCode.NOT_FOUND, f"Directory {digest.hex()} not found")

    async def Put(
        self, request_iterator: AsyncIterator[bytes], context: _Context
    ) -> pb.PutDirectoryResponse:
        """``DirectoryService/Put``: store a streamed closure; see the class."""
        async with translate_errors(context):
            putter = self._directories.put_multiple_start()
            try:
                async for raw in request_iterator:
                    await putter.put(directory_from_bytes(raw))
                await ensure_stream_completed(context)
                root = await putter.close()
            except BaseException:
                await putter.abort()
                raise
            return pb.PutDirectoryResponse(root_digest=root)
        raise AssertionError("unreachable")  # pragma: no cover - translate_errors aborts
