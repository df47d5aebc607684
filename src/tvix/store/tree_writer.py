"""Writing a castore tree to disk: plan every path, then fetch and write file contents.

The mechanism behind :mod:`tvix.store.extract` (which see for what is
written, how, and how it is verified): :class:`TreePlan` lists what a tree
creates, :class:`TreeWriter` fetches blobs from a blob service and writes
them below a directory, checking each against its digest and size.
"""

from __future__ import annotations

import asyncio
import os
import shutil
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Protocol, TypeVar

import blake3

from tvix.castore.blobservice.base import BlobService
from tvix.castore.digest import B3Digest
from tvix.castore.directory import Directory
from tvix.castore.errors import IntegrityError, StorageError
from tvix.castore.nodes import FileNode, Node, SymlinkNode
from tvix.store.concurrency import gather_all

__all__ = [
    "DIRECTORY_MODE",
    "EXECUTABLE_MODE",
    "FILE_MODE",
    "WRITE_THREADS",
    "ExtractProgress",
    "ExtractStats",
    "TreePlan",
    "TreeWriter",
]

FILE_MODE = 0o444
EXECUTABLE_MODE = 0o555
DIRECTORY_MODE = 0o755

# Blobs up to this size are fetched whole and written in windows; larger ones streamed.
SMALL_BLOB = 512 << 10
# Small blobs being fetched at once.
FETCH_CONCURRENCY = 32
# A window: the files one worker-thread job writes.
WINDOW_FILES = 256
WINDOW_BYTES = 8 << 20
# Windows being written at once (the fetching goes on meanwhile): bounds memory
# to about this many plus one times WINDOW_BYTES.
WRITES_IN_FLIGHT = 3
# Writer threads: more than one overlaps filesystem syscalls (which release the GIL).
WRITE_THREADS = 2
# Large blobs streamed at once, and the piece size they are streamed in.
LARGE_CONCURRENCY = 4
PIECE = 1 << 20

_EMPTY_DIGEST = B3Digest(blake3.blake3(b"").digest())
_NEW_FILE = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC

T = TypeVar("T")
# A blob to write: its digest, its size, and the files to write it to (path, executable).
_Item = tuple[B3Digest, int, list[tuple[bytes, bool]]]


class ExtractProgress(Protocol):
    """Receives progress of an extraction (for a progress bar)."""

    def advance(self, files: int, nbytes: int) -> None:
        """``files`` more files with ``nbytes`` more bytes were written."""


@dataclass
class ExtractStats:
    """What an extraction wrote."""

    directories: int = 0
    files: int = 0
    symlinks: int = 0
    nbytes: int = 0


# -- planning ----------------------------------------------------------------------------


@dataclass
class TreePlan:
    """Every path to create, relative to the temporary top directory."""

    directories: list[bytes] = field(default_factory=list)  # parents before children
    symlinks: list[tuple[bytes, bytes]] = field(default_factory=list)
    empty: list[tuple[bytes, bool]] = field(default_factory=list)
    # (digest, size) -> the files with that content: (path, executable)
    files: dict[tuple[B3Digest, int], list[tuple[bytes, bool]]] = field(default_factory=dict)

    def add(self, path: bytes, node: Node, closure: dict[B3Digest, Directory]) -> None:
        """Add ``node`` at ``path`` and, for a directory, everything below it."""
        stack: list[tuple[bytes, Node]] = [(path, node)]
        while stack:
            path, node = stack.pop()
            if isinstance(node, FileNode):
                if node.size == 0 and node.digest == _EMPTY_DIGEST:
                    self.empty.append((path, node.executable))
                else:
                    key = (node.digest, node.size)
                    self.files.setdefault(key, []).append((path, node.executable))
            elif isinstance(node, SymlinkNode):
                self.symlinks.append((path, node.target))
            else:
                directory = closure.get(node.digest)
                if directory is None:
                    raise StorageError(
                        f"Directory {node.digest.hex()} (at {os.fsdecode(path)}) is missing"
                    )
                self.directories.append(path)
                prefix = path + b"/"
                stack.extend((prefix + child.name, child) for child in directory.nodes())

    def stats(self) -> ExtractStats:
        """The counts of directories, files and symlinks the plan writes, and the file bytes."""
        files = len(self.empty) + sum(len(t) for t in self.files.values())
        nbytes = sum(size * len(t) for (_, size), t in self.files.items())
        return ExtractStats(len(self.directories), files, len(self.symlinks), nbytes)


# -- writing (blocking; runs in worker threads) --------------------------------------------


def _make_skeleton(top: int, plan: TreePlan) -> None:
    """Directories, symlinks and empty files, in one pass."""
    for path in plan.directories:
        os.mkdir(path, DIRECTORY_MODE, dir_fd=top)
    for path, target in plan.symlinks:
        os.symlink(target, path, dir_fd=top)
    for path, executable in plan.empty:
        os.close(os.open(path, _NEW_FILE, _mode(executable), dir_fd=top))


def _mode(executable: bool) -> int:
    return EXECUTABLE_MODE if executable else FILE_MODE


def _write_fd(fd: int, data: bytes | memoryview) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def _write_window(
    top: int, window: list[tuple[B3Digest, int, list[tuple[bytes, bool]], bytes]]
) -> None:
    """Check each blob against its digest, then write it to each of its files."""
    for digest, _size, targets, data in window:
        got = blake3.blake3(data).digest()
        if got != digest:
            raise IntegrityError(
                f"blob {digest.hex()} (for {os.fsdecode(targets[0][0])}): "
                f"received bytes hash to {got.hex()}"
            )
        for path, executable in targets:
            fd = os.open(path, _NEW_FILE, _mode(executable), dir_fd=top)
            try:
                _write_fd(fd, data)
            finally:
                os.close(fd)


def _write_piece(fd: int, data: bytes, hasher: blake3.blake3) -> None:
    hasher.update(data)
    _write_fd(fd, data)


def _copy_file(top: int, src: bytes, dst: bytes, executable: bool) -> None:
    with (
        open(os.open(src, os.O_RDONLY | os.O_CLOEXEC, dir_fd=top), "rb") as fin,
        open(os.open(dst, _NEW_FILE, _mode(executable), dir_fd=top), "wb") as fout,
    ):
        shutil.copyfileobj(fin, fout, PIECE)


# -- fetching -----------------------------------------------------------------------------


async def _fetch_small(blobs: BlobService, digest: B3Digest, size: int, shown: bytes) -> bytes:
    reader = await blobs.open_read(digest)
    if reader is None:
        raise StorageError(f"blob {digest.hex()} (for {os.fsdecode(shown)}) is missing")
    parts: list[bytes] = []
    got = 0
    async with reader:
        # Asking for one byte more than expected finds a blob that is too long.
        while got <= size:
            part = await reader.read(size + 1 - got)
            if not part:
                break
            parts.append(part)
            got += len(part)
    if got != size:
        raise IntegrityError(
            f"blob {digest.hex()} (for {os.fsdecode(shown)}) has "
            f"{'more than ' if got > size else ''}{got} bytes, expected {size}"
        )
    return parts[0] if len(parts) == 1 else b"".join(parts)


class TreeWriter:
    """Fetches the contents of a plan's files and writes them below ``top``."""

    def __init__(
        self,
        blobs: BlobService,
        top: int,
        pool: ThreadPoolExecutor,
        progress: ExtractProgress | None,
    ) -> None:
        self._blobs = blobs
        self._top = top
        self._pool = pool
        self._progress = progress
        self._loop = asyncio.get_running_loop()

    def _in_thread(self, fn: Callable[..., T], *args: Any) -> asyncio.Future[T]:
        return self._loop.run_in_executor(self._pool, fn, *args)

    async def run(self, plan: TreePlan) -> None:
        """Write ``plan`` below ``top``: directories, symlinks and empty files, then contents."""
        await self._in_thread(_make_skeleton, self._top, plan)
        if self._progress is not None and plan.empty:
            self._progress.advance(len(plan.empty), 0)
        small: list[_Item] = []
        large: list[_Item] = []
        for (digest, size), targets in plan.files.items():
            (small if size <= SMALL_BLOB else large).append((digest, size, targets))
        large_slots = asyncio.Semaphore(LARGE_CONCURRENCY)

        async def large_file(item: _Item) -> None:
            async with large_slots:
                await self._large(*item)

        await gather_all([self._small(small), *(large_file(item) for item in large)])

    async def _small(self, small: list[_Item]) -> None:
        """Fetch the small files' contents with a few workers; write them in windows.

        :data:`FETCH_CONCURRENCY` worker coroutines take the next blob from a
        shared iterator (cheaper than a task per blob, which showed in
        profiles); a full window goes to a worker thread while the fetching
        goes on. At most :data:`WRITES_IN_FLIGHT` windows are being written;
        fetching waits for a free slot, which bounds memory.
        """
        items = iter(small)
        window: list[tuple[B3Digest, int, list[tuple[bytes, bool]], bytes]] = []
        window_bytes = 0
        slots = asyncio.Semaphore(WRITES_IN_FLIGHT)
        flushing = asyncio.Lock()
        writes: list[asyncio.Future[None]] = []

        def written(fut: asyncio.Future[None], files: int, nbytes: int) -> None:
            slots.release()
            if self._progress is not None and not fut.cancelled() and fut.exception() is None:
                self._progress.advance(files, nbytes)

        async def flush() -> None:
            nonlocal window, window_bytes
            # The slot first, then the window: while one worker waits here the others
            # keep adding to the same window (and then wait for the lock), so at most
            # one window beyond those being written is held.
            await slots.acquire()
            batch, nbytes = window, window_bytes
            window, window_bytes = [], 0
            for done in [w for w in writes if w.done()]:
                writes.remove(done)
                done.result()  # a failed window fails the extraction now
            fut = self._in_thread(_write_window, self._top, batch)
            files = sum(len(t) for _, _, t, _ in batch)
            fut.add_done_callback(lambda f: written(f, files, nbytes))
            writes.append(fut)

        async def worker() -> None:
            nonlocal window_bytes
            for digest, size, targets in items:
                data = await _fetch_small(self._blobs, digest, size, targets[0][0])
                window.append((digest, size, targets, data))
                window_bytes += size * len(targets)
                if len(window) >= WINDOW_FILES or window_bytes >= WINDOW_BYTES:
                    async with flushing:
                        if len(window) >= WINDOW_FILES or window_bytes >= WINDOW_BYTES:
                            await flush()

        try:
            await gather_all([worker() for _ in range(FETCH_CONCURRENCY)])
            if window:
                await flush()
            await asyncio.gather(*writes)
        finally:
            for w in writes:
                if w.done() and not w.cancelled():
                    w.exception()  # retrieved (the first failure is already raised)
                else:
                    w.cancel()

    async def _large(self, digest: B3Digest, size: int, targets: list[tuple[bytes, bool]]) -> None:
        first, executable = targets[0]
        shown = os.fsdecode(first)
        reader = await self._blobs.open_read(digest)
        if reader is None:
            raise StorageError(f"blob {digest.hex()} (for {shown}) is missing")
        hasher = blake3.blake3()
        got = 0
        async with reader:
            fd = await self._loop.run_in_executor(
                self._pool, _open_new, self._top, first, _mode(executable)
            )
            try:
                while got <= size:
                    piece = await reader.read(min(PIECE, size + 1 - got))
                    if not piece:
                        break
                    got += len(piece)
                    await self._in_thread(_write_piece, fd, piece, hasher)
                    if self._progress is not None:
                        self._progress.advance(0, len(piece))
            finally:
                os.close(fd)
        if got != size:
            raise IntegrityError(
                f"blob {digest.hex()} (for {shown}) has "
                f"{'more than ' if got > size else ''}{got} bytes, expected {size}"
            )
        if hasher.digest() != digest:
            raise IntegrityError(
                f"blob {digest.hex()} (for {shown}): received bytes hash to {hasher.hexdigest()}"
            )
        for path, exe in targets[1:]:
            await self._in_thread(_copy_file, self._top, first, path, exe)
        if self._progress is not None:
            self._progress.advance(len(targets), size * (len(targets) - 1))


def _open_new(top: int, path: bytes, mode: int) -> int:
    return os.open(path, _NEW_FILE, mode, dir_fd=top)
