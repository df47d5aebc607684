"""A Nix binary cache, read over HTTP(S) or from a local directory (``file://``).

:class:`BinaryCache` fetches narinfos and the (still compressed) NAR files
they point to; it checks nothing but that a narinfo parses and is for the
store path asked for. Trust and NAR checks are the callers' (see
:class:`~tvix.store.pathinfoservice.nix_http.NixHTTPPathInfoService`).

Absence: a narinfo answered with 404, 403 or 410 (or a missing file) is
``None``, as for Nix. Other HTTP errors, an unreachable cache and malformed
narinfos are :class:`~tvix.castore.errors.StorageError`. The cache's
``nix-cache-info`` is read once, at the first lookup: a cache without one,
or for a store directory other than ``/nix/store``, is refused with a
:class:`~tvix.castore.errors.StorageError`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass

import aiohttp

from tvix import __version__
from tvix.castore.errors import IntegrityError, InvalidURLError, StorageError
from tvix.nixcompat import nixbase32
from tvix.nixcompat.errors import NixCompatError
from tvix.nixcompat.narinfo import NarInfo
from tvix.nixcompat.storepath import STORE_DIR

__all__ = ["BinaryCache"]

# Bytes asked for per read of a NAR download.
READ_SIZE = 1 << 16
# narinfo answers that mean "not in this cache", as for Nix.
_ABSENT = (403, 404, 410)


log = logging.getLogger(__name__)


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


# As Nix (download-attempts = 5): transient failures are retried, with backoff.
ATTEMPTS = 5
_BACKOFF = 0.25
# Answers worth asking again: the server is overloaded, restarting or rate-limiting.
_TRANSIENT = (429, 500, 502, 503, 504)


class _Transient(Exception):
    def __init__(self, status: int) -> None:
        self.status = status


class BinaryCache:
    """A Nix binary cache read over HTTP(S) or from a local directory (``file://``).

    Only reads: narinfos and NARs. The HTTP session is created on first use
    and closed by :meth:`close`; it honours ``HTTP(S)_PROXY``/``http(s)_proxy``
    and ``NO_PROXY`` as Nix does. A request that fails transiently (no
    connection, a reset, HTTP 429/5xx) is tried again, :data:`ATTEMPTS`
    times in all with growing pauses; a NAR download only until its first
    bytes arrived.
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
                trust_env=True,
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
        for attempt in range(1, ATTEMPTS + 1):
            try:
                with _http_errors(f"binary cache: GET {url}"):
                    async with self._http().get(url) as resp:
                        if resp.status in _ABSENT:
                            return None
                        if resp.status in _TRANSIENT:
                            raise _Transient(resp.status)
                        if resp.status != 200:
                            raise StorageError(f"binary cache: GET {url}: HTTP {resp.status}")
                        return await resp.read()
            except (StorageError, _Transient) as e:
                if attempt == ATTEMPTS or not _worth_retrying(e):
                    if isinstance(e, _Transient):
                        raise StorageError(f"binary cache: GET {url}: HTTP {e.status}") from None
                    raise
                log.info("binary cache: GET %s failed (%s); attempt %d", url, e, attempt + 1)
                await asyncio.sleep(_BACKOFF * 2 ** (attempt - 1))
        raise AssertionError("unreachable")  # pragma: no cover

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
        for attempt in range(1, ATTEMPTS + 1):
            started = False
            try:
                with _http_errors(f"binary cache: GET {url}"):
                    async with self._http().get(url) as resp:
                        if resp.status in _TRANSIENT:
                            raise _Transient(resp.status)
                        if resp.status != 200:
                            raise StorageError(f"binary cache: GET {url}: HTTP {resp.status}")
                        async for data in resp.content.iter_chunked(READ_SIZE):
                            started = True
                            yield data
                return
            except (StorageError, _Transient) as e:
                # Once bytes were passed on, only the caller can start over.
                if started or attempt == ATTEMPTS or not _worth_retrying(e):
                    if isinstance(e, _Transient):
                        raise StorageError(f"binary cache: GET {url}: HTTP {e.status}") from None
                    raise
                log.info("binary cache: GET %s failed (%s); attempt %d", url, e, attempt + 1)
                await asyncio.sleep(_BACKOFF * 2 ** (attempt - 1))

    async def close(self) -> None:
        """Close the HTTP session; idempotent."""
        session, self._session = self._session, None
        if session is not None:
            await session.close()


def _read_file(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()


def _worth_retrying(e: Exception) -> bool:
    """A transient HTTP answer, or a failure of the connection (not a bad answer of ours)."""
    return isinstance(e, _Transient) or isinstance(
        e.__cause__, aiohttp.ClientConnectionError | aiohttp.ClientPayloadError | TimeoutError
    )
