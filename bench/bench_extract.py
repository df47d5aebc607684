"""``tvix-store extract`` of a real tree from the embedded store, next to ``cp -a``.

Target: extract takes at most 2x the time of ``cp -a`` of the same tree (both
write the same files to the same filesystem; the tree's pages are cached).
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

from bench.common import WORK, default_tree, fresh, mbps, need, rate, table, tree_stats


def _extract_command() -> list[str]:
    """``tvix-store extract`` (``python -m tvix.cli.extract`` until it is registered)."""
    from tvix.cli.store import build_parser

    if any(
        isinstance(a, argparse._SubParsersAction) and "extract" in a.choices
        for a in build_parser()._actions
    ):
        return [sys.executable, "-m", "tvix.cli.store", "extract"]
    return [sys.executable, "-m", "tvix.cli.extract"]


def _env(data: Path) -> dict[str, str]:
    env = dict(os.environ, TVIX_STORE_DATA_DIR=str(data))
    for var in ("BLOB_SERVICE_ADDR", "DIRECTORY_SERVICE_ADDR", "PATH_INFO_SERVICE_ADDR"):
        env.pop(var, None)
    return env


def _timed_into(dest: Path, argv: list[str], env: dict[str, str] | None = None) -> float:
    shutil.rmtree(dest, ignore_errors=True)
    # The removal's writeback (and discards) must not land in the timed run.
    os.sync()
    start = time.perf_counter()
    subprocess.run(argv, check=True, env=env, stdout=subprocess.DEVNULL)
    return time.perf_counter() - start


def main() -> None:
    tree = default_tree()
    nfiles, nbytes = tree_stats(tree)
    work = WORK / "extract"
    data = work / "data"
    fresh(work)
    env = _env(data)
    out = subprocess.run(
        [sys.executable, "-m", "tvix.cli.store", "import", str(tree)],
        check=True,
        env=env,
        capture_output=True,
    )
    store_path = out.stdout.decode().strip()
    dest = work / "out"
    cp = need("cp")
    extract = _extract_command()
    # Warm both up once (page cache of the tree and of the store's objects).
    _timed_into(dest, [cp, "-a", str(tree), str(dest)])
    _timed_into(dest, [*extract, store_path, str(dest)], env)
    # Interleaved, so both see the same machine (load here comes and goes).
    cp_times, extract_times = [], []
    for _ in range(3):
        cp_times.append(_timed_into(dest, [cp, "-a", str(tree), str(dest)]))
        extract_times.append(_timed_into(dest, [*extract, store_path, str(dest)], env))
    t_cp, t_extract = statistics.median(cp_times), statistics.median(extract_times)
    subprocess.run(["diff", "-r", "--no-dereference", "-q", str(tree), str(dest)], check=True)
    shutil.rmtree(work, ignore_errors=True)
    rows = [
        [name, f"{t:.2f} s", rate(nfiles, t, " files/s"), mbps(nbytes, t), f"{t / t_cp:.2f}x"]
        for name, t in [
            ("tvix-store extract (embedded store)", t_extract),
            ("cp -a", t_cp),
        ]
    ]
    table(
        f"extract {tree} ({nfiles:,} files, {nbytes / 1e6:,.0f} MB), median of 3, interleaved",
        ["what", "time", "files/s", "MB/s", "vs cp -a"],
        rows,
    )
    verdict = "OK" if t_extract <= 2 * t_cp else "MISSED"
    print(f"\ntarget: extract <= 2x cp -a: {t_extract / t_cp:.2f}x {verdict}")


if __name__ == "__main__":
    main()
