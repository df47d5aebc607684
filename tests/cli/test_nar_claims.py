"""Commands that serve a whole store path check its NAR against the PathInfo (issue 13, item 10).

A PathInfo's root node is the store's word, its NAR hash and size the
(signed) claim: a PathInfo whose root was swapped for another stored tree
must make ``dump-path``, ``cat`` of a file root and ``extract`` fail, not
serve the other tree as valid.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from tvix.castore.blobservice import from_url as blobs_from_url
from tvix.castore.directoryservice import from_url as dirs_from_url
from tvix.cli.common import local_store_urls
from tvix.cli.store import main
from tvix.store.importer import import_path
from tvix.store.pathinfo import PathInfo
from tvix.store.pathinfoservice import from_url as infos_from_url


async def _store_forged(data: Path, honest: Path, other: Path) -> tuple[str, str]:
    """Import both; store ``honest``'s PathInfo again with ``other``'s root: (honest, forged)."""
    blob_url, dir_url, info_url = local_store_urls(data)
    data.mkdir(parents=True, exist_ok=True)
    blobs, dirs, infos = blobs_from_url(blob_url), dirs_from_url(dir_url), infos_from_url(info_url)
    try:
        a = await import_path(blobs, dirs, infos, honest)
        b = await import_path(blobs, dirs, infos, other)
        forged_path = a.store_path.__class__(bytes(20), a.store_path.name)
        forged = PathInfo(
            store_path=forged_path,
            node=b.node.renamed(forged_path.base_name.encode()),
            nar_size=a.nar_size,
            nar_sha256=a.nar_sha256,
        )
        await infos.put(forged)
        return a.store_path.absolute_path, forged_path.absolute_path
    finally:
        for service in (blobs, dirs, infos):
            await service.close()


@pytest.fixture
def store(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    for var in ("BLOB_SERVICE_ADDR", "DIRECTORY_SERVICE_ADDR", "PATH_INFO_SERVICE_ADDR"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.delenv("TVIX_STORE_COMPOSITION", raising=False)
    data = tmp_path / "data"
    monkeypatch.setenv("TVIX_STORE_DATA_DIR", str(data))
    return data


def _trees(tmp_path: Path, contents: tuple[bytes, bytes]) -> tuple[Path, Path]:
    out = []
    for name, data in zip(("a", "b"), contents, strict=True):
        root = tmp_path / name / "tree"
        (root / "sub").mkdir(parents=True)
        (root / "sub" / "f").write_bytes(data)
        (root / "g").write_bytes(data * 1000)
        out.append(root)
    return out[0], out[1]


def test_dump_path_refuses_a_swapped_root(
    store: Path, tmp_path: Path, capfdbinary: pytest.CaptureFixture[bytes]
) -> None:
    # Same shape and sizes, other bytes: only the NAR hash tells them apart.
    honest, other = _trees(tmp_path, (b"honest\n", b"forged\n"))
    good, forged = asyncio.run(_store_forged(store, honest, other))
    capfdbinary.readouterr()
    assert main(["dump-path", good]) == 0
    nar = capfdbinary.readouterr().out
    assert main(["dump-path", forged]) == 1
    out, err = capfdbinary.readouterr()
    assert len(out) < len(nar)  # never the whole of the other NAR
    assert "its PathInfo claims" in err.decode()
    assert len(err.decode().splitlines()) == 1
    # A path inside it has no claim to check.
    assert main(["dump-path", forged + "/sub"]) == 0


def test_cat_refuses_a_swapped_file_root(
    store: Path, tmp_path: Path, capfdbinary: pytest.CaptureFixture[bytes]
) -> None:
    (tmp_path / "x").write_bytes(b"honest\n")
    (tmp_path / "y").write_bytes(b"forged\n")
    good, forged = asyncio.run(_store_forged(store, tmp_path / "x", tmp_path / "y"))
    capfdbinary.readouterr()
    assert main(["cat", good]) == 0
    assert capfdbinary.readouterr().out == b"honest\n"
    assert main(["cat", forged]) == 1
    out, err = capfdbinary.readouterr()
    assert out == b""
    assert "its PathInfo claims" in err.decode()


def test_extract_refuses_a_swapped_root(
    store: Path, tmp_path: Path, capfdbinary: pytest.CaptureFixture[bytes]
) -> None:
    honest, other = _trees(tmp_path, (b"honest\n", b"forged\n"))
    good, forged = asyncio.run(_store_forged(store, honest, other))
    assert main(["extract", good, str(tmp_path / "good")]) == 0
    assert (tmp_path / "good" / "sub" / "f").read_bytes() == b"honest\n"
    capfdbinary.readouterr()
    assert main(["extract", forged, str(tmp_path / "bad")]) == 1
    assert "its PathInfo claims" in capfdbinary.readouterr().err.decode()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith("bad")]
    assert main(["extract", "--closure", forged, str(tmp_path / "bad2")]) == 1
    assert not [p for p in tmp_path.iterdir() if p.name.startswith("bad")]
