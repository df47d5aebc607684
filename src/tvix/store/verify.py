"""Check that the contents of store paths are complete and intact, and repair what is not.

:func:`verify_path_info` reports each problem with the path it affects and
the objects at fault; :func:`repair` removes those (``tvix-store verify
--repair``) so that a re-import or a copy from another store restores them.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

from tvix.castore.blobservice import BlobMismatchError, open_verified
from tvix.castore.blobservice.base import BlobService
from tvix.castore.digest import B3Digest
from tvix.castore.directoryservice.base import DirectoryService
from tvix.castore.errors import CastoreError
from tvix.castore.nodes import DirectoryNode, FileNode
from tvix.store.nar.calculate import calculate_nar
from tvix.store.pathinfo import PathInfo

__all__ = ["Problem", "repair", "verify_path_info"]

_BLOCK = 1 << 20


@dataclass(frozen=True)
class Problem:
    """Something wrong with a store path: where (``path``, absolute) and what.

    ``blob``: the blob whose bytes are wrong or unreadable (``None`` for a
    missing one). ``directories``: the Directories from the path's root down
    to the one at fault (damaged, wrongly sized, or naming an absent or
    damaged child): what :func:`repair` removes.
    """

    path: str
    message: str
    blob: B3Digest | None = None
    directories: tuple[B3Digest, ...] = ()

    def __str__(self) -> str:
        return f"{self.path}: {self.message}"


#: Told how many bytes of blobs were read and checked (for a progress display).
Progress = Callable[[int], None]


async def _check_blob(
    blobs: BlobService, node: FileNode, progress: Progress | None = None
) -> tuple[str, bool] | None:
    """What is wrong with the blob of ``node`` (and whether its stored bytes are), or None."""
    try:
        reader = await open_verified(blobs, node.digest, size=node.size)
        if reader is None:
            return f"blob {node.digest.hex()} is missing", False
        async with reader:
            while data := await reader.read(_BLOCK):
                if progress is not None:
                    progress(len(data))
    except BlobMismatchError as e:
        if e.got != node.digest:
            return f"blob {node.digest.hex()} hashes to {e.got.hex()}", True
        return f"blob {node.digest.hex()} has {e.size} bytes, expected {node.size}", True
    except CastoreError as e:
        return f"blob {node.digest.hex()} cannot be read: {e}", True
    return None


async def verify_path_info(
    blob_service: BlobService,
    directory_service: DirectoryService,
    info: PathInfo,
    *,
    checked_blobs: set[bytes] | None = None,
    progress: Progress | None = None,
) -> AsyncIterator[Problem]:
    """Yield every problem with the contents of ``info``.

    Missing or damaged Directories and blobs (each with the path it affects),
    wrong Directory sizes, and, when the contents are complete, a NAR hash or
    size that differs from the PathInfo's.

    ``checked_blobs`` remembers blobs found intact across calls, so content
    shared between store paths is read once.
    """
    seen_blobs = checked_blobs if checked_blobs is not None else set()
    base = info.store_path.absolute_path
    found = False
    # (path, node, the Directories above it)
    queue: list[tuple[str, DirectoryNode, tuple[B3Digest, ...]]] = []
    seen_dirs: set[bytes] = set()
    root = info.node
    if isinstance(root, FileNode):
        if root.digest not in seen_blobs:
            problem = await _check_blob(blob_service, root, progress)
            if problem is None:
                seen_blobs.add(root.digest)
            else:
                found = True
                yield Problem(base, problem[0], root.digest if problem[1] else None)
    elif isinstance(root, DirectoryNode):
        queue.append((base, root, ()))
    while queue:
        path, node, above = queue.pop()
        if node.digest in seen_dirs:
            continue
        seen_dirs.add(node.digest)
        here = (*above, node.digest)
        try:
            directory = await directory_service.get(node.digest)
        except CastoreError as e:
            found = True
            yield Problem(path, f"Directory {node.digest.hex()} cannot be read: {e}", None, here)
            continue
        if directory is None:
            found = True
            yield Problem(path, f"Directory {node.digest.hex()} is missing", None, above)
            continue
        if not directory.accepts_size(node.size):
            found = True
            yield Problem(
                path, f"Directory size is {directory.size}, its parent says {node.size}", None, here
            )
        for child in directory.directories:
            queue.append((f"{path}/{child.name.decode(errors='replace')}", child, here))
        for f in directory.files:
            if f.digest in seen_blobs:
                continue
            problem = await _check_blob(blob_service, f, progress)
            if problem is None:
                seen_blobs.add(f.digest)
            else:
                found = True
                yield Problem(
                    f"{path}/{f.name.decode(errors='replace')}",
                    problem[0],
                    f.digest if problem[1] else None,
                    here,
                )
    if found:
        return
    try:
        size, sha256 = await calculate_nar(blob_service, directory_service, info.node)
    except CastoreError as e:
        yield Problem(base, f"NAR cannot be rendered: {e}")
        return
    if (size, sha256) != (info.nar_size, info.nar_sha256):
        yield Problem(base, "NAR hash or size differs from the PathInfo's")


async def repair(
    blob_service: BlobService, directory_service: DirectoryService, problems: list[Problem]
) -> list[str]:
    """Remove what ``problems`` (of :func:`verify_path_info`) found damaged; one line per object.

    Damaged blobs lose their damaged chunks and records
    (:meth:`~tvix.castore.blobservice.BlobService.remove_damaged`), and every
    Directory from the path's root down to one at fault goes too, so that
    the path's root is absent: a re-import, or a copy from another store,
    then stores the whole tree again (what is intact is deduplicated). The
    PathInfo stays; the path is incomplete until then. A NAR hash that
    differs while every object is intact is not repaired (nothing is damaged
    that removing would fix).
    """
    removed: list[str] = []
    done: set[bytes] = set()
    doomed: dict[B3Digest, None] = {}
    for p in problems:
        if p.blob is not None and p.blob not in done:
            done.add(p.blob)
            lines = await blob_service.remove_damaged(p.blob)
            if not lines and not await blob_service.has(p.blob):
                lines = [f"blob {p.blob.hex()} (damaged: dropped by the read that found it)"]
            removed += lines
        doomed.update(dict.fromkeys(p.directories))
    if doomed:
        await directory_service.remove(list(doomed))
        removed += [f"Directory {d.hex()}" for d in doomed]
    return removed
