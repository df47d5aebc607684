"""The filesystem served in a thread of the test process, so its insides can be checked.

Still a real kernel mount: every request comes from the kernel through /dev/fuse.
"""

from __future__ import annotations

import asyncio
import errno
import os
import stat
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any, ClassVar

import pytest

from tests.fs.mounting import InProcessMount
from tests.support.trees import make_tree
from tvix.castore.blobservice import BlobReader, MemoryBlobService
from tvix.castore.digest import B3Digest
from tvix.castore.directory import Directory
from tvix.castore.directoryservice.memory import MemoryDirectoryService
from tvix.fs import FsOptions, StoreFs
from tvix.fs.core import AddEntry
from tvix.fs.inodes import ROOT_INODE, Attr, InodeTable, derived_inode
from tvix.store.importer import import_path
from tvix.store.pathinfoservice import from_url as path_info_service


class SlowBlobs(MemoryBlobService):
    """While ``together`` > 0, opens a blob only once ``together`` opens wait at the same
    time (a far-away store that answers nobody before everybody asked): requests served
    one after another never get there. Then every open is answered at once again."""

    together: ClassVar[int] = 0
    _waiting: ClassVar[int] = 0
    _all_there: ClassVar[asyncio.Event | None] = None

    async def open_read(self, digest: B3Digest) -> BlobReader | None:
        if SlowBlobs.together:
            if SlowBlobs._all_there is None:
                SlowBlobs._all_there = asyncio.Event()  # in the serving loop
            SlowBlobs._waiting += 1
            if SlowBlobs._waiting >= SlowBlobs.together:
                SlowBlobs._all_there.set()
            await SlowBlobs._all_there.wait()
        return await super().open_read(digest)

    @classmethod
    def reset(cls, together: int = 0) -> None:
        cls.together, cls._waiting, cls._all_there = together, 0, None


class HangingDirectories(MemoryDirectoryService):
    """Never answers for the Directories in ``hang`` (a remote that went silent)."""

    hang: ClassVar[set[B3Digest]] = set()

    async def get(self, digest: B3Digest) -> Directory | None:
        if digest in self.hang:
            await asyncio.Event().wait()
        return await super().get(digest)


def serve_tree(
    tree: Path,
    mountpoint: Path,
    options: FsOptions | None = None,
    fs_class: type[StoreFs] = StoreFs,
) -> tuple[InProcessMount, dict[str, str]]:
    """Serve ``tree``, imported into in-memory services, at ``mountpoint``."""
    names: dict[str, str] = {}

    async def build() -> StoreFs:
        blobs = SlowBlobs()
        directories = HangingDirectories()
        path_infos = path_info_service("memory://")
        info = await import_path(blobs, directories, path_infos, tree)
        names["tree"] = info.store_path.base_name
        return fs_class(blobs, directories, path_infos, options)

    return InProcessMount(build, mountpoint), names


def lstat_all(root: Path) -> dict[bytes, int]:
    """Inode numbers of ``root`` and everything below it."""
    out = {b".": os.lstat(root).st_ino}
    broot = os.fsencode(root)
    for dirpath, dirnames, filenames in os.walk(broot):
        for name in dirnames + filenames:
            path = os.path.join(dirpath, name)
            out[os.path.relpath(path, broot)] = os.lstat(path).st_ino
    return out


class CountingFs(StoreFs):
    """Counts the requests that reach the filesystem (the kernel did not answer itself)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.calls: Counter[str] = Counter()

    async def lookup(self, parent_ino: int, name: bytes) -> Attr | None:
        self.calls["lookup"] += 1
        return await super().lookup(parent_ino, name)

    async def getattr(self, ino: int) -> Attr:
        self.calls["getattr"] += 1
        return await super().getattr(ino)

    async def readdir(self, fh: int, start: int, add: AddEntry, *, plus: bool = True) -> None:
        self.calls["readdir"] += 1
        await super().readdir(fh, start, add, plus=plus)

    async def read(self, fh: int, off: int, size: int) -> bytes | bytearray:
        self.calls["read"] += 1
        return await super().read(fh, off, size)


def walk_and_read(root: Path) -> dict[bytes, tuple[int, int, bytes]]:
    """Mode, size and contents (of files) of everything below ``root``."""
    out = {}
    broot = os.fsencode(root)
    for dirpath, dirnames, filenames in os.walk(broot):
        for name in dirnames + filenames:
            path = os.path.join(dirpath, name)
            st = os.lstat(path)
            data = b""
            if stat.S_ISREG(st.st_mode):
                with open(path, "rb") as f:
                    data = f.read()
            out[os.path.relpath(path, broot)] = (st.st_mode, st.st_size, data)
    return out


@pytest.mark.e2e
def test_the_kernel_keeps_entries_attributes_listings_and_pages(tmp_path: Path) -> None:
    """A second walk and read of a store path is answered by the kernel's caches."""
    tree = make_tree(tmp_path / "tree", big_size=300_000)
    mount, names = serve_tree(tree, tmp_path / "mnt", fs_class=CountingFs)
    with mount:
        fs = mount.fs
        assert isinstance(fs, CountingFs)
        root = mount.mountpoint / names["tree"]
        first = walk_and_read(root)
        assert first[b"big.bin"][2] == (tree / "big.bin").read_bytes()
        assert fs.calls["readdir"]
        assert fs.calls["read"]
        fs.calls.clear()
        assert walk_and_read(root) == first
        # No lookups, attributes, listings or pages asked for again: only the
        # opens and closes (OPEN, OPENDIR, RELEASE...) still reach us.
        assert +fs.calls == Counter(), fs.calls


def test_inode_table_counts_lookups() -> None:
    from tvix.castore.nodes import FileNode

    table = InodeTable()
    node = FileNode(b"f", B3Digest(bytes(32)), 1)
    a = table.entry(table.root, b"f", node)
    assert a.ino == derived_inode(ROOT_INODE, b"f")
    table.remember(a)
    table.remember(table.entry(table.root, b"f", node))
    assert len(table) == 2
    table.forget(a.ino, 1)
    assert table.get(a.ino) is a
    table.forget(a.ino, 1)
    assert table.get(a.ino) is None
    assert len(table) == 1
    # Forgotten and looked up again: the same number.
    assert table.entry(table.root, b"f", node).ino == a.ino
    # Another node under the same name (a store path put again with other
    # contents) while the old one is known: a different inode.
    table.remember(table.entry(table.root, b"f", node))
    other = table.entry(table.root, b"f", FileNode(b"f", B3Digest(bytes(32)), 2))
    assert other.ino != a.ino
    table.discard(other)
    assert table.get(other.ino) is None
    table.forget(ROOT_INODE, 10)
    assert table.get(ROOT_INODE) is table.root


@pytest.mark.e2e
def test_forget_releases_inodes_and_numbers_stay(tmp_path: Path) -> None:
    drop_caches = Path("/proc/sys/vm/drop_caches")
    if not os.access(drop_caches, os.W_OK):
        pytest.skip("cannot write /proc/sys/vm/drop_caches to make the kernel forget inodes")
    tree = make_tree(tmp_path / "tree", big_size=1000)
    for i in range(200):
        (tree / "nested" / f"extra-{i}").write_bytes(b"x" * i)
    mount, names = serve_tree(tree, tmp_path / "mnt")
    with mount:
        assert mount.fs is not None
        root = tmp_path / "mnt" / names["tree"]
        before = lstat_all(root)
        assert len(mount.fs.inodes) > len(before)  # every entry, plus the root
        # Dentries and inodes dropped: the kernel forgets them and so must we. Its
        # FORGETs arrive asynchronously (and a parent only after its children), so
        # wait for the table to shrink to the root: an event set by the table itself,
        # in the serving thread, dropping caches again while it has not happened.
        table = mount.fs.inodes
        only_root = threading.Event()
        forget = table.forget

        def forget_and_tell(ino: int, nlookup: int) -> None:
            forget(ino, nlookup)
            if len(table) == 1:
                only_root.set()

        table.forget = forget_and_tell  # type: ignore[method-assign]
        for _ in range(100):
            drop_caches.write_text("2")
            if only_root.wait(0.1):
                break
        assert len(mount.fs.inodes) == 1  # only the root is left
        # Looked up afresh, every entry gets the number it had.
        assert lstat_all(root) == before


@pytest.mark.e2e
def test_a_hanging_service_fails_the_request_not_the_mount(tmp_path: Path) -> None:
    tree = make_tree(tmp_path / "tree", big_size=1000)
    mount, names = serve_tree(tree, tmp_path / "mnt", FsOptions(request_timeout=1.0))
    with mount:
        assert mount.fs is not None
        store_root = tmp_path / "mnt" / names["tree"]
        hang_on = os.getxattr(store_root / "nested", "user.tvix.castore.directory.digest")
        HangingDirectories.hang = {B3Digest.from_str(hang_on.decode())}
        try:
            start = time.monotonic()
            with pytest.raises(OSError, match="Input/output error") as e:
                os.listdir(store_root / "nested")
            assert e.value.errno == errno.EIO
            assert time.monotonic() - start < 10
        finally:
            HangingDirectories.hang = set()
        assert (store_root / "regular.txt").read_bytes() == b"hello\n"


@pytest.mark.e2e
def test_slow_requests_are_served_concurrently(tmp_path: Path) -> None:
    tree = tmp_path / "tree"
    tree.mkdir()
    for i in range(8):
        (tree / f"f{i}").write_bytes(f"file {i}".encode())
    mount, names = serve_tree(tree, tmp_path / "mnt")
    with mount:
        store_root = tmp_path / "mnt" / names["tree"]
        for i in range(8):
            os.stat(store_root / f"f{i}")  # names resolved; only the opens are slow
        SlowBlobs.reset(together=8)
        try:
            results: dict[int, bytes] = {}

            def read(i: int) -> None:
                results[i] = (store_root / f"f{i}").read_bytes()

            threads = [threading.Thread(target=read, args=(i,)) for i in range(8)]
            start = time.monotonic()
            for t in threads:
                t.start()
            for t in threads:
                t.join(30)
            elapsed = time.monotonic() - start
        finally:
            SlowBlobs.reset()
        # Eight opens were waiting at once (or none would have been answered)...
        assert results == {i: f"file {i}".encode() for i in range(8)}
        # ...and nothing waited for a timeout.
        assert elapsed < 4, elapsed
