"""Fixtures for the store tests: sample trees, memory services, a Nix closure in binary caches."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.support.fixtures import closure
from tests.support.services import Services
from tests.support.trees import make_tree
from tvix.castore.blobservice import MemoryBlobService
from tvix.castore.directoryservice import MemoryDirectoryService
from tvix.store.pathinfoservice import MemoryPathInfoService


@pytest.fixture
def services() -> Services:
    return Services(MemoryBlobService(), MemoryDirectoryService(), MemoryPathInfoService())


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    """A fresh tree with every kind of node and the tricky cases."""
    return make_tree(tmp_path / "tree")


__all__ = ["closure", "services", "tree"]
