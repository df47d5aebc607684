"""A full disk, writers that died: reads work, nothing is left behind (issue 13, items 5, 6)."""

from __future__ import annotations

from pathlib import Path

import pytest

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
    data_env: Path, tmp_path: Path, capfdbinary: pytest.CaptureFixture[bytes]
) -> None:
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
