"""Issue 15's numbers: garbage collection on this Python's standard library tree.

Each top-level entry of the tree (~50k files in all) is imported as its own
store path into one data directory; every second path (by name) is then
deleted and ``tvix-store gc --grace 0`` run. Reported: the GC's time, the
bytes it freed, and what a store holding only the kept half would take
(a fresh import of just those paths): the GC should end within a few
percent of it.

Then imports beside a GC: the same data directory (all paths, half
deleted) is restored from a copy, and a tree (this venv's site-packages)
is imported into it alone, and again while a GC runs beside it (started
together). The slowdown is their ratio; medians of ``REPEATS``.
"""

from __future__ import annotations

import os
import shutil
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

from bench.common import WORK, default_tree, fresh, table, tree_stats

HERE = WORK / "gc"
REPEATS = 3


def _env(data: Path) -> dict[str, str]:
    env = dict(os.environ, TVIX_STORE_DATA_DIR=str(data))
    for var in ("BLOB_SERVICE_ADDR", "DIRECTORY_SERVICE_ADDR", "PATH_INFO_SERVICE_ADDR"):
        env.pop(var, None)
    return env


def _run(data: Path, *args: str | Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "tvix.cli.store", *map(str, args)],
        env=_env(data),
        check=True,
        capture_output=True,
        text=True,
    )


def _usage(path: Path) -> int:
    total = 0
    for root, _dirs, files in os.walk(path):
        for f in files:
            total += os.lstat(os.path.join(root, f)).st_blocks * 512
    return total


def _mib(n: int) -> str:
    return f"{n / (1 << 20):,.1f} MiB"


def main() -> None:
    tree = default_tree()
    files, nbytes = tree_stats(tree)
    entries = sorted(p for p in tree.iterdir() if not p.is_symlink())
    kept, dropped = entries[1::2], entries[0::2]
    fresh(HERE)
    data = HERE / "data"
    store_paths = _run(data, "import", *entries).stdout.split()
    by_source = dict(zip(entries, store_paths, strict=True))
    _run(data, "delete", "--recursive", *(by_source[p] for p in dropped))
    baseline = HERE / "baseline"
    shutil.copytree(data, baseline)

    before = _usage(data)
    start = time.perf_counter()
    report = _run(data, "gc", "--grace", "0").stdout
    gc_time = time.perf_counter() - start
    after = _usage(data)
    only_kept = HERE / "only-kept"
    _run(only_kept, "import", *kept)
    scratch = _usage(only_kept)
    verify = _run(data, "verify")
    assert "all intact" in verify.stderr, verify.stderr

    other = Path(__import__("site").getsitepackages()[0])
    alone, beside, gc_beside = [], [], []
    for _ in range(REPEATS):
        for with_gc in (False, True):
            work = HERE / "work"
            shutil.rmtree(work, ignore_errors=True)
            shutil.copytree(baseline, work)
            gc_done: list[float] = []
            waiter = None
            start = time.perf_counter()
            if with_gc:
                gc = subprocess.Popen(
                    [sys.executable, "-m", "tvix.cli.store", "gc", "--grace", "0"],
                    env=_env(work),
                    stdout=subprocess.DEVNULL,
                )

                def wait(
                    gc: subprocess.Popen[bytes] = gc, done: list[float] = gc_done, t0: float = start
                ) -> None:
                    gc.wait()
                    done.append(time.perf_counter() - t0)

                waiter = threading.Thread(target=wait)
                waiter.start()
            _run(work, "import", other)
            took = time.perf_counter() - start
            if waiter is not None:
                waiter.join()
                gc_beside.append(gc_done[0])
                beside.append(took)
            else:
                alone.append(took)
    other_files, other_bytes = tree_stats(other)
    t_alone, t_beside = statistics.median(alone), statistics.median(beside)

    table(
        f"GC of {tree} ({files:,} files, {_mib(nbytes)}; {len(entries)} store paths, "
        f"{len(dropped)} deleted)",
        ["measure", "value"],
        [
            ["gc time", f"{gc_time:.1f} s"],
            ["data dir before gc", _mib(before)],
            ["data dir after gc", _mib(after)],
            ["freed", _mib(before - after)],
            ["a store of only the kept paths", _mib(scratch)],
            ["after gc / only kept", f"{after / scratch:.3f}x"],
            *[["gc said", line] for line in report.strip().splitlines()],
        ],
    )
    table(
        f"import of {other} ({other_files:,} files, {_mib(other_bytes)}) beside a GC",
        ["measure", "median", "runs"],
        [
            ["import alone", f"{t_alone:.1f} s", " ".join(f"{t:.1f}" for t in alone)],
            ["import with a GC beside", f"{t_beside:.1f} s", " ".join(f"{t:.1f}" for t in beside)],
            ["slowdown", f"{t_beside / t_alone:.2f}x", ""],
            ["the GC beside it took", f"{statistics.median(gc_beside):.1f} s", ""],
        ],
    )
