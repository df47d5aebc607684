"""Check that the contents of store paths are complete and intact."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

from tvix.castore.blobservice import BlobMismatchError, open_verified
from tvix.castore.blobservice.base import BlobService
from tvix.castore.directoryservice.base import DirectoryService
from tvix.castore.errors import CastoreError
from tvix.castore.nodes import DirectoryNode, FileNode
from tvix.store.nar.calculate import calculate_nar
from tvix.store.pathinfo import PathInfo

__all__ = ["Problem", "verify_path_info"]

_BLOCK = 1 << 20


@dataclass(frozen=True)
class Problem:
    """Something wrong with a store path: where (``path``, absolute) and what."""

    path: str
    message: str

    def __str__(self) -> str:
        return f"{self.path}: {self.message}"


#: Told how many bytes of blobs were read and checked (for a progress display).
Progress = Callable[[int], None]


async def _check_blob(
    blobs: BlobService, node: FileNode, progress: Progress | None = None
) -> str | None:
    try:
        reader = await open_verified(blobs, node.digest, size=node.size)
        if reader is None:
            return f"blob {node.digest.hex()} is missing"
        async with reader:
            while data := await reader.read(_BLOCK):
                if progress is not None:
                    progress(len(data))
    except BlobMismatchError as e:
        if e.got != node.digest:
            return f"blob {node.digest.hex()} hashes to {e.got.hex()}"
        return f"blob {node.digest.hex()} has {e.size} bytes, expected {node.size}"
    except CastoreError as e:
        return f"blob {node.digest.hex()} cannot be read: {e}"
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
    queue: list[tuple[str, DirectoryNode]] = []
    seen_dirs: set[bytes] = set()
    root = info.node
    if isinstance(root, FileNode):
        if root.digest not in seen_blobs:
            problem = await _check_blob(blob_service, root, progress)
            if problem is None:
                seen_blobs.add(root.digest)
            else:
                found = True
                yield Problem(base, problem)
    elif isinstance(root, DirectoryNode):
        queue.append((base, root))
    while queue:
        path, node = queue.pop()
        if node.digest in seen_dirs:
            continue
        seen_dirs.add(node.digest)
        try:
            directory = await directory_service.get(node.digest)
        except CastoreError as e:
            found = True
            yield Problem(path, f"Directory {node.digest.hex()} cannot be read: {e}")
            continue
        if directory is None:
            found = True
            yield Problem(path, f"Directory {node.digest.hex()} is missing")
            continue
        if not directory.accepts_size(node.size):
            found = True
            yield Problem(path, f"Directory size is {directory.size}, its parent says {node.size}")
        for child in directory.directories:
            queue.append((f"{path}/{child.name.decode(errors='replace')}", child))
        for f in directory.files:
            if f.digest in seen_blobs:
                continue
            problem = await _check_blob(blob_service, f, progress)
            if problem is None:
                seen_blobs.add(f.digest)
            else:
                found = True
                yield Problem(f"{path}/{f.name.decode(errors='replace')}", problem)
    if found:
        return
    try:
        size, sha256 = await calculate_nar(blob_service, directory_service, info.node)
    except CastoreError as e:
        yield Problem(base, f"NAR cannot be rendered: {e}")
        return
    if (size, sha256) != (info.nar_size, info.nar_sha256):
        yield Problem(base, "NAR hash or size differs from the PathInfo's")
