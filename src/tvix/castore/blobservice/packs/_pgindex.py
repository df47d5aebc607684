"""The index of ``packs+s3``: the tables of :mod:`._index` in PostgreSQL.

Every daemon sharing the bucket shares the database, so each sees the blobs
the others stored. A commit is one transaction: the pack row, the chunk rows
(``INSERT ... SELECT FROM unnest(...) ON CONFLICT DO NOTHING RETURNING``, so
live bytes count only the rows actually added) and the blob records.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import asyncpg

from tvix.castore.blobservice.packs._format import HEADER_SIZE, Location
from tvix.castore.blobservice.packs._index import Entry, PackIndex, PackInfo
from tvix.castore.sql.postgres import PostgresConfig

__all__ = ["PackIndexConfig", "PostgresIndex"]

_BATCH = 10_000

MIGRATIONS = [
    """
    CREATE TABLE packs (
        id BIGSERIAL PRIMARY KEY,
        name TEXT NOT NULL UNIQUE,
        size BIGINT NOT NULL,
        live BIGINT NOT NULL
    );
    CREATE TABLE chunks (
        digest BYTEA PRIMARY KEY CHECK (octet_length(digest) = 32),
        pack BIGINT NOT NULL REFERENCES packs(id),
        "offset" BIGINT NOT NULL,
        length INTEGER NOT NULL,
        size INTEGER NOT NULL,
        codec SMALLINT NOT NULL
    );
    CREATE INDEX chunks_by_pack ON chunks(pack, "offset");
    CREATE TABLE blobs (
        digest BYTEA PRIMARY KEY CHECK (octet_length(digest) = 32),
        chunks BYTEA NOT NULL
    )
    """,
]


class PostgresIndex(PackIndex):
    """A :class:`PackIndex` in a PostgreSQL database.

    Its URL is what the PostgreSQL services take (``schema=`` and ``pool_size=`` too).
    """

    def __init__(self, config: PostgresConfig) -> None:
        self._db = config.database("castore.packs", MIGRATIONS)

    async def locate(self, digests: Sequence[bytes]) -> dict[bytes, Location]:
        out: dict[bytes, Location] = {}
        async with self._db.connection() as conn:
            for i in range(0, len(digests), _BATCH):
                rows = await conn.fetch(
                    'SELECT c.digest, p.name, c."offset", c.length, c.size, c.codec '
                    "FROM chunks c JOIN packs p ON p.id = c.pack WHERE c.digest = ANY($1)",
                    list(digests[i : i + _BATCH]),
                )
                for d, name, off, length, size, codec in rows:
                    out[bytes(d)] = Location(name, off, length, size, codec)
        return out

    async def present(self, digests: Sequence[bytes]) -> dict[bytes, bool]:
        out: dict[bytes, bool] = {}
        async with self._db.connection() as conn:
            for i in range(0, len(digests), _BATCH):
                rows = await conn.fetch(
                    "SELECT digest FROM chunks WHERE digest = ANY($1)",
                    list(digests[i : i + _BATCH]),
                )
                out.update((bytes(r[0]), True) for r in rows)
        return out

    async def records(self, digests: Sequence[bytes]) -> dict[bytes, bytes]:
        out: dict[bytes, bytes] = {}
        async with self._db.connection() as conn:
            for i in range(0, len(digests), _BATCH):
                rows = await conn.fetch(
                    "SELECT digest, chunks FROM blobs WHERE digest = ANY($1)",
                    list(digests[i : i + _BATCH]),
                )
                out.update((bytes(d), bytes(c)) for d, c in rows)
        return out

    async def commit(
        self, pack: str, size: int, entries: Sequence[Entry], records: Sequence[tuple[bytes, bytes]]
    ) -> None:
        async with self._db.connection() as conn, conn.transaction():
            if entries:
                await self._add_entries(conn, pack, size, entries)
            if records:
                await conn.execute(
                    "INSERT INTO blobs SELECT * FROM unnest($1::bytea[], $2::bytea[]) "
                    "ON CONFLICT (digest) DO NOTHING",
                    [r[0] for r in records],
                    [r[1] for r in records],
                )

    @staticmethod
    async def _add_entries(
        conn: asyncpg.Connection, pack: str, size: int, entries: Sequence[Entry]
    ) -> None:
        pack_id = await conn.fetchval(
            "INSERT INTO packs (name, size, live) VALUES ($1, $2, 0) "
            "ON CONFLICT (name) DO UPDATE SET size = GREATEST(packs.size, EXCLUDED.size) "
            "RETURNING id",
            pack,
            size,
        )
        live = 0
        # In digest order, so concurrent commits of the same chunks cannot deadlock.
        ordered = sorted(entries, key=lambda e: e.digest)
        for i in range(0, len(ordered), _BATCH):
            part = ordered[i : i + _BATCH]
            rows = await conn.fetch(
                'INSERT INTO chunks (digest, pack, "offset", length, size, codec) '
                "SELECT d, $1, o, n, s, k FROM unnest($2::bytea[], $3::bigint[], "
                "$4::int[], $5::int[], $6::smallint[]) AS t(d, o, n, s, k) "
                "ON CONFLICT (digest) DO NOTHING RETURNING length",
                pack_id,
                [e.digest for e in part],
                [e.offset for e in part],
                [e.length for e in part],
                [e.size for e in part],
                [e.codec for e in part],
            )
            live += sum(HEADER_SIZE + r[0] for r in rows)
        if live:
            await conn.execute("UPDATE packs SET live = live + $1 WHERE id = $2", live, pack_id)

    async def packs(self) -> list[PackInfo]:
        async with self._db.connection() as conn:
            rows = await conn.fetch("SELECT name, size, live FROM packs ORDER BY id")
        return [PackInfo(r[0], r[1], r[2]) for r in rows]

    async def entries(self, pack: str) -> list[tuple[bytes, Location]]:
        async with self._db.connection() as conn:
            rows = await conn.fetch(
                'SELECT c.digest, c."offset", c.length, c.size, c.codec FROM chunks c '
                'JOIN packs p ON p.id = c.pack WHERE p.name = $1 ORDER BY c."offset"',
                pack,
            )
        return [(bytes(d), Location(pack, o, n, s, k)) for d, o, n, s, k in rows]

    async def all_records(self) -> list[tuple[bytes, bytes]]:
        async with self._db.connection() as conn:
            rows = await conn.fetch("SELECT digest, chunks FROM blobs")
        return [(bytes(d), bytes(c)) for d, c in rows]

    async def close(self) -> None:
        await self._db.close()


@dataclass(frozen=True)
class PackIndexConfig(PostgresConfig):
    """The ``index=postgresql://...`` of a ``packs+s3`` URL: checked like any PostgreSQL URL."""

    def build(self, ctx: Any = None) -> PostgresIndex:
        """The index; connects on first use."""
        return PostgresIndex(self)
