"""``postgresql://user@host:port/db``: Directories in a PostgreSQL database.

The shared metadata store of several machines: every daemon pointed at the
same database sees the same Directories. Built on asyncpg with a pool of
connections, created on first use (a URL can be parsed without a running
event loop or a reachable server).

URL: ``postgresql://`` or ``postgres://``, then what libpq takes: user,
password, host(s), port, database, and these libpq query options, passed
through to asyncpg (which understands them): ``host``, ``port``,
``dbname``, ``user``, ``password``, ``passfile``, ``service``, ``sslmode``,
``sslcert``, ``sslkey``, ``sslrootcert``, ``sslcrl``, ``sslpassword``,
``sslnegotiation``, ``ssl_min_protocol_version``,
``ssl_max_protocol_version``, ``target_session_attrs``, ``krbsrvname``,
``gsslib``, ``application_name``. Options of ours, removed before the URL
reaches asyncpg:

``schema=NAME``
    keep the tables in schema ``NAME`` (created if absent) instead of
    ``public``: several stores (or tests) can share one database.
``pool_size=N``
    at most ``N`` connections (default 10).

Anything else is rejected: asyncpg would send an unknown option to the
server as a run-time setting, and a typo would surface only at the first
connection, as a server error. The ``PG*`` environment variables
(``PGHOST``, ``PGPASSWORD``, ...) fill in what the URL leaves out, as in libpq.

Schema: created on first use and versioned per component in the
``tvix_schema`` table, as in the SQLite backend; migrations run in one
transaction under an advisory lock, so daemons starting together against a
new database do not race. A database whose version is newer than this code
knows is refused.

Directories are stored as their canonical encoding under their digest, with
their ``size`` (so closure validation needs no decoding), and are verified
against the digest and decoded when read. A closure is stored in one
transaction (``INSERT ... SELECT FROM unnest(...)``: a few statements, not
one per Directory); ``get_recursive`` costs one query per level of the tree
(``digest = ANY($1)``).

:class:`~tvix.castore.sql.postgres.PostgresDatabase` is the shared plumbing
(the pool, migrations, the one place where asyncpg's errors become
:class:`~tvix.castore.errors.StorageError`), also used by the PostgreSQL
PathInfo service; it and :func:`~tvix.castore.sql.postgres.storage_errors`
are re-exported here.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Sequence, Set
from dataclasses import dataclass

from typing_extensions import override

from tvix.castore.composition import BuildContext
from tvix.castore.digest import B3Digest
from tvix.castore.directory import Directory
from tvix.castore.directoryservice.base import (
    DirectoryPutter,
    DirectoryService,
    DirectorySweep,
)
from tvix.castore.directoryservice.closure import BufferedDirectoryPutter
from tvix.castore.directoryservice.traverse import traverse_bfs
from tvix.castore.errors import ValidationError
from tvix.castore.proto import directory_from_bytes
from tvix.castore.sql.postgres import PostgresConfig, PostgresDatabase, storage_errors
from tvix.castore.sql.records import decode_directory

__all__ = [
    "PostgresConfig",
    "PostgresDatabase",
    "PostgresDirectoryService",
    "PostgresDirectoryServiceConfig",
    "storage_errors",
]

# Digests per ``= ANY($1)`` query and rows per insert statement: keeps each
# message a few MiB at most, while a level of a tree is still one query or two.
BATCH = 10_000
# Decoding this many Directories goes to a thread, so the event loop keeps serving.
_THREAD_DECODE = 256


MIGRATIONS = [
    # 1: the canonical encoding of each Directory under its digest, and its size.
    """
    CREATE TABLE directories (
        digest BYTEA PRIMARY KEY CHECK (octet_length(digest) = 32),
        data BYTEA NOT NULL,
        size BIGINT NOT NULL
    )
    """,
    # 2: when each Directory was last written or refreshed, for garbage collection.
    """
    ALTER TABLE directories ADD COLUMN seen BIGINT NOT NULL DEFAULT 0
    """,
]

# A stored Directory is refreshed when last seen longer ago than this (seconds).
REFRESH_SLACK = 60
# A sweep locks the table against writes (not reads) while it decides and deletes.
_LOCK_WRITES = "LOCK TABLE directories IN SHARE ROW EXCLUSIVE MODE"


def _decode_rows(rows: Sequence[tuple[bytes, bytes]]) -> dict[B3Digest, Directory]:
    return {B3Digest(digest): decode_directory(digest, data) for digest, data in rows}


class PostgresDirectoryService(DirectoryService):
    """Directories in one table of a PostgreSQL database (see the module docs).

    Supports garbage collection (:meth:`sweep`), which locks the table
    against writes while it runs.
    """

    supports_gc = True

    def __init__(self, db: PostgresDatabase) -> None:
        self._db = db

    @override
    async def get(self, digest: B3Digest) -> Directory | None:
        async with self._db.connection() as conn:
            data = await conn.fetchval("SELECT data FROM directories WHERE digest = $1", digest)
        return None if data is None else decode_directory(digest, data)

    async def _get_many(self, digests: Sequence[B3Digest]) -> dict[B3Digest, Directory]:
        rows: list[tuple[bytes, bytes]] = []
        async with self._db.connection() as conn:
            for i in range(0, len(digests), BATCH):
                batch = list(digests[i : i + BATCH])
                rows.extend(
                    (r[0], r[1])
                    for r in await conn.fetch(
                        "SELECT digest, data FROM directories WHERE digest = ANY($1::bytea[])",
                        batch,
                    )
                )
        if len(rows) >= _THREAD_DECODE:
            return await asyncio.to_thread(_decode_rows, rows)
        return _decode_rows(rows)

    @override
    def get_recursive(self, root: B3Digest) -> AsyncIterator[Directory]:
        return traverse_bfs(self._get_many, root)

    @override
    def put_multiple_start(self) -> DirectoryPutter:
        return BufferedDirectoryPutter(self._commit, self._get_many)

    async def _commit(self, root: B3Digest, directories: list[Directory]) -> None:
        digests = [d.digest for d in directories]
        datas = [d.encode() for d in directories]
        sizes = [d.size for d in directories]
        inside = set(digests)
        outside = sorted({c.digest for d in directories for c in d.directories} - inside)
        now = int(time.time())
        async with self._db.connection() as conn, conn.transaction():
            for i in range(0, len(digests), BATCH):
                # Stored ones are refreshed (see the DirectoryService docs).
                await conn.execute(
                    "INSERT INTO directories (digest, data, size, seen) "
                    "SELECT d, x, s, $4 FROM unnest($1::bytea[], $2::bytea[], $3::bigint[]) "
                    "AS t(d, x, s) ON CONFLICT (digest) DO UPDATE SET seen = EXCLUDED.seen "
                    "WHERE directories.seen < $5",
                    digests[i : i + BATCH],
                    datas[i : i + BATCH],
                    sizes[i : i + BATCH],
                    now,
                    now - REFRESH_SLACK,
                )
            for i in range(0, len(outside), BATCH):
                batch = outside[i : i + BATCH]
                await conn.execute(
                    "UPDATE directories SET seen = $1 WHERE seen < $2 AND digest = ANY($3)",
                    now,
                    now - REFRESH_SLACK,
                    batch,
                )
                found = await conn.fetchval(
                    "SELECT count(*) FROM directories WHERE digest = ANY($1)", batch
                )
                if found != len(batch):
                    raise ValidationError(
                        "the closure refers to a Directory no longer stored (deleted by a "
                        "garbage collection meanwhile); put it again"
                    )

    @override
    async def sweep(
        self, keep: Set[B3Digest], cutoff: float, *, dry_run: bool = False
    ) -> DirectorySweep:
        result = DirectorySweep()
        async with self._db.connection() as conn, conn.transaction():
            await conn.execute(_LOCK_WRITES)
            rows = await conn.fetch("SELECT digest, seen FROM directories")
            frontier = [
                B3Digest(bytes(r[0])) for r in rows if r[1] >= cutoff and bytes(r[0]) not in keep
            ]
            kept = result.kept
            kept.update(frontier)
            while frontier:
                below: list[B3Digest] = []
                for i in range(0, len(frontier), BATCH):
                    for (data,) in await conn.fetch(
                        "SELECT data FROM directories WHERE digest = ANY($1::bytea[])",
                        frontier[i : i + BATCH],
                    ):
                        for child in directory_from_bytes(bytes(data)).directories:
                            if child.digest not in keep and child.digest not in kept:
                                kept.add(child.digest)
                                below.append(child.digest)
                frontier = below
            doomed = [bytes(r[0]) for r in rows if bytes(r[0]) not in keep]
            doomed = [d for d in doomed if d not in kept]
            result.deleted = len(doomed)
            if not dry_run:
                for i in range(0, len(doomed), BATCH):
                    await conn.execute(
                        "DELETE FROM directories WHERE digest = ANY($1::bytea[])",
                        doomed[i : i + BATCH],
                    )
        return result

    @override
    async def remove(self, digests: Sequence[B3Digest]) -> int:
        async with self._db.connection() as conn, conn.transaction():
            rows = await conn.fetch(
                "DELETE FROM directories WHERE digest = ANY($1::bytea[]) RETURNING digest",
                list(digests),
            )
        return len(rows)

    @override
    async def close(self) -> None:
        await self._db.close()


@dataclass(frozen=True)
class PostgresDirectoryServiceConfig(PostgresConfig):
    """Directories in PostgreSQL (see :class:`PostgresConfig`)."""

    def build(self, ctx: BuildContext) -> PostgresDirectoryService:
        """Connects on first use."""
        return PostgresDirectoryService(self.database("castore.directories", MIGRATIONS))
