"""Building BlobServices from URLs: every scheme's valid URLs and what they build, and the rejected.

``{tmp}`` in a URL stands for a fresh temporary directory.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from tests.support.urls import GENERIC_INVALID, GRPC_INVALID, check_built, grpc_rows, prepared
from tvix.castore import InvalidURLError, blobservice
from tvix.castore.blobservice import MemoryBlobService, read_all, write_all
from tvix.castore.blobservice.grpc import GRPCBlobService
from tvix.castore.blobservice.objectstore import ObjectStoreBlobService
from tvix.castore.testing.fixtures import BLOB_A, BLOB_A_DIGEST

OBJECTSTORE = ObjectStoreBlobService
#: The defaults: zstd on, FastCDC cuts around 256 KiB.
DEFAULT = {"zstd": True, "chunking.avg_size": 262144}

VALID: list[tuple[str, type, dict[str, Any]]] = [
    ("memory://", MemoryBlobService, {}),
    ("memory:///", MemoryBlobService, {}),
    ("objectstore+memory://", OBJECTSTORE, {**DEFAULT, "_prefix": "", "_local": None}),
    ("objectstore+memory:///", OBJECTSTORE, {**DEFAULT, "_prefix": "", "_local": None}),
    ("objectstore+memory://?zstd=false", OBJECTSTORE, {**DEFAULT, "zstd": False}),
    (
        "objectstore+memory://?zstd=true&avg_chunk_size=65536",
        OBJECTSTORE,
        {"zstd": True, "chunking.min_size": 32768, "chunking.avg_size": 65536},
    ),
    ("objectstore+file://{tmp}/a", OBJECTSTORE, {**DEFAULT, "_local.root": "{tmp}/a"}),
    ("objectstore+file://{tmp}/a?zstd=0", OBJECTSTORE, {"zstd": False, "_local.root": "{tmp}/a"}),
    (
        "objectstore+s3://bucket",
        OBJECTSTORE,
        {**DEFAULT, "_prefix": "", "_store.config": {"bucket": "bucket"}},
    ),
    (
        "objectstore+s3://bucket/",
        OBJECTSTORE,
        {"_prefix": "", "_store.config": {"bucket": "bucket"}},
    ),
    (
        "objectstore+s3://bucket/some/prefix?region=eu-west-1",
        OBJECTSTORE,
        {"_prefix": "some/prefix/", "_store.config": {"bucket": "bucket", "region": "eu-west-1"}},
    ),
    (
        "objectstore+s3://bucket/p?endpoint=https://s3.example.org&zstd=false",
        OBJECTSTORE,
        {
            "zstd": False,
            "_prefix": "p/",
            "_store.config": {"bucket": "bucket", "endpoint": "https://s3.example.org"},
            "_store.client_options": {"allow_http": "false"},
        },
    ),
    (
        "objectstore+s3://bucket/p?endpoint=http%3A%2F%2F127.0.0.1%3A9000&allow_http=true",
        OBJECTSTORE,
        {
            "_store.config": {"bucket": "bucket", "endpoint": "http://127.0.0.1:9000"},
            "_store.client_options": {"allow_http": "true"},
        },
    ),
    *grpc_rows(GRPCBlobService),
]

INVALID = [
    *GENERIC_INVALID,
    ("objectstore+memory://?colour=red", "unknown option.*colour"),
    ("objectstore+file://{tmp}/a?compression=zstd", "unknown option.*compression"),
    ("objectstore+memory://host", "no host"),
    ("objectstore+memory:///some/path", "no path"),
    ("objectstore+file://relative/dir", "no host"),
    ("objectstore+file://", "path is required"),
    ("objectstore+file:///", "path is required"),
    ("objectstore+memory://?zstd=maybe", "zstd must be true or false"),
    ("objectstore+memory://?avg_chunk_size=lots", "avg_chunk_size must be an integer"),
    ("objectstore+memory://?avg_chunk_size=100", "avg_chunk_size must be within"),
    ("objectstore+memory://?avg_chunk_size=1073741824", "avg_chunk_size must be within"),
    ("objectstore+ftp://host/dir", "unknown scheme"),
    ("objectstore+s3://", "BUCKET"),
    ("objectstore+s3:///prefix", "BUCKET"),
    ("objectstore+s3://user@bucket/p", "BUCKET"),
    ("objectstore+s3://bucket/p?endpoint=ftp://x", "http:// or https://"),
    ("objectstore+s3://bucket/p?allow_http=maybe", "true or false"),
    ("objectstore+s3://bucket/p?foo=1", "unknown option"),
    ("objectstore+s3://bucket/a//b", "empty segment"),
    ("objectstore+file:///x?endpoint=http://x", "unknown option"),
    *GRPC_INVALID,
]

#: Schemes whose services work without a server: a valid row of these also stores a blob.
OFFLINE = ("memory", "objectstore+memory", "objectstore+file")


@pytest.mark.parametrize(("url", "expected_type", "attributes"), VALID)
def test_valid(url: str, expected_type: type, attributes: dict[str, Any], tmp_path: Path) -> None:
    # Built outside any event loop and without connecting: clients dial at first use.
    svc = blobservice.from_url(prepared(url, tmp_path))
    check_built(svc, expected_type, attributes, tmp=tmp_path)


@pytest.mark.parametrize("url", [url for url, _, _ in VALID if url.split(":")[0] in OFFLINE])
async def test_valid_offline_ones_store(url: str, tmp_path: Path) -> None:
    svc = blobservice.from_url(prepared(url, tmp_path))
    assert await write_all(svc, BLOB_A) == BLOB_A_DIGEST
    assert await read_all(svc, BLOB_A_DIGEST) == BLOB_A
    await svc.close()


@pytest.mark.parametrize(("url", "message"), INVALID)
def test_invalid(url: str, message: str, tmp_path: Path) -> None:
    with pytest.raises(InvalidURLError, match=message):
        blobservice.from_url(prepared(url, tmp_path))
