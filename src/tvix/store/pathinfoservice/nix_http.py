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
address gives; every other narinfo raises
:class:`~tvix.store.errors.UntrustedPathInfoError` before its NAR is
downloaded (the :class:`~tvix.store.trust.TrustPolicy` with
``accept_ca``). Without keys, only such content-addressed paths are
accepted. With ``require-sigs=false`` nothing is checked but the
hashes. Whatever the trust setting, the content of a content-addressed path
is checked against its content address (as Nix does when importing), and
:class:`~tvix.castore.errors.IntegrityError` is raised on a mismatch.

The cache itself is read by :class:`~tvix.store.binary_cache.BinaryCache`
and the NAR decompressed by :mod:`tvix.nixcompat.compression`.

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
:class:`StorageError`): the service is a read-only view of the cache
(:attr:`~NixHTTPPathInfoService.supports_put` is false).
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
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass, replace
from typing import Self

from typing_extensions import override

from tvix.castore.blobservice.base import BlobService
from tvix.castore.composition import BuildContext, ServiceConfig, setting
from tvix.castore.directoryservice.base import DirectoryService
from tvix.castore.errors import IntegrityError, InvalidURLError, StorageError
from tvix.castore.url import ServiceURL
from tvix.nixcompat.compression import CompressionError, DecompressingReader
from tvix.nixcompat.errors import NixCompatError
from tvix.nixcompat.signing import VerifyingKey, parse_public_keys
from tvix.store.binary_cache import BinaryCache
from tvix.store.errors import NarMismatchError, UntrustedPathInfoError
from tvix.store.nar.ingest import ingest_nar_stream
from tvix.store.pathinfo import PathInfo
from tvix.store.pathinfoservice.base import PathInfoService, check_digest
from tvix.store.trust import TrustPolicy, check_ca_content

__all__ = [
    "BinaryCache",
    "NixCacheConfig",
    "NixHTTPPathInfoService",
    "UntrustedPathInfoError",
    "check_ca_content",
    "parse_nix_url",
]

SCHEMES = ("nix+http", "nix+https", "nix+file")


# -- the service -------------------------------------------------------------------------------


def _counting(
    read: Callable[[int], Awaitable[bytes]], progress: Callable[[int], None]
) -> Callable[[int], Awaitable[bytes]]:
    """``read``, telling ``progress`` the size of each piece it returns."""

    async def counted(n: int) -> bytes:
        data = await read(n)
        progress(len(data))
        return data

    return counted


class NixHTTPPathInfoService(PathInfoService):
    """PathInfos from a Nix binary cache, NARs ingested into castore (see the module docs).

    ``policy`` decides which narinfos are trusted; without one, it is
    ``TrustPolicy(trusted_keys, require_sigs=require_sigs, accept_ca=True)``.
    ``nar_progress`` is called with the size of each piece of NAR
    (decompressed) as it is ingested, e.g. for a progress display.
    """

    def __init__(
        self,
        cache: BinaryCache,
        blob_service: BlobService,
        directory_service: DirectoryService,
        *,
        trusted_keys: Mapping[str, VerifyingKey] | Iterable[VerifyingKey] = (),
        require_sigs: bool = True,
        policy: TrustPolicy | None = None,
        nar_progress: Callable[[int], None] | None = None,
    ) -> None:
        self.cache = cache
        self._nar_progress = nar_progress
        self._blobs = blob_service
        self._dirs = directory_service
        self.policy = (
            policy
            if policy is not None
            else TrustPolicy(trusted_keys, require_sigs=require_sigs, accept_ca=True)
        )
        self._running: dict[bytes, asyncio.Future[PathInfo | None]] = {}

    @override
    @property
    def supports_list(self) -> bool:
        return False

    @override
    @property
    def supports_put(self) -> bool:
        return False

    @override
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
        self.policy.check_signatures(narinfo)
        path = narinfo.store_path
        try:
            stream = DecompressingReader(self.cache.nar(narinfo), narinfo.compression)
        except CompressionError as e:
            raise StorageError(str(e)) from None
        read: Callable[[int], Awaitable[bytes]] = stream.read
        if self._nar_progress is not None:
            read = _counting(read, self._nar_progress)
        try:
            node, _size, _sha256 = await ingest_nar_stream(
                self._blobs,
                self._dirs,
                read,
                path.base_name.encode(),
                expected_sha256=narinfo.nar_hash,
                expected_size=narinfo.nar_size,
            )
        except CompressionError as e:
            raise StorageError(f"cannot decompress the NAR: {e}") from None
        except NarMismatchError as e:
            raise IntegrityError(f"binary cache {self.cache.url}: NAR of {path}: {e}") from None
        except NixCompatError as e:  # a malformed NAR
            raise IntegrityError(f"binary cache {self.cache.url}: NAR of {path}: {e}") from None
        finally:
            await stream.aclose()
        # The NAR hash and size were checked against the narinfo's while ingesting.
        unique = replace(narinfo, references=tuple(dict.fromkeys(narinfo.references)))
        info = PathInfo.from_narinfo(unique, node)
        await self.policy.check_content(info, self._blobs, self._dirs)
        return info

    @override
    async def put(self, info: PathInfo) -> PathInfo:
        raise StorageError(
            f"the binary cache {self.cache.url} is read-only through tvix "
            "(put the PathInfo into the cache combinator's near service instead)"
        )

    @override
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
