"""The gRPC clients against a real grpc.aio server, beyond the conformance suites.

Servers run in-process on real sockets (a unix socket under tmp_path, or TCP
on 127.0.0.1 with a free port). The suites themselves run against the clients
in front of memory services, a backend that lists chunks (so the client's
chunk-by-chunk read path runs the suite) and the chunking object store: see
the *_conformance modules.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from tests.support.grpc import ChunkedMemoryBlobService, running_server, unix_listen
from tvix.castore import blobservice, directoryservice
from tvix.castore.blobservice import BlobService, MemoryBlobService, read_all, write_all
from tvix.castore.blobservice.grpc import GRPCBlobService
from tvix.castore.directoryservice import MemoryDirectoryService
from tvix.castore.errors import StorageError, ValidationError
from tvix.castore.grpc import (
    GRPCBlobServiceWrapper,
    GRPCDirectoryServiceWrapper,
    castore_servicers,
    parse_listen_address,
)
from tvix.castore.proto import pb
from tvix.castore.testing.fixtures import BLOB_B, BLOB_B_DIGEST, DIRECTORY_A, b3


class _CountingReads(GRPCBlobServiceWrapper):
    def __init__(self, blob_service: BlobService) -> None:
        super().__init__(blob_service)
        self.reads: list[bytes] = []

    async def Read(self, request: pb.ReadBlobRequest, context: Any) -> AsyncIterator[bytes]:
        self.reads.append(request.digest)
        async for message in super().Read(request, context):
            yield message


async def test_chunked_read_fetches_only_touched_chunks(tmp_path: Path) -> None:
    backend = ChunkedMemoryBlobService()
    counting = _CountingReads(backend)
    servicers = [counting, GRPCDirectoryServiceWrapper(MemoryDirectoryService())]
    async with running_server(unix_listen(tmp_path), servicers) as srv:
        client = blobservice.from_url(srv.url)
        assert isinstance(client, GRPCBlobService)
        await write_all(client, BLOB_B)
        chunks = await client.chunks(BLOB_B_DIGEST)
        assert chunks is not None
        assert len(chunks) > 4
        reader = await client.open_read(BLOB_B_DIGEST)
        assert reader is not None
        async with reader:
            offset = 2 * backend.chunk_size + 5
            await reader.seek(offset)
            assert await reader.read(100) == BLOB_B[offset : offset + 100]
        # Only the chunk holding the offset (plus read-ahead, which starts only
        # for front-to-back reads) was fetched, and never the whole blob.
        assert counting.reads == [chunks[2].digest]
        await client.close()


# --- URLs -------------------------------------------------------------------


@pytest.mark.parametrize(
    "listen", ["127.0.0.1:8000", "localhost:0", "[::1]:8000", "[::]:0", "unix:///tmp/x.sock"]
)
def test_valid_listen_addresses(listen: str) -> None:
    assert parse_listen_address(listen) == listen


@pytest.mark.parametrize(
    "listen", ["localhost", "127.0.0.1:", "::1:8000", "127.0.0.1:70000", "unix:", "unix://"]
)
def test_invalid_listen_addresses(listen: str) -> None:
    with pytest.raises(ValidationError, match="invalid listen address"):
        parse_listen_address(listen)


async def test_server_address_with_port_zero() -> None:
    servicers = castore_servicers(MemoryBlobService(), MemoryDirectoryService())
    async with running_server("127.0.0.1:0", servicers) as srv:
        host, port = srv.address.rsplit(":", 1)
        assert host == "127.0.0.1"
        assert int(port) > 0
        assert srv.url == f"grpc+http://127.0.0.1:{port}"


async def test_ipv6_loopback(tmp_path: Path) -> None:
    servicers = castore_servicers(MemoryBlobService(), MemoryDirectoryService())
    try:
        ctx = running_server("[::1]:0", servicers)
        srv = await ctx.__aenter__()
    except OSError:
        pytest.skip("no IPv6 loopback")
    try:
        client = directoryservice.from_url(srv.url)
        assert srv.url.startswith("grpc+http://[::1]:")
        assert await client.put(DIRECTORY_A) == DIRECTORY_A.digest
        await client.close()
    finally:
        await ctx.__aexit__(None, None, None)


async def test_unreachable_server_is_storage_error(tmp_path: Path) -> None:
    url = f"grpc+unix://{tmp_path}/nobody.sock"
    client = blobservice.from_url(url)
    with pytest.raises(StorageError, match=r"nobody\.sock.*UNAVAILABLE"):
        await client.has(BLOB_B_DIGEST)
    await client.close()


def test_client_survives_a_new_event_loop(tmp_path: Path) -> None:
    """A service built once outside a loop (as the CLI does) works under two asyncio.run."""
    listen = unix_listen(tmp_path)
    client = blobservice.from_url(f"grpc+unix://{tmp_path}/castore.sock")
    backend = MemoryBlobService()

    async def round_trip(data: bytes) -> bytes | None:
        async with running_server(listen, castore_servicers(backend, MemoryDirectoryService())):
            await write_all(client, data)
            return await read_all(client, b3(data))

    assert asyncio.run(round_trip(b"first loop")) == b"first loop"
    assert asyncio.run(round_trip(b"second loop")) == b"second loop"
