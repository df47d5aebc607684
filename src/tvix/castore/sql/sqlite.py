"""SQLite plumbing shared by the SQLite backends of both layers.

:class:`SQLiteDatabase` owns one connection in a worker thread and applies
versioned schemas per component (so several services may share one file);
:func:`select_in` runs an ``IN (...)`` query over any number of keys.
Durability (WAL with ``synchronous=FULL``) is discussed in
:mod:`tvix.castore.directoryservice.sqlite`.
"""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Self, TypeVar

from tvix.castore.composition import ServiceConfig, setting
from tvix.castore.errors import InvalidURLError, StorageError
from tvix.castore.sql.schema import CREATE_SCHEMA_TABLE, migration_statements
from tvix.castore.url import ServiceURL

__all__ = ["IN_BATCH", "SQLiteConfig", "SQLiteDatabase", "select_in"]

T = TypeVar("T")

# Parameters per ``IN (...)`` query: well below SQLite's limit (32766 since
# 3.32, 999 before), large enough that a level of a tree is a query or two.
IN_BATCH = 500


def select_in(
    conn: sqlite3.Connection, query: str, keys: Sequence[Any], batch: int = IN_BATCH
) -> Iterator[Any]:
    """The rows of ``query`` for ``keys``, ``batch`` keys per statement.

    ``query`` holds one ``{marks}`` where the ``IN`` list goes, e.g.
    ``"SELECT digest, data FROM t WHERE digest IN ({marks})"``.
    """
    for i in range(0, len(keys), batch):
        chunk = keys[i : i + batch]
        yield from conn.execute(query.format(marks=",".join("?" * len(chunk))), chunk)


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
        """The database file a ``sqlite://`` URL names.

        ``sqlite:///abs/path`` or, for a private in-memory one, ``sqlite://``.
        No host, no options.
        """
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
            conn.execute(CREATE_SCHEMA_TABLE)
            row = conn.execute(
                "SELECT version FROM tvix_schema WHERE component = ?", (self.component,)
            ).fetchone()
            have = 0 if row is None else int(row[0])
            want = len(self._migrations)
            where = f"database {self.path}"
            for statement in migration_statements(self._migrations, have, self.component, where):
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


@dataclass(frozen=True)
class SQLiteConfig(ServiceConfig):
    """``sqlite:///abs/path`` (``sqlite://``: private, in memory), or type ``sqlite`` with ``path``.

    The base of the SQLite services' configs; each builds its own service.
    """

    path: str = setting("path")

    @classmethod
    def from_url(cls, url: ServiceURL) -> Self:
        """See :meth:`SQLiteDatabase.path_from_url`."""
        return cls(SQLiteDatabase.path_from_url(url))

    def database_path(self) -> str:
        """The file, its directory created (SQLite creates a file but not its directory)."""
        if self.path != ":memory:":
            Path(self.path).parent.mkdir(parents=True, exist_ok=True)
        return self.path
