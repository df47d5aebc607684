"""``tvix-store mount`` in a separate process, checked through a real kernel FUSE mount."""

from __future__ import annotations

import asyncio
import errno
import os
import random
import re
import signal
import stat
import subprocess
import sys
import threading
from collections.abc import Callable
from pathlib import Path

import blake3
import pytest

from tests.fs.mounting import (
    Imported,
    MountProcess,
    Store,
    cli_env,
    import_paths,
    is_mounted,
    mount_options,
    mounted,
    tvix_store,
)
from tvix.castore.digest import B3Digest
from tvix.castore.nodes import DirectoryNode, FileNode, Node, SymlinkNode
from tvix.nixcompat.storepath import StorePath
from tvix.store.composition import Composition

pytestmark = pytest.mark.e2e

BLOB_XATTR = "user.tvix.castore.blob.digest"
DIRECTORY_XATTR = "user.tvix.castore.directory.digest"


def errno_of(call: Callable[[], object]) -> int:
    """The errno ``call`` fails with (it must fail with an OSError)."""
    try:
        call()
    except OSError as e:
        return e.errno
    raise AssertionError("no error")


def walk(root: bytes) -> list[bytes]:
    """Every path below ``root`` (bytes: names need not be UTF-8), relative, sorted."""
    out = []
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            out.append(os.path.relpath(os.path.join(dirpath, name), root))
    return sorted(out)


def test_tree_reads_back_as_imported(imported: Imported, listed: MountProcess) -> None:
    mounted_tree = listed.mountpoint / imported.tree_name
    # Contents, symlink targets (not followed), directory structure, odd names.
    diff = subprocess.run(
        ["diff", "-r", "--no-dereference", str(imported.tree), str(mounted_tree)],
        capture_output=True,
    )
    assert diff.returncode == 0, diff.stdout.decode(errors="replace")
    assert walk(os.fsencode(mounted_tree)) == walk(os.fsencode(imported.tree))
    assert b"\xff\xfe-latin1-\xe9" in os.listdir(os.fsencode(mounted_tree))


def test_attributes(imported: Imported, listed: MountProcess) -> None:
    mounted_tree = os.fsencode(listed.mountpoint / imported.tree_name)
    original = os.fsencode(imported.tree)
    inodes = {}
    for rel in [b".", *walk(original)]:
        want = os.lstat(os.path.join(original, rel))
        got = os.lstat(os.path.join(mounted_tree, rel))
        perm = stat.S_IMODE(got.st_mode)
        assert stat.S_IFMT(got.st_mode) == stat.S_IFMT(want.st_mode), rel
        if stat.S_ISDIR(want.st_mode):
            assert perm == 0o555, rel
        elif stat.S_ISREG(want.st_mode):
            # Executable as Nix has it: when the owner could execute the original.
            assert perm == (0o555 if want.st_mode & stat.S_IXUSR else 0o444), rel
            assert got.st_size == want.st_size, rel
            assert got.st_blocks * 512 >= got.st_size, rel
        else:
            assert perm == 0o777, rel
            target = os.readlink(os.path.join(original, rel))
            assert os.readlink(os.path.join(mounted_tree, rel)) == target, rel
            assert got.st_size == len(target), rel
        assert got.st_nlink == 1, rel
        inodes[rel] = got.st_ino
    # Every entry its own inode, none the root's, and the same one when asked again.
    assert len(set(inodes.values())) == len(inodes)
    assert 1 not in inodes.values()
    for rel, ino in inodes.items():
        assert os.lstat(os.path.join(mounted_tree, rel)).st_ino == ino


async def _store_nodes(imported: Imported, mountpoint: Path) -> list[tuple[bytes, Node]]:
    """Every node of the imported tree as the store records it, with its mounted path."""
    composition = Composition.from_urls(*imported.store.urls)
    async with composition:
        _blobs, directories, path_infos = composition.build_all()
        info = await path_infos.get(StorePath.from_base_name(imported.tree_name).digest)
        assert info is not None
        out: list[tuple[bytes, Node]] = []
        todo = [(os.fsencode(mountpoint / imported.tree_name), info.node)]
        while todo:
            path, node = todo.pop()
            out.append((path, node))
            if isinstance(node, DirectoryNode):
                directory = await directories.get(node.digest)
                assert directory is not None
                todo.extend((os.path.join(path, child.name), child) for child in directory.nodes())
        return out


def test_xattrs_are_the_digests(imported: Imported, listed: MountProcess) -> None:
    # The store's own records, walked next to the mount, compared at every node.
    nodes = asyncio.run(_store_nodes(imported, listed.mountpoint))
    assert len(nodes) == len(walk(os.fsencode(imported.tree))) + 1
    for path, node in nodes:
        if isinstance(node, DirectoryNode):
            assert os.getxattr(path, DIRECTORY_XATTR) == str(node.digest).encode()
            assert os.listxattr(path) == [DIRECTORY_XATTR]
            assert errno_of(lambda p=path: os.getxattr(p, BLOB_XATTR)) == errno.ENODATA
        elif isinstance(node, FileNode):
            value = os.getxattr(path, BLOB_XATTR)
            assert value == str(node.digest).encode()
            with open(path, "rb") as f:
                assert B3Digest.from_str(value.decode()) == blake3.blake3(f.read()).digest()
            assert os.listxattr(path) == [BLOB_XATTR]
        else:
            assert isinstance(node, SymlinkNode)
            assert os.listxattr(path, follow_symlinks=False) == []
    # The root itself is no directory of the store: it has no digest.
    assert os.listxattr(listed.mountpoint) == []


def test_no_show_xattr(imported: Imported, unlisted: MountProcess) -> None:
    path = unlisted.mountpoint / imported.tree_name / "regular.txt"
    assert path.read_bytes() == b"hello\n"
    assert errno_of(lambda: os.getxattr(path, BLOB_XATTR)) == errno.EOPNOTSUPP
    assert errno_of(lambda: os.listxattr(path)) == errno.EOPNOTSUPP


def _chunk_boundaries(imported: Imported) -> list[int]:
    # The boundaries as the blob service stored them, read off its own record.
    async def boundaries() -> list[int]:
        composition = Composition.from_urls(*imported.store.urls)
        async with composition:
            blobs, _directories, path_infos = composition.build_all()
            info = await path_infos.get(StorePath.from_base_name(imported.big_name).digest)
            assert info is not None
            assert isinstance(info.node, FileNode)
            chunks = await blobs.chunks(info.node.digest)
            assert chunks is not None
            assert len(chunks) > 10
            out, offset = [], 0
            for c in chunks[:-1]:
                offset += c.size
                out.append(offset)
            return out

    return asyncio.run(boundaries())


def test_reads_at_odd_offsets_across_chunk_boundaries(
    imported: Imported, listed: MountProcess
) -> None:
    want = imported.big.read_bytes()
    path = listed.mountpoint / imported.big_name
    boundaries = _chunk_boundaries(imported)
    rng = random.Random(7)
    reads = [(b - 3, 7) for b in boundaries]  # straddling each boundary
    reads += [(b - 100, boundaries[i + 1] - b + 200) for i, b in enumerate(boundaries[:-1])]
    reads += [(rng.randrange(len(want)), rng.randrange(1, 300_000)) for _ in range(40)]
    reads += [(len(want) - 5, 100), (len(want), 10), (len(want) + 4096, 10), (0, 1)]
    # O_DIRECT: each read reaches the filesystem at exactly its offset and size,
    # instead of as page-aligned readahead.
    for flags in (os.O_RDONLY | os.O_DIRECT, os.O_RDONLY):
        fd = os.open(path, flags)
        try:
            for offset, size in reads:
                assert os.pread(fd, size, offset) == want[offset : offset + size], (offset, size)
        finally:
            os.close(fd)
    # Seeks back and forth, then reads continuing from where the last one ended.
    with open(path, "rb", buffering=0) as f:
        for offset in (boundaries[5] - 1, 17, boundaries[2] + 4095, len(want) - 10):
            f.seek(offset)
            assert f.read(5000) + f.read(70_000) == want[offset : offset + 75_000]


def test_parallel_readers(imported: Imported, listed: MountProcess) -> None:
    want = imported.big.read_bytes()
    path = listed.mountpoint / imported.big_name
    failures: list[str] = []

    def reader(seed: int) -> None:
        rng = random.Random(seed)
        try:
            fd = os.open(path, os.O_RDONLY | os.O_DIRECT)
            try:
                if seed % 4 == 0:  # some read front to back
                    got, offset = [], 0
                    while data := os.pread(fd, 1 << 20, offset):
                        got.append(data)
                        offset += len(data)
                    if b"".join(got) != want:
                        failures.append(f"reader {seed}: whole file differs")
                for _ in range(30):
                    offset, size = rng.randrange(len(want)), rng.randrange(1, 1 << 20)
                    if os.pread(fd, size, offset) != want[offset : offset + size]:
                        failures.append(f"reader {seed}: {size} bytes at {offset} differ")
            finally:
                os.close(fd)
        except OSError as e:
            failures.append(f"reader {seed}: {e}")

    threads = [threading.Thread(target=reader, args=(i,)) for i in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not any(t.is_alive() for t in threads)
    assert failures == []


def test_small_read_fetches_about_one_chunk(imported: Imported, listed: MountProcess) -> None:
    path = listed.mountpoint / imported.big_name
    size = imported.big.stat().st_size
    fd = os.open(path, os.O_RDONLY | os.O_DIRECT)
    try:
        before = listed.rchar()
        offset = size // 2 + 12345
        assert os.pread(fd, 4096, offset) == imported.big.read_bytes()[offset : offset + 4096]
        fetched = listed.rchar() - before
    finally:
        os.close(fd)
    # The chunk (at most 512 KiB) or two holding the range, and the blob's chunk
    # list: a small part of the 24 MiB.
    assert 4096 <= fetched <= 1_200_000, fetched


def test_missing_names_are_enoent(imported: Imported, listed: MountProcess) -> None:
    root = listed.mountpoint
    hash_part = imported.tree_name.split("-", 1)[0]
    missing = [
        "00000000000000000000000000000000-nope",  # a store path that is not stored
        f"{hash_part}-wrong-name",  # a stored hash under another name
        f"{hash_part}",
        "not-a-store-path",
        f"{imported.tree_name}/nested/no-such-file",
        f"{imported.tree_name}/regular.txt/below-a-file",
    ]
    for name in missing:
        expected = errno.ENOTDIR if "below-a-file" in name else errno.ENOENT
        assert errno_of(lambda n=name: os.stat(root / n)) == expected, name
    assert (root / imported.tree_name).is_dir()


def test_root_listing(imported: Imported, listed: MountProcess, unlisted: MountProcess) -> None:
    assert sorted(os.listdir(listed.mountpoint)) == sorted([imported.tree_name, imported.big_name])
    with pytest.raises(PermissionError) as e:
        os.listdir(unlisted.mountpoint)
    assert e.value.errno == errno.EPERM
    # Unlisted, the root still opens (as a directory fd) and names in it resolve.
    fd = os.open(unlisted.mountpoint, os.O_RDONLY | os.O_DIRECTORY)
    try:
        assert stat.S_ISDIR(os.stat(imported.tree_name, dir_fd=fd).st_mode)
    finally:
        os.close(fd)
    assert (unlisted.mountpoint / imported.tree_name / "regular.txt").read_bytes() == b"hello\n"


def _info_figure(info: str, label: str) -> int:
    """The number ``tvix-store info`` prints after ``label``."""
    found = re.search(rf"^{label}: +([\d,]+)", info, re.MULTILINE)
    assert found is not None, info
    return int(found[1].replace(",", ""))


def test_df_tells_the_store_size(imported: Imported, listed: MountProcess) -> None:
    info = tvix_store("info", *imported.store.args)
    nar_bytes = _info_figure(info, "NAR bytes")
    store_paths = _info_figure(info, "store paths")
    assert store_paths == 2
    st = os.statvfs(listed.mountpoint)
    assert st.f_frsize == 512
    assert st.f_blocks == -(-nar_bytes // 512)
    assert st.f_files == store_paths
    assert (st.f_bfree, st.f_bavail, st.f_ffree) == (0, 0, 0)
    # df itself: size and used the same (in 512-byte blocks), nothing available.
    out = subprocess.run(
        ["df", "-B512", "--output=size,used,avail", str(listed.mountpoint)],
        check=True,
        capture_output=True,
        text=True,
    ).stdout.split()
    assert out[-3:] == [str(st.f_blocks), str(st.f_blocks), "0"]


def test_read_only(imported: Imported, listed: MountProcess) -> None:
    assert "ro" in mount_options(listed.mountpoint)
    tree = listed.mountpoint / imported.tree_name
    attempts = {
        "open for writing": lambda: os.open(tree / "regular.txt", os.O_RDWR),
        "create": lambda: os.open(tree / "new-file", os.O_WRONLY | os.O_CREAT),
        "create at the root": lambda: os.open(listed.mountpoint / "new", os.O_WRONLY | os.O_CREAT),
        "mkdir": lambda: os.mkdir(tree / "new-dir"),
        "unlink": lambda: os.unlink(tree / "regular.txt"),
        "rmdir": lambda: os.rmdir(tree / "emptydir"),
        "rename": lambda: os.rename(tree / "regular.txt", tree / "renamed"),
        "symlink": lambda: os.symlink("x", tree / "new-link"),
        "chmod": lambda: os.chmod(tree / "regular.txt", 0o644),
        "truncate": lambda: os.truncate(tree / "regular.txt", 0),
        "setxattr": lambda: os.setxattr(tree / "regular.txt", "user.x", b"1"),
    }
    for what, attempt in attempts.items():
        assert errno_of(attempt) == errno.EROFS, what
    assert (tree / "regular.txt").read_bytes() == b"hello\n"


def test_failures_are_eio_and_the_mount_survives(tmp_path: Path) -> None:
    store = Store(tmp_path / "store")
    src = tmp_path / "src"
    src.mkdir()
    (src / "gone").write_bytes(b"this blob will be deleted")
    (src / "kept").write_bytes(b"this one stays")
    (name,) = import_paths(store, src)
    digest = blake3.blake3(b"this blob will be deleted").hexdigest()
    (store.root / "blobs" / "chunks" / "b3" / digest[:4] / digest).unlink()
    with mounted(store, tmp_path / "mnt") as m:
        assert errno_of((m.mountpoint / name / "gone").read_bytes) == errno.EIO
        # Listing and metadata do not need the blob; the other file still reads.
        assert (m.mountpoint / name / "gone").stat().st_size == 25
        assert (m.mountpoint / name / "kept").read_bytes() == b"this one stays"
        assert m.proc.poll() is None
    assert "missing" in m.stderr


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_signal_unmounts(imported: Imported, tmp_path: Path, sig: signal.Signals) -> None:
    mountpoint = tmp_path / "mnt"
    with mounted(imported.store, mountpoint) as m:
        assert (mountpoint / imported.tree_name / "regular.txt").read_bytes() == b"hello\n"
        m.proc.send_signal(sig)
        assert m.proc.wait(15) == 0, m.stderr
        assert not is_mounted(mountpoint)
    assert "mounted at" in m.stderr
    assert os.listdir(mountpoint) == []  # the empty directory below, nothing left


def test_bad_mountpoint(imported: Imported, tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "tvix.cli.store", "mount", *imported.store.args, tmp_path / "nope"],
        capture_output=True,
        env=cli_env(),
        timeout=60,
    )
    assert proc.returncode == 1
    assert "does not exist (create the directory)" in proc.stderr.decode()
    (tmp_path / "file").write_text("x")
    proc = subprocess.run(
        [sys.executable, "-m", "tvix.cli.store", "mount", *imported.store.args, tmp_path / "file"],
        capture_output=True,
        env=cli_env(),
        timeout=60,
    )
    assert proc.returncode == 1
    assert "not a directory" in proc.stderr.decode()
