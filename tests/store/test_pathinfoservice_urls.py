"""Building PathInfoServices from URLs: every scheme's valid URLs and what they build, and the
rejected.

``{tmp}`` in a URL stands for a fresh temporary directory. ``nix+http`` URLs
need the composition's blob and directory services, so their valid rows are
in tests/store/test_nix_http_pathinfoservice.py (against a real cache).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from tests.support.urls import (
    GENERIC_INVALID,
    GRPC_INVALID,
    POSTGRES_INVALID,
    POSTGRES_VALID,
    check_built,
    grpc_rows,
    prepared,
)
from tvix.castore.errors import InvalidURLError
from tvix.store import pathinfoservice
from tvix.store.pathinfoservice import MemoryPathInfoService
from tvix.store.pathinfoservice.grpc import GRPCPathInfoService
from tvix.store.pathinfoservice.lru import LRUPathInfoService
from tvix.store.pathinfoservice.postgres import PostgresPathInfoService
from tvix.store.pathinfoservice.sqlite import SQLitePathInfoService
from tvix.store.testing.fixtures import path_info

VALID: list[tuple[str, type, dict[str, Any]]] = [
    ("memory://", MemoryPathInfoService, {}),
    ("memory:///", MemoryPathInfoService, {}),
    ("sqlite://", SQLitePathInfoService, {"_db.path": ":memory:"}),
    ("sqlite:///", SQLitePathInfoService, {"_db.path": ":memory:"}),
    ("sqlite://{tmp}/p.sqlite", SQLitePathInfoService, {"_db.path": "{tmp}/p.sqlite"}),
    ("lru://?capacity=5", LRUPathInfoService, {"capacity": 5}),
    ("lru:///?capacity=1", LRUPathInfoService, {"capacity": 1}),
    *[(url, PostgresPathInfoService, attrs) for url, attrs in POSTGRES_VALID],
    *grpc_rows(GRPCPathInfoService),
]

INVALID = [
    *GENERIC_INVALID,
    ("sqlite://host/x.db", "no host"),
    ("sqlite:///x.db?foo=1", "foo"),
    ("sqlite:///tmp/", "directory"),
    ("lru://", "capacity is required"),
    ("lru://?capacity=0", "positive"),
    ("lru://?capacity=-3", "positive"),
    ("lru://?capacity=ten", "integer"),
    ("lru://host?capacity=1", "no host"),
    ("lru:///path?capacity=1", "no path"),
    ("lru://?capacity=1&size=2", "size"),
    *POSTGRES_INVALID,
    ("nix+http://", "host is required"),
    ("nix+https:///path", "host is required"),
    ("nix+file://host/dir", "no host expected"),
    ("nix+file://", "path is required"),
    ("nix+http://h?foo=1", "unknown option"),
    ("nix+http://h?require-sigs=maybe", "true or false"),
    ("nix+http://h?trusted-public-keys=nonsense", "trusted public key"),
    ("nix+http://h", "composition"),
    *GRPC_INVALID,
]

#: Schemes whose services work without a server: a valid row of these also stores a PathInfo.
OFFLINE = ("memory", "sqlite", "lru")


@pytest.mark.parametrize(("url", "expected_type", "attributes"), VALID)
def test_valid(url: str, expected_type: type, attributes: dict[str, Any], tmp_path: Path) -> None:
    # Built outside any event loop and without connecting: clients dial at first use.
    svc = pathinfoservice.from_url(prepared(url, tmp_path))
    check_built(svc, expected_type, attributes, tmp=tmp_path)


@pytest.mark.parametrize("url", [url for url, _, _ in VALID if url.split(":")[0] in OFFLINE])
async def test_valid_offline_ones_store(url: str, tmp_path: Path) -> None:
    svc = pathinfoservice.from_url(prepared(url, tmp_path))
    info = path_info(1)
    await svc.put(info)
    assert await svc.get(info.store_path.digest) == info
    await svc.close()


@pytest.mark.parametrize(("url", "message"), INVALID)
def test_invalid(url: str, message: str, tmp_path: Path) -> None:
    with pytest.raises(InvalidURLError, match=message):
        pathinfoservice.from_url(prepared(url, tmp_path))
