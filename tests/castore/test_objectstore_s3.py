"""objectstore+s3 against a real SeaweedFS: layout, atomicity, URLs (its conformance run is in
test_blobservice_conformance.py)."""

from __future__ import annotations

import obstore
import pytest
from obstore.exceptions import AlreadyExistsError
from obstore.store import S3Store

from tests.support.servers import SeaweedFS
from tvix.castore import blobservice
from tvix.castore.blobservice import read_all, write_all
from tvix.castore.blobservice.objectstore import ObjectStoreBlobService
from tvix.castore.errors import IntegrityError, StorageError
from tvix.castore.testing.fixtures import BLOB_A, BLOB_A_DIGEST, BLOB_B, BLOB_B_DIGEST

pytestmark = pytest.mark.e2e


def _raw_store(weed: SeaweedFS) -> S3Store:
    return S3Store(
        weed.bucket,
        config={"endpoint": weed.endpoint, "region": "us-east-1"},
        client_options={"allow_http": True},
    )


def test_server_refuses_second_create(weed: SeaweedFS) -> None:
    # The service relies on put-if-not-exists being honoured (or ignored): check
    # that this server honours it, so the create path is the one under test.
    store = _raw_store(weed)
    obstore.put(store, "probe/create", b"one", mode="create")
    with pytest.raises(AlreadyExistsError):
        obstore.put(store, "probe/create", b"two", mode="create")
    assert bytes(obstore.get(store, "probe/create").bytes()) == b"one"


async def test_layout_under_prefix(weed: SeaweedFS, s3_url: str) -> None:
    svc = blobservice.from_url(s3_url + "&avg_chunk_size=65536")
    try:
        await write_all(svc, BLOB_A)
        await write_all(svc, BLOB_B)
        assert isinstance(svc, ObjectStoreBlobService)
        chunks = await svc.chunks(BLOB_B_DIGEST)
        assert chunks is not None
        assert len(chunks) > 1
        prefix = s3_url.split("/", 3)[3].split("?")[0]
        keys = {o["path"] for batch in obstore.list(_raw_store(weed), prefix=prefix) for o in batch}
        a = BLOB_A_DIGEST.hex()
        b = BLOB_B_DIGEST.hex()
        assert f"{prefix}/chunks/b3/{a[:4]}/{a}" in keys
        assert f"{prefix}/blobs/b3/{b[:4]}/{b}" in keys
        assert all(k.startswith((f"{prefix}/chunks/", f"{prefix}/blobs/")) for k in keys)
        # Written twice: same objects, no error (put-if-not-exists says "exists").
        await write_all(svc, BLOB_B)
        assert await read_all(svc, BLOB_B_DIGEST) == BLOB_B
    finally:
        await svc.close()


async def test_wrong_credentials_are_a_storage_error(
    weed: SeaweedFS, s3_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "wrong")
    svc = blobservice.from_url(s3_url)
    try:
        with pytest.raises(StorageError, match="object store"):
            await svc.has(BLOB_A_DIGEST)
        with pytest.raises(StorageError):
            await write_all(svc, BLOB_A)
    finally:
        await svc.close()


async def test_a_damaged_chunk_is_removed_and_stored_again(weed: SeaweedFS, s3_url: str) -> None:
    svc = blobservice.from_url(s3_url + "&avg_chunk_size=65536")
    assert isinstance(svc, ObjectStoreBlobService)
    try:
        digest = await write_all(svc, BLOB_B)
        chunks = await svc.chunks(digest)
        assert chunks is not None
        victim = chunks[1].digest
        key = svc.chunk_key(victim)
        store = _raw_store(weed)
        data = bytearray(obstore.get(store, key).bytes())
        data[len(data) // 2] ^= 1
        obstore.put(store, key, bytes(data))
        with pytest.raises(IntegrityError):
            await read_all(svc, digest)
        assert not await svc.has(victim)  # removed by the read that found it
        assert await svc.remove_damaged(digest) == [
            f"blob record {digest.hex()} (damaged, or lists chunks absent or damaged)"
        ]
        assert not await svc.has(digest)
        assert await write_all(svc, BLOB_B) == digest
        assert await read_all(svc, digest) == BLOB_B
    finally:
        await svc.close()
