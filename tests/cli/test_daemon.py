"""``tvix-store daemon`` in its own process, used by client commands in others."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.support.daemons import daemon
from tests.support.nix import Nix
from tests.support.services import Run
from tests.support.trees import make_tree

pytestmark = pytest.mark.nix


def _client_env(url: str) -> dict[str, str]:
    return {
        "BLOB_SERVICE_ADDR": url,
        "DIRECTORY_SERVICE_ADDR": url,
        "PATH_INFO_SERVICE_ADDR": url,
    }


@pytest.mark.parametrize("transport", ["tcp", "unix"])
def test_clients_through_daemon(tvix_store: Run, nix: Nix, tmp_path: Path, transport: str) -> None:
    listen = "127.0.0.1:0" if transport == "tcp" else f"unix://{tmp_path}/daemon.sock"
    data = tmp_path / "daemon-data"
    tree = make_tree(tmp_path / "tree", big_size=5 << 20)
    with daemon(listen, data_dir=data) as (proc, url):
        env = _client_env(url)
        store_path = tvix_store("import", tree, env=env).stdout.decode().strip()
        assert store_path == nix.add(tree)
        assert tvix_store("dump-path", store_path, env=env).stdout == nix.dump(tree)
        assert tvix_store("cat", store_path + "/regular.txt", env=env).stdout == b"hello\n"
        assert store_path in tvix_store("path-info", store_path, env=env).stdout.decode()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=20) == 0
    # What the daemon stored persists in its data directory.
    with daemon(listen, data_dir=data) as (_proc, url):
        assert tvix_store("dump-path", store_path, env=_client_env(url)).stdout == nix.dump(tree)


def test_client_default_is_the_daemon(tvix_store: Run, tmp_path: Path) -> None:
    env = dict(os.environ)
    env.pop("TVIX_STORE_DATA_DIR", None)
    for var in ("BLOB_SERVICE_ADDR", "DIRECTORY_SERVICE_ADDR", "PATH_INFO_SERVICE_ADDR"):
        env.pop(var, None)
    f = tmp_path / "f"
    f.write_bytes(b"x")
    start = time.monotonic()
    proc = subprocess.run(
        [sys.executable, "-m", "tvix.cli.store", "path-info", "/nix/store/" + "0" * 32 + "-x"],
        env=env,
        capture_output=True,
        timeout=60,
    )
    assert proc.returncode == 1
    err = proc.stderr.decode()
    assert "grpc+http://[::1]:8000" in err, err
    assert "UNAVAILABLE" in err
    assert time.monotonic() - start < 30


def test_listen_address_errors(tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "tvix.cli.store", "daemon", "--listen-address", "nonsense"],
        env={**os.environ, "TVIX_STORE_DATA_DIR": str(tmp_path)},
        capture_output=True,
        timeout=60,
    )
    assert proc.returncode == 1
    assert "invalid listen address 'nonsense'" in proc.stderr.decode()
