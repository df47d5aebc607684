"""``tvix-store mount``: sequential reads, ``find``, and bytes fetched for a small read.

Targets (issue #16): reading a 1 GiB file through the mount of the embedded
store (the default: packs), cold, at 500 MB/s or more (moonshot 1 GB/s);
``find`` over a mounted tree of 50,000 entries at 50,000 entries/s or more
on the first walk; a second read and a second walk costing nearly nothing
(the kernel keeps pages, entries, attributes and listings); a 4 KiB read in
the middle of a 1 GiB file moving about one chunk (at most 512 KiB), not the
file.

"Cold" drops the kernel's caches first (``echo 3 > /proc/sys/vm/drop_caches``,
as root) and mounts afresh, so the store's own files come from disk too;
the same read of the plain file (and ``find`` over the tree) on disk is
shown next to it, same run, which bounds what any store on this disk can
do. "store cached" drops the caches, then reads the store's files once, so
only the mount is cold. "warm" is the second read, served by the kernel's
page cache of the mount (``keep_cache``). Two files: random bytes (stored
raw) and hex text (zstd, about half the size). Medians of
``TVIX_BENCH_REPEATS`` (default 3). Without root, every mount is fresh but
the store's files stay cached.

``TVIX_BENCH_MOUNT_BEFORE``: the ``src`` directory of another checkout, whose
``find`` rows are measured too, interleaved with this code's.

Bytes fetched are what the mount process read (``rchar`` in ``/proc/PID/io``):
pack extents, blob records, database pages.
"""

from __future__ import annotations

import os
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from bench.common import WORK, fresh, mbps, rate, table

GIB = 1 << 30
BUF = 1 << 20
FIND_DIRS = 500
FIND_FILES_PER_DIR = 99  # 500 directories of 99 files: 50,000 entries with the directories


def _env(src: str | None = None) -> dict[str, str]:
    """The environment of a ``tvix-store`` run: ``src``, if given, is the code it runs."""
    drop = ("BLOB_SERVICE_ADDR", "DIRECTORY_SERVICE_ADDR", "PATH_INFO_SERVICE_ADDR")
    env = {k: v for k, v in os.environ.items() if k not in drop}
    if src is not None:
        env["PYTHONPATH"] = src
    return env


def _store_args(store: Path) -> list[str]:
    return ["--data-dir", str(store)]


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
def _mounted(store: Path, mountpoint: Path, src: str | None = None) -> Iterator[_Mount]:
    mountpoint.mkdir(parents=True, exist_ok=True)
    proc = subprocess.Popen(
        [sys.executable, "-m", "tvix.cli.store", "mount", *_store_args(store), str(mountpoint)],
        stderr=subprocess.PIPE,
        env=_env(src),
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


def _make_big(path: Path, *, text: bool) -> None:
    """1 GiB of random bytes, or of hex text (which zstd stores in about half)."""
    if path.exists() and path.stat().st_size == GIB:
        return
    block = 64 << 20
    with open(path, "wb") as f:
        for _ in range(GIB // block):
            f.write(os.urandom(block // 2).hex().encode() if text else os.urandom(block))


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


def _repeats() -> int:
    return int(os.environ.get("TVIX_BENCH_REPEATS", "3"))


def _median_row(what: str, times: list[float], speed: Callable[[float], str]) -> list[str]:
    """A table row: the median time, the range, ``speed`` of the median."""
    t = statistics.median(times)
    return [what, f"{t:.2f} s", f"{min(times):.2f}-{max(times):.2f} s", speed(t)]


def _reads(store: Path, work: Path, files: dict[str, tuple[Path, str]], root: bool) -> None:
    rows: list[list[str]] = []
    for label, (local, name) in files.items():
        times: dict[str, list[float]] = {}

        def add(what: str, seconds: float, times: dict[str, list[float]] = times) -> None:
            times.setdefault(what, []).append(seconds)

        for _ in range(_repeats()):
            if root:
                _drop_caches()
                add("on disk, cold", _read_all(local))
            add("on disk, warm", _read_all(local))
            with _mounted(store, work / "mnt") as m:
                path = m.mountpoint / name
                if root:
                    _drop_caches()
                    add("mount, cold (store from disk)", _read_all(path))
                else:
                    add("fresh mount (store cached)", _read_all(path))
                add("mount, warm (second read)", _read_all(path))
            if root:
                with _mounted(store, work / "mnt") as m:
                    _drop_caches()
                    _cache_tree(store / "packs")
                    add("mount, cold (store cached)", _read_all(m.mountpoint / name))
        rows += [
            _median_row(f"{label}: {what}", t, lambda s: mbps(GIB, s)) for what, t in times.items()
        ]
    table(
        f"sequential read of 1 GiB (1 MiB reads), median of {_repeats()}",
        ["what", "time", "range", "rate"],
        rows,
    )


def _walks(store: Path, work: Path, local: Path, name: str, entries: int, root: bool) -> None:
    """``find`` on disk and through fresh mounts.

    With ``TVIX_BENCH_MOUNT_BEFORE`` (the ``src`` directory of another
    checkout), the mount's rows are measured for that code too, each repeat
    running both one after the other, so their ratio is of one period.
    """
    times: dict[str, list[float]] = {}
    before = os.environ.get("TVIX_BENCH_MOUNT_BEFORE")
    codes = {"": None, **({"before: ": before} if before else {})}

    def add(what: str, walked: tuple[float, int]) -> None:
        seconds, found = walked
        assert found == entries, (what, found, entries)
        times.setdefault(what, []).append(seconds)

    for _ in range(_repeats()):
        if root:
            _drop_caches()
            add("on disk, cold", _find(local))
        add("on disk, warm", _find(local))
        for label, src in codes.items():
            with _mounted(store, work / "mnt", src) as m:
                if root:
                    _drop_caches()
                add(f"{label}mount, first walk", _find(m.mountpoint / name))
                add(f"{label}mount, second walk", _find(m.mountpoint / name))
            if root:  # the store's files cached, only the mount fresh
                with _mounted(store, work / "mnt", src) as m:
                    add(f"{label}mount, first walk, store cached", _find(m.mountpoint / name))
    rows = [
        _median_row(what, t, lambda s: rate(entries, s, " entries/s")) for what, t in times.items()
    ]
    table(
        f"find over {entries:,} entries, median of {_repeats()}",
        ["what", "time", "range", "rate"],
        rows,
    )


def _small_read(store: Path, work: Path, name: str) -> None:
    rows = []
    with _mounted(store, work / "mnt") as m:
        path = m.mountpoint / name
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


def main() -> None:
    """``TVIX_BENCH_MOUNT``: the parts to run, of ``read,find,small`` (default: all)."""
    if not os.path.exists("/dev/fuse"):
        sys.exit("bench: /dev/fuse is absent, cannot mount")
    parts = os.environ.get("TVIX_BENCH_MOUNT", "read,find,small").split(",")
    work = WORK / "mount"
    src = work / "src"
    src.mkdir(parents=True, exist_ok=True)
    big, text = src / "big.bin", src / "text.txt"
    _make_big(big, text=False)
    _make_big(text, text=True)
    entries = _make_tree(src / "tree")
    store = work / "store"
    imported = work / "imported.txt"  # the store paths, once imported
    if not imported.exists():
        fresh(store)
        start = time.perf_counter()
        out = _tvix_store("import", *_store_args(store), big, text, src / "tree")
        print(f"imported 2 GiB + {entries:,} entries in {time.perf_counter() - start:.1f} s")
        imported.write_text(out)
    names = [p.rsplit("/", 1)[1] for p in imported.read_text().split()]
    root = _can_drop_caches()
    if "read" in parts:
        files = {"random": (big, names[0]), "hex text": (text, names[1])}
        _reads(store, work, files, root)
    if "find" in parts:
        _walks(store, work, src / "tree", names[2], entries, root)
    if "small" in parts:
        _small_read(store, work, names[0])


if __name__ == "__main__":
    main()
