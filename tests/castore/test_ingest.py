"""Filesystem ingestion into the memory services."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest

from tvix.castore import B3Digest, Directory, DirectoryNode, FileNode, SymlinkNode
from tvix.castore.blobservice import MemoryBlobService, read_all
from tvix.castore.directoryservice import MemoryDirectoryService
from tvix.castore.ingest import IngestError, ingest_path
from tvix.castore.testing.fixtures import b3, big_blob

NON_UTF8 = b"\xff\xfe-name\xe9"


def make_tree(root: Path) -> dict[str, bytes]:
    """A tree with every kind of entry; returns the file contents by relative path."""
    root.mkdir()
    (root / "regular.txt").write_bytes(b"hello\n")
    (root / "exec.sh").write_bytes(b"#!/bin/sh\necho hi\n")
    (root / "exec.sh").chmod(0o755)
    (root / "not-exec").write_bytes(b"x")
    (root / "not-exec").chmod(0o654)  # group/other x only: not executable for Nix
    (root / "empty").write_bytes(b"")
    (root / "emptydir").mkdir()
    (root / "a" / "b" / "c").mkdir(parents=True)
    (root / "a" / "b" / "c" / "deep.txt").write_bytes(b"deep")
    (root / "big.bin").write_bytes(big_blob(3 * 1024 * 1024 + 5))
    os.symlink("regular.txt", root / "link-rel")
    os.symlink("/nix/store/absolute-target", root / "link-abs")
    os.symlink("does/not/exist", root / "link-dangling")
    (root / os.fsdecode(NON_UTF8)).write_bytes(b"non-utf8")
    return {
        "regular.txt": b"hello\n",
        "a/b/c/deep.txt": b"deep",
        "big.bin": big_blob(3 * 1024 * 1024 + 5),
    }


@pytest.fixture
def services() -> tuple[MemoryBlobService, MemoryDirectoryService]:
    return MemoryBlobService(), MemoryDirectoryService()


async def _entries(dirs: MemoryDirectoryService, digest: B3Digest) -> dict[bytes, object]:
    d = await dirs.get(digest)
    assert d is not None
    return {n.name: n for n in d.nodes()}


async def test_tree(
    tmp_path: Path, services: tuple[MemoryBlobService, MemoryDirectoryService]
) -> None:
    blobs, dirs = services
    contents = make_tree(tmp_path / "tree")
    node = await ingest_path(blobs, dirs, tmp_path / "tree")
    assert isinstance(node, DirectoryNode)
    assert node.name == b"tree"
    top = await _entries(dirs, node.digest)
    assert top[b"regular.txt"] == FileNode(b"regular.txt", b3(b"hello\n"), 6, False)
    exec_node = top[b"exec.sh"]
    assert isinstance(exec_node, FileNode)
    assert exec_node.executable
    not_exec = top[b"not-exec"]
    assert isinstance(not_exec, FileNode)
    assert not not_exec.executable
    assert top[b"empty"] == FileNode(b"empty", b3(b""), 0, False)
    assert top[b"link-rel"] == SymlinkNode(b"link-rel", b"regular.txt")
    assert top[b"link-abs"] == SymlinkNode(b"link-abs", b"/nix/store/absolute-target")
    assert top[b"link-dangling"] == SymlinkNode(b"link-dangling", b"does/not/exist")
    assert top[NON_UTF8] == FileNode(NON_UTF8, b3(b"non-utf8"), 8, False)
    emptydir = top[b"emptydir"]
    assert emptydir == DirectoryNode(b"emptydir", Directory().digest, 0)
    big = top[b"big.bin"]
    assert isinstance(big, FileNode)
    assert await read_all(blobs, big.digest) == contents["big.bin"]
    # Every blob is stored and the closure is complete and sized right.
    walked = [d async for d in dirs.get_recursive(node.digest)]
    assert walked[0].digest == node.digest
    assert node.size == walked[0].size
    # a, b, c and emptydir below the root, plus the root.
    assert len(walked) == 5
    a = top[b"a"]
    assert isinstance(a, DirectoryNode)
    # a/b/c/deep.txt, sized as upstream does (2·entries + Σ): c 2, b 2 + 2, a 2 + 4.
    assert a.size == 6
    for d in walked:
        for f in d.files:
            assert await blobs.has(f.digest)


async def test_directory_size_counts_everything_below(
    tmp_path: Path, services: tuple[MemoryBlobService, MemoryDirectoryService]
) -> None:
    blobs, dirs = services
    (tmp_path / "t" / "x" / "y").mkdir(parents=True)
    (tmp_path / "t" / "x" / "y" / "f1").write_bytes(b"1")
    (tmp_path / "t" / "x" / "y" / "f2").write_bytes(b"2")
    (tmp_path / "t" / "x" / "g").write_bytes(b"3")
    node = await ingest_path(blobs, dirs, tmp_path / "t")
    assert isinstance(node, DirectoryNode)
    # t contains x; x contains y and g; y contains f1, f2: five entries below t,
    # each counted twice as upstream does (y: 4, x: 4 + 4, t: 2 + 8).
    assert node.size == 10


async def test_single_file_and_symlink(
    tmp_path: Path, services: tuple[MemoryBlobService, MemoryDirectoryService]
) -> None:
    blobs, dirs = services
    f = tmp_path / "file"
    f.write_bytes(b"content")
    f.chmod(0o700)
    assert await ingest_path(blobs, dirs, f) == FileNode(b"file", b3(b"content"), 7, True)
    os.symlink(f, tmp_path / "top-link")
    # A top-level symlink is kept, not followed.
    assert await ingest_path(blobs, dirs, tmp_path / "top-link") == SymlinkNode(
        b"top-link", os.fsencode(f)
    )
    assert await ingest_path(blobs, dirs, f, name=b"renamed") == FileNode(
        b"renamed", b3(b"content"), 7, True
    )


async def test_fifo_rejected_and_nothing_stored(
    tmp_path: Path, services: tuple[MemoryBlobService, MemoryDirectoryService]
) -> None:
    blobs, dirs = services
    root = tmp_path / "t"
    (root / "sub").mkdir(parents=True)
    (root / "ok").write_bytes(b"ok")
    os.mkfifo(root / "sub" / "pipe")
    with pytest.raises(IngestError, match=r"sub/pipe: unsupported file type \(FIFO\)"):
        await ingest_path(blobs, dirs, root)
    assert dirs._directories == {}


async def test_socket_rejected(
    tmp_path: Path, services: tuple[MemoryBlobService, MemoryDirectoryService]
) -> None:
    blobs, dirs = services
    root = tmp_path / "t"
    root.mkdir()
    sock = socket.socket(socket.AF_UNIX)
    try:
        sock.bind(str(root / "s"))
        with pytest.raises(IngestError, match=r"/t/s: unsupported file type \(socket\)"):
            await ingest_path(blobs, dirs, root)
    finally:
        sock.close()


async def test_missing_path(
    tmp_path: Path, services: tuple[MemoryBlobService, MemoryDirectoryService]
) -> None:
    blobs, dirs = services
    with pytest.raises(IngestError, match="nope"):
        await ingest_path(blobs, dirs, tmp_path / "nope")


async def test_many_files_batched(
    tmp_path: Path, services: tuple[MemoryBlobService, MemoryDirectoryService]
) -> None:
    blobs, dirs = services
    root = tmp_path / "many"
    root.mkdir()
    for i in range(1500):
        (root / f"f{i:04}").write_bytes(b"%d" % (i % 700))
    node = await ingest_path(blobs, dirs, root)
    assert isinstance(node, DirectoryNode)
    assert node.size == 2 * 1500
    assert len(blobs._blobs) == 700  # deduplicated
