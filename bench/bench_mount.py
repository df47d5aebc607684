"""``tvix-store mount``: sequential reads, ``find``, and bytes fetched for a small read.

Targets: at least 1 GB/s reading a 1 GiB file through the mount from the
embedded store, cold; ``find`` over a mounted tree of 50,000 entries at
50,000 entries/s or more; a 4 KiB read in the middle of a 1 GiB file moving
about one chunk (at most 512 KiB), not the file.

"Cold" drops the kernel's caches first (``echo 3 > /proc/sys/vm/drop_caches``,
as root), so the store's own files come from disk too; the same read of a
plain local file is shown next to it, which bounds what any store on this
disk can do. "store cached" drops the caches, then reads the store's files
once, so only the mount is cold: what a mount of a store in memory (or a warm
page cache) delivers. "warm" is the second read, served by the kernel's page
cache of the mount (``keep_cache``). Without root, every mount is fresh
(no cached pages of its own) but the store's files stay cached.

Bytes fetched are what the mount process read (``rchar`` in ``/proc/PID/io``):
chunk objects, blob records, database pages.
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from bench.common import WORK, fresh, mbps, rate, table

GIB = 1 << 30
BUF = 1 << 20
FIND_DIRS = 500
FIND_FILES_PER_DIR = 99  # 500 directories of 99 files: 50,000 entries with the directories


def _env() -> dict[str, str]:
    drop = ("BLOB_SERVICE_ADDR", "DIRECTORY_SERVICE_ADDR", "PATH_INFO_SERVICE_ADDR")
    return {k: v for k, v in os.environ.items() if k not in drop}


def _store_args(store: Path) -> list[str]:
    return [
        "--blob-service-addr",
        f"objectstore+file://{store / 'blobs'}",
        "--directory-service-addr",
        f"sqlite://{store / 'directories.sqlite'}",
        "--path-info-service-addr",
        f"sqlite://{store / 'pathinfo.sqlite'}",
    ]


def _tvix_store(*args: str | Path) -> str:
    return subprocess.run(
        [sys.executable, "-m", "tvix.cli.store", *map(str, args)],
        check=True,
        capture_output=True,
        env=_env(),
    ).stdout.decode()


def _can_drop_caches() -> bool:
    return os.access("/proc/sys/vm/drop_caches", os.W_OK)


def _drop_caches() -> None:
    os.sync()
    Path("/proc/sys/vm/drop_caches").write_text("3")


def _read_all(path: Path) -> float:
    """Seconds to read ``path`` front to back in 1 MiB reads."""
    buf = bytearray(BUF)
    start = time.perf_counter()
    with open(path, "rb", buffering=0) as f:
        while f.readinto(buf):
            pass
    return time.perf_counter() - start


def _cache_tree(root: Path) -> None:
    for dirpath, _dirs, names in os.walk(root):
        for name in names:
            _read_all(Path(dirpath) / name)


class _Mount:
    def __init__(self, proc: subprocess.Popen[bytes], mountpoint: Path) -> None:
        self.proc = proc
        self.mountpoint = mountpoint

    def rchar(self) -> int:
        with open(f"/proc/{self.proc.pid}/io") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("rchar:"))


@contextmanager
def _mounted(store: Path, mountpoint: Path) -> Iterator[_Mount]:
    mountpoint.mkdir(parents=True, exist_ok=True)
    proc = subprocess.Popen(
        [sys.executable, "-m", "tvix.cli.store", "mount", *_store_args(store), str(mountpoint)],
        stderr=subprocess.PIPE,
        env=_env(),
    )
    ready = threading.Event()

    def pump() -> None:
        assert proc.stderr is not None
        for line in proc.stderr:
            sys.stderr.write(line.decode(errors="replace"))
            if b"mounted at" in line:
                ready.set()
        ready.set()

    threading.Thread(target=pump, daemon=True).start()
    try:
        if not ready.wait(60) or proc.poll() is not None:
            sys.exit("bench: tvix-store mount did not come up")
        yield _Mount(proc, mountpoint)
    finally:
        proc.terminate()
        proc.wait(30)
        subprocess.run(["fusermount3", "-u", "-z", str(mountpoint)], capture_output=True)


def _make_big(path: Path) -> None:
    if path.exists() and path.stat().st_size == GIB:
        return
    with open(path, "wb") as f:
        for _ in range(GIB // (64 << 20)):
            f.write(os.urandom(64 << 20))


def _make_tree(root: Path) -> int:
    """500 directories of 99 small files; returns the number of entries."""
    if not root.exists():
        for d in range(FIND_DIRS):
            sub = root / f"dir-{d:03}"
            sub.mkdir(parents=True)
            for i in range(FIND_FILES_PER_DIR):
                (sub / f"file-{i:02}").write_bytes(f"{d}/{i}\n".encode())
    return FIND_DIRS * (FIND_FILES_PER_DIR + 1)


def _find(root: Path) -> tuple[float, int]:
    start = time.perf_counter()
    out = subprocess.run(["find", str(root)], check=True, capture_output=True).stdout
    return time.perf_counter() - start, out.count(b"\n") - 1  # minus the root itself


def main() -> None:
    if not os.path.exists("/dev/fuse"):
        sys.exit("bench: /dev/fuse is absent, cannot mount")
    work = WORK / "mount"
    src = work / "src"
    src.mkdir(parents=True, exist_ok=True)
    big = src / "big.bin"
    _make_big(big)
    entries = _make_tree(src / "tree")
    store = fresh(work / "store")
    start = time.perf_counter()
    big_path, tree_path = _tvix_store("import", *_store_args(store), big, src / "tree").split()
    print(f"imported 1 GiB + {entries:,} entries in {time.perf_counter() - start:.1f} s")
    big_name, tree_name = big_path.rsplit("/", 1)[1], tree_path.rsplit("/", 1)[1]
    root = _can_drop_caches()

    rows: list[list[str]] = []

    def row(what: str, seconds: float) -> None:
        rows.append([what, f"{seconds:.2f} s", mbps(GIB, seconds)])

    # -- sequential reads -------------------------------------------------------------
    if root:
        _drop_caches()
        row("local file, cold", _read_all(big))
    row("local file, warm", min(_read_all(big), _read_all(big)))
    with _mounted(store, work / "mnt") as m:
        path = m.mountpoint / big_name
        if root:
            _drop_caches()
            row("mount, cold (store from disk)", _read_all(path))
            _drop_caches()
            _cache_tree(store / "blobs")
            row("mount, cold (store cached)", _read_all(path))
        else:
            row("fresh mount (store cached)", _read_all(path))
        row("mount, warm (second read)", _read_all(path))
    table("sequential read of 1 GiB (1 MiB reads)", ["what", "time", "rate"], rows)

    # -- find ------------------------------------------------------------------------
    rows = []
    with _mounted(store, work / "mnt") as m:
        tree = m.mountpoint / tree_name
        if root:
            _drop_caches()
        seconds, found = _find(tree)
        assert found == entries, (found, entries)
        rows.append(["mount, first walk", f"{seconds:.2f} s", rate(found, seconds, " entries/s")])
        seconds, found = _find(tree)
        rows.append(["mount, second walk", f"{seconds:.2f} s", rate(found, seconds, " entries/s")])
    seconds, found = _find(src / "tree")
    rows.append(["local tree (cached)", f"{seconds:.2f} s", rate(found, seconds, " entries/s")])
    table(f"find over {entries:,} entries", ["what", "time", "rate"], rows)

    # -- bytes fetched for a small read -------------------------------------------------
    rows = []
    with _mounted(store, work / "mnt") as m:
        path = m.mountpoint / big_name
        # Two places far apart, so the second read finds nothing the first fetched.
        for offset, flags, what in (
            (GIB // 2 + 4096, os.O_RDONLY, "buffered"),
            (GIB // 2 + (64 << 20), os.O_RDONLY | os.O_DIRECT, "O_DIRECT"),
        ):
            fd = os.open(path, flags)
            try:
                os.fstat(fd)
                before = m.rchar()
                os.pread(fd, 4096, offset)
                fetched = m.rchar() - before
            finally:
                os.close(fd)
            rows.append([f"4 KiB in the middle, {what}", f"{fetched:,} bytes"])
    table("bytes the mount read for a 4 KiB read of a 1 GiB file", ["what", "fetched"], rows)


if __name__ == "__main__":
    main()
