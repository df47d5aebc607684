"""nix+http: read-through from binary caches written by the real Nix, served over HTTP.

The service is read-only, so the PathInfo conformance suite (which puts)
does not apply; these tests check what it promises instead: each
compression, trust as Nix decides it, verification of NAR hash, size and
content address with nothing referred to on failure, and its place in a
composition behind a cache.
"""

from __future__ import annotations

import hashlib
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from tests.support.fixtures import COMPRESSIONS, Closure
from tvix.castore.blobservice import MemoryBlobService
from tvix.castore.directoryservice import MemoryDirectoryService
from tvix.castore.errors import IntegrityError, InvalidURLError, StorageError
from tvix.castore.nodes import DirectoryNode, FileNode
from tvix.nixcompat.narinfo import NarInfo
from tvix.nixcompat.signing import VerifyingKey
from tvix.nixcompat.storepath import StorePath
from tvix.store import pathinfoservice
from tvix.store.binary_cache import BinaryCache
from tvix.store.composition import Composition
from tvix.store.errors import ListNotSupportedError, UntrustedPathInfoError
from tvix.store.nar import render_nar
from tvix.store.pathinfoservice.base import PathInfoService
from tvix.store.pathinfoservice.nix_http import NixHTTPPathInfoService
from tvix.store.testing.fixtures import path_info
from tvix.store.testing.pathinfoservice import PathInfoServiceTests

pytestmark = [pytest.mark.e2e, pytest.mark.nix]


def _digest(path: str) -> bytes:
    return StorePath.from_absolute_path(path).digest


def _service(
    url: str, keys: list[str] | None = None, require_sigs: bool = True
) -> NixHTTPPathInfoService:
    return NixHTTPPathInfoService(
        BinaryCache(url),
        MemoryBlobService(),
        MemoryDirectoryService(),
        trusted_keys=[VerifyingKey.parse(k) for k in keys or []],
        require_sigs=require_sigs,
    )


@pytest.fixture
async def trusting(closure: Closure) -> AsyncIterator[NixHTTPPathInfoService]:
    svc = _service(closure.cache_url("xz"), [closure.public])
    yield svc
    await svc.close()


async def _nar(svc: NixHTTPPathInfoService, node: object) -> bytes:
    parts = [p async for p in render_nar(svc._blobs, svc._dirs, node)]  # type: ignore[arg-type]
    return b"".join(parts)


@pytest.mark.parametrize("compression", COMPRESSIONS)
async def test_every_path_of_the_closure(closure: Closure, compression: str) -> None:
    svc = _service(closure.cache_url(compression), [closure.public])
    try:
        for path in closure.paths:
            info = await svc.get(_digest(path))
            assert info is not None, path
            want = closure.nix.path_info_json(path)
            assert info.store_path.absolute_path == path
            assert info.nar_size == want["narSize"]
            assert sorted(r.absolute_path for r in info.references) == sorted(want["references"])
            assert info.verify([VerifyingKey.parse(closure.public)])
            # The content, rendered back from castore, is the NAR Nix dumps.
            nar = await _nar(svc, info.node)
            assert nar == closure.nix.dump(closure.nix.store_file(path))
            assert hashlib.sha256(nar).digest() == info.nar_sha256
    finally:
        await svc.close()


async def test_metadata_of_built_path(closure: Closure, trusting: NixHTTPPathInfoService) -> None:
    info = await trusting.get(_digest(closure.built))
    assert info is not None
    want = closure.nix.path_info_json(closure.built)
    assert info.deriver is not None
    assert info.deriver.absolute_path == want["deriver"]
    assert info.ca is None
    assert info.store_path in info.references  # self-reference kept
    assert isinstance(info.node, FileNode)
    tree = await trusting.get(_digest(closure.tree))
    assert tree is not None
    assert isinstance(tree.node, DirectoryNode)
    assert str(tree.ca).startswith("fixed:r:sha256:")


async def test_absent_path(trusting: NixHTTPPathInfoService) -> None:
    assert await trusting.get(b"\x01" * 20) is None


async def test_read_only(trusting: NixHTTPPathInfoService) -> None:
    with pytest.raises(StorageError, match="read-only"):
        await trusting.put(path_info(1))
    assert not trusting.supports_list
    with pytest.raises(ListNotSupportedError):
        [i async for i in trusting.list()]


async def test_input_addressed_needs_a_trusted_signature(closure: Closure) -> None:
    other = closure.nix.generate_key("someone-else")[1]
    for keys in ([], [other]):
        svc = _service(closure.cache_url("none"), keys)
        try:
            with pytest.raises(UntrustedPathInfoError, match="scale-test-1"):
                await svc.get(_digest(closure.built))
            # Content-addressed paths pass without a trusted signature, as in Nix.
            for path in (closure.tree, closure.flat, closure.text):
                assert await svc.get(_digest(path)) is not None
        finally:
            await svc.close()
    svc = _service(closure.cache_url("none"), require_sigs=False)
    try:
        assert await svc.get(_digest(closure.built)) is not None
    finally:
        await svc.close()


def _rewrite(cache: Path, path: str, sign_with: Closure | None = None, **changes: object) -> None:
    """Replace fields of the narinfo of ``path`` (re-signed by the closure's key if asked)."""
    file = cache / f"{StorePath.from_absolute_path(path).hash_part}.narinfo"
    info = NarInfo.parse(file.read_bytes())
    import dataclasses

    info = dataclasses.replace(info, **changes)  # type: ignore[arg-type]
    if sign_with is not None:
        info = dataclasses.replace(info, signatures=()).sign(sign_with.secret)
    file.write_text(info.render())


async def test_wrong_nar_hash_or_size_stores_nothing(closure: Closure) -> None:
    cache, url = closure.copy_cache("zstd", "tamper-hash")
    good = _service(closure.cache_url("zstd"), [closure.public])
    tree = await good.get(_digest(closure.tree))
    await good.close()
    assert tree is not None
    assert isinstance(tree.node, DirectoryNode)
    _rewrite(cache, closure.built, closure, nar_hash=hashlib.sha256(b"x").digest())
    _rewrite(cache, closure.tree, closure, nar_size=tree.nar_size + 1)
    svc = _service(url, [closure.public])
    try:
        with pytest.raises(IntegrityError, match="NAR sha256"):
            await svc.get(_digest(closure.built))
        with pytest.raises(IntegrityError, match="NAR size"):
            await svc.get(_digest(closure.tree))
        # The tree's Directories were not stored: nothing refers to them.
        assert await svc._dirs.get(tree.node.digest) is None
    finally:
        await svc.close()


async def test_corrupt_nar_file(closure: Closure) -> None:
    cache, url = closure.copy_cache("none", "tamper-nar")
    narinfo = NarInfo.parse(
        (cache / f"{StorePath.from_absolute_path(closure.tree).hash_part}.narinfo").read_bytes()
    )
    nar_file = cache / narinfo.url
    data = bytearray(nar_file.read_bytes())
    data[data.index(b"big.bin") + 4096] ^= 0xFF  # inside the big file's contents
    nar_file.write_bytes(bytes(data))
    svc = _service(url, [closure.public])
    try:
        with pytest.raises(IntegrityError, match="NAR sha256"):
            await svc.get(_digest(closure.tree))
    finally:
        await svc.close()


async def test_signed_but_wrong_content_address(closure: Closure) -> None:
    # A narinfo that claims the flat file's CA over other content (hash and size
    # matching that content, signed by a trusted key) must still be refused.
    cache, url = closure.copy_cache("none", "tamper-ca")
    flat = NarInfo.parse(
        (cache / f"{StorePath.from_absolute_path(closure.flat).hash_part}.narinfo").read_bytes()
    )
    built = NarInfo.parse(
        (cache / f"{StorePath.from_absolute_path(closure.built).hash_part}.narinfo").read_bytes()
    )
    _rewrite(
        cache,
        closure.flat,
        closure,
        url=built.url,
        nar_hash=built.nar_hash,
        nar_size=built.nar_size,
        file_hash=built.file_hash,
        file_size=built.file_size,
    )
    assert flat.ca is not None
    svc = _service(url, [closure.public])
    try:
        with pytest.raises(IntegrityError, match="content address"):
            await svc.get(_digest(closure.flat))
    finally:
        await svc.close()


async def test_narinfo_for_another_path(closure: Closure) -> None:
    cache, url = closure.copy_cache("none", "tamper-path")
    tree_file = cache / f"{StorePath.from_absolute_path(closure.tree).hash_part}.narinfo"
    built_file = cache / f"{StorePath.from_absolute_path(closure.built).hash_part}.narinfo"
    tree_file.write_bytes(built_file.read_bytes())
    svc = _service(url, [closure.public])
    try:
        with pytest.raises(IntegrityError, match="is for"):
            await svc.get(_digest(closure.tree))
    finally:
        await svc.close()


async def test_not_a_binary_cache(closure: Closure) -> None:
    svc = _service(closure.http_url + "/no-such-cache", [closure.public])
    try:
        with pytest.raises(StorageError, match="does not appear to be a Nix binary cache"):
            await svc.get(_digest(closure.tree))
    finally:
        await svc.close()
    # Nothing listens: a storage error naming the URL, not a hang or a crash.
    svc = _service("http://127.0.0.1:1", [closure.public])
    try:
        with pytest.raises(StorageError, match=r"127\.0\.0\.1:1"):
            await svc.get(_digest(closure.tree))
    finally:
        await svc.close()


async def test_file_cache(closure: Closure) -> None:
    svc = _service(f"file://{closure.caches['bzip2']}", [closure.public])
    try:
        info = await svc.get(_digest(closure.built))
        assert info is not None
        assert await svc.get(b"\x02" * 20) is None
    finally:
        await svc.close()


async def test_concurrent_lookups_share_one_download(
    closure: Closure, trusting: NixHTTPPathInfoService
) -> None:
    import asyncio

    calls = 0
    fetch = trusting._fetch

    async def counting(digest: bytes) -> object:
        nonlocal calls
        calls += 1
        return await fetch(digest)

    trusting._fetch = counting  # type: ignore[method-assign,assignment]
    results = await asyncio.gather(*(trusting.get(_digest(closure.tree)) for _ in range(5)))
    assert calls == 1
    assert all(r == results[0] for r in results)


async def test_composition_cache_in_front(closure: Closure, tmp_path: Path) -> None:
    cache, url = closure.copy_cache("xz", "composed")
    composition = Composition.from_toml(
        f"""
        [blobservices.default]
        type = "objectstore"
        url = "objectstore+file://{tmp_path}/blobs"

        [directoryservices.default]
        type = "sqlite"
        path = "{tmp_path}/dirs.sqlite"

        [pathinfoservices.default]
        type = "cache"
        near = "local"
        far = "upstream"

        [pathinfoservices.local]
        type = "sqlite"
        path = "{tmp_path}/pathinfo.sqlite"

        [pathinfoservices.upstream]
        type = "nix"
        url = "{url}"
        trusted_public_keys = "{closure.public}"
        """
    )
    async with composition:
        infos = composition.path_info_service()
        first = await infos.get(_digest(closure.built))
        assert first is not None
        # Fetched once: with the cache gone, the near service still answers.
        import shutil

        shutil.rmtree(cache)
        again = await infos.get(_digest(closure.built))
        assert again == first
        blobs, dirs = composition.blob_service(), composition.directory_service()
        nar = b"".join([p async for p in render_nar(blobs, dirs, again.node)])
        assert nar == closure.nix.dump(closure.nix.store_file(closure.built))


async def test_from_urls_and_url_options(closure: Closure) -> None:
    keys = closure.public.replace("+", "%2B")
    url = "nix+" + closure.cache_url("zstd") + f"?trusted-public-keys={keys}"
    async with Composition.from_urls("memory://", "memory://", url) as composition:
        info = await composition.path_info_service().get(_digest(closure.built))
        assert info is not None
    with pytest.raises(InvalidURLError, match="composition"):
        pathinfoservice.from_url(url)
    # A bare '+' in a key becomes a space in a URL: the message says what to do.
    if "+" in closure.public:
        bad = "nix+" + closure.cache_url("zstd") + f"?trusted-public-keys={closure.public}"
        with pytest.raises(InvalidURLError, match="%2B"):
            pathinfoservice.from_url(bad)


class TestConformance(PathInfoServiceTests):
    """The shipped suite, against a file:// cache the real ``nix copy`` wrote.

    The service is read-only and cannot list: the suite checks that put and
    list fail as the contract says and skips what needs them.
    """

    @pytest.fixture
    async def path_info_service(self, closure: Closure) -> AsyncIterator[PathInfoService]:
        svc = _service(f"file://{closure.caches['xz']}", [closure.public])
        yield svc
        await svc.close()
