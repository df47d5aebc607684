"""Garbage collection in process: sweeps, refreshes racing sweeps, delete, pins, the lock."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import os
import random
import sqlite3
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tvix.castore import blobservice
from tvix.castore.blobservice import BlobService
from tvix.castore.blobservice.packs import PacksBlobService, PacksFileConfig
from tvix.castore.directory import Directory
from tvix.castore.directoryservice import SQLiteDirectoryService
from tvix.castore.errors import ValidationError
from tvix.castore.nodes import DirectoryNode, FileNode
from tvix.nixcompat.storepath import StorePath
from tvix.store.gc import GCBusyError, GCError, GCReport, collect, delete_paths, move_pins
from tvix.store.gcstate import SQLiteGCState
from tvix.store.importer import import_path
from tvix.store.pathinfo import PathInfo
from tvix.store.pathinfoservice.sqlite import SQLitePathInfoService
from tvix.store.verify import verify_path_info


@dataclass
class Store:
    root: Path
    blobs: BlobService
    dirs: SQLiteDirectoryService
    infos: SQLitePathInfoService
    state: SQLiteGCState

    async def gc(self, **kw: Any) -> GCReport:
        return await collect(
            self.blobs,
            self.dirs,
            self.infos,
            state=self.state,
            **kw,
        )

    async def problems(self) -> list[str]:
        out = []
        async for info in self.infos.list():
            out += [p async for p in verify_path_info(self.blobs, self.dirs, info)]
        if isinstance(self.blobs, PacksBlobService):
            out += await self.blobs.verify_storage()
        return out

    def age_everything(self) -> None:
        """Make every stored object look written long ago (as if imported last week)."""
        for p in (self.root / "objects").rglob("*"):
            if p.is_file():
                os.utime(p, (0, 0))
        for db, tables in (
            (self.root / "packs" / "index.sqlite", ("chunks", "blobs")),
            (self.root / "directories.sqlite", ("directories",)),
        ):
            if not db.exists():
                continue
            conn = sqlite3.connect(db)
            for t in tables:
                conn.execute(f"UPDATE {t} SET seen = 0")
            conn.commit()
            conn.close()


def _store(root: Path, blobs: BlobService) -> Store:
    return Store(
        root,
        blobs,
        SQLiteDirectoryService(str(root / "directories.sqlite")),
        SQLitePathInfoService(str(root / "pathinfo.sqlite")),
        SQLiteGCState(root),
    )


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[Store]:
    root = tmp_path / "data"
    root.mkdir()
    s = _store(root, PacksFileConfig(str(root / "packs"), pack_size=1 << 20).build())
    yield s
    await s.blobs.close()
    await s.dirs.close()
    await s.infos.close()
    await s.state.close()


@pytest.fixture(params=["packs", "objectstore"])
async def any_store(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Store]:
    """The embedded default (packs), and objectstore+file blobs (one file per chunk)."""
    root = tmp_path / "data"
    root.mkdir()
    blobs = (
        PacksFileConfig(str(root / "packs"), pack_size=1 << 20).build()
        if request.param == "packs"
        else blobservice.from_url(f"objectstore+file://{root}/objects?avg_chunk_size=65536")
    )
    s = _store(root, blobs)
    yield s
    await s.blobs.close()
    await s.dirs.close()
    await s.infos.close()
    await s.state.close()


def _tree(root: Path, seed: int, files: int = 30, shared: int = 20) -> Path:
    r = random.Random(seed)
    common = random.Random(0)
    (root / "sub" / "deeper").mkdir(parents=True)
    for i in range(files):
        where = root / ("sub" if i % 3 else "sub/deeper")
        data = (
            common.randbytes(common.randint(10, 600_000))
            if i < shared
            else r.randbytes(r.randint(10, 600_000))
        )
        (where / f"f{i}").write_bytes(data)
    return root


async def test_collect_keeps_live_and_frees_the_rest(store: Store, tmp_path: Path) -> None:
    a = await import_path(store.blobs, store.dirs, store.infos, _tree(tmp_path / "a", 1))
    b = await import_path(store.blobs, store.dirs, store.infos, _tree(tmp_path / "b", 2))
    dry = await store.gc(grace=0, dry_run=True)
    assert dry.directories == 0
    assert dry.blobs.chunks == 0
    assert await delete_paths(store.infos, [a.store_path]) == [a.store_path]
    dry = await store.gc(grace=0, dry_run=True)
    assert dry.directories == 3
    assert dry.blobs.chunks > 0
    assert await store.problems() == []  # the dry run changed nothing
    packs_before = sum(p.stat().st_size for p in (store.root / "packs" / "packs").iterdir())
    report = await store.gc(grace=0)
    assert report.directories == 3
    assert report.compaction.packs > 0
    assert await store.problems() == []
    packs_after = sum(p.stat().st_size for p in (store.root / "packs" / "packs").iterdir())
    assert packs_after < packs_before
    assert await store.infos.get(b.store_path.digest) is not None
    # A second GC finds nothing more.
    again = await store.gc(grace=0)
    assert again.directories == 0
    assert again.blobs.chunks == 0


async def test_grace_keeps_what_was_written_recently(any_store: Store, tmp_path: Path) -> None:
    a = await import_path(
        any_store.blobs, any_store.dirs, any_store.infos, _tree(tmp_path / "a", 1)
    )
    await any_store.infos.delete(a.store_path.digest)
    report = await any_store.gc(grace=3600)
    assert report.directories == 0
    assert report.blobs.chunks == 0
    # The upload "completes" now: its PathInfo refers to intact content.
    await any_store.infos.put(a)
    assert await any_store.problems() == []


async def test_found_present_is_refreshed_and_survives(any_store: Store, tmp_path: Path) -> None:
    """An upload that skips a blob because has() said yes keeps it, however old."""
    tree = _tree(tmp_path / "a", 1)
    a = await import_path(any_store.blobs, any_store.dirs, any_store.infos, tree)
    await any_store.infos.delete(a.store_path.digest)
    any_store.age_everything()
    # Re-importing finds every blob and Directory present: all refreshed.
    again = await import_path(any_store.blobs, any_store.dirs, any_store.infos, tree)
    await any_store.infos.delete(again.store_path.digest)
    report = await any_store.gc(grace=600)
    assert report.directories == 0
    assert report.blobs.chunks == 0
    await any_store.infos.put(again)
    assert await any_store.problems() == []


@pytest.mark.parametrize("seed", range(6))
async def test_import_racing_gc_never_loses_content(
    any_store: Store, tmp_path: Path, seed: int
) -> None:
    """Old garbage shared with an import that runs during the GC: the import's path is whole."""
    tree = _tree(tmp_path / "a", 1, files=40, shared=40)
    old = await import_path(any_store.blobs, any_store.dirs, any_store.infos, tree)
    await any_store.infos.delete(old.store_path.digest)
    any_store.age_everything()
    other = _tree(tmp_path / "b", 5, files=30, shared=15)

    async def importing() -> list[PathInfo]:
        return [
            await import_path(any_store.blobs, any_store.dirs, any_store.infos, p)
            for p in (other, tree)
        ]

    async def gc() -> None:
        await asyncio.sleep(random.Random(seed).random() * 0.3)
        await any_store.gc(grace=120)

    infos, _ = await asyncio.gather(importing(), gc())
    assert {i.store_path for i in infos} == {i.store_path async for i in any_store.infos.list()}
    assert await any_store.problems() == []
    # Everything is collectable later, once no root needs it.
    for i in infos:
        await any_store.infos.delete(i.store_path.digest)
    report = await any_store.gc(grace=0)
    assert report.blobs.chunks > 0
    packs = any_store.root / "packs" / "packs"
    if packs.exists():
        assert not [p for p in packs.iterdir() if p.stat().st_size > 8]
    else:
        assert not [p for p in (any_store.root / "objects").rglob("*") if p.is_file()]


async def test_closure_put_refuses_a_collected_child(store: Store) -> None:
    leaf = Directory(files=[FileNode(b"f", b"\x01" * 32, 1, False)])
    await store.dirs.put(leaf)
    swept = await store.dirs.sweep(set(), cutoff=2**40)
    assert swept.deleted == 1
    parent = Directory(directories=[DirectoryNode(b"d", leaf.digest, leaf.size)])
    with pytest.raises(ValidationError):
        await store.dirs.put(parent)


async def test_directory_sweep_keeps_everything_below_young(store: Store) -> None:
    leaf = Directory(files=[FileNode(b"f", b"\x01" * 32, 1, False)])
    await store.dirs.put(leaf)
    store.age_everything()
    parent = Directory(directories=[DirectoryNode(b"d", leaf.digest, leaf.size)])
    # Putting the parent refreshes the stored child it names.
    await store.dirs.put(parent)
    conn = sqlite3.connect(store.root / "directories.sqlite")
    conn.execute("UPDATE directories SET seen = 0 WHERE digest = ?", (leaf.digest,))
    conn.commit()
    conn.close()
    swept = await store.dirs.sweep(set(), cutoff=1000)
    assert swept.deleted == 0
    assert swept.kept == {parent.digest, leaf.digest}


async def test_delete_refuses_referenced_and_pinned(store: Store, tmp_path: Path) -> None:
    x = await import_path(store.blobs, store.dirs, store.infos, _tree(tmp_path / "x", 1, 3))
    y = await import_path(store.blobs, store.dirs, store.infos, _tree(tmp_path / "y", 2, 3))
    y = await store.infos.put(dataclasses.replace(y, references=(x.store_path,)))
    with pytest.raises(GCError, match="still referenced by"):
        await delete_paths(store.infos, [x.store_path])
    assert await store.infos.get(x.store_path.digest) is not None
    await store.state.add_pin("keep", y.store_path)
    with pytest.raises(GCError, match="pinned by 'keep'"):
        await delete_paths(store.infos, [x.store_path], state=store.state, recursive=True)
    assert await store.state.remove_pin("keep")
    gone = await delete_paths(store.infos, [x.store_path], state=store.state, recursive=True)
    assert set(gone) == {x.store_path, y.store_path}
    assert [i async for i in store.infos.list()] == []


async def test_retention_keeps_pinned_closures(store: Store, tmp_path: Path) -> None:
    x = await import_path(store.blobs, store.dirs, store.infos, _tree(tmp_path / "x", 1, 3))
    y = await import_path(store.blobs, store.dirs, store.infos, _tree(tmp_path / "y", 2, 3))
    z = await import_path(store.blobs, store.dirs, store.infos, _tree(tmp_path / "z", 3, 3))
    await store.infos.put(dataclasses.replace(y, references=(x.store_path,)))
    conn = sqlite3.connect(store.root / "pathinfo.sqlite")
    conn.execute("UPDATE pathinfos SET added = 0")
    conn.commit()
    conn.close()
    await store.state.add_pin("y", y.store_path)
    report = await store.gc(grace=0, keep_younger_than=86400)
    assert report.paths == [z.store_path]
    assert {i.store_path async for i in store.infos.list()} == {x.store_path, y.store_path}
    assert await store.problems() == []


async def test_second_gc_is_refused(store: Store) -> None:
    async with store.state.lock():
        with pytest.raises(GCBusyError):
            await store.gc(grace=0)


async def test_reader_follows_a_compacted_chunk(store: Store, tmp_path: Path) -> None:
    a = await import_path(store.blobs, store.dirs, store.infos, _tree(tmp_path / "a", 1))
    b = await import_path(store.blobs, store.dirs, store.infos, _tree(tmp_path / "b", 2))
    assert isinstance(b.node, DirectoryNode)
    digests = [f.digest async for d in store.dirs.get_recursive(b.node.digest) for f in d.files]
    before = await store.blobs.read_many(digests)
    await store.infos.delete(a.store_path.digest)
    await store.gc(grace=0, threshold=1.0)
    # Locations looked up before the compaction point into deleted packs.
    assert await store.blobs.read_many(digests) == before
    assert os.listdir(store.root / "packs" / "packs")


async def test_upload_spanning_a_gc_keeps_what_it_found(any_store: Store, tmp_path: Path) -> None:
    """The window that matters, step by step: an upload finds its blobs present (has, or
    a writer deduplicating), a GC runs, then the upload puts its Directories and PathInfo."""
    tree = _tree(tmp_path / "a", 1)
    old = await import_path(any_store.blobs, any_store.dirs, any_store.infos, tree)
    assert isinstance(old.node, DirectoryNode)
    closure = [d async for d in any_store.dirs.get_recursive(old.node.digest)]
    files = {f.digest: f for d in closure for f in d.files}
    await any_store.infos.delete(old.store_path.digest)
    any_store.age_everything()

    # The upload: half the blobs through has(), half written again (deduplicated).
    digests = sorted(files)
    for d in digests[::2]:
        assert await any_store.blobs.has(d)
    for d in digests[1::2]:
        data = await any_store.blobs.read_many([d])
        assert data[0] is not None
        async with any_store.blobs.open_write() as w:
            await w.write(data[0])
        assert await w.close() == d

    report = await any_store.gc(grace=120)
    assert report.directories == 3  # nobody refers to them yet: gone

    # The upload finishes: its Directories (leaves first), then its PathInfo.
    async with any_store.dirs.put_multiple_start() as putter:
        for d in reversed(closure):
            await putter.put(d)
    await any_store.infos.put(old)
    assert await any_store.problems() == []


def _deleted_fds() -> int:
    n = 0
    for fd in os.listdir("/proc/self/fd"):
        with contextlib.suppress(OSError):
            n += os.readlink(f"/proc/self/fd/{fd}").endswith(".pack (deleted)")
    return n


async def test_another_process_gc_frees_the_space_of_packs_this_one_read(
    store: Store, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A daemon that read a pack another process compacted away lets go of it."""
    import tvix.castore.blobservice.packs._storage as storage

    monkeypatch.setattr(storage, "PRUNE_EVERY", 0.0)
    a = await import_path(store.blobs, store.dirs, store.infos, _tree(tmp_path / "a", 1))
    b = await import_path(store.blobs, store.dirs, store.infos, _tree(tmp_path / "b", 2))
    assert isinstance(b.node, DirectoryNode)
    digests = [f.digest async for d in store.dirs.get_recursive(b.node.digest) for f in d.files]
    reader = PacksFileConfig(str(store.root / "packs")).build()  # "the daemon"
    try:
        before = await reader.read_many(digests)
        await store.infos.delete(a.store_path.digest)
        await store.gc(grace=0, threshold=1.0)
        assert _deleted_fds() > 0  # the reader still holds the old packs open
        assert await reader.read_many(digests) == before  # found at their new places
        # Later reads close what was retired (here and in the collecting service).
        await reader.read_many(digests[:1])
        await store.blobs.read_many(digests[:1])
        assert _deleted_fds() == 0
    finally:
        await reader.close()


async def test_move_pins_keeps_every_path_pinned(tmp_path: Path) -> None:
    a, b = (StorePath.from_absolute_path(f"/nix/store/{c * 32}-{c}") for c in "ab")
    (tmp_path / "old").mkdir()
    (tmp_path / "new").mkdir()
    old, new = SQLiteGCState(tmp_path / "old"), SQLiteGCState(tmp_path / "new")
    try:
        for name, path in (("a", a), ("b", b), ("same", a)):
            await old.add_pin(name, path)
        await new.add_pin("b", a)  # the name taken, for another path
        await new.add_pin("same", a)
        renamed = f"b ({tmp_path / 'old'})"
        assert await move_pins(old, new) == [("a", a), (renamed, b)]
        assert await old.pins() == []
        assert await new.pins() == sorted([("a", a), ("b", a), (renamed, b), ("same", a)])
        assert await move_pins(old, new) == []
    finally:
        await old.close()
        await new.close()
