"""``grpc+http://host:port``, ``grpc+unix:///path.sock``: Directories on a remote store daemon.

The remote is not trusted. Every Directory received is decoded and validated
by the model (an invalid one raises :class:`~tvix.castore.errors.IntegrityError`,
as the server, not the caller, is at fault), and in a recursive get each must
be one asked for: the first is the root requested; each later one is one that
a Directory received earlier refers to, not received before, with the
``size`` the reference gives. A Directory is yielded only once it passed these
checks, so everything yielded is authentic; a stream that ends before every
referenced Directory arrived raises ``IntegrityError`` at its end.

Putting streams the closure to ``Put`` as it is given; the server validates
it and its ``INVALID_ARGUMENT`` answer becomes a
:class:`~tvix.castore.errors.ValidationError` with the server's message. The
root digest the server returns must be the digest of the last Directory sent.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass

import grpc
from typing_extensions import override

from tvix.castore.composition import BuildContext
from tvix.castore.digest import B3Digest
from tvix.castore.directory import Directory
from tvix.castore.directoryservice.base import DirectoryPutter, DirectoryService
from tvix.castore.directoryservice.graph import ClosureError, DirectoryGraph, Order
from tvix.castore.errors import IntegrityError, ValidationError
from tvix.castore.grpc._client import GRPCClient, StreamingPut
from tvix.castore.grpc._wire import identity
from tvix.castore.grpc.channel import GRPCConfig
from tvix.castore.proto import directory_from_bytes, pb

__all__ = ["GRPCDirectoryService", "GRPCDirectoryServiceConfig"]

_SERVICE = "castore.v1.DirectoryService"


@dataclass
class _Stubs:
    """The DirectoryService stubs on one channel."""

    channel: grpc.aio.Channel
    get: grpc.aio.UnaryStreamMultiCallable[pb.GetDirectoryRequest, bytes]
    put: grpc.aio.StreamUnaryMultiCallable[bytes, pb.PutDirectoryResponse]


class GRPCDirectoryService(GRPCClient[_Stubs], DirectoryService):
    """A client of a remote ``tvix.castore.v1.DirectoryService``.

    See the module docstring for how what it receives is verified.

    ``address`` is what :meth:`from_url` was given (for error messages);
    ``target`` the grpc channel target.
    """

    def _make_stubs(self, channel: grpc.aio.Channel) -> _Stubs:
        return _Stubs(
            channel,
            channel.unary_stream(
                self.method(_SERVICE, "Get"),
                request_serializer=pb.GetDirectoryRequest.SerializeToString,
                response_deserializer=identity,
            ),
            channel.stream_unary(
                self.method(_SERVICE, "Put"),
                request_serializer=identity,
                response_deserializer=pb.PutDirectoryResponse.FromString,
            ),
        )

    def _decode(self, raw: bytes, what: str) -> Directory:
        try:
            return directory_from_bytes(raw)
        except ValidationError as e:
            raise IntegrityError(f"{what}: {self.address} sent an invalid Directory: {e}") from None

    @override
    async def get(self, digest: B3Digest) -> Directory | None:
        what = f"Get of Directory {digest.hex()}"

        async def attempt() -> list[bytes]:
            received: list[bytes] = []
            call = self._stubs().get(pb.GetDirectoryRequest(digest=digest, recursive=False))
            try:
                async for raw in call:
                    received.append(raw)
                    if len(received) > 1:
                        raise IntegrityError(f"{what}: {self.address} sent more than one Directory")
            finally:
                call.cancel()
            return received

        try:
            received = await self.read_call(what, attempt)
        except grpc.aio.AioRpcError as e:
            if e.code() == grpc.StatusCode.NOT_FOUND:
                return None
            self._fail(e, what)
        if not received:
            return None
        directory = self._decode(received[0], what)
        if directory.digest != digest:
            raise IntegrityError(
                f"{what}: {self.address} sent Directory {directory.digest.hex()} instead"
            )
        return directory

    @override
    async def get_recursive(self, root: B3Digest) -> AsyncIterator[Directory]:
        what = f"recursive Get of Directory {root.hex()}"
        graph = DirectoryGraph(Order.ROOT_TO_LEAVES, root)
        call = self._stubs().get(pb.GetDirectoryRequest(digest=root, recursive=True))
        try:
            async for raw in call:
                directory = self._decode(raw, what)
                try:
                    graph.add(directory)
                except ClosureError as e:
                    raise IntegrityError(f"{what}: {self.address} {_sent_wrongly(e)}") from None
                yield directory
        except grpc.aio.AioRpcError as e:
            if e.code() == grpc.StatusCode.NOT_FOUND and not len(graph):
                return
            self._fail(e, what)
        finally:
            # Also reached when the consumer stops early: end the call then.
            call.cancel()
        if not len(graph):
            return
        try:
            graph.validate()
        except ClosureError as e:
            raise IntegrityError(
                f"{what}: {self.address} ended the stream without {e.count} "
                f"Directories below the root, e.g. {e.digest.hex() if e.digest else '?'}"
            ) from None

    @override
    def put_multiple_start(self) -> DirectoryPutter:
        return _GRPCDirectoryPutter(self)


class _GRPCDirectoryPutter(DirectoryPutter):
    """Streams a closure to ``Put``; the server validates it (see the module docstring)."""

    def __init__(self, service: GRPCDirectoryService) -> None:
        self._service = service
        self._put: StreamingPut[pb.PutDirectoryResponse] = StreamingPut(
            service,
            lambda: service._stubs().put(),  # type: ignore[call-arg]  # stubs gap
            "Put of Directories",
            "ended early",
        )
        self._last: B3Digest | None = None
        self._root: B3Digest | None = None

    async def put(self, directory: Directory) -> None:
        if self._root is not None or self._put.aborted:
            raise ValueError("put into a closed directory putter")
        await self._put.send(directory.encode())
        self._last = directory.digest

    async def close(self) -> B3Digest:
        if self._root is not None:
            return self._root
        if self._put.aborted:
            raise ValueError("close of an aborted directory putter")
        response = await self._put.finish()
        try:
            root = B3Digest(response.root_digest)
        except ValidationError:
            root = None
        if root is None or root != self._last:
            self._put.aborted = True
            raise IntegrityError(
                f"Put of Directories at {self._service.address}: the server answered root "
                f"{response.root_digest.hex()}, the last Directory sent was "
                f"{self._last.hex() if self._last else 'none'}"
            )
        self._root = root
        return root

    async def abort(self) -> None:
        if self._root is None:
            self._put.cancel()


def _sent_wrongly(e: ClosureError) -> str:
    """What a server did wrong, by the :class:`ClosureError` its stream caused."""
    digest = e.digest.hex() if e.digest else "?"
    if e.problem == "wrong-root":
        return f"sent Directory {digest} first"
    if e.problem in ("unreferenced", "again"):
        return f"sent Directory {digest}, which no Directory received before refers to" + (
            " (a second time)" if e.problem == "again" else ""
        )
    if e.problem == "size-of-added" and e.reference is not None:
        return f"sent Directory {digest} of size {e.size}, referred to with size {e.reference.size}"
    if e.problem == "size-in-reference" and e.reference is not None:
        return (
            f"sent Directories that disagree on the size of {digest} "
            f"({e.size} and {e.reference.size})"
        )
    return f"sent a bad closure: {e}"


@dataclass(frozen=True)
class GRPCDirectoryServiceConfig(GRPCConfig):
    """A store daemon's DirectoryService (see :class:`~tvix.castore.grpc.channel.GRPCConfig`)."""

    def build(self, ctx: BuildContext) -> GRPCDirectoryService:
        """A client; it connects on first use."""
        return GRPCDirectoryService(self.target, self.address, protocol=self.protocol, tls=self.tls)
