"""Render the NAR of a castore node, streamed from the blob and directory services.

The Directory closure is fetched with one recursive get (metadata only);
file contents are streamed from the blob service and never held whole.
Small blobs are fetched a few ahead, concurrently, so a remote store is not
asked one round trip at a time; NAR framing and small contents are coalesced
into pieces of about :data:`PIECE` bytes.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import AsyncIterator, Iterator

from tvix.castore.blobservice.base import BlobService
from tvix.castore.digest import B3Digest
from tvix.castore.directory import Directory
from tvix.castore.directoryservice.base import DirectoryService
from tvix.castore.errors import IntegrityError, StorageError
from tvix.castore.nodes import DirectoryNode, FileNode, Node, SymlinkNode
from tvix.nixcompat.nar.writer import NarWriter

__all__ = ["PIECE", "load_closure", "render_nar"]

PIECE = 1 << 20
# Blobs up to this size are fetched whole, ahead of time.
SMALL_BLOB = 256 << 10
# Limits of the look-ahead: small blobs in flight, their bytes, and queued ops.
PREFETCH_COUNT = 32
PREFETCH_BYTES = 8 << 20
WINDOW_OPS = 4096


async def load_closure(dirs: DirectoryService, root: B3Digest) -> dict[B3Digest, Directory]:
    """Every Directory below ``root`` by digest, with one recursive get.

    Raises :class:`StorageError` if ``root`` is not stored.
    """
    closure: dict[B3Digest, Directory] = {}
    async for directory in dirs.get_recursive(root):
        closure[directory.digest] = directory
    if root not in closure:
        raise StorageError(f"Directory {root.hex()} is not stored")
    return closure


def _walk(root: Node, closure: dict[B3Digest, Directory]) -> Iterator[bytes | FileNode]:
    """The NAR as framing bytes, with a FileNode where its contents go.

    The writer counts each file's declared size; whoever fills in the
    contents checks that the blob has exactly that size. Iterative, so deep
    trees do not exhaust the Python stack.
    """
    writer = NarWriter()
    stack: list[Iterator[Node]] = []
    node: Node | None = root
    while True:
        if node is not None:
            if isinstance(node, FileNode):
                yield writer.regular(node.executable, node.size)
                yield node
                writer.contents_written(node.size)
                yield writer.end_regular()
            elif isinstance(node, SymlinkNode):
                yield writer.symlink(node.target)
            else:
                directory = closure.get(node.digest)
                if directory is None:
                    raise StorageError(f"Directory {node.digest.hex()} is missing")
                yield writer.begin_directory()
                stack.append(directory.nodes())
                node = None
                continue
            node = None
            if not stack:
                writer.finish()
                return
            yield writer.end_entry()
        child = next(stack[-1], None)
        if child is None:
            stack.pop()
            yield writer.end_directory()
            if not stack:
                writer.finish()
                return
            yield writer.end_entry()
            continue
        yield writer.entry(child.name)
        node = child


async def _fetch(blobs: BlobService, node: FileNode) -> bytes:
    reader = await blobs.open_read(node.digest)
    if reader is None:
        raise StorageError(f"blob {node.digest.hex()} ({node.name!r}) is missing")
    parts = []
    total = 0
    async with reader:
        while total <= node.size and (chunk := await reader.read(PIECE)):
            parts.append(chunk)
            total += len(chunk)
    if total != node.size:
        raise IntegrityError(
            f"blob {node.digest.hex()} ({node.name!r}) has {total} bytes, expected {node.size}"
        )
    return parts[0] if len(parts) == 1 else b"".join(parts)


async def _stream(blobs: BlobService, node: FileNode) -> AsyncIterator[bytes]:
    reader = await blobs.open_read(node.digest)
    if reader is None:
        raise StorageError(f"blob {node.digest.hex()} ({node.name!r}) is missing")
    remaining = node.size
    async with reader:
        while remaining:
            chunk = await reader.read(min(PIECE, remaining))
            if not chunk:
                break
            remaining -= len(chunk)
            yield chunk
        if remaining or await reader.read(1):
            raise IntegrityError(
                f"blob {node.digest.hex()} ({node.name!r}) is not {node.size} bytes long"
            )


async def render_nar(
    blob_service: BlobService, directory_service: DirectoryService, node: Node
) -> AsyncIterator[bytes]:
    """Yield the NAR of ``node`` in pieces (the root node's name plays no part).

    Raises :class:`~tvix.castore.errors.StorageError` when a Directory or blob
    is missing and :class:`~tvix.castore.errors.IntegrityError` when a blob
    does not have the size its node claims.
    """
    closure: dict[B3Digest, Directory] = {}
    if isinstance(node, DirectoryNode):
        closure = await load_closure(directory_service, node.digest)
    ops = _walk(node, closure)
    window: deque[tuple[bytes | FileNode, asyncio.Task[bytes] | None]] = deque()
    in_flight = in_flight_bytes = 0
    exhausted = False

    def refill() -> None:
        nonlocal in_flight, in_flight_bytes, exhausted
        while (
            not exhausted
            and in_flight < PREFETCH_COUNT
            and in_flight_bytes < PREFETCH_BYTES
            and len(window) < WINDOW_OPS
        ):
            op = next(ops, None)
            if op is None:
                exhausted = True
            elif isinstance(op, FileNode) and 0 < op.size <= SMALL_BLOB:
                window.append((op, asyncio.ensure_future(_fetch(blob_service, op))))
                in_flight += 1
                in_flight_bytes += op.size
            else:
                window.append((op, None))

    buf: list[bytes] = []
    buf_len = 0
    try:
        refill()
        while window:
            op, task = window.popleft()
            if isinstance(op, bytes):
                buf.append(op)
                buf_len += len(op)
            elif task is not None:
                data = await task
                in_flight -= 1
                in_flight_bytes -= op.size
                buf.append(data)
                buf_len += len(data)
            elif op.size:
                if buf:
                    yield b"".join(buf)
                    buf, buf_len = [], 0
                async for chunk in _stream(blob_service, op):
                    yield chunk
            if buf_len >= PIECE:
                yield b"".join(buf)
                buf, buf_len = [], 0
            refill()
        if buf:
            yield b"".join(buf)
    finally:
        for _, pending in window:
            if pending is not None:
                pending.cancel()
