"""What a store holds, counted: store paths, NAR bytes, and the content they share.

A content-addressed store keeps each blob and Directory once however many
store paths hold it; :func:`store_stats` walks every store path's closure
and counts both sides, so the saving is visible: the NAR bytes the store
paths amount to against the bytes of their distinct blobs.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterable, Mapping
from dataclasses import dataclass, field

from tvix.castore.digest import B3Digest
from tvix.castore.directoryservice.base import DirectoryService
from tvix.castore.nodes import DirectoryNode, FileNode
from tvix.nixcompat.storepath import StorePath
from tvix.store.errors import NotFoundError
from tvix.store.pathinfo import PathInfo
from tvix.store.pathinfoservice.base import PathInfoService

__all__ = ["StoreStats", "closure_sizes", "store_stats"]


@dataclass
class StoreStats:
    """Counts over a set of store paths (see :func:`store_stats`)."""

    store_paths: int = 0
    nar_bytes: int = 0
    files: int = 0
    file_bytes: int = 0
    directories: int = 0
    blobs: dict[B3Digest, int] = field(default_factory=dict)
    missing_directories: int = 0

    @property
    def blob_bytes(self) -> int:
        """The bytes of the distinct blobs: what the contents cost before compression."""
        return sum(self.blobs.values())

    @property
    def dedup_ratio(self) -> float:
        """File bytes over distinct blob bytes: how often each stored byte is used."""
        return self.file_bytes / self.blob_bytes if self.blob_bytes else 1.0


async def store_stats(
    infos: AsyncIterator[PathInfo], directory_service: DirectoryService
) -> StoreStats:
    """Count the store paths ``infos`` and everything their root nodes reach.

    Every Directory is read once however many paths share it; a Directory
    that cannot be found is counted in :attr:`StoreStats.missing_directories`
    (``tvix-store verify`` says more).
    """
    stats = StoreStats()
    seen: set[B3Digest] = set()

    def add_file(node: FileNode) -> None:
        stats.files += 1
        stats.file_bytes += node.size
        stats.blobs[node.digest] = node.size

    async def walk(root: DirectoryNode) -> None:
        if root.digest in seen:
            return
        found = False
        async for directory in directory_service.get_recursive(root.digest):
            found = True
            if directory.digest in seen:
                continue
            seen.add(directory.digest)
            stats.directories += 1
            for f in directory.files:
                add_file(f)
        if not found:
            stats.missing_directories += 1

    async for info in infos:
        stats.store_paths += 1
        stats.nar_bytes += info.nar_size
        if isinstance(info.node, FileNode):
            add_file(info.node)
        elif isinstance(info.node, DirectoryNode):
            await walk(info.node)
    return stats


async def closure_sizes(
    path_info_service: PathInfoService, infos: Iterable[PathInfo]
) -> Mapping[str, int]:
    """The closure size (NAR bytes of it and everything it refers to) of each of ``infos``.

    Keyed by absolute store path; raises :class:`NotFoundError` naming a
    reference that is not in the store.
    """
    known: dict[str, PathInfo] = {}

    async def lookup(path: str) -> PathInfo:
        info = known.get(path)
        if info is None:
            got = await path_info_service.get(StorePath.from_absolute_path(path).digest)
            if got is None:
                raise NotFoundError(f"{path} is not in the store")
            known[path] = info = got
        return info

    out: dict[str, int] = {}
    for info in infos:
        known[info.store_path.absolute_path] = info
    for info in infos:
        seen = {info.store_path.absolute_path}
        queue = [info]
        total = 0
        while queue:
            current = queue.pop()
            total += current.nar_size
            for ref in current.references:
                if ref.absolute_path not in seen:
                    seen.add(ref.absolute_path)
                    queue.append(await lookup(ref.absolute_path))
        out[info.store_path.absolute_path] = total
    return out
