"""FastCDC parameters for the object-store blob service: throughput and dedup.

Prints, per (min, avg, max) setting: chunking throughput, the mean chunk size,
and how much of a modified copy of a file is found in the chunks of the
original (the dedup the chunk size buys). The data is real binaries from
/usr/lib (falls back to pseudo-random bytes), modified in two ways:

* ``edits``: 64 small random insertions/deletions/replacements;
* ``refs``: a Nix-like store path (``/nix/store/<32 chars>-name``) planted
  every 4-64 KiB, and in the copy a fifth of them point to a new hash, as
  when one dependency of a package changes.

Then the object-store blob service on local files end to end: put and
sequential read of a 256 MiB blob (``TVIX_BENCH_BLOB_MIB``), for zstd on and
off and three average chunk sizes, on random bytes and on real binaries
(padded with random bytes if /usr/lib holds less), best of two runs.

Usage: ``python -m bench chunking``; ``TVIX_BENCH_CHUNK_MIB`` sets the size
of the chunking sample (default 64).
"""

from __future__ import annotations

import asyncio
import glob
import os
import random
import shutil
import tempfile
import time
from pathlib import Path

from pyfastcdc.cy import FastCDC

from bench.common import table
from tvix.castore.blobservice import from_url
from tvix.castore.testing.fixtures import b3, big_blob

KIB = 1024
SETTINGS = [
    (16 * KIB, 64 * KIB, 256 * KIB),
    (32 * KIB, 128 * KIB, 512 * KIB),
    (64 * KIB, 256 * KIB, 1024 * KIB),
    (128 * KIB, 256 * KIB, 512 * KIB),  # upstream tvix
    (256 * KIB, 512 * KIB, 1024 * KIB),
    (512 * KIB, 1024 * KIB, 2048 * KIB),
]


def real_bytes(limit: int) -> bytes:
    """Distinct shared libraries (Mesa installs one driver under many names: skipped)."""
    out = bytearray()
    seen: set[bytes] = set()
    for path in sorted(glob.glob("/usr/lib/x86_64-linux-gnu/**/*.so*", recursive=True)):
        if os.path.isfile(path) and not os.path.islink(path):
            with open(path, "rb") as f:
                content = f.read()
            if (h := b3(content)) not in seen:
                seen.add(h)
                out += content
        if len(out) >= limit:
            return bytes(out[:limit])
    return bytes(out) + big_blob(limit - len(out), seed=1)


def with_edits(data: bytes, n: int, rnd: random.Random) -> bytes:
    out = bytearray(data)
    for _ in range(n):
        pos = rnd.randrange(len(out))
        kind = rnd.randrange(3)
        if kind == 0:
            out[pos:pos] = rnd.randbytes(rnd.randrange(1, 64))
        elif kind == 1:
            del out[pos : pos + rnd.randrange(1, 64)]
        else:
            out[pos : pos + 8] = rnd.randbytes(8)
    return bytes(out)


def with_refs(data: bytes, rnd: random.Random) -> tuple[bytes, bytes]:
    alphabet = b"0123456789abcdfghijklmnpqrsvwxyz"
    old, new = bytearray(), bytearray()
    pos = 0
    while pos < len(data):
        step = rnd.randrange(4 * KIB, 64 * KIB)
        piece = data[pos : pos + step]
        h = bytes(rnd.choice(alphabet) for _ in range(32))
        changed = bytes(rnd.choice(alphabet) for _ in range(32)) if rnd.random() < 0.2 else h
        old += piece + b"/nix/store/" + h + b"-dep"
        new += piece + b"/nix/store/" + changed + b"-dep"
        pos += step
    return bytes(old), bytes(new)


def chunk_set(cdc: FastCDC, data: bytes) -> dict[bytes, int]:
    return {bytes(c.data): c.length for c in cdc.cut_buf(data)}


def shared_fraction(cdc: FastCDC, a: bytes, b: bytes) -> float:
    known = set(chunk_set(cdc, a))
    reused = sum(c.length for c in cdc.cut_buf(b) if bytes(c.data) in known)
    return reused / len(b)


def main() -> None:
    mib = int(os.environ.get("TVIX_BENCH_CHUNK_MIB", "64"))
    data = real_bytes(mib << 20)
    rnd = random.Random(42)
    edited = with_edits(data, 64, rnd)
    refs_old, refs_new = with_refs(data, rnd)
    print(f"{mib} MiB of /usr/lib binaries")
    print(
        f"{'min/avg/max KiB':>18} {'MB/s':>7} {'chunks':>7} {'mean KiB':>9}"
        f" {'dedup edits':>12} {'dedup refs':>11}"
    )
    for lo, avg, hi in SETTINGS:
        cdc = FastCDC(avg_size=avg, min_size=lo, max_size=hi, normalized_chunking=1)
        best = float("inf")
        for _ in range(3):
            t = time.perf_counter()
            n = sum(1 for _ in cdc.cut_buf(data))
            best = min(best, time.perf_counter() - t)
        print(
            f"{f'{lo // KIB}/{avg // KIB}/{hi // KIB}':>18} {len(data) / best / 1e6:7.0f}"
            f" {n:7d} {len(data) / n / KIB:9.0f}"
            f" {shared_fraction(cdc, data, edited):12.1%}"
            f" {shared_fraction(cdc, refs_old, refs_new):11.1%}"
        )
    bench_service()


async def _put_read(url: str, data: bytes) -> tuple[float, float, int]:
    svc = from_url(url)
    try:
        start = time.perf_counter()
        async with svc.open_write() as writer:
            for i in range(0, len(data), 1 << 20):
                await writer.write(data[i : i + (1 << 20)])
        digest = await writer.close()
        put = time.perf_counter() - start
        start = time.perf_counter()
        reader = await svc.open_read(digest)
        assert reader is not None
        n = 0
        async with reader:
            while part := await reader.read(1 << 20):
                n += len(part)
        read = time.perf_counter() - start
        assert n == len(data)
        chunks = await svc.chunks(digest)
        return put, read, len(chunks or [])
    finally:
        await svc.close()


def bench_service() -> None:
    mib = int(os.environ.get("TVIX_BENCH_BLOB_MIB", "256"))
    samples = {"random": big_blob(mib << 20, seed=7), "binaries": real_bytes(mib << 20)}
    rows = []
    for kind, data in samples.items():
        for avg in (128 * KIB, 256 * KIB, 512 * KIB):
            for zstd in ("true", "false"):
                best_put = best_read = float("inf")
                stored = 0
                for _ in range(2):
                    tmp = Path(tempfile.mkdtemp(prefix="tvix-bench-os-"))
                    try:
                        url = f"objectstore+file://{tmp}?zstd={zstd}&avg_chunk_size={avg}"
                        put, read, n = asyncio.run(_put_read(url, data))
                        stored = sum(p.stat().st_size for p in tmp.rglob("*") if p.is_file())
                    finally:
                        shutil.rmtree(tmp)
                    best_put, best_read = min(best_put, put), min(best_read, read)
                rows.append(
                    [
                        kind,
                        f"{avg // (2 * KIB)}/{avg // KIB}/{2 * avg // KIB}",
                        zstd,
                        str(n),
                        f"{stored / len(data):.2f}",
                        f"{len(data) / best_put / 1e6:,.0f}",
                        f"{len(data) / best_read / 1e6:,.0f}",
                    ]
                )
    table(
        f"objectstore+file: put and read of a {mib} MiB blob (best of 2)",
        ["data", "min/avg/max KiB", "zstd", "chunks", "stored/size", "put MB/s", "read MB/s"],
        rows,
    )


if __name__ == "__main__":
    main()
