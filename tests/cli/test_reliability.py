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


def _damage_chunk(data_dir: Path, content: bytes) -> None:
    """Overwrite the last bytes of ``content``'s payload in its pack."""
    digest = blake3.blake3(content).digest()
    db = sqlite3.connect(data_dir / "packs" / "index.sqlite")
    name, offset, length = db.execute(
        "SELECT p.name, c.offset, c.length FROM chunks c JOIN packs p ON p.id = c.pack "
        "WHERE c.digest = ?",
        (digest,),
    ).fetchone()
    db.close()
    with (data_dir / "packs" / "packs" / f"{name}.pack").open("r+b") as f:
        f.seek(offset + length - 3)
        f.write(b"xyz")


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

    _damage_chunk(data_dir, b"this chunk will be damaged" * 10)
    proc = tvix_store("verify", check=False)
    assert proc.returncode == 1
    out = proc.stdout.decode()
    assert f"{bad}/victim: blob" in out
    assert "cannot be read" in out
    assert good not in out
    # The read that found it dropped the damaged chunk: now it is missing, for a
    # re-import to store again (see test_verify_repair.py).
    proc = tvix_store("verify", check=False)
    assert proc.returncode == 1
    assert f"{bad}/victim: blob" in proc.stdout.decode()
    assert "is missing" in proc.stdout.decode()
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


def _wait_for_pack_bytes(proc: subprocess.Popen[bytes], root: Path, n: int) -> None:
    """Return once the packs below ``root`` hold ``n`` bytes (or ``proc`` ended); fail
    after 60 s."""
    deadline = time.monotonic() + 60
    while proc.poll() is None:
        if root.exists() and sum(p.stat().st_size for p in root.glob("*.pack")) >= n:
            return
        assert time.monotonic() < deadline, f"the import wrote fewer than {n} bytes in 60 s"
        time.sleep(0.02)


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
    # how long it ran): as soon as its first chunk is in a pack, and once it has
    # written 4 MiB (well into the small files or the large one).
    for attempt, nbytes in enumerate((len(b"TVIXPCK1") + 1, 4 << 20)):
        proc = _start_import(data_dir, tree)
        _wait_for_pack_bytes(proc, data_dir / "packs" / "packs", nbytes)
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
        proc.wait()
        if attempt == 0:
            assert proc.returncode == -signal.SIGKILL, "the import ended before it was killed"
        # The store opens without repair and whatever it lists is complete
        # (verify also reads every indexed chunk and checks packs against the index).
        verified = tvix_store("verify")
        assert "all intact" in verified.stderr.decode()
        assert small_path in tvix_store("path-info", small_path).stdout.decode()

    done = tvix_store("import", tree).stdout.decode().strip()
    assert done.endswith("-big")
    assert tvix_store("verify", done).returncode == 0


def test_old_objectstore_data_dir_keeps_working(
    tvix_store: Run, tmp_path: Path, data_dir: Path
) -> None:
    """A data directory from before packs (objectstore+file in DIR/blobs) is opened as it is."""
    from tvix.cli.common import local_blob_url

    tree = make_tree(tmp_path / "tree", big_size=10)
    old = tvix_store(
        "import", tree, env={"BLOB_SERVICE_ADDR": f"objectstore+file://{data_dir}/blobs"}
    )
    store_path = old.stdout.decode().strip()
    assert local_blob_url(data_dir).startswith("objectstore+file://")
    assert tvix_store("verify", store_path).returncode == 0
    assert not (data_dir / "packs").exists()
    # A fresh data directory gets the packed store.
    assert local_blob_url(tmp_path / "fresh").startswith("packs+file://")
