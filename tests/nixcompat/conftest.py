"""Fixtures for the tvix.nixcompat tests: the real Nix and sample file trees."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from support.nix import nix  # noqa: F401


def make_tree(root: Path, big_size: int = 3 * 1024 * 1024 + 5) -> Path:
    """Create a tree with every kind of node NAR knows and the tricky cases.

    Regular, executable (and modes whose non-owner x bits must not count),
    empty files, relative/absolute/dangling symlinks, empty and nested
    directories, a non-UTF-8 name, names that sort differently bytewise than
    case-insensitively, and a file of several MiB.
    """
    root.mkdir(parents=True)
    (root / "regular.txt").write_bytes(b"hello\n")
    exe = root / "exec.sh"
    exe.write_bytes(b"#!/bin/sh\necho hi\n")
    exe.chmod(0o755)
    for mode in (0o654, 0o645, 0o700, 0o744):
        p = root / f"mode-{mode:o}"
        p.write_bytes(b"m" * (mode % 13))
        p.chmod(mode)
    (root / "empty").write_bytes(b"")
    (root / "emptydir").mkdir()
    (root / "link").symlink_to("regular.txt")
    (root / "abs-dangling").symlink_to("/nonexistent/target")
    (root / "dirlink").symlink_to("nested")
    nested = root / "nested" / "deeper" / "deepest"
    nested.mkdir(parents=True)
    (nested / "leaf").write_bytes(bytes(range(256)) * 3)
    (root / "nested" / "B").write_bytes(b"upper")
    (root / "nested" / "a").write_bytes(b"lower")
    (root / "nested" / "a-b").write_bytes(b"dash sorts before letters")
    os.mkdir(os.fsencode(root) + b"/\xff\xfe-latin1-\xe9")
    with open(os.fsencode(root) + b"/\xff\xfe-latin1-\xe9/f\xe9", "wb") as f:
        f.write(b"non-utf8 names")
    (root / "big.bin").write_bytes(os.urandom(big_size))
    return root


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    """A fresh :func:`make_tree` tree."""
    return make_tree(tmp_path / "tree")
