"""Fixtures for the command-line tests: a CLI runner, a Nix closure in binary caches."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support.fixtures import closure
from tests.support.services import Run


@pytest.fixture
def data_dir(tmp_path: Path) -> Path:
    return tmp_path / "data"


@pytest.fixture
def tvix_store(data_dir: Path) -> Run:
    """Run ``tvix-store ARGS`` in a separate process on a fresh data directory."""

    def run(
        *args: str | Path, check: bool = True, env: dict[str, str] | None = None
    ) -> subprocess.CompletedProcess[bytes]:
        full_env = {
            k: v
            for k, v in os.environ.items()
            if k not in ("BLOB_SERVICE_ADDR", "DIRECTORY_SERVICE_ADDR", "PATH_INFO_SERVICE_ADDR")
        }
        full_env["TVIX_STORE_DATA_DIR"] = str(data_dir)
        full_env.update(env or {})
        proc = subprocess.run(
            [sys.executable, "-m", "tvix.cli.store", *map(str, args)],
            capture_output=True,
            env=full_env,
            timeout=120,
        )
        if check and proc.returncode != 0:
            raise AssertionError(
                f"tvix-store {' '.join(map(str, args))} exited {proc.returncode}: "
                f"{proc.stderr.decode(errors='replace')}"
            )
        return proc

    return run


__all__ = ["closure", "data_dir", "tvix_store"]
