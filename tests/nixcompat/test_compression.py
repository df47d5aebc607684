"""The bounded streaming decompressor shared by the nix+http backend and nar-bridge."""

from __future__ import annotations

import bz2
import concurrent.futures
import gzip
import lzma
import os
from collections.abc import AsyncIterator, Callable

import pytest
import zstandard

from tvix.nixcompat.compression import (
    MAX_STEP_OUTPUT,
    CompressionError,
    DecompressingReader,
    decompressor,
)

COMPRESS: dict[str, Callable[[bytes], bytes]] = {
    "none": lambda b: b,
    "xz": lzma.compress,
    "bzip2": bz2.compress,
    "gzip": gzip.compress,
    "zstd": lambda b: zstandard.ZstdCompressor().compress(b),
}


async def _chunks(data: bytes, size: int = 4096) -> AsyncIterator[bytes]:
    for i in range(0, len(data), size):
        yield data[i : i + size]


@pytest.mark.parametrize("method", sorted(COMPRESS))
@pytest.mark.parametrize("threaded", [False, True])
async def test_round_trip_bounded(method: str, threaded: bool) -> None:
    data = os.urandom(100_000) + bytes(5 * MAX_STEP_OUTPUT)
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        reader = DecompressingReader(
            _chunks(COMPRESS[method](data)), method, executor=pool if threaded else None
        )
        out = []
        while piece := await reader.read(1 << 16):
            assert len(piece) <= 1 << 16
            out.append(piece)
    assert b"".join(out) == data


@pytest.mark.parametrize("method", ["xz", "bzip2", "gzip"])
def test_each_step_is_bounded(method: str) -> None:
    # A few KiB of compressed zeros expand to 50 MiB; no step yields more than the cap.
    steps = list(decompressor(method).feed(COMPRESS[method](bytes(50 << 20))))
    assert sum(len(s) for s in steps) == 50 << 20
    assert max(len(s) for s in steps) <= MAX_STEP_OUTPUT


async def _read_all(reader: DecompressingReader) -> None:
    while await reader.read(1 << 16):
        pass


# zstd is left out: without a frame checksum (Nix writes none) its decoder
# cannot tell a cut or damaged stream from a good one; the NAR hash, which
# every caller checks, does.
@pytest.mark.parametrize("method", ["xz", "bzip2", "gzip"])
async def test_truncated(method: str) -> None:
    whole = COMPRESS[method](os.urandom(10_000))
    reader = DecompressingReader(_chunks(whole[: len(whole) // 2]), method)
    with pytest.raises(CompressionError, match=f"corrupt {method} data: the stream ends early"):
        await _read_all(reader)


@pytest.mark.parametrize("method", ["xz", "bzip2", "gzip"])
async def test_corrupt(method: str) -> None:
    whole = COMPRESS[method](os.urandom(10_000))
    damaged = whole[:16] + bytes(len(whole) - 32) + whole[-16:]
    reader = DecompressingReader(_chunks(damaged), method)
    with pytest.raises(CompressionError, match=f"corrupt {method} data"):
        await _read_all(reader)


def test_unsupported_method() -> None:
    with pytest.raises(CompressionError, match="'br' is not supported"):
        decompressor("br")
