"""gRPC clients under load: calls in flight bounded, refusals retried (issue 13, item 1)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import grpc
import pytest

from tests.support.grpc import running_server, unix_listen
from tvix.castore import blobservice
from tvix.castore.blobservice import BlobReader, BlobService, BlobWriter, MemoryBlobService
from tvix.castore.blobservice.grpc import GRPCBlobService
from tvix.castore.digest import B3Digest
from tvix.castore.directoryservice import MemoryDirectoryService
from tvix.castore.errors import StorageError
from tvix.castore.grpc import _client, castore_servicers
from tvix.castore.proto import pb
from tvix.castore.testing.fixtures import BLOB_A, BLOB_A_DIGEST


class _Crowded(BlobService):
    """Memory blobs whose ``has`` waits a little, counting the calls at once."""

    def __init__(self) -> None:
        self.inner = MemoryBlobService()
        self.now = 0
        self.most = 0
        self.calls = 0

    async def has(self, digest: B3Digest) -> bool:
        self.calls += 1
        self.now += 1
        self.most = max(self.most, self.now)
        try:
            await asyncio.sleep(0.01)
            return await self.inner.has(digest)
        finally:
            self.now -= 1

    async def open_read(self, digest: B3Digest) -> BlobReader | None:
        return await self.inner.open_read(digest)

    def open_write(self) -> BlobWriter:
        return self.inner.open_write()


async def test_client_bounds_its_calls_in_flight(tmp_path: Path) -> None:
    backend = _Crowded()
    servicers = castore_servicers(backend, MemoryDirectoryService())
    async with running_server(unix_listen(tmp_path), servicers) as srv:
        client = blobservice.from_url(srv.url)
        try:
            await blobservice.write_all(client, BLOB_A)
            # A NAR render of many small files asks this much at once.
            found = await asyncio.gather(*(client.has(BLOB_A_DIGEST) for _ in range(2000)))
        finally:
            await client.close()
    assert all(found)
    assert backend.calls == 2000
    assert backend.most <= _client.MAX_IN_FLIGHT


@asynccontextmanager
async def _refusing_server(
    tmp_path: Path, answers: list[grpc.StatusCode | None]
) -> AsyncIterator[tuple[str, list[int]]]:
    """A BlobService whose Stat answers ``answers`` in turn (None: found), then found."""
    calls = [0]

    async def stat(request: pb.StatBlobRequest, context: Any) -> pb.StatBlobResponse:
        calls[0] += 1
        code = answers.pop(0) if answers else None
        if code is not None:
            await context.abort(code, "busy")
        return pb.StatBlobResponse()

    handler = grpc.method_handlers_generic_handler(
        "tvix.castore.v1.BlobService",
        {
            "Stat": grpc.unary_unary_rpc_method_handler(
                stat,
                request_deserializer=pb.StatBlobRequest.FromString,
                response_serializer=pb.StatBlobResponse.SerializeToString,
            )
        },
    )
    server = grpc.aio.server()
    server.add_generic_rpc_handlers((handler,))
    sock = f"{tmp_path}/refusing.sock"
    server.add_insecure_port(f"unix://{sock}")
    await server.start()
    try:
        yield f"grpc+unix://{sock}", calls
    finally:
        await server.stop(0)


@pytest.fixture(autouse=True)
def _no_retry_pauses(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_client, "RETRY_DELAYS", (0.0,) * len(_client.RETRY_DELAYS))


async def test_refused_reads_are_retried(tmp_path: Path) -> None:
    refusals = [grpc.StatusCode.CANCELLED, grpc.StatusCode.CANCELLED]
    async with _refusing_server(tmp_path, refusals) as (url, calls):
        client = blobservice.from_url(url)
        assert isinstance(client, GRPCBlobService)
        try:
            assert await client.has(BLOB_A_DIGEST)
        finally:
            await client.close()
    assert calls == [3]


async def test_retries_are_bounded_and_only_for_refusals(tmp_path: Path) -> None:
    attempts = 1 + len(_client.RETRY_DELAYS)
    always = [grpc.StatusCode.CANCELLED] * 100
    async with _refusing_server(tmp_path, always) as (url, calls):
        client = blobservice.from_url(url)
        try:
            with pytest.raises(StorageError, match="CANCELLED"):
                await client.has(BLOB_A_DIGEST)
        finally:
            await client.close()
    assert calls == [attempts]
    # A server's own failure is its answer: not asked again.
    async with _refusing_server(tmp_path, [grpc.StatusCode.INTERNAL]) as (url, calls):
        client = blobservice.from_url(url)
        try:
            with pytest.raises(StorageError, match="INTERNAL"):
                await client.has(BLOB_A_DIGEST)
        finally:
            await client.close()
    assert calls == [1]
