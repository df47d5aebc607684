"""The HTTP binary cache: routes, request handling, and the one error-to-status mapping.

========================================= =====================================================
``GET|HEAD /nix-cache-info``              ``StoreDir``, ``WantMassQuery``, ``Priority``
``GET|HEAD /<hash>.narinfo``              the PathInfo as Nix renders a narinfo
                                          (``Compression: none`` unless ``compression`` is
                                          set; signed when a key is set)
``GET|HEAD /nar/tvix-castore/<node>``     the NAR of a root node (see :mod:`.urls`; snix's
                                          ``/nar/snix-castore/<node>`` too), with
                                          ``Range`` support (206/416); the narinfo's
                                          URL adds ``?narsize=&narhash=``, and a full
                                          NAR not of that hash is cut before its end
``GET|HEAD /<hash>.ls``                   the JSON NAR listing (:mod:`.listing`)
``GET|HEAD /nar/tvix-castore/<c>/<node>`` the NAR compressed with ``<c>`` (zstd, xz), what
                                          narinfos point at with a ``compression`` set
                                          (:mod:`.compression`; narhash checked too)
``GET|HEAD /nar/<filehash>.nar[.ext]``    a NAR file uploaded here, as long as its store
                                          path is stored: its NAR compressed again as the
                                          narinfo said (:mod:`.nar_files`); HEAD is what
                                          Nix asks before uploading (it skips a file found)
``PUT /nix-cache-info``                   accepted and ignored (ours is generated)
``PUT /nar/<filehash>.nar[.ext]``         ingest a NAR (plain, xz, bzip2, gzip, zstd)
``PUT /<hash>.narinfo``                   register a store path whose NAR was uploaded
========================================= =====================================================

PUTs need ``allow_upload`` (else 403) and, when credentials are configured,
HTTP basic auth (else 401); both are checked before ``100 Continue``, so a
refused client does not send its body. Every request is logged as one line
at INFO; failures name the store path or NAR they concern.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import logging
import re
import time
from collections import OrderedDict
from collections.abc import AsyncGenerator, Awaitable, Callable

from aiohttp import web
from aiohttp.http import HttpVersion11

from tvix.castore.blobservice.base import BlobService
from tvix.castore.directoryservice.base import DirectoryService
from tvix.castore.nodes import FileNode, Node
from tvix.nar_bridge.auth import BasicAuth
from tvix.nar_bridge.compression import SERVABLE, CompressedNars, compressed_nar_url
from tvix.nar_bridge.errors import (
    BadRequest,
    Conflict,
    Forbidden,
    HTTPError,
    NotFound,
    PayloadTooLarge,
    RangeNotSatisfiable,
    Unauthorized,
    is_unexpected,
    status_for,
)
from tvix.nar_bridge.listing import ListingRoutes
from tvix.nar_bridge.nar_files import NarFileRecord, NarFiles
from tvix.nar_bridge.upload import NarBody, UploadedNar, UploadIndex
from tvix.nar_bridge.urls import (
    CASTORE_NAR_PREFIX,
    SNIX_CASTORE_NAR_PREFIX,
    NarFileName,
    decode_castore_nar,
    encode_castore_nar,
    parse_hash_part,
    parse_nar_file_name,
)
from tvix.nixcompat import nixbase32
from tvix.nixcompat.narinfo import NarInfo
from tvix.nixcompat.signing import SigningKey
from tvix.store.nar import ingest_nar_stream
from tvix.store.nar.render import verify_nar
from tvix.store.nar.seekable import LayoutCache, NarLayout, render_full, render_range
from tvix.store.pathinfo import PathInfo
from tvix.store.pathinfoservice.base import PathInfoService

__all__ = ["NarBridge"]

log = logging.getLogger("tvix.nar_bridge")

NARINFO_TYPE = "text/x-nix-narinfo"
NAR_TYPE = "application/x-nix-nar"
CACHE_INFO_TYPE = "text/x-nix-cache-info"

# A narinfo is a few hundred bytes; thousands of references still fit.
_MAX_NARINFO = 1 << 20
# Remembered NAR URL -> store path, only to name the path in log lines.
_NAMES_CAPACITY = 4096
_RANGE = re.compile(r"bytes=(\d*)-(\d*)")

# Request key of what a request concerns (a store path, a NAR), for log lines.
SUBJECT = web.RequestKey("tvix.nar_bridge.subject", str)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def _log_request(request: web.Request, status: int, size: int, start: float) -> None:
    log.info(
        "%s %s %d %d bytes %.1f ms",
        request.method,
        request.path_qs,
        status,
        size,
        (time.perf_counter() - start) * 1000,
    )


def parse_range(header: str | None, size: int) -> tuple[int, int] | None:
    """The ``[start, end)`` a ``Range`` header asks of ``size`` bytes, or ``None`` for all.

    One range of bytes is served; anything else (several ranges, another
    unit, a malformed header) is ignored, as RFC 9110 allows, and the whole
    NAR is sent. Raises :class:`RangeNotSatisfiable` for a range that starts
    at or after the end.
    """
    if header is None:
        return None
    unsatisfiable = {"Content-Range": f"bytes */{size}"}
    match = _RANGE.fullmatch(header.strip())
    if match is None or not (match[1] or match[2]):
        return None
    if not match[1]:
        suffix = int(match[2])
        if suffix == 0:
            raise RangeNotSatisfiable(f"empty suffix range of {size} bytes", unsatisfiable)
        return max(size - suffix, 0), size
    start = int(match[1])
    end = int(match[2]) + 1 if match[2] else size
    if match[2] and end <= start:
        return None  # last < first: syntactically invalid, so ignored
    if start >= size:
        raise RangeNotSatisfiable(
            f"range starts at {start}, the NAR has {size} bytes", unsatisfiable
        )
    return start, min(end, size)


class NarBridge:
    """A Nix HTTP binary cache in front of the three store services.

    The services are used, not owned: whoever built them closes them.
    ``signing_key`` signs every narinfo as it is served (the stored PathInfo
    is unchanged). ``upload_auth`` guards PUTs when uploads are allowed.
    ``nar_files`` keeps the NAR file URLs uploads were accepted under across
    restarts (without it, only those of this process's uploads are served).
    """

    def __init__(
        self,
        blob_service: BlobService,
        directory_service: DirectoryService,
        path_info_service: PathInfoService,
        *,
        priority: int = 39,
        signing_key: SigningKey | None = None,
        allow_upload: bool = False,
        upload_auth: BasicAuth | None = None,
        upload_index: UploadIndex | None = None,
        nar_files: NarFiles | None = None,
        compression: str = "none",
    ) -> None:
        self.blobs = blob_service
        self.directories = directory_service
        self.path_infos = path_info_service
        self.priority = priority
        self.signing_key = signing_key
        self.allow_upload = allow_upload
        self.upload_auth = upload_auth
        self.uploads = upload_index if upload_index is not None else UploadIndex()
        self.nar_files = nar_files
        self.compression = compression
        self._names: OrderedDict[str, str] = OrderedDict()
        self._layouts = LayoutCache(directory_service)
        self._decoders: concurrent.futures.ThreadPoolExecutor | None = None
        self._compressed = CompressedNars(self)

    # -- the application --

    def make_app(self) -> web.Application:
        """The aiohttp application serving this cache."""
        app = web.Application(middlewares=[self._middleware])
        r = app.router
        r.add_get("/nix-cache-info", self._cache_info)
        r.add_put("/nix-cache-info", self._put_cache_info, expect_handler=self._expect)
        r.add_get("/{hash}.narinfo", self._get_narinfo)
        r.add_put("/{hash}.narinfo", self._put_narinfo, expect_handler=self._expect)
        for prefix in (CASTORE_NAR_PREFIX, SNIX_CASTORE_NAR_PREFIX):
            r.add_get("/" + prefix + "{node}", self._get_castore_nar)
        r.add_get("/nar/{file}", self._get_nar_file)
        r.add_put("/nar/{file}", self._put_nar, expect_handler=self._expect)
        ListingRoutes(self.path_infos, self._layouts).register(app)
        self._compressed.register(app)
        app.on_cleanup.append(self._cleanup)
        return app

    async def _cleanup(self, _app: web.Application) -> None:
        if self._decoders is not None:
            self._decoders.shutdown(wait=False, cancel_futures=True)

    @web.middleware
    async def _middleware(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        """Log one line per request; turn every failure into a status and a one-line message."""
        start = time.perf_counter()
        try:
            response = await handler(request)
        except web.HTTPException as e:
            # aiohttp's own answers (no route: 404, wrong method: 405): aiohttp sends them.
            _log_request(request, e.status, 0, start)
            raise
        except Exception as e:
            response = self._error_response(request, e)
        # The size declared: a stream cut short says so in a line of its own.
        _log_request(request, response.status, response.content_length or 0, start)
        return response

    def _error_response(self, request: web.Request, exc: BaseException) -> web.Response:
        status, message = status_for(exc)
        # What the request concerns: a store path or NAR once the handler knows it.
        subject = request.get(SUBJECT, request.path)
        if status >= 500:
            log.error("%s %s: %s", request.method, subject, message, exc_info=is_unexpected(exc))
        elif status != 404:
            log.warning("%s %s: refused (%d): %s", request.method, subject, status, message)
        headers = exc.headers if isinstance(exc, HTTPError) else {}
        return web.Response(status=status, text=message + "\n", headers=headers)

    # -- reads --

    async def _cache_info(self, request: web.Request) -> web.Response:
        body = f"StoreDir: /nix/store\nWantMassQuery: 1\nPriority: {self.priority}\n"
        return web.Response(body=body.encode(), content_type=CACHE_INFO_TYPE)

    async def _get_narinfo(self, request: web.Request) -> web.Response:
        hash_part = request.match_info["hash"]
        digest = parse_hash_part(hash_part)
        info = await self.path_infos.get(digest)
        if info is None:
            raise NotFound(f"{hash_part}.narinfo: no such store path")
        request[SUBJECT] = info.store_path.absolute_path
        if self.signing_key is not None:
            info = info.with_signature(self.signing_key)
        encoded = encode_castore_nar(info.node)
        self._remember_name(encoded, info.store_path.absolute_path)
        # narhash: what the NAR must hash to, checked as it is served in full.
        nar_hash = nixbase32.encode(info.nar_sha256)
        if self.compression == "none":
            url = f"{CASTORE_NAR_PREFIX}{encoded}?narsize={info.nar_size}&narhash={nar_hash}"
        else:
            url = compressed_nar_url(self.compression, encoded, info.nar_size, nar_hash)
        text = info.to_narinfo(url=url, compression=self.compression).render()
        return web.Response(body=text.encode(), content_type=NARINFO_TYPE)

    def _remember_name(self, encoded: str, store_path: str) -> None:
        self._names[encoded] = store_path
        self._names.move_to_end(encoded)
        if len(self._names) > _NAMES_CAPACITY:
            self._names.popitem(last=False)

    async def _get_castore_nar(self, request: web.Request) -> web.StreamResponse:
        encoded = request.match_info["node"]
        what = self._names.get(encoded)
        request[SUBJECT] = f"NAR of {what}" if what else request.path
        node = decode_castore_nar(encoded)
        nar_hash = request.query.get("narhash")
        claimed_sha256 = None
        if nar_hash is not None:
            try:
                claimed_sha256 = nixbase32.decode(nar_hash)
            except ValueError:
                claimed_sha256 = None
            if claimed_sha256 is None or len(claimed_sha256) != 32:
                raise BadRequest(f"narhash={nar_hash!r} is not a nixbase32 sha256")
        return await self._serve_nar(request, node, request.query.get("narsize"), claimed_sha256)

    async def _get_nar_file(self, request: web.Request) -> web.StreamResponse:
        name = parse_nar_file_name(request.match_info["file"])
        if name is None:
            raise NotFound(f"{request.path}: not a NAR file name")
        request[SUBJECT] = name.path
        nar = self.uploads.by_file(name.file_hash)
        if nar is not None and nar.file == name:
            # Uploaded by this process, perhaps not yet named by a narinfo.
            node, compression = nar.node, nar.compression
            nar_size, nar_sha256 = nar.nar_size, nar.nar_sha256
        else:
            found = await self._uploaded_path(name)
            if found is None:
                raise NotFound(f"{name.path} was not uploaded here, or its store path is gone")
            info, compression = found
            request[SUBJECT] = f"{name.path} ({info.store_path.absolute_path})"
            node, nar_size, nar_sha256 = info.node, info.nar_size, info.nar_sha256
        if compression == "none":
            return await self._serve_nar(request, node, str(nar_size), nar_sha256)
        return await self._compressed.serve(
            request, node, compression, str(nar_size), nar_sha256, request[SUBJECT]
        )

    async def _uploaded_path(self, name: NarFileName) -> tuple[PathInfo, str] | None:
        """The stored path a narinfo registered NAR file ``name`` for, and its compression."""
        if self.nar_files is None:
            return None
        for record in await self.nar_files.get(name.file_hash):
            if record.file != name:
                continue
            info = await self.path_infos.get(record.store_path.digest)
            if info is not None and info.nar_sha256 == record.nar_sha256:
                return info, record.compression
        return None

    async def nar_layout(self, node: Node, claimed_size: str | None) -> NarLayout:
        """The layout of ``node``'s NAR, checked against the ``narsize`` a URL claims.

        Raises :class:`NotFound` when its blob or root Directory is not
        stored, :class:`BadRequest` when the NAR has another size.
        """
        if isinstance(node, FileNode) and not await self.blobs.has(node.digest):
            raise NotFound(f"its blob {node.digest.hex()} is not stored")
        layout = await self._layouts.get(node)
        if layout is None:
            raise NotFound("its root Directory is not stored")
        if claimed_size is not None and claimed_size != str(layout.size):
            raise BadRequest(f"narsize={claimed_size!r}, but the NAR has {layout.size} bytes")
        return layout

    async def _serve_nar(
        self,
        request: web.Request,
        node: Node,
        claimed_size: str | None,
        claimed_sha256: bytes | None = None,
    ) -> web.StreamResponse:
        """Send the NAR of ``node`` (or the range asked for), its size checked first.

        A full NAR with ``claimed_sha256`` is hashed as it is sent: if it is
        not the claimed one, the connection is cut before its last piece.
        """
        what = request.get(SUBJECT, request.path)
        layout = await self.nar_layout(node, claimed_size)
        size = layout.size
        span = parse_range(request.headers.get("Range"), size)
        response = web.StreamResponse(
            status=200 if span is None else 206,
            headers={
                "Content-Type": NAR_TYPE,
                "Accept-Ranges": "bytes",
                # The URL names the content: it never changes.
                "Cache-Control": "public, max-age=31536000, immutable",
            },
        )
        if span is None:
            start, end = 0, size
            pieces = render_full(self.blobs, layout)
            if claimed_sha256 is not None:
                pieces = verify_nar(pieces, size, claimed_sha256, what)
        else:
            start, end = span
            response.headers["Content-Range"] = f"bytes {start}-{end - 1}/{size}"
            pieces = render_range(self.blobs, layout, start, end)
        response.content_length = end - start
        await response.prepare(request)
        if request.method == "HEAD":
            await response.write_eof()
            return response
        await self._stream(request, response, pieces, what)
        return response

    async def _stream(
        self,
        request: web.Request,
        response: web.StreamResponse,
        pieces: AsyncGenerator[bytes, None],
        what: str,
    ) -> None:
        """Send the pieces; on a failure mid-way, log it and cut the connection.

        The status line is gone already, so the client learns of the failure
        only from a body shorter than its Content-Length. (Returning the
        response unfinished is how aiohttp is told: its final ``write_eof``
        meets the closed connection and it counts a disconnect.)
        """
        try:
            # aclosing: a render cut short stops its prefetches at once.
            async with contextlib.aclosing(pieces):
                async for piece in pieces:
                    await response.write(piece)
        except ConnectionError:
            log.info("GET %s: client went away after %d bytes", what, response.body_length)
            return
        except Exception as e:
            _status, message = status_for(e)
            log.error(
                "GET %s: failed after %d bytes: %s",
                what,
                response.body_length,
                message,
                exc_info=is_unexpected(e),
            )
            if request.transport is not None:
                request.transport.abort()
            return
        await response.write_eof()

    # -- uploads --

    def _authorize_upload(self, request: web.Request) -> None:
        if not self.allow_upload:
            raise Forbidden("uploads are disabled (start nar-bridge with --allow-upload)")
        if self.upload_auth is not None:
            user = self.upload_auth.check(request.headers.get("Authorization"))
            if user is None:
                raise Unauthorized(
                    "uploads need valid credentials",
                    headers={"WWW-Authenticate": f'Basic realm="{self.upload_auth.realm}"'},
                )

    async def _expect(self, request: web.Request) -> web.StreamResponse | None:
        """Refuse an upload before its body is sent, or let it continue."""
        try:
            self._authorize_upload(request)
        except HTTPError as e:
            response = self._error_response(request, e)
            log.info("%s %s %d (before 100 Continue)", request.method, request.path, e.status)
            return response
        if (
            request.version == HttpVersion11
            and request.headers.get("Expect", "").lower() == "100-continue"
        ):
            await request.writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
            # The interim response is not part of the response body's size.
            request.writer.output_size = 0
        return None

    async def _put_cache_info(self, request: web.Request) -> web.Response:
        self._authorize_upload(request)
        return web.Response(status=204)

    async def _put_nar(self, request: web.Request) -> web.Response:
        self._authorize_upload(request)
        name = parse_nar_file_name(request.match_info["file"])
        if name is None:
            raise BadRequest(f"{request.path}: not nar/<nixbase32 sha256>.nar[.ext]")
        if self._decoders is None:
            self._decoders = concurrent.futures.ThreadPoolExecutor(16, "nar-bridge-decode")
        request[SUBJECT] = name.path
        body = NarBody(request.content.read, name.extension, self._decoders)
        await body.start()
        node, nar_size, nar_sha256 = await ingest_nar_stream(
            self.blobs, self.directories, body.read, b"nar"
        )
        file_size, file_hash = await body.finish()
        if file_hash != name.file_hash:
            raise BadRequest(f"the uploaded file's sha256 is {nixbase32.encode(file_hash)}")
        self.uploads.add(UploadedNar(name, file_size, body.compression, node, nar_size, nar_sha256))
        log.info(
            "ingested %s (%s, %d bytes): NAR sha256:%s, %d bytes",
            name.path,
            body.compression,
            file_size,
            nixbase32.encode(nar_sha256),
            nar_size,
        )
        return web.Response(text=f"ingested {name.path}\n")

    async def _put_narinfo(self, request: web.Request) -> web.Response:
        self._authorize_upload(request)
        hash_part = request.match_info["hash"]
        digest = parse_hash_part(hash_part)
        if request.content_length is not None and request.content_length > _MAX_NARINFO:
            raise PayloadTooLarge(f"narinfo of {request.content_length} bytes")
        raw = await request.content.read(_MAX_NARINFO + 1)
        while len(raw) <= _MAX_NARINFO and (
            more := await request.content.read(_MAX_NARINFO + 1 - len(raw))
        ):
            raw += more
        if len(raw) > _MAX_NARINFO:
            raise PayloadTooLarge(f"narinfo of more than {_MAX_NARINFO} bytes")
        narinfo = NarInfo.parse(raw)
        store_path = narinfo.store_path
        request[SUBJECT] = store_path.absolute_path
        if store_path.digest != digest:
            raise BadRequest(f"{hash_part}.narinfo describes {store_path}")
        info = await self._path_info_for(narinfo)
        # The file first: a record whose path was never put serves nothing.
        await self._record_file(narinfo, info)
        await self.path_infos.put(info)
        log.info("registered %s (NAR sha256:%s)", store_path, nixbase32.encode(info.nar_sha256))
        return web.Response(text=f"registered {store_path}\n")

    async def _path_info_for(self, narinfo: NarInfo) -> PathInfo:
        """The PathInfo an uploaded narinfo describes, if its NAR is known (else 4xx)."""
        store_path = narinfo.store_path
        nar_hash = nixbase32.encode(narinfo.nar_hash)
        file_name = _file_name_of(narinfo.url)
        if file_name is not None:
            uploaded = self.uploads.by_file(file_name.file_hash)
            if uploaded is not None and uploaded.nar_sha256 != narinfo.nar_hash:
                raise BadRequest(
                    f"NarHash sha256:{nar_hash} differs from the NAR uploaded as "
                    f"{file_name.path} (sha256:{nixbase32.encode(uploaded.nar_sha256)})"
                )
        node: Node | None = None
        nar = self.uploads.by_nar_sha256(narinfo.nar_hash)
        if nar is not None:
            node, nar_size = nar.node, nar.nar_size
        else:
            # Re-registering a path already stored (e.g. with more signatures).
            existing = await self.path_infos.get(store_path.digest)
            if existing is not None and existing.nar_sha256 == narinfo.nar_hash:
                node, nar_size = existing.node, existing.nar_size
            elif file_name is not None:
                # A file registered before a restart (Nix's HEAD found it, so it
                # uploaded no NAR), now named for another path with the same NAR.
                found = await self._uploaded_path(file_name)
                if found is not None and found[0].nar_sha256 == narinfo.nar_hash:
                    node, nar_size = found[0].node, found[0].nar_size
        if node is None:
            raise Conflict(
                f"no NAR with NarHash sha256:{nar_hash} was uploaded; "
                "upload the NAR before its narinfo"
            )
        if nar_size != narinfo.nar_size:
            raise BadRequest(
                f"NarSize {narinfo.nar_size} differs from the uploaded NAR's {nar_size} bytes"
            )
        return PathInfo.from_narinfo(narinfo, node)

    async def _record_file(self, narinfo: NarInfo, info: PathInfo) -> None:
        """Keep the URL of the NAR file ``narinfo`` names, if it was uploaded here.

        Nix caches the narinfo it uploaded and later asks for that URL.
        """
        name = _file_name_of(narinfo.url)
        if self.nar_files is None or name is None:
            return
        uploaded = self.uploads.by_file(name.file_hash)
        if uploaded is not None and uploaded.file == name:
            known = uploaded.nar_sha256 == info.nar_sha256
        else:
            found = await self._uploaded_path(name)
            known = found is not None and found[0].nar_sha256 == info.nar_sha256
        if not known:
            return
        if narinfo.compression not in SERVABLE:
            log.warning(
                "%s: not serving %s: cannot compress with %s",
                info.store_path,
                name.path,
                narinfo.compression,
            )
            return
        await self.nar_files.add(
            NarFileRecord(name, narinfo.compression, info.store_path, info.nar_sha256)
        )


def _file_name_of(url: str) -> NarFileName | None:
    path = url.partition("?")[0].removeprefix("/")
    if not path.startswith("nar/"):
        return None
    return parse_nar_file_name(path.removeprefix("nar/"))
