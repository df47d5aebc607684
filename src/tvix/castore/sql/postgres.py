"""PostgreSQL plumbing shared by the PostgreSQL backends of both layers.

:class:`PostgresConfig` checks a ``postgresql://`` URL (the libpq options
asyncpg understands, and ours: ``schema``, ``pool_size``; see
:mod:`tvix.castore.directoryservice.postgres` for the full description);
:class:`PostgresDatabase` creates the pool on first use, migrates each component's schema under an
advisory lock, and is with :func:`storage_errors` the one place where
asyncpg's and the network's errors become :class:`StorageError`.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Iterator, Sequence
from dataclasses import dataclass
from typing import ClassVar, Self
from urllib.parse import urlencode, urlsplit, urlunsplit

import asyncpg

from tvix.castore.composition import SettingKind, URLConfig
from tvix.castore.errors import InvalidURLError, StorageError
from tvix.castore.sql.schema import CREATE_SCHEMA_TABLE, migration_statements
from tvix.castore.url import ServiceURL

__all__ = [
    "DEFAULT_POOL_SIZE",
    "LIBPQ_OPTIONS",
    "OWN_OPTIONS",
    "PostgresConfig",
    "PostgresDatabase",
    "redact",
    "storage_errors",
]

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
        self.display = display or redact(dsn)
        self._pool: asyncpg.Pool | None = None
        self._lock = asyncio.Lock()
        self._closed = False

    async def _get_pool(self) -> asyncpg.Pool:
        if self._closed:
            raise StorageError(f"PostgreSQL {self.display}: the service is closed")
        if self._pool is not None:
            return self._pool
        async with self._lock:
            if self._pool is None:
                with storage_errors(self.display):
                    pool = await asyncpg.create_pool(
                        self._dsn,
                        min_size=0,
                        max_size=self._pool_size,
                        server_settings=self._settings(),
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
            await conn.execute(CREATE_SCHEMA_TABLE)
            have = await conn.fetchval(
                "SELECT version FROM tvix_schema WHERE component = $1", self.component
            )
            have = 0 if have is None else int(have)
            want = len(self._migrations)
            where = f"PostgreSQL {self.display}"
            for statement in migration_statements(self._migrations, have, self.component, where):
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

    @contextlib.asynccontextmanager
    async def session(self) -> AsyncIterator[asyncpg.Connection]:
        """A connection of its own, outside the pool, closed when the block ends.

        For session state (advisory locks) that must last as long as the
        block and go when it ends or its process dies: a pooled connection
        would outlive the block. The schema is migrated first; database
        errors become :class:`StorageError`.
        """
        await self._get_pool()
        with storage_errors(self.display):
            conn = await asyncpg.connect(self._dsn, server_settings=self._settings())
            try:
                yield conn
            finally:
                try:
                    await asyncio.wait_for(conn.close(), 10)
                except _CONNECTION_ERRORS:  # includes the timeout
                    conn.terminate()

    @property
    def schema(self) -> str | None:
        """The schema the tables are in (``None``: the server's default search path)."""
        return self._schema

    def _settings(self) -> dict[str, str] | None:
        return {"search_path": self._schema} if self._schema else None

    async def close(self) -> None:
        """Close the pool (connections still in use are terminated after 10 s); idempotent."""
        self._closed = True
        pool, self._pool = self._pool, None
        if pool is not None:
            try:
                await asyncio.wait_for(pool.close(), 10)
            except _CONNECTION_ERRORS:  # includes the timeout
                pool.terminate()


def redact(dsn: str) -> str:
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


@dataclass(frozen=True)
class PostgresConfig(URLConfig):
    """``postgresql://user@host:port/db?schema=...&pool_size=N`` (see the module docs).

    The base of the PostgreSQL services' configs (type ``postgresql``); each
    builds its own service on a :meth:`database`.
    """

    OPTIONS: ClassVar[dict[str, SettingKind]] = {
        **dict.fromkeys(LIBPQ_OPTIONS, "str"),
        "schema": "str",
        "pool_size": "int",
    }

    dsn: str
    schema: str | None
    pool_size: int

    @classmethod
    def from_url(cls, url: ServiceURL) -> Self:
        """Check the URL; nothing connects until first use."""
        if url.scheme not in ("postgresql", "postgres"):
            raise InvalidURLError(f"invalid service URL {redact(url.raw)!r}: not postgresql://")
        url.reject_params(*LIBPQ_OPTIONS, *OWN_OPTIONS)
        schema = url.params.get("schema")
        if schema is not None and not schema:
            raise InvalidURLError(f"invalid service URL {redact(url.raw)!r}: empty schema")
        pool_size = url.int_param("pool_size", DEFAULT_POOL_SIZE)
        if pool_size < 1:
            raise InvalidURLError(
                f"invalid service URL {redact(url.raw)!r}: pool_size must be positive"
            )
        parts = urlsplit(url.raw)
        passed = {k: v for k, v in url.params.items() if k not in OWN_OPTIONS}
        dsn = urlunsplit(("postgresql", parts.netloc, parts.path, urlencode(passed), ""))
        return cls(dsn, schema, pool_size)

    def database(self, component: str, migrations: Sequence[str]) -> PostgresDatabase:
        """The database, for the schema ``component`` brought up by ``migrations``."""
        return PostgresDatabase(
            self.dsn, component, migrations, schema=self.schema, pool_size=self.pool_size
        )
