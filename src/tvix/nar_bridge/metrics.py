"""``GET /metrics``: nar-bridge's Prometheus metrics, with ``prometheus-client``.

==================================================== ===========================================
``nar_bridge_http_requests_total``                   requests, by ``route`` (the route pattern,
                                                     e.g. ``/{hash}.narinfo``), ``method``,
                                                     ``status``
``nar_bridge_http_request_duration_seconds``         latency histogram, by ``route``, ``method``
``nar_bridge_http_response_bytes_total``             body bytes sent, by ``route``
``nar_bridge_http_request_bytes_total``              body bytes received, by ``route``
``nar_bridge_uploads_total``                         PUTs of ``kind`` ``nar``/``narinfo``, by
                                                     ``outcome`` ``accepted``/``refused``
``tvix_store_paths``, ``tvix_store_nar_bytes``,      the store's counts (see
``tvix_store_file_bytes``, ``tvix_store_blob_bytes``, :mod:`.overview`), as of the last count:
``tvix_store_blobs``, ``tvix_store_directories``,    a scrape never counts the store itself; it
``tvix_store_dedup_ratio``                           starts a recount in the background when the
                                                     last one is older than the interval
``tvix_store_disk_bytes``,                           the data directory's size on disk (the
                                                     embedded store only), bytes saved by
``tvix_store_shared_bytes_saved``                    keeping blobs shared by paths once
``tvix_store_count_timestamp_seconds``,              when the last count finished, and how long
``tvix_store_count_duration_seconds``                it took
==================================================== ===========================================

Each :class:`BridgeMetrics` has its own registry, so several bridges in one
process (tests) do not collide; the process's own metrics (CPU, memory,
file descriptors) are included.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable, Iterator

from aiohttp import web
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Histogram,
    ProcessCollector,
    generate_latest,
)
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector
from typing_extensions import override

from tvix.nar_bridge.overview import StoreOverview

__all__ = ["BridgeMetrics"]

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

# NAR downloads take from milliseconds to minutes.
_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300)
_UPLOAD_ROUTES = {"/nar/{file}": "nar", "/{hash}.narinfo": "narinfo"}


def _route(request: web.Request) -> str:
    """The route pattern a request matched (bounded label values), or ``unmatched``."""
    resource = request.match_info.route.resource
    return resource.canonical if resource is not None else "unmatched"


class _StoreCollector(Collector):
    """The store's counts from the overview's last snapshot, read at scrape time."""

    def __init__(self, overview: StoreOverview) -> None:
        self.overview = overview

    @override
    def collect(self) -> Iterator[Metric]:
        snapshot = self.overview.latest
        if snapshot is None:
            return
        stats = snapshot.stats
        figures = [
            ("tvix_store_paths", "Store paths", stats.store_paths),
            ("tvix_store_nar_bytes", "NAR bytes of all store paths", stats.nar_bytes),
            ("tvix_store_files", "Files in all store paths' trees", stats.files),
            ("tvix_store_file_bytes", "Bytes of those files", stats.file_bytes),
            ("tvix_store_blobs", "Distinct blobs", len(stats.blobs)),
            ("tvix_store_blob_bytes", "Bytes of the distinct blobs", stats.blob_bytes),
            ("tvix_store_directories", "Distinct Directories", stats.directories),
            ("tvix_store_dedup_ratio", "File bytes / distinct blob bytes", stats.dedup_ratio),
            ("tvix_store_count_timestamp_seconds", "When the counts were taken", snapshot.taken_at),
            ("tvix_store_count_duration_seconds", "How long counting took", snapshot.seconds),
        ]
        if snapshot.disk_bytes is not None:
            figures.append(
                ("tvix_store_disk_bytes", "Bytes the data directory takes", snapshot.disk_bytes)
            )
        if snapshot.sharing_complete:
            figures.append(
                (
                    "tvix_store_shared_bytes_saved",
                    "Bytes saved by keeping blobs several store paths hold once",
                    snapshot.shared_bytes_saved,
                )
            )
        for name, doc, value in figures:
            yield GaugeMetricFamily(name, doc, value=value)


class BridgeMetrics:
    """Request metrics (a middleware) and the ``/metrics`` route, over one registry."""

    def __init__(self, overview: StoreOverview | None = None) -> None:
        self.registry = CollectorRegistry()
        self.overview = overview
        ProcessCollector(registry=self.registry)
        self.requests = Counter(
            "nar_bridge_http_requests",
            "HTTP requests answered",
            ["route", "method", "status"],
            registry=self.registry,
        )
        self.latency = Histogram(
            "nar_bridge_http_request_duration_seconds",
            "Time to answer a request, body included",
            ["route", "method"],
            buckets=_BUCKETS,
            registry=self.registry,
        )
        self.sent = Counter(
            "nar_bridge_http_response_bytes",
            "Response body bytes sent",
            ["route"],
            registry=self.registry,
        )
        self.received = Counter(
            "nar_bridge_http_request_bytes",
            "Request body bytes received",
            ["route"],
            registry=self.registry,
        )
        self.uploads = Counter(
            "nar_bridge_uploads",
            "Uploads (PUT) of NARs and narinfos",
            ["kind", "outcome"],
            registry=self.registry,
        )
        if overview is not None:
            self.registry.register(_StoreCollector(overview))

    def register(self, app: web.Application) -> None:
        """Measure every request of ``app`` (outermost middleware) and serve ``/metrics``."""
        app.middlewares.insert(0, self._middleware)
        app.router.add_get("/metrics", self._get_metrics)

    @web.middleware
    async def _middleware(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        start = time.perf_counter()
        status = 500
        response: web.StreamResponse | None = None
        try:
            response = await handler(request)
            status = response.status
            return response
        except web.HTTPException as e:
            status = e.status
            raise
        finally:
            self._observe(request, response, status, time.perf_counter() - start)

    def _observe(
        self,
        request: web.Request,
        response: web.StreamResponse | None,
        status: int,
        seconds: float,
    ) -> None:
        route = _route(request)
        self.requests.labels(route, request.method, str(status)).inc()
        self.latency.labels(route, request.method).observe(seconds)
        if response is not None:
            # A streamed response has been sent already; a plain one is sent after this.
            # aiohttp's body_length counts the header bytes too: capped at the body's
            # declared length, it is exact unless the stream was cut short.
            sent = response.content_length or 0
            if response.prepared:
                sent = min(response.body_length, sent) if sent else response.body_length
            self.sent.labels(route).inc(sent)
        self.received.labels(route).inc(request.content.total_bytes)
        kind = _UPLOAD_ROUTES.get(route)
        if request.method == "PUT" and kind is not None:
            self.uploads.labels(kind, "accepted" if status < 300 else "refused").inc()

    async def _get_metrics(self, request: web.Request) -> web.Response:
        if self.overview is not None and self.overview.latest is not None:
            # Starts a recount when the last is stale; never waits for one (the
            # first count starts with the server: until it ends, no tvix_store_*).
            await self.overview.get()
        body = generate_latest(self.registry)
        response = web.Response(body=body)
        response.headers["Content-Type"] = CONTENT_TYPE_LATEST
        return response
