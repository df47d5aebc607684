"""Method handlers for the servicers: requests that do not decode answer ``INVALID_ARGUMENT``.

grpc calls a method's request deserializer before the method; when it
raises, grpc logs a traceback and answers ``UNKNOWN``, as for a bug. A
request that is not the message it should be is the client's mistake, so
:func:`unary_unary` and :func:`unary_stream` decode it themselves: one log
line, and ``INVALID_ARGUMENT`` naming the message type and why. (Streaming
requests are decoded by the servicers, message by message, for the same
reason.)
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc
from google.protobuf.message import DecodeError

__all__ = ["unary_stream", "unary_unary"]

log = logging.getLogger(__name__)

_Context = grpc.aio.ServicerContext[Any, Any]


class _Undecodable:
    __slots__ = ("reason",)

    def __init__(self, reason: str) -> None:
        self.reason = reason


def _decoder(message: Any) -> Callable[[bytes], Any]:
    name = message.DESCRIPTOR.full_name

    def decode(data: bytes) -> Any:
        try:
            return message.FromString(data)
        except (DecodeError, ValueError) as e:
            log.warning("undecodable %s request (%d bytes): %s", name, len(data), e)
            return _Undecodable(f"request is not a valid {name}: {e or 'cannot decode'}")

    return decode


def unary_unary(
    method: Callable[[Any, _Context], Awaitable[Any]],
    request: Any,
    response_serializer: Callable[[Any], bytes],
) -> grpc.RpcMethodHandler[Any, Any]:
    """A unary method taking ``request`` messages (a protobuf message class)."""

    async def checked(req: Any, context: _Context) -> Any:
        if isinstance(req, _Undecodable):
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, req.reason)
        return await method(req, context)

    return grpc.unary_unary_rpc_method_handler(
        checked, request_deserializer=_decoder(request), response_serializer=response_serializer
    )


def unary_stream(
    method: Callable[[Any, _Context], AsyncIterator[Any]],
    request: Any,
    response_serializer: Callable[[Any], bytes],
) -> grpc.RpcMethodHandler[Any, Any]:
    """A server-streaming method taking ``request`` messages (a protobuf message class)."""

    async def checked(req: Any, context: _Context) -> AsyncIterator[Any]:
        if isinstance(req, _Undecodable):
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, req.reason)
        async for item in method(req, context):
            yield item

    return grpc.unary_stream_rpc_method_handler(
        checked, request_deserializer=_decoder(request), response_serializer=response_serializer
    )
