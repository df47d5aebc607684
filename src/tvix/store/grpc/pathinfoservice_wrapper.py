"""``tvix.store.v1.PathInfoService`` served from any :class:`PathInfoService`."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any, ClassVar

import grpc

from tvix._proto import castore_pb2, store_pb2
from tvix.castore.blobservice.base import BlobService
from tvix.castore.blobservice.util import blob_size_matches
from tvix.castore.directoryservice.base import DirectoryService
from tvix.castore.errors import ValidationError
from tvix.castore.grpc.errors import translate_errors
from tvix.castore.grpc.handlers import unary_stream, unary_unary
from tvix.castore.nodes import DirectoryNode, FileNode
from tvix.castore.proto import node_from_proto
from tvix.store.errors import InvalidPathInfoError, ListNotSupportedError
from tvix.store.nar.calculate import NarCalculator
from tvix.store.pathinfo import PathInfo
from tvix.store.pathinfoservice.base import PathInfoService, check_digest
from tvix.store.proto import pathinfo_from_proto, pathinfo_to_proto

__all__ = ["GRPCPathInfoServiceWrapper"]

_Context = grpc.aio.ServicerContext[Any, Any]


class GRPCPathInfoServiceWrapper:
    """Serves a :class:`PathInfoService` as ``tvix.store.v1.PathInfoService``.

    - ``Get`` answers ``NOT_FOUND`` for a store path that is not stored and
      ``INVALID_ARGUMENT`` for a digest that is not 20 bytes.
    - ``Put`` validates the PathInfo (``INVALID_ARGUMENT`` naming the rule)
      and refuses one whose root node's contents are not stored (the root
      Directory, or the root file's blob), so no PathInfo dangles, or whose
      root node's size contradicts them, so every PathInfo stored can render.
    - ``CalculateNAR`` renders the NAR of a stored root node, cached per node;
      ``NOT_FOUND`` when the root's Directory or blob is not stored.
    - ``List`` streams every PathInfo, or ``UNIMPLEMENTED`` when the backend
      cannot list.
    """

    service_name: ClassVar[str] = "tvix.store.v1.PathInfoService"

    def __init__(
        self,
        path_info_service: PathInfoService,
        blob_service: BlobService,
        directory_service: DirectoryService,
        nar_calculator: NarCalculator | None = None,
    ) -> None:
        self._infos = path_info_service
        self._blobs = blob_service
        self._dirs = directory_service
        self._calc = nar_calculator or NarCalculator(blob_service, directory_service)

    def method_handlers(self) -> dict[str, grpc.RpcMethodHandler[Any, Any]]:
        """The handlers by method name (see :func:`tvix.castore.grpc.build_server`)."""
        return {
            "Get": unary_unary(
                self.Get,
                store_pb2.GetPathInfoRequest,
                store_pb2.PathInfo.SerializeToString,
            ),
            "Put": unary_unary(
                self.Put,
                store_pb2.PathInfo,
                store_pb2.PathInfo.SerializeToString,
            ),
            "CalculateNAR": unary_unary(
                self.CalculateNAR,
                castore_pb2.Node,
                store_pb2.CalculateNARResponse.SerializeToString,
            ),
            "List": unary_stream(
                self.List,
                store_pb2.ListPathInfoRequest,
                store_pb2.PathInfo.SerializeToString,
            ),
        }

    async def Get(
        self, request: store_pb2.GetPathInfoRequest, context: _Context
    ) -> store_pb2.PathInfo:
        """``PathInfoService/Get``: the PathInfo of a store path; see the class."""
        async with translate_errors(context):
            if request.WhichOneof("by_what") != "by_output_hash":
                raise ValidationError("GetPathInfoRequest: no by_output_hash given")
            digest = check_digest(request.by_output_hash)
            info = await self._infos.get(digest)
            if info is None:
                await context.abort(
                    grpc.StatusCode.NOT_FOUND, f"no PathInfo for digest {digest.hex()}"
                )
            return pathinfo_to_proto(info)
        raise AssertionError("unreachable")  # pragma: no cover

    async def Put(self, request: store_pb2.PathInfo, context: _Context) -> store_pb2.PathInfo:
        """``PathInfoService/Put``: validate and store a PathInfo; see the class."""
        async with translate_errors(context):
            info = pathinfo_from_proto(request)
            await self._check_root(info)
            return pathinfo_to_proto(await self._infos.put(info))
        raise AssertionError("unreachable")  # pragma: no cover

    async def _check_root(self, info: PathInfo) -> None:
        """Refuse a root whose contents are not stored, or whose size contradicts them."""
        node = info.node
        problem = None
        if isinstance(node, DirectoryNode):
            directory = await self._dirs.get(node.digest)
            if directory is None:
                problem = f"its root Directory {node.digest.hex()} is not stored"
            elif not directory.accepts_size(node.size):
                problem = (
                    f"its root node gives size {node.size} for Directory {node.digest.hex()}, "
                    f"whose size is {directory.size}"
                )
        elif isinstance(node, FileNode):
            matches = await blob_size_matches(self._blobs, node.digest, node.size)
            if matches is None:
                problem = f"its root blob {node.digest.hex()} is not stored"
            elif not matches:
                problem = (
                    f"its root node gives size {node.size} for blob {node.digest.hex()}, "
                    "which has another size"
                )
        if problem is not None:
            raise InvalidPathInfoError(f"invalid PathInfo {info.store_path}: {problem}")

    async def CalculateNAR(
        self, request: castore_pb2.Node, context: _Context
    ) -> store_pb2.CalculateNARResponse:
        """``PathInfoService/CalculateNAR``: a root node's NAR size and sha256."""
        async with translate_errors(context):
            # The root node's name is not part of the NAR; clients may leave it empty.
            named = castore_pb2.Node()
            named.CopyFrom(request)
            kind = named.WhichOneof("node")
            if kind is not None and not getattr(named, kind).name:
                getattr(named, kind).name = b"root"
            node = node_from_proto(named)
            if isinstance(node, DirectoryNode) and await self._dirs.get(node.digest) is None:
                await context.abort(
                    grpc.StatusCode.NOT_FOUND, f"Directory {node.digest.hex()} is not stored"
                )
            if isinstance(node, FileNode) and not await self._blobs.has(node.digest):
                await context.abort(
                    grpc.StatusCode.NOT_FOUND, f"blob {node.digest.hex()} is not stored"
                )
            size, sha256 = await self._calc.calculate(node)
            return store_pb2.CalculateNARResponse(nar_size=size, nar_sha256=sha256)
        raise AssertionError("unreachable")  # pragma: no cover

    async def List(
        self, request: store_pb2.ListPathInfoRequest, context: _Context
    ) -> AsyncIterator[store_pb2.PathInfo]:
        """``PathInfoService/List``: stream every PathInfo; see the class."""
        async with translate_errors(context):
            try:
                async for info in self._infos.list():
                    yield pathinfo_to_proto(info)
            except ListNotSupportedError as e:
                await context.abort(grpc.StatusCode.UNIMPLEMENTED, str(e))
