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


def test_client_default_is_the_local_store(tmp_path: Path, nix: Nix) -> None:
    """Without any address, commands open the data directory themselves: no daemon needed."""
    env = dict(os.environ)
    for var in ("BLOB_SERVICE_ADDR", "DIRECTORY_SERVICE_ADDR", "PATH_INFO_SERVICE_ADDR"):
        env.pop(var, None)
    env["XDG_DATA_HOME"] = str(tmp_path / "xdg")
    env.pop("TVIX_STORE_DATA_DIR", None)
    tree = make_tree(tmp_path / "tree")

    def run(*args: str) -> subprocess.CompletedProcess[bytes]:
        return subprocess.run(
            [sys.executable, "-m", "tvix.cli.store", *args], env=env, capture_output=True,
            timeout=120,
        )  # fmt: skip

    imported = run("import", str(tree))
    assert imported.returncode == 0, imported.stderr
    path = imported.stdout.decode().strip()
    assert path == nix.add(tree)
    assert (tmp_path / "xdg" / "tvix-store").is_dir()
    assert run("dump-path", path).stdout == nix.dump(tree)


def test_store_pointing_at_no_daemon_says_so_in_one_line(tmp_path: Path) -> None:
    # A daemon may well run at [::1]:8000 (./dev run): point at a port nothing listens on.
    host, port = _free_loopback_port()
    url = f"grpc+http://{host}:{port}"
    env = {**os.environ, "TVIX_STORE_ADDR": url}
    start = time.monotonic()
    proc = subprocess.run(
        [sys.executable, "-m", "tvix.cli.store", "path-info", "/nix/store/" + "0" * 32 + "-x"],
        env=env,
        capture_output=True,
        timeout=60,
    )
    assert proc.returncode == 1
    err = proc.stderr.decode()
    assert len(err.strip().splitlines()) == 1, err
    assert f"the store daemon at {url} does not answer" in err, err
    assert "is a tvix-store daemon running there?" in err
    assert time.monotonic() - start < 30
    assert common.DAEMON_URL == "grpc+http://[::1]:8000"


@pytest.mark.parametrize(
    ("args", "message", "code"),
    [
        (
            ["--blob-service-addr", "memory://", "--data-dir", "{tmp}/d"],
            "forgets everything when this command ends",
            1,
        ),
        (
            ["--data-dir", "{tmp}/d", "--store-composition", "{tmp}/c.toml"],
            "two different stores",
            2,
        ),
        (["--store", "ftp://x"], "expected a daemon", 2),
        (["--store", "grpc+http://[::1]:1", "--data-dir", "{tmp}/d"], "two stores", 2),
    ],
)
def test_store_options_that_contradict(
    tmp_path: Path, args: list[str], message: str, code: int
) -> None:
    (tmp_path / "c.toml").write_text("")
    proc = subprocess.run(
        [
            sys.executable, "-m", "tvix.cli.store", "path-info",
            *(a.format(tmp=tmp_path) for a in args), "/nix/store/" + "0" * 32 + "-x",
        ],
        capture_output=True,
        timeout=60,
    )  # fmt: skip
    assert proc.returncode == code, proc.stderr
    assert message in proc.stderr.decode()


def test_listen_address_errors(tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "tvix.cli.store", "daemon", "--listen-address", "nonsense"],
        env={**os.environ, "TVIX_STORE_DATA_DIR": str(tmp_path)},
        capture_output=True,
        timeout=60,
    )
    assert proc.returncode == 1
    assert "invalid listen address 'nonsense'" in proc.stderr.decode()


def test_busy_port_says_another_daemon_may_run(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        proc = subprocess.run(
            [
                sys.executable, "-m", "tvix.cli.store", "daemon",
                "--data-dir", str(tmp_path / "d"), "--listen-address", f"127.0.0.1:{port}",
            ],
            capture_output=True,
            timeout=60,
        )  # fmt: skip
    assert proc.returncode == 1
    err = proc.stderr.decode()
    assert "address already in use: is another daemon running?" in err
    assert len(err.strip().splitlines()) == 1, err
