"""The compression methods of Nix binary caches, decompressed as a stream in bounded memory.

Nix compresses the NAR files of a binary cache with one of ``none``,
``xz``, ``bzip2``, ``gzip`` or ``zstd`` (the narinfo's ``Compression``).
:func:`decompressor` gives an incremental decompressor whose every step
yields at most :data:`MAX_STEP_OUTPUT` bytes, whatever the input expands to
(a few KiB of xz can hold GiBs of zeros); :class:`DecompressingReader` turns
a stream of compressed chunks into ``read(n)``, optionally running the
decompression steps in an executor so a slow decompressor does not block
the event loop. Damaged or truncated input raises :class:`CompressionError`.
As in Nix, what follows the end of an xz, bzip2 or gzip stream is ignored;
zstd reads across frames (as parallel compressors write).
"""

from __future__ import annotations

import asyncio
import bz2
import concurrent.futures
import lzma
import zlib
from collections.abc import AsyncIterator, Iterator
from typing import Any, Protocol

import zstandard

from tvix.nixcompat.errors import CompressionError

__all__ = [
    "MAX_STEP_OUTPUT",
    "METHODS",
    "CompressionError",
    "DecompressingReader",
    "Decompressor",
    "decompressor",
]

METHODS = ("none", "xz", "bzip2", "gzip", "zstd")
"""The compression methods :func:`decompressor` knows, as narinfos name them."""

MAX_STEP_OUTPUT = 1 << 20
"""Largest output of one decompression step."""

# zstd's streaming object cannot cap its output, so it is fed slices this small.
_ZSTD_SLICE = 1 << 13

# What the decompressors raise on damaged input: bz2 and zlib report some of it
# as OSError/EOFError/ValueError.
_ERRORS = (lzma.LZMAError, OSError, EOFError, zlib.error, zstandard.ZstdError, ValueError)


class Decompressor(Protocol):
    """An incremental decompressor (see :func:`decompressor`)."""

    def feed(self, data: bytes) -> Iterator[bytes]:
        """Decompressed output for ``data``, in pieces of at most :data:`MAX_STEP_OUTPUT`.

        Raises :class:`CompressionError` (when iterated) on damaged input.
        """
        ...

    def finish(self) -> None:
        """Raise :class:`CompressionError` if the compressed stream ended early."""
        ...


class _Identity:
    def feed(self, data: bytes) -> Iterator[bytes]:
        yield data

    def finish(self) -> None:
        pass


class _Capped:
    """lzma/bz2/zlib: their ``max_length`` keeps each step's output bounded."""

    def __init__(self, obj: Any, name: str) -> None:
        self._obj = obj
        self._name = name
        self._zlib = isinstance(obj, type(zlib.decompressobj()))

    def feed(self, data: bytes) -> Iterator[bytes]:
        try:
            yield from self._feed(data)
        except _ERRORS as e:
            raise CompressionError(f"corrupt {self._name} data: {e}") from None

    def _feed(self, data: bytes) -> Iterator[bytes]:
        obj = self._obj
        if self._zlib:
            out = obj.decompress(data, MAX_STEP_OUTPUT)
            while True:
                if out:
                    yield out
                if not obj.unconsumed_tail:
                    return
                out = obj.decompress(obj.unconsumed_tail, MAX_STEP_OUTPUT)
        if obj.eof:
            return  # trailing data after the stream: not part of the NAR
        out = obj.decompress(data, MAX_STEP_OUTPUT)
        while True:
            if out:
                yield out
            if obj.eof or obj.needs_input:
                return
            out = obj.decompress(b"", MAX_STEP_OUTPUT)

    def finish(self) -> None:
        if not self._obj.eof:
            raise CompressionError(f"corrupt {self._name} data: the stream ends early")


class _Zstd:
    def __init__(self) -> None:
        self._obj = zstandard.ZstdDecompressor().decompressobj(read_across_frames=True)
        self._seen = False

    def feed(self, data: bytes) -> Iterator[bytes]:
        view = memoryview(data)
        for start in range(0, len(view), _ZSTD_SLICE):
            self._seen = True
            try:
                out = self._obj.decompress(view[start : start + _ZSTD_SLICE])
            except _ERRORS as e:
                raise CompressionError(f"corrupt zstd data: {e}") from None
            if out:
                yield out

    def finish(self) -> None:
        if not self._seen:
            raise CompressionError("corrupt zstd data: the stream is empty")


def decompressor(method: str) -> Decompressor:
    """A fresh decompressor for ``method`` (one of :data:`METHODS`).

    Raises :class:`CompressionError` for any other method.
    """
    if method == "none":
        return _Identity()
    if method == "xz":
        return _Capped(lzma.LZMADecompressor(), "xz")
    if method == "bzip2":
        return _Capped(bz2.BZ2Decompressor(), "bzip2")
    if method == "gzip":
        return _Capped(zlib.decompressobj(wbits=47), "gzip")  # 47: gzip or zlib header
    if method == "zstd":
        return _Zstd()
    raise CompressionError(
        f"NAR compression {method!r} is not supported (none, xz, bzip2, zstd, gzip are)"
    )


class DecompressingReader:
    """``read(n)`` over the decompression of ``chunks`` (compressed bytes, streamed).

    Each :meth:`read` returns at most ``n`` bytes and holds at most one
    decompression step's output, so memory stays bounded. With an
    ``executor``, decompression steps run there instead of on the event loop.
    """

    def __init__(
        self,
        chunks: AsyncIterator[bytes],
        method: str,
        *,
        executor: concurrent.futures.Executor | None = None,
    ) -> None:
        self._chunks = chunks
        self._decompressor = decompressor(method)
        self._executor = executor
        self._pending: Iterator[bytes] = iter(())
        self._buf = b""
        self._eof = False

    async def _step(self) -> bytes | None:
        if self._executor is None:
            return next(self._pending, None)
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, next, self._pending, None)

    async def read(self, n: int) -> bytes:
        """Up to ``n`` decompressed bytes; ``b""`` at the end of the stream."""
        while not self._buf:
            piece = await self._step()
            if piece is not None:
                self._buf = piece
                break
            if self._eof:
                return b""
            data = await anext(self._chunks, None)
            if data is None:
                self._eof = True
                self._decompressor.finish()
            else:
                self._pending = self._decompressor.feed(data)
        out, self._buf = self._buf[:n], self._buf[n:]
        return out

    async def aclose(self) -> None:
        """Stop reading ``chunks`` (closes them when they can be closed)."""
        aclose = getattr(self._chunks, "aclose", None)
        if aclose is not None:
            await aclose()
