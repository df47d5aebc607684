"""``TvixStoreFs``: the store as a read-only filesystem, served through pyfuse3.

The root directory holds store paths by base name (``<hash>-<name>``), each
looked up in the PathInfo service when the kernel first asks for it; below
them, Directories are fetched from the directory service and file contents
from the blob service, all on demand.

What the kernel sees:

* directories ``0555``, files ``0444``, executable files ``0555``, symlinks
  ``0777`` with their target; owner and group those of the mounting process;
  every timestamp 1 s past the epoch, as in ``/nix/store``; link count 1
  (for directories "not counted", as btrfs reports it, so nothing has to be
  fetched to stat one); a directory's size is its node's ``size`` (the
  entries below it), which is known without fetching it;
* inode numbers derived from the entry's place (see :mod:`tvix.fs.inodes`);
* ``user.tvix.castore.blob.digest`` on files and
  ``user.tvix.castore.directory.digest`` on directories (``b3:<base64>``, as
  upstream), unless ``show_xattr`` is off (then the kernel is told extended
  attributes are not supported at all: ``EOPNOTSUPP``);
* long entry and attribute timeouts and ``keep_cache`` on open: the content
  under a name never changes, so the kernel may cache names, attributes, and
  pages for as long as it likes. Misses inside a directory are cached as
  negative entries for as long; misses at the root are not (a store path may
  be added while mounted).

Errors: a name that is not there is ``ENOENT`` (at the root also any name
that is not a store path base name, and ``<hash>-<other name>`` of a stored
hash); listing the root without ``list_root`` is ``EPERM`` (upstream's and
kubo's choice), raised by ``readdir`` rather than ``opendir`` so the root can
still be opened as a directory file descriptor for ``openat``; every
modification is ``EROFS`` (the mount is read-only too, so the kernel says so
before asking); any failure of a service (remote gone, Directory or blob
missing, data not matching its digest, no answer within the request timeout)
is logged and returned as ``EIO``, and the filesystem keeps serving.
"""

from __future__ import annotations

import asyncio
import errno
import itertools
import logging
import os
import stat
from collections.abc import Callable, Sequence

import pyfuse3
from typing_extensions import override

from tvix.castore.blobservice.base import BlobService
from tvix.castore.directoryservice.base import DirectoryService
from tvix.castore.errors import IntegrityError, StorageError
from tvix.castore.nodes import DirectoryNode, FileNode, Node, SymlinkNode
from tvix.fs.inodes import ROOT_INODE, Inode, InodeTable
from tvix.fs.listings import ListingCache
from tvix.fs.requests import DirHandle, FileHandle, FsOptions, fuse_error, request_handler
from tvix.nixcompat.errors import NixCompatError
from tvix.nixcompat.storepath import StorePath
from tvix.store.errors import ListNotSupportedError
from tvix.store.pathinfoservice.base import PathInfoService

__all__ = ["XATTR_BLOB_DIGEST", "XATTR_DIRECTORY_DIGEST", "FsOptions", "TvixStoreFs"]

log = logging.getLogger(__name__)

XATTR_BLOB_DIGEST = b"user.tvix.castore.blob.digest"
XATTR_DIRECTORY_DIGEST = b"user.tvix.castore.directory.digest"

# Every timestamp, as Nix normalises them in /nix/store.
_MTIME_NS = 1_000_000_000
# The I/O size stat() suggests: cat, cp and friends size their buffers by it,
# and every read request costs a round trip through userspace.
_BLKSIZE = 1 << 20


class TvixStoreFs(pyfuse3.Operations):
    """The read-only filesystem over the three services (see the module docs).

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
        self.blobs = blobs
        self.path_infos = path_infos
        self.options = options if options is not None else FsOptions()
        self.inodes = InodeTable()
        self.listings = ListingCache(
            directories, self.options.max_cached_directory_entries, self.options.request_timeout
        )
        self._handles = itertools.count(1)
        self._files: dict[int, FileHandle] = {}
        self._dirs: dict[int, DirHandle] = {}
        self._negative = self._negative_entry()
        self._uid = os.getuid()
        self._gid = os.getgid()
        self._after_init: list[Callable[[], None]] = []

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
        handles, self._files = list(self._files.values()), {}
        for handle in handles:
            await _close_reader(handle)

    # -- attributes ----------------------------------------------------------------------

    def _negative_entry(self) -> pyfuse3.EntryAttributes:
        attrs = pyfuse3.EntryAttributes()
        attrs.st_ino = 0  # "no such entry", cached for entry_timeout
        attrs.entry_timeout = self.options.cache_timeout
        return attrs

    def _attrs(self, inode: Inode) -> pyfuse3.EntryAttributes:
        attrs = inode.attrs
        if attrs is not None:
            return attrs
        attrs = pyfuse3.EntryAttributes()
        node = inode.node
        size = 0
        if node is None or isinstance(node, DirectoryNode):
            mode = stat.S_IFDIR | 0o555
            size = 0 if node is None else node.size
        elif isinstance(node, FileNode):
            mode = stat.S_IFREG | (0o555 if node.executable else 0o444)
            size = node.size
            attrs.st_blocks = (size + 511) // 512
        else:
            mode = stat.S_IFLNK | 0o777
            size = len(node.target)
        attrs.st_ino = inode.ino
        attrs.st_mode = mode
        attrs.st_nlink = 1
        attrs.st_size = size
        attrs.st_blksize = _BLKSIZE
        attrs.st_uid = self._uid
        attrs.st_gid = self._gid
        attrs.st_atime_ns = attrs.st_mtime_ns = attrs.st_ctime_ns = _MTIME_NS
        attrs.entry_timeout = attrs.attr_timeout = self.options.cache_timeout
        inode.attrs = attrs
        return attrs

    def _inode(self, ino: int) -> Inode:
        inode = self.inodes.get(ino)
        if inode is None:
            # The kernel only asks about inodes it was told about and has not forgotten.
            log.warning("request for unknown inode %d", ino)
            raise fuse_error(errno.ENOENT)
        return inode

    # -- names ---------------------------------------------------------------------------

    async def _root_node(self, name: bytes) -> Node | None:
        """The root node of the store path whose base name is ``name``, if stored."""
        try:
            store_path = StorePath.from_base_name(name)
        except NixCompatError:
            return None  # not a store path base name: nothing can be stored under it
        info = await self.path_infos.get(store_path.digest)
        # The hash alone would find the store path; the name must match as well.
        if info is None or info.store_path != store_path:
            return None
        return info.node

    async def _children(self, inode: Inode) -> tuple[Node, ...]:
        node = inode.node
        if not isinstance(node, DirectoryNode):
            raise fuse_error(errno.ENOTDIR)
        return (await self.listings.get(node.digest)).entries

    @override
    @request_handler
    async def lookup(
        self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.EntryAttributes:
        parent = self._inode(parent_inode)
        if name == b".":
            found = parent
        elif name == b"..":
            found = self._inode(parent.parent)
        elif parent.ino == ROOT_INODE:
            node = await self._root_node(name)
            if node is None:
                raise fuse_error(errno.ENOENT)  # not cached: it may be added later
            found = self.inodes.entry(parent, name, node)
        else:
            directory = parent.node
            if not isinstance(directory, DirectoryNode):
                raise fuse_error(errno.ENOTDIR)
            child = (await self.listings.get(directory.digest)).by_name.get(name)
            if child is None:
                return self._negative  # immutable: the kernel may remember the miss
            found = self.inodes.entry(parent, name, child)
        self.inodes.remember(found)
        return self._attrs(found)

    @override
    async def forget(self, inode_list: Sequence[tuple[int, int]]) -> None:
        # Must not raise (it answers no request): there is nothing here that could.
        for ino, nlookup in inode_list:
            self.inodes.forget(ino, nlookup)

    @override
    @request_handler
    async def getattr(self, inode: int, ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        return self._attrs(self._inode(inode))

    @override
    @request_handler
    async def readlink(self, inode: int, ctx: pyfuse3.RequestContext) -> bytes:
        node = self._inode(inode).node
        if not isinstance(node, SymlinkNode):
            raise fuse_error(errno.EINVAL)
        return node.target

    # -- directories ---------------------------------------------------------------------

    @override
    @request_handler
    async def opendir(self, inode: int, ctx: pyfuse3.RequestContext) -> int:
        entry = self._inode(inode)
        if entry.node is not None and not isinstance(entry.node, DirectoryNode):
            raise fuse_error(errno.ENOTDIR)
        fh = next(self._handles)
        self._dirs[fh] = DirHandle(entry)
        return fh

    async def _root_entries(self) -> tuple[Node, ...]:
        if not self.options.list_root:
            raise fuse_error(errno.EPERM)
        try:
            nodes = [info.node async for info in self.path_infos.list()]
        except ListNotSupportedError:
            raise fuse_error(errno.EPERM) from None
        nodes.sort(key=lambda n: n.name)
        return tuple(nodes)

    @override
    @request_handler
    async def readdir(self, fh: int, start_id: int, token: pyfuse3.ReaddirToken) -> None:
        handle = self._dirs.get(fh)
        if handle is None:
            raise fuse_error(errno.EBADF)
        inode = handle.inode
        if inode.ino == ROOT_INODE:
            # One listing per open: offsets into it stay valid while paths are added.
            if handle.root_entries is None:
                handle.root_entries = await self._root_entries()
            entries = handle.root_entries
        else:
            entries = await self._children(inode)
        # Offsets: 1 after ".", 2 after "..", i + 3 after entry i. The kernel does
        # not count "." and ".." as lookups, so neither do we.
        reply = pyfuse3.readdir_reply
        if start_id == 0:
            if not reply(token, b".", self._attrs(inode), 1):
                return
            start_id = 1
        if start_id == 1:
            parent = self.inodes.get(inode.parent) or inode
            if not reply(token, b"..", self._attrs(parent), 2):
                return
            start_id = 2
        table = self.inodes
        for index in range(start_id - 2, len(entries)):
            node = entries[index]
            child = table.entry(inode, node.name, node)
            if not reply(token, node.name, self._attrs(child), index + 3):
                table.discard(child)  # not sent: the kernel does not know it
                return
            child.nlookup += 1  # readdirplus: each entry sent is a lookup

    @override
    @request_handler
    async def releasedir(self, fh: int) -> None:
        self._dirs.pop(fh, None)

    # -- files ---------------------------------------------------------------------------

    @override
    @request_handler
    async def open(self, inode: int, flags: int, ctx: pyfuse3.RequestContext) -> pyfuse3.FileInfo:
        if flags & os.O_ACCMODE != os.O_RDONLY:
            raise fuse_error(errno.EROFS)
        node = self._inode(inode).node
        if not isinstance(node, FileNode):
            raise fuse_error(errno.EISDIR if node is None else errno.EINVAL)
        fh = next(self._handles)
        self._files[fh] = FileHandle(node)
        # The contents of an inode never change: cached pages stay valid across opens.
        return pyfuse3.FileInfo(fh=fh, keep_cache=True)

    @override
    @request_handler
    async def read(self, fh: int, off: int, size: int) -> bytes:
        handle = self._files.get(fh)
        if handle is None:
            raise fuse_error(errno.EBADF)
        node = handle.node
        want = min(size, node.size - off)
        if want <= 0:
            return b""
        async with handle.lock:
            try:
                return await self._read_at(handle, off, want)
            except BaseException:
                # A read cut short (failure, deadline) leaves the reader's position
                # unknown: start over with a fresh one next time.
                await _close_reader(handle)
                raise

    async def _read_at(self, handle: FileHandle, off: int, want: int) -> bytes:
        reader = handle.reader
        if reader is None:
            reader = await self.blobs.open_read(handle.node.digest)
            if reader is None:
                raise StorageError(
                    f"blob {handle.node.digest} ({os.fsdecode(handle.node.name)}) is missing "
                    "from the blob service"
                )
            handle.reader = reader
        # Sequential reads continue where the last one ended; a seek on a chunked
        # reader costs nothing until the read, which fetches only the chunks it touches.
        if reader.tell() != off:
            await reader.seek(off)
        data = await reader.read(want)
        if len(data) == want:
            return data
        parts = [data]
        got = len(data)
        while got < want:
            data = await reader.read(want - got)
            if not data:
                raise IntegrityError(
                    f"blob {handle.node.digest} ends at {off + got}, before the "
                    f"{handle.node.size} bytes its node states"
                )
            parts.append(data)
            got += len(data)
        return b"".join(parts)

    @override
    @request_handler
    async def release(self, fh: int) -> None:
        handle = self._files.pop(fh, None)
        if handle is not None:
            await _close_reader(handle)

    # -- extended attributes -------------------------------------------------------------

    @override
    @request_handler
    async def getxattr(self, inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> bytes:
        if not self.options.show_xattr:
            raise fuse_error(errno.ENOSYS)  # the kernel then reports EOPNOTSUPP for good
        node = self._inode(inode).node
        if name == XATTR_BLOB_DIGEST and isinstance(node, FileNode):
            return str(node.digest).encode()
        if name == XATTR_DIRECTORY_DIGEST and isinstance(node, DirectoryNode):
            return str(node.digest).encode()
        raise fuse_error(pyfuse3.ENOATTR)

    @override
    @request_handler
    async def listxattr(self, inode: int, ctx: pyfuse3.RequestContext) -> Sequence[bytes]:
        if not self.options.show_xattr:
            raise fuse_error(errno.ENOSYS)
        node = self._inode(inode).node
        if isinstance(node, FileNode):
            return [XATTR_BLOB_DIGEST]
        if isinstance(node, DirectoryNode):
            return [XATTR_DIRECTORY_DIGEST]
        return []

    # -- the filesystem as a whole -------------------------------------------------------

    @override
    @request_handler
    async def statfs(self, ctx: pyfuse3.RequestContext) -> pyfuse3.StatvfsData:
        data = pyfuse3.StatvfsData()
        data.f_bsize = _BLKSIZE
        data.f_frsize = 512
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
        raise fuse_error(errno.EROFS)

    @override
    async def mknod(
        self, parent_inode: int, name: bytes, mode: int, rdev: int, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.EntryAttributes:
        raise fuse_error(errno.EROFS)

    @override
    async def mkdir(
        self, parent_inode: int, name: bytes, mode: int, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.EntryAttributes:
        raise fuse_error(errno.EROFS)

    @override
    async def unlink(self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> None:
        raise fuse_error(errno.EROFS)

    @override
    async def rmdir(self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> None:
        raise fuse_error(errno.EROFS)

    @override
    async def symlink(
        self, parent_inode: int, name: bytes, target: bytes, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.EntryAttributes:
        raise fuse_error(errno.EROFS)

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
        raise fuse_error(errno.EROFS)

    @override
    async def link(
        self, inode: int, new_parent_inode: int, new_name: bytes, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.EntryAttributes:
        raise fuse_error(errno.EROFS)

    @override
    async def create(
        self, parent_inode: int, name: bytes, mode: int, flags: int, ctx: pyfuse3.RequestContext
    ) -> tuple[pyfuse3.FileInfo, pyfuse3.EntryAttributes]:
        raise fuse_error(errno.EROFS)

    @override
    async def write(self, fh: int, off: int, buf: bytes) -> int:
        raise fuse_error(errno.EROFS)

    @override
    async def setxattr(
        self, inode: int, name: bytes, value: bytes, ctx: pyfuse3.RequestContext
    ) -> None:
        raise fuse_error(errno.EROFS)

    @override
    async def removexattr(self, inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> None:
        raise fuse_error(errno.EROFS)


async def _close_reader(handle: FileHandle) -> None:
    reader, handle.reader = handle.reader, None
    if reader is not None:
        try:
            await reader.close()
        except Exception:  # closing must not turn a good read into a failure
            log.debug("closing a blob reader failed", exc_info=True)
