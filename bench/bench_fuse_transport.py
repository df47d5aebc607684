"""The host FUSE mount through pyfuse3 (libfuse) against the project's own FUSE codec on /dev/fuse.

Both serve the same :class:`tvix.fs.core.StoreFs` over the same embedded
store; only the transport differs:

* ``pyfuse3``: ``tvix-store mount`` (libfuse parses requests in C, calls the
  Python handlers; the read-ahead raised to 4 MiB as ``mount`` does);
* ``codec``: :class:`tvix.fs.fusewire.FuseSession`, the codec the virtio-fs
  backend uses, reading ``/dev/fuse`` itself (``os.read``, one task per
  request, ``os.write``), mounted with ``mount(2)`` (root only: no
  ``fusermount3``), the same read-ahead.

Measured per transport, each on a fresh mount with the store's own files in
the page cache: a 256 MiB sequential read (1 MiB reads), the second read
(the kernel's page cache of the mount), a walk (``os.walk`` + ``lstat``) of
2,000 small files, the same walk again (what the kernel kept of entries,
attributes and listings; the codec lets it keep directory listings,
``FOPEN_CACHE_DIR``, which pyfuse3 cannot ask for), and reading them all.
Which is faster decides whether ``tvix-store mount`` keeps pyfuse3 (see
bench/NOTES.md).
``TVIX_BENCH_REPEATS`` mounts per transport (default 3; medians).
"""

from __future__ import annotations

import asyncio
import ctypes
import errno
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

from bench.common import WORK, fresh, mbps, rate, table

BUF = 1 << 20
STORE = WORK / "virtiofs" / "store"

_MS_RDONLY, _MS_NOSUID, _MS_NODEV = 1, 2, 4
_MNT_DETACH = 2


async def _serve_raw(store: Path, mountpoint: Path) -> None:
    """Serve the store at ``mountpoint`` with the codec on a raw /dev/fuse fd until unmounted."""
    from tvix.cli.common import local_store_urls
    from tvix.fs.core import StoreFs
    from tvix.fs.fusewire import FuseSession
    from tvix.fs.mount import _set_read_ahead
    from tvix.fs.requests import FsOptions
    from tvix.store.composition import Composition

    libc = ctypes.CDLL(None, use_errno=True)
    fd = os.open("/dev/fuse", os.O_RDWR | os.O_NONBLOCK)
    opts = f"fd={fd},rootmode=40000,user_id=0,group_id=0,default_permissions".encode()
    flags = _MS_RDONLY | _MS_NOSUID | _MS_NODEV
    if libc.mount(b"tvix-store", os.fsencode(mountpoint), b"fuse.tvix-store", flags, opts):
        sys.exit(f"mount: {os.strerror(ctypes.get_errno())}")
    async with Composition.from_urls(*local_store_urls(store)) as composition:
        blobs, directories, path_infos = composition.build_all()
        session = FuseSession(StoreFs(blobs, directories, path_infos, FsOptions(list_root=True)))
        loop = asyncio.get_running_loop()
        done = loop.create_future()
        tasks: set[asyncio.Task[None]] = set()

        async def answer(request: bytes) -> None:
            initialized = session.initialized
            reply = await session.handle(request)
            if reply is not None:
                try:
                    os.write(fd, reply)
                except OSError as e:  # ENOENT: the request was interrupted
                    if e.errno != errno.ENOENT:
                        raise
            if not initialized and session.initialized:
                # After INIT: the kernel sets the read-ahead from its answer.
                _set_read_ahead(str(mountpoint), 4096)

        buffer = bytearray(BUF + 4096)  # os.read would allocate 1 MiB per request

        def readable() -> None:
            while True:
                try:
                    n = os.readv(fd, [buffer])
                    request = bytes(buffer[:n])
                except BlockingIOError:
                    return
                except OSError as e:
                    if e.errno == errno.ENODEV and not done.done():  # unmounted
                        done.set_result(None)
                    return
                task = loop.create_task(answer(request))
                tasks.add(task)
                task.add_done_callback(tasks.discard)

        loop.add_reader(fd, readable)
        print("mounted", file=sys.stderr, flush=True)
        await done
        loop.remove_reader(fd)


def _read_all(path: Path) -> float:
    buf = bytearray(BUF)
    start = time.perf_counter()
    with open(path, "rb", buffering=0) as f:
        while f.readinto(buf):
            pass
    return time.perf_counter() - start


def _walk(root: Path) -> tuple[int, float]:
    start = time.perf_counter()
    n = 0
    for dirpath, dirs, names in os.walk(root):
        for name in dirs + names:
            os.lstat(os.path.join(dirpath, name))
            n += 1
    return n, time.perf_counter() - start


def _cat(root: Path) -> tuple[int, float]:
    start = time.perf_counter()
    n = 0
    for dirpath, _dirs, names in os.walk(root):
        for name in names:
            with open(os.path.join(dirpath, name), "rb") as f:
                f.read()
            n += 1
    return n, time.perf_counter() - start


def _measure(argv: list[str], mountpoint: Path) -> dict[str, float]:
    proc = subprocess.Popen(argv, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL)
    assert proc.stderr is not None
    try:
        for line in proc.stderr:
            if b"mounted" in line:
                break
        else:
            sys.exit(f"bench: {' '.join(argv)} did not mount")
        (name,) = os.listdir(mountpoint)
        root = mountpoint / name
        big = root / "big.bin"
        size = big.stat().st_size
        out = {"cold": size / _read_all(big), "warm": size / _read_all(big)}
        n, seconds = _walk(root / "small")
        out["walk"] = n / seconds
        n, seconds = _walk(root / "small")  # what the kernel kept: entries, attributes, listings
        out["walk2"] = n / seconds
        n, seconds = _cat(root / "small")
        out["cat"] = n / seconds
        return out
    finally:
        proc.terminate()
        proc.wait(30)
        subprocess.run(["umount", "-l", str(mountpoint)], capture_output=True)


def main() -> None:
    if os.geteuid() != 0:
        sys.exit("bench: the raw /dev/fuse transport mounts with mount(2): run as root")
    if not (STORE / "pathinfo.sqlite").exists():
        from bench import bench_virtiofs

        bench_virtiofs.build_store()
    repeats = int(os.environ.get("TVIX_BENCH_REPEATS", "3"))
    mountpoint = fresh(WORK / "fuse-transport" / "mnt")
    store_args = [
        "--blob-service-addr",
        f"objectstore+file://{STORE / 'blobs'}",
        "--directory-service-addr",
        f"sqlite://{STORE / 'directories.sqlite'}",
        "--path-info-service-addr",
        f"sqlite://{STORE / 'pathinfo.sqlite'}",
    ]
    py = sys.executable
    transports = {
        "pyfuse3 (tvix-store mount)": [
            py,
            *("-m", "tvix.cli.store", "mount", "--list-root", *store_args, str(mountpoint)),
        ],
        "codec on /dev/fuse": [py, "-m", "bench.bench_fuse_transport", str(STORE), str(mountpoint)],
    }
    rows = []
    for label, argv in transports.items():
        runs = [_measure(argv, mountpoint) for _ in range(repeats)]
        med = {k: statistics.median(r[k] for r in runs) for k in runs[0]}
        rows.append(
            [
                label,
                mbps(int(med["cold"]), 1),
                mbps(int(med["warm"]), 1),
                rate(med["walk"], 1, " entries/s"),
                rate(med["walk2"], 1, " entries/s"),
                rate(med["cat"], 1, " files/s"),
            ]
        )
    table(
        f"host FUSE transports over one core (median of {repeats} mounts; "
        f"load {os.getloadavg()[0]:.1f})",
        [
            "transport",
            "256 MiB, fresh mount",
            "256 MiB again",
            "walk 2,000 files",
            "walk again",
            "read them",
        ],
        rows,
    )


if __name__ == "__main__":
    asyncio.run(_serve_raw(Path(sys.argv[1]), Path(sys.argv[2])))
