"""The byte streams of one connection: the socket, framed sources, pull sources, NARs.

:class:`Connection` drives the decoders of :mod:`tvix.nix_daemon.wire`
over an asyncio stream pair. The data an operation receives after its
arguments comes as one of three kinds of :class:`Source`, by protocol version:
a :class:`FramedSource` (frames in the connection, 1.23+), a
:class:`PullSource` (the daemon asks for each piece with ``STDERR_READ``,
1.21-1.22), or the raw connection (a NAR the client just sends).
:func:`read_nar_exactly` parses a NAR out of any of them without reading a
byte past its end, so whatever follows it (the next NAR of
AddMultipleToStore, the next operation) stays in place.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from typing import Protocol, TypeVar

from tvix.nix_daemon import wire
from tvix.nix_daemon.errors import WireError
from tvix.nixcompat.nar import NarEvent, NarParser

__all__ = [
    "Connection",
    "Disconnected",
    "FramedSource",
    "PullSource",
    "Source",
    "read_nar_exactly",
]

T = TypeVar("T")

# Bytes asked of a source at a time while parsing a NAR.
_CHUNK = 256 << 10
# Buffered replies are sent once they reach this size.
_FLUSH_AT = 256 << 10


class Disconnected(WireError):
    """The client closed the connection (possibly in the middle of a message)."""


class Source(Protocol):
    """Bytes an operation receives after its arguments."""

    async def read(self, n: int) -> bytes:
        """Up to ``n`` (> 0) bytes; ``b""`` only at the end of the source."""
        ...

    def unread(self, data: bytes) -> None:
        """Put ``data`` back: the next :meth:`read` returns it first."""
        ...


class Connection:
    """One client's socket: decoders on the way in, buffered bytes on the way out."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._reader = reader
        self._writer = writer
        self._pushback = b""
        self._out: list[bytes] = []
        self._out_len = 0
        #: Bytes received and sent so far.
        self.received = 0
        self.sent = 0

    async def read_exactly(self, n: int) -> bytes:
        """Exactly ``n`` bytes; :class:`Disconnected` if the client hangs up first."""
        if self._pushback:
            data, self._pushback = self._pushback[:n], self._pushback[n:]
            if len(data) < n:
                data += await self.read_exactly(n - len(data))
            return data
        try:
            data = await self._reader.readexactly(n)
        except asyncio.IncompleteReadError as e:
            raise Disconnected(
                f"client disconnected ({len(e.partial)} of {n} bytes received)"
            ) from None
        except ConnectionError as e:
            raise Disconnected(f"client connection failed: {e}") from None
        self.received += n
        return data

    async def read(self, n: int) -> bytes:
        """Up to ``n`` bytes, at least one; ``b""`` at the end of the connection."""
        if self._pushback:
            data, self._pushback = self._pushback[:n], self._pushback[n:]
            return data
        try:
            data = await self._reader.read(n)
        except ConnectionError as e:
            raise Disconnected(f"client connection failed: {e}") from None
        self.received += len(data)
        return data

    def unread(self, data: bytes) -> None:
        """Put ``data`` back in front of the unread input."""
        self._pushback = data + self._pushback

    async def decode(self, decoder: wire.Decoder[T]) -> T:
        """Run ``decoder`` on the incoming bytes."""
        try:
            need = next(decoder)
            while True:
                need = decoder.send(await self.read_exactly(need))
        except StopIteration as stop:
            value: T = stop.value
            return value

    async def at_eof(self) -> bool:
        """Whether the client closed its side (waits for its next byte)."""
        data = await self.read(1)
        if data:
            self.unread(data)
            return False
        return True

    def write(self, data: bytes) -> None:
        """Queue ``data``; :meth:`flush` sends it."""
        self._out.append(data)
        self._out_len += len(data)

    async def flush(self) -> None:
        """Send what is queued and wait until the socket takes more (back-pressure)."""
        if self._out:
            data = b"".join(self._out)
            self._out.clear()
            self._out_len = 0
            self._writer.write(data)
            self.sent += len(data)
        try:
            await self._writer.drain()
        except ConnectionError as e:
            raise Disconnected(f"client connection failed: {e}") from None

    async def send(self, data: bytes) -> None:
        """Queue ``data`` and flush when enough is queued."""
        self.write(data)
        if self._out_len >= _FLUSH_AT:
            await self.flush()


class FramedSource:
    """The data of a framed source: chunks with a u64 length, ended by an empty one."""

    def __init__(self, conn: Connection, limit: int = wire.MAX_FRAME) -> None:
        self._conn = conn
        self._limit = limit
        self._remaining = 0
        self._pushback = b""
        self.ended = False
        #: Bytes of payload received so far.
        self.received = 0

    async def read(self, n: int) -> bytes:
        """Up to ``n`` bytes of the current frame (reading the next header if need be)."""
        if self._pushback:
            data, self._pushback = self._pushback[:n], self._pushback[n:]
            return data
        while not self._remaining:
            if self.ended:
                return b""
            self._remaining = await self._conn.decode(wire.read_frame_length(self._limit))
            if not self._remaining:
                self.ended = True
                return b""
        data = await self._conn.read(min(n, self._remaining))
        if not data:
            raise Disconnected("client disconnected in the middle of a frame")
        self._remaining -= len(data)
        self.received += len(data)
        return data

    def unread(self, data: bytes) -> None:
        """Put ``data`` back in front of the unread frames."""
        self._pushback = data + self._pushback

    async def drain(self) -> None:
        """Read and drop the rest of the source, so the next operation starts in step."""
        self._pushback = b""
        while await self.read(_CHUNK):
            pass

    async def expect_end(self, what: str) -> None:
        """Raise :class:`WireError` if anything but the end of the source follows."""
        if await self.read(1):
            raise WireError(f"unexpected data after {what}")


class PullSource:
    """Data the daemon pulls from the client with ``STDERR_READ`` (protocol 1.21-1.22)."""

    def __init__(self, conn: Connection) -> None:
        self._conn = conn
        self._pushback = b""

    async def read(self, n: int) -> bytes:
        """Up to ``n`` bytes, asked of the client with ``STDERR_READ``."""
        if self._pushback:
            data, self._pushback = self._pushback[:n], self._pushback[n:]
            return data
        self._conn.write(wire.read_message(n))
        await self._conn.flush()
        data = await self._conn.decode(wire.read_bytes(n))
        if not data:
            raise WireError("client sent no data when asked for it")
        return data

    def unread(self, data: bytes) -> None:
        """Put ``data`` back: the next read returns it without asking the client."""
        self._pushback = data + self._pushback


async def read_nar_exactly(
    source: Source, on_data: Callable[[bytes], None] | None = None
) -> AsyncIterator[NarEvent]:
    """The events of the NAR at the start of ``source``; what follows it stays unread.

    ``on_data`` is called with the NAR's bytes, in order, exactly (for its
    size and hashes). Raises :class:`~tvix.nixcompat.errors.NARError` for
    an invalid or truncated NAR.
    """
    parser = NarParser()
    next_event = parser.next_event
    fed = 0
    # The last piece read; it may end with bytes after the NAR, so it is
    # passed to on_data only once the next piece is read or the NAR ends.
    last = b""
    while True:
        if parser.done:
            extra = fed - parser.offset
            if extra:
                source.unread(last[len(last) - extra :])
            if on_data is not None and len(last) > extra:
                on_data(last[: len(last) - extra])
            return
        event = next_event()
        if event is not None:
            yield event
            continue
        wanted = parser.contents_wanted
        data = await source.read(min(wanted, _CHUNK) if wanted else _CHUNK)
        if not data:
            parser.feed_eof()
            continue
        fed += len(data)
        if on_data is not None and last:
            on_data(last)
        last = data
        if wanted:
            yield parser.contents_read(data)
        else:
            parser.feed(data)
