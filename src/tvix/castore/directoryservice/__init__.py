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

Composition types (``type = ...`` in a ``[directoryservices.NAME]`` table):
each backend's type, plus ``cache`` (``near``, ``far``) and ``race``
(``sources``). :data:`registry` holds both; further backends register there.
"""

from __future__ import annotations

from tvix.castore.composition import Registry
from tvix.castore.directoryservice.base import DirectoryPutter, DirectoryService
from tvix.castore.directoryservice.closure import BufferedDirectoryPutter, ClosureValidator
from tvix.castore.directoryservice.memory import (
    MemoryDirectoryService,
    MemoryDirectoryServiceConfig,
)
from tvix.castore.directoryservice.sqlite import (
    SQLiteDatabase,
    SQLiteDirectoryService,
    SQLiteDirectoryServiceConfig,
)
from tvix.castore.directoryservice.traverse import traverse_bfs

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

registry = Registry("directoryservices", DirectoryService, "directory service")
registry.register("memory", MemoryDirectoryServiceConfig, ("memory",))
registry.register("sqlite", SQLiteDirectoryServiceConfig, ("sqlite",))
registry.register(
    "postgresql",
    "tvix.castore.directoryservice.postgres:PostgresDirectoryServiceConfig",
    ("postgresql", "postgres"),
)
registry.register(
    "grpc",
    "tvix.castore.directoryservice.grpc:GRPCDirectoryServiceConfig",
    ("grpc+http", "grpc+https", "grpc+unix"),
)
registry.register("cache", "tvix.castore.directoryservice.cache:CacheDirectoryServiceConfig")
registry.register("race", "tvix.castore.directoryservice.race:RaceDirectoryServiceConfig")


def from_url(url: str) -> DirectoryService:
    """The directory service ``url`` names; raises :class:`~tvix.castore.errors.InvalidURLError`."""
    service: DirectoryService = registry.from_url(url)
    return service
