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

Composition types (``type = ...`` in a ``[pathinfoservices.NAME]`` table):
each backend's type, plus ``cache``, ``race``, ``signing`` (``inner``,
``key_file``) and ``trusted`` (``inner``, ``trusted_public_keys``,
``verify_nar``). :data:`registry` holds both; further backends register there.
"""

from __future__ import annotations

from tvix.castore.composition import Registry
from tvix.store.pathinfoservice.base import PathInfoService, check_digest
from tvix.store.pathinfoservice.memory import MemoryPathInfoService, MemoryPathInfoServiceConfig

__all__ = ["MemoryPathInfoService", "PathInfoService", "check_digest", "from_url", "registry"]

registry = Registry("pathinfoservices", PathInfoService, "path info service")
registry.register("memory", MemoryPathInfoServiceConfig, ("memory",))
registry.register(
    "sqlite", "tvix.store.pathinfoservice.sqlite:SQLitePathInfoServiceConfig", ("sqlite",)
)
registry.register(
    "postgresql",
    "tvix.store.pathinfoservice.postgres:PostgresPathInfoServiceConfig",
    ("postgresql", "postgres"),
)
registry.register(
    "grpc",
    "tvix.store.pathinfoservice.grpc:GRPCPathInfoServiceConfig",
    ("grpc+http", "grpc+https", "grpc+unix"),
)
registry.register("lru", "tvix.store.pathinfoservice.lru:LRUPathInfoServiceConfig", ("lru",))
registry.register(
    "nix",
    "tvix.store.pathinfoservice.nix_http:NixCacheConfig",
    ("nix+http", "nix+https", "nix+file"),
)
registry.register("cache", "tvix.store.pathinfoservice.cache:CachePathInfoServiceConfig")
registry.register("race", "tvix.store.pathinfoservice.race:RacePathInfoServiceConfig")
registry.register("signing", "tvix.store.pathinfoservice.signing:SigningPathInfoServiceConfig")
registry.register("trusted", "tvix.store.pathinfoservice.trust:TrustedPathInfoServiceConfig")


def from_url(url: str) -> PathInfoService:
    """The PathInfo service ``url`` names; raises :class:`~tvix.castore.errors.InvalidURLError`."""
    service: PathInfoService = registry.from_url(url)
    return service
