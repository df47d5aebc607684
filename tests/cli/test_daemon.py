"""``tvix-store daemon`` in its own process, used by client commands in others."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.support.daemons import daemon
from tests.support.nix import Nix
from tests.support.services import Run
from tests.support.trees import make_tree
from tvix.cli import common

pytestmark = [pytest.mark.e2e, pytest.mark.nix]


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


def _free_loopback_port() -> tuple[str, int]:
    """A TCP port nothing listens on right now, on [::1] (or 127.0.0.1 without IPv6)."""
    try:
        with socket.socket(socket.AF_INET6) as s:
            s.bind(("::1", 0))
            return "[::1]", s.getsockname()[1]
    except OSError:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            return "127.0.0.1", s.getsockname()[1]


def test_client_default_is_the_daemon(tmp_path: Path) -> None:
    # Without addresses or a data directory, client commands talk to upstream's default...
    assert common.DAEMON_URL == "grpc+http://[::1]:8000"
    # ...where a daemon may well be running (./dev run): so the command runs with the
    # default pointed at a port nothing listens on, and must fail naming it.
    host, port = _free_loopback_port()
    url = f"grpc+http://{host}:{port}"
    env = dict(os.environ)
    env.pop("TVIX_STORE_DATA_DIR", None)
    for var in ("BLOB_SERVICE_ADDR", "DIRECTORY_SERVICE_ADDR", "PATH_INFO_SERVICE_ADDR"):
        env.pop(var, None)
    code = (
        "import sys; import tvix.cli.common as c; c.DAEMON_URL = sys.argv.pop(1); "
        "from tvix.cli.store import main; sys.exit(main())"
    )
    start = time.monotonic()
    proc = subprocess.run(
        [sys.executable, "-c", code, url, "path-info", "/nix/store/" + "0" * 32 + "-x"],
        env=env,
        capture_output=True,
        timeout=60,
    )
    assert proc.returncode == 1
    err = proc.stderr.decode()
    assert url in err, err
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
