"""The store browser in-process: escaping, no scripts, big directories, bounded blob reads.

(The real-browser tests are in test_nar_bridge_browser; these need no browser.)
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import pytest
from aiohttp.test_utils import TestServer

from tests.support.daemons import fake_store_path
from tests.support.trees import make_tree
from tvix.castore.blobservice import MemoryBlobService
from tvix.castore.blobservice.base import BlobReader
from tvix.castore.digest import EMPTY_BLOB_DIGEST, B3Digest
from tvix.castore.directory import Directory
from tvix.castore.directoryservice import MemoryDirectoryService
from tvix.castore.nodes import DirectoryNode, FileNode
from tvix.nar_bridge import NarBridge, ui
from tvix.nar_bridge.site import build_app
from tvix.nar_bridge.ui import PAGE_SIZE, TEXT_LIMIT
from tvix.store.importer import import_path
from tvix.store.pathinfo import PathInfo
from tvix.store.pathinfoservice import MemoryPathInfoService

BIG = 100_000


class CountingBlobs(MemoryBlobService):
    """Counts the bytes read from its blobs."""

    read_bytes = 0

    async def open_read(self, digest: B3Digest) -> BlobReader | None:
        reader = await super().open_read(digest)
        if reader is None:
            return None
        inner = reader.read

        async def read(n: int = -1) -> bytes:
            data = await inner(n)
            self.read_bytes += len(data)
            return data

        reader.read = read  # type: ignore[method-assign]
        return reader


@dataclass
class Site:
    server: TestServer
    http: aiohttp.ClientSession
    blobs: CountingBlobs
    paths: dict[str, str]

    async def get(self, path: str, status: int = 200) -> str:
        async with self.http.get(self.server.make_url(path)) as r:
            body = await r.text()
            assert r.status == status, body
            if status == 200 and r.content_type == "text/html":
                assert "script-src" not in r.headers["Content-Security-Policy"]
                assert r.headers["Content-Security-Policy"].startswith("default-src 'none'")
                assert "<script" not in body.lower()
            return body


def _hash(path: str) -> str:
    return path.removeprefix("/nix/store/")[:32]


@pytest.fixture
async def site(tmp_path: Path) -> AsyncIterator[Site]:
    blobs, dirs, infos = CountingBlobs(), MemoryDirectoryService(), MemoryPathInfoService()
    tree = make_tree(tmp_path / "tree", big_size=1000)
    (tree / '"><img src=x onerror=alert(1)>').write_bytes(b"<script>alert(2)</script>")
    (tree / "long.txt").write_bytes(b"0123456789abcdef\n" * (4 * TEXT_LIMIT // 17))
    paths = {"tree": (await import_path(blobs, dirs, infos, tree)).store_path.absolute_path}

    # A directory of 100,000 entries, made directly (no filesystem).
    big = Directory(files=[FileNode(b"f%06d" % i, EMPTY_BLOB_DIGEST, 0) for i in range(BIG)])
    await dirs.put(big)
    store_path = fake_store_path("bigdir")
    await infos.put(
        PathInfo(
            store_path=store_path,
            node=DirectoryNode(store_path.absolute_path[11:].encode(), big.digest, big.size),
            nar_size=1,
            nar_sha256=bytes(32),
        )
    )
    paths["big"] = store_path.absolute_path
    server = TestServer(build_app(NarBridge(blobs, dirs, infos)), host="127.0.0.1")
    await server.start_server()
    async with aiohttp.ClientSession() as http:
        yield Site(server, http, blobs, paths)
    await server.close()


async def test_names_are_escaped_everywhere(site: Site) -> None:
    page = await site.get(f"/ui/path/{_hash(site.paths['tree'])}")
    assert "&#34;&gt;&lt;img src=x onerror=alert(1)&gt;" in page
    assert "<img" not in page
    assert "\\xff\\xfe-latin1-\\xe9/" in page
    href = re.search(r'href="([^"]*alert[^"]*)"', page)
    assert href is not None
    assert href[1].endswith("/%22%3E%3Cimg%20src%3Dx%20onerror%3Dalert%281%29%3E")
    view = await site.get(href[1])
    assert "&lt;script&gt;alert(2)&lt;/script&gt;" in view
    # Non-UTF-8 names travel as percent-encoded bytes, both ways.
    inner = await site.get(f"/ui/path/{_hash(site.paths['tree'])}/%FF%FE-latin1-%E9/f%E9")
    assert "non-utf8 names" in inner
    await site.get(f"/ui/path/{_hash(site.paths['tree'])}/%FF%FE-latin1-%E9/nothing", 404)
    await site.get("/ui/search?q=%3Cscript%3E")


async def test_a_directory_of_100000_entries_comes_a_page_at_a_time(site: Site) -> None:
    base = f"/ui/path/{_hash(site.paths['big'])}"
    first = await site.get(base)
    assert first.count('class="name"') == PAGE_SIZE
    assert "100,000 entries" in first
    assert "f000999" in first
    assert "f001000" not in first
    last_page = BIG // PAGE_SIZE
    last = await site.get(f"{base}?page={last_page}")
    assert last.count('class="name"') == PAGE_SIZE
    assert f"f{BIG - 1:06d}" in last
    assert 'rel="next"' not in last
    await site.get(f"{base}?page={last_page + 1}", 404)
    await site.get(f"{base}?page=0", 400)


async def test_a_file_view_reads_at_most_the_limit(site: Site) -> None:
    before = site.blobs.read_bytes
    view = await site.get(f"/ui/path/{_hash(site.paths['tree'])}/long.txt")
    assert site.blobs.read_bytes - before == TEXT_LIMIT
    assert "download the file for all of it" in view
    async with site.http.get(
        site.server.make_url(f"/ui/raw/{_hash(site.paths['tree'])}/long.txt")
    ) as r:
        assert r.headers["Content-Type"] == "application/octet-stream"
        assert len(await r.read()) == 17 * (4 * TEXT_LIMIT // 17)


async def test_front_page_and_search(site: Site) -> None:
    front = await site.get("/")
    assert re.search(r'id="store-paths">2<', front)
    found = await site.get("/ui/search?q=bigd")
    assert "bigdir" in found
    assert "tree" not in re.sub(r"<header>.*?</header>", "", found, flags=re.S)
    none = await site.get("/ui/search?q=zzz-nothing")
    assert 'id="no-results"' in none


class SlowToList(MemoryPathInfoService):
    """Lists only once ``go`` is set: a store whose first count takes a while."""

    def __init__(self) -> None:
        super().__init__()
        self.go = asyncio.Event()

    async def list(self) -> AsyncIterator[PathInfo]:  # type: ignore[override]
        await self.go.wait()
        async for info in super().list():
            yield info


async def test_front_page_says_it_is_counting(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(ui, "_FIRST_COUNT_WAIT", 0.1)
    infos = SlowToList()
    bridge = NarBridge(MemoryBlobService(), MemoryDirectoryService(), infos)
    server = TestServer(build_app(bridge), host="127.0.0.1")
    await server.start_server()
    try:
        async with aiohttp.ClientSession() as http:
            async with http.get(server.make_url("/")) as r:
                assert 'id="counting"' in await r.text()
            infos.go.set()
            for _ in range(100):
                async with http.get(server.make_url("/")) as r:
                    page = await r.text()
                if 'id="store-paths"' in page:
                    break
                await asyncio.sleep(0.05)
            assert re.search(r'id="store-paths">0<', page)
    finally:
        await server.close()
