"""``sqlite:///abs/path.db``: Directories in an embedded SQLite database.

The default metadata store of a single machine: no server, crash-safe, in
the standard library, and what Nix itself keeps its metadata in. Measured
with ``bench/bench_metadata_db.py`` (a closure of 50,000 Directories in one
transaction, synchronous commits, 2 shared cores):

======================== ============ ============== ==================
engine                   put (dirs/s) point get (/s) get_recursive (/s)
======================== ============ ============== ==================
SQLite, raw              110-120k     54-63k
LMDB, raw                300-355k     590-750k
this service (SQLite)    77-105k      5-6k           12.6-12.9k
======================== ============ ============== ==================

LMDB is 3x faster at puts and 10x at raw point lookups, but neither is the
bottleneck: through the service a lookup costs a thread handoff plus
decoding and verifying the Directory (~80 us for a small one), so LMDB
would gain little where it counts, while SQLite needs nothing installed,
can be inspected with any ``sqlite3`` shell, gives the PathInfo service
transactions over several tables, and has no fixed map size to outgrow.

Durability: WAL journal with ``synchronous=FULL``. WAL alone keeps the file
consistent through any crash; FULL also syncs the log at every commit, so
a closure acknowledged to a client survives a power loss. That matters
because the blob objects and PathInfos that refer to Directories live
elsewhere and do not roll back with this file. The cost is one fsync per
closure (closures are put in one transaction, so it is paid per tree, not
per Directory).

:class:`~tvix.castore.sql.sqlite.SQLiteDatabase` is the shared plumbing (a
connection owned by one worker thread, versioned schemas per component),
also used by the SQLite PathInfo service; it is re-exported here.
"""

from __future__ import annotations

import sqlite3
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
from tvix.castore.sql.records import decode_directory
from tvix.castore.sql.sqlite import IN_BATCH, SQLiteConfig, SQLiteDatabase, select_in

__all__ = [
    "SQLiteConfig",
    "SQLiteDatabase",
    "SQLiteDirectoryService",
    "SQLiteDirectoryServiceConfig",
]

MIGRATIONS = [
    # 1: the canonical encoding of each Directory under its digest; size is the
    # Directory's size, so closure validation needs no decoding.
    """
    CREATE TABLE directories (
        digest BLOB PRIMARY KEY,
        data BLOB NOT NULL,
        size INTEGER NOT NULL
    )
    """,
    # 2: when each Directory was last written or refreshed (unix seconds), for
    # garbage collection; Directories from before count as written long ago.
    """
    ALTER TABLE directories ADD COLUMN seen INTEGER NOT NULL DEFAULT 0
    """,
]

# A stored Directory is refreshed when last seen longer ago than this
# (seconds); a GC's grace period must be longer.
REFRESH_SLACK = 60


class SQLiteDirectoryService(DirectoryService):
    """Directories in one table of an SQLite file; a closure is one transaction.

    Supports garbage collection (:meth:`sweep`): each row records when it was
    last written or refreshed.

    Directories read back are verified against their digest (damage raises
    :class:`~tvix.castore.errors.IntegrityError`). ``get_recursive`` costs one
    query per level of the tree.
    """

    supports_gc = True

    def __init__(self, path: str) -> None:
        """Use the database file at ``path`` (created if absent), or ``":memory:"``."""
        self._db = SQLiteDatabase(path, "castore.directories", MIGRATIONS)

    @override
    async def get(self, digest: B3Digest) -> Directory | None:
        def get(conn: sqlite3.Connection) -> Directory | None:
            row = conn.execute(
                "SELECT data FROM directories WHERE digest = ?", (digest,)
            ).fetchone()
            return None if row is None else decode_directory(digest, row[0])

        return await self._db.run(get)

    async def _get_many(self, digests: Sequence[B3Digest]) -> dict[B3Digest, Directory]:
        def get_many(conn: sqlite3.Connection) -> dict[B3Digest, Directory]:
            query = "SELECT digest, data FROM directories WHERE digest IN ({marks})"
            return {
                B3Digest(digest): decode_directory(digest, data)
                for digest, data in select_in(conn, query, digests)
            }

        return await self._db.run(get_many)

    @override
    def get_recursive(self, root: B3Digest) -> AsyncIterator[Directory]:
        return traverse_bfs(self._get_many, root)

    @override
    def put_multiple_start(self) -> DirectoryPutter:
        return BufferedDirectoryPutter(self._commit, self._get_many)

    async def _commit(self, root: B3Digest, directories: list[Directory]) -> None:
        now = int(time.time())
        rows = [(d.digest, d.encode(), d.size, now) for d in directories]
        inside = {d.digest for d in directories}
        outside = list({c.digest for d in directories for c in d.directories} - inside)

        def insert(conn: sqlite3.Connection) -> None:
            # Stored ones are refreshed (see the DirectoryService docs), and the
            # stored children the closure refers to must still be there.
            conn.executemany(
                "INSERT INTO directories VALUES (?, ?, ?, ?) ON CONFLICT (digest) "
                "DO UPDATE SET seen = excluded.seen WHERE seen < ?",
                [(*r, now - REFRESH_SLACK) for r in rows],
            )
            for i in range(0, len(outside), IN_BATCH):
                batch = outside[i : i + IN_BATCH]
                marks = ",".join("?" * len(batch))
                conn.execute(
                    f"UPDATE directories SET seen = ? WHERE seen < ? AND digest IN ({marks})",
                    [now, now - REFRESH_SLACK, *batch],
                )
                (found,) = conn.execute(
                    f"SELECT count(*) FROM directories WHERE digest IN ({marks})", batch
                ).fetchone()
                if found != len(batch):
                    raise ValidationError(
                        "the closure refers to a Directory no longer stored (deleted by a "
                        "garbage collection meanwhile); put it again"
                    )

        await self._db.run(lambda conn: SQLiteDatabase.transaction(conn, insert))

    @override
    async def sweep(
        self, keep: Set[B3Digest], cutoff: float, *, dry_run: bool = False
    ) -> DirectorySweep:
        def sweep(conn: sqlite3.Connection) -> DirectorySweep:
            result = DirectorySweep()
            rows = conn.execute("SELECT digest, seen FROM directories").fetchall()
            frontier = [B3Digest(d) for d, seen in rows if seen >= cutoff and d not in keep]
            kept = result.kept
            kept.update(frontier)
            while frontier:
                below: list[B3Digest] = []
                for i in range(0, len(frontier), IN_BATCH):
                    batch = frontier[i : i + IN_BATCH]
                    marks = ",".join("?" * len(batch))
                    for (data,) in conn.execute(
                        f"SELECT data FROM directories WHERE digest IN ({marks})", batch
                    ):
                        for child in directory_from_bytes(data).directories:
                            if child.digest not in keep and child.digest not in kept:
                                kept.add(child.digest)
                                below.append(child.digest)
                frontier = below
            doomed = [(d,) for d, _seen in rows if d not in keep and d not in kept]
            result.deleted = len(doomed)
            if not dry_run:
                conn.executemany("DELETE FROM directories WHERE digest = ?", doomed)
            return result

        return await self._db.run(lambda conn: SQLiteDatabase.transaction(conn, sweep))

    @override
    async def remove(self, digests: Sequence[B3Digest]) -> int:
        def remove(conn: sqlite3.Connection) -> int:
            return sum(
                conn.execute("DELETE FROM directories WHERE digest = ?", (d,)).rowcount
                for d in digests
            )

        return await self._db.run(lambda conn: SQLiteDatabase.transaction(conn, remove))

    @override
    async def close(self) -> None:
        await self._db.close()


@dataclass(frozen=True)
class SQLiteDirectoryServiceConfig(SQLiteConfig):
    """Directories in an SQLite file (see :class:`SQLiteConfig`)."""

    def build(self, ctx: BuildContext) -> SQLiteDirectoryService:
        """Opens the file on first use."""
        return SQLiteDirectoryService(self.database_path())
