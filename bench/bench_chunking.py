"""FastCDC parameters for the object-store blob service: throughput and dedup.

Prints, per (min, avg, max) setting: chunking throughput, the mean chunk size,
and how much of a modified copy of a file is found in the chunks of the
original (the dedup the chunk size buys). The data is real binaries from
/usr/lib (falls back to pseudo-random bytes), modified in two ways:

* ``edits``: 64 small random insertions/deletions/replacements;
* ``refs``: a Nix-like store path (``/nix/store/<32 chars>-name``) planted
  every 4-64 KiB, and in the copy a fifth of them point to a new hash, as
  when one dependency of a package changes.

Usage: ``python bench/bench_chunking.py [MiB]`` (default 64).
"""

from __future__ import annotations

import glob
import os
import random
import sys
import time

from pyfastcdc.cy import FastCDC

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
    out = bytearray()
    for path in sorted(glob.glob("/usr/lib/x86_64-linux-gnu/**/*.so*", recursive=True)):
        if os.path.isfile(path) and not os.path.islink(path):
            with open(path, "rb") as f:
                out += f.read()
        if len(out) >= limit:
            return bytes(out[:limit])
    rnd = random.Random(1)
    return bytes(out) + rnd.randbytes(limit - len(out))


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
    mib = int(sys.argv[1]) if len(sys.argv) > 1 else 64
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


if __name__ == "__main__":
    main()
