"""verify_path_info and repair in process: a damaged Directory, one naming an absent child."""

from __future__ import annotations

import random
import sqlite3
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from tvix.castore.blobservice.packs import PacksBlobService, PacksFileConfig
from tvix.castore.directoryservice import SQLiteDirectoryService
from tvix.castore.nodes import DirectoryNode
from tvix.store.importer import import_path
from tvix.store.pathinfo import PathInfo
from tvix.store.pathinfoservice.sqlite import SQLitePathInfoService
from tvix.store.verify import Problem, repair, verify_path_info


@pytest.fixture
async def services(
    tmp_path: Path,
) -> AsyncIterator[tuple[PacksBlobService, SQLiteDirectoryService, SQLitePathInfoService]]:
    blobs = PacksFileConfig(str(tmp_path / "packs")).build()
    dirs = SQLiteDirectoryService(str(tmp_path / "directories.sqlite"))
    infos = SQLitePathInfoService(str(tmp_path / "pathinfo.sqlite"))
    yield blobs, dirs, infos
    await blobs.close()
    await dirs.close()
    await infos.close()


def _tree(root: Path) -> Path:
    r = random.Random(1)
    (root / "a" / "deep").mkdir(parents=True)
    (root / "b").mkdir()
    for i, where in enumerate(("", "a", "a/deep", "b")):
        (root / where / f"f{i}").write_bytes(r.randbytes(3000 + i))
    return root


async def _digests(dirs: SQLiteDirectoryService, info: PathInfo) -> dict[str, bytes]:
    """The Directories of ``info`` by name (root, a, deep, b)."""
    assert isinstance(info.node, DirectoryNode)
    root = await dirs.get(info.node.digest)
    assert root is not None
    a = next(d for d in root.directories if d.name == b"a")
    b = next(d for d in root.directories if d.name == b"b")
    a_dir = await dirs.get(a.digest)
    assert a_dir is not None
    (deep,) = a_dir.directories
    return {"root": info.node.digest, "a": a.digest, "deep": deep.digest, "b": b.digest}


@pytest.mark.parametrize("damage", ["damaged", "absent"])
async def test_repair_removes_the_directories_above_a_fault(
    services: tuple[PacksBlobService, SQLiteDirectoryService, SQLitePathInfoService],
    tmp_path: Path,
    damage: str,
) -> None:
    blobs, dirs, infos = services
    tree = _tree(tmp_path / "t")
    info = await import_path(blobs, dirs, infos, tree)
    d = await _digests(dirs, info)
    db = sqlite3.connect(tmp_path / "directories.sqlite")
    if damage == "damaged":  # another Directory's bytes under deep's digest
        db.execute(
            "UPDATE directories SET data = (SELECT data FROM directories WHERE digest = ?) "
            "WHERE digest = ?",
            (d["b"], d["deep"]),
        )
    else:
        db.execute("DELETE FROM directories WHERE digest = ?", (d["deep"],))
    db.commit()
    db.close()

    problems: list[Problem] = [p async for p in verify_path_info(blobs, dirs, info)]
    assert len(problems) == 1
    assert problems[0].path == f"{info.store_path.absolute_path}/a/deep"
    removed = await repair(blobs, dirs, problems)
    gone = ["root", "a", "deep"] if damage == "damaged" else ["root", "a"]
    assert removed == [f"Directory {d[n].hex()}" for n in gone]
    for n in gone:
        assert await dirs.get(d[n]) is None  # type: ignore[arg-type]
    assert await dirs.get(d["b"]) is not None  # type: ignore[arg-type]

    # The path is incomplete until its tree is stored again.
    assert [p.message async for p in verify_path_info(blobs, dirs, info)] == [
        f"Directory {d['root'].hex()} is missing"
    ]
    assert await import_path(blobs, dirs, infos, tree) == info
    assert [p async for p in verify_path_info(blobs, dirs, info)] == []
