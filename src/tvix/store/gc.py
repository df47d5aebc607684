"""Garbage collection: delete store paths, then everything no store path needs.

Roots. Every PathInfo is a root. With a retention age (``keep_younger_than``)
the PathInfos put longer ago than that are deleted first, except those in
the closure (references, transitively) of a young one or of a *pin*. Pins
(``tvix-store pin``) are named roots kept in the store's
:class:`~tvix.store.gcstate.GCState`; :func:`delete_paths` refuses to
delete a pinned closure.

Mark and sweep. :func:`collect` marks every Directory and blob reachable
from the roots, then asks each service to sweep: the directory service
deletes the Directories not marked, the blob service the blobs and chunks
not marked, and the packed store then compacts packs whose live fraction
fell below a threshold (live chunks copied into new packs, the index
switched, the old pack deleted).

Concurrent writers. An import, upload or copy running during a GC writes
objects, or finds them already stored, before the PathInfo that makes them
reachable exists; the mark does not see them. They survive because of
*seen times* and a *grace period*:

- every Directory, blob and chunk records when it was last written or
  refreshed; finding an object already stored (``has``, a writer
  deduplicating, a Directory closure naming a stored child) refreshes it in
  the same transaction that confirms it is still there (at most once per
  ``REFRESH_SLACK``, 60 s, so reads stay reads);
- a sweep deletes only objects seen before ``cutoff = start - grace``, and
  checks that inside the deleting transaction, so an object refreshed a
  moment before is kept, and one deleted a moment before is reported absent
  to the writer (which then writes it again);
- whatever stays must stay complete: a Directory kept because it is young
  keeps everything below it, and the blobs of those Directories are marked
  before blobs are swept.

So an object an upload wrote or found at time ``t`` has ``seen >= t - 60``
and is deleted only if ``t - 60 < start - grace``: an upload that puts its
PathInfo within ``grace - 60`` seconds of first relying on an object can
never end with a PathInfo whose content was collected. The default grace
period is an hour; ``grace=0`` is for stores nobody writes to during the
GC (tests, maintenance windows).

Two GCs at once: a GC holds the lock of the store's GC state for its
whole run (``flock`` on ``DATA/gc.lock`` for the embedded store, a
PostgreSQL advisory lock for a store shared through PostgreSQL); a second
one is refused (:class:`GCBusyError`).

Crash safety: each step is one transaction or is idempotent, and ordered
so that a crash between steps leaves only garbage, never a dangling
reference: PathInfos go first, then Directories, then blob index rows;
compaction copies live chunks durably before switching index rows and
deletes a pack only once no row points into it. The next GC finds what is
left unreferenced and finishes the job.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import AsyncIterator, Iterable, Sequence
from dataclasses import dataclass, field

from tvix.castore.blobservice.base import BlobService, BlobSweep
from tvix.castore.blobservice.packs import CompactResult, PacksBlobService
from tvix.castore.digest import B3Digest
from tvix.castore.directoryservice.base import DirectoryService
from tvix.castore.nodes import DirectoryNode, FileNode
from tvix.nixcompat.storepath import StorePath
from tvix.store.errors import GCBusyError, GCError
from tvix.store.gcstate.base import GCState
from tvix.store.pathinfo import PathInfo
from tvix.store.pathinfoservice.base import PathInfoService

__all__ = [
    "DEFAULT_GRACE",
    "DEFAULT_MAX_UNUSED",
    "DEFAULT_THRESHOLD",
    "MIN_GRACE",
    "GCBusyError",
    "GCError",
    "GCReport",
    "collect",
    "delete_paths",
    "move_pins",
]

DEFAULT_GRACE = 3600.0
"""Seconds an object written or refreshed stays safe from a GC without a root."""
MIN_GRACE = 120.0
"""The shortest grace period that protects writers: twice the services' refresh
slack (60 s), so a refresh is never what decides."""
DEFAULT_THRESHOLD = 0.5
"""Packs with less than this fraction live are compacted."""
DEFAULT_MAX_UNUSED = 0.05
"""More packs are compacted while dead bytes exceed this fraction of all pack bytes."""


@dataclass(slots=True)
class GCReport:
    """What a garbage collection deleted (or, dry, would delete)."""

    dry_run: bool
    paths: list[StorePath] = field(default_factory=list)
    """Store paths deleted by retention."""
    roots: int = 0
    directories_live: int = 0
    blobs_live: int = 0
    directories: int = 0
    """Directories deleted."""
    blobs: BlobSweep = field(default_factory=BlobSweep)
    compaction: CompactResult = field(default_factory=CompactResult)
    seconds: float = 0.0
    phases: dict[str, float] = field(default_factory=dict)
    """Seconds spent marking, sweeping and compacting."""
    damaged: list[str] = field(default_factory=list)
    """Store paths whose root Directory is missing (reported; the GC went on)."""


def _check(
    blobs: BlobService, directories: DirectoryService, path_infos: PathInfoService, retain: bool
) -> None:
    missing = []
    if not path_infos.supports_list:
        missing.append(f"the path info service ({type(path_infos).__name__}) cannot list")
    if retain and not path_infos.supports_delete:
        missing.append(f"the path info service ({type(path_infos).__name__}) cannot delete")
    if not directories.supports_gc:
        missing.append(f"the directory service ({type(directories).__name__}) cannot delete")
    if not blobs.supports_gc:
        missing.append(f"the blob service ({type(blobs).__name__}) cannot delete")
    if missing:
        raise GCError("cannot collect garbage here: " + "; ".join(missing))


def closure(infos: dict[bytes, PathInfo], start: Iterable[bytes]) -> set[bytes]:
    """The digests of the stored paths ``start`` refers to, transitively (``start`` included)."""
    seen: set[bytes] = set()
    todo = [d for d in start if d in infos]
    while todo:
        d = todo.pop()
        if d in seen:
            continue
        seen.add(d)
        todo.extend(r.digest for r in infos[d].references if r.digest in infos)
    return seen


async def _retain(
    path_infos: PathInfoService,
    pins: Sequence[StorePath],
    keep_younger_than: float,
    start: float,
    dry_run: bool,
) -> list[StorePath]:
    infos: dict[bytes, PathInfo] = {}
    young: list[bytes] = []
    async for info, added in path_infos.list_added():
        infos[info.store_path.digest] = info
        if added >= start - keep_younger_than:
            young.append(info.store_path.digest)
    keep = closure(infos, [*young, *(p.digest for p in pins)])
    doomed = sorted(infos[d].store_path for d in infos if d not in keep)
    if not dry_run:
        for p in doomed:
            await path_infos.delete(p.digest)
    return doomed


async def _mark(
    directories: DirectoryService, infos: AsyncIterator[PathInfo], report: GCReport
) -> tuple[set[B3Digest], set[bytes]]:
    live_dirs: set[B3Digest] = set()
    live_blobs: set[bytes] = set()
    async for info in infos:
        report.roots += 1
        node = info.node
        if isinstance(node, FileNode):
            live_blobs.add(node.digest)
        elif isinstance(node, DirectoryNode) and node.digest not in live_dirs:
            found = False
            async for d in directories.get_recursive(node.digest):
                found = True
                live_dirs.add(d.digest)
                live_blobs.update(f.digest for f in d.files)
            if not found:
                report.damaged.append(info.store_path.absolute_path)
    return live_dirs, live_blobs


async def collect(
    blobs: BlobService,
    directories: DirectoryService,
    path_infos: PathInfoService,
    *,
    state: GCState,
    grace: float = DEFAULT_GRACE,
    keep_younger_than: float | None = None,
    threshold: float = DEFAULT_THRESHOLD,
    max_unused: float = DEFAULT_MAX_UNUSED,
    dry_run: bool = False,
) -> GCReport:
    """Collect the garbage of a store (see the module docs); what went, or would.

    ``state``: the store's GC state, whose lock makes this the only GC of
    the store and whose pins are roots. Raises :class:`GCBusyError` when
    another GC holds the lock, :class:`GCError` when a service cannot
    delete (then nothing is changed).
    """
    if grace != 0 and grace < MIN_GRACE:
        raise GCError(
            f"the grace period must be at least {MIN_GRACE:.0f} s (objects found present are "
            "refreshed at most once a minute), or 0 when nothing writes to the store meanwhile"
        )
    _check(blobs, directories, path_infos, keep_younger_than is not None)
    report = GCReport(dry_run)
    async with state.lock():
        start = time.time()
        cutoff = start - grace
        pinned = [p for _n, p in await state.pins()]
        if keep_younger_than is not None:
            report.paths = await _retain(path_infos, pinned, keep_younger_than, start, dry_run)
        gone = {p.digest for p in report.paths}
        t = time.time()
        live_dirs, live_blobs = await _mark(
            directories,
            (i async for i in path_infos.list() if i.store_path.digest not in gone),
            report,
        )
        report.phases["mark"] = time.time() - t
        t = time.time()
        swept = await directories.sweep(live_dirs, cutoff, dry_run=dry_run)
        report.directories = swept.deleted
        # Directories that stay though unmarked (young ones and those below
        # them) keep their blobs.
        for digest in swept.kept:
            d = await directories.get(digest)
            if d is not None:
                live_blobs.update(f.digest for f in d.files)
        report.directories_live = len(live_dirs) + len(swept.kept)
        report.blobs_live = len(live_blobs)
        report.blobs = await blobs.sweep(live_blobs, cutoff, dry_run=dry_run)
        report.phases["sweep"] = time.time() - t
        t = time.time()
        if isinstance(blobs, PacksBlobService):
            report.compaction = await blobs.compact(threshold, max_unused, dry_run=dry_run)
        report.phases["compact"] = time.time() - t
        report.seconds = time.time() - start
    return report


async def delete_paths(
    path_infos: PathInfoService,
    targets: Sequence[StorePath],
    *,
    state: GCState | None = None,
    recursive: bool = False,
) -> list[StorePath]:
    """Delete the PathInfos of ``targets``; the store paths deleted.

    Refuses (:class:`GCError`, nothing deleted) a path that is not stored, a
    path another stored path refers to (unless ``recursive``: then those
    referrers go too, transitively), and a path in a closure ``state``
    pins.
    Contents stay until the next :func:`collect`.
    """
    if not path_infos.supports_delete or not path_infos.supports_list:
        raise GCError(f"the path info service ({type(path_infos).__name__}) cannot delete")
    infos: dict[bytes, PathInfo] = {}
    async for info in path_infos.list():
        infos[info.store_path.digest] = info
    for t in targets:
        if t.digest not in infos:
            raise GCError(f"{t.absolute_path} is not in the store")
    doomed = {t.digest for t in targets}
    referrers: dict[bytes, list[bytes]] = {}
    for d, info in infos.items():
        for r in info.references:
            if r.digest != d:
                referrers.setdefault(r.digest, []).append(d)
    if recursive:
        todo = list(doomed)
        while todo:
            for referrer in referrers.get(todo.pop(), []):
                if referrer not in doomed:
                    doomed.add(referrer)
                    todo.append(referrer)
    else:
        for d in sorted(doomed, key=lambda d: infos[d].store_path):
            alive = [r for r in referrers.get(d, []) if r not in doomed]
            if alive:
                names = ", ".join(sorted(infos[r].store_path.absolute_path for r in alive)[:3])
                raise GCError(
                    f"cannot delete {infos[d].store_path.absolute_path}: still referenced by "
                    f"{names}{' and more' if len(alive) > 3 else ''} (--recursive deletes "
                    "those too)"
                )
    if state is not None:
        for name, p in await state.pins():
            hit = closure(infos, [p.digest]) & doomed
            if hit:
                first = infos[min(hit)].store_path.absolute_path
                raise GCError(f"cannot delete {first}: pinned by {name!r} ({p.absolute_path})")
    out = sorted(infos[d].store_path for d in doomed)
    for p in out:
        await path_infos.delete(p.digest)
    return out


async def move_pins(source: GCState, target: GCState) -> list[tuple[str, StorePath]]:
    """Move every pin of ``source`` to ``target``; the pins added to ``target``.

    For a store whose GC state moved (pins made in a data directory before
    its PathInfo service kept them). A pin whose name ``target`` already
    gives another path is added as ``"NAME (SOURCE)"``, so that both paths
    stay pinned. Each pin is added before it is removed from ``source``:
    stopped half-way, it is pinned twice, never not at all; again, it
    finishes.
    """
    have = dict(await target.pins())
    moved = []
    for name, path in await source.pins():
        as_name = name if have.get(name, path) == path else f"{name} ({source.where})"
        if have.get(as_name) != path:
            await target.add_pin(as_name, path)
            moved.append((as_name, path))
        await source.remove_pin(name)
    return moved


def data_dir_usage(path: str) -> int:
    """Bytes the files below ``path`` take on disk."""
    total = 0
    for root, _dirs, files in os.walk(path):
        for f in files:
            with contextlib.suppress(FileNotFoundError):
                total += os.lstat(os.path.join(root, f)).st_blocks * 512
    return total
