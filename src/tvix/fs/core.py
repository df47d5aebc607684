"""``StoreFs``: the store as a read-only filesystem, whatever carries the requests.

The root directory holds store paths by base name (``<hash>-<name>``), each
looked up in the PathInfo service when first asked for; below them,
Directories are fetched from the directory service and file contents from the
blob service, all on demand. This class answers the filesystem questions
(lookups, attributes, listings, reads, links, extended attributes, forgets) in
terms of inode numbers, handles, plain :class:`Attr` records and
:class:`~tvix.fs.requests.FsError`; :mod:`tvix.fs.fusewire` turns FUSE
requests into calls (the wire format, decoded in Python), carried by the
kernel's FUSE device on the host (:mod:`tvix.fs.fusedev`) and by virtio-fs
queues for VMs (:mod:`tvix.fs.virtiofs`).

What a client sees:

* directories ``0555``, files ``0444``, executable files ``0555``, symlinks
  ``0777`` with their target; owner and group those of the serving process;
  every timestamp 1 s past the epoch, as in ``/nix/store``; link count 1
  (for directories "not counted", as btrfs reports it, so nothing has to be
  fetched to stat one); a directory's size is its node's ``size`` (the
  entries below it), which is known without fetching it;
* inode numbers derived from the entry's place (see :mod:`tvix.fs.inodes`);
* ``user.tvix.castore.blob.digest`` on files and
  ``user.tvix.castore.directory.digest`` on directories (``b3:<base64>``, as
  upstream), unless ``show_xattr`` is off (then ``ENOSYS``: the kernel is told
  extended attributes are not supported at all and reports ``EOPNOTSUPP``);
* ``statfs`` (``df``): the store's size, as ``tvix-store info`` counts it:
  total = used = the NAR bytes of every store path (what the files the mount
  presents amount to, in 512-byte blocks), inodes = the number of store paths,
  nothing free (read-only). The NAR sizes are in the PathInfos, so counting
  is one listing of them, no Directory read; it is taken when first asked
  for, then again in the background when older than ``statfs_interval``
  (only the very first ``statfs`` waits for it). A PathInfo service that
  cannot list reports zeros;
* long entry and attribute timeouts, cached pages and directory listings
  across opens: the content under a name never changes, so the kernel may
  cache names, attributes, pages and listings (all but the root's) for as
  long as it likes. Misses inside a directory may be cached as
  negative entries for as long (:meth:`StoreFs.lookup` returns ``None``);
  misses at the root may not (a store path may be added while served).

Errors: a name that is not there is ``ENOENT`` (at the root also any name
that is not a store path base name, and ``<hash>-<other name>`` of a stored
hash); listing the root without ``list_root`` is ``EPERM`` (upstream's and
kubo's choice), raised by ``readdir`` rather than ``opendir`` so the root can
still be opened as a directory file descriptor for ``openat``; every
modification is ``EROFS``; any failure of a service (remote gone, Directory or
blob missing, data not matching its digest, no answer within the request
timeout) is logged and answered ``EIO``, and the filesystem keeps serving.
"""

from __future__ import annotations

import asyncio
import errno
import itertools
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass

from tvix.castore.blobservice.base import BlobService
from tvix.castore.directoryservice.base import DirectoryService
from tvix.castore.errors import IntegrityError, StorageError
from tvix.castore.nodes import DirectoryNode, FileNode, Node, SymlinkNode
from tvix.fs.inodes import ROOT_INODE, Attr, EntryStat, Inode, InodeTable, node_stat
from tvix.fs.listings import Listing, ListingCache
from tvix.fs.requests import DirHandle, FileHandle, FsOptions, fuse_error, request_handler
from tvix.nixcompat.errors import NixCompatError
from tvix.nixcompat.storepath import StorePath
from tvix.store.errors import ListNotSupportedError
from tvix.store.pathinfoservice.base import PathInfoService

__all__ = [
    "BLKSIZE",
    "FRSIZE",
    "MTIME_NS",
    "XATTR_BLOB_DIGEST",
    "XATTR_DIRECTORY_DIGEST",
    "Attr",
    "StoreFs",
    "StoreSize",
]

log = logging.getLogger("tvix.fs.filesystem")

XATTR_BLOB_DIGEST = b"user.tvix.castore.blob.digest"
XATTR_DIRECTORY_DIGEST = b"user.tvix.castore.directory.digest"

# Every timestamp, as Nix normalises them in /nix/store.
MTIME_NS = 1_000_000_000
# The I/O size stat() suggests: cat, cp and friends size their buffers by it,
# and every read request costs a round trip through userspace.
BLKSIZE = 1 << 20
# The unit of statfs's block counts (a sector, as st_blocks counts).
FRSIZE = 512


# Called for each directory entry a listing sends: name, inode number, what it
# shows (mode, size, blocks; the owner is the filesystem's uid and gid), the
# offset of the entry after it; False when the reply is full (the entry was not sent).
AddEntry = Callable[[bytes, int, EntryStat, int], bool]


@dataclass(frozen=True, slots=True)
class StoreSize:
    """What ``statfs`` reports: the NAR bytes of every store path, and how many there are."""

    nar_bytes: int
    store_paths: int

    @property
    def blocks(self) -> int:
        """``nar_bytes`` in :data:`FRSIZE` blocks, rounded up."""
        return -(-self.nar_bytes // FRSIZE)


class StoreFs:
    """The read-only filesystem over the three services (see the module docs).

    Every request method is a coroutine bounded by the request timeout; the
    methods wait on the services concurrently when the transport calls them
    concurrently.
    """

    def __init__(
        self,
        blobs: BlobService,
        directories: DirectoryService,
        path_infos: PathInfoService,
        options: FsOptions | None = None,
    ) -> None:
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
        # The owner of every entry: the serving process's.
        self.uid = os.getuid()
        self.gid = os.getgid()
        self._size: StoreSize | None = None
        self._size_at = 0.0  # time.monotonic() of the count
        self._counting: asyncio.Task[StoreSize] | None = None

    async def close(self) -> None:
        """Close the readers of files still open, forget every handle (the client is gone)."""
        handles, self._files = list(self._files.values()), {}
        self._dirs = {}
        counting, self._counting = self._counting, None
        if counting is not None:
            counting.cancel()
            await asyncio.gather(counting, return_exceptions=True)
        for handle in handles:
            await _close_reader(handle)

    # -- attributes ----------------------------------------------------------------------

    def attrs(self, inode: Inode) -> Attr:
        """The attributes of ``inode`` (built once: they never change)."""
        attrs = inode.attrs
        if attrs is None:
            mode, size, blocks = node_stat(inode.node)
            attrs = inode.attrs = Attr(inode.ino, mode, size, blocks, self.uid, self.gid)
        return attrs

    def inode(self, ino: int) -> Inode:
        """The live inode ``ino``; ``ENOENT`` if the client cannot know it."""
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

    async def _listing(self, inode: Inode) -> Listing:
        node = inode.node
        if not isinstance(node, DirectoryNode):
            raise fuse_error(errno.ENOTDIR)
        return await self.listings.get(node.digest)

    @request_handler
    async def lookup(self, parent_ino: int, name: bytes) -> Attr | None:
        """Look ``name`` up in ``parent_ino`` and count the lookup.

        ``None``: not there, and never will be (the client may cache the miss);
        a miss that may change (at the root) is ``ENOENT``.
        """
        parent = self.inode(parent_ino)
        if name == b".":
            found = parent
        elif name == b"..":
            found = self.inode(parent.parent)
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
                return None  # immutable: the kernel may remember the miss
            found = self.inodes.entry(parent, name, child)
        self.inodes.remember(found)
        return self.attrs(found)

    def forget(self, ino: int, nlookup: int) -> None:
        """The client dropped ``nlookup`` references to ``ino`` (never fails)."""
        self.inodes.forget(ino, nlookup)

    @request_handler
    async def getattr(self, ino: int) -> Attr:
        """The attributes of ``ino``."""
        return self.attrs(self.inode(ino))

    @request_handler
    async def readlink(self, ino: int) -> bytes:
        """The target of symlink ``ino`` (``EINVAL`` for anything else)."""
        node = self.inode(ino).node
        if not isinstance(node, SymlinkNode):
            raise fuse_error(errno.EINVAL)
        return node.target

    # -- directories ---------------------------------------------------------------------

    @request_handler
    async def opendir(self, ino: int) -> int:
        """Open directory ``ino``: a handle for :meth:`readdir`."""
        entry = self.inode(ino)
        if entry.node is not None and not isinstance(entry.node, DirectoryNode):
            raise fuse_error(errno.ENOTDIR)
        fh = next(self._handles)
        self._dirs[fh] = DirHandle(entry)
        return fh

    def _prefetch_next(self, inode: Inode, listing: Listing) -> None:
        """Fetch the listing a walk in name order reads after this one, in the background.

        A walk (``find``, ``du``, ``ls -R``, ``tar``) reads a directory, then
        opens its first subdirectory or, without one, the next directory beside
        it. The fetch starts once this reply is on its way (the task runs
        after this request's), so it is decoded while the kernel and the
        walker take in this listing, not while this one is still being
        served, when both would wait for each other (one interpreter lock).
        """
        following = listing.directories[0] if listing.directories else None
        if following is None:
            parent = self.inodes.get(inode.parent)
            node = None if parent is None else parent.node
            if isinstance(node, DirectoryNode):
                siblings = self.listings.cached(node.digest)
                if siblings is not None:
                    following = siblings.next_directory(inode.name)
        if following is not None:
            self.listings.prefetch(following.digest)

    async def _root_listing(self) -> Listing:
        if not self.options.list_root:
            raise fuse_error(errno.EPERM)
        try:
            nodes = [info.node async for info in self.path_infos.list()]
        except ListNotSupportedError:
            raise fuse_error(errno.EPERM) from None
        nodes.sort(key=lambda n: n.name)
        return Listing(tuple(nodes))

    @request_handler
    async def readdir(self, fh: int, start: int, add: AddEntry, *, plus: bool = True) -> None:
        """List directory handle ``fh`` from offset ``start`` through ``add`` until it is full.

        Offsets: 1 after ".", 2 after "..", i + 3 after entry i. With ``plus``
        (READDIRPLUS, what the kernel does here) every entry sent but "." and
        ".." counts as a lookup of it.
        """
        handle = self._dirs.get(fh)
        if handle is None:
            raise fuse_error(errno.EBADF)
        inode = handle.inode
        if inode.ino == ROOT_INODE:
            # One listing per open: offsets into it stay valid while paths are added.
            if handle.root_listing is None:
                handle.root_listing = await self._root_listing()
            listing = handle.root_listing
        else:
            listing = await self._listing(inode)
            if start == 0:
                self._prefetch_next(inode, listing)
        if start == 0:
            if not add(b".", inode.ino, node_stat(inode.node), 1):
                return
            start = 1
        if start == 1:
            parent = self.inodes.get(inode.parent) or inode
            if not add(b"..", parent.ino, node_stat(parent.node), 2):
                return
            start = 2
        table = self.inodes
        entry = table.entry
        entries, stats = listing.entries, listing.stats
        for index in range(start - 2, len(entries)):
            node = entries[index]
            name = node.name
            child = entry(inode, name, node)
            if not add(name, child.ino, stats[index], index + 3):
                table.discard(child)  # not sent: the kernel does not know it
                return
            if plus:
                child.nlookup += 1
            else:
                table.discard(child)

    @request_handler
    async def releasedir(self, fh: int) -> None:
        """Close directory handle ``fh``."""
        self._dirs.pop(fh, None)

    # -- files ---------------------------------------------------------------------------

    @request_handler
    async def open(self, ino: int, flags: int) -> int:
        """Open file ``ino`` for reading (``EROFS`` for writing): a handle for :meth:`read`."""
        if flags & os.O_ACCMODE != os.O_RDONLY:
            raise fuse_error(errno.EROFS)
        node = self.inode(ino).node
        if not isinstance(node, FileNode):
            raise fuse_error(errno.EISDIR if node is None else errno.EINVAL)
        fh = next(self._handles)
        self._files[fh] = FileHandle(node)
        return fh

    @request_handler
    async def read(self, fh: int, off: int, size: int) -> bytes | bytearray:
        """Up to ``size`` bytes of open file ``fh`` at ``off`` (short only at its end)."""
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

    async def _read_at(self, handle: FileHandle, off: int, want: int) -> bytearray:
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
        # One buffer the reader fills, chunk after chunk: the bytes are copied once.
        out = bytearray(want)
        view = memoryview(out)
        got = 0
        while got < want:
            n = await reader.readinto(view[got:])
            if not n:
                raise IntegrityError(
                    f"blob {handle.node.digest} ends at {off + got}, before the "
                    f"{handle.node.size} bytes its node states"
                )
            got += n
        return out

    @request_handler
    async def release(self, fh: int) -> None:
        """Close file handle ``fh``."""
        handle = self._files.pop(fh, None)
        if handle is not None:
            await _close_reader(handle)

    # -- extended attributes -------------------------------------------------------------

    @request_handler
    async def getxattr(self, ino: int, name: bytes) -> bytes:
        """The value of extended attribute ``name`` of ``ino`` (``ENODATA`` if absent)."""
        if not self.options.show_xattr:
            raise fuse_error(errno.ENOSYS)  # the kernel then reports EOPNOTSUPP for good
        node = self.inode(ino).node
        if name == XATTR_BLOB_DIGEST and isinstance(node, FileNode):
            return str(node.digest).encode()
        if name == XATTR_DIRECTORY_DIGEST and isinstance(node, DirectoryNode):
            return str(node.digest).encode()
        raise fuse_error(errno.ENODATA)

    @request_handler
    async def listxattr(self, ino: int) -> list[bytes]:
        """The names of the extended attributes of ``ino``."""
        if not self.options.show_xattr:
            raise fuse_error(errno.ENOSYS)
        node = self.inode(ino).node
        if isinstance(node, FileNode):
            return [XATTR_BLOB_DIGEST]
        if isinstance(node, DirectoryNode):
            return [XATTR_DIRECTORY_DIGEST]
        return []

    # -- the filesystem ------------------------------------------------------------------

    @request_handler
    async def statfs(self) -> StoreSize:
        """The store's size (see the module docs), counted at most every ``statfs_interval`` s."""
        if not self.path_infos.supports_list:
            return StoreSize(0, 0)
        size = self._size
        stale = size is None or time.monotonic() - self._size_at > self.options.statfs_interval
        if stale and self._counting is None:
            self._counting = asyncio.create_task(self._count_size())
            self._counting.add_done_callback(self._counted)
        if size is not None:
            return size
        assert self._counting is not None
        # Shielded: a first statfs that gives up does not cancel the count.
        return await asyncio.shield(self._counting)

    async def _count_size(self) -> StoreSize:
        nar_bytes = store_paths = 0
        async for info in self.path_infos.list():
            nar_bytes += info.nar_size
            store_paths += 1
        return StoreSize(nar_bytes, store_paths)

    def _counted(self, task: asyncio.Task[StoreSize]) -> None:
        if self._counting is task:
            self._counting = None
        if task.cancelled():
            return
        error = task.exception()
        if error is not None:
            # The last count stays; the next statfs tries again.
            log.error("statfs: counting the store paths failed: %s", error)
            return
        self._size, self._size_at = task.result(), time.monotonic()


async def _close_reader(handle: FileHandle) -> None:
    reader, handle.reader = handle.reader, None
    if reader is not None:
        try:
            await reader.close()
        except Exception:  # closing must not turn a good read into a failure
            log.debug("closing a blob reader failed", exc_info=True)
