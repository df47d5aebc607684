"""The castore gRPC protocol: status codes, message sizes, health, reflection,
aborted uploads, and clients facing a server that lies."""

from __future__ import annotations

import asyncio
import logging
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.protobuf.descriptor_pool import DescriptorPool
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import (
    ProtoReflectionDescriptorDatabase,
)

from tests.support.grpc import ChunkedMemoryBlobService, running_server, unix_listen
from tvix._proto import castore_pb2_grpc
from tvix.castore.blobservice import BlobService, MemoryBlobService, read_all, write_all
from tvix.castore.blobservice.grpc import MESSAGE_SIZE, VERIFY_WINDOW, GRPCBlobService
from tvix.castore.digest import B3Digest
from tvix.castore.directory import Directory
from tvix.castore.directoryservice import (
    DirectoryPutter,
    DirectoryService,
    MemoryDirectoryService,
)
from tvix.castore.directoryservice.grpc import GRPCDirectoryService
from tvix.castore.errors import IntegrityError, StorageError
from tvix.castore.grpc import (
    READ_MESSAGE_SIZE,
    GRPCBlobServiceWrapper,
    GRPCDirectoryServiceWrapper,
    GRPCServer,
    castore_servicers,
)
from tvix.castore.nodes import DirectoryNode
from tvix.castore.proto import pb
from tvix.castore.testing.fixtures import (
    BLOB_A,
    BLOB_A_DIGEST,
    BLOB_B,
    BLOB_B_DIGEST,
    DIRECTORY_A,
    DIRECTORY_B,
    DIRECTORY_C,
    DIRECTORY_COMPLICATED,
    DIRECTORY_WITH_KEEP,
    b3,
    big_blob,
)
from tvix.store.grpc import GRPCPathInfoServiceWrapper
from tvix.store.pathinfoservice import MemoryPathInfoService

Context = Any


@pytest.fixture
async def server(tmp_path: Path) -> AsyncIterator[GRPCServer]:
    servicers = castore_servicers(MemoryBlobService(), MemoryDirectoryService())
    async with running_server(unix_listen(tmp_path), servicers) as srv:
        yield srv


@pytest.fixture
async def channel(server: GRPCServer) -> AsyncIterator[grpc.aio.Channel]:
    async with grpc.aio.insecure_channel(server.address) as ch:
        yield ch


async def _code_of(call: Any) -> tuple[grpc.StatusCode, str]:
    """The status a call ends with (a response stream is read to its end)."""
    try:
        if hasattr(call, "__aiter__"):
            async for _ in call:
                pass
        else:
            await call
    except grpc.aio.AioRpcError as e:
        return e.code(), e.details() or ""
    return grpc.StatusCode.OK, ""


# --- status codes, with the generated stubs (as any other client would) -----


async def test_not_found(channel: grpc.aio.Channel) -> None:
    blobs = castore_pb2_grpc.BlobServiceStub(channel)
    dirs = castore_pb2_grpc.DirectoryServiceStub(channel)
    absent = BLOB_A_DIGEST
    assert (await _code_of(blobs.Stat(pb.StatBlobRequest(digest=absent))))[0] == (
        grpc.StatusCode.NOT_FOUND
    )
    code, _ = await _code_of(blobs.Stat(pb.StatBlobRequest(digest=absent, send_chunks=True)))
    assert code == grpc.StatusCode.NOT_FOUND
    code, _ = await _code_of(blobs.Read(pb.ReadBlobRequest(digest=absent)))
    assert code == grpc.StatusCode.NOT_FOUND
    for recursive in (False, True):
        req = pb.GetDirectoryRequest(digest=DIRECTORY_A.digest, recursive=recursive)
        code, _ = await _code_of(dirs.Get(req))
        assert code == grpc.StatusCode.NOT_FOUND


async def test_wrong_length_digests(channel: grpc.aio.Channel) -> None:
    blobs = castore_pb2_grpc.BlobServiceStub(channel)
    dirs = castore_pb2_grpc.DirectoryServiceStub(channel)
    short = b"\x01" * 31
    for call in (
        blobs.Stat(pb.StatBlobRequest(digest=short)),
        blobs.Read(pb.ReadBlobRequest(digest=short)),
        dirs.Get(pb.GetDirectoryRequest(digest=short)),
    ):
        code, details = await _code_of(call)
        assert code == grpc.StatusCode.INVALID_ARGUMENT
        assert "invalid digest length: 31 bytes" in details
    code, details = await _code_of(dirs.Get(pb.GetDirectoryRequest(recursive=True)))
    assert (code, details) == (
        grpc.StatusCode.INVALID_ARGUMENT,
        "GetDirectoryRequest: no digest given",
    )


async def test_invalid_closures(channel: grpc.aio.Channel) -> None:
    dirs = castore_pb2_grpc.DirectoryServiceStub(channel)

    async def put(*messages: pb.Directory) -> tuple[grpc.StatusCode, str]:
        async def stream() -> AsyncIterator[pb.Directory]:
            for m in messages:
                yield m

        return await _code_of(dirs.Put(stream()))

    def msg(d: Directory) -> pb.Directory:
        return pb.Directory.FromString(d.encode())

    code, details = await put(msg(DIRECTORY_B))  # child neither sent nor stored
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert "not sent before it and is not stored" in details
    code, details = await put()
    assert (code, details) == (
        grpc.StatusCode.INVALID_ARGUMENT,
        "invalid closure: no Directories sent",
    )
    unsorted = pb.Directory(
        files=[
            pb.FileNode(name=b"b", digest=BLOB_A_DIGEST, size=12),
            pb.FileNode(name=b"a", digest=BLOB_A_DIGEST, size=12),
        ]
    )
    code, details = await put(unsorted)
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert "not sorted" in details
    # An empty file whose digest is another blob's would render as empty and cat as that blob.
    empty_but_not = pb.Directory(files=[pb.FileNode(name=b"e", digest=BLOB_A_DIGEST, size=0)])
    code, details = await put(empty_but_not)
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert "size 0 contradicts its digest" in details
    # Nothing of a rejected stream is stored, not even its valid leaves.
    code, _ = await put(msg(DIRECTORY_WITH_KEEP), msg(DIRECTORY_A))  # disconnected
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    got = await _code_of(dirs.Get(pb.GetDirectoryRequest(digest=DIRECTORY_WITH_KEEP.digest)))
    assert got[0] == grpc.StatusCode.NOT_FOUND
    # And a valid one is, returning the root.
    response = await dirs.Put(_aiter([msg(DIRECTORY_A), msg(DIRECTORY_B)]))
    assert response.root_digest == DIRECTORY_B.digest


async def _aiter(items: list[Any]) -> AsyncIterator[Any]:
    for item in items:
        yield item


async def test_read_message_sizes_and_bao(channel: grpc.aio.Channel) -> None:
    blobs = castore_pb2_grpc.BlobServiceStub(channel)
    response = await blobs.Put(_aiter([pb.BlobChunk(data=BLOB_B)]))
    assert response.digest == BLOB_B_DIGEST
    sizes = [len(m.data) async for m in blobs.Read(pb.ReadBlobRequest(digest=BLOB_B_DIGEST))]
    assert sum(sizes) == len(BLOB_B)
    assert max(sizes) == READ_MESSAGE_SIZE
    # bao is not kept: Stat answers without it rather than failing.
    stat = await blobs.Stat(pb.StatBlobRequest(digest=BLOB_B_DIGEST, send_bao=True))
    assert stat.bao == b""
    assert list(stat.chunks) == []


async def test_empty_blob_is_an_empty_stream(channel: grpc.aio.Channel) -> None:
    blobs = castore_pb2_grpc.BlobServiceStub(channel)
    empty = (await blobs.Put(_aiter([]))).digest
    assert empty == b3(b"")
    assert [m async for m in blobs.Read(pb.ReadBlobRequest(digest=empty))] == []


class _RecordingPut(GRPCBlobServiceWrapper):
    def __init__(self, blob_service: BlobService) -> None:
        super().__init__(blob_service)
        self.sizes: list[int] = []

    async def Put(self, request_iterator: AsyncIterator[memoryview], context: Context) -> Any:
        async def recorded() -> AsyncIterator[memoryview]:
            async for data in request_iterator:
                self.sizes.append(len(data))
                yield data

        return await super().Put(recorded(), context)


async def test_client_coalesces_writes_into_1mib_messages(tmp_path: Path) -> None:
    recording = _RecordingPut(MemoryBlobService())
    async with running_server(unix_listen(tmp_path), [recording]) as srv:
        client = GRPCBlobService(srv.address)
        async with client.open_write() as writer:
            for i in range(0, len(BLOB_B), 99_991):
                await writer.write(BLOB_B[i : i + 99_991])
        assert await writer.close() == BLOB_B_DIGEST
        await client.close()
    assert sum(recording.sizes) == len(BLOB_B)
    assert recording.sizes[:-1] == [MESSAGE_SIZE] * (len(recording.sizes) - 1)


# --- health and reflection -------------------------------------------------------


async def test_health(channel: grpc.aio.Channel, server: GRPCServer) -> None:
    stub = health_pb2_grpc.HealthStub(channel)
    for service in ("", "tvix.castore.v1.BlobService", "tvix.castore.v1.DirectoryService"):
        response = await stub.Check(health_pb2.HealthCheckRequest(service=service))
        assert response.status == health_pb2.HealthCheckResponse.SERVING


async def test_reflection(server: GRPCServer) -> None:
    def discover() -> tuple[list[str], str, bool]:
        with grpc.insecure_channel(server.address) as ch:
            db = ProtoReflectionDescriptorDatabase(ch)
            services = list(db.get_services())
            # A pool fed only by reflection: nothing of our .proto files is used.
            pool = DescriptorPool(db)
            put = pool.FindServiceByName("tvix.castore.v1.BlobService").methods_by_name["Put"]
            return services, put.input_type.full_name, put.client_streaming

    services, put_input, streaming = await asyncio.to_thread(discover)
    assert "tvix.castore.v1.BlobService" in services
    assert "tvix.castore.v1.DirectoryService" in services
    assert "grpc.health.v1.Health" in services
    assert (put_input, streaming) == ("tvix.castore.v1.BlobChunk", True)


# --- an upload the client breaks off stores nothing ---------------------------


async def _wait_for(predicate: Any) -> None:
    async with asyncio.timeout(5):
        while not predicate():  # noqa: ASYNC110 - polls counters the server task bumps
            await asyncio.sleep(0.01)


async def test_client_abort_stores_nothing(tmp_path: Path) -> None:
    backend = ChunkedMemoryBlobService()
    data = big_blob(3 * MESSAGE_SIZE + 5, seed=11)
    async with running_server(unix_listen(tmp_path), [GRPCBlobServiceWrapper(backend)]) as srv:
        client = GRPCBlobService(srv.address)
        writer = client.open_write()
        await writer.write(data)  # three messages are on their way
        await _wait_for(lambda: backend.writers_opened == 1)
        await writer.abort()
        await _wait_for(lambda: backend.writers_aborted == 1)
        assert not await backend.has(b3(data))
        assert not await client.has(b3(data))
        await client.close()


async def test_raw_cancelled_put_stores_nothing(tmp_path: Path) -> None:
    backend = ChunkedMemoryBlobService()
    data = big_blob(2 * MESSAGE_SIZE, seed=12)
    async with running_server(unix_listen(tmp_path), [GRPCBlobServiceWrapper(backend)]) as srv:
        async with grpc.aio.insecure_channel(srv.address) as ch:
            call = castore_pb2_grpc.BlobServiceStub(ch).Put()
            await call.write(pb.BlobChunk(data=data[:MESSAGE_SIZE]))
            await call.write(pb.BlobChunk(data=data[MESSAGE_SIZE:]))
            await _wait_for(lambda: backend.writers_opened == 1)
            call.cancel()
            await _wait_for(lambda: backend.writers_aborted == 1)
        assert not await backend.has(b3(data))


class _CountingDirectories(MemoryDirectoryService):
    """Counts Directories put and putters aborted, to see what the server did."""

    def __init__(self) -> None:
        super().__init__()
        self.puts = 0
        self.aborts = 0

    def put_multiple_start(self) -> DirectoryPutter:
        return _CountingPutter(self, super().put_multiple_start())


class _CountingPutter(DirectoryPutter):
    def __init__(self, service: _CountingDirectories, inner: DirectoryPutter) -> None:
        self._service = service
        self._inner = inner

    async def put(self, directory: Directory) -> None:
        self._service.puts += 1
        await self._inner.put(directory)

    async def close(self) -> B3Digest:
        return await self._inner.close()

    async def abort(self) -> None:
        self._service.aborts += 1
        await self._inner.abort()


async def test_raw_cancelled_directory_put_stores_nothing(tmp_path: Path) -> None:
    backend = _CountingDirectories()
    servicers = [GRPCDirectoryServiceWrapper(backend)]
    async with running_server(unix_listen(tmp_path), servicers) as srv:
        async with grpc.aio.insecure_channel(srv.address) as ch:
            call = castore_pb2_grpc.DirectoryServiceStub(ch).Put()
            # A valid closure so far: ending the stream here would store it.
            await call.write(pb.Directory.FromString(DIRECTORY_A.encode()))
            await call.write(pb.Directory.FromString(DIRECTORY_B.encode()))
            await _wait_for(lambda: backend.puts == 2)
            call.cancel()
            await _wait_for(lambda: backend.aborts == 1)
        assert await backend.get(DIRECTORY_A.digest) is None
        assert await backend.get(DIRECTORY_B.digest) is None


_DYING_CLIENT = """
import os, sys
import grpc
from tvix._proto import castore_pb2, castore_pb2_grpc

def chunks():
    yield castore_pb2.BlobChunk(data=b"x" * 1000)
    yield castore_pb2.BlobChunk(data=b"y" * 1000)
    print("sent", flush=True)
    sys.stdin.readline()  # wait until the server has the data, then die
    os._exit(0)

with grpc.insecure_channel(sys.argv[1]) as ch:
    castore_pb2_grpc.BlobServiceStub(ch).Put(chunks())
"""


@pytest.mark.e2e
async def test_client_process_dying_mid_put_stores_nothing(tmp_path: Path) -> None:
    backend = ChunkedMemoryBlobService()
    async with running_server(unix_listen(tmp_path), [GRPCBlobServiceWrapper(backend)]) as srv:
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-c",
            _DYING_CLIENT,
            srv.address,
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
        )
        assert proc.stdin is not None
        assert proc.stdout is not None
        assert await proc.stdout.readline() == b"sent\n"
        await _wait_for(lambda: backend.writers_opened == 1)
        proc.stdin.write(b"go\n")
        await proc.wait()
        await _wait_for(lambda: backend.writers_aborted == 1)
    assert not await backend.has(b3(b"x" * 1000 + b"y" * 1000))
    assert not await backend.has(b3(b"x" * 1000))


# --- backend failures become statuses and back ---------------------------------


class _FailingBlobs(MemoryBlobService):
    def __init__(self, exc: Exception) -> None:
        super().__init__()
        self.exc = exc

    async def has(self, digest: B3Digest) -> bool:
        raise self.exc


@pytest.mark.parametrize(
    ("exc", "expected", "match"),
    [
        (
            StorageError("disk on fire"),
            StorageError,
            r"INTERNAL: storage backend failed: disk on fire",
        ),
        (IntegrityError("chunk rotted"), IntegrityError, "chunk rotted"),
    ],
)
async def test_backend_errors_cross_the_wire(
    tmp_path: Path, exc: Exception, expected: type[Exception], match: str
) -> None:
    servicers = [GRPCBlobServiceWrapper(_FailingBlobs(exc))]
    async with running_server(unix_listen(tmp_path), servicers) as srv:
        client = GRPCBlobService(srv.address, "the-address")
        with pytest.raises(expected, match=match) as info:
            await client.has(BLOB_A_DIGEST)
        assert "the-address" in str(info.value)
        await client.close()


# --- a server that lies ----------------------------------------------------------


class _EvilBlobs(GRPCBlobServiceWrapper):
    """Flips a byte in what Read sends for ``corrupt``; answers Stat and Read
    for a digest as if it were another (``serve_as``); answers Put with a
    wrong digest when ``lie_on_put``."""

    def __init__(self, blob_service: BlobService) -> None:
        super().__init__(blob_service)
        self.corrupt: set[bytes] = set()
        self.serve_as: dict[bytes, bytes] = {}
        self.lie_on_put = False
        self.garble = False

    async def Stat(self, request: pb.StatBlobRequest, context: Context) -> pb.StatBlobResponse:
        if request.digest in self.serve_as:
            request = pb.StatBlobRequest(
                digest=self.serve_as[request.digest], send_chunks=request.send_chunks
            )
        return await super().Stat(request, context)

    async def Read(self, request: pb.ReadBlobRequest, context: Context) -> AsyncIterator[bytes]:
        corrupt = request.digest in self.corrupt
        if request.digest in self.serve_as:
            request = pb.ReadBlobRequest(digest=self.serve_as[request.digest])
        async for message in super().Read(request, context):
            if corrupt:  # the last byte of the data, keeping the message valid
                message = message[:-1] + bytes([message[-1] ^ 1])
            elif self.garble:  # no longer a valid BlobChunk at all
                message = b"\xff" + message[1:]
            yield message

    async def Put(self, request_iterator: AsyncIterator[memoryview], context: Context) -> Any:
        response = await super().Put(request_iterator, context)
        if self.lie_on_put:
            response = pb.PutBlobResponse(digest=BLOB_A_DIGEST)
        return response


async def _read_until_error(
    client: BlobService, digest: B3Digest, n: int
) -> tuple[bytes, Exception]:
    reader = await client.open_read(digest)
    assert reader is not None
    got = bytearray()
    async with reader:
        try:
            while part := await reader.read(n):
                got += part
        except IntegrityError as e:
            return bytes(got), e
    raise AssertionError(f"no IntegrityError; read {len(got)} bytes to the end")


@pytest.fixture
async def evil(
    tmp_path: Path,
) -> AsyncIterator[tuple[_EvilBlobs, ChunkedMemoryBlobService, BlobService]]:
    backend = ChunkedMemoryBlobService()
    servicer = _EvilBlobs(backend)
    async with running_server(unix_listen(tmp_path), [servicer]) as srv:
        client = GRPCBlobService(srv.address)
        yield servicer, backend, client
        await client.close()


async def test_corrupted_chunk_is_never_returned(evil: Any) -> None:
    servicer, backend, client = evil
    await write_all(backend, BLOB_B)
    chunks = backend.chunk_lists[BLOB_B_DIGEST]
    servicer.corrupt.add(chunks[2].digest)
    got, error = await _read_until_error(client, BLOB_B_DIGEST, 65_536)
    # Everything before the bad chunk, all of it genuine, and not one byte of it.
    assert got == BLOB_B[: 2 * backend.chunk_size]
    assert chunks[2].digest.hex() in str(error)
    # A seek straight into the bad chunk fails the same way.
    reader = await client.open_read(BLOB_B_DIGEST)
    await reader.seek(2 * backend.chunk_size + 10)
    with pytest.raises(IntegrityError):
        await reader.read(10)
    await reader.close()


async def test_chunk_list_of_another_blob_is_caught(evil: Any) -> None:
    servicer, backend, client = evil
    other = big_blob(len(BLOB_B), seed=99)
    await write_all(backend, BLOB_B)
    await write_all(backend, other)
    servicer.serve_as[BLOB_B_DIGEST] = b3(other)
    got, error = await _read_until_error(client, BLOB_B_DIGEST, 1 << 20)
    # Each chunk matched its own digest, but the whole did not: the last
    # chunk is withheld and the end of the blob never reported.
    assert len(got) < len(other)
    assert "do not add up" in str(error)


@pytest.mark.parametrize("size", [0, 12, VERIFY_WINDOW - 1, VERIFY_WINDOW + 3 * MESSAGE_SIZE])
async def test_corrupted_unchunked_blob(evil: Any, size: int) -> None:
    servicer, backend, client = evil
    backend.chunk_size = 1 << 40  # list no chunks: the client streams the whole blob
    data = big_blob(size, seed=5) if size else b""
    digest = await write_all(backend, data)
    if size == 0:
        servicer.serve_as[BLOB_A_DIGEST] = digest  # serves the empty blob as BLOB_A
        got, _ = await _read_until_error(client, BLOB_A_DIGEST, 1 << 20)
        assert got == b""
        return
    servicer.corrupt.add(digest)
    got, error = await _read_until_error(client, digest, 1 << 20)
    assert "hashing to" in str(error)
    # Blobs within the window are verified before any byte is returned; of a
    # larger one at most everything but the window is returned unverified.
    assert len(got) <= max(0, size - VERIFY_WINDOW)


async def test_unchunked_seek_reopens_and_still_verifies(evil: Any) -> None:
    _, backend, client = evil
    backend.chunk_size = 1 << 40
    data = big_blob(VERIFY_WINDOW + 2 * MESSAGE_SIZE + 7, seed=6)
    digest = await write_all(backend, data)
    reader = await client.open_read(digest)
    assert reader is not None
    async with reader:
        assert await reader.read(100) == data[:100]
        await reader.seek(len(data) - 50)
        assert await reader.read(100) == data[-50:]
        await reader.seek(10)  # backwards: a new stream
        assert await reader.read(5) == data[10:15]


async def test_undecodable_messages(evil: Any) -> None:
    servicer, backend, client = evil
    await write_all(backend, BLOB_B)
    servicer.garble = True
    got, error = await _read_until_error(client, BLOB_B_DIGEST, 1 << 20)
    assert got == b""
    assert "undecodable message" in str(error)
    backend.chunk_size = 1 << 40  # and on the whole-blob stream
    digest = await write_all(backend, BLOB_A * 1000)
    got, error = await _read_until_error(client, digest, 1 << 20)
    assert (got, "undecodable message" in str(error)) == (b"", True)


async def test_undecodable_put_message_is_invalid_argument(channel: grpc.aio.Channel) -> None:
    put = channel.stream_unary(
        "/tvix.castore.v1.BlobService/Put",
        request_serializer=lambda b: b,
        response_deserializer=pb.PutBlobResponse.FromString,
    )
    code, details = await _code_of(put(_aiter([b"\x0a\x05abc"])))  # truncated
    assert (code, details) == (
        grpc.StatusCode.INVALID_ARGUMENT,
        "invalid BlobChunk: undecodable message",
    )


async def test_wrong_put_digest_is_caught(evil: Any) -> None:
    servicer, _, client = evil
    servicer.lie_on_put = True
    with pytest.raises(IntegrityError, match="the server answered digest"):
        await write_all(client, BLOB_B)


async def test_good_reads_pass(evil: Any) -> None:
    """The evil server without any lie: the same reads succeed (the tests above can fail)."""
    _, backend, client = evil
    await write_all(backend, BLOB_B)
    assert await read_all(client, BLOB_B_DIGEST) == BLOB_B
    assert await read_all(client, BLOB_A_DIGEST) is None
    await write_all(client, BLOB_A)
    assert await read_all(client, BLOB_A_DIGEST) == BLOB_A


class _ScriptedDirectories(GRPCDirectoryServiceWrapper):
    """Answers every Get with ``script`` (encoded Directories), whatever was asked."""

    def __init__(self, directory_service: DirectoryService) -> None:
        super().__init__(directory_service)
        self.script: list[bytes] = []
        self.put_root: bytes | None = None

    async def Get(self, request: pb.GetDirectoryRequest, context: Context) -> AsyncIterator[bytes]:
        for raw in self.script:
            yield raw

    async def Put(self, request_iterator: AsyncIterator[bytes], context: Context) -> Any:
        response = await super().Put(request_iterator, context)
        if self.put_root is not None:
            response = pb.PutDirectoryResponse(root_digest=self.put_root)
        return response


@pytest.fixture
async def scripted(tmp_path: Path) -> AsyncIterator[tuple[_ScriptedDirectories, DirectoryService]]:
    servicer = _ScriptedDirectories(MemoryDirectoryService())
    async with running_server(unix_listen(tmp_path), [servicer]) as srv:
        client = GRPCDirectoryService(srv.address)
        yield servicer, client
        await client.close()


LIAR = Directory(directories=[DirectoryNode(b"keep", DIRECTORY_WITH_KEEP.digest, 42)])
UNSORTED = pb.Directory(
    symlinks=[pb.SymlinkNode(name=b"b", target=b"x"), pb.SymlinkNode(name=b"a", target=b"x")]
).SerializeToString()

COMPLICATED_BFS = [DIRECTORY_COMPLICATED, DIRECTORY_C, DIRECTORY_WITH_KEEP]


@pytest.mark.parametrize(
    ("root", "script", "match"),
    [
        (DIRECTORY_C, [DIRECTORY_B], "sent Directory .* first"),
        (DIRECTORY_B, [DIRECTORY_B, DIRECTORY_A, DIRECTORY_WITH_KEEP], "no Directory received"),
        (DIRECTORY_B, [DIRECTORY_B, DIRECTORY_A, DIRECTORY_A], "a second time"),
        (DIRECTORY_COMPLICATED, COMPLICATED_BFS[:2], "without 1 Directories"),
        (LIAR, [LIAR, DIRECTORY_WITH_KEEP], "of size 2, referred to with size 42"),
        (DIRECTORY_B, [DIRECTORY_B, UNSORTED], "invalid Directory.*not sorted"),
    ],
    ids=["wrong-root", "unreferenced", "twice", "truncated", "wrong-size", "invalid"],
)
async def test_lying_recursive_get(
    scripted: Any, root: Directory, script: list[Any], match: str
) -> None:
    servicer, client = scripted
    servicer.script = [d if isinstance(d, bytes) else d.encode() for d in script]
    received: list[Directory] = []

    async def collect() -> None:
        async for d in client.get_recursive(root.digest):
            received.append(d)

    with pytest.raises(IntegrityError, match=match):
        await collect()
    # What was yielded before the lie was found is genuine.
    assert all(isinstance(d, Directory) and d in script for d in received)


async def test_honest_script_passes(scripted: Any) -> None:
    servicer, client = scripted
    servicer.script = [d.encode() for d in COMPLICATED_BFS]
    got = [d async for d in client.get_recursive(DIRECTORY_COMPLICATED.digest)]
    assert got == COMPLICATED_BFS
    servicer.script = [DIRECTORY_COMPLICATED.encode()]
    assert await client.get(DIRECTORY_COMPLICATED.digest) == DIRECTORY_COMPLICATED


@pytest.mark.parametrize(
    ("script", "match"),
    [
        ([DIRECTORY_B.encode()], "sent Directory .* instead"),
        ([UNSORTED], "not sorted"),
        ([DIRECTORY_A.encode()] * 2, "more than one"),
    ],
)
async def test_lying_get(scripted: Any, script: list[bytes], match: str) -> None:
    servicer, client = scripted
    servicer.script = script
    with pytest.raises(IntegrityError, match=match):
        await client.get(DIRECTORY_A.digest)


async def test_wrong_put_root_is_caught(scripted: Any) -> None:
    servicer, client = scripted
    servicer.put_root = DIRECTORY_B.digest
    with pytest.raises(IntegrityError, match="answered root"):
        await client.put(DIRECTORY_A)


# Every method whose request is one message (not a stream), for each service.
UNARY_METHODS = [
    "/tvix.castore.v1.BlobService/Stat",
    "/tvix.castore.v1.BlobService/Read",
    "/tvix.castore.v1.DirectoryService/Get",
    "/tvix.store.v1.PathInfoService/Get",
    "/tvix.store.v1.PathInfoService/Put",
    "/tvix.store.v1.PathInfoService/CalculateNAR",
    "/tvix.store.v1.PathInfoService/List",
]


@pytest.mark.parametrize("method", UNARY_METHODS)
async def test_undecodable_request_is_invalid_argument(
    tmp_path: Path, method: str, caplog: pytest.LogCaptureFixture
) -> None:
    """Bytes that are not the request message: INVALID_ARGUMENT and one log line, no traceback."""
    caplog.set_level(logging.WARNING)
    blobs, dirs = MemoryBlobService(), MemoryDirectoryService()
    servicers = [
        *castore_servicers(blobs, dirs),
        GRPCPathInfoServiceWrapper(MemoryPathInfoService(), blobs, dirs),
    ]
    async with (
        running_server(unix_listen(tmp_path), servicers) as srv,
        grpc.aio.insecure_channel(srv.address) as ch,
    ):
        # A field 1 of wire type 2 whose length runs past the end.
        garbage = b"\x0a\xff\xff\x03abc"
        if method.endswith(("Read", "DirectoryService/Get", "List")):
            call: Any = ch.unary_stream(method)(garbage)
        else:
            call = ch.unary_unary(method)(garbage)
        code, details = await _code_of(call)
    assert code == grpc.StatusCode.INVALID_ARGUMENT, details
    assert "request is not a valid tvix." in details
    # (grpc's asyncio teardown of an earlier test may log on the asyncio logger: not ours.)
    ours = [r for r in caplog.records if r.name.startswith(("tvix", "grpc"))]
    assert not [r for r in ours if r.exc_info], "no traceback in the log"
    assert len([r for r in caplog.records if "undecodable" in r.getMessage()]) == 1
