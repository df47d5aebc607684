"""Compositions: named services wired together, from a TOML file.

A composition file names services of the three kinds in the tables
``[blobservices.NAME]``, ``[directoryservices.NAME]`` and
``[pathinfoservices.NAME]``. Each has a ``type`` and that type's settings; a
setting may name another service of the same kind. The service called
``default`` of each kind is the one a command uses::

    # A local cache in front of a remote daemon, blobs and metadata alike.
    [blobservices.default]
    type = "cache"
    near = "local"
    far = "remote"

    [blobservices.local]
    type = "objectstore"
    url = "objectstore+file:///var/cache/tvix/blobs"

    [blobservices.remote]
    type = "grpc"
    url = "grpc+http://store.example.org:8000"

    [directoryservices.default]
    type = "cache"
    near = "local"
    far = "remote"

    [directoryservices.local]
    type = "sqlite"
    path = "cache/directories.sqlite"   # relative: next to this file

    [directoryservices.remote]
    type = "url"
    url = "grpc+http://store.example.org:8000"

    [pathinfoservices.default]
    type = "signing"
    inner = "cached"
    key_file = "/etc/tvix/secret-key"

    [pathinfoservices.cached]
    type = "cache"
    near = "recent"
    far = "db"

    [pathinfoservices.recent]
    type = "lru"
    capacity = 10000

    [pathinfoservices.db]
    type = "sqlite"
    path = "/var/lib/tvix/pathinfo.sqlite"

Types (see each service package's ``registry``; a URL of a type's scheme
builds the same service as its table):

=============== ========================= ===================================================
type            kinds                     settings
=============== ========================= ===================================================
``url``         all                       ``url``: any URL the kind's registry builds
``memory``      all                       none (URL ``memory://``)
``objectstore`` blob                      ``url``: ``objectstore+...``; and as keys the URL's
                                          options: ``zstd``, ``avg_chunk_size``, ``endpoint``,
                                          ``region``, ``allow_http``
``packs``       blob                      ``path`` (a directory); optional ``zstd``,
                                          ``avg_chunk_size``, ``pack_size`` (as in the URL)
``packs_s3``    blob                      ``bucket``, ``index`` (``postgresql://...``);
                                          optional ``prefix``, ``endpoint``, ``region``,
                                          ``allow_http``, ``zstd``, ``avg_chunk_size``,
                                          ``pack_size``
``sqlite``      directory, pathinfo       ``path``: the database file (its directory is created)
``postgresql``  directory, pathinfo       ``url``: ``postgresql://...``; options as keys
                                          (``schema``, ``pool_size``, libpq's)
``grpc``        all                       ``url``: ``grpc+http://...``, ``grpc+unix://...``
``cache``       all                       ``near``, ``far``: names of services of the same kind
``race``        all                       ``sources``: names of services of the same kind,
                                          asked at once; the first answer that verifies wins
``lru``         pathinfo                  ``capacity``: a positive integer
``signing``     pathinfo                  ``inner``: a name; ``key_file``: a Nix secret key file
``trusted``     pathinfo                  ``inner``: a name; ``trusted_public_keys``
                                          (space-separated); optional ``verify_nar``
``nix``         pathinfo                  ``url``: a binary cache (``https://``, ``http://``,
                                          ``file://``, or ``nix+...?trusted-public-keys=``);
                                          optional ``trusted_public_keys`` (space-separated),
                                          ``require_sigs``, ``blob_service`` and
                                          ``directory_service`` (names of the services NARs
                                          are ingested into, default ``default``)
=============== ========================= ===================================================

A PathInfo URL ``nix+http(s)://...`` or ``nix+file://...`` (type ``url``, or
:meth:`Composition.from_urls`) is built as type ``nix``: in a composition it
finds the blob and directory services it ingests into.

Relative paths (``path``, ``key_file``; ``~`` is expanded) resolve against
the directory of the composition file (:meth:`Composition.from_file`), or against
``base_dir`` (default: the working directory when loaded). URLs are taken
as they are.

Everything that can be checked without building is checked when a
composition is loaded: unknown sections and types, unknown or missing keys,
values of the wrong type, names that refer to no service, and cycles. Each
raises :class:`CompositionError` naming the culprit, e.g.
``blobservices.default: unknown key 'foo'`` or
``cycle: blobservices.a -> blobservices.b -> blobservices.a``. Errors found
while building (an invalid URL, an unreadable key file) are raised as
:class:`CompositionError` too, prefixed with the service's name.

Services are built on demand, each once however often it is referred to,
and :meth:`Composition.close` closes all it built, dependents first.
Combinators do not close what they wrap; the composition does.

The mechanism is :mod:`tvix.castore.composition`; this module only adds the
PathInfo services' registry to castore's two.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar, Literal, overload

from tvix.castore import blobservice, directoryservice
from tvix.castore.blobservice import BlobService
from tvix.castore.composition import BuildContext, CompositionError, Registry
from tvix.castore.composition import Composition as _Composition
from tvix.castore.directoryservice import DirectoryService
from tvix.store import pathinfoservice
from tvix.store.pathinfoservice import PathInfoService

__all__ = [
    "KINDS",
    "REGISTRIES",
    "BuildContext",
    "Composition",
    "CompositionError",
    "Kind",
    "Service",
]

Kind = Literal["blobservices", "directoryservices", "pathinfoservices"]
KINDS: tuple[Kind, ...] = ("blobservices", "directoryservices", "pathinfoservices")

Service = BlobService | DirectoryService | PathInfoService

REGISTRIES: Mapping[str, Registry] = {
    "blobservices": blobservice.registry,
    "directoryservices": directoryservice.registry,
    "pathinfoservices": pathinfoservice.registry,
}
"""The store's kinds: castore's blob and directory services, and PathInfo services."""


class Composition(_Composition):
    """Named blob, directory and PathInfo services (see the module docs).

    Use as an async context manager, or call :meth:`close`, to close all it built.
    """

    REGISTRIES: ClassVar[Mapping[str, Registry]] = REGISTRIES

    @overload
    def build(self, kind: Literal["blobservices"], name: str = ...) -> BlobService: ...
    @overload
    def build(self, kind: Literal["directoryservices"], name: str = ...) -> DirectoryService: ...
    @overload
    def build(self, kind: Literal["pathinfoservices"], name: str = ...) -> PathInfoService: ...
    @overload
    def build(self, kind: str, name: str = ...) -> Any: ...
    def build(self, kind: str, name: str = "default") -> Any:
        """The service ``name`` of ``kind``, built (with what it refers to) on first use.

        Raises :class:`CompositionError` if it is not defined or cannot be built.
        """
        return super().build(kind, name)

    def blob_service(self, name: str = "default") -> BlobService:
        """The blob service ``name``; see :meth:`build`."""
        return self.build("blobservices", name)

    def directory_service(self, name: str = "default") -> DirectoryService:
        """The directory service ``name``; see :meth:`build`."""
        return self.build("directoryservices", name)

    def path_info_service(self, name: str = "default") -> PathInfoService:
        """The PathInfo service ``name``; see :meth:`build`."""
        return self.build("pathinfoservices", name)

    def build_all(self) -> tuple[BlobService, DirectoryService, PathInfoService]:
        """The three ``default`` services; raises :class:`CompositionError` if one is missing."""
        return self.blob_service(), self.directory_service(), self.path_info_service()
