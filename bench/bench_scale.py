"""Beyond one machine: importing into S3 (SeaweedFS) + PostgreSQL, and reading Directories back.

Starts a real SeaweedFS and a real PostgreSQL on 127.0.0.1 (see
``tests/support/servers.py``), imports a real tree (``default_tree()``)
in-process through :func:`tvix.store.importer.import_path` into

* the embedded default (``objectstore+file`` + SQLite), and
* ``objectstore+s3`` + ``postgresql``,

and measures a recursive get of the tree's Directories from PostgreSQL and
from SQLite (Directories/s, best of 3). The first S3 + PostgreSQL import is
profiled (the event-loop thread; object I/O runs in worker threads) and its
Directory closure commit is timed on its own. The default tree is large
(this Python's library: ~50k files); ``TVIX_BENCH_TREE`` picks another.
"""

from __future__ import annotations

import asyncio
import cProfile
import io
import os
import pstats
import shutil
import signal
import sys
import time
from pathlib import Path
from typing import Any

from bench.common import WORK, default_tree, table, tree_stats
from tests.support.servers import postgresql, seaweedfs
from tvix.castore.directoryservice.postgres import PostgresDirectoryService
from tvix.castore.nodes import Node
from tvix.store.composition import Composition
from tvix.store.importer import import_path

REPEATS = 3


async def _import(urls: tuple[str, str, str], tree: Path) -> tuple[float, Node]:
    async with Composition.from_urls(*urls) as c:
        blobs, dirs, infos = c.build_all()
        start = time.perf_counter()
        info = await import_path(blobs, dirs, infos, tree)
        return time.perf_counter() - start, info.node


async def _recursive(dir_url: str, root: Node) -> tuple[float, int]:
    best, count = float("inf"), 0
    async with Composition.from_urls("memory://", dir_url, "memory://") as c:
        dirs = c.directory_service()
        for _ in range(REPEATS):
            start = time.perf_counter()
            count = 0
            async for _d in dirs.get_recursive(root.digest):  # type: ignore[union-attr]
                count += 1
            best = min(best, time.perf_counter() - start)
    return best, count


def _row(what: str, seconds: float, nfiles: int, nbytes: int | None) -> list[str]:
    mb = f"{nbytes / seconds / 1e6:,.0f} MB/s" if nbytes else ""
    return [what, f"{seconds:.2f} s", f"{nfiles / seconds:,.0f} files/s", mb]


def main() -> None:
    # So the servers are stopped (finally blocks run) when the benchmark is terminated.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    tree = default_tree()
    nfiles, nbytes = tree_stats(tree)
    work = WORK / "scale"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    print(f"tree: {tree} ({nfiles:,} files, {nbytes / 1e6:,.0f} MB)", flush=True)
    rows: list[list[str]] = []
    commits: list[float] = []
    profile = cProfile.Profile()
    with seaweedfs() as weed, postgresql() as pg:
        os.environ.update(weed.env)
        local = (
            f"objectstore+file://{work}/blobs",
            f"sqlite://{work}/dirs.sqlite",
            f"sqlite://{work}/pathinfo.sqlite",
        )
        t, root = asyncio.run(_import(local, tree))
        rows.append(_row("import: embedded (file + SQLite)", t, nfiles, nbytes))
        remote = (weed.url("bench"), pg.dsn(), pg.dsn())
        # Profiled (the event-loop thread), and the Directory commit timed on its own.
        original = PostgresDirectoryService._commit

        async def timed_commit(self: PostgresDirectoryService, *args: Any) -> None:
            start = time.perf_counter()
            await original(self, *args)
            commits.append(time.perf_counter() - start)

        PostgresDirectoryService._commit = timed_commit  # type: ignore[method-assign, assignment]
        profile.enable()
        t, remote_root = asyncio.run(_import(remote, tree))
        profile.disable()
        PostgresDirectoryService._commit = original  # type: ignore[method-assign]
        assert remote_root == root
        rows.append(_row("import: S3 + PostgreSQL (profiled)", t, nfiles, nbytes))
        rows.append(
            [
                "  part: Directory closure commit (PostgreSQL)",
                f"{sum(commits):.2f} s",
                "",
                "",
            ]
        )
        # Again: every blob and Directory is there already.
        t, _ = asyncio.run(_import(remote, tree))
        rows.append(_row("import again: S3 + PostgreSQL", t, nfiles, None))
        for label, url in (("PostgreSQL", pg.dsn()), ("SQLite", local[1])):
            t, count = asyncio.run(_recursive(url, root))
            rows.append(
                [
                    f"get_recursive: {label}",
                    f"{t * 1000:.0f} ms",
                    f"{count / t:,.0f} dirs/s",
                    f"{count:,} Directories",
                ]
            )

    table("import and recursive get", ["what", "time", "rate", ""], rows)
    out = io.StringIO()
    pstats.Stats(profile, stream=out).sort_stats("tottime").print_stats(12)
    print("\n## profile of the event-loop thread (S3 + PostgreSQL import), by own time\n")
    print("\n".join(out.getvalue().splitlines()[:34]))
