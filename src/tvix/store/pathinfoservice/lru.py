"""``lru://?capacity=N``: the N most recently used PathInfos, in memory."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Self

from typing_extensions import override

from tvix.castore.composition import BuildContext, ServiceConfig, setting
from tvix.castore.errors import InvalidURLError, ValidationError
from tvix.castore.url import ServiceURL
from tvix.store.pathinfo import PathInfo
from tvix.store.pathinfoservice.base import PathInfoService, check_digest

__all__ = ["LRUPathInfoService", "LRUPathInfoServiceConfig"]


class LRUPathInfoService(PathInfoService):
    """Holds at most ``capacity`` PathInfos, forgetting the least recently used.

    A :meth:`get` that finds a PathInfo and every :meth:`put` make it the most
    recently used; a put beyond ``capacity`` forgets the least recently used
    one. Forgotten PathInfos are simply absent afterwards, so this is only
    useful as the ``near`` of a cache (or where losing entries is fine).
    :meth:`list` lists what it holds at the moment it is called. Lost when the
    process ends.
    """

    def __init__(self, capacity: int) -> None:
        if isinstance(capacity, bool) or not isinstance(capacity, int) or capacity < 1:
            raise ValidationError(f"LRU capacity must be a positive integer, not {capacity!r}")
        self.capacity = capacity
        # Least recently used first.
        self._infos: OrderedDict[bytes, PathInfo] = OrderedDict()

    def __len__(self) -> int:
        return len(self._infos)

    @override
    async def get(self, digest: bytes) -> PathInfo | None:
        key = check_digest(digest)
        info = self._infos.get(key)
        if info is not None:
            self._infos.move_to_end(key)
        return info

    @override
    async def put(self, info: PathInfo) -> PathInfo:
        key = info.store_path.digest
        self._infos[key] = info
        self._infos.move_to_end(key)
        while len(self._infos) > self.capacity:
            self._infos.popitem(last=False)
        return info

    @override
    async def list(self) -> AsyncIterator[PathInfo]:
        # A snapshot: puts while the caller iterates must not break the iteration.
        for info in list(self._infos.values()):
            yield info


@dataclass(frozen=True)
class LRUPathInfoServiceConfig(ServiceConfig):
    """``lru://?capacity=N`` (type ``lru``, key ``capacity``): a positive integer, required."""

    capacity: int = setting("int")

    @classmethod
    def from_url(cls, url: ServiceURL) -> Self:
        """No host or path; ``capacity`` is required."""
        url.reject_host()
        url.reject_path()
        url.reject_params("capacity")
        if "capacity" not in url.params:
            raise InvalidURLError(f"invalid service URL {url.raw!r}: capacity is required")
        capacity = url.int_param("capacity", 0)
        if capacity < 1:
            raise InvalidURLError(
                f"invalid service URL {url.raw!r}: capacity must be a positive integer"
            )
        return cls(capacity)

    def build(self, ctx: BuildContext) -> LRUPathInfoService:
        """A new, empty service."""
        return LRUPathInfoService(self.capacity)
