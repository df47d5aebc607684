"""Every GCState runs the shipped conformance suite: the data directory's and PostgreSQL's."""

from __future__ import annotations

import functools
from pathlib import Path

import pytest

from tvix.store import pathinfoservice
from tvix.store.gcstate import GCState, SQLiteGCState
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
