"""The PathInfo combinators: cache, LRU, signing; their own behaviour (their conformance runs
are in test_pathinfoservice_conformance.py)."""

from __future__ import annotations

import pytest

from tests.support.services import Unlistable
from tvix.castore.errors import IntegrityError, ValidationError
from tvix.nixcompat.signing import SigningKey
from tvix.store.pathinfo import PathInfo
from tvix.store.pathinfoservice import MemoryPathInfoService
from tvix.store.pathinfoservice.cache import CachePathInfoService
from tvix.store.pathinfoservice.lru import LRUPathInfoService
from tvix.store.pathinfoservice.signing import SigningPathInfoService
from tvix.store.testing.fixtures import DUMMY_KEY, path_info

KEY = SigningKey.generate("cache.example.org-1")


class _WrongAnswers(MemoryPathInfoService):
    """A far that answers every lookup with the PathInfo of another store path."""

    async def get(self, digest: bytes) -> PathInfo | None:
        return path_info(999)


# -- cache -----------------------------------------------------------------------------------


async def test_cache_read_from_far_fills_near() -> None:
    near, far = MemoryPathInfoService(), MemoryPathInfoService()
    cache = CachePathInfoService(near, far)
    info = path_info(1, "directory", refs=(2,)).with_signature(DUMMY_KEY)
    await far.put(info)
    assert await near.get(info.store_path.digest) is None
    assert await cache.get(info.store_path.digest) == info
    # Near alone now has it, as is (signatures included).
    assert await near.get(info.store_path.digest) == info


async def test_cache_absent_everywhere() -> None:
    near, far = MemoryPathInfoService(), MemoryPathInfoService()
    cache = CachePathInfoService(near, far)
    assert await cache.get(path_info(1).store_path.digest) is None
    assert [i async for i in near.list()] == []


async def test_cache_far_answering_for_another_path_not_copied() -> None:
    near = MemoryPathInfoService()
    cache = CachePathInfoService(near, _WrongAnswers())
    with pytest.raises(IntegrityError, match="returned one for"):
        await cache.get(path_info(1).store_path.digest)
    assert [i async for i in near.list()] == []


async def test_cache_writes_land_in_both_as_far_stored_them() -> None:
    near, inner = MemoryPathInfoService(), MemoryPathInfoService()
    # far adds a signature: near must get the PathInfo as far stored it.
    cache = CachePathInfoService(near, SigningPathInfoService(inner, KEY))
    info = path_info(3)
    stored = await cache.put(info)
    assert stored.verify([KEY.to_public()])
    assert await near.get(info.store_path.digest) == stored
    assert await inner.get(info.store_path.digest) == stored


async def test_cache_lists_far_only() -> None:
    near, far = MemoryPathInfoService(), MemoryPathInfoService()
    cache = CachePathInfoService(near, far)
    await near.put(path_info(1))  # only near: not listed
    await far.put(path_info(2))
    assert [i.store_path async for i in cache.list()] == [path_info(2).store_path]
    assert cache.supports_list
    assert not CachePathInfoService(near, Unlistable()).supports_list


# -- LRU -------------------------------------------------------------------------------------


async def test_lru_evicts_least_recently_used() -> None:
    lru = LRUPathInfoService(3)
    infos = [path_info(n) for n in range(5)]
    for info in infos[:3]:
        await lru.put(info)
    # A get refreshes 0, so 1 is now the least recently used.
    assert await lru.get(infos[0].store_path.digest) == infos[0]
    await lru.put(infos[3])
    assert len(lru) == 3
    assert await lru.get(infos[1].store_path.digest) is None
    for n in (0, 2, 3):
        assert await lru.get(infos[n].store_path.digest) == infos[n]
    # A put of a known path refreshes it too (and does not grow the cache).
    await lru.put(infos[0])
    await lru.put(infos[4])
    assert len(lru) == 3
    assert await lru.get(infos[2].store_path.digest) is None
    assert {i.store_path async for i in lru.list()} == {infos[n].store_path for n in (0, 3, 4)}


async def test_lru_miss_does_not_refresh_or_grow() -> None:
    lru = LRUPathInfoService(1)
    await lru.put(path_info(1))
    assert await lru.get(path_info(2).store_path.digest) is None
    assert len(lru) == 1


@pytest.mark.parametrize("capacity", [0, -1, True, 1.5])
def test_lru_rejects_bad_capacity(capacity: object) -> None:
    with pytest.raises(ValidationError, match="capacity"):
        LRUPathInfoService(capacity)  # type: ignore[arg-type]


# -- signing ---------------------------------------------------------------------------------


async def test_signing_signs_what_it_stores() -> None:
    inner = MemoryPathInfoService()
    svc = SigningPathInfoService(inner, KEY)
    info = path_info(4, "symlink")
    assert not info.verify([KEY.to_public()])
    stored = await svc.put(info)
    assert stored.verify([KEY.to_public()])
    assert not stored.verify([SigningKey.generate(KEY.name).to_public()])
    in_inner = await inner.get(info.store_path.digest)
    assert in_inner == stored
    assert in_inner is not None
    assert in_inner.verify([KEY.to_public()])
    assert await svc.get(info.store_path.digest) == stored


async def test_signing_keeps_other_signatures_and_replaces_its_own() -> None:
    svc = SigningPathInfoService(MemoryPathInfoService(), KEY)
    info = path_info(5).with_signature(DUMMY_KEY)
    first = await svc.put(info)
    again = await svc.put(first)
    assert sorted(s.name for s in again.signatures) == sorted([DUMMY_KEY.name, KEY.name])
    assert again.verify([DUMMY_KEY.to_public()])
    assert again.verify([KEY.to_public()])


async def test_signing_reads_pass_through_unsigned() -> None:
    inner = MemoryPathInfoService()
    svc = SigningPathInfoService(inner, KEY)
    info = path_info(6)
    await inner.put(info)
    assert await svc.get(info.store_path.digest) == info
    assert [i async for i in svc.list()] == [info]
    assert not SigningPathInfoService(Unlistable(), KEY).supports_list
