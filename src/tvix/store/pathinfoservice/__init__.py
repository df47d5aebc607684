"""PathInfo services: store paths mapped to their contents and Nix metadata.

Build one from a URL with :func:`from_url`:

=============================== ==================================================
``memory://``                   in-process dict (tests, ephemeral use)
``sqlite:///abs/path.sqlite``   embedded SQLite database file (``sqlite://``: in memory)
``lru://?capacity=N``           in-process, forgets the least recently used beyond N
``grpc+http://host:port``       a remote store daemon over TCP (``[::1]:8000`` for IPv6)
``grpc+unix:///path.sock``      a remote store daemon over a unix socket
``postgresql://u@host:port/db`` a PostgreSQL database, shared by several machines (also
                                ``postgres://``; ``?schema=``, ``pool_size=``, libpq options)
``nix+https://host/path``       read-through from a Nix binary cache (also ``nix+http``,
                                ``nix+file``): ``?trusted-public-keys=``; needs blob and
                                directory services, so only in a composition (or the CLI)
=============================== ==================================================

Further backends register their scheme in :data:`registry`.
"""

from __future__ import annotations

from tvix.castore.url import Registry
from tvix.store.pathinfoservice.base import PathInfoService, check_digest
from tvix.store.pathinfoservice.memory import MemoryPathInfoService

__all__ = ["MemoryPathInfoService", "PathInfoService", "check_digest", "from_url", "registry"]

registry: Registry[PathInfoService] = Registry("path info service")
registry.register("memory", MemoryPathInfoService.from_url)
registry.register("grpc+http", "tvix.store.pathinfoservice.grpc:from_url")
registry.register("grpc+unix", "tvix.store.pathinfoservice.grpc:from_url")
registry.register("sqlite", "tvix.store.pathinfoservice.sqlite:SQLitePathInfoService.from_url")
registry.register("lru", "tvix.store.pathinfoservice.lru:LRUPathInfoService.from_url")
registry.register(
    "postgresql", "tvix.store.pathinfoservice.postgres:PostgresPathInfoService.from_url"
)
registry.register(
    "postgres", "tvix.store.pathinfoservice.postgres:PostgresPathInfoService.from_url"
)
for _scheme in ("nix+http", "nix+https", "nix+file"):
    registry.register(_scheme, "tvix.store.pathinfoservice.nix_http:from_url")


def from_url(url: str) -> PathInfoService:
    """The PathInfo service ``url`` names; raises :class:`~tvix.castore.errors.InvalidURLError`."""
    return registry.from_url(url)
