"""Fixtures for the FUSE tests: a store on disk, imported trees, real kernel mounts."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

from tests.fs.mounting import FUSE_DEVICE, Imported, MountProcess, Store, import_paths, mounted
from tests.support.trees import make_tree


@pytest.fixture(autouse=True)
def _need_fuse() -> None:
    if not os.path.exists(FUSE_DEVICE):
        pytest.skip(f"{FUSE_DEVICE} is absent: this machine cannot mount FUSE filesystems")


@pytest.fixture(scope="module")
def imported(tmp_path_factory: pytest.TempPathFactory) -> Imported:
    if not os.path.exists(FUSE_DEVICE):
        pytest.skip(f"{FUSE_DEVICE} is absent: this machine cannot mount FUSE filesystems")
    base = tmp_path_factory.mktemp("fs")
    store = Store(base / "store")
    tree = make_tree(base / "src" / "tree")
    big = base / "src" / "big.bin"
    # Random bytes: no two chunks alike, so every chunk is its own object.
    big.write_bytes(os.urandom(24 * 1024 * 1024 + 123))
    tree_name, big_name = import_paths(store, tree, big)
    return Imported(store, tree, tree_name, big, big_name)


@pytest.fixture(scope="module")
def listed(imported: Imported, tmp_path_factory: pytest.TempPathFactory) -> Iterator[MountProcess]:
    """The imported store mounted with ``--list-root``."""
    with mounted(imported.store, tmp_path_factory.mktemp("mnt") / "m", "--list-root") as m:
        yield m


@pytest.fixture(scope="module")
def unlisted(
    imported: Imported, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[MountProcess]:
    """The imported store mounted without ``--list-root`` and without xattrs."""
    with mounted(imported.store, tmp_path_factory.mktemp("mnt") / "m", "--no-show-xattr") as m:
        yield m
