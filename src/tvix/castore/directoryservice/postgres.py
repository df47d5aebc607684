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

:class:`PostgresDatabase` is the shared plumbing (the pool, migrations, the
one place where asyncpg's errors become :class:`StorageError`), reused by the
PostgreSQL PathInfo service.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Iterator, Sequence, Set
from typing import Self
from urllib.parse import urlencode, urlsplit, urlunsplit

import asyncpg
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

__all__ = ["PostgresDatabase", "PostgresDirectoryService", "storage_errors"]

# libpq's connection options that asyncpg understands (see its connect_utils).
LIBPQ_OPTIONS = (
    "host",
    "port",
    "dbname",
    "user",
    "password",
    "passfile",
    "service",
    "sslmode",
    "sslcert",
    "sslkey",
    "sslrootcert",
    "sslcrl",
    "sslpassword",
    "sslnegotiation",
    "ssl_min_protocol_version",
    "ssl_max_protocol_version",
    "target_session_attrs",
    "krbsrvname",
    "gsslib",
    "application_name",
)
OWN_OPTIONS = ("schema", "pool_size")
DEFAULT_POOL_SIZE = 10
# Digests per ``= ANY($1)`` query and rows per insert statement: keeps each
# message a few MiB at most, while a level of a tree is still one query or two.
BATCH = 10_000
# Decoding this many Directories goes to a thread, so the event loop keeps serving.
_THREAD_DECODE = 256
# pg_advisory_xact_lock key taken while migrating ("tvix" in ASCII).
_MIGRATION_LOCK = 0x74766978

_CONNECTION_ERRORS: tuple[type[BaseException], ...] = (
    asyncpg.PostgresError,
    asyncpg.InterfaceError,
    OSError,
    asyncio.TimeoutError,
)


@contextlib.contextmanager
def storage_errors(where: str) -> Iterator[None]:
    """Raise asyncpg's and the network's errors in the block as :class:`StorageError`.

    The one place where they are translated; ``where`` names the database
    (without a password) for the message.
    """
    try:
        yield
    except _CONNECTION_ERRORS as e:
        detail = str(e).strip() or type(e).__name__
        raise StorageError(f"PostgreSQL {where}: {detail}") from e


def _quote_ident(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


class PostgresDatabase:
    """A pool of connections to one PostgreSQL database, and one component's schema.

    ``component`` names the schema in the ``tvix_schema`` table and
    ``migrations`` lists SQL scripts (statements separated by ``;``), the
    i-th bringing it from version i to i+1; they run before the pool is
    first handed out. Use :meth:`connection` for every database access.
    """

    def __init__(
        self,
        dsn: str,
        component: str,
        migrations: Sequence[str],
        *,
        schema: str | None = None,
        pool_size: int = DEFAULT_POOL_SIZE,
        display: str | None = None,
    ) -> None:
        self._dsn = dsn
        self.component = component
        self._migrations = list(migrations)
        self._schema = schema
        self._pool_size = pool_size
        #: The database as shown in messages (no password).
        self.display = display or _redact(dsn)
        self._pool: asyncpg.Pool | None = None
        self._lock = asyncio.Lock()
        self._closed = False

    @classmethod
    def from_url(cls, url: ServiceURL, component: str, migrations: Sequence[str]) -> Self:
        """Check a ``postgresql://`` URL (see the module docs) and keep it for later."""
        if url.scheme not in ("postgresql", "postgres"):
            raise InvalidURLError(f"invalid service URL {_redact(url.raw)!r}: not postgresql://")
        url.reject_params(*LIBPQ_OPTIONS, *OWN_OPTIONS)
        schema = url.params.get("schema")
        if schema is not None and not schema:
            raise InvalidURLError(f"invalid service URL {_redact(url.raw)!r}: empty schema")
        pool_size = url.int_param("pool_size", DEFAULT_POOL_SIZE)
        if pool_size < 1:
            raise InvalidURLError(
                f"invalid service URL {_redact(url.raw)!r}: pool_size must be positive"
            )
        parts = urlsplit(url.raw)
        passed = {k: v for k, v in url.params.items() if k not in OWN_OPTIONS}
        dsn = urlunsplit(("postgresql", parts.netloc, parts.path, urlencode(passed), ""))
        return cls(dsn, component, migrations, schema=schema, pool_size=pool_size)

    async def _get_pool(self) -> asyncpg.Pool:
        if self._closed:
            raise StorageError(f"PostgreSQL {self.display}: the service is closed")
        if self._pool is not None:
            return self._pool
        async with self._lock:
            if self._pool is None:
                with storage_errors(self.display):
                    settings = {"search_path": self._schema} if self._schema else None
                    pool = await asyncpg.create_pool(
                        self._dsn,
                        min_size=0,
                        max_size=self._pool_size,
                        server_settings=settings,
                    )
                    try:
                        async with pool.acquire() as conn:
                            await self._migrate(conn)
                    except BaseException:
                        await pool.close()
                        raise
                self._pool = pool
        return self._pool

    async def _migrate(self, conn: asyncpg.Connection) -> None:
        async with conn.transaction():
            # Serialises migrations of all components and processes on this database.
            await conn.execute("SELECT pg_advisory_xact_lock($1)", _MIGRATION_LOCK)
            if self._schema:
                await conn.execute(f"CREATE SCHEMA IF NOT EXISTS {_quote_ident(self._schema)}")
            await conn.execute(
                "CREATE TABLE IF NOT EXISTS tvix_schema "
                "(component TEXT PRIMARY KEY, version INTEGER NOT NULL)"
            )
            have = await conn.fetchval(
                "SELECT version FROM tvix_schema WHERE component = $1", self.component
            )
            have = 0 if have is None else int(have)
            want = len(self._migrations)
            if have > want:
                raise StorageError(
                    f"PostgreSQL {self.display} has schema version {have} for {self.component}, "
                    f"newer than the {want} this version of tvix knows; use a newer tvix"
                )
            for script in self._migrations[have:]:
                for statement in script.split(";"):
                    if statement.strip():
                        await conn.execute(statement)
            if have != want:
                await conn.execute(
                    "INSERT INTO tvix_schema VALUES ($1, $2) "
                    "ON CONFLICT (component) DO UPDATE SET version = EXCLUDED.version",
                    self.component,
                    want,
                )

    @contextlib.asynccontextmanager
    async def connection(self) -> AsyncIterator[asyncpg.Connection]:
        """A pooled connection (the schema migrated), database errors as :class:`StorageError`."""
        pool = await self._get_pool()
        with storage_errors(self.display):
            async with pool.acquire() as conn:
                yield conn

    async def close(self) -> None:
        """Close the pool (connections still in use are terminated after 10 s); idempotent."""
        self._closed = True
        pool, self._pool = self._pool, None
        if pool is not None:
            try:
                await asyncio.wait_for(pool.close(), 10)
            except _CONNECTION_ERRORS:  # includes the timeout
                pool.terminate()


def _redact(dsn: str) -> str:
    """``dsn`` without a password and query (for messages)."""
    try:
        parts = urlsplit(dsn)
    except ValueError:
        return "<invalid URL>"
    netloc = parts.netloc
    if "@" in netloc:
        userinfo, _, hostport = netloc.rpartition("@")
        netloc = f"{userinfo.partition(':')[0]}@{hostport}"
    return urlunsplit((parts.scheme, netloc, parts.path, "", ""))


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


def _decode(digest: bytes, data: bytes) -> Directory:
    """A stored Directory, checked against its digest (the row may be damaged or edited)."""
    if blake3.blake3(data).digest() != digest:
        raise IntegrityError(f"Directory {digest.hex()}: stored encoding does not match")
    try:
        return directory_from_bytes(data)
    except ValidationError as e:
        raise IntegrityError(f"Directory {digest.hex()}: stored encoding is invalid: {e}") from e


def _decode_rows(rows: Sequence[tuple[bytes, bytes]]) -> dict[B3Digest, Directory]:
    return {B3Digest(digest): _decode(digest, data) for digest, data in rows}


class PostgresDirectoryService(DirectoryService):
    """Directories in one table of a PostgreSQL database (see the module docs).

    Supports garbage collection (:meth:`sweep`), which locks the table
    against writes while it runs.
    """

    supports_gc = True

    def __init__(self, db: PostgresDatabase) -> None:
        self._db = db

    @classmethod
    def from_url(cls, url: ServiceURL) -> PostgresDirectoryService:
        """``postgresql://user@host:port/db?schema=...``; connects on first use."""
        return cls(PostgresDatabase.from_url(url, "castore.directories", MIGRATIONS))

    async def get(self, digest: B3Digest) -> Directory | None:
        async with self._db.connection() as conn:
            data = await conn.fetchval("SELECT data FROM directories WHERE digest = $1", digest)
        return None if data is None else _decode(digest, data)

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

    async def _sizes(self, digests: list[B3Digest]) -> dict[B3Digest, int]:
        out: dict[B3Digest, int] = {}
        async with self._db.connection() as conn:
            for i in range(0, len(digests), BATCH):
                for digest, size in await conn.fetch(
                    "SELECT digest, size FROM directories WHERE digest = ANY($1::bytea[])",
                    digests[i : i + BATCH],
                ):
                    out[B3Digest(digest)] = size
        return out

    def get_recursive(self, root: B3Digest) -> AsyncIterator[Directory]:
        return traverse_bfs(self._get_many, root)

    def put_multiple_start(self) -> DirectoryPutter:
        return BufferedDirectoryPutter(self._commit, self._sizes)

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

    async def close(self) -> None:
        await self._db.close()
