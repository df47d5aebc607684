"""Garbage collection and whole-store checks of objectstore blobs, on files and on a real
SeaweedFS: refreshes keep what a writer found present, deletes are re-checked and
quarantined, records go first; verify_storage finds (and removes) damage no path reaches.

The conformance suite's ``test_sweep`` runs on every flavour too
(test_blobservice_conformance.py).
"""

from __future__ import annotations

import asyncio
import os
import random
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import obstore
import pytest

from tvix.castore import blobservice
from tvix.castore.blobservice import read_all, write_all
from tvix.castore.blobservice.objectstore import ObjectStoreBlobService
from tvix.castore.blobservice.objectstore._gc import RemoteObjects
from tvix.castore.blobservice.objectstore._local import LocalFiles
from tvix.castore.digest import B3Digest

SMALL_CHUNKS = "avg_chunk_size=16384"


@pytest.fixture(params=["file", pytest.param("s3", marks=pytest.mark.e2e)])
def url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "file":
        return f"objectstore+file://{tmp_path}/store?{SMALL_CHUNKS}"
    s3_url: str = request.getfixturevalue("s3_url")
    return f"{s3_url}&{SMALL_CHUNKS}"


@pytest.fixture
async def svc(url: str) -> AsyncIterator[ObjectStoreBlobService]:
    s = blobservice.from_url(url)
    assert isinstance(s, ObjectStoreBlobService)
    yield s
    await s.close()


@pytest.fixture
def no_slack(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every object found present is refreshed, however recently it was written.

    Lets a test make objects "old" in two seconds (S3 times have whole seconds)
    rather than the minute of the real slack.
    """
    monkeypatch.setattr(LocalFiles, "refresh_slack", 0.0)
    monkeypatch.setattr(RemoteObjects, "refresh_slack", 0.0)


async def _cutoff_after_writes() -> float:
    """A cutoff after everything written so far, and before anything that follows."""
    await asyncio.sleep(1.1)
    cutoff = time.time()
    await asyncio.sleep(1.1)
    return cutoff


def _blob(seed: int, size: int = 200_000) -> bytes:
    return random.Random(seed).randbytes(size)


async def test_found_present_survives_a_sweep(svc: ObjectStoreBlobService, no_slack: None) -> None:
    """has() and a writer deduplicating both refresh; the rest old and unreferenced goes."""
    shared = _blob(0, 100_000)
    a_bytes, b_bytes, c_bytes = shared + _blob(1), shared + _blob(2), _blob(3, 3000)
    a = await write_all(svc, a_bytes)
    b = await write_all(svc, b_bytes)
    c = await write_all(svc, c_bytes)
    a_chunks = await svc.chunks(a)
    b_chunks = await svc.chunks(b)
    assert a_chunks is not None
    assert b_chunks is not None
    assert len(a_chunks) > 1
    assert len(b_chunks) > 1
    cutoff = await _cutoff_after_writes()

    # A writer relies on C (has) and stores A again (every chunk and the record deduplicated).
    assert await svc.has(c)
    assert await write_all(svc, a_bytes) == a

    dry = await svc.sweep(set(), cutoff, dry_run=True)
    swept = await svc.sweep(set(), cutoff)
    assert (swept.blobs, swept.chunks) == (dry.blobs, dry.chunks)
    assert swept.blobs == 1  # B's record
    shared_digests = {x.digest for x in a_chunks} & {x.digest for x in b_chunks}
    assert shared_digests
    assert swept.chunks == len({x.digest for x in b_chunks} - shared_digests)
    assert await read_all(svc, a) == a_bytes
    assert await read_all(svc, c) == c_bytes
    assert not await svc.has(b)
    for x in b_chunks:
        assert await svc.has(x.digest) == (x.digest in shared_digests)
    # Nothing left over: no trash, and B stores again.
    assert await write_all(svc, b_bytes) == b
    assert await read_all(svc, b) == b_bytes


async def test_live_blobs_keep_their_chunks_however_old(svc: ObjectStoreBlobService) -> None:
    a_bytes = _blob(4)
    a = await write_all(svc, a_bytes)
    single = await write_all(svc, b"small")
    swept = await svc.sweep({bytes(a), bytes(single)}, time.time() + 600)
    assert (swept.blobs, swept.chunks) == (0, 0)
    assert await read_all(svc, a) == a_bytes
    swept = await svc.sweep(set(), time.time() + 600)
    assert swept.blobs == 1
    assert swept.chunks > 1
    assert not await svc.has(a)
    assert not await svc.has(single)


def _interrupt_quarantine(
    svc: ObjectStoreBlobService, monkeypatch: pytest.MonkeyPatch, refresh: Callable[[str], Any]
) -> list[str]:
    """Make a writer refresh each object just after the sweep re-checked it and
    quarantined it, before it is deleted: the window the quarantine closes."""
    hit: list[str] = []
    if isinstance(svc._gc, LocalFiles):
        real_link = os.link

        def link(src: str, dst: str, **kw: Any) -> None:
            real_link(src, dst, **kw)
            if "/gc/trash/" in dst:
                key = src.removeprefix(svc._gc.root + "/")  # type: ignore[union-attr]
                hit.append(key)
                refresh(key)

        monkeypatch.setattr(os, "link", link)
    else:
        real_copy = obstore.copy

        def copy(store: Any, src: str, dst: str, **kw: Any) -> None:
            real_copy(store, src, dst, **kw)
            if "/gc/trash/" in dst:
                hit.append(src)
                refresh(src)

        monkeypatch.setattr(obstore, "copy", copy)
    return hit


async def test_a_refresh_racing_the_delete_puts_the_object_back(
    svc: ObjectStoreBlobService, no_slack: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    a_bytes = _blob(5)
    a = await write_all(svc, a_bytes)
    cutoff = await _cutoff_after_writes()
    gc = svc._gc

    def refresh(key: str) -> None:
        if isinstance(gc, LocalFiles):
            assert gc.refresh(key)
        else:
            assert svc._remote.refresh_sync(key)

    hit = _interrupt_quarantine(svc, monkeypatch, refresh)
    swept = await svc.sweep(set(), cutoff)
    monkeypatch.undo()
    assert hit  # the race was staged
    assert (swept.blobs, swept.chunks) == (0, 0)
    assert await read_all(svc, a) == a_bytes


async def test_a_killed_sweep_leaves_nothing_missing(
    svc: ObjectStoreBlobService, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Killed between quarantining and deleting: the next sweep puts the object back first."""
    a_bytes = _blob(6)
    a = await write_all(svc, a_bytes)

    class Killed(BaseException):
        pass

    def die(_key: str) -> None:
        raise Killed

    _interrupt_quarantine(svc, monkeypatch, die)
    with pytest.raises(Killed):
        await svc.sweep(set(), time.time() + 600)
    monkeypatch.undo()
    # The record was quarantined and deleted: "absent" until the next sweep restores it.
    swept = await svc.sweep({bytes(a)}, time.time() + 600)
    assert (swept.blobs, swept.chunks) == (0, 0)
    assert await read_all(svc, a) == a_bytes


async def test_writer_racing_sweeps_never_loses_a_blob(
    svc: ObjectStoreBlobService, no_slack: None
) -> None:
    """Old garbage a writer keeps storing again while sweeps run: every blob it
    stored reads back afterwards."""
    blobs = [_blob(100 + i, 60_000) for i in range(12)]
    for data in blobs:
        await write_all(svc, data)
    cutoff = await _cutoff_after_writes()
    stored: list[tuple[B3Digest, bytes]] = []

    async def writer() -> None:
        for data in blobs:
            stored.append((await write_all(svc, data), data))
            await asyncio.sleep(0)

    async def sweeps() -> None:
        for _ in range(3):
            await svc.sweep(set(), cutoff)

    await asyncio.gather(writer(), sweeps())
    for digest, data in stored:
        assert await read_all(svc, digest) == data


def _damage(svc: ObjectStoreBlobService, key: str) -> None:
    """Flip a byte in the middle of the object ``key`` (a file, or an S3 object)."""
    data = bytearray(obstore.get(svc._store, key).bytes())
    data[len(data) // 2] ^= 1
    obstore.put(svc._store, key, bytes(data))


async def test_verify_storage_finds_and_removes_damage_no_path_reaches(
    svc: ObjectStoreBlobService,
) -> None:
    """Garbage chunks are read too: a damaged one would fool the next writer's dedup."""
    data = _blob(7)
    digest = await write_all(svc, data)
    chunks = await svc.chunks(digest)
    assert chunks is not None
    victim = chunks[1].digest
    _damage(svc, svc.chunk_key(victim))
    assert len(await svc.verify_storage()) == 1
    problems = await svc.verify_storage(repair=True)
    assert f"removed chunk {victim.hex()} (damaged)" in problems
    assert any(p.startswith(f"removed blob record {digest.hex()}") for p in problems)
    assert await svc.verify_storage() == []
    assert not await svc.has(digest)
    assert await write_all(svc, data) == digest
    assert await read_all(svc, digest) == data


async def test_a_plain_put_racing_the_delete_is_kept(
    svc: ObjectStoreBlobService, no_slack: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    """On a server without put-if-absent a writer overwrites: the marker it adds after
    the PUT is what the sweep's second look sees."""
    if isinstance(svc._gc, LocalFiles):
        pytest.skip("files are linked into place, never overwritten")
    a_bytes = _blob(9)
    a = await write_all(svc, a_bytes)
    cutoff = await _cutoff_after_writes()
    svc._create_mode = False

    def rewrite(key: str) -> None:
        svc.put_sync(key, bytes(obstore.get(svc._store, key).bytes()))

    hit = _interrupt_quarantine(svc, monkeypatch, rewrite)
    swept = await svc.sweep(set(), cutoff)
    monkeypatch.undo()
    assert hit
    assert (swept.blobs, swept.chunks) == (0, 0)
    assert await read_all(svc, a) == a_bytes
