"""Every GCState runs the shipped conformance suite: the data directory's and PostgreSQL's."""

from __future__ import annotations

import asyncio
import functools
from pathlib import Path

import asyncpg
import pytest

from tvix.nixcompat.signing import SigningKey
from tvix.store import pathinfoservice
from tvix.store.errors import GCError
from tvix.store.gcstate import GCState, SQLiteGCState, postgres
from tvix.store.pathinfoservice.signing import SigningPathInfoService
from tvix.store.pathinfoservice.trust import TrustedPathInfoService
from tvix.store.testing import GCStateTests, StateFactory


class TestSQLiteGCState(GCStateTests):
    @pytest.fixture
    def gc_state_factory(self, tmp_path: Path) -> StateFactory:
        return functools.partial(SQLiteGCState, str(tmp_path))


def postgres_gc_state(url: str) -> GCState:
    """The GC state a PostgreSQL PathInfo service at ``url`` offers (its pool never opened)."""
    state = pathinfoservice.from_url(url).gc_state
    assert state is not None
    return state


@pytest.mark.e2e
class TestPostgresGCState(GCStateTests):
    @pytest.fixture
    def gc_state_factory(self, pg_url: str) -> StateFactory:
        return functools.partial(postgres_gc_state, pg_url)


def test_embedded_and_memory_path_info_services_leave_the_gc_state_to_the_caller(
    tmp_path: Path,
) -> None:
    assert pathinfoservice.from_url(f"sqlite://{tmp_path}/p.sqlite").gc_state is None
    assert pathinfoservice.from_url("memory://").gc_state is None


@pytest.mark.e2e
async def test_a_gc_whose_lock_connection_is_lost_stops(
    pg_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(postgres, "CHECK_INTERVAL", 0.05)
    state, other = postgres_gc_state(pg_url), postgres_gc_state(pg_url)
    held = asyncio.Event()

    async def gc() -> None:
        async with state.lock():
            held.set()
            await asyncio.sleep(60)

    task = asyncio.create_task(gc())
    await asyncio.wait_for(held.wait(), 30)
    conn = await asyncpg.connect(pg_url.partition("?")[0])
    try:
        killed = await conn.fetchval(
            "SELECT count(pg_terminate_backend(pid)) FROM pg_locks "
            "WHERE locktype = 'advisory' AND classid = $1 AND objsubid = 2",
            0x74766978,
        )
    finally:
        await conn.close()
    assert killed == 1
    with pytest.raises(GCError, match="lost the GC lock in PostgreSQL"):
        await asyncio.wait_for(task, 10)
    async with other.lock():
        pass
    await state.close()
    await other.close()


@pytest.mark.e2e
def test_signing_and_trusting_wrappers_answer_with_the_inner_services_state(pg_url: str) -> None:
    inner = pathinfoservice.from_url(pg_url)
    key = SigningKey.generate("cache-1")
    signing = SigningPathInfoService(inner, key)
    trusted = TrustedPathInfoService(inner, [key.to_public()])
    assert inner.gc_state is not None
    assert signing.gc_state is inner.gc_state
    assert trusted.gc_state is inner.gc_state
    assert SigningPathInfoService(pathinfoservice.from_url("memory://"), key).gc_state is None
