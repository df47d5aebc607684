"""``tvix-store virtiofs`` as a command: its errors before any VM connects."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest

from tests.support.daemons import tvix_store

pytestmark = pytest.mark.e2e


def test_a_stale_socket_path_is_a_one_line_error(tmp_path: Path) -> None:
    path = tmp_path / "vfs.sock"
    dead = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    dead.bind(str(path))
    dead.close()
    proc = tvix_store("virtiofs", "--data-dir", tmp_path / "store", path, check=False)
    assert proc.returncode == 1
    err = proc.stderr.decode()
    assert "stale socket" in err
    assert "remove it" in err
    assert path.exists()  # not ours to remove: the user decides


def test_list_root_needs_a_service_that_can_list(tmp_path: Path) -> None:
    proc = tvix_store(
        "virtiofs",
        "--list-root",
        "--path-info-service-addr",
        "nix+https://cache.example.org",
        "--data-dir",
        tmp_path / "store",
        tmp_path / "vfs.sock",
        check=False,
    )
    assert proc.returncode == 1
    assert "cannot list" in proc.stderr.decode()
