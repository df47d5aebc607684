"""SQLiteDirectoryService: persistence, schema versions, URLs (its conformance runs are in
test_directoryservice_conformance.py)."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from tvix.castore.directory import Directory
from tvix.castore.directoryservice import (
    DirectoryService,
    SQLiteDatabase,
    SQLiteDirectoryService,
    from_url,
)
from tvix.castore.errors import IntegrityError, StorageError
from tvix.castore.nodes import DirectoryNode
from tvix.castore.testing.fixtures import (
    DIRECTORY_A,
    DIRECTORY_C,
    DIRECTORY_COMPLICATED,
    DIRECTORY_WITH_KEEP,
)


async def _put_closure(svc: DirectoryService, *directories: Directory) -> None:
    async with svc.put_multiple_start() as putter:
        for d in directories:
            await putter.put(d)


async def test_reopen_sees_data(tmp_path: Path) -> None:
    path = tmp_path / "dirs.db"
    svc = SQLiteDirectoryService(str(path))
    await _put_closure(svc, DIRECTORY_WITH_KEEP, DIRECTORY_C, DIRECTORY_COMPLICATED)
    await svc.close()
    again = from_url(f"sqlite://{path}")
    try:
        got = [d async for d in again.get_recursive(DIRECTORY_COMPLICATED.digest)]
        assert got == [DIRECTORY_COMPLICATED, DIRECTORY_C, DIRECTORY_WITH_KEEP]
    finally:
        await again.close()


async def test_file_layout(tmp_path: Path) -> None:
    """WAL mode, the schema version recorded, one row per Directory holding its encoding."""
    path = tmp_path / "dirs.db"
    svc = SQLiteDirectoryService(str(path))
    await _put_closure(svc, DIRECTORY_WITH_KEEP, DIRECTORY_WITH_KEEP, DIRECTORY_C)
    await svc.close()
    conn = sqlite3.connect(path)
    try:
        assert conn.execute("PRAGMA journal_mode").fetchone() == ("wal",)
        assert conn.execute("SELECT * FROM tvix_schema").fetchall() == [("castore.directories", 2)]
        rows = conn.execute("SELECT digest, data, size FROM directories ORDER BY size").fetchall()
        assert rows == [
            (DIRECTORY_WITH_KEEP.digest, DIRECTORY_WITH_KEEP.encode(), 2),
            (DIRECTORY_C.digest, DIRECTORY_C.encode(), 8),
        ]
    finally:
        conn.close()


async def test_newer_schema_refused(tmp_path: Path) -> None:
    path = tmp_path / "dirs.db"
    svc = SQLiteDirectoryService(str(path))
    await svc.put(DIRECTORY_A)
    await svc.close()
    conn = sqlite3.connect(path)
    conn.execute("UPDATE tvix_schema SET version = 7 WHERE component = 'castore.directories'")
    conn.commit()
    conn.close()
    svc = SQLiteDirectoryService(str(path))
    try:
        with pytest.raises(StorageError, match=r"schema version 7 .*newer than the 2"):
            await svc.get(DIRECTORY_A.digest)
    finally:
        await svc.close()


async def test_migrations_applied_in_order(tmp_path: Path) -> None:
    path = str(tmp_path / "x.db")
    db = SQLiteDatabase(path, "test.component", ["CREATE TABLE t (a INTEGER)"])
    await db.run(lambda c: c.execute("INSERT INTO t VALUES (1)"))
    await db.close()
    # A later version adds a migration; the first is not re-run, the data stays.
    db = SQLiteDatabase(
        path, "test.component", ["CREATE TABLE t (a INTEGER)", "ALTER TABLE t ADD b TEXT"]
    )
    try:
        assert await db.run(lambda c: c.execute("SELECT a, b FROM t").fetchall()) == [(1, None)]
        version = await db.run(
            lambda c: c.execute(
                "SELECT version FROM tvix_schema WHERE component = 'test.component'"
            ).fetchone()
        )
        assert version == (2,)
    finally:
        await db.close()


async def test_transaction_rolls_back(tmp_path: Path) -> None:
    db = SQLiteDatabase(str(tmp_path / "x.db"), "test", ["CREATE TABLE t (a INTEGER UNIQUE)"])

    def insert_twice(c: sqlite3.Connection) -> None:
        c.execute("INSERT INTO t VALUES (1)")
        c.execute("INSERT INTO t VALUES (1)")

    try:
        with pytest.raises(StorageError, match="UNIQUE"):
            await db.run(lambda c: SQLiteDatabase.transaction(c, insert_twice))
        assert await db.run(lambda c: c.execute("SELECT count(*) FROM t").fetchone()) == (0,)
    finally:
        await db.close()


async def test_closed_database(tmp_path: Path) -> None:
    svc = SQLiteDirectoryService(str(tmp_path / "dirs.db"))
    await svc.put(DIRECTORY_A)
    await svc.close()
    await svc.close()  # idempotent
    with pytest.raises(StorageError, match="closed"):
        await svc.get(DIRECTORY_A.digest)


async def test_not_a_database(tmp_path: Path) -> None:
    path = tmp_path / "junk.db"
    path.write_bytes(b"this is not an SQLite file" * 100)
    svc = SQLiteDirectoryService(str(path))
    try:
        with pytest.raises(StorageError, match=r"junk\.db"):
            await svc.get(DIRECTORY_A.digest)
    finally:
        await svc.close()


async def test_damaged_row_is_integrity_error(tmp_path: Path) -> None:
    path = tmp_path / "dirs.db"
    svc = SQLiteDirectoryService(str(path))
    await svc.put(DIRECTORY_WITH_KEEP)
    conn = sqlite3.connect(path)
    conn.execute("UPDATE directories SET data = ?", (DIRECTORY_A.encode(),))
    conn.commit()
    conn.close()
    try:
        with pytest.raises(IntegrityError, match=DIRECTORY_WITH_KEEP.digest.hex()):
            await svc.get(DIRECTORY_WITH_KEEP.digest)
    finally:
        await svc.close()


async def test_wide_level_batched(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A level wider than one IN (...) batch, fetched with one query per batch, not per row."""
    svc = SQLiteDirectoryService(str(tmp_path / "dirs.db"))
    leaves = [
        Directory(directories=[DirectoryNode(b"n%d" % i, DIRECTORY_A.digest, 0)])
        for i in range(1200)
    ]
    root = Directory(
        directories=sorted(
            (DirectoryNode(b"d%04d" % i, d.digest, d.size) for i, d in enumerate(leaves)),
            key=lambda n: n.name,
        )
    )
    await _put_closure(svc, DIRECTORY_A, *leaves, root)
    runs = 0
    original = SQLiteDatabase.run

    async def counting(self: SQLiteDatabase, fn):  # type: ignore[no-untyped-def]
        nonlocal runs
        runs += 1
        return await original(self, fn)

    monkeypatch.setattr(SQLiteDatabase, "run", counting)
    try:
        got = [d async for d in svc.get_recursive(root.digest)]
        assert len(got) == 1 + 1200 + 1
        assert got[0] == root
        assert set(got[1:-1]) == set(leaves)
        assert got[-1] == DIRECTORY_A
        assert runs == 3  # one call per level
    finally:
        await svc.close()
