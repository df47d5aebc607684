"""NAR rendering, ingestion and import, judged byte for byte by the real Nix."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest

from tests.support.nix import Nix
from tests.support.services import Services
from tvix.castore import DirectoryNode
from tvix.castore.errors import StorageError
from tvix.castore.ingest import ingest_path
from tvix.nixcompat import nixbase32
from tvix.nixcompat.errors import NARError
from tvix.nixcompat.signing import SigningKey
from tvix.store.errors import NarMismatchError
from tvix.store.importer import ImportPathError, import_path
from tvix.store.nar import NarCalculator, calculate_nar, ingest_nar_stream, render_nar

pytestmark = pytest.mark.nix


async def _render(s: Services, node: object) -> bytes:
    return b"".join([p async for p in render_nar(s.blobs, s.dirs, node)])  # type: ignore[arg-type]


def _reader(data: bytes, step: int = 7919):  # type: ignore[no-untyped-def]
    pos = 0

    async def read(n: int) -> bytes:
        nonlocal pos
        out = data[pos : pos + min(n, step)]
        pos += len(out)
        return out

    return read


def _cases(tmp_path: Path, tree: Path) -> list[Path]:
    single = tmp_path / "single.sh"
    single.write_bytes(b"#!/bin/sh\n")
    single.chmod(0o755)
    link = tmp_path / "toplink"
    link.symlink_to("/some/where")
    empty = tmp_path / "emptydir"
    empty.mkdir()
    return [tree, single, link, empty]


async def test_render_equals_nix_dump(
    nix: Nix, tree: Path, tmp_path: Path, services: Services
) -> None:
    for path in _cases(tmp_path, tree):
        node = await ingest_path(services.blobs, services.dirs, path)
        nar = await _render(services, node)
        assert nar == nix.dump(path), path
        size, sha = await calculate_nar(services.blobs, services.dirs, node)
        assert (size, sha) == (len(nar), hashlib.sha256(nar).digest())
        assert nixbase32.encode(sha) == nix.hash_path(path)


async def test_import_equals_nix_store_add(
    nix: Nix, tree: Path, tmp_path: Path, services: Services
) -> None:
    for path in _cases(tmp_path, tree):
        info = await import_path(services.blobs, services.dirs, services.infos, path)
        assert info.store_path.absolute_path == nix.add(path)
        want = nix.path_info_json(info.store_path.absolute_path)
        assert want["narSize"] == info.nar_size
        assert (
            want["narHash"] == "sha256-" + __import__("base64").b64encode(info.nar_sha256).decode()
        )
        assert want["ca"] == str(info.ca)
        assert await services.infos.get(info.store_path.digest) == info


async def test_nix_nar_ingests_and_renders_back(
    nix: Nix, tree: Path, tmp_path: Path, services: Services
) -> None:
    for path in _cases(tmp_path, tree):
        nar = nix.dump(path)
        node, size, sha = await ingest_nar_stream(
            services.blobs, services.dirs, _reader(nar), b"x", expected_sha256=None
        )
        assert (size, sha) == (len(nar), hashlib.sha256(nar).digest())
        assert await _render(services, node) == nar
        # Same content, same castore identity as ingesting the tree itself.
        direct = await ingest_path(services.blobs, services.dirs, path, name=b"x")
        assert node == direct


async def test_nar_mismatch_stores_nothing(nix: Nix, tree: Path, services: Services) -> None:
    nar = nix.dump(tree)
    with pytest.raises(NarMismatchError, match="sha256"):
        await ingest_nar_stream(
            services.blobs, services.dirs, _reader(nar), b"x", expected_sha256=bytes(32)
        )
    with pytest.raises(NarMismatchError, match="longer than the expected"):
        await ingest_nar_stream(
            services.blobs, services.dirs, _reader(nar), b"x", expected_size=len(nar) - 8
        )
    assert services.dirs._directories == {}


@pytest.mark.parametrize(
    ("mangle", "message"),
    [
        (lambda nar: nar[: len(nar) // 2], "truncat|end"),
        (lambda nar: nar + b"\0" * 8, "trailing"),
        (lambda nar: b"nix-archive-2" + nar[13:], "magic"),
    ],
    ids=["truncated", "trailing", "bad-magic"],
)
async def test_hostile_nar_stores_nothing(
    nix: Nix, tree: Path, services: Services, mangle: object, message: str
) -> None:
    nar = mangle(nix.dump(tree))  # type: ignore[operator]
    with pytest.raises(NARError, match=message):
        await ingest_nar_stream(services.blobs, services.dirs, _reader(nar), b"x")
    assert services.dirs._directories == {}


async def test_render_missing_blob_fails(tree: Path, services: Services) -> None:
    node = await ingest_path(services.blobs, services.dirs, tree)
    services.blobs._blobs.clear()
    with pytest.raises(StorageError, match=r"blob [0-9a-f]{64} \(b'big.bin'\) is missing"):
        await _render(services, node)


async def test_calculator_caches(tree: Path, services: Services) -> None:
    node = await ingest_path(services.blobs, services.dirs, tree)
    calc = NarCalculator(services.blobs, services.dirs)
    first = await calc.calculate(node)
    services.blobs._blobs.clear()  # a second computation would now fail
    assert isinstance(node, DirectoryNode)
    assert await calc.calculate(node.renamed(b"other-name")) == first


async def test_import_rejects_invalid_name(tmp_path: Path, services: Services) -> None:
    bad = tmp_path / "has space"
    bad.write_bytes(b"x")
    with pytest.raises(ImportPathError, match="has space"):
        await import_path(services.blobs, services.dirs, services.infos, bad)


@pytest.mark.parametrize("signed", [False, True])
async def test_narinfo_equals_nix_file_cache(
    nix: Nix, tree: Path, tmp_path: Path, services: Services, signed: bool
) -> None:
    info = await import_path(services.blobs, services.dirs, services.infos, tree)
    store_path = nix.add(tree)
    cache = tmp_path / "cache"
    key_file = None
    if signed:
        secret, _public = nix.generate_key("test-key-1")
        key_file = tmp_path / "sk"
        key_file.write_text(secret)
        info = info.with_signature(SigningKey.parse(secret))
    nix.copy_to_file_cache(store_path, cache, secret_key_file=key_file)
    assert info.to_narinfo().render().encode() == nix.narinfo_from_file_cache(cache, store_path)
    assert os.path.exists(cache / f"nar/{nixbase32.encode(info.nar_sha256)}.nar")
