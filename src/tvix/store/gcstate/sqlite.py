"""The GC state of an embedded store: ``flock`` on ``DIR/gc.lock``, pins in ``DIR/gc.sqlite``.

For a store whose processes all run on one machine and share one data
directory (the embedded store). The lock is an exclusive ``flock`` on a
file: the kernel drops it when its holder's descriptor closes or its
process dies.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import sqlite3
from collections.abc import AsyncIterator
from pathlib import Path

from typing_extensions import override

from tvix.castore.sql.sqlite import SQLiteDatabase
from tvix.nixcompat.storepath import StorePath
from tvix.store.errors import GCBusyError
from tvix.store.gcstate.base import GCState

__all__ = ["GCLock", "SQLiteGCState"]

_PIN_MIGRATIONS = [
    """
    CREATE TABLE pins (
        name TEXT PRIMARY KEY NOT NULL,
        path TEXT NOT NULL
    )
    """,
]


class GCLock:
    """An exclusive, non-blocking ``flock`` on a file, held while entered."""

    def __init__(self, path: str) -> None:
        """Lock ``path`` (created if absent) when entered."""
        self.path = path
        self._fd: int | None = None

    def __enter__(self) -> GCLock:
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise GCBusyError(
                f"another garbage collection is running on this store (it holds {self.path})"
            ) from None
        self._fd = fd
        return self

    def __exit__(self, *exc: object) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


class SQLiteGCState(GCState):
    """The GC lock and pins kept in a directory (see the module docs)."""

    def __init__(self, directory: str | Path) -> None:
        """Keep them in ``directory`` (which must exist): ``gc.lock`` and ``gc.sqlite``."""
        self.where = str(directory)
        self._lock_path = os.path.join(directory, "gc.lock")
        self._db = SQLiteDatabase(
            os.path.join(directory, "gc.sqlite"), "store.pins", _PIN_MIGRATIONS
        )

    @override
    @contextlib.asynccontextmanager
    async def lock(self) -> AsyncIterator[None]:
        with GCLock(self._lock_path):
            yield

    @override
    async def add_pin(self, name: str, path: StorePath) -> None:
        await self._db.run(
            lambda c: SQLiteDatabase.transaction(
                c,
                lambda c: c.execute(
                    "INSERT OR REPLACE INTO pins VALUES (?, ?)", (name, path.absolute_path)
                ),
            )
        )

    @override
    async def remove_pin(self, name: str) -> bool:
        def remove(c: sqlite3.Connection) -> bool:
            return c.execute("DELETE FROM pins WHERE name = ?", (name,)).rowcount > 0

        return await self._db.run(lambda c: SQLiteDatabase.transaction(c, remove))

    @override
    async def pins(self) -> list[tuple[str, StorePath]]:
        rows = await self._db.run(
            lambda c: c.execute("SELECT name, path FROM pins ORDER BY name").fetchall()
        )
        return [(n, StorePath.from_absolute_path(p)) for n, p in rows]

    @override
    async def close(self) -> None:
        await self._db.close()
