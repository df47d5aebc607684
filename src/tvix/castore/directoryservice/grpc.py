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

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any, NoReturn

import grpc

from tvix.castore.composition import BuildContext
from tvix.castore.digest import B3Digest
from tvix.castore.directory import Directory
from tvix.castore.directoryservice.base import DirectoryPutter, DirectoryService
from tvix.castore.errors import IntegrityError, StorageError, ValidationError
from tvix.castore.grpc._wire import identity
from tvix.castore.grpc.channel import GRPCConfig, LazyChannel
from tvix.castore.grpc.errors import error_from_rpc
from tvix.castore.proto import directory_from_bytes, pb

__all__ = ["GRPCDirectoryService", "GRPCDirectoryServiceConfig"]

_GET = "/tvix.castore.v1.DirectoryService/Get"
_PUT = "/tvix.castore.v1.DirectoryService/Put"


@dataclass
class _Stubs:
    channel: grpc.aio.Channel
    get: grpc.aio.UnaryStreamMultiCallable[pb.GetDirectoryRequest, bytes]
    put: grpc.aio.StreamUnaryMultiCallable[bytes, pb.PutDirectoryResponse]


class GRPCDirectoryService(DirectoryService):
    """A client of a remote ``tvix.castore.v1.DirectoryService``; see the module
    docstring for how what it receives is verified.

    ``address`` is what :meth:`from_url` was given (for error messages);
    ``target`` the grpc channel target.
    """

    def __init__(self, target: str, address: str | None = None) -> None:
        self._channel = LazyChannel(target)
        self.address = address or target
        self._stubs_cache: _Stubs | None = None

    def _stubs(self) -> _Stubs:
        channel = self._channel.get()
        stubs = self._stubs_cache
        if stubs is None or stubs.channel is not channel:
            stubs = self._stubs_cache = _Stubs(
                channel,
                channel.unary_stream(
                    _GET,
                    request_serializer=pb.GetDirectoryRequest.SerializeToString,
                    response_deserializer=identity,
                ),
                channel.stream_unary(
                    _PUT,
                    request_serializer=identity,
                    response_deserializer=pb.PutDirectoryResponse.FromString,
                ),
            )
        return stubs

    def _fail(self, e: grpc.aio.AioRpcError, what: str) -> NoReturn:
        raise error_from_rpc(e, what, self.address) from None

    def _decode(self, raw: bytes, what: str) -> Directory:
        try:
            return directory_from_bytes(raw)
        except ValidationError as e:
            raise IntegrityError(f"{what}: {self.address} sent an invalid Directory: {e}") from None

    async def get(self, digest: B3Digest) -> Directory | None:
        what = f"Get of Directory {digest.hex()}"
        received: list[bytes] = []
        call = self._stubs().get(pb.GetDirectoryRequest(digest=digest, recursive=False))
        try:
            async for raw in call:
                received.append(raw)
                if len(received) > 1:
                    raise IntegrityError(f"{what}: {self.address} sent more than one Directory")
        except grpc.aio.AioRpcError as e:
            if e.code() == grpc.StatusCode.NOT_FOUND:
                return None
            self._fail(e, what)
        finally:
            call.cancel()
        if not received:
            return None
        directory = self._decode(received[0], what)
        if directory.digest != digest:
            raise IntegrityError(
                f"{what}: {self.address} sent Directory {directory.digest.hex()} instead"
            )
        return directory

    async def get_recursive(self, root: B3Digest) -> AsyncIterator[Directory]:
        what = f"recursive Get of Directory {root.hex()}"
        # Referred to by a Directory received, not yet received: digest -> size.
        expected: dict[B3Digest, int] = {}
        received: dict[B3Digest, int] = {}
        call = self._stubs().get(pb.GetDirectoryRequest(digest=root, recursive=True))
        try:
            async for raw in call:
                directory = self._decode(raw, what)
                digest = directory.digest
                if not received:
                    if digest != root:
                        raise IntegrityError(
                            f"{what}: {self.address} sent Directory {digest.hex()} first"
                        )
                else:
                    size = expected.pop(digest, None)
                    if size is None:
                        raise IntegrityError(
                            f"{what}: {self.address} sent Directory {digest.hex()}, which no "
                            "Directory received before refers to"
                            + (" (a second time)" if digest in received else "")
                        )
                    if size != directory.size:
                        raise IntegrityError(
                            f"{what}: {self.address} sent Directory {digest.hex()} of size "
                            f"{directory.size}, referred to with size {size}"
                        )
                for child in directory.directories:
                    known = received.get(child.digest, expected.get(child.digest))
                    if known is not None and known != child.size:
                        raise IntegrityError(
                            f"{what}: {self.address} sent Directories that disagree on the "
                            f"size of {child.digest.hex()} ({known} and {child.size})"
                        )
                    if child.digest not in received:
                        expected[child.digest] = child.size
                received[digest] = directory.size
                yield directory
        except grpc.aio.AioRpcError as e:
            if e.code() == grpc.StatusCode.NOT_FOUND and not received:
                return
            self._fail(e, what)
        finally:
            # Also reached when the consumer stops early: end the call then.
            call.cancel()
        if expected:
            missing = next(iter(expected))
            raise IntegrityError(
                f"{what}: {self.address} ended the stream without {len(expected)} "
                f"Directories below the root, e.g. {missing.hex()}"
            )

    def put_multiple_start(self) -> DirectoryPutter:
        return _GRPCDirectoryPutter(self)

    async def close(self) -> None:
        await self._channel.close()


class _GRPCDirectoryPutter(DirectoryPutter):
    """Streams a closure to ``Put``; the server validates it (see the module docstring)."""

    def __init__(self, service: GRPCDirectoryService) -> None:
        self._service = service
        self._call: grpc.aio.StreamUnaryCall[Any, pb.PutDirectoryResponse] | None = None
        self._last: B3Digest | None = None
        self._root: B3Digest | None = None
        self._aborted = False

    def _ensure_call(self) -> grpc.aio.StreamUnaryCall[Any, pb.PutDirectoryResponse]:
        if self._call is None:
            # No request iterator: each put() awaits its write (flow control).
            self._call = self._service._stubs().put()  # type: ignore[call-arg]  # stubs gap
        return self._call

    async def _failed(self) -> NoReturn:
        """The call ended early (the server rejected the closure): raise what it said."""
        assert self._call is not None
        self._aborted = True
        try:
            await self._call
        except grpc.aio.AioRpcError as e:
            self._service._fail(e, "Put of Directories")
        raise StorageError(f"Put of Directories at {self._service.address}: ended early")

    async def put(self, directory: Directory) -> None:
        if self._root is not None or self._aborted:
            raise ValueError("put into a closed directory putter")
        call = self._ensure_call()
        try:
            await call.write(directory.encode())
        except (grpc.aio.AioRpcError, asyncio.InvalidStateError):
            await self._failed()
        self._last = directory.digest

    async def close(self) -> B3Digest:
        if self._root is not None:
            return self._root
        if self._aborted:
            raise ValueError("close of an aborted directory putter")
        call = self._ensure_call()
        try:
            await call.done_writing()
            response = await call
        except grpc.aio.AioRpcError as e:
            self._aborted = True
            self._service._fail(e, "Put of Directories")
        try:
            root = B3Digest(response.root_digest)
        except ValidationError:
            root = None
        if root is None or root != self._last:
            self._aborted = True
            raise IntegrityError(
                f"Put of Directories at {self._service.address}: the server answered root "
                f"{response.root_digest.hex()}, the last Directory sent was "
                f"{self._last.hex() if self._last else 'none'}"
            )
        self._root = root
        return root

    async def abort(self) -> None:
        if self._root is None:
            self._aborted = True
            if self._call is not None:
                self._call.cancel()


@dataclass(frozen=True)
class GRPCDirectoryServiceConfig(GRPCConfig):
    """A store daemon's DirectoryService (see :class:`~tvix.castore.grpc.channel.GRPCConfig`)."""

    def build(self, ctx: BuildContext) -> GRPCDirectoryService:
        """A client; it connects on first use."""
        return GRPCDirectoryService(self.target, self.address)
