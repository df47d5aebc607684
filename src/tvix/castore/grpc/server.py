"""Building a gRPC server: listen addresses, health checking, reflection.

Reusable by every layer: :func:`build_server` takes any :class:`Servicer`
(the castore ones from :func:`castore_servicers`, and the store layer's
PathInfoService wrapper when it implements the same two members), serves
each under its ``tvix.*`` name and under the ``snix.*`` name snix (upstream's
continuation) gives the same service, adds ``grpc.health.v1`` health
checking and server reflection (``grpc.reflection.v1`` and ``v1alpha``)
naming all of them, and binds one listen address, in clear or with TLS
(:class:`ServerTLS`, optionally requiring client certificates).

Limits, chosen deliberately (:data:`SERVER_OPTIONS`): messages up to
:data:`~tvix.castore.grpc._wire.MAX_MESSAGE_SIZE` either way (a Directory of
hundreds of thousands of entries is one message); at most
:data:`MAX_CONCURRENT_STREAMS` calls in flight per connection, so a client
that starts more has them wait in its own transport instead of being
cancelled by the server; keepalive pings every minute both ways (a peer that
vanished is noticed), and clients may ping every 10 s.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import socket
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection, reflection_pb2
from grpc_reflection.v1alpha import reflection_pb2_grpc as reflection_grpc
from grpc_reflection.v1alpha._async import ReflectionServicer
from typing_extensions import override

from tvix.castore.blobservice.base import BlobService
from tvix.castore.directoryservice.base import DirectoryService
from tvix.castore.errors import ValidationError
from tvix.castore.grpc._wire import MAX_MESSAGE_SIZE
from tvix.castore.grpc.blobservice_wrapper import GRPCBlobServiceWrapper
from tvix.castore.grpc.channel import HOST_PORT, read_pem
from tvix.castore.grpc.directoryservice_wrapper import GRPCDirectoryServiceWrapper
from tvix.castore.grpc.observe import CallObserver, Watch

__all__ = [
    "SERVER_OPTIONS",
    "GRPCServer",
    "ServerTLS",
    "Servicer",
    "build_server",
    "castore_servicers",
    "parse_listen_address",
    "serve",
    "snix_name",
]

# Calls in flight per connection (HTTP/2 streams); more wait in the client.
MAX_CONCURRENT_STREAMS = 256

# Server options (see the module docs). SO_REUSEPORT is on by default in grpc,
# which would let a second daemon bind the same port silently and steal half
# the connections.
SERVER_OPTIONS: Sequence[tuple[str, Any]] = (
    ("grpc.so_reuseport", 0),
    ("grpc.max_receive_message_length", MAX_MESSAGE_SIZE),
    ("grpc.max_send_message_length", MAX_MESSAGE_SIZE),
    ("grpc.max_concurrent_streams", MAX_CONCURRENT_STREAMS),
    ("grpc.keepalive_time_ms", 60_000),
    ("grpc.keepalive_timeout_ms", 20_000),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.min_recv_ping_interval_without_data_ms", 10_000),
    ("grpc.http2.max_ping_strikes", 0),
)

REFLECTION_V1 = "grpc.reflection.v1.ServerReflection"

call_log = logging.getLogger("tvix.grpc.calls")


class _LoggedMethod(Watch):
    def __init__(self, name: str) -> None:
        self._name = name

    @override
    def finished(self, code: str, seconds: float, messages: int) -> None:
        call_log.info(
            "%s %s %.1f ms%s",
            self._name,
            code,
            seconds * 1000,
            f", {messages} messages" if messages != 1 else "",
        )


class CallLog(CallObserver):
    """One INFO line per call on ``tvix.grpc.calls``: method, outcome, milliseconds.

    Costs nothing unless that logger is enabled for INFO (``-v``).
    """

    @override
    def watch(self, service: str, method: str) -> Watch | None:
        if not call_log.isEnabledFor(logging.INFO):
            return None
        return _LoggedMethod(f"/{service}/{method}")


def snix_name(service_name: str) -> str:
    """The name snix gives a ``tvix.*`` service (``snix.castore.v1.BlobService``)."""
    return "snix." + service_name.removeprefix("tvix.")


@dataclass(frozen=True)
class ServerTLS:
    """What a server needs to speak TLS: its certificate chain and key (PEM).

    With ``client_ca``, clients must present a certificate it signed (mTLS).
    """

    certificate_chain: bytes
    private_key: bytes
    client_ca: bytes | None = None

    @classmethod
    def from_files(cls, cert: str, key: str, client_ca: str | None = None) -> ServerTLS:
        """Read the PEM files; ``ValidationError`` naming a file that cannot be read."""
        return cls(
            read_pem(cert, "certificate"),
            read_pem(key, "key"),
            None if client_ca is None else read_pem(client_ca, "client CA"),
        )

    def credentials(self) -> grpc.ServerCredentials:
        """The grpc server credentials."""
        return grpc.ssl_server_credentials(
            [(self.private_key, self.certificate_chain)],
            root_certificates=self.client_ca,
            require_client_auth=self.client_ca is not None,
        )


# grpc_health's stubs predate its asyncio servicer.
_AioHealthServicer: Any = health.aio.HealthServicer  # type: ignore[attr-defined]


class Servicer(Protocol):
    """What :func:`build_server` needs of a service implementation."""

    @property
    def service_name(self) -> str:
        """The full service name, e.g. ``tvix.castore.v1.BlobService``."""
        ...

    def method_handlers(self) -> dict[str, grpc.RpcMethodHandler[Any, Any]]:
        """The handlers answering the service's methods, by method name."""
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
    tls: bool = False

    @property
    def url(self) -> str:
        """The service URL a client takes (``grpc+http://…``, ``grpc+https://…``, ``grpc+unix://…``)."""
        if self.address.startswith("unix:"):
            path = self.address.removeprefix("unix:")
            if path.startswith("//"):
                path = path[2:]
            return f"grpc+unix://{path}" if path.startswith("/") else f"grpc+unix:{path}"
        return f"grpc+{'https' if self.tls else 'http'}://{self.address}"

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
    tls: ServerTLS | None = None,
    interceptors: Sequence[grpc.aio.ServerInterceptor] = (),  # type: ignore[type-arg]
) -> GRPCServer:
    """A ``grpc.aio`` server offering ``servicers``, health checking and reflection.

    Each servicer answers under its own name and its snix name. Call it with
    the event loop running (grpc.aio binds the server to it); ``interceptors``
    come after the call log (e.g. :class:`~tvix.castore.grpc.metrics.CallMetrics`). Raises
    :class:`ValidationError` for a malformed ``listen`` and ``OSError`` when
    the address cannot be bound (in use, no permission).
    """
    target = parse_listen_address(listen)
    server = grpc.aio.server(options=list(options), interceptors=[CallLog(), *interceptors])
    names: list[str] = []
    for servicer in servicers:
        handlers = servicer.method_handlers()
        for name in (servicer.service_name, snix_name(servicer.service_name)):
            server.add_generic_rpc_handlers([grpc.method_handlers_generic_handler(name, handlers)])
            names.append(name)
    health_servicer = _AioHealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    _add_reflection(server, [*names, health.SERVICE_NAME, reflection.SERVICE_NAME, REFLECTION_V1])
    try:
        if tls is None:
            port = server.add_insecure_port(target)
        else:
            port = server.add_secure_port(target, tls.credentials())
    except RuntimeError as e:  # grpc reports bind failures this way, without the reason
        raise OSError(f"cannot listen on {listen!r}: {_bind_failure(target) or e}") from None
    address = target
    if not target.startswith("unix:"):
        host = target.rsplit(":", 1)[0]
        address = f"{host}:{port}"
    return GRPCServer(server, address, health_servicer, names, tls is not None)


def _bind_failure(target: str) -> str | None:
    """Why ``target`` cannot be bound, found out by binding it ourselves (grpc does not say)."""
    if target.startswith("unix:"):
        path = target.removeprefix("unix:").removeprefix("//")
        if os.path.exists(path):
            return f"{path} exists: is another daemon serving it? (if not, remove the stale socket)"
        return None
    host, _, port = target.rpartition(":")
    family = socket.AF_INET6 if host.startswith("[") else socket.AF_INET
    try:
        with socket.socket(family, socket.SOCK_STREAM) as probe:
            probe.bind((host.strip("[]"), int(port)))
    except OSError as e:
        if e.errno == errno.EADDRINUSE:
            return "address already in use: is another daemon running?"
        return e.strerror or str(e)
    return None


def _add_reflection(server: grpc.aio.Server, names: list[str]) -> None:
    """Reflection under v1alpha (grpcio-reflection's) and v1 (the same messages)."""
    # The v1 descriptors, so v1 itself can be described; the messages are v1alpha's.
    from tvix._proto import grpc_reflection_v1_pb2  # noqa: F401

    servicer = ReflectionServicer(names)
    reflection_grpc.add_ServerReflectionServicer_to_server(servicer, server)
    v1 = grpc.stream_stream_rpc_method_handler(
        servicer.ServerReflectionInfo,
        request_deserializer=reflection_pb2.ServerReflectionRequest.FromString,
        response_serializer=reflection_pb2.ServerReflectionResponse.SerializeToString,
    )
    server.add_generic_rpc_handlers(
        [grpc.method_handlers_generic_handler(REFLECTION_V1, {"ServerReflectionInfo": v1})]
    )


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
