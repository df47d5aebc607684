"""Stores talking to stores (no tests here).

``tvix-store`` daemons and commands in their own processes, in-process gRPC
servers over memory services (optionally slow), diffing trees, relocated
PathInfos.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import re
import select
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from tests.support.grpc import running_server
from tvix.castore.blobservice import BlobReader, BlobService, BlobWriter, MemoryBlobService
from tvix.castore.digest import B3Digest
from tvix.castore.directory import Directory
from tvix.castore.directoryservice import DirectoryPutter, DirectoryService, MemoryDirectoryService
from tvix.castore.grpc import castore_servicers
from tvix.nixcompat.storepath import StorePath
from tvix.store.grpc import GRPCPathInfoServiceWrapper
from tvix.store.pathinfo import PathInfo
from tvix.store.pathinfoservice import MemoryPathInfoService, PathInfoService

_SERVICE_VARS = ("BLOB_SERVICE_ADDR", "DIRECTORY_SERVICE_ADDR", "PATH_INFO_SERVICE_ADDR")


#: ``tvix-store`` in a new process (the console script's module).
TVIX_STORE = [sys.executable, "-m", "tvix.cli.store"]
#: ``tvix-store extract`` in a new process.
EXTRACT = [*TVIX_STORE, "extract"]


def cli_env(url: str | None = None, **extra: str) -> dict[str, str]:
    """The environment of a client command: all three services at ``url`` (if given)."""
    env = {k: v for k, v in os.environ.items() if k not in _SERVICE_VARS}
    env.pop("TVIX_STORE_DATA_DIR", None)
    env.pop("TVIX_STORE_COMPOSITION", None)
    env.pop("TVIX_TRUSTED_PUBLIC_KEYS", None)
    if url is not None:
        env.update(dict.fromkeys(_SERVICE_VARS, url))
    env.update(extra)
    return env


def tvix_store(
    *args: str | Path, env: dict[str, str] | None = None, check: bool = True
) -> subprocess.CompletedProcess[bytes]:
    """``tvix-store ARGS`` in its own process, in :func:`cli_env` updated with ``env``.

    Checked (its exit status must be 0) unless ``check`` is false.
    """
    full_env = cli_env()
    full_env.update(env or {})
    proc = subprocess.run(
        [*TVIX_STORE, *map(str, args)], capture_output=True, env=full_env, timeout=120
    )
    if check and proc.returncode != 0:
        raise AssertionError(
            f"tvix-store {' '.join(map(str, args))} exited {proc.returncode}: "
            f"{proc.stderr.decode(errors='replace')}"
        )
    return proc


@contextmanager
def daemon(
    listen: str = "127.0.0.1:0",
    *,
    data_dir: Path | None = None,
    composition: Path | None = None,
    extra_args: tuple[str, ...] = (),
    timeout: float = 30,
) -> Iterator[tuple[subprocess.Popen[bytes], str]]:
    """``tvix-store daemon`` in its own process: the process and the URL it serves.

    Its store is ``data_dir`` (the embedded store) or ``composition``; ready
    once it says it listens; killed on exit if it still runs.
    """
    env = cli_env()
    if data_dir is not None:
        env["TVIX_STORE_DATA_DIR"] = str(data_dir)
    args = ["daemon", "--listen-address", listen]
    if composition is not None:
        args += ["--store-composition", str(composition)]
    args += extra_args
    proc = subprocess.Popen([*TVIX_STORE, *args], env=env, stderr=subprocess.PIPE)
    try:
        assert proc.stderr is not None
        deadline = time.monotonic() + timeout
        seen = b""
        while True:
            ready, _, _ = select.select([proc.stderr], [], [], 1)
            if ready:
                line = proc.stderr.readline()
                seen += line
                m = re.search(rb"listening on (\S+)", line)
                if m:
                    break
                if not line:
                    raise AssertionError(f"daemon exited: {seen.decode(errors='replace')}")
            if time.monotonic() > deadline:
                raise AssertionError(f"daemon did not start: {seen.decode(errors='replace')}")
        yield proc, m.group(1).decode()
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()


def diff(a: Path, b: Path) -> None:
    """Assert the trees are equal: names, contents, symlink targets (not followed)."""
    proc = subprocess.run(
        ["diff", "-r", "--no-dereference", str(a), str(b)], capture_output=True, timeout=60
    )
    assert proc.returncode == 0, proc.stdout.decode(errors="replace") + proc.stderr.decode()


def fake_store_path(name: str) -> StorePath:
    return StorePath(hashlib.sha256(name.encode()).digest()[:20], name)


def relocated(info: PathInfo, store_path: StorePath, refs: tuple[StorePath, ...] = ()) -> PathInfo:
    """``info``'s contents and NAR under another store path, with ``refs``, unsigned."""
    return PathInfo(
        store_path=store_path,
        node=info.node.renamed(store_path.base_name.encode()),
        nar_size=info.nar_size,
        nar_sha256=info.nar_sha256,
        references=refs,
    )


# -- in-process servers --------------------------------------------------------------------


@dataclass
class Calls:
    """What a slow service saw: calls started, finished, and cancelled while waiting."""

    started: int = 0
    finished: int = 0
    cancelled: int = 0
    events: list[str] = field(default_factory=list)


class _Slow:
    """Holds every read until ``gate`` is set, counting them in ``calls``."""

    def __init__(self, gate: asyncio.Event, calls: Calls) -> None:
        self.gate = gate
        self.calls = calls

    async def wait(self, what: str) -> None:
        self.calls.started += 1
        try:
            await self.gate.wait()
        except asyncio.CancelledError:
            self.calls.cancelled += 1
            self.calls.events.append(what)
            raise
        self.calls.finished += 1


class SlowBlobService(BlobService):
    """``inner``, each read answered once the gate of ``slow`` is set."""

    def __init__(self, inner: BlobService, slow: _Slow) -> None:
        self.inner = inner
        self.slow = slow

    async def has(self, digest: B3Digest) -> bool:
        await self.slow.wait("has")
        return await self.inner.has(digest)

    async def open_read(self, digest: B3Digest) -> BlobReader | None:
        await self.slow.wait("open_read")
        return await self.inner.open_read(digest)

    def open_write(self) -> BlobWriter:
        return self.inner.open_write()


class SlowDirectoryService(DirectoryService):
    def __init__(self, inner: DirectoryService, slow: _Slow) -> None:
        self.inner = inner
        self.slow = slow

    async def get(self, digest: B3Digest) -> Directory | None:
        await self.slow.wait("get directory")
        return await self.inner.get(digest)

    async def get_recursive(self, root: B3Digest) -> AsyncIterator[Directory]:
        await self.slow.wait("get_recursive")
        async for d in self.inner.get_recursive(root):
            yield d

    def put_multiple_start(self) -> DirectoryPutter:
        return self.inner.put_multiple_start()


class SlowPathInfoService(PathInfoService):
    def __init__(self, inner: PathInfoService, slow: _Slow) -> None:
        self.inner = inner
        self.slow = slow

    async def get(self, digest: bytes) -> PathInfo | None:
        await self.slow.wait("get pathinfo")
        return await self.inner.get(digest)

    async def put(self, info: PathInfo) -> PathInfo:
        return await self.inner.put(info)


@dataclass
class Memory:
    """Three memory services (what a test server serves)."""

    blobs: MemoryBlobService = field(default_factory=MemoryBlobService)
    dirs: MemoryDirectoryService = field(default_factory=MemoryDirectoryService)
    infos: MemoryPathInfoService = field(default_factory=MemoryPathInfoService)


@asynccontextmanager
async def serve(
    listen: str, memory: Memory, gate: asyncio.Event | None = None
) -> AsyncIterator[tuple[str, Calls]]:
    """A gRPC server in this process over ``memory``; with a ``gate``, each read is
    answered only once it is set (never, if nobody sets it), and counted."""
    calls = Calls()
    blobs: BlobService = memory.blobs
    dirs: DirectoryService = memory.dirs
    infos: PathInfoService = memory.infos
    if gate is not None:
        slow = _Slow(gate, calls)
        blobs = SlowBlobService(blobs, slow)
        dirs = SlowDirectoryService(dirs, slow)
        infos = SlowPathInfoService(infos, slow)
    servicers = [*castore_servicers(blobs, dirs), GRPCPathInfoServiceWrapper(infos, blobs, dirs)]
    async with running_server(listen, servicers) as server:
        yield server.url, calls
