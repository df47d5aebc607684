"""``tvix-store import`` and ``dump-path`` next to ``nix-store --add`` and ``--dump``.

Targets: import into the embedded default store faster than ``nix-store
--add`` into a throwaway chroot store; a second import of the same tree at
least 5x faster than the first; ``dump-path`` at most 2x ``nix-store --dump``.
Also the bytes on disk after importing two similar trees, against the sum of
their sizes (deduplication).
"""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

from bench.common import (
    WORK,
    default_tree,
    disk_usage,
    fresh,
    median_of,
    need,
    nix_env,
    table,
    tree_stats,
    tvix_store,
)


def _time(fn: object) -> float:
    start = time.perf_counter()
    fn()  # type: ignore[operator]
    return time.perf_counter() - start


def main() -> None:
    tree = default_tree()
    nfiles, nbytes = tree_stats(tree)
    nix_store = need("nix-store")
    work = WORK / "store"
    data = work / "data"

    def nix_add() -> float:
        root = fresh(work / "nix")
        env = nix_env(root / "home")
        return _time(
            lambda: subprocess.run(
                [nix_store, "--store", f"local?root={root}", "--add", str(tree)],
                check=True,
                env=env,
                stdout=subprocess.DEVNULL,
            )
        )

    def first_import() -> float:
        fresh(data)
        return _time(lambda: tvix_store(data, "import", tree))

    t_nix = median_of(nix_add)
    t_first = median_of(first_import)
    t_second = median_of(lambda: _time(lambda: tvix_store(data, "import", tree)))
    out = subprocess.run(
        [sys.executable, "-m", "tvix.cli.store", "import", str(tree)],
        capture_output=True,
        check=True,
        env={**nix_env(work / "h"), "TVIX_STORE_DATA_DIR": str(data)},
    )
    store_path = out.stdout.decode().strip()
    t_dump_nix = median_of(
        lambda: _time(
            lambda: subprocess.run(
                [nix_store, "--dump", str(tree)], check=True, stdout=subprocess.DEVNULL
            )
        )
    )
    t_dump = median_of(lambda: _time(lambda: tvix_store(data, "dump-path", store_path)))
    table(
        f"import and dump {tree} ({nfiles:,} files, {nbytes / 1e6:,.0f} MB), median of 3",
        ["what", "time", "MB/s", "ratio"],
        [
            [
                "nix-store --add (chroot store)",
                f"{t_nix:.2f} s",
                f"{nbytes / t_nix / 1e6:,.0f}",
                "1.00x",
            ],
            [
                "tvix-store import (first)",
                f"{t_first:.2f} s",
                f"{nbytes / t_first / 1e6:,.0f}",
                f"{t_first / t_nix:.2f}x of nix",
            ],
            [
                "tvix-store import (again)",
                f"{t_second:.2f} s",
                f"{nbytes / t_second / 1e6:,.0f}",
                f"{t_first / t_second:.1f}x faster than first",
            ],
            [
                "nix-store --dump",
                f"{t_dump_nix:.2f} s",
                f"{nbytes / t_dump_nix / 1e6:,.0f}",
                "1.00x",
            ],
            [
                "tvix-store dump-path",
                f"{t_dump:.2f} s",
                f"{nbytes / t_dump / 1e6:,.0f}",
                f"{t_dump / t_dump_nix:.2f}x of nix",
            ],
        ],
    )
    print(f"\ntarget import faster than nix-store --add: {'OK' if t_first < t_nix else 'MISSED'}")
    print(f"target second import >= 5x faster: {'OK' if t_first / t_second >= 5 else 'MISSED'}")
    print(
        f"target dump-path <= 2x nix-store --dump: {'OK' if t_dump <= 2 * t_dump_nix else 'MISSED'}"
    )

    # Deduplication: two similar trees (two builds of the standard library).
    similar = [Path(p) for p in (str(tree), "/usr/lib/python3.11") if Path(p).is_dir()]
    if len(similar) == 2:
        fresh(data)
        sizes = [disk_usage(p) for p in similar]
        for p in similar:
            tvix_store(data, "import", p)
        used = disk_usage(data)
        table(
            "deduplication: bytes on disk after importing two similar trees",
            ["what", "bytes on disk"],
            [
                [f"{similar[0]}", f"{sizes[0] / 1e6:,.1f} MB"],
                [f"{similar[1]}", f"{sizes[1] / 1e6:,.1f} MB"],
                ["sum of both", f"{sum(sizes) / 1e6:,.1f} MB"],
                ["tvix store holding both", f"{used / 1e6:,.1f} MB ({used / sum(sizes):.2f}x)"],
            ],
        )


if __name__ == "__main__":
    main()
