"""Blob services: file contents addressed by their blake3 digest.

Build one from a URL with :func:`from_url`:

=============================== ==================================================
``memory://``                   in-process dict (tests, ephemeral use)
``objectstore+file:///abs/dir`` chunked (FastCDC), zstd, in files under a directory
``objectstore+memory://``       the same layout in an in-process object store
``objectstore+s3://bkt/pfx``   the same layout in an S3 bucket (``?endpoint=``,
                                ``region=``, ``allow_http=``; credentials from the
                                environment: ``AWS_ACCESS_KEY_ID`` etc.)
``packs+file:///abs/dir``       the same chunks appended to pack files, an SQLite
                                index (the default store of a data directory)
``packs+s3://bkt/pfx?index=``   pack objects in an S3 bucket, a PostgreSQL index
``grpc+http://host:port``       a remote store daemon over TCP (``[::1]:8000`` for IPv6)
``grpc+unix:///path.sock``      a remote store daemon over a unix socket
=============================== ==================================================

Composition types (``type = ...`` in a ``[blobservices.NAME]`` table): each
backend's type, plus ``cache`` (``near``, ``far``) and ``race`` (``sources``).
:data:`registry` holds both; further backends register there.
"""

from __future__ import annotations

from tvix.castore.blobservice._readers import (
    BlobMismatchError,
    BytesBlobReader,
    VerifyingReader,
    open_verified,
    read_verified,
)
from tvix.castore.blobservice.base import BlobReader, BlobService, BlobWriter, ChunkMeta
from tvix.castore.blobservice.memory import MemoryBlobService, MemoryBlobServiceConfig
from tvix.castore.blobservice.util import copy_blob, read_all, write_all
from tvix.castore.composition import Registry

__all__ = [
    "BlobMismatchError",
    "BlobReader",
    "BlobService",
    "BlobWriter",
    "BytesBlobReader",
    "ChunkMeta",
    "MemoryBlobService",
    "VerifyingReader",
    "copy_blob",
    "from_url",
    "open_verified",
    "read_all",
    "read_verified",
    "registry",
    "write_all",
]

registry = Registry("blobservices", BlobService, "blob service")
registry.register("memory", MemoryBlobServiceConfig, ("memory",))
registry.register(
    "objectstore",
    "tvix.castore.blobservice.objectstore:ObjectStoreConfig",
    ("objectstore+file", "objectstore+memory", "objectstore+s3"),
)
registry.register("packs", "tvix.castore.blobservice.packs:PacksFileConfig", ("packs+file",))
registry.register("packs_s3", "tvix.castore.blobservice.packs:PacksS3Config", ("packs+s3",))
registry.register(
    "grpc",
    "tvix.castore.blobservice.grpc:GRPCBlobServiceConfig",
    ("grpc+http", "grpc+https", "grpc+unix"),
)
registry.register("cache", "tvix.castore.blobservice.cache:CacheBlobServiceConfig")
registry.register("race", "tvix.castore.blobservice.race:RaceBlobServiceConfig")


def from_url(url: str) -> BlobService:
    """The blob service ``url`` names; raises :class:`~tvix.castore.errors.InvalidURLError`."""
    service: BlobService = registry.from_url(url)
    return service
