"""The embedded metadata database: SQLite (stdlib) against LMDB, for Directories.

A closure of 50,000 Directories (a tree of fan-out 8, each Directory with a
few files) is stored in one transaction, then looked up by digest. Both
engines are measured raw (rows of digest -> canonical encoding, synchronous
commit) and SQLite also through :class:`SQLiteDirectoryService` (closure
validation, worker thread, one ``IN (...)`` query per tree level for the
recursive get, decoding and verifying each Directory).

LMDB is optional (``pip install lmdb``): it is only measured when installed.
Set ``TVIX_BENCH_DIRS`` to change the number of Directories.
"""

from __future__ import annotations

import asyncio
import os
import random
import shutil
import sqlite3
import tempfile
import time
from pathlib import Path

from bench.common import rate, table
from tvix.castore.digest import B3Digest
from tvix.castore.directory import Directory
from tvix.castore.directoryservice import SQLiteDirectoryService
from tvix.castore.nodes import DirectoryNode, FileNode
from tvix.castore.testing.fixtures import b3

FANOUT = 8
LOOKUPS = 20_000


def _tree_size(leaves: int) -> int:
    total, level = leaves, leaves
    while level > 1:
        level = -(-level // FANOUT)
        total += level
    return total


def build_closure(n: int) -> list[Directory]:
    """About ``n`` Directories forming one tree, leaves first (the last is the root)."""
    leaves = 1
    while _tree_size(leaves) < n:
        leaves += 1
    # Leaves get distinct files so each Directory is unique.
    current = [
        Directory(files=[FileNode(b"file%d" % j, b3(b"%d/%d" % (i, j)), 100 + j) for j in range(4)])
        for i in range(leaves)
    ]
    out = list(current)
    while len(current) > 1:
        parents = []
        for i in range(0, len(current), FANOUT):
            group = current[i : i + FANOUT]
            dirs = [DirectoryNode(b"d%d" % k, d.digest, d.size) for k, d in enumerate(group)]
            parents.append(Directory(directories=dirs, files=[FileNode(b"x", b3(b"x"), 1)]))
        out += parents
        current = parents
    return out


def bench_sqlite_raw(path: Path, closure: list[Directory], probes: list[B3Digest]) -> list[str]:
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA synchronous=FULL")
    conn.execute("CREATE TABLE d (digest BLOB PRIMARY KEY, data BLOB NOT NULL, size INTEGER)")
    rows = [(d.digest, d.encode(), d.size) for d in closure]
    start = time.perf_counter()
    conn.execute("BEGIN IMMEDIATE")
    conn.executemany("INSERT OR IGNORE INTO d VALUES (?, ?, ?)", rows)
    conn.execute("COMMIT")
    put = time.perf_counter() - start
    start = time.perf_counter()
    for digest in probes:
        conn.execute("SELECT data FROM d WHERE digest = ?", (digest,)).fetchone()
    get = time.perf_counter() - start
    conn.close()
    return ["sqlite (raw)", rate(len(rows), put, "/s"), rate(len(probes), get, "/s"), "-"]


def bench_lmdb_raw(path: Path, closure: list[Directory], probes: list[B3Digest]) -> list[str]:
    import lmdb  # type: ignore[import-not-found]  # measurement only

    env = lmdb.open(str(path), map_size=1 << 32, sync=True)
    rows = [(bytes(d.digest), d.encode()) for d in closure]
    start = time.perf_counter()
    with env.begin(write=True) as txn:
        for key, value in rows:
            txn.put(key, value, overwrite=False)
    put = time.perf_counter() - start
    start = time.perf_counter()
    with env.begin() as txn:
        for digest in probes:
            txn.get(bytes(digest))
    get = time.perf_counter() - start
    env.close()
    return ["lmdb (raw)", rate(len(rows), put, "/s"), rate(len(probes), get, "/s"), "-"]


async def bench_sqlite_service(
    path: Path, closure: list[Directory], probes: list[B3Digest]
) -> list[str]:
    svc = SQLiteDirectoryService(str(path))
    start = time.perf_counter()
    async with svc.put_multiple_start() as putter:
        for d in closure:
            await putter.put(d)
    put = time.perf_counter() - start
    few = probes[:2000]
    start = time.perf_counter()
    for digest in few:
        await svc.get(digest)
    get = time.perf_counter() - start
    start = time.perf_counter()
    n = 0
    async for _ in svc.get_recursive(closure[-1].digest):
        n += 1
    recursive = time.perf_counter() - start
    assert n == len(closure), (n, len(closure))
    await svc.close()
    return [
        "SQLiteDirectoryService",
        rate(len(closure), put, "/s"),
        rate(len(few), get, "/s"),
        rate(n, recursive, "/s"),
    ]


def main() -> None:
    n = int(os.environ.get("TVIX_BENCH_DIRS", "50000"))
    closure = build_closure(n)
    rnd = random.Random(1)
    probes = [rnd.choice(closure).digest for _ in range(LOOKUPS)]
    tmp = Path(tempfile.mkdtemp(prefix="tvix-bench-db-"))
    rows = []
    try:
        rows.append(bench_sqlite_raw(tmp / "raw.db", closure, probes))
        try:
            rows.append(bench_lmdb_raw(tmp / "lmdb", closure, probes))
        except ImportError:
            rows.append(["lmdb (raw)", "not installed", "-", "-"])
        rows.append(asyncio.run(bench_sqlite_service(tmp / "svc.db", closure, probes)))
    finally:
        shutil.rmtree(tmp)
    table(
        f"metadata DB: closure of {len(closure):,} Directories in one transaction, lookups",
        ["engine", "put (dirs/s)", "point get (/s)", "get_recursive (dirs/s)"],
        rows,
    )


if __name__ == "__main__":
    main()
