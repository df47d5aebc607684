"""The binary cache client: retries of transient failures, and proxies from the environment."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest
from aiohttp import web

from tvix.castore.errors import StorageError
from tvix.store import binary_cache
from tvix.store.binary_cache import BinaryCache

CACHE_INFO = b"StoreDir: /nix/store\nWantMassQuery: 1\nPriority: 40\n"


async def _serve(app: web.Application) -> AsyncIterator[str]:
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        await runner.cleanup()


@pytest.fixture
def fast_backoff(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(binary_cache, "_BACKOFF", 0.01)


async def test_transient_failures_are_retried(fast_backoff: None) -> None:
    answers = [503, 502, 200]
    seen: list[int] = []

    async def cache_info(request: web.Request) -> web.Response:
        status = answers[min(len(seen), len(answers) - 1)]
        seen.append(status)
        return web.Response(status=status, body=CACHE_INFO if status == 200 else b"busy")

    async def narinfo(request: web.Request) -> web.Response:
        return web.Response(status=404)

    app = web.Application()
    app.router.add_get("/nix-cache-info", cache_info)
    app.router.add_get("/{name}.narinfo", narinfo)
    async for url in _serve(app):
        cache = BinaryCache(url)
        try:
            assert await cache.narinfo(bytes(20)) is None
        finally:
            await cache.close()
    assert seen == [503, 502, 200]


async def test_gives_up_after_the_attempts_and_says_why(fast_backoff: None) -> None:
    count = 0

    async def always_busy(request: web.Request) -> web.Response:
        nonlocal count
        count += 1
        return web.Response(status=503)

    app = web.Application()
    app.router.add_get("/nix-cache-info", always_busy)
    async for url in _serve(app):
        cache = BinaryCache(url)
        try:
            with pytest.raises(StorageError, match="HTTP 503"):
                await cache.narinfo(bytes(20))
        finally:
            await cache.close()
    assert count == binary_cache.ATTEMPTS


async def test_a_refusal_is_not_retried(fast_backoff: None) -> None:
    count = 0

    async def forbidden_info(request: web.Request) -> web.Response:
        nonlocal count
        count += 1
        return web.Response(status=401)

    app = web.Application()
    app.router.add_get("/nix-cache-info", forbidden_info)
    async for url in _serve(app):
        cache = BinaryCache(url)
        try:
            with pytest.raises(StorageError, match="HTTP 401"):
                await cache.narinfo(bytes(20))
        finally:
            await cache.close()
    assert count == 1


async def test_proxy_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """``http_proxy`` is honoured, as Nix honours it: requests go to the proxy."""
    asked: list[str] = []

    async def proxy(request: web.Request) -> web.Response:
        asked.append(str(request.url))
        if request.path.endswith("nix-cache-info"):
            return web.Response(body=CACHE_INFO)
        return web.Response(status=404)

    app = web.Application()
    app.router.add_route("GET", "/{tail:.*}", proxy)
    async for proxy_url in _serve(app):
        for var in ("NO_PROXY", "no_proxy", "HTTP_PROXY", "HTTPS_PROXY"):
            monkeypatch.delenv(var, raising=False)
        monkeypatch.setenv("http_proxy", proxy_url)
        cache = BinaryCache("http://cache.example.invalid")
        try:
            assert await cache.narinfo(bytes(20)) is None
        finally:
            await cache.close()
    assert any("cache.example.invalid/nix-cache-info" in a for a in asked), asked
