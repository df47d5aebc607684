"""The PathInfo service over gRPC: status codes, CalculateNAR, reflection (its conformance run
is in test_pathinfoservice_conformance.py)."""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest
from google.protobuf.descriptor_pool import DescriptorPool
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import (
    ProtoReflectionDescriptorDatabase,
)

from tests.support.grpc import running_server
from tvix._proto import castore_pb2, store_pb2
from tvix.castore.blobservice import MemoryBlobService, write_all
from tvix.castore.directoryservice import MemoryDirectoryService
from tvix.castore.grpc import GRPCServer, castore_servicers
from tvix.castore.ingest import ingest_path
from tvix.castore.nodes import DirectoryNode, FileNode
from tvix.castore.proto import node_to_proto
from tvix.castore.testing.fixtures import BLOB_A, DIRECTORY_WITH_KEEP, b3
from tvix.store.errors import InvalidPathInfoError
from tvix.store.grpc import GRPCPathInfoServiceWrapper
from tvix.store.nar import calculate_nar
from tvix.store.pathinfoservice import MemoryPathInfoService, from_url
from tvix.store.pathinfoservice.grpc import GRPCPathInfoService
from tvix.store.proto import pathinfo_to_proto
from tvix.store.testing.fixtures import path_info


class Backends:
    def __init__(self) -> None:
        self.blobs = MemoryBlobService()
        self.dirs = MemoryDirectoryService()
        self.infos = MemoryPathInfoService()

    async def seed(self) -> None:
        # The fixtures' root nodes refer to these: the server refuses dangling roots.
        await write_all(self.blobs, BLOB_A)
        await self.dirs.put(DIRECTORY_WITH_KEEP)


@pytest.fixture
async def server(tmp_path: Path) -> AsyncIterator[tuple[GRPCServer, Backends]]:
    b = Backends()
    await b.seed()
    servicers = [
        *castore_servicers(b.blobs, b.dirs),
        GRPCPathInfoServiceWrapper(b.infos, b.blobs, b.dirs),
    ]
    async with running_server(f"unix://{tmp_path}/store.sock", servicers) as srv:
        yield srv, b


async def test_over_tcp(tmp_path: Path) -> None:
    b = Backends()
    await b.seed()
    servicers = [GRPCPathInfoServiceWrapper(b.infos, b.blobs, b.dirs)]
    async with running_server("127.0.0.1:0", servicers) as srv:
        client = from_url(srv.url)
        info = path_info(1, "directory")
        assert await client.put(info) == info
        assert await client.get(info.store_path.digest) == info
        await client.close()


async def test_dangling_root_refused(server: tuple[GRPCServer, Backends]) -> None:
    srv, b = server
    client = from_url(srv.url)
    b.blobs._blobs.clear()
    info = path_info(2, "file")
    with pytest.raises(InvalidPathInfoError, match=r"root blob .* is not stored"):
        await client.put(info)
    assert await b.infos.get(info.store_path.digest) is None
    await client.close()


async def test_status_codes(server: tuple[GRPCServer, Backends]) -> None:
    srv, _b = server
    async with grpc.aio.insecure_channel(srv.address) as channel:
        get = channel.unary_unary(
            "/tvix.store.v1.PathInfoService/Get",
            request_serializer=store_pb2.GetPathInfoRequest.SerializeToString,
            response_deserializer=store_pb2.PathInfo.FromString,
        )
        with pytest.raises(grpc.aio.AioRpcError) as e:
            await get(store_pb2.GetPathInfoRequest(by_output_hash=b"\0" * 20))
        assert e.value.code() == grpc.StatusCode.NOT_FOUND
        with pytest.raises(grpc.aio.AioRpcError) as e:
            await get(store_pb2.GetPathInfoRequest(by_output_hash=b"\0" * 19))
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "20 bytes" in (e.value.details() or "")
        put = channel.unary_unary(
            "/tvix.store.v1.PathInfoService/Put",
            request_serializer=store_pb2.PathInfo.SerializeToString,
            response_deserializer=store_pb2.PathInfo.FromString,
        )
        bad = pathinfo_to_proto(path_info(3))
        bad.narinfo.nar_sha256 = b"short"
        with pytest.raises(grpc.aio.AioRpcError) as e:
            await put(bad)
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "NAR sha256" in (e.value.details() or "")


async def test_calculate_nar(server: tuple[GRPCServer, Backends], tmp_path: Path) -> None:
    srv, b = server
    tree = tmp_path / "t"
    (tree / "sub").mkdir(parents=True)
    (tree / "sub" / "f").write_bytes(b"contents")
    (tree / "link").symlink_to("sub/f")
    node = await ingest_path(b.blobs, b.dirs, tree)
    client = from_url(srv.url)
    assert isinstance(client, GRPCPathInfoService)
    assert await client.calculate(node) == await calculate_nar(b.blobs, b.dirs, node)
    await client.close()


async def test_reflection_alone(server: tuple[GRPCServer, Backends]) -> None:
    srv, _b = server

    def discover() -> dict[str, list[str]]:
        with grpc.insecure_channel(srv.address) as ch:
            db = ProtoReflectionDescriptorDatabase(ch)
            pool = DescriptorPool(db)  # fed only by the server, no local .proto
            return {
                name: sorted(m.name for m in pool.FindServiceByName(name).methods)
                for name in db.get_services()
                if name.startswith("tvix.")
            }

    services = await asyncio.to_thread(discover)
    assert services == {
        "tvix.castore.v1.BlobService": ["Put", "Read", "Stat"],
        "tvix.castore.v1.DirectoryService": ["Get", "Put"],
        "tvix.store.v1.PathInfoService": ["CalculateNAR", "Get", "List", "Put"],
    }


@pytest.mark.parametrize("kind", ["file", "directory"])
async def test_root_size_contradicting_stored_data_refused(
    server: tuple[GRPCServer, Backends], kind: str
) -> None:
    """A root node whose size differs from its stored Directory's or blob's could never render."""
    srv, b = server
    client = from_url(srv.url)
    good = path_info(4, kind)
    node = good.node
    assert isinstance(node, FileNode | DirectoryNode)
    lying = dataclasses.replace(good, node=dataclasses.replace(node, size=node.size + 1))
    with pytest.raises(InvalidPathInfoError, match=r"gives size \d+ for (blob|Directory)"):
        await client.put(lying)
    assert await b.infos.get(good.store_path.digest) is None
    assert await client.put(good) == good
    await client.close()


async def test_calculate_nar_of_absent_root_is_not_found(
    server: tuple[GRPCServer, Backends],
) -> None:
    srv, _b = server
    absent = b3(b"not stored")
    async with grpc.aio.insecure_channel(srv.address) as channel:
        calculate = channel.unary_unary(
            "/tvix.store.v1.PathInfoService/CalculateNAR",
            request_serializer=castore_pb2.Node.SerializeToString,
            response_deserializer=store_pb2.CalculateNARResponse.FromString,
        )
        for node in (
            DirectoryNode(b"d", absent, 3),
            FileNode(b"f", absent, 12),
        ):
            with pytest.raises(grpc.aio.AioRpcError) as e:
                await calculate(node_to_proto(node))
            assert e.value.code() == grpc.StatusCode.NOT_FOUND, e.value.details()
            assert absent.hex() in (e.value.details() or "")
