"""Packed blob stores: chunks appended to large pack files (or S3 objects) with an index.

``packs+file:///dir`` and ``packs+s3://bucket/prefix?index=postgresql://...``:
blobs chunked by FastCDC, the chunks appended to large pack files (or S3
objects) with an index from chunk digest to (pack, offset, length).

Why: a store of one object per chunk pays a file creation per new small
file (~230 us here), an open per read, and on S3 a request per chunk (and
requests are what S3 bills). Git, restic and borg pack small objects into
large files with an index; so does this backend. The default store of a
data directory (see :mod:`tvix.cli.common`).

One concern per module:

:mod:`._format`  the entries of a pack; coalescing neighbouring reads
:mod:`._index`   the index tables, and the SQLite index of ``packs+file``
:mod:`._pgindex` the PostgreSQL index of ``packs+s3``
:mod:`._storage` pack files (appends under ``flock``, torn tails reclaimed) and S3 objects
:mod:`._service` the :class:`~tvix.castore.blobservice.BlobService`: group commits, readers
:mod:`._config`  the options, from URLs and composition tables, strictly checked

Crash safety: a pack's new entries are durable (``fdatasync``, or the PUT
done) before the index rows pointing at them commit, in one transaction
that also advances the pack's committed size; whatever lies past that size
is ignored by readers and reclaimed by the next writer that takes the pack.
Every chunk is verified against its digest when read.
:meth:`PacksBlobService.verify_storage` checks packs and index agree.
"""

from __future__ import annotations

from tvix.castore.blobservice.packs._config import PacksFileConfig, PacksS3Config
from tvix.castore.blobservice.packs._service import CompactResult, PacksBlobService

__all__ = ["CompactResult", "PacksBlobService", "PacksFileConfig", "PacksS3Config"]
