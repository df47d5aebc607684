"""Blob services: file contents addressed by their blake3 digest.

Build one from a URL with :func:`from_url`:

=============================== ==================================================
``memory://``                   in-process dict (tests, ephemeral use)
``objectstore+file:///abs/dir`` chunked (FastCDC), zstd, in files under a directory
``objectstore+memory://``       the same layout in an in-process object store
``objectstore+s3://bkt/pfx``   the same layout in an S3 bucket (``?endpoint=``,
                                ``region=``, ``allow_http=``; credentials from the
                                environment: ``AWS_ACCESS_KEY_ID`` etc.)
``grpc+http://host:port``       a remote store daemon over TCP (``[::1]:8000`` for IPv6)
``grpc+unix:///path.sock``      a remote store daemon over a unix socket
=============================== ==================================================

Further backends register their scheme in :data:`registry`.
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
from tvix.castore.blobservice.memory import MemoryBlobService
from tvix.castore.blobservice.util import copy_blob, read_all, write_all
from tvix.castore.url import Registry

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

registry: Registry[BlobService] = Registry("blob service")
registry.register("memory", MemoryBlobService.from_url)
registry.register("objectstore+file", "tvix.castore.blobservice.objectstore:from_url")
registry.register("objectstore+memory", "tvix.castore.blobservice.objectstore:from_url")
registry.register("objectstore+s3", "tvix.castore.blobservice.objectstore:from_url")
registry.register("grpc+http", "tvix.castore.blobservice.grpc:from_url")
registry.register("grpc+unix", "tvix.castore.blobservice.grpc:from_url")


def from_url(url: str) -> BlobService:
    """The blob service ``url`` names; raises :class:`~tvix.castore.errors.InvalidURLError`."""
    return registry.from_url(url)
