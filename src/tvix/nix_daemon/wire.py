"""The worker protocol's wire format, without I/O.

Everything Nix sends over the daemon socket is built from two primitives:
a u64 in little-endian order, and a byte string (its length as a u64, the
bytes, zero padding to a multiple of 8). Lists are a count and their items;
booleans and enums are u64s. Large payloads (NARs in AddToStoreNar,
AddMultipleToStore, AddToStore since protocol 1.23/1.25) travel as a
*framed source*: chunks, each a u64 length and that many bytes (no
padding), ended by a zero length.

Encoders here are plain functions returning bytes. Decoders are
generators: each yields how many bytes it needs next and is sent
exactly those bytes; its return value is the decoded item. They compose
with ``yield from``, are driven by whatever does the I/O
(:meth:`tvix.nix_daemon.stream.Connection.decode`), and can be tested by
feeding bytes by hand (:func:`decode`). Every length is checked against a
limit before anything is allocated, so a hostile peer cannot make the
daemon reserve memory for a 2⁶⁴-byte string.

The replies to an operation start with *stderr messages*: log lines
(``STDERR_NEXT``), activities, data requests (``STDERR_READ``), and end
with ``STDERR_LAST`` (success, the result follows) or ``STDERR_ERROR`` (the
error, in the format the client's protocol version expects).
"""

from __future__ import annotations

import struct
from collections.abc import Generator, Iterable
from typing import TypeAlias, TypeVar

from tvix.nix_daemon.errors import WireError

__all__ = [
    "MAX_FRAME",
    "MAX_LIST",
    "MAX_STRING",
    "PROTOCOL_VERSION",
    "STDERR_ERROR",
    "STDERR_LAST",
    "STDERR_NEXT",
    "STDERR_READ",
    "STDERR_START_ACTIVITY",
    "STDERR_STOP_ACTIVITY",
    "WORKER_MAGIC_1",
    "WORKER_MAGIC_2",
    "Decoder",
    "decode",
    "enc_bool",
    "enc_bytes",
    "enc_string",
    "enc_strings",
    "enc_u64",
    "error_message",
    "minor",
    "next_message",
    "read_bool",
    "read_bytes",
    "read_frame_length",
    "read_message",
    "read_string",
    "read_strings",
    "read_u64",
    "start_activity",
    "stop_activity",
]

#: What a client says first, and what the daemon answers.
WORKER_MAGIC_1 = 0x6E697863
WORKER_MAGIC_2 = 0x6478696F
#: The newest protocol this daemon speaks: 1.35 (Nix 2.15 to 2.18; 2.8 speaks 1.34).
#: A connection uses the lower of this and the client's version.
PROTOCOL_VERSION = 1 << 8 | 35

STDERR_NEXT = 0x6F6C6D67
STDERR_READ = 0x64617461
STDERR_WRITE = 0x64617416
STDERR_LAST = 0x616C7473
STDERR_ERROR = 0x63787470
STDERR_START_ACTIVITY = 0x53545254
STDERR_STOP_ACTIVITY = 0x53544F50
STDERR_RESULT = 0x52534C54

#: Limits on what a peer may announce. A store path is < 300 bytes, a
#: signature ~100, an AddTextToStore text (a .drv) rarely more than a few MiB.
MAX_STRING = 64 << 20
MAX_LIST = 1 << 20
#: Nix sends frames of its 32 KiB buffer size; anything beyond this is hostile.
MAX_FRAME = 16 << 20

_U64 = struct.Struct("<Q")
_ZEROS = bytes(8)

T = TypeVar("T")
#: A decoder: yields the number of bytes it needs, is sent exactly those, returns T.
Decoder: TypeAlias = Generator[int, bytes, T]


def minor(version: int) -> int:
    """The minor part of a protocol version (``1.34`` → 34)."""
    return version & 0xFF


# -- encoding --


def enc_u64(n: int) -> bytes:
    """``n`` as a little-endian u64."""
    return _U64.pack(n)


def enc_bool(b: bool) -> bytes:
    """``b`` as a u64 0 or 1."""
    return _U64.pack(1 if b else 0)


def enc_bytes(data: bytes) -> bytes:
    """A byte string: its length, the bytes, zero padding to a multiple of 8."""
    return _U64.pack(len(data)) + data + _ZEROS[: -len(data) & 7]


def enc_string(text: str) -> bytes:
    """A text string, UTF-8 encoded (store paths, messages)."""
    return enc_bytes(text.encode("utf-8", "surrogateescape"))


def enc_strings(items: Iterable[str]) -> bytes:
    """A list of strings: the count, then each string."""
    parts = [enc_string(s) for s in items]
    return _U64.pack(len(parts)) + b"".join(parts)


# -- decoding --


def read_u64() -> Decoder[int]:
    """A u64."""
    data = yield 8
    value: int = _U64.unpack(data)[0]
    return value


def read_bool() -> Decoder[bool]:
    """A u64 read as a boolean (any non-zero value is true, as Nix reads it)."""
    return (yield from read_u64()) != 0


def read_bytes(limit: int = MAX_STRING) -> Decoder[bytes]:
    """A byte string of at most ``limit`` bytes; its padding must be zeros."""
    n = yield from read_u64()
    if n > limit:
        raise WireError(f"string of {n} bytes is longer than the limit of {limit}")
    padded = n + (-n & 7)
    if not padded:
        return b""
    data = yield padded
    if data[n:] != _ZEROS[: padded - n]:
        raise WireError("non-zero padding after a string")
    return data[:n]


def read_string(limit: int = MAX_STRING) -> Decoder[str]:
    """A UTF-8 text string of at most ``limit`` bytes."""
    data = yield from read_bytes(limit)
    try:
        return data.decode()
    except UnicodeDecodeError:
        raise WireError(f"string {data[:80]!r} is not UTF-8") from None


def read_strings(limit: int = MAX_LIST, item_limit: int = MAX_STRING) -> Decoder[list[str]]:
    """A list of at most ``limit`` strings."""
    n = yield from read_u64()
    if n > limit:
        raise WireError(f"list of {n} items is longer than the limit of {limit}")
    items = []
    for _ in range(n):
        items.append((yield from read_string(item_limit)))
    return items


def read_frame_length(limit: int = MAX_FRAME) -> Decoder[int]:
    """The length of the next frame of a framed source (0: the source ended)."""
    n = yield from read_u64()
    if n > limit:
        raise WireError(f"frame of {n} bytes is larger than the limit of {limit}")
    return n


def decode(decoder: Decoder[T], data: bytes) -> tuple[T, bytes]:
    """Run ``decoder`` over ``data``; the result and the bytes it left.

    Raises :class:`WireError` if ``data`` ends before the decoder is done.
    """
    pos = 0
    try:
        need = next(decoder)
        while True:
            if len(data) - pos < need:
                raise WireError(f"truncated: {need} more bytes needed, {len(data) - pos} left")
            chunk = data[pos : pos + need]
            pos += need
            need = decoder.send(chunk)
    except StopIteration as stop:
        return stop.value, data[pos:]


# -- stderr messages --


def next_message(text: str) -> bytes:
    """A log line the client prints (``STDERR_NEXT``)."""
    return enc_u64(STDERR_NEXT) + enc_string(text if text.endswith("\n") else text + "\n")


def read_message(n: int) -> bytes:
    """Ask the client for up to ``n`` bytes of its data (``STDERR_READ``, protocol < 1.23)."""
    return enc_u64(STDERR_READ) + enc_u64(n)


def start_activity(
    act: int, level: int, type_: int, text: str, fields: Iterable[int | str] = (), parent: int = 0
) -> bytes:
    """``STDERR_START_ACTIVITY`` (protocol ≥ 1.20): what the client shows as progress."""
    out = [enc_u64(STDERR_START_ACTIVITY), enc_u64(act), enc_u64(level), enc_u64(type_)]
    out.append(enc_string(text))
    items = list(fields)
    out.append(enc_u64(len(items)))
    for f in items:
        if isinstance(f, int):
            out.append(enc_u64(0) + enc_u64(f))
        else:
            out.append(enc_u64(1) + enc_string(f))
    out.append(enc_u64(parent))
    return b"".join(out)


def stop_activity(act: int) -> bytes:
    """``STDERR_STOP_ACTIVITY``."""
    return enc_u64(STDERR_STOP_ACTIVITY) + enc_u64(act)


#: Nix's verbosity of an error (``lvlError``).
_LVL_ERROR = 0


def error_message(text: str, client_version: int, status: int = 1) -> bytes:
    """``STDERR_ERROR`` carrying ``text``, as the client's version reads it.

    Since 1.26 an error is structured (type, level, name, message, position,
    traces); before, it is the message and an exit status.
    """
    if minor(client_version) >= 26:
        return b"".join(
            (
                enc_u64(STDERR_ERROR),
                enc_string("Error"),
                enc_u64(_LVL_ERROR),
                enc_string("Error"),  # the name field, unused since 2.4
                enc_string(text),
                enc_u64(0),  # no position
                enc_u64(0),  # no traces
            )
        )
    return enc_u64(STDERR_ERROR) + enc_string(text) + enc_u64(status)
