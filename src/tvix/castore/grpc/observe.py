"""Watching every call a server answers, written once: the call log and the metrics use it.

:class:`CallObserver` is a server interceptor that wraps each method's
handler (any of the four kinds) and tells its subclass when a call starts,
each message it streams, and how it ended (the status code's name and the
seconds it took). Subclasses say per method whether they watch it at all.
"""

from __future__ import annotations

import abc
import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc

__all__ = ["CallObserver", "Watch"]


class Watch(abc.ABC):
    """What a :class:`CallObserver` is told about the calls of one method."""

    def started(self) -> None:  # noqa: B027 - optional hook
        """A call started."""

    def sent(self) -> None:  # noqa: B027 - optional hook
        """A streaming call sent a message."""

    @abc.abstractmethod
    def finished(self, code: str, seconds: float, messages: int) -> None:
        """A call ended with status ``code`` (``OK``, ``NOT_FOUND``, ...) after ``seconds``."""


def _code(context: Any, error: BaseException | None) -> str:
    if isinstance(error, asyncio.CancelledError):
        return "CANCELLED"
    if error is not None and not isinstance(error, grpc.aio.AbortError):
        return "UNKNOWN"  # what grpc answers for an exception the handler let out
    code = context.code() if hasattr(context, "code") else None
    return getattr(code, "name", None) or "OK"


class CallObserver(grpc.aio.ServerInterceptor):  # type: ignore[type-arg]
    """Wraps every method's handler so that its :meth:`watch` is told about its calls."""

    @abc.abstractmethod
    def watch(self, service: str, method: str) -> Watch | None:
        """The watch of ``service``'s ``method``, or ``None`` to leave its calls alone."""

    async def intercept_service(
        self,
        continuation: Callable[
            [grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler[Any, Any]]
        ],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler[Any, Any]:
        """The method's handler, wrapped when it is watched."""
        handler = await continuation(details)
        if handler is None:
            return handler
        service, _, method = details.method.lstrip("/").rpartition("/")
        watch = self.watch(service, method)
        if watch is None:
            return handler

        if handler.unary_unary or handler.stream_unary:
            inner: Any = handler.unary_unary or handler.stream_unary

            async def unary_response(request: Any, context: Any) -> Any:
                watch.started()
                start, error = time.perf_counter(), None
                try:
                    return await inner(request, context)
                except BaseException as e:
                    error = e
                    raise
                finally:
                    watch.finished(_code(context, error), time.perf_counter() - start, 1)

            make = (
                grpc.unary_unary_rpc_method_handler
                if handler.unary_unary
                else grpc.stream_unary_rpc_method_handler
            )
            return make(unary_response, handler.request_deserializer, handler.response_serializer)
        inner_stream: Any = handler.unary_stream or handler.stream_stream

        async def stream_response(request: Any, context: Any) -> AsyncIterator[Any]:
            watch.started()
            start, error, sent = time.perf_counter(), None, 0
            try:
                async for item in inner_stream(request, context):
                    sent += 1
                    watch.sent()
                    yield item
            except BaseException as e:
                error = e
                raise
            finally:
                watch.finished(_code(context, error), time.perf_counter() - start, sent)

        make_stream = (
            grpc.unary_stream_rpc_method_handler
            if handler.unary_stream
            else grpc.stream_stream_rpc_method_handler
        )
        return make_stream(
            stream_response, handler.request_deserializer, handler.response_serializer
        )
