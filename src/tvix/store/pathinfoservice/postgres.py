"""``postgresql://user@host:port/db``: PathInfos in a PostgreSQL database.

Shares the plumbing of the PostgreSQL directory service (a lazily created
pool, the URL options, versioned schema, error translation; see
:mod:`tvix.castore.directoryservice.postgres`); both may live in one
database and schema, under their own components in ``tvix_schema``.

A PathInfo is stored as its protobuf encoding under the 20-byte digest of
its store path, and validated when read back. A put replaces the row in one
statement (an upsert), so concurrent writers of the same path leave one of
their PathInfos, never a mixture. :meth:`~PostgresPathInfoService.list`
streams the table through a server-side cursor inside a read-only
transaction: memory stays bounded however many paths there are, and a
listing sees one snapshot. It holds one pooled connection until the
iteration ends (or the iterator is closed).
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator

from google.protobuf.message import DecodeError
from typing_extensions import override

from tvix._proto import store_pb2
from tvix.castore.directoryservice.postgres import PostgresDatabase
from tvix.castore.errors import StorageError
from tvix.castore.url import ServiceURL
from tvix.store.errors import InvalidPathInfoError
from tvix.store.pathinfo import PathInfo
from tvix.store.pathinfoservice.base import PathInfoService, check_digest
from tvix.store.proto import pathinfo_from_proto, pathinfo_to_proto

__all__ = ["PostgresPathInfoService"]

MIGRATIONS = [
    """
    CREATE TABLE pathinfos (
        digest BYTEA PRIMARY KEY CHECK (octet_length(digest) = 20),
        data BYTEA NOT NULL
    )
    """,
    # 2: when each PathInfo was put, for garbage collection's retention by age.
    """
    ALTER TABLE pathinfos ADD COLUMN added BIGINT NOT NULL DEFAULT 0
    """,
]

# Rows fetched per round trip while listing.
LIST_PREFETCH = 1000


def _decode(digest: bytes, data: bytes) -> PathInfo:
    try:
        info = pathinfo_from_proto(store_pb2.PathInfo.FromString(data))
    except (DecodeError, InvalidPathInfoError, ValueError) as e:
        raise StorageError(f"stored PathInfo {digest.hex()} is damaged: {e}") from e
    if info.store_path.digest != digest:
        raise StorageError(f"stored PathInfo {digest.hex()} is for {info.store_path}")
    return info


class PostgresPathInfoService(PathInfoService):
    """PathInfos in one table of a PostgreSQL database (see the module docs)."""

    supports_delete = True

    def __init__(self, db: PostgresDatabase) -> None:
        self._db = db

    @classmethod
    def from_url(cls, url: ServiceURL) -> PostgresPathInfoService:
        """``postgresql://user@host:port/db?schema=...``; connects on first use."""
        return cls(PostgresDatabase.from_url(url, "store.pathinfos", MIGRATIONS))

    async def get(self, digest: bytes) -> PathInfo | None:
        key = check_digest(digest)
        async with self._db.connection() as conn:
            data = await conn.fetchval("SELECT data FROM pathinfos WHERE digest = $1", key)
        return None if data is None else _decode(key, data)

    async def put(self, info: PathInfo) -> PathInfo:
        data = pathinfo_to_proto(info).SerializeToString(deterministic=True)
        async with self._db.connection() as conn:
            await conn.execute(
                "INSERT INTO pathinfos (digest, data, added) VALUES ($1, $2, $3) "
                "ON CONFLICT (digest) DO UPDATE SET data = EXCLUDED.data, added = EXCLUDED.added",
                info.store_path.digest,
                data,
                int(time.time()),
            )
        return info

    async def list(self) -> AsyncIterator[PathInfo]:
        async with self._db.connection() as conn, conn.transaction(readonly=True):
            async for row in conn.cursor(
                "SELECT digest, data FROM pathinfos", prefetch=LIST_PREFETCH
            ):
                yield _decode(row[0], row[1])

    @override
    async def delete(self, digest: bytes) -> bool:
        key = check_digest(digest)
        async with self._db.connection() as conn:
            status = await conn.execute("DELETE FROM pathinfos WHERE digest = $1", key)
        return bool(status != "DELETE 0")

    @override
    async def list_added(self) -> AsyncIterator[tuple[PathInfo, float]]:
        async with self._db.connection() as conn, conn.transaction(readonly=True):
            async for row in conn.cursor(
                "SELECT digest, data, added FROM pathinfos", prefetch=LIST_PREFETCH
            ):
                yield _decode(row[0], row[1]), float(row[2])

    async def close(self) -> None:
        await self._db.close()
