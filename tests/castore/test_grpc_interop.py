"""Interoperating with upstream as it runs: the snix service names, reflection v1, TLS."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest

from tests.support.tls import Pki, make_pki
from tvix._proto import grpc_reflection_v1_pb2 as reflection_v1
from tvix._proto import snix_castore_pb2 as snix
from tvix._proto import snix_castore_pb2_grpc as snix_grpc
from tvix._proto import snix_store_pb2 as snix_store
from tvix._proto import snix_store_pb2_grpc as snix_store_grpc
from tvix.castore import blobservice, directoryservice
from tvix.castore.blobservice import BlobService, MemoryBlobService, read_all, write_all
from tvix.castore.directoryservice import MemoryDirectoryService
from tvix.castore.errors import StorageError
from tvix.castore.grpc import GRPCServer, build_server, castore_servicers
from tvix.castore.grpc.server import ServerTLS
from tvix.castore.testing import BlobServiceTests
from tvix.castore.testing.fixtures import BLOB_A, BLOB_A_DIGEST, DIRECTORY_A, DIRECTORY_B
from tvix.store import pathinfoservice
from tvix.store.grpc import GRPCPathInfoServiceWrapper
from tvix.store.pathinfoservice import MemoryPathInfoService
from tvix.store.proto import pathinfo_to_bytes
from tvix.store.testing.fixtures import path_info


@pytest.fixture
async def server(tmp_path: Path) -> AsyncIterator[GRPCServer]:
    """A daemon's three services, empty."""
    blobs, dirs = MemoryBlobService(), MemoryDirectoryService()
    servicers = [
        *castore_servicers(blobs, dirs),
        GRPCPathInfoServiceWrapper(MemoryPathInfoService(), blobs, dirs),
    ]
    srv = build_server(f"unix://{tmp_path}/s.sock", servicers)
    await srv.start()
    try:
        yield srv
    finally:
        await srv.stop(0)


async def test_snix_client_generated_from_snix_protos(server: GRPCServer) -> None:
    """A client of the snix.* packages, generated from .proto files with the snix names."""
    async with grpc.aio.insecure_channel(server.address) as channel:
        blobs = snix_grpc.BlobServiceStub(channel)

        async def chunks() -> AsyncIterator[snix.BlobChunk]:
            yield snix.BlobChunk(data=BLOB_A)

        assert (await blobs.Put(chunks())).digest == BLOB_A_DIGEST
        stat = await blobs.Stat(snix.StatBlobRequest(digest=BLOB_A_DIGEST))
        assert stat == snix.StatBlobResponse()
        read = blobs.Read(snix.ReadBlobRequest(digest=BLOB_A_DIGEST))
        assert b"".join([c.data async for c in read]) == BLOB_A

        dirs = snix_grpc.DirectoryServiceStub(channel)
        sent = [snix.Directory.FromString(d.encode()) for d in (DIRECTORY_A, DIRECTORY_B)]

        async def stream() -> AsyncIterator[snix.Directory]:
            for message in sent:
                yield message

        put = await dirs.Put(stream())
        assert put.root_digest == DIRECTORY_B.digest
        got = [
            d
            async for d in dirs.Get(
                snix.GetDirectoryRequest(digest=DIRECTORY_B.digest, recursive=True)
            )
        ]
        assert [g.SerializeToString(deterministic=True) for g in got] == [
            DIRECTORY_B.encode(),
            DIRECTORY_A.encode(),
        ]
        assert got[0].directories[0].DESCRIPTOR.full_name == "snix.castore.v1.DirectoryEntry"

        infos = snix_store_grpc.PathInfoServiceStub(channel)
        info = path_info(7, "file")
        message = snix_store.PathInfo.FromString(pathinfo_to_bytes(info))
        assert message.node.DESCRIPTOR.full_name == "snix.castore.v1.Entry"
        await infos.Put(message)
        back = await infos.Get(snix_store.GetPathInfoRequest(by_output_hash=info.store_path.digest))
        assert back == message


async def test_reflection_lists_both_names_over_v1(server: GRPCServer) -> None:
    async with grpc.aio.insecure_channel(server.address) as channel:
        call = channel.stream_stream(
            "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo",
            request_serializer=reflection_v1.ServerReflectionRequest.SerializeToString,
            response_deserializer=reflection_v1.ServerReflectionResponse.FromString,
        )

        async def requests() -> AsyncIterator[reflection_v1.ServerReflectionRequest]:
            yield reflection_v1.ServerReflectionRequest(list_services="")
            yield reflection_v1.ServerReflectionRequest(
                file_containing_symbol="snix.castore.v1.BlobService"
            )

        responses = [r async for r in call(requests())]
    names = {s.name for s in responses[0].list_services_response.service}
    for package in ("tvix", "snix"):
        assert {
            f"{package}.castore.v1.BlobService",
            f"{package}.castore.v1.DirectoryService",
            f"{package}.store.v1.PathInfoService",
        } <= names
    assert {
        "grpc.reflection.v1.ServerReflection",
        "grpc.reflection.v1alpha.ServerReflection",
    } <= names
    assert responses[1].file_descriptor_response.file_descriptor_proto


class TestBlobServiceOverSnixNames(BlobServiceTests):
    """Our client, speaking the snix names (``?protocol=snix``), passes the suite."""

    @pytest.fixture
    async def blob_service(self, server: GRPCServer) -> AsyncIterator[BlobService]:
        svc = blobservice.from_url(server.url + "?protocol=snix")
        yield svc
        await svc.close()


async def test_snix_clients_of_every_kind(server: GRPCServer) -> None:
    blobs = blobservice.from_url(server.url + "?protocol=snix")
    assert await write_all(blobs, BLOB_A) == BLOB_A_DIGEST
    await blobs.close()
    dirs = directoryservice.from_url(server.url + "?protocol=snix")
    assert await dirs.put(DIRECTORY_A) == DIRECTORY_A.digest
    infos = pathinfoservice.from_url(server.url + "?protocol=snix")
    info = path_info(8, "file")
    assert await infos.put(info) == info
    assert await infos.get(info.store_path.digest) == info
    await dirs.close()
    await infos.close()


# -- TLS ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"))


async def _tls_server(pki: Pki, client_ca: bool) -> GRPCServer:
    tls = ServerTLS.from_files(
        str(pki.server_cert), str(pki.server_key), str(pki.ca) if client_ca else None
    )
    srv = build_server(
        "127.0.0.1:0", castore_servicers(MemoryBlobService(), MemoryDirectoryService()), tls=tls
    )
    await srv.start()
    return srv


async def test_tls(pki: Pki) -> None:
    srv = await _tls_server(pki, client_ca=False)
    try:
        assert srv.url.startswith("grpc+https://127.0.0.1:")
        client = blobservice.from_url(f"{srv.url}?ca={pki.ca}")
        assert await write_all(client, BLOB_A) == BLOB_A_DIGEST
        assert await read_all(client, BLOB_A_DIGEST) == BLOB_A
        await client.close()
        # The system's roots do not know the test CA; a clear-text client gets nowhere either.
        for url in (srv.url, srv.url.replace("grpc+https", "grpc+http")):
            client = blobservice.from_url(url)
            with pytest.raises(StorageError, match="UNAVAILABLE"):
                await client.has(BLOB_A_DIGEST)
            await client.close()
    finally:
        await srv.stop(0)


async def test_mutual_tls(pki: Pki, tmp_path: Path) -> None:
    srv = await _tls_server(pki, client_ca=True)
    try:
        with_cert = f"{srv.url}?ca={pki.ca}&cert={pki.client_cert}&key={pki.client_key}"
        client = blobservice.from_url(with_cert)
        assert await write_all(client, BLOB_A) == BLOB_A_DIGEST
        await client.close()
        client = blobservice.from_url(f"{srv.url}?ca={pki.ca}")
        with pytest.raises(StorageError, match="UNAVAILABLE"):
            await client.has(BLOB_A_DIGEST)
        await client.close()
        other = make_pki(tmp_path / "other", ca_name="another CA")
        foreign = f"{srv.url}?ca={pki.ca}&cert={other.client_cert}&key={other.client_key}"
        client = blobservice.from_url(foreign)
        with pytest.raises(StorageError, match="UNAVAILABLE"):
            await client.has(BLOB_A_DIGEST)
        await client.close()
    finally:
        await srv.stop(0)
