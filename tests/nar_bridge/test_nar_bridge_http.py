"""nar-bridge's HTTP behaviour over a real socket: reads, ranges, uploads and refusals.

The server runs in-process on 127.0.0.1 (aiohttp's TestServer) over memory
services, so each test can look into the store afterwards; NAR bytes are
judged against ``nix-store --dump``.
"""

from __future__ import annotations

import base64
import bz2
import gzip
import hashlib
import logging
import lzma
import os
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import pytest
from aiohttp.test_utils import TestServer

from tests.support.nix import Nix
from tests.support.trees import make_tree
from tvix.castore.blobservice import MemoryBlobService
from tvix.castore.digest import B3Digest
from tvix.castore.directory import Directory
from tvix.castore.directoryservice import MemoryDirectoryService
from tvix.castore.nodes import DirectoryNode, FileNode
from tvix.castore.proto import node_to_proto
from tvix.nar_bridge import BasicAuth, NarBridge, NarFiles, encode_castore_nar
from tvix.nixcompat import nixbase32
from tvix.nixcompat.narinfo import NarInfo
from tvix.nixcompat.signing import SigningKey
from tvix.nixcompat.storepath import StorePath
from tvix.store.importer import import_path
from tvix.store.nar.seekable import NarLayout
from tvix.store.pathinfo import PathInfo
from tvix.store.pathinfoservice import MemoryPathInfoService

pytestmark = [pytest.mark.e2e, pytest.mark.nix]


@dataclass
class Cache:
    server: TestServer
    http: aiohttp.ClientSession
    bridge: NarBridge
    blobs: MemoryBlobService
    dirs: MemoryDirectoryService
    infos: MemoryPathInfoService

    def url(self, path: str) -> str:
        return str(self.server.make_url("/" + path.lstrip("/")))

    async def nar_url(self, store_path: str) -> str:
        narinfo = await self.get_narinfo(store_path)
        return self.url(narinfo.url)

    async def get_narinfo(self, store_path: str) -> NarInfo:
        async with self.http.get(self.url(_hash(store_path) + ".narinfo")) as r:
            assert r.status == 200, await r.text()
            return NarInfo.parse(await r.read())


def _hash(store_path: str) -> str:
    return store_path.removeprefix("/nix/store/")[:32]


async def _start(bridge: NarBridge) -> tuple[TestServer, aiohttp.ClientSession]:
    server = TestServer(bridge.make_app(), host="127.0.0.1")
    await server.start_server()
    return server, aiohttp.ClientSession(auto_decompress=False)


@pytest.fixture
async def make_cache() -> AsyncIterator[object]:
    opened: list[Cache] = []

    async def make(**options: object) -> Cache:
        blobs, dirs, infos = MemoryBlobService(), MemoryDirectoryService(), MemoryPathInfoService()
        bridge = NarBridge(blobs, dirs, infos, **options)  # type: ignore[arg-type]
        server, http = await _start(bridge)
        cache = Cache(server, http, bridge, blobs, dirs, infos)
        opened.append(cache)
        return cache

    yield make
    for cache in opened:
        await cache.http.close()
        await cache.server.close()


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    return make_tree(tmp_path / "tree", big_size=2 * 1024 * 1024 + 3)


async def _import(cache: Cache, path: Path) -> PathInfo:
    return await import_path(cache.blobs, cache.dirs, cache.infos, path)


async def test_cache_info_and_narinfo(make_cache: object, tree: Path, nix: Nix) -> None:
    key = SigningKey.generate("nb-http-1")
    cache: Cache = await make_cache(priority=41, signing_key=key)  # type: ignore[operator]
    info = await _import(cache, tree)
    store_path = info.store_path.absolute_path
    assert store_path == nix.add(tree)

    async with cache.http.get(cache.url("nix-cache-info")) as r:
        assert r.status == 200
        assert r.headers["Content-Type"] == "text/x-nix-cache-info"
        assert await r.text() == "StoreDir: /nix/store\nWantMassQuery: 1\nPriority: 41\n"

    async with cache.http.get(cache.url(_hash(store_path) + ".narinfo")) as r:
        assert r.status == 200
        assert r.headers["Content-Type"] == "text/x-nix-narinfo"
        text = await r.text()
    narinfo = NarInfo.parse(text)
    # Exactly as Nix renders it, plus our signature, with the NAR URL naming the root node.
    url = (
        f"nar/tvix-castore/{encode_castore_nar(info.node)}?narsize={info.nar_size}"
        f"&narhash={nixbase32.encode(info.nar_sha256)}"
    )
    assert text == info.with_signature(key).to_narinfo(url=url).render()
    assert narinfo.compression == "none"
    assert narinfo.verify([key.to_public()])
    assert nixbase32.encode(narinfo.nar_hash) == nix.hash_path(tree)

    async with cache.http.head(cache.url(_hash(store_path) + ".narinfo")) as r:
        assert r.status == 200
        assert await r.read() == b""
    missing = "0" * 32
    for method in ("GET", "HEAD"):
        async with cache.http.request(method, cache.url(missing + ".narinfo")) as r:
            assert r.status == 404
    async with cache.http.get(cache.url("not-a-hash.narinfo")) as r:
        assert r.status == 400
        assert "is not a store path hash" in await r.text()


async def test_nar_full_ranges_and_resume(make_cache: object, tree: Path, nix: Nix) -> None:
    cache: Cache = await make_cache()  # type: ignore[operator]
    info = await _import(cache, tree)
    dump = nix.dump(tree)
    url = await cache.nar_url(info.store_path.absolute_path)

    async with cache.http.get(url) as r:
        assert r.status == 200
        assert r.headers["Content-Type"] == "application/x-nix-nar"
        assert r.headers["Accept-Ranges"] == "bytes"
        assert int(r.headers["Content-Length"]) == len(dump)
        assert await r.read() == dump
    async with cache.http.head(url) as r:
        assert r.status == 200
        assert int(r.headers["Content-Length"]) == len(dump)
        assert await r.read() == b""
    # snix's nar-bridge names the same URLs nar/snix-castore/...: served alike.
    snix_url = url.replace("/nar/tvix-castore/", "/nar/snix-castore/")
    assert snix_url != url
    async with cache.http.get(snix_url) as r:
        assert r.status == 200
        assert await r.read() == dump

    big_start = dump.index(b"\x03\x00\x20\x00")  # the size field of big.bin, then its bytes
    for start in (1, 7, 8, 100, big_start, big_start + 1000, len(dump) - 1):
        async with cache.http.get(url, headers={"Range": f"bytes={start}-"}) as r:
            assert r.status == 206, start
            assert r.headers["Content-Range"] == f"bytes {start}-{len(dump) - 1}/{len(dump)}"
            assert await r.read() == dump[start:], start
    for a, b in ((0, 0), (5, 100), (big_start, big_start + 10), (big_start + 5, len(dump) + 50)):
        async with cache.http.get(url, headers={"Range": f"bytes={a}-{b}"}) as r:
            assert r.status == 206
            assert await r.read() == dump[a : b + 1]
    async with cache.http.get(url, headers={"Range": "bytes=-10"}) as r:
        assert r.status == 206
        assert await r.read() == dump[-10:]
    for bad in (f"bytes={len(dump)}-", f"bytes={len(dump) + 5}-{len(dump) + 9}", "bytes=-0"):
        async with cache.http.get(url, headers={"Range": bad}) as r:
            assert r.status == 416, bad
            assert r.headers["Content-Range"] == f"bytes */{len(dump)}"
    # Several ranges, another unit: ignored, the whole NAR comes back.
    for ignored in ("bytes=0-1,5-6", "items=0-5", "bytes=9-3"):
        async with cache.http.get(url, headers={"Range": ignored}) as r:
            assert r.status == 200
            assert await r.read() == dump

    # An interrupted download, resumed where it stopped, yields the same bytes.
    got = b""
    async with cache.http.get(url) as r:
        while len(got) < len(dump) // 2:
            got += await r.content.read(65536)
        r.close()
    async with cache.http.get(url, headers={"Range": f"bytes={len(got)}-"}) as r:
        got += await r.read()
    assert got == dump


def _b64(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


async def test_nar_url_is_client_input(make_cache: object, tree: Path) -> None:
    cache: Cache = await make_cache()  # type: ignore[operator]
    info = await _import(cache, tree)
    good = encode_castore_nar(info.node)
    # The root node as stored (named): URLs carry it without a name.
    named = node_to_proto(info.node).SerializeToString()
    short_digest = node_to_proto(FileNode(b"x", B3Digest(bytes(32)), 5))
    short_digest.file.name = b""
    short_digest.file.digest = bytes(31)
    cases = {
        "nar/tvix-castore/!!!": 400,
        "nar/tvix-castore/" + _b64(named): 400,
        "nar/tvix-castore/" + _b64(short_digest.SerializeToString()): 400,
        "nar/tvix-castore/" + _b64(b"\xff\xff\xff"): 400,
        "nar/tvix-castore/": 404,
        f"nar/tvix-castore/{good}?narsize={info.nar_size + 1}": 400,
        f"nar/tvix-castore/{good}?narsize=abc": 400,
        f"nar/tvix-castore/{good}": 200,  # narsize is optional
        "nar/tvix-castore/"
        + encode_castore_nar(DirectoryNode(b"x", B3Digest(bytes(32)), 1))
        + "?narsize=96": 404,
        "nar/tvix-castore/" + encode_castore_nar(FileNode(b"x", B3Digest(bytes(32)), 5)): 404,
        "nar/" + "0" * 52 + ".nar": 404,
        "nar/whatever": 404,
    }
    for path, status in cases.items():
        async with cache.http.get(cache.url(path)) as r:
            assert r.status == status, (path, await r.text())


async def test_failure_mid_stream_cuts_the_connection(
    make_cache: object, caplog: pytest.LogCaptureFixture
) -> None:
    cache: Cache = await make_cache()  # type: ignore[operator]
    present = b"present" * 100_000
    async with cache.blobs.open_write() as w:
        await w.write(present)
    ok = FileNode(b"a", await w.close(), len(present))
    lost = FileNode(b"b", B3Digest(hashlib.sha256(b"lost").digest()), 10)
    directory = Directory(files=[ok, lost])
    await cache.dirs.put(directory)
    store_path = StorePath(bytes(range(20)), "damaged")
    node = DirectoryNode(store_path.base_name.encode(), directory.digest, directory.size)
    nar_size = NarLayout(node, {directory.digest: directory}).size
    await cache.infos.put(PathInfo(store_path, node, nar_size, bytes(32)))
    url = await cache.nar_url(store_path.absolute_path)
    with caplog.at_level(logging.INFO, "tvix.nar_bridge"):
        async with cache.http.get(url) as r:
            assert r.status == 200
            with pytest.raises(aiohttp.ClientPayloadError):
                await r.read()
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert any(store_path.absolute_path in e and "is missing" in e for e in errors), errors


def _narinfo_for(store_path: StorePath, nar: bytes, url: str, **extra: object) -> bytes:
    sha = hashlib.sha256(nar).digest()
    fields: dict[str, object] = {"nar_hash": sha, "nar_size": len(nar), "compression": "none"}
    fields.update(extra)
    return NarInfo(store_path=store_path, url=url, **fields).render().encode()  # type: ignore[arg-type]


def _nar_name(body: bytes, ext: str = "") -> str:
    return f"nar/{nixbase32.encode(hashlib.sha256(body).digest())}.nar{ext}"


async def test_upload_flow(make_cache: object, tree: Path, nix: Nix) -> None:
    cache: Cache = await make_cache(allow_upload=True)  # type: ignore[operator]
    dump = nix.dump(tree)
    store_path = StorePath(os.urandom(20), "uploaded")
    deriver = StorePath(os.urandom(20), "uploaded.drv")
    ref = StorePath(os.urandom(20), "dep")

    async with cache.http.put(cache.url("nix-cache-info"), data=b"StoreDir: /nix/store\n") as r:
        assert r.status == 204
    body = lzma.compress(dump)
    name = _nar_name(body, ".xz")
    async with cache.http.head(cache.url(name)) as r:
        assert r.status == 404  # not uploaded yet: Nix uploads it
    async with cache.http.put(cache.url(name), data=body) as r:
        assert r.status == 200, await r.text()
    async with cache.http.head(cache.url(name)) as r:
        assert r.status == 200  # Nix would skip the upload now
    async with cache.http.get(cache.url(name)) as r:
        assert lzma.decompress(await r.read()) == dump  # compressed again, as it was

    narinfo = _narinfo_for(store_path, dump, name, references=[ref, store_path], deriver=deriver)
    async with cache.http.put(cache.url(store_path.hash_part + ".narinfo"), data=narinfo) as r:
        assert r.status == 200, await r.text()
    stored = await cache.infos.get(store_path.digest)
    assert stored is not None
    assert stored.node.name == store_path.base_name.encode()
    assert set(stored.references) == {ref, store_path}
    assert stored.deriver == deriver
    assert stored.nar_sha256 == hashlib.sha256(dump).digest()
    async with cache.http.get(await cache.nar_url(store_path.absolute_path)) as r:
        assert await r.read() == dump

    # An uncompressed upload is also served under its own name.
    plain = _nar_name(dump)
    async with cache.http.put(cache.url(plain), data=dump) as r:
        assert r.status == 200
    async with cache.http.get(cache.url(plain)) as r:
        assert await r.read() == dump


async def test_uploaded_files_served_after_restart(
    make_cache: object, tree: Path, nix: Nix, tmp_path: Path
) -> None:
    db = str(tmp_path / "state" / "uploads.sqlite")
    files = NarFiles(db)
    cache: Cache = await make_cache(allow_upload=True, nar_files=files)  # type: ignore[operator]
    dump = nix.dump(tree)
    xz_path, gz_path, twin = (StorePath(os.urandom(20), n) for n in ("xz", "gz", "twin"))
    xz_body, gz_body = lzma.compress(dump), gzip.compress(dump, mtime=0)
    # Nix 2.8 names gzip-compressed NARs plain .nar; its narinfo says gzip.
    uploads = [(xz_path, xz_body, _nar_name(xz_body, ".xz"), "xz")]
    uploads.append((gz_path, gz_body, _nar_name(gz_body), "gzip"))
    for store_path, body, name, compression in uploads:
        async with cache.http.put(cache.url(name), data=body) as r:
            assert r.status == 200, await r.text()
        narinfo = _narinfo_for(store_path, dump, name, compression=compression)
        async with cache.http.put(cache.url(store_path.hash_part + ".narinfo"), data=narinfo) as r:
            assert r.status == 200, await r.text()
    await files.close()

    # A new bridge on the same store and file: nothing uploaded in this process.
    again = NarBridge(
        cache.blobs, cache.dirs, cache.infos, allow_upload=True, nar_files=NarFiles(db)
    )
    server, http = await _start(again)
    try:
        url = lambda path: str(server.make_url("/" + path))  # noqa: E731
        xz_name, gz_name = uploads[0][2], uploads[1][2]
        async with http.head(url(xz_name)) as r:
            assert r.status == 200
        async with http.get(url(xz_name)) as r:
            assert r.status == 200
            assert lzma.decompress(await r.read()) == dump
        async with http.get(url(gz_name)) as r:
            assert r.status == 200
            assert gzip.decompress(await r.read()) == dump
        async with http.get(url(xz_name.replace(".xz", ".zst"))) as r:
            assert r.status == 404  # not the name it was uploaded under

        # Nix found the file (HEAD): it registers another path with the same NAR, no upload.
        narinfo = _narinfo_for(twin, dump, xz_name, compression="xz")
        async with http.put(url(twin.hash_part + ".narinfo"), data=narinfo) as r:
            assert r.status == 200, await r.text()
        twin_info = await cache.infos.get(twin.digest)
        assert twin_info is not None
        assert twin_info.nar_sha256 == hashlib.sha256(dump).digest()

        # A deleted path's file is gone; the twin still holds the xz one.
        for store_path in (xz_path, gz_path):
            assert await cache.infos.delete(store_path.digest)
        async with http.get(url(gz_name)) as r:
            assert r.status == 404
            assert "was not uploaded here, or its store path is gone" in await r.text()
        async with http.get(url(xz_name)) as r:
            assert lzma.decompress(await r.read()) == dump
        assert await cache.infos.delete(twin.digest)
        async with http.head(url(xz_name)) as r:
            assert r.status == 404
    finally:
        await http.close()
        await server.close()
        assert again.nar_files is not None
        await again.nar_files.close()


async def test_upload_refusals(make_cache: object, tree: Path, nix: Nix) -> None:
    cache: Cache = await make_cache(allow_upload=True)  # type: ignore[operator]
    dump = nix.dump(tree)
    store_path = StorePath(os.urandom(20), "refused")

    async def put(path: str, body: bytes) -> tuple[int, str]:
        async with cache.http.put(cache.url(path), data=body) as r:
            return r.status, await r.text()

    async def nothing_stored() -> None:
        assert await cache.infos.get(store_path.digest) is None
        async with cache.http.get(cache.url(store_path.hash_part + ".narinfo")) as r:
            assert r.status == 404

    # A narinfo whose NAR was never uploaded.
    status, text = await put(
        store_path.hash_part + ".narinfo", _narinfo_for(store_path, dump, _nar_name(dump))
    )
    assert status == 409
    assert "upload the NAR before its narinfo" in text
    assert text.count("\n") == 1
    await nothing_stored()

    # A truncated NAR: refused, not remembered, so its narinfo is refused too.
    cut = dump[: len(dump) // 2]
    status, text = await put(_nar_name(cut), cut)
    assert status == 400, text
    async with cache.http.head(cache.url(_nar_name(cut))) as r:
        assert r.status == 404
    status, _ = await put(
        store_path.hash_part + ".narinfo", _narinfo_for(store_path, dump, _nar_name(dump))
    )
    assert status == 409
    await nothing_stored()

    # A body whose sha256 is not the one its name says.
    status, text = await put(_nar_name(b"other"), dump)
    assert status == 400
    assert "sha256" in text

    # Corrupt or undecodable compression.
    xz = lzma.compress(dump)
    for bad_xz in (xz[:6] + b"\xff\xff" + xz[8:], xz[: len(xz) // 2]):
        status, text = await put(_nar_name(bad_xz, ".xz"), bad_xz)
        assert status == 400
        assert "corrupt xz data" in text
    lz4 = b"\x04\x22\x4d\x18" + bytes(100)
    status, _ = await put(_nar_name(lz4, ".lz4"), lz4)
    assert status == 415
    status, _ = await put(_nar_name(b"x" * 64, ".br"), b"x" * 64)
    assert status == 415

    # Uploaded fine, but the narinfo's NarHash or NarSize disagree.
    body = bz2.compress(dump)
    assert (await put(_nar_name(body, ".bz2"), body))[0] == 200
    wrong_size = _narinfo_for(store_path, dump, _nar_name(body, ".bz2"), nar_size=len(dump) + 8)
    status, text = await put(store_path.hash_part + ".narinfo", wrong_size)
    assert status == 400
    assert "NarSize" in text
    other = hashlib.sha256(b"other").digest()
    wrong_hash = _narinfo_for(store_path, dump, _nar_name(body, ".bz2"), nar_hash=other)
    status, text = await put(store_path.hash_part + ".narinfo", wrong_hash)
    assert status == 400
    assert "NarHash" in text
    # A narinfo under another path's name; a malformed one.
    status, _ = await put("1" * 32 + ".narinfo", _narinfo_for(store_path, dump, "nar/x.nar"))
    assert status == 400
    status, text = await put(store_path.hash_part + ".narinfo", b"StorePath: nope\n")
    assert status == 400
    await nothing_stored()


async def test_uploads_disabled_and_auth(
    make_cache: object, tree: Path, nix: Nix, caplog: pytest.LogCaptureFixture
) -> None:
    dump = nix.dump(tree)
    closed: Cache = await make_cache()  # type: ignore[operator]
    for path in ("nix-cache-info", _nar_name(dump), "1" * 32 + ".narinfo"):
        async with closed.http.put(closed.url(path), data=dump) as r:
            assert r.status == 403
            assert "uploads are disabled" in await r.text()
        # With Expect: 100-continue (as Nix sends) the refusal comes before the body.
        with caplog.at_level(logging.INFO, "tvix.nar_bridge"):
            async with closed.http.put(closed.url(path), data=dump, expect100=True) as r:
                assert r.status == 403
        assert "403 (before 100 Continue)" in caplog.text
        caplog.clear()

    guarded: Cache = await make_cache(  # type: ignore[operator]
        allow_upload=True, upload_auth=BasicAuth({"alice": "s3cret"})
    )
    name = _nar_name(dump)
    for auth in (None, _basic("alice", "nope"), _basic("bob", "s3cret"), "Bearer x"):
        headers = {"Authorization": auth} if auth else {}
        async with guarded.http.put(guarded.url(name), data=dump, headers=headers) as r:
            assert r.status == 401
            assert r.headers["WWW-Authenticate"].startswith("Basic ")
    good = {"Authorization": _basic("alice", "s3cret")}
    async with guarded.http.put(guarded.url(name), data=dump, headers=good, expect100=True) as r:
        assert r.status == 200, await r.text()
    # Reads stay open.
    async with guarded.http.get(guarded.url("nix-cache-info")) as r:
        assert r.status == 200


def _basic(user: str, password: str) -> str:
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()


async def test_full_nar_of_a_swapped_root_is_cut_short(
    make_cache: object, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # Issue 13, item 10: a PathInfo whose root was swapped for another stored
    # tree of the same shape and sizes; its narinfo names the other tree's NAR
    # with the claimed hash, and the full NAR must never arrive complete.
    cache: Cache = await make_cache()  # type: ignore[operator]
    infos = []
    for name, data in (("a", b"honest\n"), ("b", b"forged\n")):
        root = tmp_path / name
        root.mkdir()
        (root / "f").write_bytes(data * 300_000)
        infos.append(await _import(cache, root))
    honest, other = infos
    forged_path = StorePath(bytes(20), "forged")
    await cache.infos.put(
        PathInfo(
            forged_path,
            other.node.renamed(forged_path.base_name.encode()),
            honest.nar_size,
            honest.nar_sha256,
        )
    )
    async with cache.http.get(await cache.nar_url(honest.store_path.absolute_path)) as r:
        assert hashlib.sha256(await r.read()).digest() == honest.nar_sha256
    url = await cache.nar_url(forged_path.absolute_path)
    assert "narhash=" in url
    received = bytearray()

    async def receive(r: aiohttp.ClientResponse) -> None:
        async for chunk in r.content.iter_any():
            received.extend(chunk)

    with caplog.at_level(logging.INFO, "tvix.nar_bridge"):
        async with cache.http.get(url) as r:
            assert r.status == 200
            with pytest.raises(aiohttp.ClientPayloadError):
                await receive(r)
    assert len(received) < honest.nar_size
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert any("its PathInfo claims" in e for e in errors), errors
    # A malformed claim is refused before anything is sent.
    async with cache.http.get(url.replace("narhash=", "narhash=x")) as r:
        assert r.status == 400
