"""The zstd codecs of the chunk stores (``objectstore``, ``packs``): one per thread.

Making a compressor costs more than compressing a small file, and zstandard's
objects are not safe to share between threads, so each thread keeps its own.
Chunks are compressed at :data:`ZSTD_LEVEL`, with the content size in the
frame header (what upstream's readers expect).
"""

from __future__ import annotations

import threading

import zstandard

__all__ = ["ZSTD_LEVEL", "compressor", "decompressor"]

ZSTD_LEVEL = 1

_codecs = threading.local()


def compressor() -> zstandard.ZstdCompressor:
    """This thread's zstd compressor."""
    c: zstandard.ZstdCompressor | None = getattr(_codecs, "compressor", None)
    if c is None:
        c = _codecs.compressor = zstandard.ZstdCompressor(level=ZSTD_LEVEL, write_content_size=True)
    return c


def decompressor() -> zstandard.ZstdDecompressor:
    """This thread's zstd decompressor."""
    d: zstandard.ZstdDecompressor | None = getattr(_codecs, "decompressor", None)
    if d is None:
        d = _codecs.decompressor = zstandard.ZstdDecompressor()
    return d
