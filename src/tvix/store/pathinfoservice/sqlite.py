"""``sqlite:///path/file.sqlite``: PathInfos in an embedded SQLite database.

Shares the plumbing (one connection in its own thread, WAL with
``synchronous=FULL``, versioned schema) with the SQLite directory service;
both may live in one file. A PathInfo is stored as its protobuf encoding
under the 20-byte digest of its store path, and validated when read back.
"""

from __future__ import annotations

import sqlite3
import time
from collections.abc import AsyncIterator

from google.protobuf.message import DecodeError
from typing_extensions import override

from tvix._proto import store_pb2
from tvix.castore.directoryservice.sqlite import SQLiteDatabase
from tvix.castore.errors import StorageError
from tvix.castore.url import ServiceURL
from tvix.store.errors import InvalidPathInfoError
from tvix.store.pathinfo import PathInfo
from tvix.store.pathinfoservice.base import PathInfoService, check_digest
from tvix.store.proto import pathinfo_from_proto, pathinfo_to_proto

__all__ = ["SQLitePathInfoService"]

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


def _decode(digest: bytes, data: bytes) -> PathInfo:
    try:
        info = pathinfo_from_proto(store_pb2.PathInfo.FromString(data))
    except (InvalidPathInfoError, DecodeError, ValueError) as e:
        raise StorageError(f"stored PathInfo {digest.hex()} is damaged: {e}") from e
    if info.store_path.digest != digest:
        raise StorageError(f"stored PathInfo {digest.hex()} is for {info.store_path}")
    return info


class SQLitePathInfoService(PathInfoService):
    """PathInfos in an SQLite database file (``:memory:`` for a private one)."""

    supports_delete = True

    def __init__(self, path: str) -> None:
        self._db = SQLiteDatabase(path, "pathinfos", _MIGRATIONS)

    @classmethod
    def from_url(cls, url: ServiceURL) -> SQLitePathInfoService:
        """``sqlite:///abs/path.sqlite`` (created if absent), or ``sqlite://`` for in-memory."""
        return cls(SQLiteDatabase.path_from_url(url))

    async def get(self, digest: bytes) -> PathInfo | None:
        key = check_digest(digest)

        def get(conn: sqlite3.Connection) -> bytes | None:
            row = conn.execute("SELECT data FROM pathinfos WHERE digest = ?", (key,)).fetchone()
            return None if row is None else bytes(row[0])

        data = await self._db.run(get)
        return None if data is None else _decode(key, data)

    async def put(self, info: PathInfo) -> PathInfo:
        data = pathinfo_to_proto(info).SerializeToString(deterministic=True)
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
                yield _decode(digest, data)
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
                yield _decode(digest, data), float(added)
            if len(rows) < LIST_PAGE:
                return
            after = rows[-1][0]

    async def close(self) -> None:
        await self._db.close()
