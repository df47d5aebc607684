"""Running ``tvix-store`` mounts in separate processes (or in a thread) for the FUSE tests."""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import subprocess
import sys
import threading
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from tvix.fs import StoreFs, serve

FUSE_DEVICE = "/dev/fuse"
MOUNT_TIMEOUT = 30.0


@dataclass(frozen=True)
class Store:
    """An embedded store on disk, shared by separate processes through its addresses."""

    root: Path

    @property
    def urls(self) -> tuple[str, str, str]:
        return (
            f"objectstore+file://{self.root / 'blobs'}",
            f"sqlite://{self.root / 'directories.sqlite'}",
            f"sqlite://{self.root / 'pathinfo.sqlite'}",
        )

    @property
    def args(self) -> list[str]:
        blob, directory, path_info = self.urls
        return [
            "--blob-service-addr",
            blob,
            "--directory-service-addr",
            directory,
            "--path-info-service-addr",
            path_info,
        ]


@dataclass(frozen=True)
class Imported:
    """Trees imported into a store: originals and store path base names."""

    store: Store
    tree: Path
    tree_name: str
    big: Path  # a file of many chunks, imported as a store path of its own
    big_name: str


def cli_env() -> dict[str, str]:
    """The environment minus anything that would point the CLI at another store."""
    drop = ("BLOB_SERVICE_ADDR", "DIRECTORY_SERVICE_ADDR", "PATH_INFO_SERVICE_ADDR")
    return {k: v for k, v in os.environ.items() if k not in drop and not k.startswith("TVIX_")}


def tvix_store(*args: str | Path) -> str:
    """Run ``tvix-store ARGS`` to completion; its stdout."""
    proc = subprocess.run(
        [sys.executable, "-m", "tvix.cli.store", *map(str, args)],
        capture_output=True,
        env=cli_env(),
        timeout=120,
    )
    if proc.returncode != 0:
        raise AssertionError(
            f"tvix-store {' '.join(map(str, args))} exited {proc.returncode}: "
            f"{proc.stderr.decode(errors='replace')}"
        )
    return proc.stdout.decode()


def import_paths(store: Store, *paths: Path) -> list[str]:
    """Import ``paths`` with ``tvix-store import``; their store path base names."""
    out = tvix_store("import", *store.args, *paths)
    return [line.rsplit("/", 1)[1] for line in out.split()]


def is_mounted(mountpoint: Path) -> bool:
    """Whether something is mounted at ``mountpoint`` (per /proc/mounts)."""
    want = str(mountpoint).replace(" ", "\\040")
    with open("/proc/mounts") as f:
        return any(line.split()[1] == want for line in f)


def mount_options(mountpoint: Path) -> list[str]:
    """The options /proc/mounts lists for ``mountpoint``."""
    with open("/proc/mounts") as f:
        for line in f:
            fields = line.split()
            if fields[1] == str(mountpoint):
                return fields[3].split(",")
    raise AssertionError(f"{mountpoint} is not mounted")


def force_unmount(mountpoint: Path) -> None:
    """Detach whatever is left at ``mountpoint`` (after a crashed or killed server)."""
    if not is_mounted(mountpoint):
        return
    fusermount = shutil.which("fusermount3") or shutil.which("fusermount")
    if fusermount is not None:
        subprocess.run([fusermount, "-u", "-z", str(mountpoint)], check=False)
    if is_mounted(mountpoint):
        subprocess.run(["umount", "-l", str(mountpoint)], check=False)


@dataclass
class MountProcess:
    """A running ``tvix-store mount`` and what it wrote to stderr so far."""

    proc: subprocess.Popen[bytes]
    mountpoint: Path
    stderr_lines: list[str] = field(default_factory=list)

    @property
    def stderr(self) -> str:
        return "".join(self.stderr_lines)

    def rchar(self) -> int:
        """Bytes the server process has read through read(2)-like calls so far."""
        with open(f"/proc/{self.proc.pid}/io") as f:
            for line in f:
                if line.startswith("rchar:"):
                    return int(line.split()[1])
        raise AssertionError("no rchar in /proc/PID/io")


@contextlib.contextmanager
def mounted(store: Store, mountpoint: Path, *extra: str) -> Iterator[MountProcess]:
    """``tvix-store mount`` of ``store`` at ``mountpoint`` in a separate process.

    Waits for its "mounted at" line. Whatever happens in the block, the process
    is stopped afterwards and nothing stays mounted.
    """
    mountpoint.mkdir(parents=True, exist_ok=True)
    proc = subprocess.Popen(
        [sys.executable, "-m", "tvix.cli.store", "mount", *store.args, *extra, str(mountpoint)],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        env=cli_env(),
    )
    m = MountProcess(proc, mountpoint)
    ready = threading.Event()

    def pump() -> None:
        assert proc.stderr is not None
        for raw in proc.stderr:
            line = raw.decode(errors="replace")
            m.stderr_lines.append(line)
            if "mounted at" in line:
                ready.set()
        ready.set()  # the process ended: stop waiting

    reader = threading.Thread(target=pump, daemon=True)
    reader.start()
    try:
        if not ready.wait(MOUNT_TIMEOUT) or proc.poll() is not None:
            raise AssertionError(f"tvix-store mount did not come up: {m.stderr}")
        assert is_mounted(mountpoint), f"mounted at, but not in /proc/mounts: {m.stderr}"
        yield m
    finally:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        force_unmount(mountpoint)
        reader.join(5)


class InProcessMount:
    """``tvix.fs.serve`` in a thread of this process, to look inside the filesystem.

    ``build`` is a coroutine function returning the :class:`~tvix.fs.StoreFs`
    to serve (built in the serving thread's loop, where its services live).
    """

    def __init__(self, build: Callable[[], Awaitable[StoreFs]], mountpoint: Path) -> None:
        self.build = build
        self.mountpoint = mountpoint
        self.fs: StoreFs | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        async def main() -> None:
            self._loop = asyncio.get_running_loop()
            self._stop = asyncio.Event()
            self.fs = await self.build()
            await serve(
                self.fs, self.mountpoint, on_mounted=lambda _: self._ready.set(), stop=self._stop
            )

        try:
            asyncio.run(main())
        except BaseException as e:
            self._error = e
        finally:
            self._ready.set()

    def __enter__(self) -> InProcessMount:
        self.mountpoint.mkdir(parents=True, exist_ok=True)
        self._thread.start()
        if not self._ready.wait(MOUNT_TIMEOUT) or self._error is not None:
            self.close()
            raise AssertionError(f"in-process mount failed: {self._error!r}")
        return self

    def close(self) -> None:
        """Stop serving (unmounts) and wait for the thread."""
        if self._loop is not None and self._stop is not None and self._thread.is_alive():
            self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(30)
        force_unmount(self.mountpoint)

    def __exit__(self, *exc: object) -> None:
        self.close()
        if self._error is not None:
            raise AssertionError(f"in-process mount failed: {self._error!r}")
