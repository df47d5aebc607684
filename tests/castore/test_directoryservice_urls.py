"""Building DirectoryServices from URLs: every scheme's valid URLs and what they build, and the
rejected.

``{tmp}`` in a URL stands for a fresh temporary directory.
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
from tvix.castore import InvalidURLError, directoryservice
from tvix.castore.directoryservice import MemoryDirectoryService, SQLiteDirectoryService
from tvix.castore.directoryservice.grpc import GRPCDirectoryService
from tvix.castore.directoryservice.postgres import PostgresDirectoryService
from tvix.castore.testing.fixtures import DIRECTORY_A

VALID: list[tuple[str, type, dict[str, Any]]] = [
    ("memory://", MemoryDirectoryService, {}),
    ("memory:///", MemoryDirectoryService, {}),
    ("sqlite://", SQLiteDirectoryService, {"_db.path": ":memory:"}),
    ("sqlite:///", SQLiteDirectoryService, {"_db.path": ":memory:"}),
    ("sqlite://{tmp}/d.db", SQLiteDirectoryService, {"_db.path": "{tmp}/d.db"}),
    *[(url, PostgresDirectoryService, attrs) for url, attrs in POSTGRES_VALID],
    *grpc_rows(GRPCDirectoryService),
]

INVALID = [
    *GENERIC_INVALID,
    ("sqlite://{tmp}/d.db?cache=shared", "unknown option.*cache"),
    ("sqlite://relative/d.db", "no host"),
    ("sqlite://{tmp}/", "names a directory"),
    *POSTGRES_INVALID,
    *GRPC_INVALID,
]

#: Schemes whose services work without a server: a valid row of these also stores a Directory.
OFFLINE = ("memory", "sqlite")


@pytest.mark.parametrize(("url", "expected_type", "attributes"), VALID)
def test_valid(url: str, expected_type: type, attributes: dict[str, Any], tmp_path: Path) -> None:
    # Built outside any event loop and without connecting: clients dial at first use.
    svc = directoryservice.from_url(prepared(url, tmp_path))
    check_built(svc, expected_type, attributes, tmp=tmp_path)


@pytest.mark.parametrize("url", [url for url, _, _ in VALID if url.split(":")[0] in OFFLINE])
async def test_valid_offline_ones_store(url: str, tmp_path: Path) -> None:
    svc = directoryservice.from_url(prepared(url, tmp_path))
    await svc.put(DIRECTORY_A)
    assert await svc.get(DIRECTORY_A.digest) == DIRECTORY_A
    await svc.close()


@pytest.mark.parametrize(("url", "message"), INVALID)
def test_invalid(url: str, message: str, tmp_path: Path) -> None:
    with pytest.raises(InvalidURLError, match=message):
        directoryservice.from_url(prepared(url, tmp_path))
