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

from prometheus_client import CollectorRegistry, Counter, Histogram
from typing_extensions import override

from tvix.castore.grpc.observe import CallObserver, Watch

__all__ = ["CallMetrics"]

_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 10, 60)


class _MethodMetrics(Watch):
    def __init__(self, metrics: CallMetrics, service: str, method: str) -> None:
        self._labels = (service, method)
        self._metrics = metrics
        self._started = metrics.started.labels(service, method)
        self._seconds = metrics.seconds.labels(service, method)
        self._sent = metrics.sent.labels(service, method)

    @override
    def started(self) -> None:
        self._started.inc()

    @override
    def sent(self) -> None:
        self._sent.inc()

    @override
    def finished(self, code: str, seconds: float, messages: int) -> None:
        self._seconds.observe(seconds)
        self._metrics.handled.labels(*self._labels, code).inc()


class CallMetrics(CallObserver):
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

    @override
    def watch(self, service: str, method: str) -> Watch:
        return _MethodMetrics(self, service, method)
