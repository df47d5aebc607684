"""A read-through cache of Directories: a fast ``near`` service in front of a slower ``far`` one.

Composition only (it refers to two other services, so it has no URL): name
it ``type = "cache"`` in a composition file, or build it directly.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass

from typing_extensions import override

from tvix.castore.blobservice.cache import CacheConfig
from tvix.castore.composition import BuildContext
from tvix.castore.digest import B3Digest
from tvix.castore.directory import Directory
from tvix.castore.directoryservice.base import DirectoryPutter, DirectoryService
from tvix.castore.directoryservice.graph import verified_closure
from tvix.castore.errors import IntegrityError, ValidationError

__all__ = ["CacheDirectoryService", "CacheDirectoryServiceConfig"]

log = logging.getLogger(__name__)


class CacheDirectoryService(DirectoryService):
    """Directories read from ``near`` when it has them, else from ``far``, copied into ``near``.

    Reads
        :meth:`get` and :meth:`get_recursive` ask ``near``. A service only
        ever stores complete trees, so when ``near`` has a Directory it has
        everything below it too. On a miss they fetch the whole closure from
        ``far`` (one :meth:`get_recursive`; ``near`` could not store a
        Directory without its children), verify it (see
        :func:`~tvix.castore.directoryservice.graph.verified_closure`: each
        Directory is the one its parent refers to, with the right size, and
        nothing is missing or extra),
        put it into ``near`` as one closure, leaves first, and answer from
        the verified copy. A closure that fails verification is not stored
        and raises :class:`~tvix.castore.errors.IntegrityError`. A missed
        closure is held in memory while it is checked and copied
        (Directories are small: ~100 bytes plus their entries).
    Writes
        :meth:`put_multiple_start` sends each Directory to ``far`` and to
        ``near``; at close ``far`` (the source of truth, and the one whose
        validation counts) commits first, then ``near``. ``near`` may
        rightly reject a closure that refers to Directories only ``far``
        has; then ``near`` simply does not get it (a later read fills it).
        Any other failure of ``near`` fails the put, after ``far`` stored it
        (a retry is harmless).
    Not cached
        Absence: a miss asks ``far`` again every time.

    The cache does not close ``near`` and ``far``: whoever built them does.
    """

    def __init__(self, near: DirectoryService, far: DirectoryService) -> None:
        self.near = near
        self.far = far

    @override
    async def get(self, digest: B3Digest) -> Directory | None:
        directory = await self.near.get(digest)
        if directory is not None:
            return directory
        closure = await self._fill(digest)
        return closure[0] if closure else None

    @override
    async def get_recursive(self, root: B3Digest) -> AsyncIterator[Directory]:
        found = False
        async for directory in self.near.get_recursive(root):
            found = True
            yield directory
        if found:
            return
        for directory in await self._fill(root):
            yield directory

    async def _fill(self, root: B3Digest) -> list[Directory]:
        """Fetch ``root``'s closure from far, verify it, store it in near; BFS order.

        Empty when far lacks ``root``.
        """
        fetched = [d async for d in self.far.get_recursive(root)]
        if not fetched:
            return []
        bfs, leaves_first = verified_closure(root, fetched)
        async with self.near.put_multiple_start() as putter:
            for directory in leaves_first:
                await putter.put(directory)
        await putter.close()
        log.debug("cache: copied %d Directories below %s into near", len(bfs), root.hex())
        return bfs

    @override
    def put_multiple_start(self) -> DirectoryPutter:
        return _CachePutter(self.near.put_multiple_start(), self.far.put_multiple_start())


class _CachePutter(DirectoryPutter):
    """Sends each Directory to far and near; far commits first (see the service's docs)."""

    def __init__(self, near: DirectoryPutter, far: DirectoryPutter) -> None:
        self._near: DirectoryPutter | None = near
        self._far = far
        self._root: B3Digest | None = None
        self._aborted = False

    async def put(self, directory: Directory) -> None:
        if self._root is not None or self._aborted:
            raise ValueError("put into a closed directory putter")
        await self._far.put(directory)
        if self._near is not None:
            try:
                await self._near.put(directory)
            except ValidationError as e:
                # far accepted it, so near lacks something far has: leave near out.
                log.debug("cache: near rejects the closure, not caching it: %s", e)
                await self._drop_near()

    async def close(self) -> B3Digest:
        if self._root is None:
            if self._aborted:
                raise ValueError("close of an aborted directory putter")
            try:
                root = await self._far.close()
            except BaseException:
                await self._drop_near()
                raise
            if self._near is not None:
                try:
                    near_root = await self._near.close()
                except ValidationError as e:
                    # Typically a reference to a Directory only far has (never read through
                    # near): not a fault, the closure is simply not cached yet.
                    log.debug("cache: near rejects the closure, not caching it: %s", e)
                else:
                    if near_root != root:
                        raise IntegrityError(
                            f"cache: far stored the closure as {root.hex()}, near as "
                            f"{near_root.hex()}"
                        )
            self._root = root
        return self._root

    async def abort(self) -> None:
        if self._root is None:
            self._aborted = True
            try:
                await self._far.abort()
            finally:
                await self._drop_near()

    async def _drop_near(self) -> None:
        near, self._near = self._near, None
        if near is not None:
            await near.abort()


@dataclass(frozen=True)
class CacheDirectoryServiceConfig(CacheConfig):
    """A :class:`CacheDirectoryService` (see :class:`CacheConfig`)."""

    def build(self, ctx: BuildContext) -> CacheDirectoryService:
        """Near and far come from the composition."""
        return CacheDirectoryService(ctx.service(self.near), ctx.service(self.far))
