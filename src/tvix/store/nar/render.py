"""Render the NAR of a castore node, streamed from the blob and directory services.

The Directory closure is fetched with one recursive get (metadata only);
file contents are streamed from the blob service and never held whole.
Small blobs are fetched ahead in batches (``BlobService.read_many``), so a
store is not asked one round trip at a time; NAR framing and small contents are coalesced
into pieces of about :data:`PIECE` bytes.
"""

from __future__ import annotations

import asyncio
import hashlib
from collections import deque
from collections.abc import AsyncGenerator, AsyncIterable, AsyncIterator, Iterator, Mapping

from tvix.castore.blobservice.base import BlobService
from tvix.castore.digest import B3Digest
from tvix.castore.directory import Directory
from tvix.castore.directoryservice.base import DirectoryService
from tvix.castore.errors import IntegrityError, StorageError
from tvix.castore.nodes import DirectoryNode, FileNode, Node, SymlinkNode
from tvix.nixcompat.nar.writer import NarWriter

__all__ = ["PIECE", "file_nar_framing", "load_closure", "render_nar", "verify_nar"]

PIECE = 1 << 20
# Blobs up to this size are fetched whole, ahead of time.
SMALL_BLOB = 256 << 10
# Limits of the look-ahead: bytes of small blobs fetched ahead, queued ops,
# and small blobs fetched per read_many call.
PREFETCH_BYTES = 8 << 20
WINDOW_OPS = 4096
BATCH_BLOBS = 64


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


def _walk(root: Node, closure: Mapping[B3Digest, Directory]) -> Iterator[bytes | FileNode]:
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


async def _fetch_many(blobs: BlobService, nodes: list[FileNode]) -> list[bytes]:
    datas = await blobs.read_many([n.digest for n in nodes])
    for node, data in zip(nodes, datas, strict=True):
        if data is None:
            raise StorageError(f"blob {node.digest.hex()} ({node.name!r}) is missing")
        if len(data) != node.size:
            raise IntegrityError(
                f"blob {node.digest.hex()} ({node.name!r}) has {len(data)} bytes, "
                f"expected {node.size}"
            )
    return datas  # type: ignore[return-value]


class _Batch:
    """Small blobs fetched together, with one ``read_many``."""

    __slots__ = ("nodes", "task")

    def __init__(self) -> None:
        self.nodes: list[FileNode] = []
        self.task: asyncio.Task[list[bytes]] | None = None


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
    blob_service: BlobService,
    directories: DirectoryService | Mapping[B3Digest, Directory],
    node: Node,
) -> AsyncIterator[bytes]:
    """Yield the NAR of ``node`` in pieces (the root node's name plays no part).

    ``directories`` is a directory service (the closure is fetched with one
    recursive get) or an already loaded closure: every Directory below
    ``node`` by digest (as :func:`load_closure` returns).

    Raises :class:`~tvix.castore.errors.StorageError` when a Directory or blob
    is missing and :class:`~tvix.castore.errors.IntegrityError` when a blob
    does not have the size its node claims.
    """
    closure: Mapping[B3Digest, Directory] = {}
    if isinstance(directories, Mapping):
        closure = directories
    elif isinstance(node, DirectoryNode):
        closure = await load_closure(directories, node.digest)
    ops = _walk(node, closure)
    # Ops in NAR order; a small file's contents come from its batch's result.
    window: deque[tuple[bytes | FileNode, _Batch | None, int]] = deque()
    batches: list[_Batch] = []
    ahead_bytes = 0
    exhausted = False

    def refill() -> None:
        nonlocal ahead_bytes, exhausted
        batch: _Batch | None = None
        while not exhausted and ahead_bytes < PREFETCH_BYTES and len(window) < WINDOW_OPS:
            op = next(ops, None)
            if op is None:
                exhausted = True
            elif isinstance(op, FileNode) and 0 < op.size <= SMALL_BLOB:
                if batch is None:
                    batch = _Batch()
                window.append((op, batch, len(batch.nodes)))
                batch.nodes.append(op)
                ahead_bytes += op.size
                if len(batch.nodes) >= BATCH_BLOBS:
                    _start(batch)
                    batch = None
            else:
                window.append((op, None, 0))
        if batch is not None:
            _start(batch)

    def _start(batch: _Batch) -> None:
        batch.task = asyncio.ensure_future(_fetch_many(blob_service, batch.nodes))
        batches.append(batch)

    buf: list[bytes] = []
    buf_len = 0
    try:
        refill()
        while window:
            op, in_batch, index = window.popleft()
            if isinstance(op, bytes):
                buf.append(op)
                buf_len += len(op)
            elif in_batch is not None:
                assert in_batch.task is not None
                data = (await in_batch.task)[index]
                ahead_bytes -= op.size
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
            if not window or (ahead_bytes < PREFETCH_BYTES // 2 and len(window) < WINDOW_OPS // 2):
                refill()
        if buf:
            yield b"".join(buf)
    finally:
        for batch in batches:
            task = batch.task
            if task is None:
                continue
            if not task.done():
                task.cancel()
            elif not task.cancelled():
                task.exception()  # retrieved: a failed prefetch nobody awaited is no news


def file_nar_framing(node: FileNode) -> tuple[bytes, bytes]:
    """What comes before and after the contents in the NAR of the single file ``node``."""
    writer = NarWriter()
    head = writer.regular(node.executable, node.size)
    writer.contents_written(node.size)
    tail = writer.end_regular()
    writer.finish()
    return head, tail


async def verify_nar(
    pieces: AsyncIterable[bytes], nar_size: int, nar_sha256: bytes, what: str
) -> AsyncGenerator[bytes, None]:
    """Pass ``pieces`` (a NAR) on, checking it is ``nar_size`` bytes hashing to ``nar_sha256``.

    For NARs served under a PathInfo's claim (its root node is the store's
    word, the NAR hash the signed one). Raises
    :class:`~tvix.castore.errors.IntegrityError`, naming ``what``, instead
    of passing on the piece that makes the NAR longer than claimed or that
    completes it with another hash; so a consumer never receives the whole
    of a NAR that is not the one claimed (at most all but its last piece).
    """
    hasher = hashlib.sha256()
    sent = 0
    async for piece in pieces:
        sent += len(piece)
        if sent > nar_size:
            raise IntegrityError(
                f"{what}: the NAR rendered is longer than the {nar_size} bytes its PathInfo claims"
            )
        hasher.update(piece)
        if sent == nar_size and hasher.digest() != nar_sha256:
            raise IntegrityError(
                f"{what}: the NAR rendered hashes to sha256 {hasher.hexdigest()}, "
                f"its PathInfo claims {nar_sha256.hex()}"
            )
        yield piece
    if sent != nar_size:
        raise IntegrityError(
            f"{what}: the NAR rendered is {sent} bytes, its PathInfo claims {nar_size}"
        )
