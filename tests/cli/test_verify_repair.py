"""``tvix-store verify --repair`` end to end: a byte flipped in a pack file or an object file
is found, removed, and restored by a re-import or a copy from another store, after which the
path renders exactly as ``nix-store --dump``."""

from __future__ import annotations

import random
import sqlite3
from collections.abc import Callable
from pathlib import Path

import blake3
import pytest

from tests.support.nix import Nix
from tests.support.services import Run

pytestmark = [pytest.mark.e2e, pytest.mark.nix]


def _tree(root: Path) -> tuple[Path, bytes]:
    """A tree with small files and one of many chunks; the digest of one small file."""
    r = random.Random(3)
    (root / "sub").mkdir(parents=True)
    small = r.randbytes(5000)
    (root / "sub" / "small").write_bytes(small)
    (root / "other").write_bytes(r.randbytes(7000))
    (root / "big").write_bytes(r.randbytes(1_500_000))
    (root / "link").symlink_to("sub/small")
    return root, blake3.blake3(small).digest()


def _flip(path: Path, offset: int) -> None:
    with path.open("r+b") as f:
        f.seek(offset)
        byte = f.read(1)
        f.seek(offset)
        f.write(bytes([byte[0] ^ 0x40]))


def _corrupt_packs(data_dir: Path, single: bytes) -> None:
    """Flip a byte inside the payload of chunk ``single`` and of one chunk of ``big``."""
    db = sqlite3.connect(data_dir / "packs" / "index.sqlite")
    try:
        rows = db.execute(
            "SELECT c.digest, p.name, c.offset, c.length FROM chunks c "
            "JOIN packs p ON p.id = c.pack ORDER BY c.length DESC"
        ).fetchall()
    finally:
        db.close()
    big_chunk = rows[0]  # the largest chunks are the big file's
    small_chunk = next(r for r in rows if r[0] == single)
    for _digest, pack, offset, length in (big_chunk, small_chunk):
        _flip(data_dir / "packs" / "packs" / f"{pack}.pack", offset + length // 2)


def _corrupt_objects(root: Path, single: bytes) -> None:
    """Flip a byte near the end of the object of chunk ``single`` and of a big chunk."""
    objects = sorted(
        (root / "chunks").rglob("*"), key=lambda p: p.stat().st_size if p.is_file() else 0
    )
    h = single.hex()
    for path in (objects[-1], root / "chunks" / "b3" / h[:4] / h):
        _flip(path, path.stat().st_size - 10)


def _source_store(tvix_store: Run, tree: Path, root: Path) -> Path:
    """A second store (a data directory) holding ``tree``; its composition file."""
    tvix_store("import", tree, env={"TVIX_STORE_DATA_DIR": str(root)})
    composition = root / "store.toml"
    composition.write_text(
        f"""
[blobservices.default]
type = "url"
url = "packs+file://{root}/packs"
[directoryservices.default]
type = "sqlite"
path = "{root}/directories.sqlite"
[pathinfoservices.default]
type = "sqlite"
path = "{root}/pathinfo.sqlite"
"""
    )
    return composition


def _damage_and_repair(
    tvix_store: Run, env: dict[str, str], path: str, corrupt: Callable[[], None], small: str
) -> None:
    """Corrupt, then: verify finds it, verify --repair removes it, verify lists the path."""
    corrupt()
    found = tvix_store("verify", env=env, check=False)
    assert found.returncode == 1
    out = found.stdout.decode()
    assert f"{path}/sub/small: blob {small}" in out, out
    assert f"{path}/big: blob" in out, out

    repaired = tvix_store("verify", "--repair", env=env, check=False)
    assert repaired.returncode == 1
    out = repaired.stdout.decode()
    assert "removed Directory" in out, out
    assert f"incomplete: {path}" in out, out
    assert "tvix-store copy --from" in repaired.stderr.decode()

    # The path is now incomplete (its root is gone), and nothing else is wrong.
    after = tvix_store("verify", env=env, check=False)
    assert after.returncode == 1
    assert after.stdout.decode().splitlines() == [
        line for line in after.stdout.decode().splitlines() if line.startswith(f"{path}: ")
    ]
    assert "is missing" in after.stdout.decode()
    assert tvix_store("dump-path", path, env=env, check=False).returncode == 1


def _repair_flow(
    tvix_store: Run, nix: Nix, tmp_path: Path, env: dict[str, str], corrupt: Callable[[bytes], None]
) -> None:
    tree, single = _tree(tmp_path / "tree")
    path = tvix_store("import", tree, env=env).stdout.decode().strip()
    composition = _source_store(tvix_store, tree, tmp_path / "source")

    # Restored by a copy from the second store.
    _damage_and_repair(tvix_store, env, path, lambda: corrupt(single), single.hex())
    copied = tvix_store("copy", "--from-store-composition", composition, path, env=env, check=False)
    assert copied.returncode == 0, copied.stderr
    assert "all intact" in tvix_store("verify", env=env).stderr.decode()
    assert tvix_store("dump-path", path, env=env).stdout == nix.dump(tree)

    # Damaged again, restored by importing the tree again.
    _damage_and_repair(tvix_store, env, path, lambda: corrupt(single), single.hex())
    assert tvix_store("import", tree, env=env).stdout.decode().strip() == path
    assert "all intact" in tvix_store("verify", env=env).stderr.decode()
    assert tvix_store("dump-path", path, env=env).stdout == nix.dump(tree)


def test_repair_of_a_pack_file(tvix_store: Run, nix: Nix, tmp_path: Path, data_dir: Path) -> None:
    _repair_flow(tvix_store, nix, tmp_path, {}, lambda single: _corrupt_packs(data_dir, single))


def test_repair_of_an_object_file(tvix_store: Run, nix: Nix, tmp_path: Path) -> None:
    objects = tmp_path / "objects"
    _repair_flow(
        tvix_store,
        nix,
        tmp_path,
        {"BLOB_SERVICE_ADDR": f"objectstore+file://{objects}"},
        lambda single: _corrupt_objects(objects, single),
    )
