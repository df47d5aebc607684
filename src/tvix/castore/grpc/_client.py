"""What every gRPC client backend shares.

Its channel, its typed stubs, its errors, and client-streaming puts.

:class:`GRPCClient` holds the :class:`~tvix.castore.grpc.channel.LazyChannel`,
the ``address`` errors name, and the stubs, made once per channel (a new
event loop gets a new channel, hence new stubs). :class:`StreamingPut` is the
client side of a client-streaming call (``Put`` of blobs and of Directories)
whose writes are each awaited, so grpc's flow control reaches back to the
caller, and whose early end raises what the server said.
"""

from __future__ import annotations

import abc
import asyncio
from collections.abc import Callable
from typing import Any, Generic, NoReturn, Protocol, TypeVar

import grpc

from tvix.castore.errors import StorageError
from tvix.castore.grpc.channel import ChannelTLS, LazyChannel
from tvix.castore.grpc.errors import error_from_rpc

__all__ = ["GRPCClient", "StreamingPut", "Stubs"]


class Stubs(Protocol):
    """A client's multicallables, bound to ``channel``."""

    @property
    def channel(self) -> grpc.aio.Channel: ...


S = TypeVar("S", bound=Stubs)
R = TypeVar("R")


class GRPCClient(abc.ABC, Generic[S]):
    """Base of the gRPC client backends.

    ``address`` is what ``from_url`` was given (for error messages);
    ``target`` the grpc channel target; ``protocol`` the package the
    services are named in (``tvix`` or ``snix``); ``tls`` the channel's TLS
    settings (``None``: in clear).
    """

    def __init__(
        self,
        target: str,
        address: str | None = None,
        *,
        protocol: str = "tvix",
        tls: ChannelTLS | None = None,
    ) -> None:
        self._channel = LazyChannel(target, tls=tls)
        self.address = address or target
        self.protocol = protocol
        self._stubs_cache: S | None = None

    def method(self, service: str, name: str) -> str:
        """The full method path, by this client's protocol (``/tvix.<service>/<name>``)."""
        return f"/{self.protocol}.{service}/{name}"

    @abc.abstractmethod
    def _make_stubs(self, channel: grpc.aio.Channel) -> S:
        """The stubs of this client's service on ``channel``."""

    def _stubs(self) -> S:
        channel = self._channel.get()
        stubs = self._stubs_cache
        if stubs is None or stubs.channel is not channel:
            stubs = self._stubs_cache = self._make_stubs(channel)
        return stubs

    def _fail(self, e: grpc.aio.AioRpcError, what: str) -> NoReturn:
        """Raise the castore error ``e`` stands for, naming ``what`` failed and where."""
        raise error_from_rpc(e, what, self.address) from None

    async def close(self) -> None:
        """Close the channel; the client makes a new one if used again."""
        await self._channel.close()


class StreamingPut(Generic[R]):
    """A client-streaming call, started on the first message, answering an ``R``.

    ``start`` starts the call (without a request iterator: messages are
    sent with :meth:`send`). ``what`` names the call in errors (``"Put of a
    blob"``); ``ended_early`` is said when the server ended the call without
    an error status.
    """

    def __init__(
        self,
        client: GRPCClient[Any],
        start: Callable[[], grpc.aio.StreamUnaryCall[Any, R]],
        what: str,
        ended_early: str,
    ) -> None:
        self._client = client
        self._start = start
        self.what = what
        self._ended_early = ended_early
        self.call: grpc.aio.StreamUnaryCall[Any, R] | None = None
        self.aborted = False

    def ensure_call(self) -> grpc.aio.StreamUnaryCall[Any, R]:
        """The call, started if it was not yet."""
        if self.call is None:
            # No request iterator: messages are sent with write(), each awaited,
            # which is grpc's flow control reaching back to the caller.
            self.call = self._start()
        return self.call

    async def send(self, message: Any) -> None:
        """Send one message; raises what the server said if it ended the call."""
        call = self.ensure_call()
        try:
            await call.write(message)
        except (grpc.aio.AioRpcError, asyncio.InvalidStateError):
            await self.failed()

    async def failed(self) -> NoReturn:
        """The call ended early (the server rejected it): raise what it said."""
        assert self.call is not None
        self.aborted = True
        try:
            await self.call
        except grpc.aio.AioRpcError as e:
            self._client._fail(e, self.what)
        raise StorageError(f"{self.what} at {self._client.address}: {self._ended_early}")

    async def finish(self) -> R:
        """End the stream and return the server's answer."""
        call = self.ensure_call()
        try:
            await call.done_writing()
            return await call
        except grpc.aio.AioRpcError as e:
            self.aborted = True
            self._client._fail(e, self.what)
        except asyncio.InvalidStateError:
            await self.failed()

    def cancel(self) -> None:
        """Cancel the call (the server sees a cancelled stream, never a complete one)."""
        self.aborted = True
        if self.call is not None:
            self.call.cancel()
