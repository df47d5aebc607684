"""Fixtures for the nar-bridge tests: a shared on-disk store, nar-bridge processes, the real Nix."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.support.nix import Nix

_ENV_VARS = (
    "BLOB_SERVICE_ADDR",
    "DIRECTORY_SERVICE_ADDR",
    "PATH_INFO_SERVICE_ADDR",
    "TVIX_STORE_COMPOSITION",
    "NAR_BRIDGE_UPLOAD_AUTH_FILE",
    "NAR_BRIDGE_LISTEN_ADDRESS",
)


def _clean_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if k not in _ENV_VARS}


@pytest.fixture
def store_args(tmp_path: Path) -> list[str]:
    """Service addresses of an embedded store on disk, shared by every process given them."""
    return [
        "--blob-service-addr",
        f"objectstore+file://{tmp_path}/store/blobs",
        "--directory-service-addr",
        f"sqlite://{tmp_path}/store/dirs.sqlite",
        "--path-info-service-addr",
        f"sqlite://{tmp_path}/store/pathinfo.sqlite",
    ]


Run = Callable[..., subprocess.CompletedProcess[bytes]]


@pytest.fixture
def tvix_store(store_args: list[str], tmp_path: Path) -> Run:
    """Run ``tvix-store COMMAND ARGS`` as a separate process on the shared store."""
    (tmp_path / "store").mkdir(exist_ok=True)

    def run(
        command: str, *args: str | Path, check: bool = True
    ) -> subprocess.CompletedProcess[bytes]:
        proc = subprocess.run(
            [sys.executable, "-m", "tvix.cli.store", command, *store_args, *map(str, args)],
            capture_output=True,
            env=_clean_env(),
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
class Bridge:
    """A running ``nar-bridge`` process."""

    proc: subprocess.Popen[bytes]
    url: str
    log: list[str] = field(default_factory=list)

    def stop(self) -> int:
        """SIGTERM, then wait: the exit code (0 for a clean shutdown)."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait()

    def logged(self) -> str:
        return "".join(self.log)


StartBridge = Callable[..., Bridge]


@pytest.fixture
def start_bridge(store_args: list[str], tmp_path: Path) -> Iterator[StartBridge]:
    """Start ``nar-bridge ARGS`` on 127.0.0.1 (a free port) serving the shared store."""
    (tmp_path / "store").mkdir(exist_ok=True)
    started: list[Bridge] = []

    def start(*args: str | Path) -> Bridge:
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "tvix.cli.nar_bridge",
                "-v",
                "--listen-address",
                "127.0.0.1:0",
                *store_args,
                *map(str, args),
            ],
            stderr=subprocess.PIPE,
            stdout=subprocess.DEVNULL,
            env=_clean_env(),
        )
        log: list[str] = []
        found = threading.Event()
        url: list[str] = []

        def pump() -> None:
            # Keep draining stderr so the server never blocks on a full pipe.
            assert proc.stderr is not None
            for raw in proc.stderr:
                line = raw.decode(errors="replace")
                log.append(line)
                match = re.search(r"listening on (http://\S+)", line)
                if match and not url:
                    url.append(match[1])
                    found.set()
            found.set()

        threading.Thread(target=pump, daemon=True).start()
        deadline = time.monotonic() + 30
        while not found.wait(0.1):
            if time.monotonic() > deadline:
                proc.kill()
                raise AssertionError(f"nar-bridge did not start:\n{''.join(log)}")
        if not url:
            proc.wait(timeout=10)
            raise AssertionError(f"nar-bridge exited {proc.returncode}:\n{''.join(log)}")
        bridge = Bridge(proc, url[0], log)
        started.append(bridge)
        return bridge

    yield start
    for bridge in started:
        bridge.stop()


@dataclass(frozen=True)
class Closure:
    """Input-addressed and content-addressed paths with references, built by Nix."""

    tree: str  # content-addressed (fixed:r:sha256), no references
    text: str  # text:sha256, refers to tree
    built: str  # input-addressed, with a Deriver, refers to tree, text and itself

    @property
    def paths(self) -> list[str]:
        return [self.tree, self.text, self.built]


@pytest.fixture(scope="session")
def closure(nix: Nix, tmp_path_factory: pytest.TempPathFactory) -> Closure:
    """A small closure in the session's Nix chroot store."""
    from tests.support.trees import make_tree

    tree = nix.add(make_tree(tmp_path_factory.mktemp("closure") / "nb-tree", big_size=300_000))
    text = nix.add_text("nb-text", "refers to the tree", [tree])
    built = nix.build("nb-built", references=[tree, text])
    return Closure(tree, text, built)
