"""Fixtures for the tvix.nixcompat tests: the real Nix and sample file trees."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.support.trees import make_tree


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    """A fresh :func:`make_tree` tree."""
    return make_tree(tmp_path / "tree")
