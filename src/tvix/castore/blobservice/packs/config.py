"""The options of the packed stores, one frozen dataclass per flavour.

Each is built from a URL (:meth:`from_url`, strict: unknown options, hosts
or paths are rejected naming them) or from a mapping of the same options
(:meth:`from_mapping`, e.g. a composition table), and builds its service
(:meth:`build`). Checking never touches the disk or the network.

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
a pack is closed once it reaches it; on S3 a pack is also never more than
one commit).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Self

from tvix.castore.blobservice.packs.service import (
    DEFAULT_AVG_CHUNK_SIZE,
    DEFAULT_PACK_SIZE,
    MAX_AVG_CHUNK_SIZE,
    MIN_AVG_CHUNK_SIZE,
    MIN_PACK_SIZE,
    PacksBlobService,
)
from tvix.castore.errors import InvalidURLError
from tvix.castore.url import ServiceURL

__all__ = ["PacksFileConfig", "PacksS3Config"]


def _bool(url: ServiceURL, key: str, default: bool) -> bool:
    value = url.params.get(key)
    if value is None:
        return default
    if value in ("true", "1"):
        return True
    if value in ("false", "0"):
        return False
    raise InvalidURLError(f"invalid service URL {url.raw!r}: {key} must be true or false")


class _Config:
    """What both flavours share: the common options and their checks."""

    def check(self, where: str) -> None:
        avg: int = getattr(self, "avg_chunk_size")  # noqa: B009
        pack: int = getattr(self, "pack_size")  # noqa: B009
        if not MIN_AVG_CHUNK_SIZE <= avg <= MAX_AVG_CHUNK_SIZE:
            raise InvalidURLError(
                f"{where}: avg_chunk_size must be within {MIN_AVG_CHUNK_SIZE}..{MAX_AVG_CHUNK_SIZE}"
            )
        if pack < MIN_PACK_SIZE:
            raise InvalidURLError(f"{where}: pack_size must be at least {MIN_PACK_SIZE}")

    @classmethod
    def from_mapping(cls, settings: Mapping[str, Any]) -> Self:
        """Build from ``settings`` (e.g. a composition table): unknown keys, missing
        required ones and values of the wrong type are rejected."""
        fields = {f.name: f for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
        unknown = sorted(set(settings) - set(fields))
        if unknown:
            raise InvalidURLError(
                f"{cls.__name__}: unknown setting(s) {', '.join(unknown)} "
                f"(allowed: {', '.join(fields)})"
            )
        for name, f in fields.items():
            if name not in settings:
                if f.default is dataclasses.MISSING:
                    raise InvalidURLError(f"{cls.__name__}: missing setting {name!r}")
                continue
            value = settings[name]
            want = {"bool": bool, "int": int, "str": str}.get(str(f.type).split(" ")[0], object)
            if (want is not object and not isinstance(value, want)) or (
                want is int and isinstance(value, bool)
            ):
                raise InvalidURLError(f"{cls.__name__}: setting {name!r} must be {f.type}")
        config = cls(**settings)
        config.check(cls.__name__)
        return config


@dataclass(frozen=True, slots=True)
class PacksFileConfig(_Config):
    """``packs+file:///abs/dir?zstd=&avg_chunk_size=&pack_size=``."""

    path: str
    zstd: bool = True
    avg_chunk_size: int = DEFAULT_AVG_CHUNK_SIZE
    pack_size: int = DEFAULT_PACK_SIZE

    @classmethod
    def from_url(cls, url: ServiceURL) -> PacksFileConfig:
        if url.scheme != "packs+file":
            raise InvalidURLError(f"invalid service URL {url.raw!r}: not packs+file://")
        url.reject_params("zstd", "avg_chunk_size", "pack_size")
        url.reject_host()
        path = url.require_path()
        if not path.startswith("/"):
            raise InvalidURLError(f"invalid service URL {url.raw!r}: the path must be absolute")
        config = cls(
            path=path.rstrip("/") or "/",
            zstd=_bool(url, "zstd", True),
            avg_chunk_size=url.int_param("avg_chunk_size", DEFAULT_AVG_CHUNK_SIZE),
            pack_size=url.int_param("pack_size", DEFAULT_PACK_SIZE),
        )
        config.check(f"invalid service URL {url.raw!r}")
        return config

    def build(self) -> PacksBlobService:
        """The service (creates the directory and the index if absent)."""
        import os

        from tvix.castore.blobservice.packs.index import SQLiteIndex, sqlite_path
        from tvix.castore.blobservice.packs.storage import LocalPacks

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


@dataclass(frozen=True, slots=True)
class PacksS3Config(_Config):
    """``packs+s3://bucket/prefix?index=postgresql://...&endpoint=&region=&allow_http=
    &zstd=&avg_chunk_size=&pack_size=``."""

    bucket: str
    index: str
    prefix: str = ""
    endpoint: str | None = None
    region: str | None = None
    allow_http: bool | None = None
    zstd: bool = True
    avg_chunk_size: int = DEFAULT_AVG_CHUNK_SIZE
    pack_size: int = DEFAULT_PACK_SIZE

    def check(self, where: str) -> None:
        super(PacksS3Config, self).check(where)
        if not self.bucket or "@" in self.bucket or ":" in self.bucket:
            raise InvalidURLError(
                f"{where}: expected packs+s3://BUCKET[/PREFIX] (credentials come from the "
                "environment, the endpoint from ?endpoint=)"
            )
        if "//" in self.prefix:
            raise InvalidURLError(f"{where}: empty segment in the prefix")
        if self.endpoint is not None and not self.endpoint.startswith(("http://", "https://")):
            raise InvalidURLError(f"{where}: endpoint must be an http:// or https:// URL")
        from tvix.castore.blobservice.packs.pgindex import PostgresIndex

        PostgresIndex.from_url(ServiceURL.parse(self.index))  # checks its options

    @classmethod
    def from_url(cls, url: ServiceURL) -> PacksS3Config:
        if url.scheme != "packs+s3":
            raise InvalidURLError(f"invalid service URL {url.raw!r}: not packs+s3://")
        url.reject_params(
            "index", "endpoint", "region", "allow_http", "zstd", "avg_chunk_size", "pack_size"
        )
        index = url.params.get("index")
        if not index:
            raise InvalidURLError(
                f"invalid service URL {url.raw!r}: index=postgresql://... is required "
                "(the index of the packs, shared by every daemon using the bucket)"
            )
        allow_http = url.params.get("allow_http")
        config = cls(
            bucket=url.host,
            index=index,
            prefix=url.path.strip("/"),
            endpoint=url.params.get("endpoint"),
            region=url.params.get("region"),
            allow_http=None if allow_http is None else _bool(url, "allow_http", False),
            zstd=_bool(url, "zstd", True),
            avg_chunk_size=url.int_param("avg_chunk_size", DEFAULT_AVG_CHUNK_SIZE),
            pack_size=url.int_param("pack_size", DEFAULT_PACK_SIZE),
        )
        config.check(f"invalid service URL {url.raw!r}")
        return config

    def build(self) -> PacksBlobService:
        """The service; connects to nothing until first used."""
        from obstore.exceptions import BaseError
        from obstore.store import S3Store

        from tvix.castore.blobservice.packs.pgindex import PostgresIndex
        from tvix.castore.blobservice.packs.storage import S3Packs

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
            PostgresIndex.from_url(ServiceURL.parse(self.index)),
            zstd=self.zstd,
            avg_chunk_size=self.avg_chunk_size,
            pack_size=self.pack_size,
            local=False,
        )
