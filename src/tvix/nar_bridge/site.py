"""The whole nar-bridge application: the binary cache plus metrics and the store browser.

:meth:`NarBridge.make_app` is the binary cache alone; :func:`build_app`
adds ``/metrics`` (:mod:`.metrics`) and, unless turned off, the read-only
store browser at ``/`` (:mod:`.ui`), both fed by one background
:class:`~tvix.nar_bridge.overview.StoreOverview`.
"""

from __future__ import annotations

from aiohttp import web

from tvix.nar_bridge.metrics import BridgeMetrics
from tvix.nar_bridge.overview import StoreOverview
from tvix.nar_bridge.server import NarBridge

__all__ = ["build_app"]


def build_app(
    bridge: NarBridge,
    *,
    ui: bool = True,
    metrics: bool = True,
    stats_interval: float = 300.0,
    data_dir: str | None = None,
) -> web.Application:
    """The application serving ``bridge``, with metrics and the browser as asked.

    ``stats_interval``: seconds after which the store's counts (the browser's
    front page, the ``tvix_store_*`` metrics) are recounted, in the background.
    """
    app = bridge.make_app()
    overview = StoreOverview(
        bridge.path_infos, bridge.directories, interval=stats_interval, data_dir=data_dir
    )

    async def start(_app: web.Application) -> None:
        # The first count starts with the server, so the first scrape or page finds it.
        if overview.supported:
            overview.refresh()

    async def close(_app: web.Application) -> None:
        await overview.close()

    app.on_startup.append(start)
    app.on_cleanup.append(close)
    if metrics:
        BridgeMetrics(overview).register(app)
    if ui:
        from tvix.nar_bridge.ui import StoreBrowser

        StoreBrowser(bridge, overview).register(app)
    return app
