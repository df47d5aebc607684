"""``memory://``: PathInfos in a dict, for tests and ephemeral use."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from dataclasses import dataclass

from typing_extensions import override

from tvix.castore.composition import BuildContext, EmptyConfig
from tvix.store.pathinfo import PathInfo
from tvix.store.pathinfoservice.base import PathInfoService, check_digest

__all__ = ["MemoryPathInfoService", "MemoryPathInfoServiceConfig"]


class MemoryPathInfoService(PathInfoService):
    """PathInfos held in a dict. Lost when the process ends."""

    @property
    @override
    def supports_delete(self) -> bool:
        return True

    def __init__(self) -> None:
        self._infos: dict[bytes, PathInfo] = {}
        self._added: dict[bytes, float] = {}

    @override
    async def get(self, digest: bytes) -> PathInfo | None:
        return self._infos.get(check_digest(digest))

    @override
    async def put(self, info: PathInfo) -> PathInfo:
        self._infos[info.store_path.digest] = info
        self._added[info.store_path.digest] = time.time()
        return info

    @override
    async def delete(self, digest: bytes) -> bool:
        key = check_digest(digest)
        self._added.pop(key, None)
        return self._infos.pop(key, None) is not None

    @override
    async def list_added(self) -> AsyncIterator[tuple[PathInfo, float]]:
        for key, info in list(self._infos.items()):
            yield info, self._added.get(key, 0.0)

    @override
    async def list(self) -> AsyncIterator[PathInfo]:
        for info in list(self._infos.values()):
            yield info


@dataclass(frozen=True)
class MemoryPathInfoServiceConfig(EmptyConfig):
    """``memory://`` (type ``memory``): no settings."""

    def build(self, ctx: BuildContext) -> MemoryPathInfoService:
        """A new, empty service."""
        return MemoryPathInfoService()
