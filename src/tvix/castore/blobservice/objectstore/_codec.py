"""The object layout's codec: keys, zstd framing of chunks, and decoding chunks and records.

Every chunk object is a zstd frame: compressed, or (``zstd=false``) a frame
of raw blocks, which any zstd decoder reads at memcpy speed.
"""

from __future__ import annotations

from dataclasses import dataclass

import blake3
import obstore
import zstandard
from google.protobuf.message import DecodeError

from tvix.castore.blobservice._zstd import decompressor
from tvix.castore.blobservice.base import ChunkMeta
from tvix.castore.digest import B3Digest
from tvix.castore.errors import IntegrityError, ValidationError
from tvix.castore.proto import pb

__all__ = [
    "KIB",
    "MAX_CHUNK_SIZE",
    "MIB",
    "Chunking",
    "decode_chunk",
    "decode_record",
    "digest_key",
    "raw_zstd_frame",
]

KIB = 1024
MIB = 1024 * KIB

# No chunk object may decompress to more than this (a bomb guard for chunks
# opened by digest, whose size no record states).
MAX_CHUNK_SIZE = 64 * MIB

# A zstd block holds at most 128 KiB.
_ZSTD_BLOCK = 128 * KIB
_ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"
# Frame header: single segment (no window descriptor), 4-byte content size.
_ZSTD_RAW_HEADER = _ZSTD_MAGIC + b"\xa0"


def raw_zstd_frame(data: bytes | memoryview) -> bytes:
    """``data`` as a zstd frame of uncompressed blocks.

    No CPU spent compressing, yet every chunk object stays a zstd frame any
    decoder reads.
    """
    size = len(data)
    parts = [_ZSTD_RAW_HEADER, size.to_bytes(4, "little")]
    if size == 0:
        parts.append(b"\x01\x00\x00")  # last block, raw, empty
    for start in range(0, size, _ZSTD_BLOCK):
        block = data[start : start + _ZSTD_BLOCK]
        last = start + _ZSTD_BLOCK >= size
        # Block header: bit 0 last block, bits 1-2 type (0 = raw), bits 3.. size.
        parts.append(((len(block) << 3) | last).to_bytes(3, "little"))
        parts.append(bytes(block))
    return b"".join(parts)


_EMPTY_DIGEST = blake3.blake3(b"").digest()


def digest_key(kind: str, prefix: str, digest: bytes) -> str:
    h = digest.hex()
    return f"{prefix}{kind}/b3/{h[:4]}/{h}"


@dataclass(frozen=True, slots=True)
class Chunking:
    """Sizes FastCDC cuts at."""

    min_size: int
    avg_size: int
    max_size: int

    @classmethod
    def around(cls, avg: int) -> Chunking:
        return cls(avg // 2, avg, avg * 2)


def decode_chunk(raw: obstore.Bytes | bytes, digest: B3Digest, size: int | None) -> bytes:
    """Decompress and verify one chunk object; runs in a worker thread for big ones."""
    limit = MAX_CHUNK_SIZE if size is None else size
    try:
        frame = memoryview(raw)
        declared = zstandard.frame_content_size(frame)
        if declared > limit:
            raise IntegrityError(
                f"chunk {digest.hex()}: object declares {declared} bytes, expected at most {limit}"
            )
        data = decompressor().decompress(frame, max_output_size=limit)
    except zstandard.ZstdError as e:
        raise IntegrityError(f"chunk {digest.hex()}: not a valid zstd frame: {e}") from None
    got = blake3.blake3(data).digest()
    if got != digest:
        raise IntegrityError(f"chunk {digest.hex()}: stored bytes hash to {got.hex()}")
    if size is not None and len(data) != size:
        # Only a record can be wrong here: the bytes match their digest.
        raise IntegrityError(
            f"chunk {digest.hex()} has {len(data)} bytes, its blob's record says {size}"
        )
    return data


def decode_record(raw: bytes, digest: B3Digest) -> list[ChunkMeta]:
    try:
        msg = pb.StatBlobResponse.FromString(raw)
        chunks = [ChunkMeta(B3Digest(c.digest), c.size) for c in msg.chunks]
    except (DecodeError, ValidationError) as e:
        raise IntegrityError(f"blob {digest.hex()}: damaged blob record: {e}") from None
    # We never write a record without chunks (the empty blob is an empty
    # chunk; upstream writes an empty record for it); any other empty record
    # is a truncated object that would read as b"".
    if (not chunks and digest != _EMPTY_DIGEST) or any(
        c.size <= 0 or c.size > MAX_CHUNK_SIZE for c in chunks
    ):
        raise IntegrityError(f"blob {digest.hex()}: damaged blob record (bad chunk list)")
    return chunks
