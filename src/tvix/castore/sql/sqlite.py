"""SQLite plumbing shared by the SQLite backends of both layers.

:class:`SQLiteDatabase` owns one connection in a worker thread and applies
versioned schemas per component (so several services may share one file);
:func:`select_in` runs an ``IN (...)`` query over any number of keys.
Durability (WAL with ``synchronous=FULL``) is discussed in
:mod:`tvix.castore.directoryservice.sqlite`.

A full disk: opening writes nothing when the schema is current, and a
database that cannot be opened normally on a full disk (a WAL database needs
its shared-memory file) is opened read-only (see
:meth:`SQLiteDatabase._open_read_only`), so reads keep working; writes then
fail with "no space left on device".
"""

from __future__ import annotations

import asyncio
import logging
import os
import sqlite3
import urllib.parse
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Self, TypeVar

from tvix.castore.composition import ServiceConfig, setting
from tvix.castore.errors import InvalidURLError, StorageError
from tvix.castore.sql.schema import CREATE_SCHEMA_TABLE, migration_statements
from tvix.castore.url import ServiceURL

__all__ = [
    "IN_BATCH",
    "SQLiteConfig",
    "SQLiteDatabase",
    "connect_immutable",
    "out_of_space",
    "select_in",
]

T = TypeVar("T")

# Parameters per ``IN (...)`` query: well below SQLite's limit (32766 since
# 3.32, 999 before), large enough that a level of a tree is a query or two.
IN_BATCH = 500
# Free bytes below which a failing database is taken to have hit a full disk.
_LOW_SPACE = 1 << 20

log = logging.getLogger(__name__)


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
        self._read_only = False

    async def run(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        """``fn(connection)`` in the database thread; :class:`StorageError` on database errors."""
        if self._closed:
            raise StorageError(f"database {self.path} is closed")
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._thread, self._call, fn)

    def _call(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        try:
            try:
                return fn(self._connection())
            except sqlite3.OperationalError as e:
                # Opened read-only on a full disk, asked to write: space may be back.
                if not (self._read_only and "readonly" in str(e) and self._reopen_writable()):
                    raise
            return fn(self._connection())
        except sqlite3.Error as e:
            raise StorageError(f"database {self.path}: {self._describe(e)}") from e

    def _describe(self, e: sqlite3.Error) -> str:
        """The error, said plainly when it is the disk being full."""
        if self._read_only and "readonly" in str(e):
            return "no space left on device (opened read-only while the disk was full)"
        if "disk is full" in str(e) or (
            isinstance(e, sqlite3.OperationalError) and out_of_space(self.path)
        ):
            return f"no space left on device ({e})"
        return str(e)

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
            try:
                conn = self._open_writable()
            except sqlite3.OperationalError as e:
                if self.path == ":memory:" or not out_of_space(self.path):
                    raise
                conn = self._open_read_only(e)
            self._conn = conn
        return conn

    def _open_writable(self) -> sqlite3.Connection:
        conn = sqlite3.connect(self.path, timeout=30, isolation_level=None)
        try:
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA synchronous=FULL")
            self._migrate(conn)
        except BaseException:
            conn.close()
            raise
        self._read_only = False
        return conn

    def _open_read_only(self, cause: sqlite3.OperationalError) -> sqlite3.Connection:
        """The database read-only, for a disk too full to open it normally.

        Opening a WAL database needs its shared-memory file, which a full
        disk cannot grow; read as immutable, it does not. That reads only the
        main file, so it is done only when the write-ahead log is empty
        (everything committed is in the main file, as after a clean close);
        otherwise ``cause`` is raised. Writes then fail saying the disk was
        full, or reopen the database normally once there is space again.
        """
        conn = connect_immutable(self.path, cause)
        try:
            if self._version(conn) != len(self._migrations):
                raise sqlite3.OperationalError(
                    f"its schema needs migrating, which needs free space ({cause})"
                )
        except BaseException:
            conn.close()
            raise
        log.info("database %s: the disk is full, opened read-only", self.path)
        self._read_only = True
        return conn

    def _reopen_writable(self) -> bool:
        """Replace a read-only connection by a normal one, if the disk has room again."""
        try:
            conn = self._open_writable()
        except sqlite3.OperationalError:
            return False
        if self._conn is not None:
            self._conn.close()
        self._conn = conn
        return True

    def _version(self, conn: sqlite3.Connection) -> int:
        """The schema version of this component (0 if none), read only."""
        try:
            row = conn.execute(
                "SELECT version FROM tvix_schema WHERE component = ?", (self.component,)
            ).fetchone()
        except sqlite3.OperationalError as e:
            if "no such table" in str(e):
                return 0
            raise
        return 0 if row is None else int(row[0])

    def _migrate(self, conn: sqlite3.Connection) -> None:
        if self._version(conn) == len(self._migrations):
            return  # nothing to write: opening needs no free space

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


def connect_immutable(
    path: str, cause: sqlite3.OperationalError, *, check_same_thread: bool = True
) -> sqlite3.Connection:
    """``path`` opened read-only as immutable, for a disk too full to open it normally.

    Opening a WAL database needs its shared-memory file, which a full disk
    cannot grow; read as immutable, it does not. That reads only the main
    file, so it is done only when the write-ahead log is empty (everything
    committed is in the main file, as after a clean close); otherwise
    ``cause`` is raised.
    """
    try:
        wal = os.path.getsize(path + "-wal")
    except FileNotFoundError:
        wal = 0
    if wal:
        raise cause
    uri = f"file:{urllib.parse.quote(path)}?mode=ro&immutable=1"
    return sqlite3.connect(
        uri, uri=True, timeout=30, isolation_level=None, check_same_thread=check_same_thread
    )


def out_of_space(path: str) -> bool:
    """Whether the filesystem holding ``path`` has (next to) no space left."""
    try:
        st = os.statvfs(os.path.dirname(os.path.abspath(path)))
    except OSError:
        return False
    return st.f_bavail * st.f_frsize < _LOW_SPACE


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
