"""The store overview's closure counts: top-level paths only, linear on a chain, bounded."""

from __future__ import annotations

import time

from tests.support.daemons import fake_store_path
from tvix.castore.digest import EMPTY_BLOB_DIGEST
from tvix.castore.nodes import FileNode
from tvix.nar_bridge.overview import _closure_bytes
from tvix.store.pathinfo import PathInfo


def _chain(n: int) -> dict[str, PathInfo]:
    paths: dict[str, PathInfo] = {}
    previous = None
    for i in range(n):
        sp = fake_store_path(f"p{i}")
        info = PathInfo(
            store_path=sp,
            node=FileNode(sp.absolute_path[11:].encode(), EMPTY_BLOB_DIGEST, 0),
            nar_size=100 + i,
            nar_sha256=bytes(32),
            references=(sp,) if previous is None else (sp, previous),
        )
        paths[sp.absolute_path] = info
        previous = sp
    return paths


def test_a_long_chain_is_counted_once() -> None:
    paths = _chain(20_000)
    start = time.perf_counter()
    closures, complete = _closure_bytes(paths, budget=10_000_000)
    assert time.perf_counter() - start < 5
    assert complete
    top = fake_store_path("p19999").absolute_path
    assert closures == {top: sum(i.nar_size for i in paths.values())}


def test_the_budget_bounds_the_work() -> None:
    closures, complete = _closure_bytes(_chain(1000), budget=10)
    assert not complete
    assert closures == {}
