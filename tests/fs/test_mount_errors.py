"""A mount point that cannot be used is reported as such, with what to do."""

from __future__ import annotations

import signal
import subprocess
import sys
from pathlib import Path

import pytest

from tests.fs.mounting import Store, cli_env, force_unmount, mounted

pytestmark = pytest.mark.e2e


def _mount(store: Store, mountpoint: Path) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(
        [sys.executable, "-m", "tvix.cli.store", "mount", *store.args, str(mountpoint)],
        capture_output=True,
        env=cli_env(),
        timeout=60,
    )


def test_missing_mount_point(tmp_path: Path) -> None:
    proc = _mount(Store(tmp_path / "store"), tmp_path / "absent")
    assert proc.returncode == 1
    assert b"does not exist (create the directory)" in proc.stderr


def test_stale_mount_point_says_how_to_unmount(tmp_path: Path) -> None:
    store = Store(tmp_path / "store")
    mountpoint = tmp_path / "mnt"
    try:
        with mounted(store, mountpoint) as m:
            # A mount whose process dies leaves the kernel's mount behind: ENOTCONN.
            m.proc.send_signal(signal.SIGKILL)
            m.proc.wait(10)
            proc = _mount(store, mountpoint)
            assert proc.returncode == 1
            assert f"fusermount3 -u {mountpoint}".encode() in proc.stderr, proc.stderr
            assert len(proc.stderr.decode().strip().splitlines()) == 1
    finally:
        force_unmount(mountpoint)
