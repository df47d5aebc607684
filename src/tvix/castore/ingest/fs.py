"""Ingest a local file, symlink or directory tree into castore.

A producer thread walks the tree (``scandir`` and ``lstat`` only) and reads
and hashes small files as it goes; file reads and blake3 release the GIL, so
it runs beside the event loop on the other core. It hands over batches
through a bounded queue, so memory stays bounded however large the tree.
The event loop uploads the blobs the service does not have yet, streams
large files in blocks, and builds each Directory as soon as everything
below it is done; the Directories are stored as one closure, leaves first.
"""

from __future__ import annotations

import asyncio
import os
import stat
import threading
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from typing import Protocol

import blake3

from tvix.castore.blobservice.base import BlobService
from tvix.castore.digest import B3Digest
from tvix.castore.directory import Directory
from tvix.castore.directoryservice.base import DirectoryPutter, DirectoryService
from tvix.castore.errors import CastoreError, ValidationError
from tvix.castore.nodes import DirectoryNode, FileNode, Node, SymlinkNode

__all__ = ["IngestError", "IngestProgress", "ingest_path", "run_bounded"]

# Files up to this size are read whole by the producer; larger ones are streamed.
SMALL_FILE = 1 << 20
# A batch handed from the producer is cut at this many items or bytes.
BATCH_ITEMS = 256
BATCH_BYTES = 8 << 20
# Batches waiting in the queue (bounds memory: QUEUE_DEPTH * BATCH_BYTES).
QUEUE_DEPTH = 4
# Concurrent uploads of small files within a batch.
LANES = 16
# Block size when streaming a large file, and large files streamed at once.
BLOCK = 1 << 20
PARALLEL_LARGE = 2


class IngestError(CastoreError):
    """A path cannot be ingested: an unsupported file type, or it vanished or changed."""


class IngestProgress(Protocol):
    """Receives progress of an ingestion (for a progress bar)."""

    def advance(self, files: int, nbytes: int) -> None:
        """``files`` more files with ``nbytes`` more bytes were ingested."""


@dataclass(slots=True)
class _File:
    path: bytes
    name: bytes
    executable: bool
    # Set by the producer for small files, by the uploader for large ones.
    digest: B3Digest | None = None
    size: int = 0
    data: bytes | None = None


@dataclass(slots=True)
class _Dir:
    path: bytes
    name: bytes
    files: list[_File] = field(default_factory=list)
    symlinks: list[SymlinkNode] = field(default_factory=list)
    subdirs: list[_Dir] = field(default_factory=list)
    node: DirectoryNode | None = None


def _is_executable(mode: int) -> bool:
    # As Nix does: executable iff the owner may execute it.
    return bool(mode & stat.S_IXUSR)


def _unsupported(path: bytes, mode: int) -> IngestError:
    if stat.S_ISSOCK(mode):
        kind = "socket"
    elif stat.S_ISFIFO(mode):
        kind = "FIFO"
    elif stat.S_ISBLK(mode) or stat.S_ISCHR(mode):
        kind = "device"
    else:
        kind = "unknown type"
    return IngestError(f"{os.fsdecode(path)}: unsupported file type ({kind})")


def _symlink(path: bytes, name: bytes) -> SymlinkNode:
    try:
        return SymlinkNode(name, os.readlink(path))
    except OSError as e:
        raise IngestError(f"{os.fsdecode(path)}: cannot read link: {e.strerror}") from e
    except ValidationError as e:
        raise IngestError(f"{os.fsdecode(path)}: {e}") from e


def _read_file(path: bytes, size_hint: int) -> bytes:
    """The whole file (os-level calls: a third of the cost of ``open()``)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    except OSError as e:
        raise IngestError(f"{os.fsdecode(path)}: cannot read: {e.strerror}") from e
    try:
        data = os.read(fd, size_hint + 1)
        if len(data) > size_hint:  # grew since lstat: read the rest
            parts = [data]
            while chunk := os.read(fd, BLOCK):
                parts.append(chunk)
            data = b"".join(parts)
        return data
    finally:
        os.close(fd)


class _Producer:
    """Walks the tree in a thread, emitting files (small ones read and hashed) and
    finished directories, in post-order, in batches through an asyncio queue."""

    def __init__(self, loop: asyncio.AbstractEventLoop, queue: asyncio.Queue[object]) -> None:
        self._loop = loop
        self._queue = queue
        self._batch: list[_File | _Dir] = []
        self._batch_bytes = 0
        self.cancelled = threading.Event()

    def _emit(self, item: _File | _Dir, nbytes: int = 0) -> None:
        self._batch.append(item)
        self._batch_bytes += nbytes
        if len(self._batch) >= BATCH_ITEMS or self._batch_bytes >= BATCH_BYTES:
            self._flush()

    def _flush(self) -> None:
        if self.cancelled.is_set():
            raise asyncio.CancelledError
        batch, self._batch, self._batch_bytes = self._batch, [], 0
        asyncio.run_coroutine_threadsafe(self._queue.put(batch), self._loop).result()

    def run(self, top: _Dir) -> None:
        try:
            self._walk(top)
            self._flush()
            result: object = None
        except BaseException as e:
            result = e
        if not self.cancelled.is_set():
            asyncio.run_coroutine_threadsafe(self._queue.put(result), self._loop).result()

    def _walk(self, top: _Dir) -> None:
        stack: list[tuple[_Dir, bool]] = [(top, False)]
        while stack:
            d, expanded = stack.pop()
            if expanded:
                self._emit(d)
                continue
            stack.append((d, True))
            try:
                entries = list(os.scandir(d.path))
            except OSError as e:
                raise IngestError(
                    f"{os.fsdecode(d.path)}: cannot list directory: {e.strerror}"
                ) from e
            for entry in entries:
                path = entry.path
                try:
                    st = entry.stat(follow_symlinks=False)
                except OSError as e:
                    raise IngestError(f"{os.fsdecode(path)}: {e.strerror}") from e
                mode = st.st_mode
                if stat.S_ISREG(mode):
                    f = _File(path, entry.name, _is_executable(mode), size=st.st_size)
                    d.files.append(f)
                    if st.st_size <= SMALL_FILE:
                        data = _read_file(path, st.st_size)
                        f.data, f.size = data, len(data)
                        f.digest = B3Digest(blake3.blake3(data).digest())
                    self._emit(f, f.size)
                elif stat.S_ISDIR(mode):
                    sub = _Dir(path, entry.name)
                    d.subdirs.append(sub)
                    stack.append((sub, False))
                elif stat.S_ISLNK(mode):
                    d.symlinks.append(_symlink(path, entry.name))
                else:
                    raise _unsupported(path, mode)


async def _put_small(blobs: BlobService, f: _File) -> None:
    assert f.digest is not None
    assert f.data is not None
    if not await blobs.has(f.digest):
        async with blobs.open_write() as writer:
            await writer.write(f.data)
        got = await writer.close()
        if got != f.digest:
            raise IngestError(f"{os.fsdecode(f.path)}: blob service returned digest {got.hex()}")
    f.data = None


async def _put_lane(blobs: BlobService, files: list[_File]) -> None:
    for f in files:
        await _put_small(blobs, f)


async def _put_large(blobs: BlobService, f: _File, progress: IngestProgress | None) -> None:
    try:
        fd = await asyncio.to_thread(os.open, f.path, os.O_RDONLY | os.O_NOFOLLOW)
    except OSError as e:
        raise IngestError(f"{os.fsdecode(f.path)}: cannot read: {e.strerror}") from e
    size = 0
    try:
        async with blobs.open_write() as writer:
            # Read the next block in a thread while this one is written.
            pending = asyncio.ensure_future(asyncio.to_thread(os.read, fd, BLOCK))
            while True:
                block = await pending
                if not block:
                    break
                pending = asyncio.ensure_future(asyncio.to_thread(os.read, fd, BLOCK))
                await writer.write(block)
                size += len(block)
                if progress is not None:
                    progress.advance(0, len(block))
        f.digest = await writer.close()
    except OSError as e:
        raise IngestError(f"{os.fsdecode(f.path)}: cannot read: {e.strerror}") from e
    finally:
        os.close(fd)
    f.size = size
    if progress is not None:
        progress.advance(1, 0)


async def _put_directory(putter: DirectoryPutter, d: _Dir) -> None:
    children: list[Node] = []
    for sub in d.subdirs:
        assert sub.node is not None
        children.append(sub.node)
        sub.node = None
    for f in d.files:
        assert f.digest is not None
        children.append(FileNode(f.name, f.digest, f.size, f.executable))
    children.extend(d.symlinks)
    directory = Directory.from_nodes(children)
    await putter.put(directory)
    d.node = DirectoryNode(d.name, directory.digest, directory.size)
    d.files, d.symlinks, d.subdirs = [], [], []


async def _ingest_tree(
    blobs: BlobService,
    putter: DirectoryPutter,
    top: _Dir,
    progress: IngestProgress | None,
) -> DirectoryNode:
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue[object] = asyncio.Queue(QUEUE_DEPTH)
    producer = _Producer(loop, queue)
    thread = loop.run_in_executor(None, producer.run, top)
    large: dict[int, asyncio.Task[None]] = {}
    slots = asyncio.Semaphore(PARALLEL_LARGE)

    async def put_large(f: _File) -> None:
        async with slots:
            await _put_large(blobs, f, progress)

    try:
        while True:
            batch = await queue.get()
            if batch is None:
                break
            if isinstance(batch, BaseException):
                raise batch
            assert isinstance(batch, list)
            small: list[_File] = []
            for item in batch:
                if isinstance(item, _File):
                    if item.data is None:
                        large[id(item)] = asyncio.ensure_future(put_large(item))
                    else:
                        small.append(item)
            # The batch's small files go up in a few concurrent lanes (for
            # backends where each put waits on I/O) before its Directories,
            # which come after their files in the stream, are built.
            if small:
                await asyncio.gather(
                    *(_put_lane(blobs, small[i::LANES]) for i in range(min(LANES, len(small))))
                )
                if progress is not None:
                    progress.advance(len(small), sum(f.size for f in small))
            for item in batch:
                if isinstance(item, _Dir):
                    for f in item.files:
                        task = large.pop(id(f), None)
                        if task is not None:
                            await task
                    await _put_directory(putter, item)
    finally:
        producer.cancelled.set()
        for task in large.values():
            task.cancel()
        # Unblock a producer waiting on a full queue, then wait for it to stop.
        while not thread.done():
            while not queue.empty():
                queue.get_nowait()
            await asyncio.sleep(0.001)
        await asyncio.gather(*large.values(), return_exceptions=True)
    assert top.node is not None
    return top.node


async def run_bounded(jobs: Iterable[Callable[[], Awaitable[None]]], limit: int) -> None:
    """Run the coroutines ``jobs`` make, at most ``limit`` at a time.

    The first failure cancels the rest and is raised.
    """
    running: set[asyncio.Future[None]] = set()
    try:
        for job in jobs:
            running.add(asyncio.ensure_future(job()))
            if len(running) >= limit:
                done, running = await asyncio.wait(running, return_when=asyncio.FIRST_COMPLETED)
                for t in done:
                    t.result()
        while running:
            done, running = await asyncio.wait(running, return_when=asyncio.FIRST_COMPLETED)
            for t in done:
                t.result()
    finally:
        for t in running:
            t.cancel()
        if running:
            await asyncio.gather(*running, return_exceptions=True)


async def ingest_path(
    blob_service: BlobService,
    directory_service: DirectoryService,
    path: str | os.PathLike[str] | bytes,
    *,
    name: bytes | None = None,
    progress: IngestProgress | None = None,
) -> Node:
    """Store the file, symlink or directory tree at ``path``; return its root node.

    The root node is named ``name`` (default: the base name of ``path``).
    Regular files become blobs (executable when the owner's x bit is set, as
    Nix does), symlinks are kept as they are (never followed; the target as
    bytes), directories (empty ones too) become Directories, stored as one
    closure. Names need not be UTF-8.

    Raises :class:`IngestError` naming the path when something cannot be
    ingested (a socket, FIFO or device anywhere, unreadable files); then no
    root is returned and no Directory of the tree is stored, though some
    blobs may be.
    """
    root = os.fsencode(path)
    if name is None:
        name = os.path.basename(os.path.normpath(os.path.abspath(root)))
    try:
        st = await asyncio.to_thread(os.lstat, root)
    except OSError as e:
        raise IngestError(f"{os.fsdecode(root)}: {e.strerror}") from e
    mode = st.st_mode
    if stat.S_ISLNK(mode):
        return _symlink(root, name)
    if stat.S_ISREG(mode):
        f = _File(root, name, _is_executable(mode), size=st.st_size)
        await _put_large(blob_service, f, progress)
        assert f.digest is not None
        return FileNode(name, f.digest, f.size, f.executable)
    if not stat.S_ISDIR(mode):
        raise _unsupported(root, mode)
    async with directory_service.put_multiple_start() as putter:
        node = await _ingest_tree(blob_service, putter, _Dir(root, name), progress)
    await putter.close()
    return node
