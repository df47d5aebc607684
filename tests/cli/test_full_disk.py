"""A full disk, writers that died: reads work, nothing is left behind (issue 13, items 5, 6)."""

from __future__ import annotations

import os
import shutil
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.daemons import cli_env, daemon, tvix_store
from tvix.castore.blobservice.objectstore._local import STAGING
from tvix.cli.store import main


@pytest.fixture
def data_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    for var in ("BLOB_SERVICE_ADDR", "DIRECTORY_SERVICE_ADDR", "PATH_INFO_SERVICE_ADDR"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.delenv("TVIX_STORE_COMPOSITION", raising=False)
    data = tmp_path / "data"
    monkeypatch.setenv("TVIX_STORE_DATA_DIR", str(data))
    return data


def test_verify_reports_staging_files_of_dead_writers(
    data_env: Path,
    tmp_path: Path,
    capfdbinary: pytest.CaptureFixture[bytes],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Staging files are the object store's (a data directory's default is packs).
    monkeypatch.setenv("BLOB_SERVICE_ADDR", f"objectstore+file://{data_env / 'blobs'}")
    tree = tmp_path / "tree"
    tree.mkdir()
    (tree / "f").write_bytes(b"contents")
    assert main(["import", str(tree)]) == 0
    staging = data_env / "blobs" / STAGING
    staging.mkdir(exist_ok=True)
    pid = int(Path("/proc/sys/kernel/pid_max").read_text()) - 1
    while Path(f"/proc/{pid}").exists():
        pid -= 1
    stale = staging / f"{pid}.1.0"  # its writer was killed mid-write
    stale.write_bytes(b"half a chunk")
    capfdbinary.readouterr()
    assert main(["verify"]) == 0
    err = capfdbinary.readouterr().err.decode()
    assert f"removed a stale staging file: {stale}" in err
    assert "all intact" in err
    assert not stale.exists()


# -- a full disk (item 5) --------------------------------------------------------------------


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A 16 MiB tmpfs of its own, unmounted afterwards."""
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    mnt = tmp_path / f"disk-{uuid.uuid4().hex[:8]}"
    mnt.mkdir()
    proc = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=16m", "tmpfs", str(mnt)], capture_output=True
    )
    if proc.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs: {proc.stderr.decode().strip()}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def _fill(disk: Path) -> Path:
    filler = disk / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    try:
        for size in (64 << 10, 4096, 1):  # down to the last byte
            block = b"\0" * size
            try:
                while True:
                    os.write(fd, block)
            except OSError:
                pass
    finally:
        os.close(fd)
    assert shutil.disk_usage(disk).free == 0
    return filler


def _files(root: Path) -> set[Path]:
    # SQLite's shared-memory and log files come and go with every opening.
    return {p for p in root.rglob("*") if not p.name.endswith(("-shm", "-wal"))}


@pytest.mark.e2e
def test_reads_work_on_a_full_disk_and_writes_say_so(small_disk: Path, tmp_path: Path) -> None:
    data = small_disk / "data"
    env = cli_env(TVIX_STORE_DATA_DIR=str(data))
    tree = tmp_path / "tree"
    (tree / "sub").mkdir(parents=True)
    for i in range(20):
        (tree / "sub" / f"f{i}").write_bytes(f"file {i}\n".encode())
    (tree / "big").write_bytes(os.urandom(1 << 20))
    store_path = tvix_store("import", tree, env=env).stdout.decode().strip()
    nar = tvix_store("dump-path", store_path, env=env).stdout
    filler = _fill(small_disk)
    before = _files(data)

    # Reads, each opening the store afresh.
    assert "all intact" in tvix_store("verify", env=env).stderr.decode()
    assert store_path in tvix_store("path-info", store_path, env=env).stdout.decode()
    assert tvix_store("dump-path", store_path, env=env).stdout == nar

    # Writes fail saying why, in one line, and leave nothing behind.
    new = tmp_path / "new"
    new.mkdir()
    (new / "f").write_bytes(b"new contents\n")
    link_only = tmp_path / "link-only"
    link_only.mkdir()
    (link_only / "l").symlink_to("target")  # no blob: the database write fails
    for path in (new, link_only):
        proc = tvix_store("import", path, env=env, check=False)
        err = proc.stderr.decode()
        assert proc.returncode == 1
        assert "no space left on device" in err.lower()
        assert len(err.splitlines()) == 1, err
    assert _files(data) == before

    # A daemon started on the full disk serves reads; writes say why.
    with daemon(data_dir=data) as (_proc, url):
        client = cli_env(url)
        assert tvix_store("dump-path", store_path, env=client).stdout == nar
        assert store_path in tvix_store("path-info", store_path, env=client).stdout.decode()
        proc = tvix_store("import", link_only, env=client, check=False)
        assert proc.returncode == 1
        assert "no space left on device" in proc.stderr.decode().lower()
        assert _files(data) == before
        # Once there is room again, the same daemon writes.
        filler.unlink()
        imported = tvix_store("import", link_only, env=client).stdout.decode().strip()
        assert imported in tvix_store("path-info", imported, env=client).stdout.decode()
