"""The PostgreSQL directory and PathInfo services against a real server, beyond the
conformance suites (run in the *_conformance modules)."""

from __future__ import annotations

import asyncio

import asyncpg
import pytest

from tests.support.servers import PostgreSQL
from tvix.castore import directoryservice
from tvix.castore.directory import Directory
from tvix.castore.errors import IntegrityError, StorageError
from tvix.castore.nodes import DirectoryNode, SymlinkNode
from tvix.castore.testing.fixtures import DIRECTORY_A
from tvix.store import pathinfoservice
from tvix.store.testing.fixtures import path_info

pytestmark = pytest.mark.e2e


def _tree(fanout: int, depth: int) -> list[Directory]:
    """A tree of distinct Directories, leaves first: fanout**depth leaves, ``depth`` + 1 levels."""
    out: list[Directory] = []
    counter = 0

    def build(level: int) -> Directory:
        nonlocal counter
        counter += 1
        if level == depth:
            d = Directory(symlinks=[SymlinkNode(b"l", b"target-%d" % counter)])
        else:
            children = [build(level + 1) for _ in range(fanout)]
            d = Directory(
                directories=[
                    DirectoryNode(b"d%03d" % i, c.digest, c.size) for i, c in enumerate(children)
                ]
            )
        out.append(d)
        return d

    build(0)
    return out


async def test_big_tree_in_few_queries(pg_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    tree = _tree(fanout=22, depth=3)  # 1 + 22 + 484 + 10,648 Directories
    assert len(tree) > 10_000
    svc = directoryservice.from_url(pg_url)
    try:
        async with svc.put_multiple_start() as putter:
            for d in tree:
                await putter.put(d)
        root = tree[-1]
        calls = 0
        fetch = asyncpg.Connection.fetch

        async def counting(self: asyncpg.Connection, *args: object, **kw: object) -> object:
            nonlocal calls
            calls += 1
            return await fetch(self, *args, **kw)

        monkeypatch.setattr(asyncpg.Connection, "fetch", counting)
        got = [d async for d in svc.get_recursive(root.digest)]
        assert len(got) == len(tree)
        assert got[0] == root
        assert {d.digest for d in got} == {d.digest for d in tree}
        # One query per level (the widest level, over 10,000, takes two).
        assert calls <= 5, calls
    finally:
        await svc.close()


async def test_schema_versions_and_newer_schema_refused(pg: PostgreSQL, pg_url: str) -> None:
    dirs = directoryservice.from_url(pg_url)
    infos = pathinfoservice.from_url(pg_url)
    try:
        await dirs.put(DIRECTORY_A)
        await infos.put(path_info(1))
    finally:
        await dirs.close()
        await infos.close()
    schema = pg_url.rsplit("schema=", 1)[1]
    rows = pg.psql(f"SELECT component, version FROM {schema}.tvix_schema ORDER BY component")
    assert rows.split() == ["castore.directories|2", "store.pathinfos|2"]
    pg.psql(f"UPDATE {schema}.tvix_schema SET version = 7 WHERE component = 'store.pathinfos'")
    newer = pathinfoservice.from_url(pg_url)
    try:
        with pytest.raises(StorageError, match="newer"):
            await newer.get(path_info(1).store_path.digest)
    finally:
        await newer.close()


async def test_concurrent_first_use(pg_url: str) -> None:
    # Daemons starting together against an empty database: one migrates, the others wait.
    services = [directoryservice.from_url(pg_url) for _ in range(6)]
    try:
        await asyncio.gather(*(s.put(DIRECTORY_A) for s in services))
        for s in services:
            assert await s.get(DIRECTORY_A.digest) == DIRECTORY_A
    finally:
        for s in services:
            await s.close()


async def test_damaged_rows(pg: PostgreSQL, pg_url: str) -> None:
    dirs = directoryservice.from_url(pg_url)
    infos = pathinfoservice.from_url(pg_url)
    schema = pg_url.rsplit("schema=", 1)[1]
    try:
        await dirs.put(DIRECTORY_A)
        info = path_info(2)
        await infos.put(info)
        pg.psql(f"UPDATE {schema}.directories SET data = '\\x0a'")
        pg.psql(f"UPDATE {schema}.pathinfos SET data = '\\x0a0b'")
        with pytest.raises(IntegrityError):
            await dirs.get(DIRECTORY_A.digest)
        with pytest.raises(IntegrityError, match="damaged"):
            await infos.get(info.store_path.digest)
    finally:
        await dirs.close()
        await infos.close()


async def test_list_streams_many(pg_url: str) -> None:
    svc = pathinfoservice.from_url(pg_url + "&pool_size=4")
    try:
        infos = [path_info(n) for n in range(100, 2600)]
        await asyncio.gather(*(svc.put(i) for i in infos))
        listed = [i.store_path async for i in svc.list()]
        assert sorted(listed) == sorted(i.store_path for i in infos)
    finally:
        await svc.close()


async def test_unreachable_server_is_a_storage_error() -> None:
    svc = directoryservice.from_url("postgresql://tvix:s3cret@127.0.0.1:1/nowhere?sslmode=disable")
    try:
        with pytest.raises(StorageError, match=r"tvix@127\.0\.0\.1:1/nowhere") as info:
            await svc.get(DIRECTORY_A.digest)
        assert "s3cret" not in str(info.value)
    finally:
        await svc.close()
