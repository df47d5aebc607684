"""Directory services: Directories addressed by the blake3 of their encoding.

Build one from a URL with :func:`from_url`:

=============================== ==================================================
``memory://``                   in-process dict (tests, ephemeral use)
``grpc+http://host:port``       a remote store daemon over TCP (``[::1]:8000`` for IPv6)
``grpc+unix:///path.sock``      a remote store daemon over a unix socket
``sqlite:///abs/path.db``       embedded SQLite database file (``sqlite://``: in memory)
``postgresql://u@host:port/db`` a PostgreSQL database, shared by several machines (also
                                ``postgres://``; ``?schema=``, ``pool_size=``, libpq options)
=============================== ==================================================

Further backends register their scheme in :data:`registry`.
"""

from __future__ import annotations

from tvix.castore.directoryservice.base import DirectoryPutter, DirectoryService
from tvix.castore.directoryservice.closure import BufferedDirectoryPutter, ClosureValidator
from tvix.castore.directoryservice.memory import MemoryDirectoryService
from tvix.castore.directoryservice.sqlite import SQLiteDatabase, SQLiteDirectoryService
from tvix.castore.directoryservice.traverse import traverse_bfs
from tvix.castore.url import Registry

__all__ = [
    "BufferedDirectoryPutter",
    "ClosureValidator",
    "DirectoryPutter",
    "DirectoryService",
    "MemoryDirectoryService",
    "SQLiteDatabase",
    "SQLiteDirectoryService",
    "from_url",
    "registry",
    "traverse_bfs",
]

registry: Registry[DirectoryService] = Registry("directory service")
registry.register("memory", MemoryDirectoryService.from_url)
registry.register("grpc+http", "tvix.castore.directoryservice.grpc:from_url")
registry.register("grpc+unix", "tvix.castore.directoryservice.grpc:from_url")
registry.register("sqlite", SQLiteDirectoryService.from_url)
registry.register(
    "postgresql", "tvix.castore.directoryservice.postgres:PostgresDirectoryService.from_url"
)
registry.register(
    "postgres", "tvix.castore.directoryservice.postgres:PostgresDirectoryService.from_url"
)


def from_url(url: str) -> DirectoryService:
    """The directory service ``url`` names; raises :class:`~tvix.castore.errors.InvalidURLError`."""
    return registry.from_url(url)
