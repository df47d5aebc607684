"""Protobuf wire format pieces written by hand where building messages costs too much.

Used by the Directory model's canonical encoding and by the gRPC layer's
``BlobChunk`` (de)serializers.
"""

from __future__ import annotations

__all__ = ["encode_varint"]

_SMALL = [bytes([i]) for i in range(0x80)]


def encode_varint(n: int) -> bytes:
    """``n`` (non-negative) as a protobuf varint."""
    if n < 0x80:
        return _SMALL[n]
    out = bytearray()
    while n >= 0x80:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)
