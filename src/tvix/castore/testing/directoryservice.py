"""The DirectoryService conformance suite."""

from __future__ import annotations

import asyncio
import time

import pytest

from tvix.castore.digest import B3Digest
from tvix.castore.directory import Directory
from tvix.castore.directoryservice.base import DirectoryService
from tvix.castore.errors import ValidationError
from tvix.castore.nodes import DirectoryNode
from tvix.castore.testing.fixtures import (
    DIRECTORY_A,
    DIRECTORY_B,
    DIRECTORY_C,
    DIRECTORY_COMPLICATED,
    DIRECTORY_WITH_KEEP,
)

__all__ = ["DirectoryServiceTests"]


async def _put_closure(svc: DirectoryService, *directories: Directory) -> B3Digest:
    async with svc.put_multiple_start() as putter:
        for d in directories:
            await putter.put(d)
    return await putter.close()


async def _collect(svc: DirectoryService, root: B3Digest) -> list[Directory]:
    return [d async for d in svc.get_recursive(root)]


def _chain(depth: int) -> list[Directory]:
    """A linear tree ``depth`` levels deep, leaves first."""
    out = [DIRECTORY_WITH_KEEP]
    for i in range(depth - 1):
        child = out[-1]
        out.append(Directory(directories=[DirectoryNode(b"d%d" % i, child.digest, child.size)]))
    return out


class DirectoryServiceTests:
    """Tests every :class:`DirectoryService` must pass.

    Subclasses provide a ``directory_service`` fixture.
    """

    async def test_absent(self, directory_service: DirectoryService) -> None:
        assert await directory_service.get(DIRECTORY_A.digest) is None
        assert await _collect(directory_service, DIRECTORY_A.digest) == []

    @pytest.mark.parametrize("directory", [DIRECTORY_A, DIRECTORY_WITH_KEEP], ids=["empty", "keep"])
    async def test_put_get_leaf(
        self, directory_service: DirectoryService, directory: Directory
    ) -> None:
        assert await directory_service.put(directory) == directory.digest
        got = await directory_service.get(directory.digest)
        assert got == directory
        assert got is not None
        assert got.digest == directory.digest
        assert await _collect(directory_service, directory.digest) == [directory]
        # Idempotent.
        assert await directory_service.put(directory) == directory.digest

    async def test_put_single_with_missing_child_rejected(
        self, directory_service: DirectoryService
    ) -> None:
        with pytest.raises(ValidationError, match="not stored"):
            await directory_service.put(DIRECTORY_B)
        assert await directory_service.get(DIRECTORY_B.digest) is None

    async def test_put_single_with_stored_child(self, directory_service: DirectoryService) -> None:
        await directory_service.put(DIRECTORY_A)
        assert await directory_service.put(DIRECTORY_B) == DIRECTORY_B.digest
        assert await _collect(directory_service, DIRECTORY_B.digest) == [DIRECTORY_B, DIRECTORY_A]

    async def test_closure_round_trip_and_bfs_order(
        self, directory_service: DirectoryService
    ) -> None:
        root = await _put_closure(
            directory_service, DIRECTORY_WITH_KEEP, DIRECTORY_C, DIRECTORY_COMPLICATED
        )
        assert root == DIRECTORY_COMPLICATED.digest
        got = await _collect(directory_service, root)
        # Each digest once (DIRECTORY_WITH_KEEP is referred to three times), root first.
        assert got == [DIRECTORY_COMPLICATED, DIRECTORY_C, DIRECTORY_WITH_KEEP]
        for d in (DIRECTORY_WITH_KEEP, DIRECTORY_C, DIRECTORY_COMPLICATED):
            assert await directory_service.get(d.digest) == d

    async def test_recursive_get_is_breadth_first(
        self, directory_service: DirectoryService
    ) -> None:
        chain = _chain(6)
        wide = Directory(
            directories=sorted(
                [DirectoryNode(b"chain", chain[-1].digest, chain[-1].size)]
                + [DirectoryNode(b"x%d" % i, DIRECTORY_A.digest, 0) for i in range(3)],
                key=lambda n: n.name,
            )
        )
        await _put_closure(directory_service, DIRECTORY_A, *chain, wide)
        got = await _collect(directory_service, wide.digest)
        assert got == [wide, chain[-1], DIRECTORY_A, *reversed(chain[:-1])]

    async def test_deep_closure(self, directory_service: DirectoryService) -> None:
        chain = _chain(300)
        assert await _put_closure(directory_service, *chain) == chain[-1].digest
        got = await _collect(directory_service, chain[-1].digest)
        assert got == list(reversed(chain))

    async def test_dangling_reference_rejected(self, directory_service: DirectoryService) -> None:
        with pytest.raises(ValidationError, match="not sent before"):
            await _put_closure(directory_service, DIRECTORY_C, DIRECTORY_COMPLICATED)
        for d in (DIRECTORY_C, DIRECTORY_COMPLICATED):
            assert await directory_service.get(d.digest) is None

    async def test_out_of_order_rejected(self, directory_service: DirectoryService) -> None:
        with pytest.raises(ValidationError, match=r"leaves first|not sent before"):
            await _put_closure(directory_service, DIRECTORY_B, DIRECTORY_A, DIRECTORY_B)
        for d in (DIRECTORY_A, DIRECTORY_B):
            assert await directory_service.get(d.digest) is None

    async def test_wrong_size_rejected(self, directory_service: DirectoryService) -> None:
        liar = Directory(
            directories=[DirectoryNode(b"keep", DIRECTORY_WITH_KEEP.digest, 42)],
        )
        with pytest.raises(ValidationError, match="size"):
            await _put_closure(directory_service, DIRECTORY_WITH_KEEP, liar)
        assert await directory_service.get(liar.digest) is None
        assert await directory_service.get(DIRECTORY_WITH_KEEP.digest) is None

    async def test_wrong_size_of_stored_child_rejected(
        self, directory_service: DirectoryService
    ) -> None:
        await directory_service.put(DIRECTORY_WITH_KEEP)
        liar = Directory(directories=[DirectoryNode(b"keep", DIRECTORY_WITH_KEEP.digest, 7)])
        with pytest.raises(ValidationError, match="size"):
            await directory_service.put(liar)
        assert await directory_service.get(liar.digest) is None

    async def test_duplicates_stored_once(self, directory_service: DirectoryService) -> None:
        root = await _put_closure(
            directory_service,
            DIRECTORY_WITH_KEEP,
            DIRECTORY_WITH_KEEP,
            DIRECTORY_C,
            DIRECTORY_WITH_KEEP,
            DIRECTORY_COMPLICATED,
        )
        assert root == DIRECTORY_COMPLICATED.digest
        got = await _collect(directory_service, root)
        assert [d.digest for d in got] == [
            DIRECTORY_COMPLICATED.digest,
            DIRECTORY_C.digest,
            DIRECTORY_WITH_KEEP.digest,
        ]

    async def test_disconnected_rejected(self, directory_service: DirectoryService) -> None:
        with pytest.raises(ValidationError, match="not reachable"):
            await _put_closure(directory_service, DIRECTORY_WITH_KEEP, DIRECTORY_A)
        assert await directory_service.get(DIRECTORY_WITH_KEEP.digest) is None
        assert await directory_service.get(DIRECTORY_A.digest) is None

    async def test_empty_closure_rejected(self, directory_service: DirectoryService) -> None:
        with pytest.raises(ValidationError, match="no Directories"):
            await _put_closure(directory_service)

    async def test_closure_referring_to_stored(self, directory_service: DirectoryService) -> None:
        await _put_closure(directory_service, DIRECTORY_WITH_KEEP, DIRECTORY_C)
        root = await _put_closure(directory_service, DIRECTORY_COMPLICATED)
        assert root == DIRECTORY_COMPLICATED.digest
        got = await _collect(directory_service, root)
        assert got == [DIRECTORY_COMPLICATED, DIRECTORY_C, DIRECTORY_WITH_KEEP]

    async def test_aborted_putter_stores_nothing(self, directory_service: DirectoryService) -> None:
        async def put_then_fail() -> None:
            async with directory_service.put_multiple_start() as putter:
                await putter.put(DIRECTORY_WITH_KEEP)
                raise RuntimeError("boom")

        with pytest.raises(RuntimeError, match="boom"):
            await put_then_fail()
        assert await directory_service.get(DIRECTORY_WITH_KEEP.digest) is None

    async def test_concurrent_closures(self, directory_service: DirectoryService) -> None:
        chains = [
            [
                Directory(directories=[DirectoryNode(b"n%d" % i, DIRECTORY_A.digest, 0)]),
            ]
            for i in range(10)
        ]
        roots = await asyncio.gather(
            *(_put_closure(directory_service, DIRECTORY_A, *c) for c in chains)
        )
        assert roots == [c[-1].digest for c in chains]
        for c in chains:
            assert await _collect(directory_service, c[-1].digest) == [c[-1], DIRECTORY_A]

    async def test_sweep(self, directory_service: DirectoryService) -> None:
        """Deletes what is neither kept nor young nor below a young one."""
        parent = Directory(directories=[DirectoryNode(b"a", DIRECTORY_A.digest, DIRECTORY_A.size)])
        await directory_service.put(DIRECTORY_A)
        await directory_service.put(parent)
        if not directory_service.supports_gc:
            with pytest.raises(NotImplementedError):
                await directory_service.sweep(set(), 0)
            return
        # Everything was written just now: a cutoff in the past keeps it all.
        swept = await directory_service.sweep(set(), time.time() - 600)
        assert swept.deleted == 0
        assert swept.kept == {DIRECTORY_A.digest, parent.digest}
        # Dry: nothing changes.
        dry = await directory_service.sweep({DIRECTORY_A.digest}, time.time() + 600, dry_run=True)
        assert dry.deleted == 1
        assert await directory_service.get(parent.digest) is not None
        # A cutoff in the future: only what is kept stays.
        swept = await directory_service.sweep({DIRECTORY_A.digest}, time.time() + 600)
        assert swept.deleted == 1
        assert swept.kept == set()
        assert await directory_service.get(parent.digest) is None
        assert await directory_service.get(DIRECTORY_A.digest) == DIRECTORY_A
