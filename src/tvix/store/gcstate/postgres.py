"""The GC state of a store shared through PostgreSQL: an advisory lock, pins in a table.

For a store whose machines share one PostgreSQL database (the PathInfo
service's): the lock is a session advisory lock (``pg_try_advisory_lock``)
held on a connection of its own for the whole GC, so the server drops it
when the GC ends, its process dies or its connection is lost; the pins are
rows of ``gc_pins`` in the same database and schema (created if absent).
The lock's key is fixed per schema: the class ``tvix`` and the pins
table's OID, so stores in different schemas of one database do not
exclude each other.

A lock whose connection is lost is gone (the server ended the session), so
the holder must stop: while the block runs, the connection is checked every
:data:`CHECK_INTERVAL` seconds, and when it fails the block is cancelled
and :class:`~tvix.store.errors.GCError` raised. Stopping a GC anywhere is
safe (it is crash-safe); the next one finishes its work.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

from typing_extensions import override

from tvix.castore.errors import StorageError
from tvix.castore.sql.postgres import PostgresDatabase, storage_errors
from tvix.nixcompat.storepath import StorePath
from tvix.store.errors import GCBusyError, GCError
from tvix.store.gcstate.base import GCState

__all__ = ["CHECK_INTERVAL", "CHECK_TIMEOUT", "MIGRATIONS", "PostgresGCState"]

CHECK_INTERVAL = 10.0
"""Seconds between checks that the lock's connection is alive."""
CHECK_TIMEOUT = 30.0
"""Seconds a check may take before the connection counts as lost."""

MIGRATIONS = [
    """
    CREATE TABLE gc_pins (
        name TEXT PRIMARY KEY,
        path TEXT NOT NULL
    )
    """,
]

# The advisory lock's first key ("tvix" in ASCII); the second is the pins table's OID.
_LOCK_CLASS = 0x74766978
# OIDs are unsigned 32-bit; the lock takes a signed one.
_TRY_LOCK = "SELECT pg_try_advisory_lock($1, ('gc_pins'::regclass::oid::bigint - 2147483648)::int4)"


class PostgresGCState(GCState):
    """The GC lock and pins of a store in a PostgreSQL database (see the module docs)."""

    def __init__(self, db: PostgresDatabase) -> None:
        """Use ``db`` (its component migrated by :data:`MIGRATIONS`); connects on first use."""
        self._db = db
        self.where = f"PostgreSQL {db.display}" + (f" (schema {db.schema})" if db.schema else "")

    @override
    @contextlib.asynccontextmanager
    async def lock(self) -> AsyncIterator[None]:
        async with self._db.session() as conn:
            if not await conn.fetchval(_TRY_LOCK, _LOCK_CLASS):
                raise GCBusyError(
                    "another garbage collection is running on this store (it holds the GC lock "
                    f"in {self.where})"
                )
            holder = asyncio.current_task()
            assert holder is not None
            lost: list[str] = []

            async def watch() -> None:
                while True:
                    await asyncio.sleep(CHECK_INTERVAL)
                    try:
                        with storage_errors(self._db.display):
                            await asyncio.wait_for(conn.fetchval("SELECT 1"), CHECK_TIMEOUT)
                    except StorageError as e:
                        lost.append(str(e))
                        holder.cancel()
                        return

            watcher = asyncio.create_task(watch())
            try:
                # Closing the session releases the lock.
                yield
            except asyncio.CancelledError:
                if not lost:
                    raise
            finally:
                watcher.cancel()
                try:
                    await asyncio.gather(watcher, return_exceptions=True)
                except asyncio.CancelledError:
                    # The watcher's cancel, when the block ended before it came.
                    if not lost:
                        raise
                if lost:
                    holder.uncancel()
            if lost:
                raise GCError(
                    f"lost the GC lock in {self.where} ({lost[0]}); the garbage collection "
                    "stopped (the next one finishes its work)"
                )

    @override
    async def add_pin(self, name: str, path: StorePath) -> None:
        async with self._db.connection() as conn:
            await conn.execute(
                "INSERT INTO gc_pins VALUES ($1, $2) "
                "ON CONFLICT (name) DO UPDATE SET path = EXCLUDED.path",
                name,
                path.absolute_path,
            )

    @override
    async def remove_pin(self, name: str) -> bool:
        async with self._db.connection() as conn:
            status = await conn.execute("DELETE FROM gc_pins WHERE name = $1", name)
        return bool(status != "DELETE 0")

    @override
    async def pins(self) -> list[tuple[str, StorePath]]:
        async with self._db.connection() as conn:
            rows = await conn.fetch('SELECT name, path FROM gc_pins ORDER BY name COLLATE "C"')
        return [(r[0], StorePath.from_absolute_path(r[1])) for r in rows]

    @override
    async def close(self) -> None:
        await self._db.close()
