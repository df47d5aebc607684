"""``memory://``: PathInfos in a dict, for tests and ephemeral use."""

from __future__ import annotations

from collections.abc import AsyncIterator

from tvix.castore.url import ServiceURL
from tvix.store.pathinfo import PathInfo
from tvix.store.pathinfoservice.base import PathInfoService, check_digest

__all__ = ["MemoryPathInfoService"]


class MemoryPathInfoService(PathInfoService):
    """PathInfos held in a dict. Lost when the process ends."""

    def __init__(self) -> None:
        self._infos: dict[bytes, PathInfo] = {}

    @classmethod
    def from_url(cls, url: ServiceURL) -> MemoryPathInfoService:
        """``memory://``: no host, path or options."""
        url.reject_host()
        url.reject_path()
        url.reject_params()
        return cls()

    async def get(self, digest: bytes) -> PathInfo | None:
        return self._infos.get(check_digest(digest))

    async def put(self, info: PathInfo) -> PathInfo:
        self._infos[info.store_path.digest] = info
        return info

    async def list(self) -> AsyncIterator[PathInfo]:
        for info in list(self._infos.values()):
            yield info
