"""The NAR of a castore node, seekable: its exact size up front, byte ranges, the full stream.

A NAR's size follows from the node tree alone (file sizes are in the nodes),
so it is computed from the Directory closure before any blob is touched:
the response gets a ``Content-Length`` and a client-claimed size is checked
before the first byte is sent. The same sizes let a range request skip
whole files and directories without fetching their blobs, and seek into the
one file where the range starts.

A full NAR is streamed by :func:`tvix.store.nar.render_nar` (which fetches
small blobs ahead, concurrently) from the closure the layout loaded; a range
is streamed by :func:`render_range`. Both are framed from the same token
constants, so they agree byte for byte. (Upstream: ``nar/seekable.rs``.)
nar-bridge serves these over HTTP.
"""

from __future__ import annotations

import asyncio
import io
from collections import OrderedDict
from collections.abc import AsyncGenerator, AsyncIterator, Iterator

from tvix.castore.blobservice.base import BlobReader, BlobService
from tvix.castore.digest import B3Digest
from tvix.castore.directory import Directory
from tvix.castore.directoryservice.base import DirectoryService
from tvix.castore.errors import IntegrityError, StorageError
from tvix.castore.nodes import DirectoryNode, FileNode, Node, SymlinkNode
from tvix.nixcompat.nar import wire
from tvix.store.nar.render import render_nar

__all__ = ["LayoutCache", "NarLayout", "render_full", "render_range"]

# Pieces handed to the HTTP layer: large, so per-write overhead stays negligible.
PIECE = 1 << 20

_PAD_CLOSE = wire.REGULAR_TRAILERS
_ENTRY_END = wire.CLOSE
_DIRECTORY_END = wire.CLOSE


def _token_len(n: int) -> int:
    """Wire length of a string of ``n`` bytes: length, bytes, padding."""
    return 8 + n + wire.padding(n)


def _file_size(node: FileNode) -> int:
    header = wire.EXECUTABLE_HEADER if node.executable else wire.REGULAR_HEADER
    return len(header) + 8 + node.size + len(_PAD_CLOSE[-node.size & 7])


def _symlink_size(node: SymlinkNode) -> int:
    return len(wire.SYMLINK_HEADER) + _token_len(len(node.target)) + len(wire.CLOSE)


# Per entry: `entry ( name <name> node` <node> `)`.
_ENTRY_FIXED = len(wire.ENTRY_HEADER) + len(wire.NODE) + len(_ENTRY_END)
_DIRECTORY_FIXED = len(wire.DIRECTORY_HEADER) + len(_DIRECTORY_END)


class NarLayout:
    """The NAR of one root node: its Directory closure and the size of every subtree.

    Build with :meth:`load`. ``size`` is the whole NAR's length in bytes.
    """

    __slots__ = ("_dir_sizes", "closure", "root", "size")

    def __init__(
        self, root: Node, closure: dict[B3Digest, Directory], same_as: NarLayout | None = None
    ) -> None:
        self.root = root
        self.closure = closure
        # NAR length of each Directory's node, `(` through `)`; shared with
        # ``same_as`` (a layout of the same tree, under another root name).
        self._dir_sizes: dict[B3Digest, int] = same_as._dir_sizes if same_as else {}
        if isinstance(root, DirectoryNode) and same_as is None:
            self._size_directories(root.digest)
        self.size = len(wire.MAGIC) + self.node_size(root)

    @classmethod
    async def load(cls, directory_service: DirectoryService, root: Node) -> NarLayout | None:
        """The layout of ``root``'s NAR, its Directories fetched with one recursive get.

        ``None`` when the root is a directory that is not stored. Raises
        :class:`StorageError` when a Directory below the root is missing.
        """
        closure: dict[B3Digest, Directory] = {}
        if isinstance(root, DirectoryNode):
            async for directory in directory_service.get_recursive(root.digest):
                closure[directory.digest] = directory
            if root.digest not in closure:
                return None
        return cls(root, closure)

    def node_size(self, node: Node) -> int:
        """NAR length of ``node`` (without the leading magic)."""
        if isinstance(node, FileNode):
            return _file_size(node)
        if isinstance(node, SymlinkNode):
            return _symlink_size(node)
        return self._dir_sizes[node.digest]

    def _size_directories(self, root: B3Digest) -> None:
        # Iterative post-order: trees may be nested deeper than Python's recursion limit.
        sizes = self._dir_sizes
        stack = [root]
        while stack:
            digest = stack[-1]
            if digest in sizes:
                stack.pop()
                continue
            directory = self.closure.get(digest)
            if directory is None:
                raise StorageError(f"Directory {digest.hex()} is missing")
            pending = [d.digest for d in directory.directories if d.digest not in sizes]
            if pending:
                stack.extend(pending)
                continue
            total = _DIRECTORY_FIXED
            for d in directory.directories:
                total += _ENTRY_FIXED + _token_len(len(d.name)) + sizes[d.digest]
            for f in directory.files:
                total += _ENTRY_FIXED + _token_len(len(f.name)) + _file_size(f)
            for s in directory.symlinks:
                total += _ENTRY_FIXED + _token_len(len(s.name)) + _symlink_size(s)
            sizes[digest] = total
            stack.pop()

    def segments(self, start: int, end: int) -> Iterator[bytes | tuple[FileNode, int, int]]:
        """The bytes ``[start, end)`` of the NAR as framing bytes and file slices.

        A file slice is ``(node, offset in the file, length)``. Subtrees that
        end before ``start`` are skipped by their size, untouched; nothing
        after ``end`` is visited.
        """
        pos = 0

        def clip(data: bytes) -> bytes:
            nonlocal pos
            lo = pos
            pos += len(data)
            if pos <= start or lo >= end:
                return b""
            return data[max(start - lo, 0) : min(end, pos) - lo]

        yield clip(wire.MAGIC)
        stack: list[Iterator[Node]] = []
        node: Node | None = self.root
        while pos < end:
            if node is not None:
                size = self.node_size(node)
                if pos + size <= start:
                    pos += size
                elif isinstance(node, FileNode):
                    header = wire.EXECUTABLE_HEADER if node.executable else wire.REGULAR_HEADER
                    yield clip(header + node.size.to_bytes(8, "little"))
                    lo = pos
                    pos += node.size
                    first, last = max(start, lo), min(end, pos)
                    if first < last:
                        yield (node, first - lo, last - first)
                    yield clip(_PAD_CLOSE[-node.size & 7])
                elif isinstance(node, SymlinkNode):
                    yield clip(wire.SYMLINK_HEADER + wire.token(node.target) + wire.CLOSE)
                else:
                    yield clip(wire.DIRECTORY_HEADER)
                    stack.append(self.closure[node.digest].nodes())
                    node = None
                    continue
                node = None
                if not stack:
                    return
                yield clip(_ENTRY_END)
                continue
            child = next(stack[-1], None)
            if child is None:
                stack.pop()
                yield clip(_DIRECTORY_END)
                if not stack:
                    return
                yield clip(_ENTRY_END)
                continue
            yield clip(wire.ENTRY_HEADER + wire.token(child.name) + wire.NODE)
            node = child


async def _check_size(blobs: BlobService, reader: BlobReader, node: FileNode) -> None:
    """Raise :class:`IntegrityError` unless the blob has the size ``node`` claims.

    What the full render checks by reading every blob to its end, without
    reading: the reader's size (a seek to the end), else the blob's chunk
    list. Only a reader of unknown size of a blob without chunks is read
    through (then a range costs as much as the file).
    """
    what = f"blob {node.digest.hex()} ({node.name!r})"
    try:
        size: int | None = await reader.seek(0, io.SEEK_END)
    except ValueError:
        size = None
    if size is None:
        chunks = await blobs.chunks(node.digest)
        if chunks:
            size = sum(c.size for c in chunks)
    if size is None:
        await reader.seek(0)
        size = 0
        while size <= node.size and (chunk := await reader.read(PIECE)):
            size += len(chunk)
    await reader.seek(0)
    if size != node.size:
        raise IntegrityError(f"{what} has {size} bytes, its node says {node.size}")


async def _read_slice(
    blobs: BlobService, node: FileNode, offset: int, length: int
) -> AsyncIterator[bytes]:
    reader = await blobs.open_read(node.digest)
    if reader is None:
        raise StorageError(f"blob {node.digest.hex()} ({node.name!r}) is missing")
    async with reader:
        await _check_size(blobs, reader, node)
        if offset:
            await reader.seek(offset)
        while length:
            chunk = await reader.read(min(PIECE, length))
            if not chunk:
                raise IntegrityError(
                    f"blob {node.digest.hex()} ({node.name!r}) is shorter than {node.size} bytes"
                )
            length -= len(chunk)
            yield chunk


async def render_range(
    blobs: BlobService, layout: NarLayout, start: int, end: int
) -> AsyncGenerator[bytes, None]:
    """Yield the NAR bytes ``[start, end)`` in pieces of about :data:`PIECE` bytes.

    Only the blobs the range touches are read, from the first byte needed.
    Raises :class:`StorageError` for a missing blob and
    :class:`IntegrityError` for one (touched) whose size is not the one its
    node says, as the full render does.
    """
    buf: list[bytes] = []
    buf_len = 0
    for seg in layout.segments(start, end):
        if isinstance(seg, bytes):
            if seg:
                buf.append(seg)
                buf_len += len(seg)
                if buf_len >= PIECE:
                    yield b"".join(buf)
                    buf, buf_len = [], 0
            continue
        node, offset, length = seg
        if length < PIECE // 4:
            # A small slice joins the framing around it rather than being a write of its own.
            async for chunk in _read_slice(blobs, node, offset, length):
                buf.append(chunk)
                buf_len += len(chunk)
            continue
        if buf:
            yield b"".join(buf)
            buf, buf_len = [], 0
        async for chunk in _read_slice(blobs, node, offset, length):
            yield chunk
    if buf:
        yield b"".join(buf)


class LayoutCache:
    """Recently used layouts of directory roots, bounded by the Directories they hold.

    Loading a large closure is the slow part of answering a NAR request
    (thousands of Directories from the directory service), and Nix asks for
    the same NAR again when it resumes a download; concurrent requests for
    one root share a single load. Directories are immutable, so a cached
    layout never goes stale.
    """

    def __init__(self, directory_service: DirectoryService, max_directories: int = 200_000) -> None:
        self._dirs = directory_service
        self._max = max_directories
        self._held = 0
        self._done: OrderedDict[B3Digest, NarLayout] = OrderedDict()
        self._running: dict[B3Digest, asyncio.Future[NarLayout | None]] = {}

    async def get(self, root: Node) -> NarLayout | None:
        """The layout of ``root``'s NAR, or ``None`` when its root Directory is not stored."""
        if not isinstance(root, DirectoryNode):
            return NarLayout(root, {})
        key = root.digest
        hit = self._done.get(key)
        if hit is not None:
            self._done.move_to_end(key)
            return NarLayout(root, hit.closure, hit)
        running = self._running.get(key)
        if running is None:
            running = asyncio.ensure_future(NarLayout.load(self._dirs, root))
            self._running[key] = running
            running.add_done_callback(lambda _f: self._running.pop(key, None))
        layout = await asyncio.shield(running)
        if layout is not None and key not in self._done and len(layout.closure) <= self._max:
            self._done[key] = layout
            self._held += len(layout.closure)
            while self._held > self._max:
                _, old = self._done.popitem(last=False)
                self._held -= len(old.closure)
        return layout


async def render_full(blobs: BlobService, layout: NarLayout) -> AsyncGenerator[bytes, None]:
    """Yield the whole NAR, checking that exactly :attr:`NarLayout.size` bytes come out.

    Raises :class:`IntegrityError` if the rendering differs in length (a blob
    whose size is not the one its node claims), besides what
    :func:`~tvix.store.nar.render_nar` raises.
    """
    sent = 0
    async for piece in render_nar(blobs, layout.closure, layout.root):
        sent += len(piece)
        if sent > layout.size:
            raise IntegrityError(f"NAR is longer than its computed {layout.size} bytes")
        yield piece
    if sent != layout.size:
        raise IntegrityError(f"NAR is {sent} bytes, computed {layout.size}")
