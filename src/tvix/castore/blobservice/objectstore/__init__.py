"""``objectstore+file:///dir``, ``objectstore+s3://bucket/prefix``, ``objectstore+memory://``:
chunked blobs in object storage.

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

Atomicity: chunks and records are written with put-if-not-exists (an
existing object under a content-addressed key already holds the same bytes,
so "already exists" is success), each put is atomic (the local store writes
a staging file and links it into place; object stores never expose partial
objects), and a blob's record is written only after all its chunks are
stored. On S3, put-if-not-exists is a PUT with ``If-None-Match: *``; a
server that reports the mode as unsupported switches the service to plain
puts. A crash leaves at worst unreferenced chunks. The local store does not
fsync, so after a power loss an object may be empty or damaged: readers
verify every chunk against its digest (and, reading a blob front to back,
the whole blob against its digest), so damage surfaces as
:class:`~tvix.castore.errors.IntegrityError`, never as wrong bytes.

Modules: ``_config`` (URL flavours and options), ``_codec`` (keys, zstd
framing, chunk and record decoding), ``_local`` (the POSIX object store),
``_writer`` (streaming FastCDC) and ``_service`` (the service).
"""

from __future__ import annotations

from tvix.castore.blobservice.objectstore._service import ObjectStoreBlobService
from tvix.castore.url import ServiceURL

__all__ = ["ObjectStoreBlobService", "from_url"]


def from_url(url: ServiceURL) -> ObjectStoreBlobService:
    """The registry's entry point; see :meth:`ObjectStoreBlobService.from_url`."""
    return ObjectStoreBlobService.from_url(url)
