"""Breadth-first traversal of a Directory tree, for backends without a native one."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable, Sequence

from tvix.castore.digest import B3Digest
from tvix.castore.directory import Directory
from tvix.castore.errors import StorageError

__all__ = ["traverse_bfs"]

# Fetches a batch of Directories by digest; absent ones are left out of the result.
GetMany = Callable[[Sequence[B3Digest]], Awaitable[dict[B3Digest, Directory]]]


async def traverse_bfs(get_many: GetMany, root: B3Digest) -> AsyncIterator[Directory]:
    """Yield ``root`` and every Directory below it breadth-first, each digest once.

    Fetches one level at a time through ``get_many``, so a backend with batched
    lookups needs one round trip per level, not per Directory. Yields nothing
    when ``root`` is absent; raises :class:`StorageError` when a Directory
    below it is missing.
    """
    found = await get_many([root])
    if root not in found:
        return
    seen = {root}
    level = [found[root]]
    while level:
        wanted: list[B3Digest] = []
        parents: dict[B3Digest, B3Digest] = {}
        for directory in level:
            yield directory
            for child in directory.directories:
                if child.digest not in seen:
                    seen.add(child.digest)
                    wanted.append(child.digest)
                    parents[child.digest] = directory.digest
        if not wanted:
            return
        found = await get_many(wanted)
        level = []
        for digest in wanted:
            fetched = found.get(digest)
            if fetched is None:
                raise StorageError(
                    f"Directory {digest.hex()} (below {parents[digest].hex()}) is missing"
                )
            level.append(fetched)
