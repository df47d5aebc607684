"""Helpers for the nix-daemon tests: a raw protocol client, in-process and separate daemons."""

from __future__ import annotations

import asyncio
import contextlib
import shlex
import sys
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import pytest_asyncio

from tests.support.nix import Nix
from tests.support.processes import Server, clean_env, start_process
from tvix.castore.blobservice import MemoryBlobService
from tvix.castore.directoryservice import MemoryDirectoryService
from tvix.nix_daemon import NixDaemonServer, StoreServices, TrustPolicy, wire
from tvix.nixcompat import CAHash, CAKind, HashAlgo, build_ca_path, dump_path
from tvix.store.pathinfoservice import MemoryPathInfoService

# Operation codes used by the tests.
OP_IS_VALID_PATH = 1
OP_ADD_TO_STORE = 7
OP_ADD_TEXT_TO_STORE = 8
OP_BUILD_PATHS = 9
OP_QUERY_PATH_INFO = 26
OP_QUERY_VALID_PATHS = 31
OP_ADD_SIGNATURES = 37
OP_NAR_FROM_PATH = 38
OP_ADD_TO_STORE_NAR = 39
OP_ADD_MULTIPLE_TO_STORE = 44

V1_34 = 1 << 8 | 34


class DaemonError(Exception):
    """The daemon answered STDERR_ERROR with this message."""


class RawClient:
    """A hand-written worker protocol client, to send what Nix would (and would not)."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        self.version = 0
        self.daemon_version = ""
        self.trusted: int | None = None
        self.logs: list[str] = []

    @classmethod
    async def connect(cls, path: str, version: int = V1_34) -> RawClient:
        reader, writer = await asyncio.open_unix_connection(path)
        client = cls(reader, writer)
        await client.handshake(version)
        return client

    async def handshake(self, version: int) -> None:
        self.send(wire.enc_u64(wire.WORKER_MAGIC_1))
        assert await self.u64() == wire.WORKER_MAGIC_2
        daemon = await self.u64()
        self.version = min(version, daemon)
        self.send(wire.enc_u64(version), wire.enc_u64(0), wire.enc_u64(0))
        if wire.minor(self.version) >= 33:
            self.daemon_version = await self.string()
        if wire.minor(self.version) >= 35:
            self.trusted = await self.u64()
        await self.result()

    def send(self, *parts: bytes) -> None:
        self.writer.write(b"".join(parts))

    async def u64(self) -> int:
        return int.from_bytes(await self.reader.readexactly(8), "little")

    async def bytes_(self) -> bytes:
        n = await self.u64()
        data = await self.reader.readexactly(n + (-n & 7))
        return data[:n]

    async def string(self) -> str:
        return (await self.bytes_()).decode()

    async def strings(self) -> list[str]:
        return [await self.string() for _ in range(await self.u64())]

    async def result(self, source: bytes = b"") -> None:
        """Read stderr messages up to STDERR_LAST; raise DaemonError for STDERR_ERROR.

        ``source`` answers STDERR_READ requests (protocol < 1.23).
        """
        await self.writer.drain()
        while True:
            msg = await self.u64()
            if msg == wire.STDERR_LAST:
                return
            if msg == wire.STDERR_NEXT:
                self.logs.append(await self.string())
            elif msg == wire.STDERR_READ:
                n = await self.u64()
                piece, source = source[:n], source[n:]
                self.send(wire.enc_bytes(piece))
                await self.writer.drain()
            elif msg == wire.STDERR_ERROR:
                if wire.minor(self.version) >= 26:
                    assert await self.string() == "Error"
                    await self.u64()
                    await self.string()
                    message = await self.string()
                    assert await self.u64() == 0
                    assert await self.u64() == 0
                else:
                    message = await self.string()
                    await self.u64()
                raise DaemonError(message)
            else:
                raise AssertionError(f"unexpected stderr message {msg:#x}")

    async def is_valid(self, path: str) -> bool:
        self.send(wire.enc_u64(OP_IS_VALID_PATH), wire.enc_string(path))
        await self.result()
        return bool(await self.u64())

    async def path_info(self, path: str) -> dict[str, object] | None:
        self.send(wire.enc_u64(OP_QUERY_PATH_INFO), wire.enc_string(path))
        await self.result()
        if not await self.u64():
            return None
        info: dict[str, object] = {
            "deriver": await self.string(),
            "narHash": await self.string(),
            "references": await self.strings(),
            "registrationTime": await self.u64(),
            "narSize": await self.u64(),
            "ultimate": await self.u64(),
            "sigs": await self.strings(),
            "ca": await self.string(),
        }
        return info

    async def nar_from_path(self, path: str, size: int) -> bytes:
        self.send(wire.enc_u64(OP_NAR_FROM_PATH), wire.enc_string(path))
        await self.result()
        return await self.reader.readexactly(size)

    def add_to_store_nar_args(
        self,
        path: str,
        nar: bytes,
        *,
        nar_hash: str | None = None,
        nar_size: int | None = None,
        ca: str = "",
        refs: list[str] | None = None,
        sigs: list[str] | None = None,
        deriver: str = "",
        dont_check_sigs: bool = False,
    ) -> bytes:
        import hashlib

        return b"".join(
            [
                wire.enc_u64(OP_ADD_TO_STORE_NAR),
                wire.enc_string(path),
                wire.enc_string(deriver),
                wire.enc_string(nar_hash or hashlib.sha256(nar).hexdigest()),
                wire.enc_strings(refs or []),
                wire.enc_u64(0),
                wire.enc_u64(len(nar) if nar_size is None else nar_size),
                wire.enc_bool(False),
                wire.enc_strings(sigs or []),
                wire.enc_string(ca),
                wire.enc_bool(False),
                wire.enc_bool(dont_check_sigs),
            ]
        )

    async def close(self) -> None:
        self.writer.close()
        with contextlib.suppress(ConnectionError, BrokenPipeError):
            await self.writer.wait_closed()


def framed(data: bytes, frame: int = 4096) -> bytes:
    """``data`` as a framed source, ended by an empty frame."""
    parts = [
        wire.enc_u64(len(data[i : i + frame])) + data[i : i + frame]
        for i in range(0, len(data), frame)
    ]
    return b"".join(parts) + wire.enc_u64(0)


@dataclass(frozen=True)
class Nar:
    """A NAR of a local tree and the content-addressed store path it gets."""

    data: bytes
    path: str
    ca: str

    @property
    def sha256(self) -> bytes:
        import hashlib

        return hashlib.sha256(self.data).digest()


def nar_of(tree: Path, name: str | None = None) -> Nar:
    import hashlib

    data = b"".join(dump_path(tree))
    ca = CAHash(CAKind.NAR, HashAlgo.SHA256, hashlib.sha256(data).digest())
    path = build_ca_path(name or tree.name, ca).absolute_path
    return Nar(data, path, str(ca))


@dataclass
class InProcess:
    """A daemon in the test's event loop over memory services."""

    server: NixDaemonServer
    socket: str
    blobs: MemoryBlobService
    dirs: MemoryDirectoryService
    infos: MemoryPathInfoService

    async def client(self, version: int = V1_34) -> RawClient:
        return await RawClient.connect(self.socket, version)


StartInProcess = Callable[..., "asyncio.Future[InProcess]"]


@pytest_asyncio.fixture
async def daemon(tmp_path: Path) -> AsyncIterator[InProcess]:
    """A daemon trusting everyone, serving memory services on a socket in ``tmp_path``."""
    d = await _start(tmp_path / "d.sock", TrustPolicy(("*",)))
    yield d
    await d.server.stop()


@pytest_asyncio.fixture
async def untrusting_daemon(tmp_path: Path) -> AsyncIterator[InProcess]:
    """A daemon that trusts nobody."""
    d = await _start(tmp_path / "u.sock", TrustPolicy(()))
    yield d
    await d.server.stop()


async def _start(path: Path, policy: TrustPolicy) -> InProcess:
    blobs, dirs, infos = MemoryBlobService(), MemoryDirectoryService(), MemoryPathInfoService()
    server = NixDaemonServer(StoreServices(blobs, dirs, infos), str(path), policy)
    await server.start()
    return InProcess(server, str(path), blobs, dirs, infos)


# -- separate processes, for the real Nix --


class Daemon(Server):
    """A running ``tvix-store nix-daemon`` process."""

    @property
    def socket(self) -> Path:
        """The path of its socket."""
        return Path(self.address)

    @property
    def store(self) -> str:
        """The store URL Nix uses for it."""
        return f"unix://{self.socket}"


StartDaemon = Callable[..., Daemon]


@pytest.fixture
def start_daemon(store_args: list[str], tmp_path: Path) -> Iterator[StartDaemon]:
    """Start ``tvix-store -v nix-daemon ARGS`` on a socket in ``tmp_path``, on the shared store."""
    started: list[Daemon] = []

    def start(*args: str | Path, name: str = "daemon.sock") -> Daemon:
        argv = [
            sys.executable,
            "-m",
            "tvix.cli.store",
            "-v",
            "nix-daemon",
            "--listen-address",
            f"unix://{tmp_path / name}",
            *store_args,
            *map(str, args),
        ]
        server = start_process("nix-daemon", argv, r"listening on unix://(\S+)")
        daemon = Daemon(server.proc, server.address, server.log)
        started.append(daemon)
        return daemon

    yield start
    for daemon in started:
        daemon.stop()


def ssh_ng(nix: Nix, store_args: list[str], tmp_path: Path) -> tuple[dict[str, str], Path]:
    """An environment in which ``--store ssh-ng://tvix`` reaches the store, and its log file.

    Nix reads the files of a ``unix://`` store from the local file system
    (its daemon client is a LocalFSStore); only a remote store makes it ask
    the daemon for NARs (NarFromPath). ``ssh-ng://HOST`` runs ``ssh HOST
    nix-daemon --stdio``; this ``ssh`` runs ``tvix-store nix-daemon --stdio``
    on the store instead, as ``remote-program`` would on a real host.
    """
    bin_dir = tmp_path / "fake-ssh"
    bin_dir.mkdir(exist_ok=True)
    log = tmp_path / "stdio-daemon.log"
    ssh = bin_dir / "ssh"
    argv = [sys.executable, "-m", "tvix.cli.store", "-v", "nix-daemon", "--stdio", *store_args]
    ssh.write_text(f"#!/bin/sh\nexec {shlex.join(argv)} 2>>{shlex.quote(str(log))}\n")
    ssh.chmod(0o755)
    env = clean_env(nix.env)
    env["PATH"] = f"{bin_dir}:{nix.env.get('PATH', '/usr/bin:/bin')}"
    return env, log
