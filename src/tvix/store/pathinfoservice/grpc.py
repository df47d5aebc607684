"""``grpc+http://host:port``, ``grpc+unix:///path.sock``: PathInfos on a remote store daemon.

A PathInfo received is validated like any other (an invalid one, or one for
another store path than asked, raises
:class:`~tvix.castore.errors.IntegrityError`: the server is at fault). Its
*claims* (NAR hash, signatures) are the server's word; put a
signature-checking wrapper in front to trust only what is signed.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import grpc
from typing_extensions import override

from tvix._proto import store_pb2
from tvix.castore.composition import BuildContext
from tvix.castore.errors import IntegrityError, ValidationError
from tvix.castore.grpc import GRPCClient
from tvix.castore.grpc.channel import GRPCConfig
from tvix.castore.grpc.errors import error_from_rpc
from tvix.castore.nodes import Node
from tvix.castore.proto import node_to_proto
from tvix.store.errors import InvalidPathInfoError, ListNotSupportedError
from tvix.store.pathinfo import PathInfo
from tvix.store.pathinfoservice.base import PathInfoService, check_digest
from tvix.store.proto import pathinfo_from_proto, pathinfo_to_proto

__all__ = ["GRPCPathInfoService", "GRPCPathInfoServiceConfig"]

_SERVICE = "store.v1.PathInfoService"


@dataclass
class _Stubs:
    """The PathInfoService stubs on one channel."""

    channel: grpc.aio.Channel
    get: grpc.aio.UnaryUnaryMultiCallable[store_pb2.GetPathInfoRequest, store_pb2.PathInfo]
    put: grpc.aio.UnaryUnaryMultiCallable[store_pb2.PathInfo, store_pb2.PathInfo]
    list: grpc.aio.UnaryStreamMultiCallable[store_pb2.ListPathInfoRequest, store_pb2.PathInfo]
    calculate: grpc.aio.UnaryUnaryMultiCallable[Any, store_pb2.CalculateNARResponse]


def _serialize(m: Any) -> bytes:
    data: bytes = m.SerializeToString()
    return data


class GRPCPathInfoService(GRPCClient[_Stubs], PathInfoService):
    """A client of a remote ``tvix.store.v1.PathInfoService``.

    Also offers :meth:`calculate`, so the server computes NAR hashes of
    content it holds instead of the client fetching it all.
    """

    def _make_stubs(self, channel: grpc.aio.Channel) -> _Stubs:
        def unary(method: str, response: Any) -> Any:
            return channel.unary_unary(
                self.method(_SERVICE, method),
                request_serializer=_serialize,
                response_deserializer=response.FromString,
            )

        return _Stubs(
            channel,
            unary("Get", store_pb2.PathInfo),
            unary("Put", store_pb2.PathInfo),
            channel.unary_stream(
                self.method(_SERVICE, "List"),
                request_serializer=_serialize,
                response_deserializer=store_pb2.PathInfo.FromString,
            ),
            unary("CalculateNAR", store_pb2.CalculateNARResponse),
        )

    def _received(self, m: store_pb2.PathInfo, what: str) -> PathInfo:
        try:
            return pathinfo_from_proto(m)
        except InvalidPathInfoError as e:
            raise IntegrityError(f"{self.address} sent an invalid PathInfo for {what}: {e}") from e

    @override
    async def get(self, digest: bytes) -> PathInfo | None:
        key = check_digest(digest)
        try:
            request = store_pb2.GetPathInfoRequest(by_output_hash=key)
            m = await self.read_call(
                f"Get of PathInfo {key.hex()}", lambda: self._stubs().get(request)
            )
        except grpc.aio.AioRpcError as e:
            if e.code() == grpc.StatusCode.NOT_FOUND:
                return None
            raise error_from_rpc(e, f"PathInfo {key.hex()}", self.address) from e
        info = self._received(m, key.hex())
        if info.store_path.digest != key:
            raise IntegrityError(
                f"{self.address} answered {info.store_path} when asked for digest {key.hex()}"
            )
        return info

    @override
    async def put(self, info: PathInfo) -> PathInfo:
        try:
            async with self.slot():
                m = await self._stubs().put(pathinfo_to_proto(info))
        except grpc.aio.AioRpcError as e:
            err = error_from_rpc(e, f"put {info.store_path}", self.address)
            if isinstance(err, ValidationError):
                raise InvalidPathInfoError(str(err)) from e
            raise err from e
        stored = self._received(m, str(info.store_path))
        if stored.store_path != info.store_path:
            raise IntegrityError(f"{self.address} stored {stored.store_path} for {info.store_path}")
        return stored

    @override
    async def list(self) -> AsyncIterator[PathInfo]:
        call = self._stubs().list(store_pb2.ListPathInfoRequest())
        try:
            async for m in call:
                yield self._received(m, "a listing")
        except grpc.aio.AioRpcError as e:
            if e.code() == grpc.StatusCode.UNIMPLEMENTED:
                raise ListNotSupportedError(f"{self.address} cannot list PathInfos") from e
            raise error_from_rpc(e, "list PathInfos", self.address) from e

    async def calculate(self, node: Node) -> tuple[int, bytes]:
        """NAR size and sha256 of ``node``, computed by the server from what it stores."""
        try:
            request = node_to_proto(node)
            m = await self.read_call("CalculateNAR", lambda: self._stubs().calculate(request))
        except grpc.aio.AioRpcError as e:
            raise error_from_rpc(e, "CalculateNAR", self.address) from e
        if len(m.nar_sha256) != 32:
            raise IntegrityError(f"{self.address} sent a {len(m.nar_sha256)}-byte NAR sha256")
        return m.nar_size, m.nar_sha256


@dataclass(frozen=True)
class GRPCPathInfoServiceConfig(GRPCConfig):
    """A store daemon's PathInfoService (see :class:`~tvix.castore.grpc.channel.GRPCConfig`)."""

    def build(self, ctx: BuildContext) -> GRPCPathInfoService:
        """A client; it connects on first use."""
        return GRPCPathInfoService(self.target, self.address, protocol=self.protocol, tls=self.tls)
