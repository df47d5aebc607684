"""Our servers and commands in processes of their own, on one on-disk store (no tests here).

The fixtures ``store_args`` and ``tvix_store`` (imported by the conftest of
each directory that uses them), and :func:`start_process`, which starts a
server (nar-bridge, nix-daemon) and waits for the line saying where it
listens, collecting its stderr meanwhile.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.support.services import Run

__all__ = ["Server", "clean_env", "start_process", "store_args", "tvix_store"]

#: The environment variables of ours that would change what a process serves.
_ENV_VARS = (
    "BLOB_SERVICE_ADDR",
    "DIRECTORY_SERVICE_ADDR",
    "PATH_INFO_SERVICE_ADDR",
    "TVIX_STORE_ADDR",
    "TVIX_STORE_DATA_DIR",
    "TVIX_STORE_COMPOSITION",
    "NAR_BRIDGE_UPLOAD_AUTH_FILE",
    "NAR_BRIDGE_LISTEN_ADDRESS",
    "NAR_BRIDGE_STATE_DIR",
    "TVIX_NIX_DAEMON_LISTEN_ADDRESS",
    "TVIX_NIX_DAEMON_TRUSTED",
    "TVIX_NIX_DAEMON_TRUSTED_PUBLIC_KEYS",
)


def clean_env(base: Mapping[str, str] | None = None) -> dict[str, str]:
    """``base`` (this process's environment) without the variables choosing a store or server."""
    return {k: v for k, v in (os.environ if base is None else base).items() if k not in _ENV_VARS}


@pytest.fixture
def store_args(tmp_path: Path) -> list[str]:
    """Service addresses of an embedded store on disk, shared by every process given them."""
    (tmp_path / "store").mkdir(exist_ok=True)
    return [
        "--blob-service-addr",
        f"objectstore+file://{tmp_path}/store/blobs",
        "--directory-service-addr",
        f"sqlite://{tmp_path}/store/dirs.sqlite",
        "--path-info-service-addr",
        f"sqlite://{tmp_path}/store/pathinfo.sqlite",
    ]


@pytest.fixture
def tvix_store(store_args: list[str]) -> Run:
    """Run ``tvix-store COMMAND ARGS`` as a separate process on the shared store."""

    def run(
        command: str, *args: str | Path, check: bool = True
    ) -> subprocess.CompletedProcess[bytes]:
        proc = subprocess.run(
            [sys.executable, "-m", "tvix.cli.store", command, *store_args, *map(str, args)],
            capture_output=True,
            env=clean_env(),
            timeout=120,
        )
        if check and proc.returncode != 0:
            raise AssertionError(
                f"tvix-store {command} {args} exited {proc.returncode}: "
                f"{proc.stderr.decode(errors='replace')}"
            )
        return proc

    return run


@dataclass
class Server:
    """A server of ours in its own process, and what its stderr said so far."""

    proc: subprocess.Popen[bytes]
    #: What its "listening on ADDRESS" line named.
    address: str
    log: list[str] = field(default_factory=list)

    def stop(self) -> int:
        """SIGTERM, then wait: the exit code (0 for a clean stop)."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait()

    def logged(self) -> str:
        return "".join(self.log)


def start_process(
    what: str,
    argv: Sequence[str],
    listening: str,
    env: dict[str, str] | None = None,
    timeout: float = 30,
) -> Server:
    """Start ``argv`` (called ``what`` in failures) until its stderr matches ``listening``.

    The pattern's first group is the server's address. Its stderr is drained
    all along (so it never blocks on a full pipe) into :attr:`Server.log`.
    """
    proc = subprocess.Popen(
        list(argv),
        stderr=subprocess.PIPE,
        stdout=subprocess.DEVNULL,
        env=clean_env() if env is None else env,
    )
    log: list[str] = []
    found = threading.Event()
    address: list[str] = []

    def pump() -> None:
        assert proc.stderr is not None
        for raw in proc.stderr:
            line = raw.decode(errors="replace")
            log.append(line)
            match = re.search(listening, line)
            if match and not address:
                address.append(match[1])
                found.set()
        found.set()

    threading.Thread(target=pump, daemon=True).start()
    deadline = time.monotonic() + timeout
    while not found.wait(0.1):
        if time.monotonic() > deadline:
            proc.kill()
            raise AssertionError(f"{what} did not start:\n{''.join(log)}")
    if not address:
        proc.wait(timeout=10)
        raise AssertionError(f"{what} exited {proc.returncode}:\n{''.join(log)}")
    return Server(proc, address[0], log)
