"""``sqlite:///path/file.sqlite``: PathInfos in an embedded SQLite database.

Shares the plumbing (:class:`~tvix.castore.sql.sqlite.SQLiteDatabase`: one
connection in its own thread, WAL with ``synchronous=FULL``, versioned
schema) with the SQLite directory service;
both may live in one file. A PathInfo is stored as its protobuf encoding
under the 20-byte digest of its store path, and validated when read back
(:mod:`tvix.store.sql`; damage raises :class:`~tvix.castore.errors.IntegrityError`).
"""

from __future__ import annotations

import sqlite3
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass

from typing_extensions import override

from tvix.castore.composition import BuildContext
from tvix.castore.sql.sqlite import SQLiteConfig, SQLiteDatabase
from tvix.store.pathinfo import PathInfo
from tvix.store.pathinfoservice.base import PathInfoService, check_digest
from tvix.store.sql import decode_pathinfo, encode_pathinfo

__all__ = ["SQLitePathInfoService", "SQLitePathInfoServiceConfig"]

_MIGRATIONS = [
    """
    CREATE TABLE pathinfos (
        digest BLOB PRIMARY KEY NOT NULL CHECK (length(digest) = 20),
        data BLOB NOT NULL
    ) WITHOUT ROWID;
    """,
    # 2: when each PathInfo was put (unix seconds; 0: before this column), for
    # garbage collection's retention by age.
    """
    ALTER TABLE pathinfos ADD COLUMN added INTEGER NOT NULL DEFAULT 0;
    """,
]

# PathInfos fetched per query while listing (keyset pagination keeps memory bounded).
LIST_PAGE = 1000


class SQLitePathInfoService(PathInfoService):
    """PathInfos in an SQLite database file (``:memory:`` for a private one)."""

    @property
    @override
    def supports_delete(self) -> bool:
        return True

    def __init__(self, path: str) -> None:
        self._db = SQLiteDatabase(path, "pathinfos", _MIGRATIONS)

    @override
    async def get(self, digest: bytes) -> PathInfo | None:
        key = check_digest(digest)

        def get(conn: sqlite3.Connection) -> bytes | None:
            row = conn.execute("SELECT data FROM pathinfos WHERE digest = ?", (key,)).fetchone()
            return None if row is None else bytes(row[0])

        data = await self._db.run(get)
        return None if data is None else decode_pathinfo(key, data)

    @override
    async def put(self, info: PathInfo) -> PathInfo:
        data = encode_pathinfo(info)
        key = info.store_path.digest
        added = int(time.time())

        def put(conn: sqlite3.Connection) -> None:
            SQLiteDatabase.transaction(
                conn,
                lambda c: c.execute(
                    "INSERT OR REPLACE INTO pathinfos (digest, data, added) VALUES (?, ?, ?)",
                    (key, data, added),
                ),
            )

        await self._db.run(put)
        return info

    @override
    async def list(self) -> AsyncIterator[PathInfo]:
        after = b""
        while True:

            def page(conn: sqlite3.Connection, after: bytes = after) -> list[tuple[bytes, bytes]]:
                return [
                    (bytes(d), bytes(v))
                    for d, v in conn.execute(
                        "SELECT digest, data FROM pathinfos WHERE digest > ? "
                        "ORDER BY digest LIMIT ?",
                        (after, LIST_PAGE),
                    )
                ]

            rows = await self._db.run(page)
            for digest, data in rows:
                yield decode_pathinfo(digest, data)
            if len(rows) < LIST_PAGE:
                return
            after = rows[-1][0]

    @override
    async def delete(self, digest: bytes) -> bool:
        key = check_digest(digest)

        def delete(conn: sqlite3.Connection) -> bool:
            return SQLiteDatabase.transaction(
                conn,
                lambda c: c.execute("DELETE FROM pathinfos WHERE digest = ?", (key,)).rowcount > 0,
            )

        return await self._db.run(delete)

    @override
    async def list_added(self) -> AsyncIterator[tuple[PathInfo, float]]:
        after = b""
        while True:

            def page(
                conn: sqlite3.Connection, after: bytes = after
            ) -> list[tuple[bytes, bytes, int]]:
                return [
                    (bytes(d), bytes(v), int(t))
                    for d, v, t in conn.execute(
                        "SELECT digest, data, added FROM pathinfos WHERE digest > ? "
                        "ORDER BY digest LIMIT ?",
                        (after, LIST_PAGE),
                    )
                ]

            rows = await self._db.run(page)
            for digest, data, added in rows:
                yield decode_pathinfo(digest, data), float(added)
            if len(rows) < LIST_PAGE:
                return
            after = rows[-1][0]

    @override
    async def close(self) -> None:
        await self._db.close()


@dataclass(frozen=True)
class SQLitePathInfoServiceConfig(SQLiteConfig):
    """PathInfos in an SQLite file (see :class:`SQLiteConfig`)."""

    def build(self, ctx: BuildContext) -> SQLitePathInfoService:
        """Opens the file on first use."""
        return SQLitePathInfoService(self.database_path())
