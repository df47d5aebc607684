"""A read-through cache of PathInfos: a fast ``near`` service in front of a slower ``far`` one.

Composition only (it refers to two other services, so it has no URL): name
it ``type = "cache"`` in a composition file, or build it directly. A typical
``near`` is an :class:`~tvix.store.pathinfoservice.lru.LRUPathInfoService`.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass

from typing_extensions import override

from tvix.castore.blobservice.cache import CacheConfig
from tvix.castore.composition import BuildContext
from tvix.castore.errors import IntegrityError
from tvix.store.pathinfo import PathInfo
from tvix.store.pathinfoservice.base import PathInfoService, check_digest

__all__ = ["CachePathInfoService", "CachePathInfoServiceConfig"]


class CachePathInfoService(PathInfoService):
    """PathInfos read from ``near`` when it has them, else from ``far``, copied into ``near``.

    Reads
        :meth:`get` asks ``near``; on a miss it asks ``far`` and puts what
        ``far`` returns into ``near`` as it is (signatures included). A
        PathInfo is not content-addressed, so the only check possible is that
        it is for the store path asked for (else
        :class:`~tvix.castore.errors.IntegrityError`, and nothing is cached);
        put a signature-checking service in front of an untrusted ``far``.
        :meth:`list` asks ``far`` only (``near`` holds a subset of it), and
        :attr:`supports_list` is ``far``'s; :attr:`supports_put` holds when
        both can put.
    Writes
        :meth:`put` stores into ``far`` (the source of truth) first, then
        puts what ``far`` returned (it may have added signatures) into
        ``near``, and returns that. A failure of ``near`` fails the put,
        after ``far`` stored it (a retry is harmless).
    Not cached
        Absence (a miss asks ``far`` again every time) and listings.

    The cache does not close ``near`` and ``far``: whoever built them does.
    """

    def __init__(self, near: PathInfoService, far: PathInfoService) -> None:
        self.near = near
        self.far = far

    @override
    @property
    def supports_list(self) -> bool:
        return self.far.supports_list

    @override
    @property
    def supports_put(self) -> bool:
        return self.far.supports_put and self.near.supports_put

    @override
    async def get(self, digest: bytes) -> PathInfo | None:
        digest = check_digest(digest)
        info = await self.near.get(digest)
        if info is not None:
            return info
        info = await self.far.get(digest)
        if info is None:
            return None
        if info.store_path.digest != digest:
            raise IntegrityError(
                f"PathInfo {digest.hex()}: the cache's far service returned one for "
                f"{info.store_path}"
            )
        await self.near.put(info)
        return info

    @override
    async def put(self, info: PathInfo) -> PathInfo:
        stored = await self.far.put(info)
        await self.near.put(stored)
        return stored

    @override
    def list(self) -> AsyncIterator[PathInfo]:
        return self.far.list()


@dataclass(frozen=True)
class CachePathInfoServiceConfig(CacheConfig):
    """A :class:`CachePathInfoService` (see :class:`CacheConfig`)."""

    def build(self, ctx: BuildContext) -> CachePathInfoService:
        """Near and far come from the composition."""
        return CachePathInfoService(ctx.service(self.near), ctx.service(self.far))
