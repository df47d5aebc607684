"""Directories as the filesystem reads them: fetched once, kept in a bounded LRU."""

from __future__ import annotations

import asyncio
import bisect
from collections import OrderedDict

from tvix.castore.digest import B3Digest
from tvix.castore.directoryservice.base import DirectoryService
from tvix.castore.errors import StorageError
from tvix.castore.nodes import DirectoryNode, Node
from tvix.fs.inodes import EntryStat, node_stat

__all__ = ["Listing", "ListingCache"]


class Listing:
    """The entries of one Directory: in name order (readdir offsets index it) and by name.

    ``stats`` holds what each entry shows (:func:`~tvix.fs.inodes.node_stat`),
    in the same order: worked out once per Directory, not per entry listed;
    ``directories`` the child directories alone, in name order.
    """

    __slots__ = ("by_name", "directories", "entries", "stats")

    def __init__(self, entries: tuple[Node, ...]) -> None:
        self.entries = entries
        self.by_name = {n.name: n for n in entries}
        self.stats: tuple[EntryStat, ...] = tuple(map(node_stat, entries))
        self.directories = tuple(n for n in entries if type(n) is DirectoryNode)

    def next_directory(self, name: bytes) -> DirectoryNode | None:
        """The first child directory named after ``name``, if any."""
        directories = self.directories
        index = bisect.bisect_right(directories, name, key=_name)
        return directories[index] if index < len(directories) else None

    def __len__(self) -> int:
        return len(self.entries)


def _name(node: DirectoryNode) -> bytes:
    return node.name


class ListingCache:
    """Listings of Directories by digest, fetched from ``directories`` on first use.

    Directories are immutable and addressed by content, so a listing never goes
    stale and equal directories share one. The cache holds at most
    ``max_entries`` entries summed over its listings (least recently used
    evicted first; the one just fetched always stays), so memory is bounded
    whatever the kernel keeps referenced. Concurrent requests for the same
    digest share one fetch, which gives up after ``timeout`` seconds (so a
    hung service cannot leave it pending for every later request).
    """

    def __init__(
        self, directories: DirectoryService, max_entries: int = 1_000_000, timeout: float = 60.0
    ) -> None:
        self._directories = directories
        self._timeout = timeout
        self._max_entries = max_entries
        self._cached: OrderedDict[B3Digest, Listing] = OrderedDict()
        self._size = 0
        self._pending: dict[B3Digest, asyncio.Task[Listing]] = {}

    async def get(self, digest: B3Digest) -> Listing:
        """The listing of Directory ``digest``.

        Raises :class:`~tvix.castore.errors.StorageError` when it is not stored
        (a DirectoryNode points at it, so the store is damaged) or the fetch fails.
        """
        listing = self._cached.get(digest)
        if listing is not None:
            self._cached.move_to_end(digest)
            return listing
        task = self._pending.get(digest)
        if task is None:
            # A task of its own, awaited through shield: a request that gives up
            # (its deadline passed) must not cancel the fetch others wait for.
            task = asyncio.ensure_future(self._fetch(digest))
            self._pending[digest] = task
            task.add_done_callback(lambda t: self._fetched(digest, t))
        return await asyncio.shield(task)

    def cached(self, digest: B3Digest) -> Listing | None:
        """The listing of Directory ``digest`` if it is at hand (fetches nothing)."""
        return self._cached.get(digest)

    def prefetch(self, digest: B3Digest) -> None:
        """Start fetching Directory ``digest`` unless it is cached or on its way.

        A failed prefetch is forgotten: the next :meth:`get` tries again and
        reports the failure.
        """
        if digest not in self._cached and digest not in self._pending:
            task = asyncio.ensure_future(self._fetch(digest))
            self._pending[digest] = task
            task.add_done_callback(lambda t: self._fetched(digest, t))

    async def _fetch(self, digest: B3Digest) -> Listing:
        async with asyncio.timeout(self._timeout):
            directory = await self._directories.get(digest)
        if directory is None:
            raise StorageError(f"Directory {digest} is missing from the directory service")
        return Listing(tuple(directory.nodes()))

    def _fetched(self, digest: B3Digest, task: asyncio.Task[Listing]) -> None:
        del self._pending[digest]
        # Retrieving the exception marks it handled; whoever awaited got it already.
        if task.cancelled() or task.exception() is not None:
            return
        self._insert(digest, task.result())

    def _insert(self, digest: B3Digest, listing: Listing) -> None:
        self._cached[digest] = listing
        self._size += len(listing)
        while self._size > self._max_entries and len(self._cached) > 1:
            _digest, evicted = self._cached.popitem(last=False)
            self._size -= len(evicted)
