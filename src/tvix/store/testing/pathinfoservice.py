"""The PathInfoService conformance suite."""

from __future__ import annotations

import asyncio
import time

import pytest

from tvix.castore.errors import StorageError
from tvix.store.errors import InvalidPathInfoError, ListNotSupportedError
from tvix.store.pathinfoservice.base import PathInfoService
from tvix.store.testing.fixtures import DUMMY_KEY, path_info

__all__ = ["PathInfoServiceTests"]


def _needs_put(service: PathInfoService) -> None:
    if not service.supports_put:
        pytest.skip(f"{type(service).__name__} is read-only (supports_put is false)")


class PathInfoServiceTests:
    """Tests every :class:`PathInfoService` must pass.

    Subclasses provide a ``path_info_service`` fixture. What a service
    declares it cannot do (:attr:`~PathInfoService.supports_put`,
    :attr:`~PathInfoService.supports_list`) is checked to fail as the
    contract says, and the tests that need it are skipped.
    """

    async def test_absent(self, path_info_service: PathInfoService) -> None:
        assert await path_info_service.get(path_info(1).store_path.digest) is None

    async def test_capabilities(self, path_info_service: PathInfoService) -> None:
        assert isinstance(path_info_service.supports_put, bool)
        assert isinstance(path_info_service.supports_list, bool)
        assert isinstance(path_info_service.supports_delete, bool)

    @pytest.mark.parametrize("kind", ["file", "directory", "symlink"])
    async def test_round_trip(self, path_info_service: PathInfoService, kind: str) -> None:
        _needs_put(path_info_service)
        info = path_info(2, kind, refs=(3, 4))
        stored = await path_info_service.put(info)
        assert stored.store_path == info.store_path
        assert stored.node == info.node
        got = await path_info_service.get(info.store_path.digest)
        assert got == stored
        assert got is not None
        assert got.references == info.references
        assert got.deriver == info.deriver
        assert got.ca == info.ca

    async def test_signatures_kept(self, path_info_service: PathInfoService) -> None:
        _needs_put(path_info_service)
        info = path_info(5).with_signature(DUMMY_KEY)
        await path_info_service.put(info)
        got = await path_info_service.get(info.store_path.digest)
        assert got is not None
        assert info.signatures[0] in got.signatures
        assert got.verify([DUMMY_KEY.to_public()])

    async def test_put_replaces(self, path_info_service: PathInfoService) -> None:
        _needs_put(path_info_service)
        first = path_info(6, "file")
        await path_info_service.put(first)
        second = path_info(6, "file", refs=(7,))
        await path_info_service.put(second)
        got = await path_info_service.get(first.store_path.digest)
        assert got is not None
        assert got.references == second.references

    async def test_put_refused_when_read_only(self, path_info_service: PathInfoService) -> None:
        if path_info_service.supports_put:
            pytest.skip(f"{type(path_info_service).__name__} can put")
        info = path_info(8)
        with pytest.raises(StorageError):
            await path_info_service.put(info)
        assert await path_info_service.get(info.store_path.digest) is None

    @pytest.mark.parametrize("length", [0, 19, 21, 32])
    async def test_wrong_digest_length(
        self, path_info_service: PathInfoService, length: int
    ) -> None:
        with pytest.raises(InvalidPathInfoError, match="20 bytes"):
            await path_info_service.get(b"\0" * length)

    async def test_list(self, path_info_service: PathInfoService) -> None:
        infos = [path_info(n) for n in range(10, 20)]
        if path_info_service.supports_put:
            await asyncio.gather(*(path_info_service.put(i) for i in infos))
        if not path_info_service.supports_list:
            with pytest.raises(ListNotSupportedError):
                [i async for i in path_info_service.list()]
            return
        listed = {i.store_path: i async for i in path_info_service.list()}
        if not path_info_service.supports_put:
            return  # nothing of ours to look for: listing without failing is the test
        for info in infos:
            assert listed[info.store_path].nar_sha256 == info.nar_sha256

    async def test_delete(self, path_info_service: PathInfoService) -> None:
        info = path_info(21)
        if not path_info_service.supports_delete:
            with pytest.raises(NotImplementedError):
                await path_info_service.delete(info.store_path.digest)
            return
        await path_info_service.put(info)
        assert await path_info_service.delete(info.store_path.digest)
        assert await path_info_service.get(info.store_path.digest) is None
        assert not await path_info_service.delete(info.store_path.digest)
        with pytest.raises(InvalidPathInfoError, match="20 bytes"):
            await path_info_service.delete(b"\0" * 19)

    async def test_list_added(self, path_info_service: PathInfoService) -> None:
        if not path_info_service.supports_delete:
            return
        before = time.time()
        info = path_info(22)
        await path_info_service.put(info)
        added = {i.store_path: t async for i, t in path_info_service.list_added()}
        assert before - 1 <= added[info.store_path] <= time.time() + 1
