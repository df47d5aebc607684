"""Prometheus metrics of a gRPC server: calls by method and status code, and their latency.

The metric names are those of go-grpc-prometheus, which dashboards know:

================================== ==================================================
``grpc_server_started_total``      calls started, by ``grpc_service``, ``grpc_method``
``grpc_server_handled_total``      calls finished, by ``grpc_service``, ``grpc_method``
                                   and ``grpc_code`` (``OK``, ``NOT_FOUND``, ...)
``grpc_server_handling_seconds``   latency histogram (streams: until the last message)
``grpc_server_msg_sent_total``     messages streamed to clients
================================== ==================================================

Needs ``prometheus-client`` (the ``http`` extra): import this module only
when metrics are asked for.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc
from prometheus_client import CollectorRegistry, Counter, Histogram

__all__ = ["CallMetrics"]

_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 10, 60)


def _code(context: Any, error: BaseException | None) -> str:
    if isinstance(error, asyncio.CancelledError):
        return "CANCELLED"
    if error is not None and not isinstance(error, grpc.aio.AbortError):
        return "UNKNOWN"  # what grpc answers for an exception the handler let out
    code = context.code() if hasattr(context, "code") else None
    return getattr(code, "name", None) or "OK"


class CallMetrics(grpc.aio.ServerInterceptor):  # type: ignore[type-arg]
    """Counts and times every call; the metrics live in ``registry``."""

    def __init__(self, registry: CollectorRegistry) -> None:
        labels = ["grpc_service", "grpc_method"]
        self.started = Counter("grpc_server_started", "RPCs started", labels, registry=registry)
        self.handled = Counter(
            "grpc_server_handled",
            "RPCs finished, by status code",
            [*labels, "grpc_code"],
            registry=registry,
        )
        self.seconds = Histogram(
            "grpc_server_handling_seconds",
            "Time to handle an RPC",
            labels,
            buckets=_BUCKETS,
            registry=registry,
        )
        self.sent = Counter(
            "grpc_server_msg_sent", "Messages streamed to clients", labels, registry=registry
        )

    async def intercept_service(
        self,
        continuation: Callable[
            [grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler[Any, Any]]
        ],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler[Any, Any]:
        """Wrap the method's handler so that it counts and times its calls."""
        handler = await continuation(details)
        if handler is None:
            return handler
        service, _, method = details.method.lstrip("/").rpartition("/")
        started = self.started.labels(service, method)
        seconds = self.seconds.labels(service, method)
        sent = self.sent.labels(service, method)

        def done(start: float, context: Any, error: BaseException | None) -> None:
            seconds.observe(time.perf_counter() - start)
            self.handled.labels(service, method, _code(context, error)).inc()

        if handler.unary_unary or handler.stream_unary:
            inner: Any = handler.unary_unary or handler.stream_unary

            async def unary_response(request: Any, context: Any) -> Any:
                started.inc()
                start, error = time.perf_counter(), None
                try:
                    return await inner(request, context)
                except BaseException as e:
                    error = e
                    raise
                finally:
                    done(start, context, error)

            make = (
                grpc.unary_unary_rpc_method_handler
                if handler.unary_unary
                else grpc.stream_unary_rpc_method_handler
            )
            return make(unary_response, handler.request_deserializer, handler.response_serializer)
        inner_stream: Any = handler.unary_stream or handler.stream_stream

        async def stream_response(request: Any, context: Any) -> AsyncIterator[Any]:
            started.inc()
            start, error = time.perf_counter(), None
            try:
                async for item in inner_stream(request, context):
                    sent.inc()
                    yield item
            except BaseException as e:
                error = e
                raise
            finally:
                done(start, context, error)

        make_stream = (
            grpc.unary_stream_rpc_method_handler
            if handler.unary_stream
            else grpc.stream_stream_rpc_method_handler
        )
        return make_stream(
            stream_response, handler.request_deserializer, handler.response_serializer
        )
