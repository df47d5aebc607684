"""NAR size and sha256 of a castore node, computed by rendering it, and cached."""

from __future__ import annotations

import asyncio
import hashlib
from collections import OrderedDict
from typing import Protocol

from tvix.castore.blobservice.base import BlobService
from tvix.castore.directoryservice.base import DirectoryService
from tvix.castore.nodes import DirectoryNode, FileNode, Node, SymlinkNode
from tvix.store.nar.render import render_nar

__all__ = ["NarCalculation", "NarCalculator", "calculate_nar"]

# Above this, hashing runs in a thread (hashlib releases the GIL) so the
# event loop keeps serving while a large NAR is hashed.
_THREAD_HASH = 1 << 20


async def calculate_nar(
    blob_service: BlobService, directory_service: DirectoryService, node: Node
) -> tuple[int, bytes]:
    """``(size, sha256)`` of the NAR of ``node``, rendered from the services."""
    h = hashlib.sha256()
    size = 0
    async for piece in render_nar(blob_service, directory_service, node):
        size += len(piece)
        if len(piece) >= _THREAD_HASH:
            await asyncio.to_thread(h.update, piece)
        else:
            h.update(piece)
    return size, h.digest()


class NarCalculation(Protocol):
    """Anything that computes the NAR size and sha256 of a stored node."""

    async def calculate(self, node: Node) -> tuple[int, bytes]:
        """``(size, sha256)`` of the NAR of ``node``."""
        ...


def _cache_key(node: Node) -> tuple[object, ...]:
    # The root node's name is not part of its NAR.
    if isinstance(node, FileNode):
        return ("f", node.digest, node.size, node.executable)
    if isinstance(node, DirectoryNode):
        return ("d", node.digest, node.size)
    assert isinstance(node, SymlinkNode)
    return ("s", node.target)


class NarCalculator:
    """Computes NAR size and sha256 of nodes, remembering the last ``capacity`` results.

    Concurrent requests for the same node share one computation.
    """

    def __init__(
        self, blob_service: BlobService, directory_service: DirectoryService, capacity: int = 4096
    ) -> None:
        self._blobs = blob_service
        self._dirs = directory_service
        self._capacity = capacity
        self._done: OrderedDict[tuple[object, ...], tuple[int, bytes]] = OrderedDict()
        self._running: dict[tuple[object, ...], asyncio.Future[tuple[int, bytes]]] = {}

    async def calculate(self, node: Node) -> tuple[int, bytes]:
        """``(size, sha256)`` of the NAR of ``node``; see :func:`calculate_nar`."""
        key = _cache_key(node)
        hit = self._done.get(key)
        if hit is not None:
            self._done.move_to_end(key)
            return hit
        running = self._running.get(key)
        if running is not None:
            return await asyncio.shield(running)
        future = asyncio.ensure_future(calculate_nar(self._blobs, self._dirs, node))
        self._running[key] = future
        try:
            result = await asyncio.shield(future)
        finally:
            self._running.pop(key, None)
        self._done[key] = result
        if len(self._done) > self._capacity:
            self._done.popitem(last=False)
        return result
