"""What every gRPC client backend shares.

Its channel, its typed stubs, its errors, and client-streaming puts.

:class:`GRPCClient` holds the :class:`~tvix.castore.grpc.channel.LazyChannel`,
the ``address`` errors name, and the stubs, made once per channel (a new
event loop gets a new channel, hence new stubs).

Load: a client keeps at most :data:`MAX_IN_FLIGHT` calls waiting on the
server at once (:meth:`GRPCClient.slot`); callers beyond that wait in the
client. A server ends calls it cannot take yet (grpc core's cap on calls not
yet handled answers ``CANCELLED``, an HTTP/2 stream over the peer's limit is
refused: ``UNAVAILABLE`` naming ``RST_STREAM``), and a NAR render of a tree
of small files would otherwise start thousands at once. Idempotent reads
(``Stat``, ``Read`` of a chunk, ``Get``) go through :meth:`GRPCClient.read_call`,
which also retries such a refusal nobody asked for a few times
(:data:`RETRY_DELAYS`); a cancellation the caller asked for is an
``asyncio.CancelledError`` and never retried. :class:`StreamingPut` is the
client side of a client-streaming call (``Put`` of blobs and of Directories)
whose writes are each awaited, so grpc's flow control reaches back to the
caller, and whose early end raises what the server said.
"""

from __future__ import annotations

import abc
import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import Any, Generic, NoReturn, Protocol, TypeVar

import grpc

from tvix.castore.errors import StorageError
from tvix.castore.grpc.channel import ChannelTLS, LazyChannel
from tvix.castore.grpc.errors import error_from_rpc

__all__ = ["MAX_IN_FLIGHT", "RETRY_DELAYS", "GRPCClient", "StreamingPut", "Stubs", "refused"]

log = logging.getLogger(__name__)

#: Calls one client keeps waiting on its server at once (the daemon allows 256
#: streams per connection; several clients of one process share nothing).
MAX_IN_FLIGHT = 64
#: Pauses before retrying an idempotent read the server refused (then it fails).
RETRY_DELAYS = (0.05, 0.2, 0.5, 1.0)


def refused(e: grpc.aio.AioRpcError) -> bool:
    """Whether the server (or transport) ended the call without having handled it.

    ``CANCELLED`` reaching a client as an error is never the client's own
    cancellation (that is an ``asyncio.CancelledError``); ``UNAVAILABLE`` is
    only taken as a refusal when an HTTP/2 stream was reset, not when the
    server cannot be reached at all.
    """
    code = e.code()
    if code == grpc.StatusCode.CANCELLED:
        return True
    return code == grpc.StatusCode.UNAVAILABLE and "RST_STREAM" in (e.details() or "")


class Stubs(Protocol):
    """A client's multicallables, bound to ``channel``."""

    @property
    def channel(self) -> grpc.aio.Channel: ...


S = TypeVar("S", bound=Stubs)
R = TypeVar("R")
T = TypeVar("T")


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
        self._slots: asyncio.Semaphore | None = None

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
            # A semaphore binds to the loop it is first contended on: one per channel.
            self._slots = asyncio.Semaphore(MAX_IN_FLIGHT)
        return stubs

    def slot(self) -> asyncio.Semaphore:
        """The semaphore a call holds while it waits on the server (see the module docs)."""
        self._stubs()
        assert self._slots is not None
        return self._slots

    async def read_call(self, what: str, attempt: Callable[[], Awaitable[T]]) -> T:
        """``attempt()`` (an idempotent read) holding a slot, retried while refused.

        ``attempt`` makes a new call each time; errors other than a refusal
        (:func:`refused`), and the last refusal, propagate as they are.
        """
        for delay in (*RETRY_DELAYS, None):
            try:
                async with self.slot():
                    return await attempt()
            except grpc.aio.AioRpcError as e:
                if delay is None or not refused(e):
                    raise
                log.debug("%s at %s refused (%s), retrying", what, self.address, e.code().name)
            await asyncio.sleep(delay)
        raise AssertionError("unreachable")

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
