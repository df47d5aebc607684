"""Building a gRPC server: listen addresses, health checking, reflection.

Reusable by every layer: :func:`build_server` takes any :class:`Servicer`
(the castore ones from :func:`castore_servicers`, and the store layer's
PathInfoService wrapper when it implements the same two members), adds
``grpc.health.v1`` health checking and ``grpc.reflection.v1alpha`` server
reflection naming all of them, and binds one listen address.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from tvix.castore.blobservice.base import BlobService
from tvix.castore.directoryservice.base import DirectoryService
from tvix.castore.errors import ValidationError
from tvix.castore.grpc.blobservice_wrapper import GRPCBlobServiceWrapper
from tvix.castore.grpc.channel import HOST_PORT
from tvix.castore.grpc.directoryservice_wrapper import GRPCDirectoryServiceWrapper

__all__ = [
    "GRPCServer",
    "Servicer",
    "build_server",
    "castore_servicers",
    "parse_listen_address",
    "serve",
]

# Server options. SO_REUSEPORT is on by default in grpc, which would let a
# second daemon bind the same port silently and steal half the connections.
SERVER_OPTIONS: Sequence[tuple[str, Any]] = (("grpc.so_reuseport", 0),)

# grpc_health's stubs predate its asyncio servicer.
_AioHealthServicer: Any = health.aio.HealthServicer  # type: ignore[attr-defined]


class Servicer(Protocol):
    """What :func:`build_server` needs of a service implementation."""

    @property
    def service_name(self) -> str:
        """The full service name, e.g. ``tvix.castore.v1.BlobService``."""
        ...

    def rpc_handler(self) -> grpc.GenericRpcHandler[Any, Any]:
        """The handler answering the service's methods."""
        ...


def castore_servicers(
    blob_service: BlobService, directory_service: DirectoryService
) -> list[Servicer]:
    """The castore services (blob, directory) serving the given backends."""
    return [GRPCBlobServiceWrapper(blob_service), GRPCDirectoryServiceWrapper(directory_service)]


def parse_listen_address(listen: str) -> str:
    """Check ``listen`` and return it as a grpc bind address.

    Accepted: ``host:port`` (``0.0.0.0:8000``, ``localhost:8000``), ``[ipv6]:port``
    (``[::1]:8000``, ``[::]:8000``), port 0 for any free port, and
    ``unix:///abs/path.sock`` / ``unix:relative.sock`` for a unix socket.
    Raises :class:`ValidationError` otherwise.
    """
    if listen.startswith("unix:"):
        path = listen.removeprefix("unix:").removeprefix("//")
        if not path or path.endswith("/"):
            raise ValidationError(f"invalid listen address {listen!r}: no socket path")
        return listen
    m = HOST_PORT.match(listen)
    if m is None or int(m.group(2)) > 65535:
        raise ValidationError(
            f"invalid listen address {listen!r}: expected host:port, [ipv6]:port or "
            "unix:///path.sock"
        )
    return listen


@dataclass
class GRPCServer:
    """A built (not yet started) server and what it was bound to."""

    server: grpc.aio.Server
    address: str
    """What a client dials: ``host:port`` with the real port when 0 was asked
    for, or the ``unix:`` address as given."""
    health: Any
    """The ``grpc_health.v1`` asyncio HealthServicer (to report other statuses)."""
    service_names: list[str]

    @property
    def url(self) -> str:
        """The service URL a castore client takes (``grpc+http://…`` / ``grpc+unix://…``)."""
        if self.address.startswith("unix:"):
            path = self.address.removeprefix("unix:")
            if path.startswith("//"):
                path = path[2:]
            return f"grpc+unix://{path}" if path.startswith("/") else f"grpc+unix:{path}"
        return f"grpc+http://{self.address}"

    async def start(self) -> None:
        """Start serving; every service reports ``SERVING``."""
        await self.server.start()
        for name in ["", *self.service_names]:
            await self.health.set(name, health_pb2.HealthCheckResponse.SERVING)

    async def stop(self, grace: float | None = None) -> None:
        """Report ``NOT_SERVING``, then stop; calls in flight get ``grace`` seconds."""
        await self.health.enter_graceful_shutdown()
        await self.server.stop(grace)


def build_server(
    listen: str,
    servicers: Sequence[Servicer],
    *,
    options: Sequence[tuple[str, Any]] = SERVER_OPTIONS,
) -> GRPCServer:
    """A ``grpc.aio`` server offering ``servicers``, health checking and reflection.

    Call it with the event loop running (grpc.aio binds the server to it).
    Raises :class:`ValidationError` for a malformed ``listen`` and ``OSError``
    when the address cannot be bound (in use, no permission).
    """
    target = parse_listen_address(listen)
    server = grpc.aio.server(options=list(options))
    server.add_generic_rpc_handlers([s.rpc_handler() for s in servicers])
    health_servicer = _AioHealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    names = [s.service_name for s in servicers]
    reflection.enable_server_reflection(
        [*names, health.SERVICE_NAME, reflection.SERVICE_NAME], server
    )
    try:
        port = server.add_insecure_port(target)
    except RuntimeError as e:  # grpc reports bind failures this way
        raise OSError(f"cannot listen on {listen!r}: {e}") from None
    address = target
    if not target.startswith("unix:"):
        host = target.rsplit(":", 1)[0]
        address = f"{host}:{port}"
    return GRPCServer(server, address, health_servicer, names)


async def serve(
    listen: str,
    servicers: Sequence[Servicer],
    *,
    ready: Callable[[GRPCServer], None] | None = None,
    grace: float = 5.0,
) -> None:
    """Serve until cancelled, then stop gracefully (``grace`` seconds for calls in flight).

    ``ready`` is called with the started server (e.g. to print its address).
    """
    built = build_server(listen, servicers)
    await built.start()
    try:
        if ready is not None:
            ready(built)
        await built.server.wait_for_termination()
    finally:
        await asyncio.shield(built.stop(grace))
