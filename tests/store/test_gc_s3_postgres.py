"""Garbage collection on packs+s3 with PostgreSQL for the index, Directories and PathInfos."""

from __future__ import annotations

import itertools
import os
import random
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote

import pytest

from tests.support.servers import PostgreSQL, SeaweedFS
from tvix.castore import blobservice, directoryservice
from tvix.castore.blobservice.packs import PacksBlobService
from tvix.castore.directoryservice import DirectoryService
from tvix.castore.nodes import DirectoryNode
from tvix.store import pathinfoservice
from tvix.store.gc import collect, delete_paths
from tvix.store.gcstate import GCState
from tvix.store.importer import import_path
from tvix.store.pathinfoservice import PathInfoService
from tvix.store.verify import verify_path_info

pytestmark = pytest.mark.e2e

_counter = itertools.count()


@dataclass
class Remote:
    blobs: PacksBlobService
    dirs: DirectoryService
    infos: PathInfoService
    state: GCState

    async def problems(self) -> list[str]:
        out = []
        async for info in self.infos.list():
            out += [p async for p in verify_path_info(self.blobs, self.dirs, info)]
        return out + await self.blobs.verify_storage()


@pytest.fixture
async def remote(weed: SeaweedFS, pg: PostgreSQL) -> AsyncIterator[Remote]:
    n = f"gc{os.getpid()}x{next(_counter)}"
    db = pg.dsn() + f"?schema={n}"
    blobs = blobservice.from_url(
        f"packs+s3://{weed.bucket}/{n}?endpoint={weed.endpoint}&index={quote(db, safe='')}"
    )
    assert isinstance(blobs, PacksBlobService)
    infos = pathinfoservice.from_url(db)
    assert infos.gc_state is not None
    r = Remote(blobs, directoryservice.from_url(db), infos, infos.gc_state)
    yield r
    await r.blobs.close()
    await r.dirs.close()
    await r.infos.close()


def _tree(root: Path, seed: int) -> Path:
    r, common = random.Random(seed), random.Random(0)
    (root / "sub").mkdir(parents=True)
    for i in range(24):
        src = common if i < 16 else r
        (root / ("sub" if i % 2 else "") / f"f{i}").write_bytes(
            src.randbytes(src.randint(10, 500_000))
        )
    return root


async def test_gc_on_s3_and_postgres(remote: Remote, tmp_path: Path) -> None:
    a = await import_path(remote.blobs, remote.dirs, remote.infos, _tree(tmp_path / "a", 1))
    b = await import_path(remote.blobs, remote.dirs, remote.infos, _tree(tmp_path / "b", 2))
    await delete_paths(remote.infos, [a.store_path])
    before = sum(p.size for p in await remote.blobs.index.packs())
    report = await collect(remote.blobs, remote.dirs, remote.infos, state=remote.state, grace=0)
    assert report.directories == 2
    assert report.blobs.chunks > 0
    assert report.compaction.packs > 0
    after = sum(p.size for p in await remote.blobs.index.packs())
    assert after < before
    assert await remote.problems() == []
    assert [i.store_path async for i in remote.infos.list()] == [b.store_path]


async def test_upload_spanning_a_gc_on_postgres(remote: Remote, tmp_path: Path) -> None:
    tree = _tree(tmp_path / "a", 1)
    old = await import_path(remote.blobs, remote.dirs, remote.infos, tree)
    assert isinstance(old.node, DirectoryNode)
    closure = [d async for d in remote.dirs.get_recursive(old.node.digest)]
    await remote.infos.delete(old.store_path.digest)
    # Everything looks a day old, then an upload finds its blobs present.
    index = remote.blobs.index
    async with index._db.connection() as conn:  # type: ignore[attr-defined]
        await conn.execute("UPDATE chunks SET seen = 0")
        await conn.execute("UPDATE blobs SET seen = 0")
    for d in {f.digest for dd in closure for f in dd.files}:
        assert await remote.blobs.has(d)
    report = await collect(remote.blobs, remote.dirs, remote.infos, state=remote.state, grace=120)
    assert report.blobs.chunks == 0
    async with remote.dirs.put_multiple_start() as putter:
        for d in reversed(closure):
            await putter.put(d)
    await remote.infos.put(old)
    assert await remote.problems() == []


async def test_reader_follows_a_compacted_chunk_on_s3(remote: Remote, tmp_path: Path) -> None:
    a = await import_path(remote.blobs, remote.dirs, remote.infos, _tree(tmp_path / "a", 1))
    b = await import_path(remote.blobs, remote.dirs, remote.infos, _tree(tmp_path / "b", 2))
    assert isinstance(b.node, DirectoryNode)
    files = [f.digest async for d in remote.dirs.get_recursive(b.node.digest) for f in d.files]
    stale = await remote.blobs.index.locate(files)  # the single-chunk blobs
    digests = list(stale)
    before = await remote.blobs.read_many(digests)
    await remote.infos.delete(a.store_path.digest)
    await collect(
        remote.blobs, remote.dirs, remote.infos, state=remote.state, grace=0, threshold=1.0
    )
    moved = await remote.blobs.index.locate(digests)
    assert any(moved[d] != stale[d] for d in digests)
    # Reading at the old locations (a reader that looked up before the compaction).
    got = await remote.blobs._read([(d, stale[d]) for d in digests])
    assert [bytes(c) for c in got] == before
