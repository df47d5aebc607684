"""Crash safety of the embedded store and ``tvix-store verify``."""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import blake3
import pytest

from tests.support.services import Run
from tests.support.trees import make_tree

pytestmark = pytest.mark.e2e


def _chunk_file(data_dir: Path, content: bytes) -> Path:
    digest = blake3.blake3(content).hexdigest()
    matches = list((data_dir / "blobs").rglob(digest))
    assert len(matches) == 1, matches
    return matches[0]


def test_verify_healthy_and_damaged(tvix_store: Run, tmp_path: Path, data_dir: Path) -> None:
    tree = make_tree(tmp_path / "tree", big_size=10)
    other = tmp_path / "other"
    other.mkdir()
    (other / "victim").write_bytes(b"this chunk will be damaged" * 10)
    (other / "sub").mkdir()
    (other / "sub" / "f").write_bytes(b"x")
    good = tvix_store("import", tree).stdout.decode().strip()
    bad = tvix_store("import", other).stdout.decode().strip()
    proc = tvix_store("verify")
    assert "verified 2 store paths: all intact" in proc.stderr.decode()

    chunk = _chunk_file(data_dir, b"this chunk will be damaged" * 10)
    chunk.write_bytes(chunk.read_bytes()[:-3] + b"xyz")
    proc = tvix_store("verify", check=False)
    assert proc.returncode == 1
    out = proc.stdout.decode()
    assert f"{bad}/victim: blob" in out
    assert good not in out
    # Only the damaged path when naming paths.
    assert tvix_store("verify", good).returncode == 0

    # A Directory gone from the database is reported with the path it holds.
    db = sqlite3.connect(data_dir / "directories.sqlite")
    rows = db.execute("SELECT digest FROM directories").fetchall()
    db.execute("DELETE FROM directories")
    db.commit()
    db.close()
    assert rows
    proc = tvix_store("verify", check=False)
    assert proc.returncode == 1
    assert f"{good}: Directory" in proc.stdout.decode()
    assert "is missing" in proc.stdout.decode()


def _start_import(data_dir: Path, path: Path) -> subprocess.Popen[bytes]:
    env = dict(os.environ, TVIX_STORE_DATA_DIR=str(data_dir))
    for var in ("BLOB_SERVICE_ADDR", "DIRECTORY_SERVICE_ADDR", "PATH_INFO_SERVICE_ADDR"):
        env.pop(var, None)
    return subprocess.Popen(
        [sys.executable, "-m", "tvix.cli.store", "import", str(path)],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )


def _wait_for_objects(proc: subprocess.Popen[bytes], root: Path, n: int) -> None:
    """Return once ``n`` files exist below ``root`` (or ``proc`` ended); fail after 60 s."""
    deadline = time.monotonic() + 60
    while proc.poll() is None:
        if root.exists() and sum(1 for p in root.rglob("*") if p.is_file()) >= n:
            return
        assert time.monotonic() < deadline, f"the import wrote fewer than {n} objects in 60 s"
        time.sleep(0.05)


def test_sigkill_mid_import(tvix_store: Run, tmp_path: Path, data_dir: Path) -> None:
    tree = tmp_path / "big"
    tree.mkdir()
    # Many files and a large one, so the import takes a while.
    for d in range(40):
        sub = tree / f"d{d:02}"
        sub.mkdir()
        for f in range(100):
            (sub / f"f{f:03}").write_bytes(os.urandom(2000) + b"%d/%d" % (d, f))
    (tree / "large.bin").write_bytes(os.urandom(64 << 20))
    small = tmp_path / "small"
    small.mkdir()
    (small / "a").write_bytes(b"a")
    small_path = tvix_store("import", small).stdout.decode().strip()

    # Killed at two points of the import, each decided by what it has written (not by
    # how long it ran): as soon as its first blob object exists, and once it has
    # written many (well into the small files or the large one).
    for attempt, objects in enumerate((1, 1000)):
        proc = _start_import(data_dir, tree)
        _wait_for_objects(proc, data_dir / "blobs", objects)
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
        proc.wait()
        if attempt == 0:
            assert proc.returncode == -signal.SIGKILL, "the import ended before it was killed"
        # The store opens without repair and whatever it lists is complete.
        verified = tvix_store("verify")
        assert "all intact" in verified.stderr.decode()
        assert small_path in tvix_store("path-info", small_path).stdout.decode()

    done = tvix_store("import", tree).stdout.decode().strip()
    assert done.endswith("-big")
    assert tvix_store("verify", done).returncode == 0
