"""Validation of a Directory closure sent leaves-first, shared by every backend."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping

from typing_extensions import override

from tvix.castore.digest import B3Digest
from tvix.castore.directory import Directory
from tvix.castore.directoryservice.base import DirectoryPutter
from tvix.castore.directoryservice.graph import DirectoryGraph, Order

__all__ = ["BufferedDirectoryPutter", "ClosureValidator"]

# Looks up already-stored Directories (absent ones left out), which a closure may refer to.
StoredLookup = Callable[[list[B3Digest]], Awaitable[Mapping[B3Digest, Directory]]]


class ClosureValidator:
    """Checks a closure Directory by Directory as it arrives, leaves first.

    A :class:`~tvix.castore.directoryservice.graph.DirectoryGraph` in
    leaves-to-root order; references to Directories not sent earlier are
    resolved against the store (through a :data:`StoredLookup`) at
    :meth:`finalize`.
    """

    def __init__(self) -> None:
        self._graph = DirectoryGraph(Order.LEAVES_TO_ROOT)

    def add(self, directory: Directory) -> None:
        """Accept ``directory``; raises :class:`ValidationError` on a size mismatch."""
        self._graph.add(directory)

    async def finalize(self, lookup: StoredLookup | None) -> tuple[B3Digest, list[Directory]]:
        """The root's digest and the new Directories leaves-first, each once.

        Raises :class:`ValidationError` if the closure is empty, refers to
        Directories that are neither in it nor stored (``lookup`` ``None``
        means nothing is stored), or holds Directories unreachable from the root.
        """
        graph = self._graph
        stored: Mapping[B3Digest, Directory] = {}
        dangling = graph.dangling()
        if dangling and lookup is not None and graph.root is not None:
            stored = await lookup(list(dangling))
        root = graph.validate(stored)
        return root, graph.drain_leaves_to_root()


Commit = Callable[[B3Digest, list[Directory]], Awaitable[None]]


class BufferedDirectoryPutter(DirectoryPutter):
    """A putter that validates as Directories arrive and commits the closure at close.

    ``commit(root, directories)`` must store all of them or none (one
    transaction); ``lookup`` resolves references to already-stored ones.
    """

    def __init__(self, commit: Commit, lookup: StoredLookup | None) -> None:
        self._validator = ClosureValidator()
        self._commit = commit
        self._lookup = lookup
        self._root: B3Digest | None = None
        self._aborted = False

    @override
    async def put(self, directory: Directory) -> None:
        if self._root is not None or self._aborted:
            raise ValueError("put into a closed directory putter")
        self._validator.add(directory)

    @override
    async def close(self) -> B3Digest:
        if self._root is None:
            if self._aborted:
                raise ValueError("close of an aborted directory putter")
            root, directories = await self._validator.finalize(self._lookup)
            await self._commit(root, directories)
            self._root = root
        return self._root

    @override
    async def abort(self) -> None:
        self._aborted = True
