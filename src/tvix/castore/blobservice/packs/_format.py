"""The pack format: entries appended to a pack, and reading them back verified.

A pack is ``MAGIC`` followed by entries, each a fixed header and a payload::

    digest (32 bytes, blake3 of the chunk) | size (u32 LE, bytes of the chunk)
    | length (u32 LE, bytes of the payload) | codec (u8: 0 raw, 1 zstd) | 3 zero bytes
    payload

The payload is the chunk compressed with zstd when that saves at least a
sixteenth, else the chunk itself (read at memcpy speed). Headers make a
pack self-describing: ``verify`` checks every index row against the header
it points behind, and a lost index could be rebuilt by scanning packs.
An index row locates the payload (:class:`Location`); its header sits
:data:`HEADER_SIZE` bytes before it.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from dataclasses import dataclass
from typing import NamedTuple

import blake3
import zstandard

from tvix.castore.blobservice._zstd import compressor, decompressor
from tvix.castore.errors import IntegrityError

__all__ = [
    "CODEC_RAW",
    "CODEC_ZSTD",
    "HEADER",
    "HEADER_SIZE",
    "MAGIC",
    "Location",
    "Run",
    "coalesce",
    "decode",
    "encode",
]

MAGIC = b"TVIXPCK1"
HEADER = struct.Struct("<32sIIB3x")
HEADER_SIZE = HEADER.size
CODEC_RAW = 0
CODEC_ZSTD = 1
# Chunks smaller than this are stored raw: a zstd frame's overhead eats the gain.
_MIN_COMPRESS = 64

# Neighbouring payloads closer than this are read with one call (reading the
# gap costs less than another syscall or request); no single read is longer
# than MAX_RUN, which bounds memory per read job.
GAP = 64 * 1024
MAX_RUN = 8 * 1024 * 1024


class Location(NamedTuple):
    """Where a chunk's payload is: pack, offset and length, plus its size and codec.

    A named tuple: hundreds of thousands are made per NAR render, and a frozen
    dataclass costs several times more to build.
    """

    pack: str
    offset: int
    length: int
    size: int
    codec: int


def encode(digest: bytes, data: bytes | memoryview, zstd: bool) -> tuple[bytes, bytes, int]:
    """(header, payload, codec) of an entry holding ``data``; zstd only when it pays."""
    size = len(data)
    payload: bytes | memoryview = data
    codec = CODEC_RAW
    if zstd and size >= _MIN_COMPRESS:
        packed = compressor().compress(data)
        if len(packed) <= size - size // 16:
            payload, codec = packed, CODEC_ZSTD
    out = bytes(payload)
    return HEADER.pack(digest, size, len(out), codec), out, codec


def decode(payload: bytes | memoryview, digest: bytes, size: int, codec: int) -> bytes | memoryview:
    """The chunk a payload holds, verified against ``digest`` and ``size``.

    A raw payload comes back as it was given (a view into the read buffer,
    not copied: callers copy once, into what they hand out).
    """
    data: bytes | memoryview
    try:
        if codec == CODEC_ZSTD:
            data = decompressor().decompress(payload, max_output_size=size)
        elif codec == CODEC_RAW:
            data = payload
        else:
            raise IntegrityError(f"chunk {digest.hex()}: unknown codec {codec}")
    except zstandard.ZstdError as e:
        raise IntegrityError(f"chunk {digest.hex()}: damaged zstd payload: {e}") from None
    if len(data) != size:
        raise IntegrityError(f"chunk {digest.hex()}: {len(data)} bytes stored, expected {size}")
    got = blake3.blake3(data).digest()
    if got != digest:
        raise IntegrityError(f"chunk {digest.hex()}: stored bytes hash to {got.hex()}")
    return data


@dataclass(frozen=True, slots=True)
class Run:
    """One read of ``[start, end)`` of ``pack``, covering the payloads of ``members``.

    ``members`` are indices into the list given to :func:`coalesce`.
    """

    pack: str
    start: int
    end: int
    members: list[int]


def coalesce(
    locations: Sequence[Location], *, headers: bool = False, gap: int = GAP, max_run: int = MAX_RUN
) -> list[Run]:
    """Group payloads into as few reads as possible.

    Neighbours in one pack whose gap is below ``gap`` are read together, each
    read at most ``max_run`` long (unless a single payload is longer). With
    ``headers``, each read also covers the entry headers (for ``verify``).
    """
    before = HEADER_SIZE if headers else 0
    order = sorted(range(len(locations)), key=lambda i: (locations[i].pack, locations[i].offset))
    runs: list[Run] = []
    cur: Run | None = None
    for i in order:
        loc = locations[i]
        start, end = loc.offset - before, loc.offset + loc.length
        if (
            cur is not None
            and cur.pack == loc.pack
            and start - cur.end <= gap
            and max(end, cur.end) - cur.start <= max_run
        ):
            cur.members.append(i)
            if end > cur.end:
                cur = Run(cur.pack, cur.start, end, cur.members)
                runs[-1] = cur
            continue
        cur = Run(loc.pack, start, end, [i])
        runs.append(cur)
    return runs
