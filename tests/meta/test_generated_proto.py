"""The generated protobuf code must match the .proto files (run ./dev proto to fix)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
GENERATED = [
    f"{name}{suffix}"
    for name in ("castore", "store", "snix_castore", "snix_store", "grpc_reflection_v1")
    for suffix in ("_pb2.py", "_pb2.pyi", "_pb2_grpc.py")
] + ["snix_castore.proto", "snix_store.proto"]


def test_generated_code_is_fresh(tmp_path: Path) -> None:
    subprocess.run(
        [str(ROOT / "scripts" / "gen-proto"), str(tmp_path)],
        check=True,
        env={"PYTHON": sys.executable, "PATH": "/usr/bin:/bin"},
    )
    stale = [
        name
        for name in GENERATED
        if (tmp_path / "tvix" / "_proto" / name).read_bytes()
        != (ROOT / "src" / "tvix" / "_proto" / name).read_bytes()
    ]
    assert not stale, f"generated code is stale, run ./dev proto: {stale}"
