"""Materialising store paths on disk: the library against memory services, the command
against the embedded store, judged by diff and by the real Nix."""

from __future__ import annotations

import hashlib
import os
import stat
import subprocess
from pathlib import Path

import pytest

from tests.support.daemons import EXTRACT, cli_env, diff, fake_store_path, relocated, tvix_store
from tests.support.nix import Nix
from tests.support.trees import make_tree
from tvix.castore.blobservice import BlobReader, MemoryBlobService
from tvix.castore.digest import B3Digest
from tvix.castore.directoryservice import MemoryDirectoryService
from tvix.castore.errors import IntegrityError, StorageError
from tvix.castore.nodes import FileNode, SymlinkNode
from tvix.store.extract import ExtractError, extract_node, extract_store_paths, path_info_closure
from tvix.store.importer import import_path
from tvix.store.nar import render_nar
from tvix.store.pathinfo import PathInfo
from tvix.store.pathinfoservice import MemoryPathInfoService
from tvix.store.resolve import NotFoundError


class Store:
    def __init__(self) -> None:
        self.blobs = MemoryBlobService()
        self.dirs = MemoryDirectoryService()
        self.infos = MemoryPathInfoService()

    async def add(self, path: Path) -> PathInfo:
        return await import_path(self.blobs, self.dirs, self.infos, path)


@pytest.fixture
def store() -> Store:
    return Store()


def _leftovers(parent: Path, name: str) -> list[str]:
    return [n for n in os.listdir(parent) if n.startswith(name)]


@pytest.mark.nix
async def test_tree_round_trip(store: Store, tmp_path: Path, nix: Nix) -> None:
    tree = make_tree(tmp_path / "tree", big_size=(3 << 20) + 5)  # streamed, not windowed
    info = await store.add(tree)
    dest = tmp_path / "out"
    stats = await extract_node(store.blobs, store.dirs, info.node, dest)
    diff(tree, dest)
    # Nix's judgement: the NAR of what was written is the one the PathInfo claims.
    assert hashlib.sha256(nix.dump(dest)).digest() == info.nar_sha256
    assert (stats.files, stats.symlinks, stats.directories) == (13, 3, 6)
    assert _leftovers(tmp_path, "out") == ["out"]
    # Modes as in a Nix store for files; directories stay owner-writable.
    assert stat.S_IMODE(os.lstat(dest / "exec.sh").st_mode) == 0o555
    assert stat.S_IMODE(os.lstat(dest / "regular.txt").st_mode) == 0o444
    assert stat.S_IMODE(os.lstat(dest / "mode-654").st_mode) == 0o444
    assert stat.S_IMODE(os.lstat(dest / "nested").st_mode) == 0o755
    assert os.readlink(dest / "abs-dangling") == "/nonexistent/target"


async def test_shared_contents_written_everywhere(store: Store, tmp_path: Path) -> None:
    tree = tmp_path / "tree"
    big = os.urandom((1 << 20) + 3)
    for d in ("a", "b", "a/c"):
        (tree / d).mkdir(parents=True)
        (tree / d / "small").write_bytes(b"same")
        (tree / d / "big").write_bytes(big)
    (tree / "b" / "big").chmod(0o755)
    info = await store.add(tree)
    await extract_node(store.blobs, store.dirs, info.node, tmp_path / "out")
    diff(tree, tmp_path / "out")
    assert os.access(tmp_path / "out" / "b" / "big", os.X_OK)
    assert not os.access(tmp_path / "out" / "a" / "big", os.X_OK)


@pytest.mark.parametrize("kind", ["file", "symlink"])
async def test_single_node_roots(store: Store, tmp_path: Path, kind: str) -> None:
    src = tmp_path / "src"
    if kind == "file":
        src.write_bytes(b"#!/bin/sh\n")
        src.chmod(0o755)
    else:
        src.symlink_to("../some/where")
    info = await store.add(src)
    dest = tmp_path / "dest"
    await extract_node(store.blobs, store.dirs, info.node, dest)
    if kind == "file":
        assert dest.read_bytes() == b"#!/bin/sh\n"
        assert stat.S_IMODE(os.lstat(dest).st_mode) == 0o555
    else:
        assert os.readlink(dest) == "../some/where"
    assert sorted(os.listdir(tmp_path)) == ["dest", "src"]


@pytest.mark.parametrize("existing", ["dir", "file", "dangling-symlink"])
async def test_existing_destination_refused(store: Store, tmp_path: Path, existing: str) -> None:
    info = await store.add(make_tree(tmp_path / "tree"))
    dest = tmp_path / "dest"
    if existing == "dir":
        dest.mkdir()
    elif existing == "file":
        dest.write_bytes(b"keep me")
    else:
        dest.symlink_to("nowhere")
    with pytest.raises(ExtractError, match="already exists"):
        await extract_node(store.blobs, store.dirs, info.node, dest)
    assert _leftovers(tmp_path, "dest") == ["dest"]
    if existing == "file":
        assert dest.read_bytes() == b"keep me"


async def test_missing_parent_refused(store: Store, tmp_path: Path) -> None:
    info = await store.add(make_tree(tmp_path / "tree"))
    with pytest.raises(ExtractError, match="not a directory"):
        await extract_node(store.blobs, store.dirs, info.node, tmp_path / "no" / "dest")


class _Damaged(MemoryBlobService):
    """Serves ``victim`` with one byte flipped (a source that does not verify)."""

    def __init__(self, inner: MemoryBlobService, victim: B3Digest) -> None:
        super().__init__()
        self._blobs = inner._blobs
        self.victim = victim

    async def open_read(self, digest: B3Digest) -> BlobReader | None:
        reader = await super().open_read(digest)
        if reader is None or digest != self.victim:
            return reader
        data = bytearray(await reader.read())
        data[len(data) // 2] ^= 1
        return await _reader(bytes(data))


async def _reader(data: bytes) -> BlobReader:
    from tvix.castore.blobservice import BytesBlobReader

    return BytesBlobReader(data)


@pytest.mark.parametrize("victim", ["small", "big"])
async def test_damaged_blob_leaves_nothing(store: Store, tmp_path: Path, victim: str) -> None:
    """A blob that does not match its digest fails the extraction after other files
    were written; neither the destination nor the temporary tree remains."""
    tree = make_tree(tmp_path / "tree", big_size=2 << 20)
    info = await store.add(tree)
    name = "regular.txt" if victim == "small" else "big.bin"
    digest = _file_digest(store, info, name)
    with pytest.raises(IntegrityError, match=digest.hex()):
        await extract_node(_Damaged(store.blobs, digest), store.dirs, info.node, tmp_path / "out")
    assert _leftovers(tmp_path, "out") == []


async def test_missing_blob_leaves_nothing(store: Store, tmp_path: Path) -> None:
    tree = make_tree(tmp_path / "tree")
    info = await store.add(tree)
    del store.blobs._blobs[_file_digest(store, info, "big.bin")]
    with pytest.raises(StorageError, match="missing"):
        await extract_node(store.blobs, store.dirs, info.node, tmp_path / "out")
    assert _leftovers(tmp_path, "out") == []


def _file_digest(store: Store, info: PathInfo, name: str) -> B3Digest:
    root = store.dirs._directories[info.node.digest]  # type: ignore[union-attr]
    return next(f.digest for f in root.files if f.name == name.encode())


async def test_closure(store: Store, tmp_path: Path) -> None:
    a = make_tree(tmp_path / "a", big_size=10)
    b = tmp_path / "b"
    b.write_bytes(b"a single file")
    top, mid, leaf = fake_store_path("top"), fake_store_path("mid"), fake_store_path("leaf")
    info_a, info_b = await store.add(a), await store.add(b)
    # A diamond with a self reference: top -> mid, leaf; mid -> leaf; leaf -> leaf.
    await store.infos.put(relocated(info_a, top, (mid, leaf)))
    await store.infos.put(relocated(info_a, mid, (leaf,)))
    await store.infos.put(relocated(info_b, leaf, (leaf,)))
    closure = await path_info_closure(store.infos, [top])
    assert [i.store_path for i in closure] == [top, mid, leaf]
    dest = tmp_path / "store"
    await extract_store_paths(store.blobs, store.dirs, closure, dest)
    assert sorted(os.listdir(dest)) == sorted(p.base_name for p in (top, mid, leaf))
    diff(a, dest / top.base_name)
    diff(a, dest / mid.base_name)
    assert (dest / leaf.base_name).read_bytes() == b"a single file"

    await store.infos.put(relocated(info_b, leaf, (fake_store_path("gone"),)))
    with pytest.raises(NotFoundError, match=f"gone is not in the store .referred to by {leaf}"):
        await path_info_closure(store.infos, [top])


async def test_symlink_and_file_nodes_in_closure(store: Store, tmp_path: Path) -> None:
    link = fake_store_path("link")
    node = SymlinkNode(link.base_name.encode(), b"/nix/store/elsewhere")
    file_sp = fake_store_path("empty")
    empty = FileNode(file_sp.base_name.encode(), B3Digest(bytes.fromhex(_EMPTY)), 0)
    infos = []
    for sp, n in ((link, node), (file_sp, empty)):
        nar = b"".join([p async for p in render_nar(store.blobs, store.dirs, n)])
        infos.append(PathInfo(sp, n, len(nar), hashlib.sha256(nar).digest()))
    await extract_store_paths(store.blobs, store.dirs, infos, tmp_path / "s")
    assert os.readlink(tmp_path / "s" / link.base_name) == "/nix/store/elsewhere"
    assert (tmp_path / "s" / file_sp.base_name).read_bytes() == b""


_EMPTY = "af1349b9f5f9a1a6a0404dea36dcc9499bcb25c9adc112b7cc9a93cae41f3262"


# -- the command, on the embedded store ------------------------------------------------------


@pytest.mark.e2e
@pytest.mark.nix
def test_command(tmp_path: Path, nix: Nix) -> None:
    tree = make_tree(tmp_path / "tree", big_size=(1 << 20) + 1)
    env = cli_env(TVIX_STORE_DATA_DIR=str(tmp_path / "data"))
    store_path = tvix_store("import", tree, env=env).stdout.decode().strip()
    dest = tmp_path / "out"
    proc = subprocess.run([*EXTRACT, store_path, dest], env=env, capture_output=True)
    assert proc.returncode == 0, proc.stderr.decode()
    diff(tree, dest)
    assert nix.dump(dest) == nix.dump(tree)

    again = subprocess.run([*EXTRACT, store_path, dest], env=env, capture_output=True)
    assert again.returncode == 1
    assert f"{dest} already exists" in again.stderr.decode()

    sub = subprocess.run(
        [*EXTRACT, store_path + "/nested", tmp_path / "nested"], env=env, capture_output=True
    )
    assert sub.returncode == 0, sub.stderr.decode()
    diff(tree / "nested", tmp_path / "nested")

    absent = "/nix/store/" + "0" * 32 + "-absent"
    missing = subprocess.run([*EXTRACT, absent, tmp_path / "x"], env=env, capture_output=True)
    assert missing.returncode == 1
    assert "is not in the store" in missing.stderr.decode()
    assert _leftovers(tmp_path, "x") == []
