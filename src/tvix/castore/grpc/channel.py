"""Client side plumbing shared by the gRPC clients: URL → target, and a lazy channel."""

from __future__ import annotations

import asyncio
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Self

import grpc

from tvix.castore.composition import URLConfig
from tvix.castore.errors import InvalidURLError
from tvix.castore.url import ServiceURL

__all__ = ["CHANNEL_OPTIONS", "HOST_PORT", "GRPCConfig", "LazyChannel", "channel_target"]

# A bracketed IPv6 literal or a name/IPv4 address (no colon, no userinfo), then a
# port: what a grpc+http URL and a listen address name.
HOST_PORT = re.compile(r"^(\[[0-9A-Fa-f:.]+(?:%[\w.-]+)?\]|[^\[\]:@/]+):([0-9]{1,5})$")

# grpc's default SO_REUSEPORT and message limits stay; what we send is at most
# 512 KiB per message, so peers with the default 4 MiB receive limit interoperate.
CHANNEL_OPTIONS: Sequence[tuple[str, Any]] = ()


def channel_target(url: ServiceURL) -> str:
    """The grpc target for ``grpc+http://host:port`` or ``grpc+unix:///path``.

    Raises :class:`InvalidURLError` naming what is wrong: any query option (none
    is supported), a missing or invalid port, a path after ``host:port``, a
    host or a relative path in a unix socket URL.
    """
    url.reject_params()
    if url.scheme == "grpc+unix":
        url.reject_host()
        path = url.require_path()
        return f"unix:{path}"
    if url.scheme == "grpc+http":
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
    raise InvalidURLError(f"invalid service URL {url.raw!r}: not a grpc+http or grpc+unix URL")


@dataclass(frozen=True)
class GRPCConfig(URLConfig):
    """``grpc+http://host:port`` or ``grpc+unix:///path`` (type ``grpc``): a store daemon.

    ``target`` is the grpc channel target, ``address`` the URL (for messages).
    Each kind's client subclasses it with its ``build``.
    """

    target: str
    address: str

    @classmethod
    def from_url(cls, url: ServiceURL) -> Self:
        """See :func:`channel_target`; no options."""
        return cls(channel_target(url), url.raw)


class LazyChannel:
    """A ``grpc.aio`` channel, created on first use inside the running event loop.

    A grpc.aio channel binds to the event loop current when it is created, so
    creating it in a (synchronous) ``from_url`` and using it later under
    ``asyncio.run`` would tie it to the wrong loop. If the service is used
    from a new loop (another ``asyncio.run``), a new channel is made there;
    the old one belongs to a loop that is gone and is left to the collector.
    """

    def __init__(self, target: str, options: Sequence[tuple[str, Any]] = CHANNEL_OPTIONS) -> None:
        self.target = target
        self._options = list(options)
        self._channel: grpc.aio.Channel | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    def get(self) -> grpc.aio.Channel:
        """The channel for the running loop (must be called from a coroutine)."""
        loop = asyncio.get_running_loop()
        if self._channel is None or self._loop is not loop:
            self._channel = grpc.aio.insecure_channel(self.target, options=self._options)
            self._loop = loop
        return self._channel

    async def close(self) -> None:
        """Close the channel, if one was made on this loop; idempotent."""
        channel, self._channel = self._channel, None
        if channel is not None and self._loop is asyncio.get_running_loop():
            await channel.close(None)
