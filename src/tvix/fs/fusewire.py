"""The FUSE wire protocol, decoded and encoded in Python: requests in, replies out.

:class:`FuseSession` takes one request as the kernel wrote it (a 40-byte
``fuse_in_header`` and the opcode's arguments) and returns the reply it
expects (a 16-byte ``fuse_out_header`` and the opcode's answer), or ``None``
for the requests that get none (FORGET, BATCH_FORGET, INTERRUPT). It does no
I/O of its own: every question goes to a :class:`~tvix.fs.core.StoreFs`, and
moving the bytes is the transport's business (virtio-fs queues here; a
``/dev/fuse`` file descriptor would do as well). The layouts are those of
``<linux/fuse.h>``, little-endian, as the kernel speaks them on x86-64.

Answered: INIT, DESTROY, LOOKUP, FORGET, BATCH_FORGET, GETATTR, READLINK,
OPEN, OPENDIR, READ, READDIR, READDIRPLUS, RELEASE, RELEASEDIR, STATFS,
GETXATTR, LISTXATTR. Every modification is ``EROFS``; anything else (ACCESS,
STATX, locks, ioctls, ...) is ``ENOSYS``, which tells the kernel not to ask
again: FLUSH too (sent on every close, with nothing to flush here), which
saves a round trip per file read.
"""

from __future__ import annotations

import errno
import logging
import struct
from collections.abc import Callable, Coroutine
from typing import Any

from tvix.fs.core import BLKSIZE, FRSIZE, MTIME_NS, StoreFs
from tvix.fs.inodes import Attr, EntryStat
from tvix.fs.requests import FsError

__all__ = ["FUSE_KERNEL_MINOR", "FuseSession", "Op"]

log = logging.getLogger(__name__)


class Op:
    """FUSE opcodes (``enum fuse_opcode``)."""

    LOOKUP = 1
    FORGET = 2
    GETATTR = 3
    SETATTR = 4
    READLINK = 5
    SYMLINK = 6
    MKNOD = 8
    MKDIR = 9
    UNLINK = 10
    RMDIR = 11
    RENAME = 12
    LINK = 13
    OPEN = 14
    READ = 15
    WRITE = 16
    STATFS = 17
    RELEASE = 18
    FSYNC = 20
    SETXATTR = 21
    GETXATTR = 22
    LISTXATTR = 23
    REMOVEXATTR = 24
    FLUSH = 25
    INIT = 26
    OPENDIR = 27
    READDIR = 28
    RELEASEDIR = 29
    FSYNCDIR = 30
    CREATE = 35
    INTERRUPT = 36
    DESTROY = 38
    BATCH_FORGET = 42
    FALLOCATE = 43
    READDIRPLUS = 44
    RENAME2 = 45
    SYNCFS = 50
    TMPFILE = 51


_READ_ONLY = frozenset(
    {
        Op.SETATTR,
        Op.SYMLINK,
        Op.MKNOD,
        Op.MKDIR,
        Op.UNLINK,
        Op.RMDIR,
        Op.RENAME,
        Op.LINK,
        Op.WRITE,
        Op.FSYNC,
        Op.SETXATTR,
        Op.REMOVEXATTR,
        Op.FSYNCDIR,
        Op.CREATE,
        Op.FALLOCATE,
        Op.RENAME2,
        Op.TMPFILE,
    }
)

# The protocol version spoken: 7.31 has every structure used here at its
# final size (fuse_init_out of 64 bytes, max_pages); newer kernels accept it.
FUSE_KERNEL_VERSION = 7
FUSE_KERNEL_MINOR = 31

# fuse_init_in/out flags.
_ASYNC_READ = 1 << 0
_EXPORT_SUPPORT = 1 << 4
_DO_READDIRPLUS = 1 << 13
_PARALLEL_DIROPS = 1 << 18
_MAX_PAGES = 1 << 22
_CACHE_SYMLINKS = 1 << 23
_WANTED = (
    _ASYNC_READ
    | _EXPORT_SUPPORT
    | _DO_READDIRPLUS
    | _PARALLEL_DIROPS
    | _MAX_PAGES
    | _CACHE_SYMLINKS
)
# fuse_open_out.open_flags: pages and listings stay valid across opens.
_FOPEN_KEEP_CACHE = 1 << 1
_FOPEN_CACHE_DIR = 1 << 3

_IN_HEADER = struct.Struct("<IIQQIIIHH")  # len, opcode, unique, nodeid, uid, gid, pid, ext, pad
_OUT_HEADER = struct.Struct("<IiQ")  # len, error (-errno), unique
# fuse_attr: ino size blocks atime mtime ctime, atimensec mtimensec ctimensec
# mode nlink uid gid rdev blksize flags.
_ATTR = struct.Struct("<QQQQQQIIIIIIIIII")
_ENTRY_HEAD = struct.Struct("<QQQQII")  # nodeid generation entry_valid attr_valid, 2 x nsec
_ATTR_OUT_HEAD = struct.Struct("<QII")  # attr_valid attr_valid_nsec dummy
_INIT_IN = struct.Struct("<IIII")  # major minor max_readahead flags
_INIT_OUT = struct.Struct("<IIIIHHIIHHI28x")  # ... max_write time_gran max_pages align flags2
_OPEN_IN = struct.Struct("<II")  # flags open_flags
_OPEN_OUT = struct.Struct("<QII")  # fh open_flags padding
_READ_IN = struct.Struct("<QQII")  # fh offset size read_flags (lock_owner flags pad follow)
_RELEASE_IN = struct.Struct("<Q")  # fh (flags release_flags lock_owner follow)
_FORGET_IN = struct.Struct("<Q")  # nlookup
_BATCH_FORGET_IN = struct.Struct("<II")  # count dummy
_FORGET_ONE = struct.Struct("<QQ")  # nodeid nlookup
_GETXATTR_IN = struct.Struct("<II")  # size padding
_GETXATTR_OUT = struct.Struct("<II")  # size padding
_DIRENT = struct.Struct("<QQII")  # ino off namelen type
# One READDIRPLUS record before the name (fuse_entry_out, then fuse_dirent), in
# one pack; the runs of fields that are the same for every entry of a session
# are passed as bytes: nodeid | generation, entry and attr valid (s, ns) |
# attr: ino size blocks | 3 times, 3 nsecs | mode | nlink uid gid rdev
# blksize flags | dirent: ino off namelen type.
_DIRENTPLUS = struct.Struct("<Q32sQQQ36sI24sQQII")
_PADDING = tuple(bytes(-n & 7) for n in range(8))  # after a name of length n (mod 8)
_KSTATFS = struct.Struct("<QQQQQIII4x24x")  # blocks bfree bavail files ffree bsize namelen frsize

IN_HEADER_SIZE = _IN_HEADER.size
OUT_HEADER_SIZE = _OUT_HEADER.size
_NO_REPLY = frozenset({Op.FORGET, Op.BATCH_FORGET, Op.INTERRUPT})


def _valid(seconds: float) -> tuple[int, int]:
    whole = int(seconds)
    return whole, int((seconds - whole) * 1e9)


class FuseSession:
    """One FUSE session over ``fs``: :meth:`handle` answers one request (see the module docs).

    ``max_write`` and ``max_pages`` are what INIT offers (the transport's
    limit on one request: 1 MiB and 256 pages suit both ``/dev/fuse`` and
    virtio-fs, whose kernel side caps them further by its queue size).
    """

    def __init__(self, fs: StoreFs, *, max_write: int = 1 << 20, max_pages: int = 256) -> None:
        self.fs = fs
        self.max_write = max_write
        self.max_pages = max_pages
        self.initialized = False
        self.destroyed = False
        self.minor = FUSE_KERNEL_MINOR
        seconds, nsec = _valid(fs.options.cache_timeout)
        self._timeout = (seconds, nsec)
        self._attr_out_head = _ATTR_OUT_HEAD.pack(seconds, nsec, 0)
        self._negative = _ENTRY_HEAD.pack(0, 0, seconds, 0, nsec, 0) + bytes(_ATTR.size)
        times = struct.pack(
            "<QQQIII", *(MTIME_NS // 1_000_000_000,) * 3, *(MTIME_NS % 1_000_000_000,) * 3
        )
        self._plus_valid = struct.pack("<QQQII", 0, seconds, seconds, nsec, nsec)
        self._plus_times = times
        self._plus_owner = struct.pack("<IIIIII", 1, fs.uid, fs.gid, 0, BLKSIZE, 0)
        Handler = Callable[[int, memoryview], Coroutine[Any, Any, bytes | bytearray]]
        self._handlers: dict[int, Handler] = {
            Op.LOOKUP: self._lookup,
            Op.GETATTR: self._getattr,
            Op.READLINK: self._readlink,
            Op.OPEN: self._open,
            Op.OPENDIR: self._opendir,
            Op.READ: self._read,
            Op.READDIR: self._readdir,
            Op.READDIRPLUS: self._readdirplus,
            Op.RELEASE: self._release,
            Op.RELEASEDIR: self._releasedir,
            Op.STATFS: self._statfs,
            Op.GETXATTR: self._getxattr,
            Op.LISTXATTR: self._listxattr,
            Op.DESTROY: self._destroy,
        }

    async def handle(self, request: bytes | memoryview) -> bytes | None:
        """The reply to ``request`` (one whole FUSE request), or ``None`` if it gets none."""
        parts = await self.handle_parts(request)
        return None if parts is None else parts[0] + parts[1]

    async def handle_parts(
        self, request: bytes | memoryview
    ) -> tuple[bytes, bytes | bytearray] | None:
        """:meth:`handle`'s reply as its header and its payload, for a gathering write."""
        data = memoryview(request)
        if len(data) < IN_HEADER_SIZE:
            log.warning("FUSE request of %d bytes: shorter than its header", len(data))
            return None
        length, opcode, unique, nodeid, _uid, _gid, _pid, _ext, _pad = _IN_HEADER.unpack_from(data)
        body = data[IN_HEADER_SIZE : max(length, IN_HEADER_SIZE)]
        if opcode in _NO_REPLY:
            self._forget(opcode, nodeid, body)
            return None
        payload: bytes | bytearray
        try:
            if opcode == Op.INIT:
                payload = self._init(body)
            elif not self.initialized:
                raise FsError(errno.EIO)
            else:
                handler = self._handlers.get(opcode)
                if handler is None:
                    raise FsError(errno.EROFS if opcode in _READ_ONLY else errno.ENOSYS)
                payload = await handler(nodeid, body)
        except FsError as e:
            return _OUT_HEADER.pack(OUT_HEADER_SIZE, -e.errno, unique), b""
        except Exception:  # a malformed request must not end the session
            log.exception("FUSE opcode %d failed", opcode)
            return _OUT_HEADER.pack(OUT_HEADER_SIZE, -errno.EIO, unique), b""
        return _OUT_HEADER.pack(OUT_HEADER_SIZE + len(payload), 0, unique), payload

    # -- session -------------------------------------------------------------------------

    def _init(self, body: memoryview) -> bytes:
        major, minor, max_readahead, flags = _INIT_IN.unpack_from(body)
        if major != FUSE_KERNEL_VERSION:
            # Tell the kernel our major; it retries or gives up.
            log.error("FUSE protocol %d.%d is not supported", major, minor)
            return _INIT_OUT.pack(FUSE_KERNEL_VERSION, FUSE_KERNEL_MINOR, 0, 0, 0, 0, 0, 0, 0, 0, 0)
        self.minor = min(minor, FUSE_KERNEL_MINOR)
        self.initialized = True
        log.debug("FUSE INIT %d.%d, flags %#x", major, minor, flags)
        return _INIT_OUT.pack(
            FUSE_KERNEL_VERSION,
            self.minor,
            max_readahead,
            flags & _WANTED,
            64,  # max_background
            48,  # congestion_threshold
            self.max_write,
            1,  # time_gran: nanoseconds
            self.max_pages,
            0,
            0,
        )

    async def _destroy(self, nodeid: int, body: memoryview) -> bytes:
        self.destroyed = True
        await self.fs.close()
        return b""

    def _forget(self, opcode: int, nodeid: int, body: memoryview) -> None:
        if opcode == Op.FORGET and len(body) >= _FORGET_IN.size:
            self.fs.forget(nodeid, _FORGET_IN.unpack_from(body)[0])
        elif opcode == Op.BATCH_FORGET and len(body) >= _BATCH_FORGET_IN.size:
            count = _BATCH_FORGET_IN.unpack_from(body)[0]
            offset = _BATCH_FORGET_IN.size
            for _ in range(count):
                if offset + _FORGET_ONE.size > len(body):
                    break
                ino, nlookup = _FORGET_ONE.unpack_from(body, offset)
                self.fs.forget(ino, nlookup)
                offset += _FORGET_ONE.size

    # -- attributes and names ------------------------------------------------------------

    @staticmethod
    def _attr(attr: Attr) -> bytes:
        seconds = MTIME_NS // 1_000_000_000
        nsec = MTIME_NS % 1_000_000_000
        return _ATTR.pack(
            attr.ino,
            attr.size,
            attr.blocks,
            seconds,
            seconds,
            seconds,
            nsec,
            nsec,
            nsec,
            attr.mode,
            1,
            attr.uid,
            attr.gid,
            0,
            BLKSIZE,
            0,
        )

    def _entry(self, attr: Attr) -> bytes:
        seconds, nsec = self._timeout
        return _ENTRY_HEAD.pack(attr.ino, 0, seconds, seconds, nsec, nsec) + self._attr(attr)

    async def _lookup(self, nodeid: int, body: memoryview) -> bytes:
        name = bytes(body).split(b"\0", 1)[0]
        attr = await self.fs.lookup(nodeid, name)
        return self._negative if attr is None else self._entry(attr)

    async def _getattr(self, nodeid: int, body: memoryview) -> bytes:
        return self._attr_out_head + self._attr(await self.fs.getattr(nodeid))

    async def _readlink(self, nodeid: int, body: memoryview) -> bytes:
        return await self.fs.readlink(nodeid)

    # -- directories ---------------------------------------------------------------------

    async def _opendir(self, nodeid: int, body: memoryview) -> bytes:
        fh = await self.fs.opendir(nodeid)
        # The root's listing may grow; any other never changes. The kernel keeps
        # a cached listing only across opens that say KEEP_CACHE as well.
        flags = _FOPEN_CACHE_DIR | _FOPEN_KEEP_CACHE if nodeid != 1 else 0
        return _OPEN_OUT.pack(fh, flags, 0)

    async def _readdir(self, nodeid: int, body: memoryview) -> bytes:
        return await self._list(body, plus=False)

    async def _readdirplus(self, nodeid: int, body: memoryview) -> bytes:
        return await self._list(body, plus=True)

    async def _list(self, body: memoryview, *, plus: bool) -> bytes:
        fh, offset, size, _flags = _READ_IN.unpack_from(body)
        parts: list[bytes] = []
        append = parts.append
        room = size
        fixed = _DIRENT.size + (_ENTRY_HEAD.size + _ATTR.size if plus else 0)
        pack = _DIRENTPLUS.pack if plus else _DIRENT.pack
        valid, times, owner = self._plus_valid, self._plus_times, self._plus_owner

        # Called once per entry: records are sized and packed with one struct each.
        def add(name: bytes, ino: int, stat: EntryStat, next_offset: int) -> bool:
            nonlocal room
            namelen = len(name)
            record = fixed + ((namelen + 7) & ~7)
            if record > room:
                return False
            room -= record
            mode, size, blocks = stat
            if plus:
                append(
                    pack(
                        ino,
                        valid,
                        ino,
                        size,
                        blocks,
                        times,
                        mode,
                        owner,
                        ino,
                        next_offset,
                        namelen,
                        mode >> 12,
                    )
                )
            else:
                append(pack(ino, next_offset, namelen, mode >> 12))
            append(name)
            append(_PADDING[namelen & 7])
            return True

        await self.fs.readdir(fh, offset, add, plus=plus)
        return b"".join(parts)

    async def _releasedir(self, nodeid: int, body: memoryview) -> bytes:
        await self.fs.releasedir(_RELEASE_IN.unpack_from(body)[0])
        return b""

    # -- files ---------------------------------------------------------------------------

    async def _open(self, nodeid: int, body: memoryview) -> bytes:
        flags = _OPEN_IN.unpack_from(body)[0]
        fh = await self.fs.open(nodeid, flags)
        # The contents of an inode never change: cached pages stay valid across opens.
        return _OPEN_OUT.pack(fh, _FOPEN_KEEP_CACHE, 0)

    async def _read(self, nodeid: int, body: memoryview) -> bytes | bytearray:
        fh, offset, size, _flags = _READ_IN.unpack_from(body)
        return await self.fs.read(fh, offset, size)

    async def _release(self, nodeid: int, body: memoryview) -> bytes:
        await self.fs.release(_RELEASE_IN.unpack_from(body)[0])
        return b""

    # -- the rest ------------------------------------------------------------------------

    async def _statfs(self, nodeid: int, body: memoryview) -> bytes:
        size = await self.fs.statfs()
        # blocks bfree bavail files ffree bsize namelen frsize: read-only, nothing free.
        return _KSTATFS.pack(size.blocks, 0, 0, size.store_paths, 0, BLKSIZE, 255, FRSIZE)

    async def _getxattr(self, nodeid: int, body: memoryview) -> bytes:
        size = _GETXATTR_IN.unpack_from(body)[0]
        name = bytes(body[_GETXATTR_IN.size :]).split(b"\0", 1)[0]
        return _sized(await self.fs.getxattr(nodeid, name), size)

    async def _listxattr(self, nodeid: int, body: memoryview) -> bytes:
        size = _GETXATTR_IN.unpack_from(body)[0]
        names = await self.fs.listxattr(nodeid)
        return _sized(b"".join(n + b"\0" for n in names), size)


def _sized(value: bytes, size: int) -> bytes:
    """An xattr answer: its length if asked with size 0, else the value if it fits."""
    if size == 0:
        return _GETXATTR_OUT.pack(len(value), 0)
    if len(value) > size:
        raise FsError(errno.ERANGE)
    return value
