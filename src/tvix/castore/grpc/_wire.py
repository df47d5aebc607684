"""Hand-written (de)serializers for the messages that carry bulk data.

``BlobChunk`` is one length-delimited ``bytes`` field, so its encoding is a
tag byte, a varint and the data. Building a protobuf message and serializing
it copies the payload twice; :func:`encode_blob_chunk` copies it once, and
:func:`decode_blob_chunk` hands out a view into the received message instead
of a copy. Directories are sent and received as their encoded bytes: the
model encodes itself canonically (far cheaper than building messages) and
:func:`~tvix.castore.proto.directory_from_bytes` validates what arrives, so the
servicer and client see malformed input as a :class:`ValidationError` rather
than as a deserializer failure grpc would report without a useful message.
"""

from __future__ import annotations

from google.protobuf.message import DecodeError

from tvix.castore._protowire import encode_varint
from tvix.castore.proto import pb

__all__ = [
    "MAX_MESSAGE_SIZE",
    "MESSAGE_SIZE",
    "decode_blob_chunk",
    "encode_blob_chunk",
    "encode_blob_chunk_parts",
    "identity",
]

# Bytes of blob data per BlobChunk, sent by the client's writers and by the
# server's Read: 512 KiB messages cost a third of the client CPU of 1 MiB ones,
# and stay far below any peer's default 4 MiB receive limit (measurements:
# bench/NOTES.md).
MESSAGE_SIZE = 512 << 10

# The largest message either side accepts, clients and servers alike: far
# above grpc's default of 4 MiB, because one Directory is one message and a
# directory of 100,000 entries encodes to about 6 MiB.
MAX_MESSAGE_SIZE = 64 << 20

_TAG_DATA = b"\x0a"  # field 1, wire type 2 (length-delimited)


def encode_blob_chunk(data: bytes | bytearray | memoryview) -> bytes:
    """The encoding of ``BlobChunk(data=data)``: exactly what protobuf would produce."""
    if not len(data):
        return b""  # proto3 leaves a default (empty) field out
    return b"".join((_TAG_DATA, encode_varint(len(data)), data))


def encode_blob_chunk_parts(parts: list[bytes], size: int) -> bytes:
    """The encoding of ``BlobChunk(data=b"".join(parts))``; ``size`` is their total length.

    One copy of the pieces, where joining them and then prefixing the header
    would copy twice.
    """
    if not size:
        return b""
    return b"".join([_TAG_DATA, encode_varint(size), *parts])


def decode_blob_chunk(raw: bytes) -> memoryview | None:
    """The ``data`` of an encoded ``BlobChunk``, as a view into ``raw``.

    ``None`` if ``raw`` is not a valid encoding.

    The fast path takes a message that is exactly one ``data`` field (what
    every sender produces); anything else (unknown fields, a repeated field,
    which protobuf resolves as last-one-wins) goes through the real parser, so
    the result is always what protobuf would decode. Invalid input gives
    ``None`` rather than an exception because grpc.aio swallows a
    deserializer's exception (it logs it and hands on ``None`` anyway); the
    caller turns ``None`` into the error it stands for.
    """
    if raw[:1] == _TAG_DATA:
        n = shift = 0
        pos = 1
        while pos < len(raw) and pos <= 10:
            b = raw[pos]
            pos += 1
            n |= (b & 0x7F) << shift
            shift += 7
            if not b & 0x80:
                if pos + n == len(raw):
                    return memoryview(raw)[pos:]
                break
    if not raw:
        return memoryview(b"")
    try:
        return memoryview(pb.BlobChunk.FromString(raw).data)
    except DecodeError:
        return None


def identity(raw: bytes) -> bytes:
    """Pass encoded bytes through unchanged (for Directories, see the module docstring)."""
    return raw
