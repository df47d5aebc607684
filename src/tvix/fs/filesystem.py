"""``TvixStoreFs``: the filesystem core served through the kernel's FUSE device (pyfuse3).

A thin transport: every request goes to :class:`tvix.fs.core.StoreFs` (see
there for what the kernel sees and which errors it gets), and this class only
converts between pyfuse3's types and the core's: :class:`~tvix.fs.core.Attr`
to ``EntryAttributes`` with the cache timeouts, ``FsError`` to ``FUSEError``,
readdir entries to ``readdir_reply``, and a negative entry for misses the
kernel may cache.
"""

from __future__ import annotations

import asyncio
import errno
from collections.abc import Callable, Sequence
from typing import cast

import pyfuse3
from typing_extensions import override

from tvix.castore.blobservice.base import BlobService
from tvix.castore.directoryservice.base import DirectoryService
from tvix.fs.core import (
    BLKSIZE,
    FRSIZE,
    MTIME_NS,
    XATTR_BLOB_DIGEST,
    XATTR_DIRECTORY_DIGEST,
    Attr,
    StoreFs,
)
from tvix.fs.inodes import InodeTable
from tvix.fs.requests import FsError, FsOptions
from tvix.store.pathinfoservice.base import PathInfoService

__all__ = ["XATTR_BLOB_DIGEST", "XATTR_DIRECTORY_DIGEST", "FsOptions", "TvixStoreFs"]


class TvixStoreFs(pyfuse3.Operations):
    """pyfuse3 operations over a :class:`StoreFs` (built here over the three services).

    Request handlers run as coroutines in pyfuse3's loop (asyncio mode), so
    requests waiting on the services are served concurrently.
    """

    # ".." lookups are answered from each inode's parent (needed for NFS export).
    supports_dot_lookup = True

    def __init__(
        self,
        blobs: BlobService,
        directories: DirectoryService,
        path_infos: PathInfoService,
        options: FsOptions | None = None,
    ) -> None:
        super().__init__()
        self.core = StoreFs(blobs, directories, path_infos, options)
        self._negative = pyfuse3.EntryAttributes()
        self._negative.st_ino = 0  # "no such entry", cached for entry_timeout
        self._negative.entry_timeout = self.core.options.cache_timeout
        self._after_init: list[Callable[[], None]] = []

    @property
    def options(self) -> FsOptions:
        """The core's options."""
        return self.core.options

    @property
    def path_infos(self) -> PathInfoService:
        """The core's PathInfo service."""
        return self.core.path_infos

    @property
    def inodes(self) -> InodeTable:
        """The core's inode table."""
        return self.core.inodes

    def call_after_init(self, callback: Callable[[], None]) -> None:
        """Run ``callback`` once the kernel has accepted the session (FUSE_INIT answered).

        Settings of the mount the kernel (re)sets from that answer, such as its
        read-ahead, must be changed after it.
        """
        self._after_init.append(callback)

    @override
    def init(self) -> None:
        # Called by pyfuse3 while the INIT request is being answered, inside the
        # loop; the answer is written before the loop runs anything else.
        loop = asyncio.get_running_loop()
        for callback in self._after_init:
            loop.call_soon(callback)

    async def close(self) -> None:
        """Close the readers of files still open (after unmounting)."""
        await self.core.close()

    def _entry(self, attr: Attr) -> pyfuse3.EntryAttributes:
        e = pyfuse3.EntryAttributes()
        e.st_ino = attr.ino
        e.st_mode = attr.mode
        e.st_nlink = 1
        e.st_size = attr.size
        e.st_blocks = attr.blocks
        e.st_blksize = BLKSIZE
        e.st_uid = attr.uid
        e.st_gid = attr.gid
        e.st_atime_ns = e.st_mtime_ns = e.st_ctime_ns = MTIME_NS
        e.entry_timeout = e.attr_timeout = self.core.options.cache_timeout
        return e

    # -- requests --------------------------------------------------------------------------

    @override
    async def lookup(
        self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.EntryAttributes:
        try:
            attr = await self.core.lookup(parent_inode, name)
        except FsError as e:
            raise pyfuse3.FUSEError(e.errno) from None
        return self._negative if attr is None else self._entry(attr)

    @override
    async def forget(self, inode_list: Sequence[tuple[int, int]]) -> None:
        for ino, nlookup in inode_list:
            self.core.forget(ino, nlookup)

    @override
    async def getattr(self, inode: int, ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        try:
            return self._entry(await self.core.getattr(inode))
        except FsError as e:
            raise pyfuse3.FUSEError(e.errno) from None

    @override
    async def readlink(self, inode: int, ctx: pyfuse3.RequestContext) -> bytes:
        try:
            return await self.core.readlink(inode)
        except FsError as e:
            raise pyfuse3.FUSEError(e.errno) from None

    @override
    async def opendir(self, inode: int, ctx: pyfuse3.RequestContext) -> int:
        try:
            return await self.core.opendir(inode)
        except FsError as e:
            raise pyfuse3.FUSEError(e.errno) from None

    @override
    async def readdir(self, fh: int, start_id: int, token: pyfuse3.ReaddirToken) -> None:
        reply = pyfuse3.readdir_reply
        entry = self._entry

        def add(name: bytes, attr: Attr, next_offset: int) -> bool:
            return bool(reply(token, name, entry(attr), next_offset))

        try:
            await self.core.readdir(fh, start_id, add)
        except FsError as e:
            raise pyfuse3.FUSEError(e.errno) from None

    @override
    async def releasedir(self, fh: int) -> None:
        await self.core.releasedir(fh)

    @override
    async def open(self, inode: int, flags: int, ctx: pyfuse3.RequestContext) -> pyfuse3.FileInfo:
        try:
            fh = await self.core.open(inode, flags)
        except FsError as e:
            raise pyfuse3.FUSEError(e.errno) from None
        # The contents of an inode never change: cached pages stay valid across opens.
        return pyfuse3.FileInfo(fh=fh, keep_cache=True)

    @override
    async def read(self, fh: int, off: int, size: int) -> bytes:
        try:
            data = await self.core.read(fh, off, size)
        except FsError as e:
            raise pyfuse3.FUSEError(e.errno) from None
        # pyfuse3 replies with any contiguous buffer (its stub says bytes): no copy.
        return cast(bytes, data)

    @override
    async def release(self, fh: int) -> None:
        await self.core.release(fh)

    @override
    async def getxattr(self, inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> bytes:
        try:
            return await self.core.getxattr(inode, name)
        except FsError as e:
            raise pyfuse3.FUSEError(e.errno) from None

    @override
    async def listxattr(self, inode: int, ctx: pyfuse3.RequestContext) -> Sequence[bytes]:
        try:
            return await self.core.listxattr(inode)
        except FsError as e:
            raise pyfuse3.FUSEError(e.errno) from None

    @override
    async def statfs(self, ctx: pyfuse3.RequestContext) -> pyfuse3.StatvfsData:
        try:
            size = await self.core.statfs()
        except FsError as e:
            raise pyfuse3.FUSEError(e.errno) from None
        data = pyfuse3.StatvfsData()
        data.f_bsize = BLKSIZE
        data.f_frsize = FRSIZE
        data.f_blocks = size.blocks
        data.f_files = size.store_paths
        data.f_namemax = 255
        return data

    # -- modifications: a read-only filesystem -------------------------------------------
    # The mount is read-only, so the kernel refuses these itself; answering
    # EROFS here too keeps the filesystem read-only however it is mounted.

    @override
    async def setattr(
        self,
        inode: int,
        attr: pyfuse3.EntryAttributes,
        fields: pyfuse3.SetattrFields,
        fh: int | None,
        ctx: pyfuse3.RequestContext,
    ) -> pyfuse3.EntryAttributes:
        raise pyfuse3.FUSEError(errno.EROFS)

    @override
    async def mknod(
        self, parent_inode: int, name: bytes, mode: int, rdev: int, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.EntryAttributes:
        raise pyfuse3.FUSEError(errno.EROFS)

    @override
    async def mkdir(
        self, parent_inode: int, name: bytes, mode: int, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.EntryAttributes:
        raise pyfuse3.FUSEError(errno.EROFS)

    @override
    async def unlink(self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> None:
        raise pyfuse3.FUSEError(errno.EROFS)

    @override
    async def rmdir(self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> None:
        raise pyfuse3.FUSEError(errno.EROFS)

    @override
    async def symlink(
        self, parent_inode: int, name: bytes, target: bytes, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.EntryAttributes:
        raise pyfuse3.FUSEError(errno.EROFS)

    @override
    async def rename(
        self,
        parent_inode_old: int,
        name_old: bytes,
        parent_inode_new: int,
        name_new: bytes,
        flags: int,
        ctx: pyfuse3.RequestContext,
    ) -> None:
        raise pyfuse3.FUSEError(errno.EROFS)

    @override
    async def link(
        self, inode: int, new_parent_inode: int, new_name: bytes, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.EntryAttributes:
        raise pyfuse3.FUSEError(errno.EROFS)

    @override
    async def create(
        self, parent_inode: int, name: bytes, mode: int, flags: int, ctx: pyfuse3.RequestContext
    ) -> tuple[pyfuse3.FileInfo, pyfuse3.EntryAttributes]:
        raise pyfuse3.FUSEError(errno.EROFS)

    @override
    async def write(self, fh: int, off: int, buf: bytes) -> int:
        raise pyfuse3.FUSEError(errno.EROFS)

    @override
    async def setxattr(
        self, inode: int, name: bytes, value: bytes, ctx: pyfuse3.RequestContext
    ) -> None:
        raise pyfuse3.FUSEError(errno.EROFS)

    @override
    async def removexattr(self, inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> None:
        raise pyfuse3.FUSEError(errno.EROFS)
