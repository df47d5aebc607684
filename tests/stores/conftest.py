"""Fixtures for the stores tests: the real Nix, the race and trusted composition types."""

from __future__ import annotations

import pytest
from stores_helpers import register_types
from support.nix import nix  # noqa: F401


@pytest.fixture(autouse=True, scope="session")
def _composition_types() -> None:
    register_types()
