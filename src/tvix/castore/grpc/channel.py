"""Client side plumbing shared by the gRPC clients: URL → target, and a lazy channel."""

from __future__ import annotations

import asyncio
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, Self

import grpc

from tvix.castore.composition import SettingKind, URLConfig
from tvix.castore.errors import InvalidURLError
from tvix.castore.grpc._wire import MAX_MESSAGE_SIZE
from tvix.castore.url import ServiceURL

__all__ = [
    "CHANNEL_OPTIONS",
    "HOST_PORT",
    "PROTOCOLS",
    "ChannelTLS",
    "GRPCConfig",
    "LazyChannel",
    "channel_target",
    "read_pem",
]

# A bracketed IPv6 literal or a name/IPv4 address (no colon, no userinfo), then a
# port: what a grpc+http URL and a listen address name.
HOST_PORT = re.compile(r"^(\[[0-9A-Fa-f:.]+(?:%[\w.-]+)?\]|[^\[\]:@/]+):([0-9]{1,5})$")

# What a client accepts and how it keeps a connection alive (the server's side
# is in tvix.castore.grpc.server): messages up to MAX_MESSAGE_SIZE (a large
# Directory is one message), a ping every minute so a vanished server is
# noticed. Blob data is sent in 512 KiB messages, so peers with grpc's default
# 4 MiB limit interoperate.
CHANNEL_OPTIONS: Sequence[tuple[str, Any]] = (
    ("grpc.max_receive_message_length", MAX_MESSAGE_SIZE),
    ("grpc.max_send_message_length", MAX_MESSAGE_SIZE),
    ("grpc.keepalive_time_ms", 60_000),
    ("grpc.keepalive_timeout_ms", 20_000),
)

PROTOCOLS = ("tvix", "snix")
"""The package names a daemon may serve the services under (``?protocol=``)."""


def read_pem(path: str, what: str) -> bytes:
    """A PEM file's bytes; :class:`InvalidURLError` naming it when it cannot be read."""
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as e:
        raise InvalidURLError(f"cannot read the TLS {what} {path}: {e.strerror or e}") from None


def channel_target(url: ServiceURL) -> str:
    """The grpc target for ``grpc+http(s)://host:port`` or ``grpc+unix:///path``.

    Raises :class:`InvalidURLError` naming what is wrong: a missing or invalid
    port, a path after ``host:port``, a host or a relative path in a unix
    socket URL. (Options are :class:`GRPCConfig`'s to check.)
    """
    if url.scheme == "grpc+unix":
        url.reject_host()
        path = url.require_path()
        return f"unix:{path}"
    if url.scheme in ("grpc+http", "grpc+https"):
        url.reject_path()
        if not url.host:
            raise InvalidURLError(f"invalid service URL {url.raw!r}: host:port is required")
        m = HOST_PORT.match(url.host)
        if m is None:
            raise InvalidURLError(
                f"invalid service URL {url.raw!r}: expected host:port or [ipv6]:port, "
                f"got {url.host!r} (a port is required)"
            )
        port = int(m.group(2))
        if not 0 < port < 65536:
            raise InvalidURLError(f"invalid service URL {url.raw!r}: port {port} out of range")
        return f"{m.group(1)}:{port}"
    raise InvalidURLError(
        f"invalid service URL {url.raw!r}: not a grpc+http, grpc+https or grpc+unix URL"
    )


@dataclass(frozen=True)
class ChannelTLS:
    """A client's TLS settings.

    The CA to trust (``None``: the system's), and a client certificate and
    key for servers that require one (mTLS).
    """

    ca: bytes | None = None
    certificate_chain: bytes | None = None
    private_key: bytes | None = None

    def credentials(self) -> grpc.ChannelCredentials:
        """The grpc channel credentials."""
        return grpc.ssl_channel_credentials(self.ca, self.private_key, self.certificate_chain)


@dataclass(frozen=True)
class GRPCConfig(URLConfig):
    """A store daemon (type ``grpc``), each kind's client subclassing it with its ``build``.

    ``grpc+http://host:port``, ``grpc+unix:///path``, or with TLS
    ``grpc+https://host:port?ca=FILE&cert=FILE&key=FILE`` (``ca``: the PEM
    CA certificates to trust instead of the system's; ``cert`` and ``key``: a
    client certificate for servers that require one). ``protocol=snix``
    speaks to a daemon by the snix service names (``snix.castore.v1...``),
    the default ``tvix`` by upstream tvix's. ``target`` is the grpc channel
    target, ``address`` the URL (for messages).
    """

    OPTIONS: ClassVar[dict[str, SettingKind]] = {
        "protocol": "str",
        "ca": "str",
        "cert": "str",
        "key": "str",
    }

    target: str
    address: str
    protocol: str = "tvix"
    tls: ChannelTLS | None = None

    @classmethod
    def from_url(cls, url: ServiceURL) -> Self:
        """See :func:`channel_target` and the class docs; files are read when built."""
        tls_options = ("ca", "cert", "key")
        url.reject_params("protocol", *(tls_options if url.scheme == "grpc+https" else ()))
        protocol = url.params.get("protocol", "tvix")
        if protocol not in PROTOCOLS:
            raise InvalidURLError(
                f"invalid service URL {url.raw!r}: protocol must be one of {', '.join(PROTOCOLS)}"
            )
        if ("cert" in url.params) != ("key" in url.params):
            raise InvalidURLError(
                f"invalid service URL {url.raw!r}: a client certificate needs both cert and key"
            )
        tls = None
        if url.scheme == "grpc+https":
            files = {k: url.params.get(k) for k in tls_options}
            tls = ChannelTLS(
                *(
                    None if f is None else read_pem(f, what)
                    for f, what in (
                        (files["ca"], "CA"),
                        (files["cert"], "certificate"),
                        (files["key"], "key"),
                    )
                )
            )
        return cls(channel_target(url), url.raw.split("?")[0], protocol, tls)


class LazyChannel:
    """A ``grpc.aio`` channel, created on first use inside the running event loop.

    A grpc.aio channel binds to the event loop current when it is created, so
    creating it in a (synchronous) ``from_url`` and using it later under
    ``asyncio.run`` would tie it to the wrong loop. If the service is used
    from a new loop (another ``asyncio.run``), a new channel is made there;
    the old one belongs to a loop that is gone and is left to the collector.
    """

    def __init__(
        self,
        target: str,
        options: Sequence[tuple[str, Any]] = CHANNEL_OPTIONS,
        tls: ChannelTLS | None = None,
    ) -> None:
        self.target = target
        self._options = list(options)
        self._tls = tls
        self._channel: grpc.aio.Channel | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    def get(self) -> grpc.aio.Channel:
        """The channel for the running loop (must be called from a coroutine)."""
        loop = asyncio.get_running_loop()
        if self._channel is None or self._loop is not loop:
            if self._tls is None:
                self._channel = grpc.aio.insecure_channel(self.target, options=self._options)
            else:
                self._channel = grpc.aio.secure_channel(
                    self.target, self._tls.credentials(), options=self._options
                )
            self._loop = loop
        return self._channel

    async def close(self) -> None:
        """Close the channel, if one was made on this loop; idempotent."""
        channel, self._channel = self._channel, None
        if channel is not None and self._loop is asyncio.get_running_loop():
            await channel.close(None)
