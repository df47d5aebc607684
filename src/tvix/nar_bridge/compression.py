"""Compressed NARs, compressed on the fly: ``--compression zstd|xz|none``.

With a compression set, narinfos say ``Compression: zstd`` (or ``xz``) and
point at ``nar/tvix-castore/<compression>/<node>.nar.<ext>?narsize=N``,
where the NAR is rendered as usual and compressed as it streams (in a
thread, overlapping the rendering of the next piece). The compressed
file's hash and size are not known before it has been made, so these
narinfos have no ``FileHash``/``FileSize`` (both optional; Nix checks the
NAR hash after decompressing). A compressed stream cannot be entered in the
middle: it is always sent whole (``Accept-Ranges: none``; a ``Range`` is
ignored, as RFC 9110 allows), without a ``Content-Length``. The
uncompressed URL of every NAR keeps serving byte ranges.

Measured here (two cores shared with other work, a warm 41.8 MB NAR of
Python's standard library, five runs over loopback with curl): uncompressed
0.21 s (about 200 MB/s of NAR); zstd level 3, 0.40 s (105 MB/s of NAR, 3.5x
smaller: 11.9 MB); xz preset 1, 2.7 s (15 MB/s, 4.1x). On loopback bytes
are free, so compressing only doubles the time: ``auto`` (the default)
means no compression on a loopback or unix socket listener. Elsewhere zstd
is faster on any link slower than about 105 MB/s (some 800 Mbit/s; most
links a binary cache is reached over), so ``auto`` means zstd there. xz is
there for clients that need it; it is slow.
"""

from __future__ import annotations

import asyncio
import bz2
import concurrent.futures
import lzma
import zlib
from collections.abc import AsyncGenerator, AsyncIterator
from typing import Protocol

import zstandard
from aiohttp import web

from tvix.castore.blobservice.base import BlobService
from tvix.castore.nodes import Node
from tvix.nar_bridge.errors import BadRequest, NotFound
from tvix.nar_bridge.urls import CASTORE_NAR_PREFIX, decode_castore_nar
from tvix.nixcompat import nixbase32
from tvix.store.nar.render import verify_nar
from tvix.store.nar.seekable import NarLayout, render_full

__all__ = [
    "COMPRESSIONS",
    "EXTENSIONS",
    "SERVABLE",
    "CompressedNars",
    "compressed_nar_url",
    "resolve_compression",
]

#: What ``--compression`` accepts besides ``auto``, and each one's file extension.
EXTENSIONS = {"zstd": ".zst", "xz": ".xz"}
NAR_TYPE = "application/x-nix-nar"
COMPRESSIONS = ("none", *EXTENSIONS)
#: Every compression a NAR can be served in (uploaded NAR files are served in theirs).
SERVABLE = (*COMPRESSIONS, "bzip2", "gzip")
ZSTD_LEVEL = 3
XZ_PRESET = 1
# bzip2 and gzip only serve files uploaded so: their fastest levels.
_BZIP2_LEVEL = 1
_GZIP_LEVEL = 1


def compressed_nar_url(compression: str, encoded_node: str, nar_size: int, nar_hash: str) -> str:
    """The URL (relative to the cache) of the NAR of a node, compressed with ``compression``.

    ``nar_hash`` (nixbase32 sha256) is what the NAR must hash to: checked as it is sent.
    """
    ext = EXTENSIONS[compression]
    return (
        f"{CASTORE_NAR_PREFIX}{compression}/{encoded_node}.nar{ext}"
        f"?narsize={nar_size}&narhash={nar_hash}"
    )


def resolve_compression(choice: str, *, local: bool) -> str:
    """``choice``, with ``auto`` made ``none`` for a ``local`` listener (loopback, unix socket)."""
    if choice != "auto":
        return choice
    return "none" if local else "zstd"


class _Compressor(Protocol):
    def compress(self, data: bytes, /) -> bytes: ...

    def flush(self) -> bytes: ...


def _compressor(compression: str) -> _Compressor:
    c: _Compressor
    if compression == "zstd":
        c = zstandard.ZstdCompressor(level=ZSTD_LEVEL).compressobj()
    elif compression == "xz":
        c = lzma.LZMACompressor(preset=XZ_PRESET)
    elif compression == "bzip2":
        c = bz2.BZ2Compressor(_BZIP2_LEVEL)
    elif compression == "gzip":
        c = zlib.compressobj(_GZIP_LEVEL, wbits=16 + zlib.MAX_WBITS)
    else:
        raise ValueError(f"cannot compress with {compression!r}")
    return c


async def compress_stream(
    pieces: AsyncIterator[bytes],
    compression: str,
    executor: concurrent.futures.Executor,
) -> AsyncGenerator[bytes, None]:
    """``pieces`` compressed, each piece compressed in ``executor`` while the next is made."""
    loop = asyncio.get_running_loop()
    compressor = _compressor(compression)
    pending: asyncio.Future[bytes] | None = None
    async for piece in pieces:
        if pending is not None:
            out = await pending
            if out:
                yield out
        pending = loop.run_in_executor(executor, compressor.compress, piece)
    if pending is not None:
        out = await pending
        if out:
            yield out
    yield await loop.run_in_executor(executor, compressor.flush)


def _nar_hash(text: str | None) -> bytes | None:
    if text is None:
        return None
    try:
        digest = nixbase32.decode(text)
    except ValueError:
        digest = b""
    if len(digest) != 32:
        raise BadRequest(f"narhash={text!r} is not a nixbase32 sha256")
    return digest


class _Bridge(Protocol):
    """What this module uses of a :class:`~tvix.nar_bridge.server.NarBridge` (which imports it)."""

    blobs: BlobService

    async def nar_layout(self, node: Node, claimed_size: str | None) -> NarLayout: ...

    async def _stream(
        self,
        request: web.Request,
        response: web.StreamResponse,
        pieces: AsyncGenerator[bytes, None],
        what: str,
    ) -> None: ...


class CompressedNars:
    """The route of compressed NARs, over a bridge's services (see the module)."""

    def __init__(self, bridge: _Bridge) -> None:
        self.bridge = bridge
        self._executor: concurrent.futures.ThreadPoolExecutor | None = None

    def register(self, app: web.Application) -> None:
        """Add ``GET|HEAD /nar/tvix-castore/{compression}/{file}`` to ``app``."""
        app.router.add_get("/" + CASTORE_NAR_PREFIX + "{compression}/{file}", self.get_nar)
        app.on_cleanup.append(self._cleanup)

    async def _cleanup(self, _app: web.Application) -> None:
        if self._executor is not None:
            self._executor.shutdown(wait=False, cancel_futures=True)

    async def get_nar(self, request: web.Request) -> web.StreamResponse:
        """The NAR of the node the URL names, compressed as it says."""
        compression = request.match_info["compression"]
        ext = EXTENSIONS.get(compression)
        name = request.match_info["file"]
        if ext is None or not name.endswith(".nar" + ext):
            raise NotFound(f"{request.path}: not <node>.nar.zst or <node>.nar.xz")
        node = decode_castore_nar(name.removesuffix(".nar" + ext))
        return await self.serve(
            request,
            node,
            compression,
            request.query.get("narsize"),
            _nar_hash(request.query.get("narhash")),
            request.path,
        )

    async def serve(
        self,
        request: web.Request,
        node: Node,
        compression: str,
        claimed_size: str | None,
        claimed_sha256: bytes | None,
        what: str,
    ) -> web.StreamResponse:
        """Send the NAR of ``node`` compressed with ``compression`` (one of :data:`SERVABLE`).

        Its size is checked against ``claimed_size`` first; with
        ``claimed_sha256`` it is hashed as it is sent and cut short if it is
        not that NAR.
        """
        bridge = self.bridge
        layout = await bridge.nar_layout(node, claimed_size)
        response = web.StreamResponse(
            headers={
                "Content-Type": NAR_TYPE,
                "Accept-Ranges": "none",
                "Cache-Control": "public, max-age=31536000, immutable",
            }
        )
        await response.prepare(request)
        if request.method == "HEAD":
            await response.write_eof()
            return response
        if self._executor is None:
            # A stream's pieces are compressed in order, one at a time (compress_stream
            # awaits each); the threads let several streams compress at once.
            self._executor = concurrent.futures.ThreadPoolExecutor(4, "nar-bridge-compress")
        nar = render_full(bridge.blobs, layout)
        if claimed_sha256 is not None:
            # A NAR not of the claimed hash is cut before its last piece is compressed,
            # so the client never gets a complete compressed stream of it.
            nar = verify_nar(nar, layout.size, claimed_sha256, what)
        pieces = compress_stream(nar, compression, self._executor)
        await bridge._stream(request, response, pieces, what)
        return response
