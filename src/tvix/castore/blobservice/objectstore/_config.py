"""``objectstore+<flavour>://`` URLs: the flavours, their options and the S3 config."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

from obstore.exceptions import BaseError
from obstore.store import LocalStore, MemoryStore, S3Store

from tvix.castore.blobservice.objectstore._codec import KIB, MIB
from tvix.castore.errors import InvalidURLError
from tvix.castore.url import ServiceURL

if TYPE_CHECKING:
    from obstore.store import ObjectStore

__all__ = [
    "DEFAULT_AVG_CHUNK_SIZE",
    "MAX_AVG_CHUNK_SIZE",
    "MIN_AVG_CHUNK_SIZE",
    "OPTIONS",
    "STORE_FLAVOURS",
    "StoreBuilder",
    "first_line",
]

DEFAULT_AVG_CHUNK_SIZE = 256 * KIB
# FastCDC's own limits (pyfastcdc rejects min > 1 MiB and max > 16 MiB).
MIN_AVG_CHUNK_SIZE = 4 * KIB
MAX_AVG_CHUNK_SIZE = 1 * MIB

# Builds the store a URL of one flavour names: (store, key prefix). Query
# options are checked before, against the flavour's own plus OPTIONS.
StoreBuilder = Callable[[ServiceURL], "tuple[ObjectStore, str]"]


def _file_store(url: ServiceURL) -> tuple[ObjectStore, str]:
    url.reject_host()
    path = url.require_path()
    if not path.startswith("/"):
        raise InvalidURLError(f"invalid service URL {url.raw!r}: the path must be absolute")
    try:
        return LocalStore(path, mkdir=True), ""
    except (BaseError, OSError) as e:
        raise InvalidURLError(
            f"invalid service URL {url.raw!r}: cannot use {path}: {first_line(e)}"
        ) from None


def _memory_store(url: ServiceURL) -> tuple[ObjectStore, str]:
    url.reject_host()
    url.reject_path()
    return MemoryStore(), ""


def _s3_store(url: ServiceURL) -> tuple[ObjectStore, str]:
    """``objectstore+s3://bucket[/prefix]?endpoint=URL&region=R&allow_http=true``.

    Credentials, and anything not given in the URL, come from the environment
    as obstore reads it: ``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``,
    ``AWS_SESSION_TOKEN``, ``AWS_REGION`` (also ``AWS_DEFAULT_REGION``),
    ``AWS_ENDPOINT_URL``, web identity and instance metadata (no
    ``~/.aws`` files). ``endpoint`` selects an S3-compatible server (path-style
    requests); an ``http://`` endpoint implies ``allow_http=true``, which is
    otherwise off so that credentials never travel in clear text by accident.
    The prefix, if any, is a key prefix inside the bucket.
    """
    bucket = url.host
    if not bucket or "@" in bucket or ":" in bucket:
        raise InvalidURLError(
            f"invalid service URL {url.raw!r}: expected objectstore+s3://BUCKET[/PREFIX] "
            "(credentials come from the environment, the endpoint from ?endpoint=)"
        )
    prefix = url.path.strip("/")
    if "//" in prefix:
        raise InvalidURLError(f"invalid service URL {url.raw!r}: empty segment in the prefix")
    config: dict[str, str] = {}
    endpoint = url.params.get("endpoint")
    if endpoint is not None:
        if not endpoint.startswith(("http://", "https://")):
            raise InvalidURLError(
                f"invalid service URL {url.raw!r}: endpoint must be an http:// or https:// URL"
            )
        config["endpoint"] = endpoint.rstrip("/")
    region = url.params.get("region")
    if region is not None:
        config["region"] = region
    allow_http = url.bool_param(
        "allow_http", endpoint is not None and endpoint.startswith("http://")
    )
    try:
        store = S3Store(
            bucket,
            config=config,  # type: ignore[arg-type]
            client_options={"allow_http": allow_http},
        )
    except (BaseError, ValueError) as e:
        raise InvalidURLError(f"invalid service URL {url.raw!r}: {first_line(e)}") from None
    return store, f"{prefix}/" if prefix else ""


# The flavours by URL scheme suffix (``objectstore+<flavour>``): the builder
# and the query options it reads.
STORE_FLAVOURS: dict[str, tuple[StoreBuilder, tuple[str, ...]]] = {
    "file": (_file_store, ()),
    "memory": (_memory_store, ()),
    "s3": (_s3_store, ("endpoint", "region", "allow_http")),
}

# Options every flavour takes.
OPTIONS = ("zstd", "avg_chunk_size")


def first_line(e: BaseException) -> str:
    """The first line of ``e``'s message.

    obstore's messages carry a multi-line debug dump after the first line.
    """
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__
