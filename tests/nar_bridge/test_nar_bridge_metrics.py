"""nar-bridge's /metrics: request counts by route and status, bytes, uploads, store counts."""

from __future__ import annotations

import asyncio
import shutil
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest
from aiohttp.test_utils import TestServer
from prometheus_client.parser import text_string_to_metric_families

from tests.support.trees import make_tree
from tvix.castore.blobservice import MemoryBlobService
from tvix.castore.directoryservice import MemoryDirectoryService
from tvix.nar_bridge import NarBridge
from tvix.nar_bridge.site import build_app
from tvix.store.importer import import_path
from tvix.store.pathinfoservice import MemoryPathInfoService
from tvix.store.stats import store_stats


@pytest.fixture
async def served(tmp_path: Path) -> AsyncIterator[tuple[TestServer, NarBridge, list[str]]]:
    blobs, dirs, infos = MemoryBlobService(), MemoryDirectoryService(), MemoryPathInfoService()
    tree = make_tree(tmp_path / "tree", big_size=100_000)
    twin = tmp_path / "twin"
    shutil.copytree(tree, twin, symlinks=True)
    (twin / "extra").write_bytes(b"only in the twin")
    paths = [
        (await import_path(blobs, dirs, infos, p)).store_path.absolute_path for p in (tree, twin)
    ]
    bridge = NarBridge(blobs, dirs, infos)
    server = TestServer(build_app(bridge, stats_interval=3600), host="127.0.0.1")
    await server.start_server()
    yield server, bridge, paths
    await server.close()


def _samples(text: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, frozenset(s.labels.items()))] = s.value
    return out


def _value(
    samples: dict[tuple[str, frozenset[tuple[str, str]]], float], name: str, **labels: str
) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


async def test_metrics_count_requests_bytes_uploads_and_the_store(
    served: tuple[TestServer, NarBridge, list[str]],
) -> None:
    server, bridge, paths = served
    hash_part = paths[0].removeprefix("/nix/store/")[:32]
    async with aiohttp.ClientSession() as http:

        async def get(path: str) -> bytes:
            async with http.get(server.make_url(path)) as r:
                return await r.read()

        narinfo = (await get(f"/{hash_part}.narinfo")).decode()
        url = next(x for x in narinfo.splitlines() if x.startswith("URL: ")).removeprefix("URL: ")
        nar = await get("/" + url)
        await get(f"/{'0' * 32}.narinfo")
        await get("/no/such/thing")
        async with http.put(server.make_url(f"/{hash_part}.narinfo"), data=b"x" * 10) as r:
            assert r.status == 403
        for _ in range(100):  # the store's first count runs in the background
            async with http.get(server.make_url("/metrics")) as r:
                assert r.status == 200
                assert r.headers["Content-Type"].startswith("text/plain")
                samples = _samples(await r.text())
            if _value(samples, "tvix_store_paths"):
                break
            await asyncio.sleep(0.05)

    total = "nar_bridge_http_requests_total"
    assert _value(samples, total, route="/{hash}.narinfo", method="GET", status="200") == 1
    assert _value(samples, total, route="/{hash}.narinfo", method="GET", status="404") == 1
    assert _value(samples, total, route="unmatched", method="GET", status="404") == 1
    assert _value(samples, total, route="/{hash}.narinfo", method="PUT", status="403") == 1
    nar_route = "/nar/tvix-castore/{node}"
    assert _value(samples, "nar_bridge_http_response_bytes_total", route=nar_route) == len(nar)
    assert (
        _value(
            samples, "nar_bridge_http_request_duration_seconds_count", route=nar_route, method="GET"
        )
        == 1
    )
    assert _value(samples, "nar_bridge_uploads_total", kind="narinfo", outcome="refused") == 1

    stats = await store_stats(bridge.path_infos.list(), bridge.directories)
    assert _value(samples, "tvix_store_paths") == 2
    assert _value(samples, "tvix_store_nar_bytes") == stats.nar_bytes
    assert _value(samples, "tvix_store_blob_bytes") == stats.blob_bytes
    assert _value(samples, "tvix_store_blobs") == len(stats.blobs)
    assert _value(samples, "tvix_store_dedup_ratio") == pytest.approx(stats.dedup_ratio)
    assert stats.dedup_ratio > 1.5  # the twin shares all but one file


async def test_disk_bytes_of_a_data_directory(tmp_path: Path) -> None:
    data = tmp_path / "data"
    data.mkdir()
    (data / "blob").write_bytes(b"x" * 100_000)
    bridge = NarBridge(MemoryBlobService(), MemoryDirectoryService(), MemoryPathInfoService())
    server = TestServer(build_app(bridge, data_dir=str(data)), host="127.0.0.1")
    await server.start_server()
    try:
        async with aiohttp.ClientSession() as http:
            for _ in range(100):
                async with http.get(server.make_url("/metrics")) as r:
                    samples = _samples(await r.text())
                if _value(samples, "tvix_store_disk_bytes"):
                    break
                await asyncio.sleep(0.05)
            async with http.get(server.make_url("/")) as r:
                page = await r.text()
    finally:
        await server.close()
    assert _value(samples, "tvix_store_disk_bytes") >= 100_000
    assert 'id="disk-bytes"' in page
