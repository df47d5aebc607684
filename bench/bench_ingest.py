"""Filesystem ingestion into the memory services, next to b3sum and nix-store --dump.

Target: ingest takes at most 3x the time of ``nix-store --dump`` of the same tree.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
from pathlib import Path

from bench.common import default_tree, mbps, need, rate, table, timed, tree_stats
from tvix.castore.blobservice import MemoryBlobService
from tvix.castore.directoryservice import MemoryDirectoryService
from tvix.castore.ingest import ingest_path


def _ingest(tree: Path) -> None:
    async def go() -> None:
        await ingest_path(MemoryBlobService(), MemoryDirectoryService(), tree)

    asyncio.run(go())


def _b3sum(files: list[str]) -> None:
    # xargs keeps the argument list within limits; b3sum hashes with threads.
    subprocess.run(
        ["xargs", "-0", need("b3sum"), "--no-names"],
        input=b"\0".join(os.fsencode(f) for f in files),
        check=True,
        stdout=subprocess.DEVNULL,
    )


def _dump(tree: Path) -> None:
    subprocess.run([need("nix-store"), "--dump", str(tree)], check=True, stdout=subprocess.DEVNULL)


def main() -> None:
    tree = default_tree()
    nfiles, nbytes = tree_stats(tree)
    files = [
        os.path.join(d, n)
        for d, _, ns in os.walk(tree)
        for n in ns
        if os.path.isfile(os.path.join(d, n)) and not os.path.islink(os.path.join(d, n))
    ]
    t_ingest = timed(lambda: _ingest(tree))
    t_b3sum = timed(lambda: _b3sum(files))
    t_dump = timed(lambda: _dump(tree))
    rows = [
        [name, f"{t:.2f} s", rate(nfiles, t, " files/s"), mbps(nbytes, t), f"{t / t_dump:.2f}x"]
        for name, t in [
            ("tvix ingest_path (memory)", t_ingest),
            ("b3sum (same files)", t_b3sum),
            ("nix-store --dump > /dev/null", t_dump),
        ]
    ]
    table(
        f"ingest {tree} ({nfiles:,} files, {nbytes / 1e6:,.0f} MB), median of 3",
        ["what", "time", "files/s", "MB/s", "vs nix-store --dump"],
        rows,
    )
    verdict = "OK" if t_ingest <= 3 * t_dump else "MISSED"
    print(f"\ntarget: ingest <= 3x nix-store --dump: {t_ingest / t_dump:.2f}x {verdict}")


if __name__ == "__main__":
    main()
