"""What the store holds, counted now and then in the background, for the browser and metrics.

Counting a store (:func:`tvix.store.stats.store_stats`: every store path and
every Directory once) costs a walk of all its metadata, far too much for each
page view or Prometheus scrape. :class:`StoreOverview` keeps the last
:class:`Snapshot` and recounts at most every ``interval`` seconds, in the
background: a reader gets the last counts at once (only the very first waits).

A snapshot also answers what a content-addressed store is good at showing:
how many store paths hold each blob and each Directory. Those counts come
from the Directories the count read anyway (kept in memory while counting):
each store path's tree is walked in memory once, counting every distinct
Directory and blob under it. That is a walk of every path's tree, so it is
skipped (:attr:`Snapshot.sharing_complete` false) for stores larger than
``max_sharing_work`` tree entries.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from typing_extensions import override

from tvix.castore.digest import B3Digest
from tvix.castore.directory import Directory
from tvix.castore.directoryservice.base import DirectoryPutter, DirectoryService
from tvix.castore.nodes import DirectoryNode, FileNode
from tvix.store.pathinfo import PathInfo
from tvix.store.pathinfoservice.base import PathInfoService
from tvix.store.stats import StoreStats, disk_usage, store_stats

__all__ = ["Snapshot", "StoreOverview"]

log = logging.getLogger("tvix.nar_bridge.overview")


@dataclass
class Snapshot:
    """The store as counted at :attr:`taken_at` (a ``time.time()``), in :attr:`seconds`."""

    stats: StoreStats
    #: Every store path, by absolute path.
    paths: dict[str, PathInfo]
    #: NAR bytes of the closure (itself and everything it refers to) of each
    #: top-level path (one no other path refers to): the biggest closures.
    closure_bytes: dict[str, int]
    #: How many store paths hold each Directory / blob somewhere in their tree.
    directory_holders: dict[B3Digest, int] = field(default_factory=dict)
    blob_holders: dict[B3Digest, int] = field(default_factory=dict)
    sharing_complete: bool = True
    #: Whether every top-level path's closure was counted (see ``max_closure_work``).
    closures_complete: bool = True
    #: Blobs held by more than one store path, and the bytes that sharing saves:
    #: what storing them once per holding path would add.
    shared_blobs: int = 0
    shared_bytes_saved: int = 0
    #: What the store takes on disk, metadata included, when it is a data directory.
    disk_bytes: int | None = None
    taken_at: float = 0.0
    seconds: float = 0.0
    _by_size: list[PathInfo] = field(default_factory=list)
    _by_closure: list[tuple[str, int]] = field(default_factory=list)
    _referrers: dict[str, list[PathInfo]] | None = None

    def referrers(self, path: str) -> list[PathInfo]:
        """The other store paths that refer to ``path``, by name (an index built once)."""
        if self._referrers is None:
            index: dict[str, list[PathInfo]] = {}
            for info in self.paths.values():
                for ref in info.references:
                    if ref != info.store_path:
                        index.setdefault(ref.absolute_path, []).append(info)
            for infos in index.values():
                infos.sort(key=lambda i: (i.store_path.name, i.store_path.absolute_path))
            self._referrers = index
        return self._referrers.get(path, [])

    def biggest(self, n: int) -> list[PathInfo]:
        """The ``n`` store paths with the largest NARs."""
        if len(self._by_size) != len(self.paths):
            self._by_size = sorted(self.paths.values(), key=lambda i: -i.nar_size)
        return self._by_size[:n]

    def biggest_closures(self, n: int) -> list[tuple[str, int]]:
        """The ``n`` store paths with the largest closures, with their closure bytes."""
        if len(self._by_closure) != len(self.closure_bytes):
            self._by_closure = sorted(self.closure_bytes.items(), key=lambda kv: -kv[1])
        return self._by_closure[:n]

    def search(self, query: str, limit: int) -> list[PathInfo]:
        """Store paths whose name or hash contains ``query`` (case-insensitive), by name."""
        q = query.lower()
        found = [
            info
            for path, info in self.paths.items()
            if q in path.removeprefix("/nix/store/").lower()
        ]
        found.sort(key=lambda i: (i.store_path.name, i.store_path.absolute_path))
        return found[:limit]


class _Recording(DirectoryService):
    """Reads through to ``inner``, keeping the Directories read (for the sharing counts).

    At most ``limit`` of them: past that, :attr:`overflow` is set and the
    sharing counts are skipped, so memory stays bounded on a huge store.
    """

    def __init__(self, inner: DirectoryService, limit: int) -> None:
        self.inner = inner
        self.limit = limit
        self.seen: dict[B3Digest, Directory] = {}
        self.overflow = False

    @override
    async def get(self, digest: B3Digest) -> Directory | None:
        return await self.inner.get(digest)

    @override
    async def get_recursive(self, root: B3Digest) -> AsyncIterator[Directory]:
        async for directory in self.inner.get_recursive(root):
            if len(self.seen) < self.limit:
                self.seen[directory.digest] = directory
            else:
                self.overflow = True
            yield directory

    @override
    def put_multiple_start(self) -> DirectoryPutter:
        raise NotImplementedError("read only")


def _closure_bytes(paths: dict[str, PathInfo], budget: int) -> tuple[dict[str, int], bool]:
    """The closure bytes of the top-level store paths (those no other path refers to).

    Only theirs: a path's closure is part of the closure of every path that
    refers to it, so the biggest closures are top-level ones, and walking
    every path's closure costs a walk per path of everything below it
    (quadratic on a long chain of references). Stops after ``budget`` steps;
    the flag says whether every top-level path was counted.
    """
    referred = {
        ref.absolute_path
        for info in paths.values()
        for ref in info.references
        if ref != info.store_path
    }
    out: dict[str, int] = {}
    for path, info in paths.items():
        if path in referred:
            continue
        seen = {path}
        stack = [info]
        total = 0
        while stack:
            current = stack.pop()
            total += current.nar_size
            budget -= 1 + len(current.references)
            for ref in current.references:
                ref_path = ref.absolute_path
                ref_info = paths.get(ref_path)
                if ref_path not in seen and ref_info is not None:
                    seen.add(ref_path)
                    stack.append(ref_info)
        if budget < 0:
            return out, False
        out[path] = total
    return out, True


def _count_sharing(
    infos: list[PathInfo], directories: dict[B3Digest, Directory], snapshot: Snapshot, budget: int
) -> None:
    dir_holders: dict[B3Digest, int] = {}
    blob_holders: dict[B3Digest, int] = {}
    for info in infos:
        root = info.node
        if isinstance(root, FileNode):
            blob_holders[root.digest] = blob_holders.get(root.digest, 0) + 1
            continue
        if not isinstance(root, DirectoryNode):
            continue
        dirs: set[B3Digest] = {root.digest}
        blobs: set[B3Digest] = set()
        stack = [root.digest]
        while stack:
            directory = directories.get(stack.pop())
            if directory is None:
                continue
            budget -= len(directory)
            if budget < 0:
                snapshot.sharing_complete = False
                return
            blobs.update(f.digest for f in directory.files)
            for d in directory.directories:
                if d.digest not in dirs:
                    dirs.add(d.digest)
                    stack.append(d.digest)
        for digest in dirs:
            dir_holders[digest] = dir_holders.get(digest, 0) + 1
        for digest in blobs:
            blob_holders[digest] = blob_holders.get(digest, 0) + 1
    snapshot.directory_holders = dir_holders
    snapshot.blob_holders = blob_holders
    sizes = snapshot.stats.blobs
    for digest, holders in blob_holders.items():
        if holders > 1:
            snapshot.shared_blobs += 1
            snapshot.shared_bytes_saved += (holders - 1) * sizes.get(digest, 0)


class StoreOverview:
    """The last :class:`Snapshot` of a store, recounted in the background when stale.

    ``interval`` is the age (seconds) after which a read starts a recount;
    the read still gets the last snapshot. Only one count runs at a time.
    """

    def __init__(
        self,
        path_infos: PathInfoService,
        directories: DirectoryService,
        *,
        interval: float = 300.0,
        max_sharing_work: int = 5_000_000,
        max_sharing_directories: int = 1_000_000,
        data_dir: str | None = None,
        max_closure_work: int = 5_000_000,
    ) -> None:
        self.path_infos = path_infos
        self.directories = directories
        self.interval = interval
        self.max_sharing_work = max_sharing_work
        self.max_sharing_directories = max_sharing_directories
        self.data_dir = data_dir
        self.max_closure_work = max_closure_work
        self._last: Snapshot | None = None
        self._running: asyncio.Task[Snapshot] | None = None

    @property
    def supported(self) -> bool:
        """Whether the store can be counted at all (its PathInfo service can list)."""
        return self.path_infos.supports_list

    @property
    def latest(self) -> Snapshot | None:
        """The last snapshot taken, without waiting or starting a count."""
        return self._last

    async def get(self, wait: float | None = None) -> Snapshot | None:
        """The last snapshot, at once; before the first, wait for it (at most ``wait`` seconds).

        ``None`` when the first count has not finished in ``wait`` seconds.
        """
        last = self._last
        if last is None:
            try:
                return await asyncio.wait_for(asyncio.shield(self.refresh()), wait)
            except TimeoutError:
                return None
        if time.time() - last.taken_at > self.interval:
            self.refresh()
        return last

    def refresh(self) -> asyncio.Task[Snapshot]:
        """Start a count unless one is running; the task of the one that runs."""
        if self._running is None:
            self._running = asyncio.ensure_future(self._count())
            self._running.add_done_callback(self._finished)
        return self._running

    def _finished(self, task: asyncio.Task[Snapshot]) -> None:
        self._running = None
        if not task.cancelled() and task.exception() is not None:
            log.error("counting the store failed: %s", task.exception())

    async def _count(self) -> Snapshot:
        start = time.perf_counter()
        recording = _Recording(self.directories, self.max_sharing_directories)
        infos: list[PathInfo] = []

        async def listed() -> AsyncIterator[PathInfo]:
            async for info in self.path_infos.list():
                infos.append(info)
                yield info

        stats = await store_stats(listed(), recording)
        paths = {info.store_path.absolute_path: info for info in infos}
        # The in-memory walks take a while on a large store: off the event loop.
        closure, closures_complete = await asyncio.to_thread(
            _closure_bytes, paths, self.max_closure_work
        )
        snapshot = Snapshot(
            stats, paths, closure, closures_complete=closures_complete, taken_at=time.time()
        )
        if self.data_dir is not None:
            snapshot.disk_bytes = await asyncio.to_thread(disk_usage, self.data_dir)
        if recording.overflow:
            snapshot.sharing_complete = False
        else:
            await asyncio.to_thread(
                _count_sharing, infos, recording.seen, snapshot, self.max_sharing_work
            )
        snapshot.seconds = time.perf_counter() - start
        self._last = snapshot
        log.info(
            "counted the store: %d paths, %d directories in %.2f s",
            stats.store_paths,
            stats.directories,
            snapshot.seconds,
        )
        return snapshot

    async def close(self) -> None:
        """Stop a count in progress."""
        if self._running is not None:
            self._running.cancel()
