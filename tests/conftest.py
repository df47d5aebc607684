"""Shared pytest configuration for the tvix test suite.

The session fixtures every directory may use: the real Nix (``nix``) and the
real servers (``weed``, ``pg`` and their per-test ``s3_url``, ``pg_url``).
Each starts on first use only.

Markers: ``e2e`` marks what runs another process, a real server, the real
Nix or a FUSE mount (``./dev test --fast`` skips them); a test marked
``nix`` is ``e2e`` too, whether it says so or not.
"""

import pytest

from tests.support.fixtures import pg, pg_url, s3_url, weed
from tests.support.nix import nix

__all__ = ["nix", "pg", "pg_url", "s3_url", "weed"]


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if item.get_closest_marker("nix") is not None:
            item.add_marker(pytest.mark.e2e)
