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
from typing_extensions import override

from tvix.castore.blobservice.packs._format import HEADER_SIZE, Location
from tvix.castore.blobservice.packs._index import (
    Entry,
    PackIndex,
    PackInfo,
    SweepResult,
    decode_record,
    now,
)
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
    # 2: when each chunk and blob record was last written or refreshed (garbage collection).
    """
    ALTER TABLE chunks ADD COLUMN seen BIGINT NOT NULL DEFAULT 0;
    ALTER TABLE blobs ADD COLUMN seen BIGINT NOT NULL DEFAULT 0
    """,
]

# A sweep locks out writes (not reads) to the index while it decides and deletes.
_LOCK_WRITES = "LOCK TABLE packs, chunks, blobs IN SHARE ROW EXCLUSIVE MODE"


class PostgresIndex(PackIndex):
    """A :class:`PackIndex` in a PostgreSQL database.

    Its URL is what the PostgreSQL services take (``schema=`` and ``pool_size=`` too).
    Supports garbage collection: a sweep locks the tables against writes
    (not reads) while it runs.
    """

    supports_gc = True

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
                records = list(dict(records).items())  # once each: ON CONFLICT updates
                await conn.execute(
                    "INSERT INTO blobs (digest, chunks, seen) "
                    "SELECT d, c, $3 FROM unnest($1::bytea[], $2::bytea[]) AS t(d, c) "
                    "ON CONFLICT (digest) DO UPDATE SET seen = EXCLUDED.seen",
                    [r[0] for r in records],
                    [r[1] for r in records],
                    now(),
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
        ordered = sorted({e.digest: e for e in entries}.values(), key=lambda e: e.digest)
        for i in range(0, len(ordered), _BATCH):
            part = ordered[i : i + _BATCH]
            # Rows stored by another writer are refreshed (xmax <> 0), not counted live.
            rows = await conn.fetch(
                'INSERT INTO chunks (digest, pack, "offset", length, size, codec, seen) '
                "SELECT d, $1, o, n, s, k, $7 FROM unnest($2::bytea[], $3::bigint[], "
                "$4::int[], $5::int[], $6::smallint[]) AS t(d, o, n, s, k) "
                "ON CONFLICT (digest) DO UPDATE SET seen = EXCLUDED.seen "
                "RETURNING length, (xmax = 0) AS inserted",
                pack_id,
                [e.digest for e in part],
                [e.offset for e in part],
                [e.length for e in part],
                [e.size for e in part],
                [e.codec for e in part],
                now(),
            )
            live += sum(HEADER_SIZE + r[0] for r in rows if r[1])
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

    @override
    async def refresh(self, digests: Sequence[bytes], fresh_after: int) -> set[bytes]:
        present: set[bytes] = set()
        async with self._db.connection() as conn:
            for i in range(0, len(digests), _BATCH):
                part = list(digests[i : i + _BATCH])
                stale: list[bytes] = []
                for table in ("chunks", "blobs"):
                    for d, seen in await conn.fetch(
                        f"SELECT digest, seen FROM {table} WHERE digest = ANY($1)", part
                    ):
                        if seen >= fresh_after:
                            present.add(bytes(d))
                        else:
                            stale.append(bytes(d))
                if stale:
                    async with conn.transaction():
                        t = now()
                        for table in ("chunks", "blobs"):
                            rows = await conn.fetch(
                                f"UPDATE {table} SET seen = $1 WHERE digest = ANY($2) "
                                "RETURNING digest",
                                t,
                                stale,
                            )
                            present.update(bytes(r[0]) for r in rows)
        return present

    @override
    async def sweep(self, live: set[bytes], cutoff: float, *, dry_run: bool = False) -> SweepResult:
        result = SweepResult()
        async with self._db.connection() as conn:
            tr = conn.transaction()
            await tr.start()
            try:
                await conn.execute(_LOCK_WRITES)
                await conn.execute(
                    "CREATE TEMP TABLE gc_live (digest BYTEA PRIMARY KEY) ON COMMIT DROP"
                )
                keep = list(live)
                for i in range(0, len(keep), _BATCH):
                    await conn.execute(
                        "INSERT INTO gc_live SELECT unnest($1::bytea[]) ON CONFLICT DO NOTHING",
                        keep[i : i + _BATCH],
                    )
                dead_sql = (
                    "seen < $1::float8 AND "
                    "NOT EXISTS (SELECT 1 FROM gc_live l WHERE l.digest = {t}.digest)"
                )
                status = await conn.execute(
                    f"DELETE FROM blobs WHERE {dead_sql.format(t='blobs')}", cutoff
                )
                result.records = int(status.split()[-1])
                for digest, raw in await conn.fetch("SELECT digest, chunks FROM blobs"):
                    listed = [bytes(c.digest) for c in decode_record(bytes(raw), bytes(digest))]
                    await conn.execute(
                        "INSERT INTO gc_live SELECT unnest($1::bytea[]) ON CONFLICT DO NOTHING",
                        listed,
                    )
                dead = dead_sql.format(t="chunks")
                freed = await conn.fetch(
                    f"SELECT pack, count(*), sum(length + {HEADER_SIZE}) FROM chunks "
                    f"WHERE {dead} GROUP BY pack",
                    cutoff,
                )
                await conn.execute(f"DELETE FROM chunks WHERE {dead}", cutoff)
                for pack_id, count, nbytes in freed:
                    result.chunks += count
                    result.bytes += int(nbytes)
                    await conn.execute(
                        "UPDATE packs SET live = live - $1 WHERE id = $2", int(nbytes), pack_id
                    )
            except BaseException:
                await tr.rollback()
                raise
            if dry_run:
                await tr.rollback()
            else:
                await tr.commit()
        return result

    @override
    async def relocate(
        self, old: str, new: str, size: int, moves: Sequence[Entry]
    ) -> tuple[int, bool]:
        moved = 0
        async with self._db.connection() as conn, conn.transaction():
            old_id = await conn.fetchval("SELECT id FROM packs WHERE name = $1", old)
            if old_id is not None:
                new_id = await conn.fetchval(
                    "INSERT INTO packs (name, size, live) VALUES ($1, $2, 0) "
                    "ON CONFLICT (name) DO UPDATE SET size = GREATEST(packs.size, EXCLUDED.size) "
                    "RETURNING id",
                    new,
                    size,
                )
                ordered = sorted(moves, key=lambda e: e.digest)
                rows = await conn.fetch(
                    'UPDATE chunks c SET pack = $1, "offset" = t.o, length = t.n, codec = t.k '
                    "FROM unnest($2::bytea[], $3::bigint[], $4::int[], $5::smallint[]) "
                    "AS t(d, o, n, k) WHERE c.digest = t.d AND c.pack = $6 RETURNING t.n",
                    new_id,
                    [e.digest for e in ordered],
                    [e.offset for e in ordered],
                    [e.length for e in ordered],
                    [e.codec for e in ordered],
                    old_id,
                )
                moved = sum(HEADER_SIZE + r[0] for r in rows)
                await conn.execute("UPDATE packs SET live = live + $1 WHERE id = $2", moved, new_id)
                await conn.execute("UPDATE packs SET live = live - $1 WHERE id = $2", moved, old_id)
            gone = await self._forget_if_empty(conn, old)
        return moved, gone

    @staticmethod
    async def _forget_if_empty(conn: asyncpg.Connection, pack: str) -> bool:
        pack_id = await conn.fetchval("SELECT id FROM packs WHERE name = $1 FOR UPDATE", pack)
        if pack_id is None:
            return True
        if await conn.fetchval("SELECT 1 FROM chunks WHERE pack = $1 LIMIT 1", pack_id):
            return False
        await conn.execute("DELETE FROM packs WHERE id = $1", pack_id)
        return True

    @override
    async def forget_if_empty(self, pack: str) -> bool:
        async with self._db.connection() as conn, conn.transaction():
            return await self._forget_if_empty(conn, pack)

    @override
    async def drop(
        self, chunks: Sequence[tuple[bytes, Location]], records: Sequence[bytes] = ()
    ) -> int:
        dropped = 0
        async with self._db.connection() as conn, conn.transaction():
            for digest, loc in chunks:
                pack_id = await conn.fetchval(
                    'DELETE FROM chunks WHERE digest = $1 AND "offset" = $2 AND pack = '
                    "(SELECT id FROM packs WHERE name = $3) RETURNING pack",
                    digest,
                    loc.offset,
                    loc.pack,
                )
                if pack_id is not None:
                    dropped += 1
                    await conn.execute(
                        "UPDATE packs SET live = live - $1 WHERE id = $2",
                        HEADER_SIZE + loc.length,
                        pack_id,
                    )
            if records:
                rows = await conn.fetch(
                    "DELETE FROM blobs WHERE digest = ANY($1) RETURNING digest", list(records)
                )
                dropped += len(rows)
        return dropped

    async def close(self) -> None:
        await self._db.close()


@dataclass(frozen=True)
class PackIndexConfig(PostgresConfig):
    """The ``index=postgresql://...`` of a ``packs+s3`` URL: checked like any PostgreSQL URL."""

    def build(self, ctx: Any = None) -> PostgresIndex:
        """The index; connects on first use."""
        return PostgresIndex(self)
