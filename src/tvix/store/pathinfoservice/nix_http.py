"""``nix+https://cache.example.org``: PathInfos read through from a Nix binary cache.

A lookup of a store path fetches ``<hash>.narinfo`` from the cache, checks
that it is trusted, downloads the NAR it points to (stream-decompressed:
``none``, ``xz``, ``bzip2``, ``zstd``, ``gzip``), ingests the NAR into the
blob and directory services this service was given, checks the NAR's sha256
and size against the narinfo, and returns the PathInfo: the root node named
after the store path, with references, deriver, signatures and content
address from the narinfo. Nothing of a NAR that fails a check is referred
to (its blobs may remain; they are content-addressed and harmless), and the
PathInfo is not returned.

Where it fits: the service keeps nothing itself, so every lookup downloads
again. Put it behind a cache combinator, with a persistent ``near``, so
each path is fetched once::

    [pathinfoservices.default]
    type = "cache"
    near = "local"
    far = "cachix"

    [pathinfoservices.local]
    type = "sqlite"
    path = "pathinfo.sqlite"

    [pathinfoservices.cachix]
    type = "nix"
    url = "https://cache.nixos.org"
    trusted_public_keys = "cache.nixos.org-1:6NCHdD59X431o0gWypbMrAURkbJ16ZPMQFGspcDShjY="

Concurrent lookups of one path share one download.

Trust (as Nix with ``require-sigs = true``): a narinfo is accepted if a
``Sig`` verifies under one of the trusted public keys, or if it is
content-addressed (``CA:``) and its store path is the one that content
address gives; every other narinfo raises :class:`UntrustedPathError`
before its NAR is downloaded. Without keys, only such content-addressed
paths are accepted. With ``require-sigs=false`` nothing is checked but the
hashes. Whatever the trust setting, the content of a content-addressed path
is checked against its content address (as Nix does when importing), and
:class:`~tvix.castore.errors.IntegrityError` is raised on a mismatch.

Absence: a narinfo answered with 404, 403 or 410 is an absent path
(``None``), as for Nix. Other HTTP errors, an unreachable cache and
malformed narinfos are :class:`~tvix.castore.errors.StorageError`; a NAR
whose hash or size differs from the narinfo's, or a narinfo for another
store path, is :class:`~tvix.castore.errors.IntegrityError`. ``FileHash``
and ``FileSize`` (of the compressed file) are not checked, as in Nix: the
NAR hash covers the content. The cache's ``nix-cache-info`` is read once,
at the first lookup: a cache without one, or for a store directory other
than ``/nix/store``, is refused with a :class:`StorageError`.

:meth:`~NixHTTPPathInfoService.put` is not supported (it raises
:class:`StorageError`): the service is a read-only view of the cache.
:attr:`~NixHTTPPathInfoService.supports_list` is false: binary caches
cannot be enumerated.

URLs (this service needs the blob and directory services to ingest into, so
a URL alone cannot build it: a composition builds it with its ``default``
blob and directory services, see :class:`NixCacheConfig`)::

    nix+https://cache.example.org[/prefix]?trusted-public-keys=K1%20K2
    nix+http://127.0.0.1:8080
    nix+file:///var/cache/binary-cache      (a file:// cache, as nix copy --to writes)

Options: ``trusted-public-keys`` (space-separated ``name:base64`` keys,
URL-encoded: a ``+`` in a key must be written ``%2B``, a space ``%20`` or
``+``) and ``require-sigs`` (``true``/``false``, default true).
"""

from __future__ import annotations

import asyncio
import bz2
import contextlib
import hashlib
import lzma
import zlib
from collections.abc import AsyncIterator, Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any, Protocol, Self

import aiohttp
import zstandard

from tvix import __version__
from tvix.castore.blobservice.base import BlobService
from tvix.castore.composition import BuildContext, ServiceConfig, setting
from tvix.castore.directoryservice.base import DirectoryService
from tvix.castore.errors import IntegrityError, InvalidURLError, StorageError
from tvix.castore.nodes import FileNode
from tvix.castore.url import ServiceURL
from tvix.nixcompat import nixbase32
from tvix.nixcompat.cahash import CAHash, CAKind
from tvix.nixcompat.errors import NixCompatError
from tvix.nixcompat.hashes import HashAlgo
from tvix.nixcompat.narinfo import NarInfo
from tvix.nixcompat.signing import VerifyingKey, parse_public_keys
from tvix.nixcompat.storepath import STORE_DIR, build_ca_path
from tvix.store.errors import NarMismatchError, StoreError
from tvix.store.nar.ingest import ingest_nar_stream
from tvix.store.nar.render import render_nar
from tvix.store.pathinfo import PathInfo
from tvix.store.pathinfoservice.base import PathInfoService, check_digest

__all__ = [
    "BinaryCache",
    "NixCacheConfig",
    "NixHTTPPathInfoService",
    "UntrustedPathError",
    "check_ca_content",
    "check_trust",
    "parse_nix_url",
]

SCHEMES = ("nix+http", "nix+https", "nix+file")
# Bytes asked for per read of a NAR download.
READ_SIZE = 1 << 16
# Largest output of one decompression step: bounds memory whatever the input
# expands to (a few KiB of xz can hold GiBs of zeros).
MAX_STEP_OUTPUT = 1 << 20
# zstd's streaming object cannot cap its output, so it is fed slices this small.
_ZSTD_SLICE = 1 << 13
# narinfo answers that mean "not in this cache", as for Nix.
_ABSENT = (403, 404, 410)


class UntrustedPathError(StoreError, IntegrityError):
    """A narinfo carries no signature by a trusted key and is not content-addressed."""


# -- trust ------------------------------------------------------------------------------------


def check_trust(info: NarInfo, keys: Mapping[str, VerifyingKey], require_sigs: bool) -> None:
    """Raise :class:`UntrustedPathError` unless ``info`` may be used (see the module docs)."""
    if not require_sigs or info.verify(keys) or _ca_path_ok(info):
        return
    what = "no signature" if not info.signatures else "no valid signature by a trusted key"
    known = ", ".join(sorted(keys)) or "none configured"
    raise UntrustedPathError(
        f"{info.store_path} has {what} (trusted keys: {known}; signed by: "
        f"{', '.join(sorted({s.name for s in info.signatures})) or 'nobody'})"
    )


def _ca_path_ok(info: NarInfo) -> bool:
    ca = info.ca
    if ca is None:
        return False
    path = info.store_path
    refs = [r for r in info.references if r != path]
    try:
        computed = build_ca_path(
            path.name, ca, refs, self_reference=len(refs) != len(info.references)
        )
    except NixCompatError:
        return False
    return computed == path


async def check_ca_content(
    blobs: BlobService, dirs: DirectoryService, info: PathInfo, ca: CAHash
) -> None:
    """Raise :class:`IntegrityError` unless the ingested content hashes to ``ca``."""
    if ca.kind is CAKind.NAR:
        if ca.algo is HashAlgo.SHA256:
            got = info.nar_sha256
        else:
            h = hashlib.new(str(ca.algo))
            async for piece in render_nar(blobs, dirs, info.node):
                h.update(piece)
            got = h.digest()
    else:
        node = info.node
        if not isinstance(node, FileNode):
            raise IntegrityError(
                f"{info.store_path}: content address {ca} is of a file, the NAR is not one"
            )
        reader = await blobs.open_read(node.digest)
        if reader is None:
            raise StorageError(f"{info.store_path}: blob {node.digest.hex()} vanished")
        h = hashlib.new(str(ca.algo))
        async with reader:
            while chunk := await reader.read(1 << 20):
                h.update(chunk)
        got = h.digest()
    if got != ca.digest:
        raise IntegrityError(
            f"{info.store_path}: content does not match its content address {ca} "
            f"({ca.algo} of the content is {got.hex()})"
        )


# -- decompression ----------------------------------------------------------------------------


class _Decompressor(Protocol):
    def feed(self, data: bytes) -> Iterator[bytes]:
        """Decompressed output for ``data``, in pieces of at most MAX_STEP_OUTPUT."""
        ...

    def finish(self) -> None:
        """Raise if the compressed stream ended early."""
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
            raise StorageError(f"the {self._name} stream of the NAR ends early")


class _Zstd:
    def __init__(self) -> None:
        self._obj = zstandard.ZstdDecompressor().decompressobj(read_across_frames=True)
        self._seen = False

    def feed(self, data: bytes) -> Iterator[bytes]:
        view = memoryview(data)
        for start in range(0, len(view), _ZSTD_SLICE):
            self._seen = True
            out = self._obj.decompress(view[start : start + _ZSTD_SLICE])
            if out:
                yield out

    def finish(self) -> None:
        if not self._seen:
            raise StorageError("the zstd stream of the NAR is empty")


def _decompressor(compression: str) -> _Decompressor:
    if compression == "none":
        return _Identity()
    if compression == "xz":
        return _Capped(lzma.LZMADecompressor(), "xz")
    if compression == "bzip2":
        return _Capped(bz2.BZ2Decompressor(), "bzip2")
    if compression == "gzip":
        return _Capped(zlib.decompressobj(wbits=47), "gzip")  # 47: gzip or zlib header
    if compression == "zstd":
        return _Zstd()
    raise StorageError(
        f"NAR compression {compression!r} is not supported (none, xz, bzip2, zstd, gzip are)"
    )


class _NarStream:
    """``read(n)`` over a decompressed download, for :func:`ingest_nar_stream`."""

    def __init__(self, chunks: AsyncIterator[bytes], decompressor: _Decompressor) -> None:
        self._chunks = chunks
        self._decompressor = decompressor
        self._pending: Iterator[bytes] = iter(())
        self._buf = b""
        self._eof = False

    async def read(self, n: int) -> bytes:
        while not self._buf:
            try:
                piece = next(self._pending, None)
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
            except _DECOMPRESSION_ERRORS as e:
                raise StorageError(f"cannot decompress the NAR: {e}") from None
        out, self._buf = self._buf[:n], self._buf[n:]
        return out

    async def aclose(self) -> None:
        """Stop the download (closes the HTTP response or file)."""
        aclose = getattr(self._chunks, "aclose", None)
        if aclose is not None:
            await aclose()


# bz2 reports damaged input as OSError; nothing else in the block raises one (the
# download wraps its own I/O errors in StorageError).
_DECOMPRESSION_ERRORS = (
    lzma.LZMAError,
    OSError,
    EOFError,
    zlib.error,
    zstandard.ZstdError,
    ValueError,
)


# -- the cache ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Target:
    """A cache location: an ``http(s)://`` base URL, or a directory of a ``file://`` cache."""

    base: str
    directory: str | None


@contextlib.contextmanager
def _http_errors(what: str) -> Iterator[None]:
    """The one place where aiohttp's and the network's errors become StorageError."""
    try:
        yield
    except (aiohttp.ClientError, TimeoutError, OSError) as e:
        detail = str(e).strip() or type(e).__name__
        raise StorageError(f"{what}: {detail}") from e


class BinaryCache:
    """A Nix binary cache read over HTTP(S) or from a local directory (``file://``).

    Only reads: narinfos and NARs. The HTTP session is created on first use
    and closed by :meth:`close`.
    """

    def __init__(self, url: str, *, connections: int = 16) -> None:
        """``url``: ``http(s)://host[:port][/prefix]`` or ``file:///dir``."""
        if url.startswith("file://"):
            directory = url.removeprefix("file://")
            if not directory.startswith("/"):
                raise InvalidURLError(
                    f"invalid binary cache URL {url!r}: the path must be absolute"
                )
            self._target = _Target(url.rstrip("/"), directory.rstrip("/") or "/")
        elif url.startswith(("http://", "https://")):
            self._target = _Target(url.rstrip("/"), None)
        else:
            raise InvalidURLError(
                f"invalid binary cache URL {url!r}: expected http://, https:// or file://"
            )
        self.url = self._target.base
        self._connections = connections
        self._session: aiohttp.ClientSession | None = None
        self._checked: asyncio.Future[None] | None = None

    def _http(self) -> aiohttp.ClientSession:
        if self._session is None:
            self._session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(limit=self._connections),
                timeout=aiohttp.ClientTimeout(total=None, sock_connect=30, sock_read=120),
                headers={"User-Agent": f"tvix-store/{__version__}"},
                # Nix caches serve .nar.xz etc. as opaque bytes; never let aiohttp
                # undo a Content-Encoding on our behalf.
                auto_decompress=False,
            )
        return self._session

    def _resolve(self, relative: str) -> str:
        # As Nix: URLs in narinfos are relative to the cache (an absolute one is used as is).
        if "://" in relative:
            return relative
        return f"{self._target.base}/{relative}"

    async def _get_small(self, relative: str) -> bytes | None:
        """A small file of the cache, ``None`` when absent (404/403/410 or no such file)."""
        url = self._resolve(relative)
        if self._target.directory is not None and url.startswith("file://"):
            path = url.removeprefix("file://")
            try:
                return await asyncio.to_thread(_read_file, path)
            except FileNotFoundError:
                return None
            except OSError as e:
                raise StorageError(f"binary cache {self.url}: reading {path}: {e}") from e
        with _http_errors(f"binary cache: GET {url}"):
            async with self._http().get(url) as resp:
                if resp.status in _ABSENT:
                    return None
                if resp.status != 200:
                    raise StorageError(f"binary cache: GET {url}: HTTP {resp.status}")
                return await resp.read()

    async def _check_cache_info(self) -> None:
        # Once, shared by concurrent first lookups; a failure is retried next time.
        if self._checked is None or (self._checked.done() and self._checked.exception()):
            self._checked = asyncio.ensure_future(self._read_cache_info())
        await asyncio.shield(self._checked)

    async def _read_cache_info(self) -> None:
        text = await self._get_small("nix-cache-info")
        if text is None:
            raise StorageError(
                f"{self.url} does not appear to be a Nix binary cache (no nix-cache-info)"
            )
        for line in text.decode(errors="replace").splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "StoreDir" and value.strip() != STORE_DIR:
                raise StorageError(
                    f"binary cache {self.url} is for store {value.strip()}, not {STORE_DIR}"
                )

    async def narinfo(self, digest: bytes) -> NarInfo | None:
        """The narinfo of the store path with hash ``digest``, ``None`` if the cache lacks it.

        Raises :class:`StorageError` when it is malformed and
        :class:`IntegrityError` when it is for another store path.
        """
        await self._check_cache_info()
        hash_part = nixbase32.encode(digest)
        raw = await self._get_small(f"{hash_part}.narinfo")
        if raw is None:
            return None
        try:
            info = NarInfo.parse(raw)
        except NixCompatError as e:
            raise StorageError(f"binary cache {self.url}: {hash_part}.narinfo: {e}") from None
        if info.store_path.digest != digest:
            raise IntegrityError(
                f"binary cache {self.url}: {hash_part}.narinfo is for {info.store_path}"
            )
        return info

    async def nar(self, info: NarInfo) -> AsyncIterator[bytes]:
        """The (still compressed) bytes of the NAR file ``info`` points to, streamed."""
        url = self._resolve(info.url)
        if self._target.directory is not None and url.startswith("file://"):
            path = url.removeprefix("file://")
            try:
                f = await asyncio.to_thread(open, path, "rb")
            except OSError as e:
                raise StorageError(f"binary cache {self.url}: {info.url}: {e}") from e
            try:
                while True:
                    try:
                        data = await asyncio.to_thread(f.read, READ_SIZE)
                    except OSError as e:
                        raise StorageError(f"binary cache {self.url}: {info.url}: {e}") from e
                    if not data:
                        return
                    yield data
            finally:
                f.close()
        with _http_errors(f"binary cache: GET {url}"):
            async with self._http().get(url) as resp:
                if resp.status != 200:
                    raise StorageError(f"binary cache: GET {url}: HTTP {resp.status}")
                async for data in resp.content.iter_chunked(READ_SIZE):
                    yield data

    async def close(self) -> None:
        """Close the HTTP session; idempotent."""
        session, self._session = self._session, None
        if session is not None:
            await session.close()


def _read_file(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()


# -- the service -------------------------------------------------------------------------------


class NixHTTPPathInfoService(PathInfoService):
    """PathInfos from a Nix binary cache, NARs ingested into castore (see the module docs)."""

    supports_list = False

    def __init__(
        self,
        cache: BinaryCache,
        blob_service: BlobService,
        directory_service: DirectoryService,
        *,
        trusted_keys: Mapping[str, VerifyingKey] | Iterable[VerifyingKey] = (),
        require_sigs: bool = True,
    ) -> None:
        self.cache = cache
        self._blobs = blob_service
        self._dirs = directory_service
        self._keys = (
            dict(trusted_keys)
            if isinstance(trusted_keys, Mapping)
            else {k.name: k for k in trusted_keys}
        )
        self._require_sigs = require_sigs
        self._running: dict[bytes, asyncio.Future[PathInfo | None]] = {}

    async def get(self, digest: bytes) -> PathInfo | None:
        key = check_digest(digest)
        running = self._running.get(key)
        if running is None:
            running = asyncio.ensure_future(self._fetch(key))
            self._running[key] = running
            running.add_done_callback(lambda _f: self._running.pop(key, None))
        return await asyncio.shield(running)

    async def _fetch(self, digest: bytes) -> PathInfo | None:
        narinfo = await self.cache.narinfo(digest)
        if narinfo is None:
            return None
        check_trust(narinfo, self._keys, self._require_sigs)
        path = narinfo.store_path
        stream = _NarStream(self.cache.nar(narinfo), _decompressor(narinfo.compression))
        try:
            node, size, sha256 = await ingest_nar_stream(
                self._blobs,
                self._dirs,
                stream.read,
                path.base_name.encode(),
                expected_sha256=narinfo.nar_hash,
                expected_size=narinfo.nar_size,
            )
        except NarMismatchError as e:
            raise IntegrityError(f"binary cache {self.cache.url}: NAR of {path}: {e}") from None
        except NixCompatError as e:  # a malformed NAR
            raise IntegrityError(f"binary cache {self.cache.url}: NAR of {path}: {e}") from None
        finally:
            await stream.aclose()
        info = PathInfo(
            store_path=path,
            node=node,
            nar_size=size,
            nar_sha256=sha256,
            references=tuple(dict.fromkeys(narinfo.references)),
            signatures=narinfo.signatures,
            deriver=narinfo.deriver,
            ca=narinfo.ca,
        )
        if narinfo.ca is not None:
            await check_ca_content(self._blobs, self._dirs, info, narinfo.ca)
        return info

    async def put(self, info: PathInfo) -> PathInfo:
        raise StorageError(
            f"the binary cache {self.cache.url} is read-only through tvix "
            "(put the PathInfo into the cache combinator's near service instead)"
        )

    async def close(self) -> None:
        await self.cache.close()


# -- construction ------------------------------------------------------------------------------


@dataclass(frozen=True)
class NixCacheSettings:
    """What a ``nix+...`` URL (or a composition entry) says."""

    cache_url: str
    trusted_keys: dict[str, VerifyingKey]
    require_sigs: bool


def _parse_keys(text: str, where: str) -> dict[str, VerifyingKey]:
    try:
        return parse_public_keys(text)
    except NixCompatError as e:
        raise InvalidURLError(
            f"{where}: invalid trusted public key: {e} (in a URL, write '+' as %2B)"
        ) from None


def parse_nix_url(url: ServiceURL) -> NixCacheSettings:
    """Check a ``nix+http(s)://`` or ``nix+file://`` URL; see the module docs."""
    if url.scheme not in SCHEMES:
        raise InvalidURLError(f"invalid service URL {url.raw!r}: expected one of {SCHEMES}")
    url.reject_params("trusted-public-keys", "require-sigs")
    inner = url.scheme.removeprefix("nix+")
    if inner == "file":
        url.reject_host()
        cache = f"file://{url.require_path()}"
    else:
        if not url.host:
            raise InvalidURLError(f"invalid service URL {url.raw!r}: a host is required")
        cache = f"{inner}://{url.host}{url.path}"
    require = url.params.get("require-sigs", "true")
    if require not in ("true", "false", "1", "0"):
        raise InvalidURLError(
            f"invalid service URL {url.raw!r}: require-sigs must be true or false"
        )
    keys = _parse_keys(
        url.params.get("trusted-public-keys", ""), f"invalid service URL {url.raw!r}"
    )
    return NixCacheSettings(cache, keys, require in ("true", "1"))


@dataclass(frozen=True)
class NixCacheConfig(ServiceConfig):
    """``nix+https://host/path?trusted-public-keys=...&require-sigs=...`` (type ``nix``).

    In a table: ``url`` (``https://...``, ``http://...``, ``file:///...``, or
    a ``nix+...`` URL with its options), ``trusted_public_keys``
    (space-separated, as in nix.conf, added to the URL's), ``require_sigs``
    (default true), and ``blob_service`` / ``directory_service``: the names
    of the services NARs are ingested into (default ``default``). Building
    needs those, so it takes a composition.
    """

    url: str = setting("str")
    trusted_public_keys: str = setting("str", "")
    require_sigs: bool | None = setting("bool", None)
    blob_service: str = setting("str", "default")
    directory_service: str = setting("str", "default")

    @classmethod
    def from_url(cls, url: ServiceURL) -> Self:
        """Checks the URL (see :func:`parse_nix_url`)."""
        parse_nix_url(url)
        return cls(url.raw)

    def cache_settings(self, where: str) -> NixCacheSettings:
        """The cache, its trusted keys and whether signatures are required."""
        if self.url.startswith("nix+"):
            parsed = parse_nix_url(ServiceURL.parse(self.url))
            keys = dict(parsed.trusted_keys)
            require = parsed.require_sigs
            cache = parsed.cache_url
        else:
            BinaryCache(self.url)  # checks the URL
            cache, keys, require = self.url, {}, True
        keys.update(_parse_keys(self.trusted_public_keys, where))
        if self.require_sigs is not None:
            require = self.require_sigs
        return NixCacheSettings(cache, keys, require)

    def build(self, ctx: BuildContext) -> NixHTTPPathInfoService:
        """Reads through into the composition's blob and directory services."""
        if ctx.composition is None:
            raise InvalidURLError(
                f"{self.url.partition(':')[0]}:// PathInfo services ingest NARs into blob and "
                'directory services, so they are built by a composition (type "nix", or a URL '
                "given together with the blob and directory service URLs), not alone"
            )
        settings = self.cache_settings(f"{ctx.kind}.{ctx.name}")
        return NixHTTPPathInfoService(
            BinaryCache(settings.cache_url),
            ctx.blob_service(self.blob_service),
            ctx.directory_service(self.directory_service),
            trusted_keys=settings.trusted_keys,
            require_sigs=settings.require_sigs,
        )
