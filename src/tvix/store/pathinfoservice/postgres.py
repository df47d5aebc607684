"""``postgresql://user@host:port/db``: PathInfos in a PostgreSQL database.

Shares the plumbing of the PostgreSQL directory service (a lazily created
pool, the URL options, versioned schema, error translation; see
:mod:`tvix.castore.sql.postgres`); both may live in one
database and schema, under their own components in ``tvix_schema``.

A PathInfo is stored as its protobuf encoding under the 20-byte digest of
its store path, and validated when read back (:mod:`tvix.store.sql`; damage
raises :class:`~tvix.castore.errors.IntegrityError`). A put replaces the row in one
statement (an upsert), so concurrent writers of the same path leave one of
their PathInfos, never a mixture. :meth:`~PostgresPathInfoService.list`
streams the table through a server-side cursor inside a read-only
transaction: memory stays bounded however many paths there are, and a
listing sees one snapshot. It holds one pooled connection until the
iteration ends (or the iterator is closed).

The store's garbage collection keeps its lock and pins in the same database
and schema (:attr:`~PostgresPathInfoService.gc_state`,
:class:`~tvix.store.gcstate.postgres.PostgresGCState`), so every machine
sharing the PathInfos shares them.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from dataclasses import dataclass

from typing_extensions import override

from tvix.castore.composition import BuildContext
from tvix.castore.sql.postgres import PostgresConfig, PostgresDatabase
from tvix.store.gcstate.postgres import MIGRATIONS as GC_MIGRATIONS
from tvix.store.gcstate.postgres import PostgresGCState
from tvix.store.pathinfo import PathInfo
from tvix.store.pathinfoservice.base import PathInfoService, check_digest
from tvix.store.sql import decode_pathinfo, encode_pathinfo

__all__ = ["PostgresPathInfoService", "PostgresPathInfoServiceConfig"]

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


class PostgresPathInfoService(PathInfoService):
    """PathInfos in one table of a PostgreSQL database (see the module docs)."""

    @property
    @override
    def supports_delete(self) -> bool:
        return True

    @property
    @override
    def gc_state(self) -> PostgresGCState | None:
        return self._gc_state

    def __init__(self, db: PostgresDatabase, gc_db: PostgresDatabase | None = None) -> None:
        """PathInfos in ``db``; the GC's lock and pins in ``gc_db`` (none without it)."""
        self._db = db
        self._gc_state = None if gc_db is None else PostgresGCState(gc_db)

    @override
    async def get(self, digest: bytes) -> PathInfo | None:
        key = check_digest(digest)
        async with self._db.connection() as conn:
            data = await conn.fetchval("SELECT data FROM pathinfos WHERE digest = $1", key)
        return None if data is None else decode_pathinfo(key, data)

    @override
    async def put(self, info: PathInfo) -> PathInfo:
        data = encode_pathinfo(info)
        async with self._db.connection() as conn:
            await conn.execute(
                "INSERT INTO pathinfos (digest, data, added) VALUES ($1, $2, $3) "
                "ON CONFLICT (digest) DO UPDATE SET data = EXCLUDED.data, added = EXCLUDED.added",
                info.store_path.digest,
                data,
                int(time.time()),
            )
        return info

    @override
    async def list(self) -> AsyncIterator[PathInfo]:
        async with self._db.connection() as conn, conn.transaction(readonly=True):
            async for row in conn.cursor(
                "SELECT digest, data FROM pathinfos", prefetch=LIST_PREFETCH
            ):
                yield decode_pathinfo(row[0], row[1])

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
                yield decode_pathinfo(row[0], row[1]), float(row[2])

    @override
    async def close(self) -> None:
        await self._db.close()
        if self._gc_state is not None:
            await self._gc_state.close()


@dataclass(frozen=True)
class PostgresPathInfoServiceConfig(PostgresConfig):
    """PathInfos in PostgreSQL (see :class:`PostgresConfig`)."""

    def build(self, ctx: BuildContext) -> PostgresPathInfoService:
        """Connects on first use."""
        return PostgresPathInfoService(
            self.database("store.pathinfos", MIGRATIONS),
            self.database("store.gc", GC_MIGRATIONS),
        )
