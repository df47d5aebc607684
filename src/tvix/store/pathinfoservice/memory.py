"""``memory://``: PathInfos in a dict, for tests and ephemeral use."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass

from typing_extensions import override

from tvix.castore.composition import BuildContext, EmptyConfig
from tvix.store.pathinfo import PathInfo
from tvix.store.pathinfoservice.base import PathInfoService, check_digest

__all__ = ["MemoryPathInfoService", "MemoryPathInfoServiceConfig"]


class MemoryPathInfoService(PathInfoService):
    """PathInfos held in a dict. Lost when the process ends."""

    def __init__(self) -> None:
        self._infos: dict[bytes, PathInfo] = {}

    @override
    async def get(self, digest: bytes) -> PathInfo | None:
        return self._infos.get(check_digest(digest))

    @override
    async def put(self, info: PathInfo) -> PathInfo:
        self._infos[info.store_path.digest] = info
        return info

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
