"""Ingest a NAR stream into castore: blobs, Directories and a root node.

Streamed: file contents go to the blob service as they arrive, so a
multi-GiB NAR never sits in memory. All or nothing for the root: the
Directories are stored as one closure only after the whole NAR parsed (and,
with :func:`ingest_nar_stream`, only if its sha256 and size are the ones
expected). Blobs of a failed ingestion may remain; they are harmless.
"""

from __future__ import annotations

import hashlib
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field

from tvix.castore.blobservice.base import BlobService, BlobWriter
from tvix.castore.directory import Directory
from tvix.castore.directoryservice.base import DirectoryService
from tvix.castore.nodes import DirectoryNode, FileNode, Node, SymlinkNode
from tvix.nixcompat import nixbase32
from tvix.nixcompat.errors import NARError
from tvix.nixcompat.nar.reader import (
    Contents,
    DirectoryEnd,
    DirectoryStart,
    Entry,
    EntryEnd,
    NarEvent,
    Regular,
    RegularEnd,
    Symlink,
    aread_nar,
)
from tvix.store.errors import NarMismatchError

__all__ = ["ingest_nar", "ingest_nar_stream"]


@dataclass(slots=True)
class _Frame:
    name: bytes
    directories: list[DirectoryNode] = field(default_factory=list)
    files: list[FileNode] = field(default_factory=list)
    symlinks: list[SymlinkNode] = field(default_factory=list)
    entry: bytes | None = None


async def ingest_nar(
    blob_service: BlobService,
    directory_service: DirectoryService,
    events: AsyncIterator[NarEvent],
    name: bytes,
    *,
    before_commit: Callable[[], Awaitable[None]] | None = None,
) -> Node:
    """Store the NAR that ``events`` describe; return its root node, named ``name``.

    ``before_commit`` runs after the last event and before the Directories
    are stored; raising there stores nothing. Raises
    :class:`~tvix.nixcompat.errors.NARError` for a malformed NAR (nothing
    of it is stored then).
    """
    stack: list[_Frame] = []
    root: Node | None = None
    writer: BlobWriter | None = None
    executable = False
    size = 0
    putter = directory_service.put_multiple_start()
    try:
        async for event in events:
            if isinstance(event, Contents):
                assert writer is not None
                await writer.write(event.data)
                continue
            node: Node | None = None
            if isinstance(event, Regular):
                writer = blob_service.open_write()
                executable, size = event.executable, event.size
            elif isinstance(event, RegularEnd):
                assert writer is not None
                digest = await writer.close()
                writer = None
                node = FileNode(_name(stack, name), digest, size, executable)
            elif isinstance(event, Symlink):
                node = SymlinkNode(_name(stack, name), event.target)
            elif isinstance(event, DirectoryStart):
                stack.append(_Frame(_name(stack, name)))
            elif isinstance(event, Entry):
                stack[-1].entry = event.name
            elif isinstance(event, EntryEnd):
                stack[-1].entry = None
            elif isinstance(event, DirectoryEnd):
                frame = stack.pop()
                directory = Directory(frame.directories, frame.files, frame.symlinks)
                await putter.put(directory)
                node = DirectoryNode(frame.name, directory.digest, directory.size)
            if node is None:
                continue
            if not stack:
                root = node
            elif isinstance(node, FileNode):
                stack[-1].files.append(node)
            elif isinstance(node, DirectoryNode):
                stack[-1].directories.append(node)
            else:
                stack[-1].symlinks.append(node)
        if root is None:
            raise NARError("NAR ended before its root node")
        if before_commit is not None:
            await before_commit()
        if isinstance(root, DirectoryNode):
            await putter.close()
        else:
            await putter.abort()
        return root
    except BaseException:
        await putter.abort()
        raise
    finally:
        if writer is not None:
            await writer.abort()


def _name(stack: list[_Frame], root_name: bytes) -> bytes:
    if not stack:
        return root_name
    entry = stack[-1].entry
    assert entry is not None
    return entry


async def ingest_nar_stream(
    blob_service: BlobService,
    directory_service: DirectoryService,
    read: Callable[[int], Awaitable[bytes]],
    name: bytes,
    *,
    expected_sha256: bytes | None = None,
    expected_size: int | None = None,
) -> tuple[Node, int, bytes]:
    """Ingest the NAR ``read(n)`` returns; return its root node, NAR size and sha256.

    With ``expected_sha256``/``expected_size``, a NAR that differs raises
    :class:`~tvix.store.errors.NarMismatchError` and no Directory of it is
    stored.
    """
    h = hashlib.sha256()
    size = 0

    async def counted(n: int) -> bytes:
        nonlocal size
        data = await read(n)
        h.update(data)
        size += len(data)
        if expected_size is not None and size > expected_size:
            raise NarMismatchError(f"NAR is longer than the expected {expected_size} bytes")
        return data

    async def check() -> None:
        if expected_size is not None and size != expected_size:
            raise NarMismatchError(f"NAR size is {size}, expected {expected_size}")
        if expected_sha256 is not None and h.digest() != expected_sha256:
            raise NarMismatchError(
                f"NAR sha256 is {nixbase32.encode(h.digest())}, "
                f"expected {nixbase32.encode(expected_sha256)}"
            )

    node = await ingest_nar(
        blob_service, directory_service, aread_nar(counted), name, before_commit=check
    )
    return node, size, h.digest()
