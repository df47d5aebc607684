"""The options of the packed stores: one frozen config per flavour.

Each is built from a URL (:meth:`~PacksFileConfig.from_url`, strict: unknown
options, hosts or paths are rejected naming them) or from a composition
table of the same options (type ``packs`` or ``packs_s3``), and builds its
service (:meth:`~PacksFileConfig.build`). Checking never touches the disk or
the network.

``packs+file:///abs/dir``
    packs in ``dir/packs/``, the index in ``dir/index.sqlite``.
``packs+s3://bucket[/prefix]?index=postgresql://...``
    packs as objects under ``prefix/packs/``, the index in PostgreSQL (the
    ``index`` URL percent-encoded when it has options of its own:
    ``index=postgresql%3A%2F%2Fhost%2Fdb%3Fschema%3Dx``). ``endpoint``,
    ``region``, ``allow_http`` as for ``objectstore+s3`` (credentials from
    the environment: ``AWS_ACCESS_KEY_ID``, ...).

Options of both: ``zstd=true|false`` (default true: compress a chunk when
it saves at least 1/16), ``avg_chunk_size`` (bytes, default 262144: FastCDC
cuts between half and twice that), ``pack_size`` (bytes, default 67108864:
a pack is let go once it reaches it; on S3 a pack is one group commit).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Self

from tvix.castore.blobservice.packs._service import (
    DEFAULT_AVG_CHUNK_SIZE,
    DEFAULT_PACK_SIZE,
    MAX_AVG_CHUNK_SIZE,
    MIN_AVG_CHUNK_SIZE,
    MIN_PACK_SIZE,
    PacksBlobService,
)
from tvix.castore.composition import BuildContext, ServiceConfig, setting
from tvix.castore.errors import InvalidURLError
from tvix.castore.url import ServiceURL

__all__ = ["PacksFileConfig", "PacksS3Config"]

_COMMON = ("zstd", "avg_chunk_size", "pack_size")


def _check_common(avg: int, pack: int) -> None:
    if not MIN_AVG_CHUNK_SIZE <= avg <= MAX_AVG_CHUNK_SIZE:
        raise InvalidURLError(
            f"avg_chunk_size must be within {MIN_AVG_CHUNK_SIZE}..{MAX_AVG_CHUNK_SIZE}"
        )
    if pack < MIN_PACK_SIZE:
        raise InvalidURLError(f"pack_size must be at least {MIN_PACK_SIZE}")


def _in_url(url: ServiceURL, build: Any) -> Any:
    """``build()``, its complaints prefixed with the URL."""
    try:
        return build()
    except InvalidURLError as e:
        if str(e).startswith("invalid service URL"):
            raise
        raise InvalidURLError(f"invalid service URL {url.raw!r}: {e}") from None


@dataclass(frozen=True)
class PacksFileConfig(ServiceConfig):
    """``packs+file:///abs/dir?zstd=&avg_chunk_size=&pack_size=`` (type ``packs``)."""

    path: str = setting("path")
    zstd: bool = setting("bool", True)
    avg_chunk_size: int = setting("int", DEFAULT_AVG_CHUNK_SIZE)
    pack_size: int = setting("int", DEFAULT_PACK_SIZE)

    def __post_init__(self) -> None:
        if not self.path.startswith("/"):
            raise InvalidURLError("the path must be absolute")
        _check_common(self.avg_chunk_size, self.pack_size)

    @classmethod
    def from_url(cls, url: ServiceURL) -> Self:
        """Check the URL; nothing is created."""
        url.reject_params(*_COMMON)
        url.reject_host()
        path = url.require_path()
        return _in_url(  # type: ignore[no-any-return]
            url,
            lambda: cls(
                path=path.rstrip("/") or "/",
                zstd=url.bool_param("zstd", True),
                avg_chunk_size=url.int_param("avg_chunk_size", DEFAULT_AVG_CHUNK_SIZE),
                pack_size=url.int_param("pack_size", DEFAULT_PACK_SIZE),
            ),
        )

    def build(self, ctx: BuildContext | None = None) -> PacksBlobService:
        """The service (creates the directory and the index if absent)."""
        from tvix.castore.blobservice.packs._index import SQLiteIndex, sqlite_path
        from tvix.castore.blobservice.packs._storage import LocalPacks

        try:
            os.makedirs(self.path, exist_ok=True)
        except OSError as e:
            raise InvalidURLError(f"packs+file: cannot use {self.path}: {e.strerror}") from e
        index = SQLiteIndex(sqlite_path(self.path))
        return PacksBlobService(
            LocalPacks(self.path, index),
            index,
            zstd=self.zstd,
            avg_chunk_size=self.avg_chunk_size,
            pack_size=self.pack_size,
            local=True,
        )


@dataclass(frozen=True)
class PacksS3Config(ServiceConfig):
    """Type ``packs_s3``: ``packs+s3://bucket/prefix?index=postgresql://...``.

    Also ``endpoint``, ``region``, ``allow_http``, ``zstd``, ``avg_chunk_size``,
    ``pack_size``.
    """

    bucket: str = setting("str")
    index: str = setting("str")
    prefix: str = setting("str", "")
    endpoint: str | None = setting("str", None)
    region: str | None = setting("str", None)
    allow_http: bool | None = setting("bool", None)
    zstd: bool = setting("bool", True)
    avg_chunk_size: int = setting("int", DEFAULT_AVG_CHUNK_SIZE)
    pack_size: int = setting("int", DEFAULT_PACK_SIZE)

    def __post_init__(self) -> None:
        _check_common(self.avg_chunk_size, self.pack_size)
        if not self.bucket or "@" in self.bucket or ":" in self.bucket:
            raise InvalidURLError(
                "expected packs+s3://BUCKET[/PREFIX] (credentials come from the "
                "environment, the endpoint from ?endpoint=)"
            )
        if "//" in self.prefix:
            raise InvalidURLError("empty segment in the prefix")
        if self.endpoint is not None and not self.endpoint.startswith(("http://", "https://")):
            raise InvalidURLError("endpoint must be an http:// or https:// URL")
        self._index_config()  # checks its options

    def _index_config(self) -> Any:
        from tvix.castore.blobservice.packs._pgindex import PackIndexConfig

        return PackIndexConfig.from_url(ServiceURL.parse(self.index))

    @classmethod
    def from_url(cls, url: ServiceURL) -> Self:
        """Check the URL and the index URL in it; nothing connects."""
        url.reject_params("index", "endpoint", "region", "allow_http", *_COMMON)
        index = url.params.get("index")
        if not index:
            raise InvalidURLError(
                f"invalid service URL {url.raw!r}: index=postgresql://... is required "
                "(the index of the packs, shared by every daemon using the bucket)"
            )
        allow_http = url.params.get("allow_http")
        return _in_url(  # type: ignore[no-any-return]
            url,
            lambda: cls(
                bucket=url.host,
                index=index,
                prefix=url.path.strip("/"),
                endpoint=url.params.get("endpoint"),
                region=url.params.get("region"),
                allow_http=None if allow_http is None else url.bool_param("allow_http", False),
                zstd=url.bool_param("zstd", True),
                avg_chunk_size=url.int_param("avg_chunk_size", DEFAULT_AVG_CHUNK_SIZE),
                pack_size=url.int_param("pack_size", DEFAULT_PACK_SIZE),
            ),
        )

    def build(self, ctx: BuildContext | None = None) -> PacksBlobService:
        """The service; connects to nothing until first used."""
        from obstore.exceptions import BaseError
        from obstore.store import S3Store

        from tvix.castore.blobservice.packs._storage import S3Packs

        config: dict[str, str] = {}
        if self.endpoint is not None:
            config["endpoint"] = self.endpoint.rstrip("/")
        if self.region is not None:
            config["region"] = self.region
        allow_http = self.allow_http
        if allow_http is None:
            allow_http = self.endpoint is not None and self.endpoint.startswith("http://")
        try:
            store = S3Store(
                self.bucket,
                config=config,  # type: ignore[arg-type]
                client_options={"allow_http": allow_http},
            )
        except (BaseError, ValueError) as e:
            raise InvalidURLError(f"packs+s3://{self.bucket}: {e}") from None
        return PacksBlobService(
            S3Packs(store, self.prefix),
            self._index_config().build(),
            zstd=self.zstd,
            avg_chunk_size=self.avg_chunk_size,
            pack_size=self.pack_size,
            local=False,
        )
