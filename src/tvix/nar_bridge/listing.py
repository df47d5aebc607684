"""``GET /<hash>.ls``: the JSON NAR listing of a store path, computed from its node tree.

Nix writes these next to the narinfo when asked (``write-nar-listing=true``);
clients use them to list a store path and to fetch single files by
``narOffset`` without the whole NAR. The listing comes from the Directory
closure alone (see :mod:`tvix.store.nar.listing`); no blob is read.
"""

from __future__ import annotations

from aiohttp import web

from tvix.nar_bridge.errors import NotFound
from tvix.nar_bridge.urls import parse_hash_part
from tvix.store.nar.listing import nar_listing
from tvix.store.nar.seekable import LayoutCache
from tvix.store.pathinfoservice.base import PathInfoService

__all__ = ["ListingRoutes"]

LISTING_TYPE = "application/json"


class ListingRoutes:
    """The ``.ls`` route over a PathInfo service and a (shared) layout cache."""

    def __init__(self, path_infos: PathInfoService, layouts: LayoutCache) -> None:
        self.path_infos = path_infos
        self.layouts = layouts

    def register(self, app: web.Application) -> None:
        """Add ``GET|HEAD /{hash}.ls`` to ``app``."""
        app.router.add_get("/{hash}.ls", self.get_listing)

    async def get_listing(self, request: web.Request) -> web.Response:
        """The listing of the store path with that hash part (404 if unknown)."""
        hash_part = request.match_info["hash"]
        info = await self.path_infos.get(parse_hash_part(hash_part))
        if info is None:
            raise NotFound(f"{hash_part}.ls: no such store path")
        layout = await self.layouts.get(info.node)
        if layout is None:
            raise NotFound(f"{info.store_path}: its root Directory is not stored")
        body = nar_listing(layout)
        # A store path's contents never change: neither does their listing.
        headers = {"Cache-Control": "public, max-age=31536000, immutable"}
        return web.Response(body=body, content_type=LISTING_TYPE, headers=headers)
