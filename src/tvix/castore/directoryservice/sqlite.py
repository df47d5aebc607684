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

:class:`SQLiteDatabase` is the shared plumbing (a connection owned by one
worker thread, versioned schemas per component), reused by the SQLite
PathInfo service.
"""

from __future__ import annotations

import asyncio
import sqlite3
import time
from collections.abc import AsyncIterator, Callable, Sequence, Set
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

import blake3
from typing_extensions import override

from tvix.castore.digest import B3Digest
from tvix.castore.directory import Directory
from tvix.castore.directoryservice.base import (
    DirectoryPutter,
    DirectoryService,
    DirectorySweep,
)
from tvix.castore.directoryservice.closure import BufferedDirectoryPutter
from tvix.castore.directoryservice.traverse import traverse_bfs
from tvix.castore.errors import IntegrityError, InvalidURLError, StorageError, ValidationError
from tvix.castore.proto import directory_from_bytes
from tvix.castore.url import ServiceURL

__all__ = ["SQLiteDatabase", "SQLiteDirectoryService"]

T = TypeVar("T")

# Parameters per ``IN (...)`` query: well below SQLite's limit (32766 since
# 3.32, 999 before), large enough that a level of a tree is a query or two.
IN_BATCH = 500


class SQLiteDatabase:
    """An SQLite database file whose one connection lives in a dedicated thread.

    Every call goes through :meth:`run`, which executes a function with the
    connection in that thread, so calls are serialised (SQLite allows one
    writer anyway) and the event loop never blocks. The connection is in
    autocommit mode: a function that writes opens its own transaction (see
    :meth:`transaction`).

    ``component`` names the schema in the ``tvix_schema`` table (so several
    services may share one file), and ``migrations`` lists SQL scripts, the
    i-th bringing the schema from version i to i+1. They are applied on
    first use. A database whose version for ``component`` is newer than
    ``len(migrations)`` is refused with a :class:`StorageError` saying so.
    ``path`` ``":memory:"`` is a private in-memory database.
    """

    def __init__(self, path: str, component: str, migrations: Sequence[str]) -> None:
        self.path = path
        self.component = component
        self._migrations = list(migrations)
        self._conn: sqlite3.Connection | None = None
        self._thread = ThreadPoolExecutor(1, thread_name_prefix=f"tvix-sqlite-{component}")
        self._closed = False

    async def run(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        """``fn(connection)`` in the database thread; :class:`StorageError` on database errors."""
        if self._closed:
            raise StorageError(f"database {self.path} is closed")
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._thread, self._call, fn)

    def _call(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        try:
            return fn(self._connection())
        except sqlite3.Error as e:
            raise StorageError(f"database {self.path}: {e}") from e

    @staticmethod
    def path_from_url(url: ServiceURL) -> str:
        """The database file a ``sqlite://`` URL names: ``sqlite:///abs/path`` or, for
        a private in-memory one, ``sqlite://``. No host, no options."""
        url.reject_host()
        url.reject_params()
        if url.path in ("", "/"):
            return ":memory:"
        if url.path.endswith("/"):
            raise InvalidURLError(f"invalid service URL {url.raw!r}: the path names a directory")
        return url.path

    @staticmethod
    def transaction(conn: sqlite3.Connection, fn: Callable[[sqlite3.Connection], T]) -> T:
        """``fn(conn)`` in a write transaction: all of it is committed, or nothing."""
        # IMMEDIATE takes the write lock up front, so a concurrent writer in
        # another process waits (busy timeout) instead of failing mid-way.
        conn.execute("BEGIN IMMEDIATE")
        try:
            result = fn(conn)
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        conn.execute("COMMIT")
        return result

    def _connection(self) -> sqlite3.Connection:
        conn = self._conn
        if conn is None:
            conn = sqlite3.connect(self.path, timeout=30, isolation_level=None)
            try:
                conn.execute("PRAGMA journal_mode=WAL")
                conn.execute("PRAGMA synchronous=FULL")
                self._migrate(conn)
            except BaseException:
                conn.close()
                raise
            self._conn = conn
        return conn

    def _migrate(self, conn: sqlite3.Connection) -> None:
        def migrate(conn: sqlite3.Connection) -> None:
            conn.execute(
                "CREATE TABLE IF NOT EXISTS tvix_schema "
                "(component TEXT PRIMARY KEY, version INTEGER NOT NULL)"
            )
            row = conn.execute(
                "SELECT version FROM tvix_schema WHERE component = ?", (self.component,)
            ).fetchone()
            have = 0 if row is None else int(row[0])
            want = len(self._migrations)
            if have > want:
                raise StorageError(
                    f"database {self.path} has schema version {have} for {self.component}, "
                    f"newer than the {want} this version of tvix knows; use a newer tvix"
                )
            for script in self._migrations[have:]:
                # executescript would commit our transaction; run statement by statement.
                for statement in script.split(";"):
                    if statement.strip():
                        conn.execute(statement)
            if have != want:
                conn.execute(
                    "INSERT OR REPLACE INTO tvix_schema VALUES (?, ?)", (self.component, want)
                )

        self.transaction(conn, migrate)

    async def close(self) -> None:
        """Close the connection and stop the thread; idempotent."""
        if self._closed:
            return
        self._closed = True

        def close() -> None:
            if self._conn is not None:
                self._conn.close()
                self._conn = None

        await asyncio.get_running_loop().run_in_executor(self._thread, close)
        self._thread.shutdown(wait=False)


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


def _decode(digest: bytes, data: bytes) -> Directory:
    """A stored Directory, checked against its digest (the file may be damaged or edited)."""
    if blake3.blake3(data).digest() != digest:
        raise IntegrityError(f"Directory {digest.hex()}: stored encoding does not match")
    try:
        return directory_from_bytes(data)
    except ValidationError as e:
        raise IntegrityError(f"Directory {digest.hex()}: stored encoding is invalid: {e}") from e


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

    @classmethod
    def from_url(cls, url: ServiceURL) -> SQLiteDirectoryService:
        """``sqlite:///abs/path.db`` (created if absent), or ``sqlite://`` for in-memory."""
        return cls(SQLiteDatabase.path_from_url(url))

    async def get(self, digest: B3Digest) -> Directory | None:
        def get(conn: sqlite3.Connection) -> Directory | None:
            row = conn.execute(
                "SELECT data FROM directories WHERE digest = ?", (digest,)
            ).fetchone()
            return None if row is None else _decode(digest, row[0])

        return await self._db.run(get)

    async def _get_many(self, digests: Sequence[B3Digest]) -> dict[B3Digest, Directory]:
        def get_many(conn: sqlite3.Connection) -> dict[B3Digest, Directory]:
            out: dict[B3Digest, Directory] = {}
            for i in range(0, len(digests), IN_BATCH):
                batch = digests[i : i + IN_BATCH]
                marks = ",".join("?" * len(batch))
                for digest, data in conn.execute(
                    f"SELECT digest, data FROM directories WHERE digest IN ({marks})", batch
                ):
                    out[B3Digest(digest)] = _decode(digest, data)
            return out

        return await self._db.run(get_many)

    async def _sizes(self, digests: list[B3Digest]) -> dict[B3Digest, int]:
        def sizes(conn: sqlite3.Connection) -> dict[B3Digest, int]:
            out: dict[B3Digest, int] = {}
            for i in range(0, len(digests), IN_BATCH):
                batch = digests[i : i + IN_BATCH]
                marks = ",".join("?" * len(batch))
                for digest, size in conn.execute(
                    f"SELECT digest, size FROM directories WHERE digest IN ({marks})", batch
                ):
                    out[B3Digest(digest)] = size
            return out

        return await self._db.run(sizes)

    def get_recursive(self, root: B3Digest) -> AsyncIterator[Directory]:
        return traverse_bfs(self._get_many, root)

    def put_multiple_start(self) -> DirectoryPutter:
        return BufferedDirectoryPutter(self._commit, self._sizes)

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

    async def close(self) -> None:
        await self._db.close()
