"""packs+s3 against a real SeaweedFS and PostgreSQL: the conformance suite, layout, sharing."""

from __future__ import annotations

import asyncio
import itertools
import os
from collections.abc import AsyncIterator
from urllib.parse import quote

import obstore
import pytest
from obstore.store import S3Store

from tests.support.servers import PostgreSQL, SeaweedFS
from tvix.castore import blobservice
from tvix.castore.blobservice import BlobService, read_all, write_all
from tvix.castore.blobservice.packs import PacksBlobService
from tvix.castore.errors import IntegrityError
from tvix.castore.testing import BlobServiceTests
from tvix.castore.testing.fixtures import BLOB_A, BLOB_A_DIGEST, BLOB_B, BLOB_B_DIGEST, b3, big_blob

pytestmark = pytest.mark.e2e

_counter = itertools.count()


@pytest.fixture
def packs_url(weed: SeaweedFS, pg: PostgreSQL) -> str:
    """A ``packs+s3://`` URL: a fresh prefix in the bucket, a fresh schema for the index."""
    n = f"p{os.getpid()}x{next(_counter)}"
    index = quote(pg.dsn() + f"?schema={n}", safe="")
    return f"packs+s3://{weed.bucket}/{n}?endpoint={weed.endpoint}&index={index}"


def _keys(weed: SeaweedFS, prefix: str) -> dict[str, int]:
    store = S3Store(
        weed.bucket,
        config={"endpoint": weed.endpoint, "region": "us-east-1"},
        client_options={"allow_http": True},
    )
    return {o["path"]: o["size"] for b in obstore.list(store, prefix=prefix) for o in b}


class TestPacksS3(BlobServiceTests):
    @pytest.fixture
    async def blob_service(self, packs_url: str) -> AsyncIterator[BlobService]:
        svc = blobservice.from_url(packs_url)
        yield svc
        await svc.close()


async def test_few_objects_and_shared_index(weed: SeaweedFS, packs_url: str) -> None:
    prefix = packs_url.split("/", 3)[3].split("?")[0]
    files = [big_blob(2000, seed=i) for i in range(300)]
    first = blobservice.from_url(packs_url)
    second = blobservice.from_url(packs_url)
    assert isinstance(first, PacksBlobService)
    try:
        await asyncio.gather(*(write_all(first, d) for d in files))
        await write_all(first, BLOB_B)
        keys = _keys(weed, prefix)
        assert all(k.startswith(f"{prefix}/packs/") and k.endswith(".pack") for k in keys)
        # 300 small blobs written together and one multi-MiB blob: a handful of PUTs.
        assert len(keys) <= 6, keys
        # Another service on the same bucket and index sees everything.
        assert await second.read_many([b3(d) for d in files]) == files
        assert await read_all(second, BLOB_B_DIGEST) == BLOB_B
        assert await first.verify_storage() == []
        packs = await first.index.packs()
        assert sum(p.live for p in packs) == sum(p.size - 8 for p in packs)
    finally:
        await first.close()
        await second.close()


async def test_racing_writers_dedup_in_the_index(packs_url: str) -> None:
    a = blobservice.from_url(packs_url)
    b = blobservice.from_url(packs_url)
    assert isinstance(a, PacksBlobService)
    try:
        await asyncio.gather(write_all(a, BLOB_A), write_all(b, BLOB_A))
        assert await read_all(b, BLOB_A_DIGEST) == BLOB_A
        # Both stored the chunk; only one copy is live, the other is dead bytes for GC.
        packs = await a.index.packs()
        assert sum(p.live for p in packs) < sum(p.size - 8 for p in packs) or len(packs) == 1
        assert await a.verify_storage() == []
    finally:
        await a.close()
        await b.close()


async def test_missing_pack_object_detected(weed: SeaweedFS, packs_url: str) -> None:
    prefix = packs_url.split("/", 3)[3].split("?")[0]
    svc = blobservice.from_url(packs_url)
    assert isinstance(svc, PacksBlobService)
    try:
        await write_all(svc, BLOB_A)
        store = S3Store(
            weed.bucket,
            config={"endpoint": weed.endpoint, "region": "us-east-1"},
            client_options={"allow_http": True},
        )
        for key in _keys(weed, prefix):
            obstore.delete(store, key)
        problems = await svc.verify_storage()
        assert any("indexed but missing" in p for p in problems), problems
        from tvix.castore.errors import StorageError

        with pytest.raises(StorageError, match="missing"):
            await read_all(svc, BLOB_A_DIGEST)
    finally:
        await svc.close()


async def test_a_damaged_chunk_is_dropped_and_stored_again(weed: SeaweedFS, packs_url: str) -> None:
    """A read that finds a chunk damaged drops its row from the PostgreSQL index;
    remove_damaged drops a record listing it; a writer then stores both again."""
    prefix = packs_url.split("/", 3)[3].split("?")[0]
    svc = blobservice.from_url(packs_url + "&zstd=false&avg_chunk_size=16384")
    assert isinstance(svc, PacksBlobService)
    try:
        big = big_blob(200_000, seed=8)
        digest = await write_all(svc, big)
        chunks = await svc.chunks(digest)
        assert chunks is not None
        victim = chunks[2].digest
        loc = (await svc.index.locate([victim]))[victim]
        store = S3Store(
            weed.bucket,
            config={"endpoint": weed.endpoint, "region": "us-east-1"},
            client_options={"allow_http": True},
        )
        (key,) = [k for k in _keys(weed, prefix) if loc.pack in k]
        data = bytearray(obstore.get(store, key).bytes())
        data[loc.offset + 50] ^= 1
        obstore.put(store, key, bytes(data))
        with pytest.raises(IntegrityError):
            await read_all(svc, digest)
        assert not await svc.has(victim)
        assert await svc.has(chunks[0].digest)
        removed = await svc.remove_damaged(digest)
        assert removed == [f"blob record {digest.hex()} (lists chunks absent or damaged)"]
        assert not await svc.has(digest)
        assert await write_all(svc, big) == digest
        assert await read_all(svc, digest) == big
        assert await svc.verify_storage() == []
    finally:
        await svc.close()
