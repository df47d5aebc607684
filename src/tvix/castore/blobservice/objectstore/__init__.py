"""Chunked blobs in object storage.

``objectstore+file:///dir``, ``objectstore+s3://bucket/prefix``,
``objectstore+memory://``.

Blobs are cut into chunks by content-defined chunking (FastCDC 2020), so equal
runs of bytes in different blobs (a new version of a library, a file inside
two tarballs) are stored once. The layout is upstream tvix's, so an upstream
tvix-store pointed at the same directory or bucket reads what this one wrote
and the other way round:

``chunks/b3/<first 4 hex digits>/<64 hex digits>``
    One chunk, stored under the blake3 digest of its bytes, as one zstd frame
    (compressed with ``zstd=true``; with ``zstd=false`` a frame of "raw"
    blocks, which any zstd decoder reads at memcpy speed). Every chunk object
    is a zstd frame, so readers need no marker and a store may mix both.
``blobs/b3/<first 4 hex digits>/<64 hex digits>``
    The record of a blob of more than one chunk: a ``StatBlobResponse``
    protobuf listing its chunks (digest and size each), in order, which is
    also what the gRPC ``Stat`` call answers.

``gc/seen/<key>``, ``gc/trash/<key>``, ``gc/clock``
    Garbage collection's markers of refreshes (object stores only), its
    quarantine, and its probe of the server's clock (see ``_gc``); upstream
    ignores them.

A blob of one chunk (anything below the minimum chunk size, which is most
files) is stored as that chunk alone: its digest is the chunk's digest, so it
costs one object and one request to read. :meth:`~ObjectStoreBlobService.chunks`
lists nothing for it.

Chunk sizes (min/avg/max) are upstream's 128/256/512 KiB, or derived from
``avg_chunk_size`` as avg/2 and avg*2. ``zstd`` defaults to true (upstream
always compresses, so this also keeps the objects readable by it).
``objectstore+file`` reads and writes its objects with plain POSIX calls in
the layout of obstore's ``LocalStore``; the memory and S3 flavours go through
obstore, whose blocking calls run on a few I/O threads, each call together
with the CPU work around it. Why these choices, with the measurements behind
them: ``bench/NOTES.md``.

Atomicity: chunks and records are written with put-if-not-exists (an existing
object under a content-addressed key already holds the same bytes, so "already
exists" is success), each put is atomic (the local store writes a staging file
below ``.tvix-staging/`` and links it into place, removes it when the write
fails, and sweeps those of killed writers when it is next opened; object
stores never expose partial objects), and a blob's record is written only
after all its chunks are stored. On S3, put-if-not-exists is a PUT with
``If-None-Match: *``; a server that reports the mode as unsupported switches
the service to plain puts. A crash leaves at worst unreferenced chunks. The
local store does not fsync, so after a power loss an object may be empty or
damaged: readers verify every chunk against its digest (and, reading a blob
front to back, the whole blob against its digest), so damage surfaces as
:class:`~tvix.castore.errors.IntegrityError`, never as wrong bytes.

Modules: ``_config`` (URL flavours and options), ``_codec`` (keys, zstd
framing, chunk and record decoding), ``_local`` (the POSIX object store),
``_writer`` (streaming FastCDC) and ``_service`` (the service); the config
(:class:`ObjectStoreConfig`) is here.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Self

from tvix.castore.blobservice.objectstore._config import (
    DEFAULT_AVG_CHUNK_SIZE,
    MAX_AVG_CHUNK_SIZE,
    MIN_AVG_CHUNK_SIZE,
    OPTIONS,
    STORE_FLAVOURS,
)
from tvix.castore.blobservice.objectstore._service import ObjectStoreBlobService
from tvix.castore.composition import BuildContext, SettingKind, URLConfig
from tvix.castore.errors import InvalidURLError
from tvix.castore.url import ServiceURL

__all__ = ["ObjectStoreBlobService", "ObjectStoreConfig"]


@dataclass(frozen=True)
class ObjectStoreConfig(URLConfig):
    """``objectstore+file:///abs/dir``, ``objectstore+s3://bucket/prefix``, ``objectstore+memory://``.

    Type ``objectstore``. Options: ``zstd`` (default true), ``avg_chunk_size``
    (bytes, default 262144); for S3 also ``endpoint``, ``region`` and
    ``allow_http``. Everything is checked before anything is created;
    :meth:`build` opens (or creates) the store.
    """

    OPTIONS: ClassVar[dict[str, SettingKind]] = {
        "zstd": "bool",
        "avg_chunk_size": "int",
        "endpoint": "str",
        "region": "str",
        "allow_http": "bool",
    }

    url: ServiceURL
    zstd: bool
    avg_chunk_size: int

    @classmethod
    def from_url(cls, url: ServiceURL) -> Self:
        """Check the flavour and the options."""
        flavour = url.scheme.removeprefix("objectstore+")
        known = STORE_FLAVOURS.get(flavour) if flavour != url.scheme else None
        if known is None:
            raise InvalidURLError(
                f"invalid service URL {url.raw!r}: unknown object store flavour {flavour!r} "
                f"(known: {', '.join(sorted(STORE_FLAVOURS))})"
            )
        url.reject_params(*OPTIONS, *known[1])
        avg = url.int_param("avg_chunk_size", DEFAULT_AVG_CHUNK_SIZE)
        if not MIN_AVG_CHUNK_SIZE <= avg <= MAX_AVG_CHUNK_SIZE:
            raise InvalidURLError(
                f"invalid service URL {url.raw!r}: avg_chunk_size must be within "
                f"{MIN_AVG_CHUNK_SIZE}..{MAX_AVG_CHUNK_SIZE}"
            )
        return cls(url, url.bool_param("zstd", True), avg)

    def build(self, ctx: BuildContext) -> ObjectStoreBlobService:
        """The service; a file store's directory is created."""
        flavour = self.url.scheme.removeprefix("objectstore+")
        store, prefix = STORE_FLAVOURS[flavour][0](self.url)
        local_root = self.url.path if flavour == "file" else None
        return ObjectStoreBlobService(
            store, prefix, zstd=self.zstd, avg_chunk_size=self.avg_chunk_size, local_root=local_root
        )
